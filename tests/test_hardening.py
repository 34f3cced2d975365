"""Inputs that once could break a node: each is refused or contained, and the node serves on."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from trio_replica.core.messages import (
    Credit,
    ForwardJoin,
    IHave,
    MessageId,
    Peer,
    Role,
    SyncChunk,
)
from trio_replica.core.wire import FRAME_OVERHEAD, encode_frame, frame_from_parts
from trio_replica.runtime.control import ControlError, open_control
from trio_replica.runtime.handshake import Credentials, handshake_as_dialer
from trio_replica.runtime.link import Link
from trio_replica.runtime.linkconfig import LinkConfig
from trio_replica.runtime.stats import NodeStats
from trio_replica.stores.maps import ValidationError
from trio_replica.testing import crash_component
from trio_replica.transports.memory import MemoryNetwork

from .harness import Cluster, wait_until


async def test_batches_never_exceed_the_frame_limit(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork(seed=31)
    cfg = LinkConfig()

    async def sink(conn: Any) -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        await nursery.start(net.transport("b").serve, "mem://b", sink)
        async with net.transport("a").open_connection("mem://b", timeout=5) as conn:

            async def ignore(*_: Any) -> None:
                return None

            link = Link(
                conn,
                Peer("b", "mem://b"),
                role=Role.NODE,
                outbound=True,
                config=cfg,
                stats=NodeStats(),
                on_message=ignore,
            )
            # The peer's grant: payloads travel on credit (outbox.py).
            link._on_credit(Credit(1000, 10**9))
            link.send_nowait(IHave.of([(MessageId("x", i, i), 1, "t") for i in range(60)]))
            for i in range(10):
                link.send_nowait(SyncChunk("m", 1, i, i == 9, b"x" * 200_000))
            sent = 0
            while True:
                parts = link._take_batch()
                if not parts:
                    break
                assert len(frame_from_parts(parts)) <= cfg.max_frame
                assert sum(map(len, parts)) <= cfg.max_frame - FRAME_OVERHEAD
                sent += len(parts)
            assert sent == 11
        nursery.cancel_scope.cancel()


async def test_peer_supplied_bad_address_is_refused_at_the_boundary(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork(seed=32)
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, net)
        a = await c.start("a")
        async with net.transport("evil").open_connection(a.address, timeout=5) as conn:
            creds = Credentials("trio-replica", b"", Peer("evil", "mem://evil"))
            await handshake_as_dialer(conn, creds, role=Role.NODE, timeout=5)
            bad = encode_frame([ForwardJoin(Peer("x", "ws://" + "a" * 70 + ".example:80"), 0)])
            await conn.send(bad)
            with trio.fail_after(5):
                await wait_until(lambda: a.stats()["rejected"].get("field", 0) >= 1)
        assert a.stats()["rejected"] == {"field": 1}
        b = await c.start("b", [a.address])  # still serving
        with trio.fail_after(30):
            await wait_until(lambda: [p.id for p in a.active_view()] == ["b"])
        del b
        nursery.cancel_scope.cancel()


async def test_raising_validator_and_status_after_deliveries_over_control() -> None:
    def validator(key: Any, value: Any) -> bool:
        if value == "boom":
            raise RuntimeError("validator bug")
        return True

    async with trio.open_nursery() as nursery:
        c = Cluster(nursery)
        a = await c.start("a")
        b = await c.start("b", [a.address])
        with trio.fail_after(10):
            await wait_until(lambda: len(a.active_view()) == 1, poll=0.02)
        ma = await a.open_map("v", validator=validator)
        await b.open_map("v", validator=validator)
        with pytest.raises(ValidationError):
            await ma.put("k", "boom")
        await ma.put("k", "fine")
        async with open_control(a.address) as client:
            with pytest.raises(ControlError, match="ValidationError"):
                await client.call("map.put", ["v", "k2", "boom"])
            status = await client.call("status")  # hop histograms have int keys inside
        assert status["maps"]["v"]["size"] == 1
        assert b.maps()["v"].get("k") in (None, "fine")
        nursery.cancel_scope.cancel()


async def test_garbage_before_and_after_the_handshake_is_refused_and_counted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    import random

    from trio_replica.core.messages import Gossip

    net = MemoryNetwork(seed=33, max_frame=4 * 1024 * 1024)  # lets oversize frames through
    rng = random.Random(5)
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, net)
        a = await c.start("a")
        # Before the handshake: random bytes, then silence (the hello deadline).
        async with net.transport("x1").open_connection(a.address, timeout=5) as conn:
            await conn.send(rng.randbytes(100))
            with trio.fail_after(5):
                await wait_until(lambda: "malformed" in a.stats()["handshakes_refused"])
        async with net.transport("x2").open_connection(a.address, timeout=5):
            with trio.fail_after(a.config.link.hello_timeout + 1):
                await wait_until(lambda: "silent" in a.stats()["handshakes_refused"])
        refused = a.stats()["handshakes_refused"]
        assert refused.get("malformed", 0) == 1 and refused.get("silent", 0) == 1
        # After the handshake: random, truncated, mutated, deep and oversized frames.
        good = encode_frame([Gossip(MessageId("x3", 1, 1), 1, "t", b"\xa0")])
        deep = b"\x82\x01" + b"\x81" * 40 + b"\x00"
        frames = [
            rng.randbytes(64),
            good[:-3],
            bytes(b ^ 0x55 for b in good),
            deep,
            b"\x82\x01\x5b" + b"\xff" * 8,  # a byte string claiming 2**64 bytes
            b"\x82\x01\x58\x10" + bytes(a.config.link.max_frame),  # larger than a frame
        ]
        async with net.transport("x3").open_connection(a.address, timeout=5) as conn:
            creds = Credentials("trio-replica", b"", Peer("x3", "mem://x3"))
            await handshake_as_dialer(conn, creds, role=Role.NODE, timeout=5)
            for frame in frames:
                await conn.send(frame)
            with trio.fail_after(5):
                await wait_until(lambda: sum(a.stats()["rejected"].values()) >= len(frames))
        rejected = a.stats()["rejected"]
        assert sum(rejected.values()) == len(frames), rejected
        assert rejected.get("too_large", 0) == 1

        # A seed that accepts connections but never finishes the handshake.
        async def mute(conn: Any) -> None:
            await trio.sleep_forever()

        await nursery.start(net.transport("mute").serve, "mem://mute", mute)
        b = await c.start("b", ["mem://mute", a.address])
        with trio.fail_after(30):
            await wait_until(lambda: [p.id for p in b.active_view()] == ["a"])
        # Still serving, nothing leaked: the node's tasks are the usual ones.
        assert [p.id for p in a.active_view()] == ["b"]
        nursery.cancel_scope.cancel()


async def test_open_node_cancelled_while_starting_returns_promptly() -> None:
    from trio_replica.node import open_node
    from trio_replica.runtime.config import NodeConfig

    for delay in (0, 0.0001, 0.001, 0.01, 0.05):
        with trio.fail_after(5):  # a hang here was a shielded task stuck in nursery.start
            with trio.move_on_after(delay):
                async with open_node(NodeConfig(name="a")):
                    await trio.sleep_forever()


async def test_subscribing_while_the_source_restarts_waits_for_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from trio_replica.core.events import Delivery, Resubscribed

    net = MemoryNetwork(seed=34)
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, net)
        a = await c.start("a")
        b = await c.start("b", [a.address])
        with trio.fail_after(30):
            await wait_until(lambda: len(a.active_view()) == 1)
        crash_component(a, "broadcast")
        with trio.fail_after(30):
            await wait_until(lambda: not a.runtime.broadcaster.running.is_set(), poll=0.001)
        async with a.subscribe("t") as sub:
            with trio.fail_after(10):
                assert isinstance(await sub.receive(), Resubscribed)
            await b.broadcast("t", "after")
            with trio.fail_after(10):
                item = await sub.receive()
            assert isinstance(item, Delivery) and item.payload == "after"
        nursery.cancel_scope.cancel()


async def test_a_put_peers_would_refuse_fails_for_its_writer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from trio_replica.errors import MessageTooLarge

    net = MemoryNetwork(seed=35)
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, net)
        a = await c.start("a")
        the_map = await a.open_map("limits")
        await trio.sleep(1)  # the map's announcement in the host directory goes out
        sent = a.stats()["broadcast"]["broadcasts"]
        with pytest.raises(MessageTooLarge):
            await the_map.put("big", "x" * 70_000)  # over the 64 KiB value limit
        with pytest.raises(MessageTooLarge):
            await the_map.put("k" * 2000, 1)  # over the 1 KiB key limit
        with pytest.raises(TypeError):
            await the_map.put(1.5, 1)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            await the_map.put("k", {1: "int keys inside values"})
        assert len(the_map) == 0 and the_map.tombstones == 0
        assert a.stats()["broadcast"]["broadcasts"] == sent  # nothing was sent either
        nursery.cancel_scope.cancel()
