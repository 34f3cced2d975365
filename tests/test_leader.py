"""Leader election with fencing tokens (issue 16), on the memory network in virtual time:
a dead leader is replaced within a lease TTL and two heartbeats with a greater fence; each
side of a partition elects; after the heal one leader remains; and a `FencedResource`
written by whoever believes it leads never accepts a stale fence (hypothesis over kill and
partition schedules)."""

from __future__ import annotations

import contextlib
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trio_replica.errors import NodeClosed
from trio_replica.runtime.config import LeaderConfig
from trio_replica.stores.leader import Elected, FencedResource, Revoked, StaleFence
from trio_replica.transports.memory import MemoryNetwork

from .harness import Cluster, overlay_ok, start_walled, wait_until, walled_cluster

CONFIG = LeaderConfig()


@attrs.define
class Watch:
    """What every candidate saw, and the resource they all write to."""

    resource: FencedResource = attrs.Factory(FencedResource)
    elected: list[tuple[float, str, int]] = attrs.Factory(list)
    revoked: list[tuple[float, str, int]] = attrs.Factory(list)
    leads: dict[str, Any] = attrs.Factory(dict)
    #: Every write the resource accepted: (time, node, fence).
    accepted: list[tuple[float, str, int]] = attrs.Factory(list)


async def _stand(node: Any, name: str, priority: int, watch: Watch) -> None:
    """Stand for `name`; while leading, write to the resource with the fence every 0.5 s
    (a crashed node's writer goes on, as a paused process would: the fence stops it)."""
    with contextlib.suppress(NodeClosed):
        await _stand_open(node, name, priority, watch)


async def _stand_open(node: Any, name: str, priority: int, watch: Watch) -> None:
    async with node.leader(name, priority) as lead, trio.open_nursery() as nursery:
        watch.leads[node.id] = lead

        async def write() -> None:
            while True:
                if lead.is_leader:
                    fence = lead.fence
                    if watch.resource.accept(fence):
                        watch.accepted.append((trio.current_time(), node.id, fence))
                    elif not node.closing:
                        # Refused: a leader of another side (now dead or deposed) wrote
                        # later. We lead here, so we begin a newer term.
                        with contextlib.suppress(NodeClosed, RuntimeError):
                            await lead.new_term(above=watch.resource.highest)
                await trio.sleep(0.5)

        nursery.start_soon(write)
        async for change in lead:
            if isinstance(change, Elected):
                watch.elected.append((trio.current_time(), node.id, change.fence))
            elif isinstance(change, Revoked):
                watch.revoked.append((trio.current_time(), node.id, change.fence))


async def _cluster(nursery: trio.Nursery, net: MemoryNetwork, n: int) -> tuple[Cluster, list[Any]]:
    return await walled_cluster(nursery, net, "l", n)


def _leaders(watch: Watch, nodes: list[Any]) -> set[str]:
    return {n.id for n in nodes if n.id in watch.leads and watch.leads[n.id].is_leader}


def _check_fences(watch: Watch) -> None:
    """Each node's fences strictly increase; no two terms share a fence."""
    fences = [f for _, _, f in watch.elected]
    assert len(set(fences)) == len(fences)
    for node in {n for _, n, _ in watch.elected}:
        mine = [f for _, n, f in watch.elected if n == node]
        assert mine == sorted(mine)


