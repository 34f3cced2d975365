"""Every partition heals (issue 15), on the memory network in virtual time: the overlays merge
again through the lost contacts each side keeps probing, whichever side the seeds are on,
and the maps converge after it."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from trio_replica.core.hyparview import HyParViewConfig
from trio_replica.node import Node
from trio_replica.runtime.config import NodeConfig, ReplicaConfig
from trio_replica.stores.maps import ReplicatedMap
from trio_replica.transports.memory import MemoryNetwork

from .harness import Cluster, overlay_ok, wait_until
from .test_maps_memory import converged

#: The merge bound (README "Partitions"): a node probes one lost contact every
#: `reconnect_interval` (+-25%), a contact's wait grows to `reconnect_backoff_max`; then a
#: dial and a handshake. The maps follow within one anti-entropy period.
HV = HyParViewConfig()
MERGE_BOUND = HV.reconnect_backoff_max + 1.25 * HV.reconnect_interval + 5.0
AE = 10.0


def connected(nodes: list[Node]) -> bool:
    """One component in the active views (undirected)."""
    ids = {n.id for n in nodes}
    graph = {n.id: {p.id for p in n.active_view() if p.id in ids} for n in nodes}
    seen, todo = set(), [nodes[0].id]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        todo.extend(graph[current] | {k for k, v in graph.items() if current in v})
    return seen == ids


async def _split_heal(
    net_seed: int, seeds_of: dict[str, list[str]], apart: float
) -> tuple[float, float]:
    """Five nodes, cut {a, b} | {c, d, e} for `apart` seconds with writes on both sides;
    return how long after the heal the overlay merged and the maps converged."""
    net = MemoryNetwork(seed=net_seed)
    base = NodeConfig(name="x", replica=ReplicaConfig(anti_entropy_interval=AE))
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, net, base=base)
        nodes = [await c.start(n, [f"mem://{s}" for s in seeds_of[n]]) for n in "abcde"]
        with trio.fail_after(60):
            await wait_until(lambda: overlay_ok(nodes, min_active=2))
        maps: list[ReplicatedMap] = [await n.open_map("kv") for n in nodes]
        with trio.fail_after(60):
            await wait_until(lambda: all(not m.replica.core.busy() for m in maps))
        net.partition(["a", "b"], ["c", "d", "e"])
        for i in range(20):
            await maps[i % 2].put(f"left-{i}", i)
            await maps[2 + i % 3].put(f"right-{i}", i)
            await trio.sleep(apart / 20)
        net.heal()
        healed = trio.current_time()
        with trio.fail_after(MERGE_BOUND):
            await wait_until(lambda: connected(nodes), poll=0.5)
        merged = trio.current_time() - healed
        with trio.fail_after(AE * 1.25 + 30):
            await wait_until(lambda: converged(maps) and len(maps[0]) == 40, poll=0.5)
        done = trio.current_time() - healed
        nursery.cancel_scope.cancel()
    return merged, done


EVERY_SEED = {n: list("abcde") for n in "abcde"}
ONE_SEED = {"a": [], **{n: ["a"] for n in "bcde"}}


@pytest.mark.parametrize("net_seed", range(10))
async def test_seeds_on_both_sides_a_cut_longer_than_the_rejoin_period_heals(
    autojump_clock: trio.testing.MockClock, net_seed: int
) -> None:
    merged, done = await _split_heal(net_seed, EVERY_SEED, apart=3 * HV.rejoin_interval)
    assert merged <= MERGE_BOUND and done <= MERGE_BOUND + AE * 1.25 + 30


async def test_a_single_seed_cluster_heals_after_a_long_partition(
    autojump_clock: trio.testing.MockClock,
) -> None:
    merged, _ = await _split_heal(90, ONE_SEED, apart=600.0)
    assert merged <= MERGE_BOUND


async def test_the_halves_merge_when_the_only_seed_is_down_at_the_heal(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork(seed=91)
    base = NodeConfig(name="x", replica=ReplicaConfig(anti_entropy_interval=AE))
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, net, base=base)
        nodes = [await c.start(n, [f"mem://{s}" for s in ONE_SEED[n]]) for n in "abcde"]
        with trio.fail_after(60):
            await wait_until(lambda: overlay_ok(nodes, min_active=2))
        maps: list[ReplicatedMap] = [await n.open_map("kv") for n in nodes]
        net.partition(["a", "b"], ["c", "d", "e"])
        await trio.sleep(120)
        c.crash("a")  # the seed: down when the cut heals
        survivors, smaps = nodes[1:], maps[1:]
        for i in range(10):
            await smaps[i % 4].put(f"k{i}", i)
        net.heal()
        with trio.fail_after(MERGE_BOUND):
            await wait_until(lambda: connected(survivors), poll=0.5)
        with trio.fail_after(AE * 1.25 + 30):
            await wait_until(lambda: converged(smaps) and len(smaps[0]) == 10, poll=0.5)
        nursery.cancel_scope.cancel()
