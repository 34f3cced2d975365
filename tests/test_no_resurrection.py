"""Deletes stay deleted: a replica out of touch for longer than the tombstone TTL drops
what a forgotten delete may have hit before it syncs again (virtual time on the memory
network; every node's wall clock follows the virtual clock)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from trio_replica.node import Node
from trio_replica.runtime.config import NodeConfig, ReplicaConfig
from trio_replica.stores.maps import ReplicatedMap
from trio_replica.transports.memory import MemoryNetwork

from .harness import Cluster, overlay_ok, virtual_wall, wait_until
from .harness import start_walled as start

TTL = 100.0


async def open_m(node: Node, persist: bool = False) -> ReplicatedMap:
    return await node.open_map("m", tombstone_ttl=TTL, persist=persist)


def base(tmp_path: Path) -> NodeConfig:
    return NodeConfig(
        name="x", data_dir=tmp_path, replica=ReplicaConfig(anti_entropy_interval=10.0)
    )


@pytest.mark.parametrize("protected", [True, False])
async def test_a_node_offline_for_twice_the_ttl_brings_no_deleted_key_back(
    autojump_clock: trio.testing.MockClock,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    protected: bool,
) -> None:
    if not protected:
        # The same run without the rule: the deleted key does come back (the test can fail).
        async def nothing(self: ReplicatedMap, name: str) -> None:
            return None

        monkeypatch.setattr(ReplicatedMap, "before_sync", nothing)
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, MemoryNetwork(seed=70), base=base(tmp_path))
        a = await start(c, "a", [])
        b = await start(c, "b", [a.address])
        d = await start(c, "d", [a.address])
        with trio.fail_after(30):
            await wait_until(lambda: overlay_ok([a, b, d]))
        ma, mb, md = await open_m(a), await open_m(b), await open_m(d, persist=True)
        await ma.put("gone", 1)
        await ma.put("kept", 2)
        written = virtual_wall()
        # A comparison d opened after the writes completes (its sync mark; entries newer
        # than the mark count as d's own). The store's disk work runs in a thread, which
        # lets the mock clock jump ahead: this takes virtual time.
        with trio.fail_after(600):
            await wait_until(lambda: md.get("gone") == 1 and md.get("kept") == 2)
            await wait_until(lambda: (md.last_synced_ms or 0) > written)
        c.stop("d")
        await c.wait_stopped("d")
        await ma.delete("gone")
        # Twice the TTL: a and b collect the tombstone (every TTL / 4).
        await trio.sleep(2 * TTL)
        assert ma.entry("gone") is None and mb.entry("gone") is None
        d = await start(c, "d", [a.address])
        md = await open_m(d, persist=True)
        with trio.fail_after(600):
            await wait_until(lambda: ma._map == mb._map == md._map and md.get("kept") == 2)
        came_back = [m.get("gone") for m in (ma, mb, md)]
        if protected:
            assert came_back == [None, None, None]
            assert md.stats.stale_entries_dropped >= 2
        else:
            assert came_back == [1, 1, 1]
        nursery.cancel_scope.cancel()


async def test_a_partition_longer_than_the_ttl_keeps_the_isolated_writes_and_the_deletes(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    net = MemoryNetwork(seed=71)
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, net, base=base(tmp_path))
        a = await start(c, "a", [])
        b = await start(c, "b", [a.address])
        d = await start(c, "d", [a.address])
        with trio.fail_after(30):
            await wait_until(lambda: overlay_ok([a, b, d]))
        ma, mb, md = await open_m(a), await open_m(b), await open_m(d)
        await ma.put("gone", 1)
        await ma.put("kept", 2)
        with trio.fail_after(60):
            await wait_until(lambda: md.get("gone") == 1 and md.get("kept") == 2)
            await wait_until(lambda: md.last_synced_ms is not None)
        net.partition(["a", "b"], ["d"])
        await trio.sleep(10)
        await ma.delete("gone")
        await md.put("solo", 3)  # written while cut off: d's alone, never synced
        await trio.sleep(2 * TTL)
        assert ma.entry("gone") is None
        net.heal()
        with trio.fail_after(600):
            await wait_until(lambda: ma._map == mb._map == md._map and md.get("kept") == 2)
        assert [m.get("solo") for m in (ma, mb, md)] == [3, 3, 3]
        assert [m.get("gone") for m in (ma, mb, md)] == [None, None, None]
        assert [m.get("kept") for m in (ma, mb, md)] == [2, 2, 2]
        assert md.stats.stale_entries_dropped >= 2
        nursery.cancel_scope.cancel()