async def test_ten_candidates_one_leader_and_failover_with_a_greater_fence(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork(seed=130)
    watch = Watch()
    async with trio.open_nursery() as nursery:
        c, nodes = await _cluster(nursery, net, 10)
        for node in nodes:
            nursery.start_soon(_stand, node, "db", 0, watch)
        with trio.fail_after(60):
            await wait_until(lambda: len(watch.elected) >= 1, poll=0.1)
        await trio.sleep(3 * CONFIG.ttl)
        # One leader, the lowest node id (all priorities equal), seen so by everyone.
        first = min(n.id for n in nodes)
        assert _leaders(watch, nodes) == {first}
        assert [n for _, n, _ in watch.elected] == [first]
        assert {n.leader_of("db") for n in nodes} == {first}
        fence = watch.leads[first].fence
        assert {n.fence("db") for n in nodes} == {fence}

        killed_at = trio.current_time()
        c.crash(first)
        survivors = [n for n in nodes if n.id != first]
        with trio.fail_after(60):
            await wait_until(lambda: len(watch.elected) >= 2, poll=0.05)
        at, second, new_fence = watch.elected[1]
        assert second == min(n.id for n in survivors)
        assert new_fence > fence
        # Within the lease: TTL after the last renewal, seen at the next heartbeat.
        assert at - killed_at <= CONFIG.ttl + 2 * CONFIG.heartbeat
        # The dead leader's writes are refused once its successor wrote.
        with trio.fail_after(5):
            await wait_until(lambda: watch.resource.highest == new_fence)
        with pytest.raises(StaleFence):
            watch.resource.check(fence)
        # A higher priority wins at once, with a greater fence still.
        other = Watch()  # another name, elected on its own
        nursery.start_soon(_stand, survivors[-1], "db-other", 0, other)
        late = await start_walled(c, "l99", [survivors[0].address])
        nursery.start_soon(_stand, late, "db", 5, watch)
        with trio.fail_after(60):
            await wait_until(lambda: _leaders(watch, [*survivors, late]) == {late.id}, poll=0.1)
        assert watch.leads[late.id].fence > new_fence
        assert any(n == second for _, n, _ in watch.revoked)
        assert [n for _, n, _ in other.elected] == [survivors[-1].id]
        _check_fences(watch)
        nursery.cancel_scope.cancel()


async def _partition_schedule(schedule: list[tuple[str, int]], seed: int) -> None:
    """Run `schedule` (kill node i, or cut the cluster at i for a while) on 6 candidates,
    then heal and settle: one leader, whose fence is the greatest ever minted."""
    net = MemoryNetwork(seed=seed)
    watch = Watch()
    async with trio.open_nursery() as nursery:
        c, nodes = await _cluster(nursery, net, 6)
        for i, node in enumerate(nodes):
            nursery.start_soon(_stand, node, "lock", i % 2, watch)
        live = list(nodes)
        for action, i in schedule:
            if action == "kill" and len(live) > 2:
                victim = live.pop(i % len(live))
                c.crash(victim.config.name)
            elif action == "cut":
                cut = 1 + i % (len(live) - 1)
                net.partition(
                    [n.config.name for n in live[:cut]], [n.config.name for n in live[cut:]]
                )
                await trio.sleep(2 * CONFIG.ttl)
                net.heal()
            await trio.sleep(CONFIG.ttl / 2)

        def settled() -> bool:
            leaders = _leaders(watch, live)
            return len(leaders) == 1 and {n.leader_of("lock") for n in live} == leaders

        with trio.fail_after(300):
            await wait_until(settled, poll=0.5)
        await trio.sleep(2 * CONFIG.ttl)
        with trio.fail_after(300):
            await wait_until(settled, poll=0.5)
        (leader,) = _leaders(watch, live)
        final = watch.leads[leader].fence
        # Safety: once the leader's current fence was accepted, nobody else's write was
        # (the crashed nodes' writers go on trying with their old fences).
        with trio.fail_after(10):
            await wait_until(lambda: watch.resource.highest == watch.leads[leader].fence)
        final = watch.leads[leader].fence
        first = next(i for i, (_, _, f) in enumerate(watch.accepted) if f == final)
        after = watch.accepted[first:]
        assert {n for _, n, _ in after} == {leader}, (leader, final, after[:8])
        _check_fences(watch)
        nursery.cancel_scope.cancel()


async def test_each_side_of_a_partition_elects_and_one_leader_remains_after_the_heal(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork(seed=131)
    watch = Watch()
    async with trio.open_nursery() as nursery:
        _, nodes = await _cluster(nursery, net, 10)
        for node in nodes:
            nursery.start_soon(_stand, node, "db", 0, watch)
        with trio.fail_after(60):
            await wait_until(lambda: len(_leaders(watch, nodes)) == 1, poll=0.1)
        left, right = nodes[:5], nodes[5:]
        net.partition([n.config.name for n in left], [n.config.name for n in right])
        with trio.fail_after(60):
            await wait_until(
                lambda: len(_leaders(watch, left)) == 1 and len(_leaders(watch, right)) == 1,
                poll=0.25,
            )
        right_fence = watch.leads[next(iter(_leaders(watch, right)))].fence
        await trio.sleep(CONFIG.ttl)
        net.heal()

        def merged() -> bool:
            # The overlay whole again (up to ~50 s after a heal, README "Partitions
            # heal"), and one leader, the same for everyone.
            leaders = _leaders(watch, nodes)
            return (
                overlay_ok(nodes)
                and len(leaders) == 1
                and {n.leader_of("db") for n in nodes} == leaders
            )

        with trio.fail_after(180):
            await wait_until(merged, poll=0.25)
        await trio.sleep(2 * CONFIG.ttl)
        with trio.fail_after(180):
            await wait_until(merged, poll=0.25)
        (leader,) = _leaders(watch, nodes)
        assert leader == min(n.id for n in nodes)
        # The survivor leads with a fence above the other side's.
        assert watch.leads[leader].fence > right_fence
        assert watch.resource.accept(watch.leads[leader].fence)
        _check_fences(watch)
        nursery.cancel_scope.cancel()


@settings(
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    schedule=st.lists(
        st.tuples(st.sampled_from(["kill", "cut"]), st.integers(0, 5)), min_size=1, max_size=3
    ),
    seed=st.integers(0, 2**16),
)
def test_no_stale_fence_is_ever_accepted_under_kills_and_partitions(
    schedule: list[tuple[str, int]], seed: int
) -> None:
    trio.run(
        _partition_schedule, schedule, seed, clock=trio.testing.MockClock(autojump_threshold=0)
    )


async def test_a_candidacy_is_checked_and_ends_with_its_block(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork(seed=132)
    async with trio.open_nursery() as nursery:
        _, (a, b) = await _cluster(nursery, net, 2)
        with pytest.raises(ValueError, match="priority"):
            async with a.leader("x", priority=2**40):
                pass
        async with a.leader("x") as lead:
            fence = await lead.wait_elected()
            with pytest.raises(RuntimeError, match="already stands"):
                async with a.leader("x"):
                    pass
            await b.election.open()
            with trio.fail_after(20):
                await wait_until(lambda: b.leader_of("x") == a.id and b.fence("x") == fence)
            async with contextlib.AsyncExitStack() as stack:
                other = await stack.enter_async_context(b.leader("x", priority=1))
                assert await other.wait_elected() > fence
                with trio.fail_after(20):
                    await wait_until(lambda: not lead.is_leader)
        with trio.fail_after(20):
            await wait_until(lambda: b.leader_of("x") is None)
        nursery.cancel_scope.cancel()
