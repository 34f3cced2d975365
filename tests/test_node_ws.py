"""Nodes over real websockets on 127.0.0.1: joining, crashes, the control path."""

from __future__ import annotations

import contextlib
import logging
import re

import pytest
import trio

from trio_replica.core.events import DownReason, PeerDown
from trio_replica.node import open_node
from trio_replica.runtime.config import NodeConfig
from trio_replica.runtime.control import ControlError, open_control
from trio_replica.transports.base import Refusals

from .harness import Cluster, overlay_ok, wait_until


async def test_ten_nodes_join_then_survivors_repair_after_three_crash() -> None:
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery)
        seed = await c.start("w0")
        for i in range(1, 10):
            await c.start(f"w{i}", [seed.address])
        with trio.fail_after(30):
            await wait_until(lambda: overlay_ok(c.live(), min_active=2))

        victims = ["w3", "w6", "w9"]
        watchers = {
            n.id: {p.id for p in n.active_view()} & set(victims)
            for n in c.live()
            if n.id not in victims
        }
        reported: dict[str, set[str]] = {name: set() for name in watchers}
        failure_timeout = seed.config.link.idle_timeout + seed.config.link.ping_interval

        async def watch(name: str, task_status: trio.TaskStatus[None]) -> None:
            async with c.nodes[name].events() as events:
                task_status.started()
                async for event in events:
                    if isinstance(event, PeerDown) and event.peer.id in victims:
                        assert event.reason is DownReason.FAILED
                        reported[name].add(event.peer.id)

        async with trio.open_nursery() as watching:
            for name in watchers:
                await watching.start(watch, name)
            for name in victims:
                c.crash(name)
            with trio.fail_after(failure_timeout):
                await wait_until(lambda: reported == watchers, poll=0.02)
            watching.cancel_scope.cancel()

        with trio.fail_after(30):
            await wait_until(lambda: overlay_ok(c.live(), min_active=2))
        nursery.cancel_scope.cancel()


async def test_status_over_the_control_path_needs_the_secret() -> None:
    secret = b"k" * 32
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, base=NodeConfig(name="x", secret=secret))
        a = await c.start("a")
        b = await c.start("b", [a.address])
        with trio.fail_after(30):
            await wait_until(lambda: len(a.active_view()) == 1)
        async with open_control(a.address, secret=secret) as client:
            status = await client.call("status")
        assert status["id"] == "a"
        assert status["active"] == [["b", b.address]]
        assert "messages_sent" in status["stats"]
        try:
            async with open_control(a.address, secret=b"wrong" * 8) as client:
                await client.call("status")
        except ControlError as exc:
            # Said from the client's side, without blaming the node.
            assert re.search(r"the cluster secrets of client-\w+ and a differ$", str(exc)), exc
        else:
            raise AssertionError("a client with the wrong secret was served")
        assert a.stats()["handshakes_refused"].get("secret", 0) == 0  # the client refused first
        with pytest.raises(ControlError, match=r"client-\w+ has no cluster secret and a has one"):
            async with open_control(a.address) as client:
                await client.call("status")
        with pytest.raises(
            ControlError, match=r"cluster names differ: client-\w+ is in 'other', a"
        ):
            async with open_control(a.address, secret=secret, cluster="other") as client:
                await client.call("status")
        nursery.cancel_scope.cancel()


async def test_normal_local_runs_do_not_warn(caplog: pytest.LogCaptureFixture) -> None:
    """A loopback node without a secret, and connections refused while a node shuts
    down, are normal: INFO, never WARNING (issue 21)."""
    caplog.set_level(logging.INFO, logger="trio_replica")
    async with open_node(NodeConfig(name="a")) as a:
        address = a.address
        await a.leave()  # closing: newcomers are refused from now on
        with contextlib.suppress(ControlError):
            async with open_control(address, timeout=2):
                pass
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [], [r.getMessage() for r in warnings]
    assert any("no cluster secret" in r.getMessage() for r in caplog.records)


def test_refusals_of_a_quiet_reason_are_info(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("trio_replica.test_refusals")
    refusals = Refusals(log, "node x", quiet=("closing",))

    async def refuse() -> None:
        refusals.refuse("closing", "ws://1.2.3.4:5")
        refusals.refuse("bad_hello", "ws://1.2.3.4:5")

    with caplog.at_level(logging.INFO, logger="trio_replica.test_refusals"):
        trio.run(refuse)
    assert [(r.levelno, r.getMessage().split(" (")[1]) for r in caplog.records] == [
        (logging.INFO, "closing)"),
        (logging.WARNING, "bad_hello)"),
    ]
