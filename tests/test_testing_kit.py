"""`trio_replica.testing`, the users' cluster kit: what each of its verbs does."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.lowlevel
import trio.testing

from trio_replica import testing
from trio_replica.config import NodeConfig


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


async def test_a_component_that_keeps_crashing_is_given_up_and_the_node_says_so(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with testing.cluster(2) as c:
        node = c["n2"]
        component = node.broadcaster
        limit = component.max_restarts
        for crashes in range(1, limit + 2):
            with trio.fail_after(30):
                await component.running.wait()
                testing.crash_component(node, "broadcast")
                await testing.wait_until(lambda n=crashes: component.crashes == n, poll=0.01)
        with trio.fail_after(30):
            await testing.wait_until(lambda: component.dead is not None)
        live, why = node.liveness()
        assert not live and "broadcast dead" in why
        assert node.status()["components"]["broadcast"].startswith("dead")
        assert node.status()["components"]["membership"] == "running"
        # Crashes spread over more than the window are restarted forever.
        other = c["n1"].membership
        for crashes in range(1, limit + 4):
            with trio.fail_after(120):
                await other.running.wait()
                c.crash_component("n1", "membership")
                await testing.wait_until(lambda n=crashes: other.crashes == n, poll=0.01)
            await trio.sleep(other.restart_window / limit + 1)
        assert other.dead is None
