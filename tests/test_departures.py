"""`remove_node` means death: called once, on every node, for a node that left or whose
failure others confirm; never for a live node that one neighbour lost its link to."""

from __future__ import annotations

from collections import Counter
from typing import Any

import trio
import trio.testing

from trio_replica.core.events import DownReason, NodeRemoved
from trio_replica.node import Node
from trio_replica.transports.memory import MemoryNetwork

from .harness import Cluster, overlay_ok, wait_until


class Recorder:
    """A replica owner that records `remove_node` calls (no state of its own)."""

    def __init__(self) -> None:
        self.removed: Counter[str] = Counter()

    async def merge_delta(self, name: str, delta: Any) -> None:
        return None

    async def apply_full_sync(self, name: str, snapshot: list[Any]) -> None:
        return None

    async def full_sync_snapshot(self, name: str) -> list[Any] | None:
        return None

    async def remove_node(self, name: str, node: str) -> None:
        self.removed[node] += 1


async def _cluster(c: Cluster, names: list[str]) -> tuple[list[Node], dict[str, Recorder]]:
    first = await c.start(names[0])
    for name in names[1:]:
        await c.start(name, [first.address])
    nodes = c.live()
    with trio.fail_after(60):
        await wait_until(lambda: overlay_ok(nodes, min_active=min(2, len(nodes) - 1)))
    recorders = {n.id: Recorder() for n in nodes}
    for n in nodes:
        await n.open_replica("r", recorders[n.id])
    return nodes, recorders


async def test_a_lost_link_between_live_nodes_removes_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork(seed=80)
    async with trio.open_nursery() as nursery:
        nodes, recorders = await _cluster(Cluster(nursery, net), ["a", "b", "c"])
        a, b, _ = nodes
        assert b.me in a.active_view()
        # a and b stop hearing each other; c still reaches both.
        net.set_link("a", "b", loss=1.0)
        with trio.fail_after(60):
            await wait_until(lambda: b.me not in a.active_view())
        await trio.sleep(2 * a.config.departures.lone_timeout)
        net.clear_link("a", "b")
        assert all(not r.removed for r in recorders.values()), recorders
        stats = [n.runtime.departures.snapshot() for n in nodes]
        assert sum(s["suspicions_sent"] for s in stats) >= 1
        assert sum(s["refutations_sent"] for s in stats) >= 1
        assert sum(s["removed_failed"] for s in stats) == 0
        nursery.cancel_scope.cancel()


async def test_a_crashed_node_is_removed_once_on_every_node(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork(seed=81)
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, net)
        nodes, recorders = await _cluster(c, [f"n{i}" for i in range(6)])
        victim = nodes[3]
        events: list[NodeRemoved] = []

        async def watch(node: Node, task_status: trio.TaskStatus[None]) -> None:
            async with node.events() as feed:
                task_status.started()
                async for event in feed:
                    if isinstance(event, NodeRemoved):
                        events.append(event)

        survivors = [n for n in nodes if n is not victim]
        for node in survivors:
            await nursery.start(watch, node)
        c.crash(victim.id)
        with trio.fail_after(60):
            await wait_until(lambda: all(recorders[n.id].removed[victim.id] for n in survivors))
        await trio.sleep(30)  # nothing more comes
        assert all(recorders[n.id].removed == Counter({victim.id: 1}) for n in survivors)
        assert sorted(e.node for e in events) == [victim.id] * len(survivors)
        assert {e.reason for e in events} == {DownReason.FAILED}
        nursery.cancel_scope.cancel()


async def test_a_node_that_leaves_is_removed_once_on_every_node(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork(seed=82)
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, net)
        nodes, recorders = await _cluster(c, [f"n{i}" for i in range(5)])
        leaving = nodes[2]
        survivors = [n for n in nodes if n is not leaving]
        await leaving.leave()
        with trio.fail_after(30):
            await wait_until(lambda: all(recorders[n.id].removed[leaving.id] for n in survivors))
        await trio.sleep(30)
        assert all(recorders[n.id].removed == Counter({leaving.id: 1}) for n in survivors)
        assert sum(n.runtime.departures.snapshot()["removed_left"] for n in survivors) == len(
            survivors
        )
        nursery.cancel_scope.cancel()


async def test_a_node_two_neighbours_lose_at_once_refutes_both_and_stays(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Two suspicions of one live node within the refutation interval: both are answered
    # (a dropped second answer left a one-observer suspicion to confirm unrefuted).
    net = MemoryNetwork(seed=83)
    async with trio.open_nursery() as nursery:
        nodes, recorders = await _cluster(Cluster(nursery, net), ["a", "b", "c", "x"])
        x = nodes[3]
        assert all(x.me in n.active_view() for n in nodes[:3])
        net.set_link("x", "a", loss=1.0)
        net.set_link("x", "b", loss=1.0)
        await trio.sleep(2 * x.config.departures.lone_timeout)
        assert all(not r.removed for r in recorders.values()), recorders
        assert x.runtime.departures.snapshot()["refutations_sent"] >= 2
        nursery.cancel_scope.cancel()


async def test_a_replica_that_missed_a_removal_makes_up_for_it_after_lagged(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from trio_replica.core.events import Lagged

    net = MemoryNetwork(seed=84)
    async with trio.open_nursery() as nursery:
        nodes, recorders = await _cluster(Cluster(nursery, net), ["a", "b", "c"])
        a = nodes[0]
        replica = a.runtime.replicas["r"]
        # The node removed "ghost" but the replica's event feed overflowed meanwhile.
        a.runtime.departures._removed["ghost"] = None
        await replica._on_membership(Lagged(1))
        await replica._on_membership(Lagged(1))
        assert recorders["a"].removed == Counter({"ghost": 1})
        nursery.cancel_scope.cancel()
