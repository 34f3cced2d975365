"""`trio_replica.testing`, the users' cluster kit: what each of its verbs does."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.lowlevel
import trio.testing

from trio_replica import testing
from trio_replica.errors import ComponentDead
from trio_replica.runtime.config import NodeConfig


async def test_crash_restart_and_a_persistent_map_come_back(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with testing.cluster(3, base=NodeConfig(name="base")) as c:
        late = await c.start("n4", [c["n1"].address], data_dir=tmp_path)
        m = await late.open_map("m", persist=True)
        await m.put("k", 1)
        c.crash("n4")
        assert [n.id for n in c.live()] == ["n1", "n2", "n3"]
        back = await c.restart("n4")
        assert back.config.data_dir == tmp_path
        assert (await back.open_map("m", persist=True)).get("k") == 1
        with trio.fail_after(60):
            await c.overlay_ready()


async def test_stop_is_a_graceful_leave(autojump_clock: trio.testing.MockClock) -> None:
    async with testing.cluster(3) as c:
        c.stop("n3")
        await c.wait_stopped("n3")
        with trio.fail_after(30):
            await testing.wait_until(
                lambda: all("n3" not in {p.id for p in n.active_view()} for n in c.live())
            )


async def test_partition_heal_links_and_convergence(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with testing.cluster(4, latency=0.01) as c:
        maps = [await node.open_map("m") for node in c.live()]
        c.partition([c["n1"], "n2"], ["n3", "n4"])
        await maps[0].put("left", 1)
        await maps[3].put("right", 2)
        await trio.sleep(5)
        assert maps[3].get("left") is None and maps[0].get("right") is None
        c.heal()
        c.set_link("n1", "n4", latency=0.5, loss=0.2)
        with trio.fail_after(120):
            await c.converged("m")
        assert all(m.get("left") == 1 and m.get("right") == 2 for m in maps)
        with pytest.raises(LookupError):
            await c.converged("nobody-hosts-this")


async def test_websocket_clusters_have_no_network_to_cut() -> None:
    async with trio.open_nursery() as nursery:
        c = testing.Cluster(nursery)
        with pytest.raises(RuntimeError, match="memory network"):
            c.heal()
        nursery.cancel_scope.cancel()


async def test_a_component_that_keeps_crashing_closes_its_node(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with pytest.RaisesGroup(ComponentDead, flatten_subgroups=True):
        async with testing.cluster(2) as c:
            node = c["n2"]
            component = node.runtime.broadcaster
            for crashes in range(1, component.supervision.max_restarts + 2):
                with trio.fail_after(30):
                    await component.running.wait()
                    testing.crash_component(node, "broadcast")
                    await testing.wait_until(lambda n=crashes: component.crashes == n, poll=0.01)
            await trio.sleep_forever()  # the node's error ends the block


async def test_crashes_spread_over_more_than_the_window_are_restarted_forever(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with testing.cluster(2) as c:
        membership = c["n1"].runtime.membership
        for crashes in range(1, membership.supervision.max_restarts + 4):
            with trio.fail_after(120):
                await membership.running.wait()
                c.crash_component("n1", "membership")
                await testing.wait_until(lambda n=crashes: membership.crashes == n, poll=0.01)
            await trio.sleep(
                membership.supervision.restart_window / membership.supervision.max_restarts + 1
            )
        assert membership.dead is None
        with trio.fail_after(30):
            await membership.running.wait()
        assert c["n1"].liveness() == (True, "ok")
        assert c["n1"].status()["components"] == {"membership": "running", "broadcast": "running"}


async def test_the_kit_says_clearly_what_it_cannot_do(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with pytest.raises(ValueError, match="mine"):
        async with testing.cluster(2):
            raise ValueError("mine")  # comes out as itself, not in a group
    async with testing.cluster(2) as c:
        await c["n1"].open_map("m")
        with pytest.raises(LookupError, match="not open on n2"):
            await c.converged("m")
        with pytest.raises(LookupError, match="never started"):
            await c.restart("n9")
        with pytest.raises(ValueError, match="running already"):
            await c.start("n1")
