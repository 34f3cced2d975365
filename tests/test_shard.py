"""Sharded placement (issue 16), on the memory network in virtual time: every node computes
the same owner of every key once leases converge, a joining or leaving member moves about
1/N of the partitions and reports exactly those moves, and a member with another ring size
is refused."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import trio
import trio.testing

from trio_replica.core.events import Event
from trio_replica.runtime.config import ShardConfig
from trio_replica.stores.shard import Acquired, Released, RingSizeMismatch
from trio_replica.transports.memory import MemoryNetwork

from .harness import Cluster, start_walled, virtual_wall, wait_until, walled_cluster

KEYS = [f"key-{i}" for i in range(10_000)]


async def _cluster(nursery: trio.Nursery, net: MemoryNetwork, n: int) -> tuple[Cluster, list[Any]]:
    return await walled_cluster(nursery, net, "s", n)


def _agree(nodes: list[Any]) -> bool:
    ids = sorted(n.id for n in nodes)
    return all(n.shard.members() == ids for n in nodes)


def _owners(node: Any) -> dict[int, str]:
    return {p: node.shard.partition_owners(p)[0] for p in range(node.shard.ring_size)}


async def _drain(feed: Any) -> list[Event]:
    out: list[Event] = []
    while True:
        try:
            out.append(feed.receive_nowait())
        except trio.WouldBlock:
            return out


async def test_10_nodes_agree_on_every_key_and_a_join_or_leave_moves_about_one_nth(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork(seed=120)
    async with trio.open_nursery() as nursery:
        c, nodes = await _cluster(nursery, net, 10)
        for node in nodes:
            await node.shard.open()
        with trio.fail_after(60):
            await wait_until(lambda: _agree(nodes), poll=0.25)
        placed = [{k: n.shard.place(k) for k in KEYS} for n in nodes]
        assert all(p == placed[0] for p in placed)
        # Every member owns some keys, none far more than its share (1/10).
        counts: dict[str, int] = {}
        for owner in placed[0].values():
            counts[owner] = counts.get(owner, 0) + 1
        assert set(counts) == {n.id for n in nodes}
        assert max(counts.values()) < 2.5 * len(KEYS) / 10
        # The owned partitions of all members cover the ring exactly once.
        owned = [n.shard.owned() for n in nodes]
        assert sum(len(o) for o in owned) == nodes[0].shard.ring_size
        assert frozenset().union(*owned) == frozenset(range(nodes[0].shard.ring_size))

        before = _owners(nodes[0])
        async with contextlib.AsyncExitStack() as stack:
            feeds = [await stack.enter_async_context(n.shard.events()) for n in nodes]
            newcomer = await start_walled(c, "s10", [nodes[0].address])
            new_feed = await stack.enter_async_context(newcomer.shard.events())
            await newcomer.shard.open()
            everyone = [*nodes, newcomer]
            feeds.append(new_feed)
            with trio.fail_after(60):
                await wait_until(lambda: _agree(everyone), poll=0.25)
            after = _owners(nodes[0])
            moved = {p for p in before if before[p] != after[p]}
            ring = nodes[0].shard.ring_size
            # All moves go to the newcomer, about 1/11 of the ring.
            assert {after[p] for p in moved} == {newcomer.id}
            assert 0.5 * ring / 11 < len(moved) < 1.6 * ring / 11
            released = {
                (n.id, e.partition)
                for n, f in zip(nodes, feeds, strict=False)
                for e in await _drain(f)
                if isinstance(e, Released)
            }
            assert released == {(before[p], p) for p in moved}
            acquired = {e.partition for e in await _drain(new_feed) if isinstance(e, Acquired)}
            assert acquired == moved

            # A member dies: its partitions, and only those, move to the others.
            before = after
            victim = nodes[3]
            c.crash(victim.config.name)
            survivors = [n for n in everyone if n is not victim]
            with trio.fail_after(60):
                await wait_until(lambda: _agree(survivors), poll=0.25)
            after = _owners(nodes[0])
            moved = {p for p in before if before[p] != after[p]}
            assert moved == {p for p in before if before[p] == victim.id}
            gained = {
                e.partition
                for n, f in zip(everyone, feeds, strict=True)
                if n is not victim
                for e in await _drain(f)
                if isinstance(e, Acquired)
            }
            assert gained == moved
        nursery.cancel_scope.cancel()


async def test_a_member_with_another_ring_size_is_refused(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork(seed=121)
    async with trio.open_nursery() as nursery:
        c, (a, b) = await _cluster(nursery, net, 2)
        await a.shard.open()
        await b.shard.open()
        odd = await c.start("odd", [a.address], shard=ShardConfig(ring_size=64))
        odd.clock.physical = virtual_wall
        with pytest.raises(RingSizeMismatch, match=r"ring size is 64.*1024"):
            await odd.shard.open()
        # Not a member, so placement elsewhere is unchanged; the odd node counts the
        # members it cannot place with.
        await trio.sleep(3 * a.shard.config.heartbeat)
        assert a.shard.members() == b.shard.members() == sorted([a.id, b.id])
        assert odd.shard.members() == [] and odd.shard.stats.ring_mismatches == 2
        nursery.cancel_scope.cancel()


async def test_keys_and_arguments_are_checked(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork(seed=122)
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, net)
        a = await start_walled(c, "a", [])
        with pytest.raises(RuntimeError, match="not open"):
            a.shard.members()
        await a.shard.open()
        assert a.shard.place("k") == a.id and a.shard.is_owner(b"k")
        assert a.shard.owners("k", 3) == [a.id]
        with pytest.raises(TypeError, match="str or bytes"):
            a.shard.place(5)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="not in"):
            a.shard.partition_owners(1024)
        with pytest.raises(Exception, match="ring_size"):
            ShardConfig(ring_size=0)
        nursery.cancel_scope.cancel()
