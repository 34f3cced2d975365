"""Broadcast over the in-memory network (virtual time): reach, redundancy, healing, crashes."""

from __future__ import annotations

import collections
import random
from typing import Any

import pytest
import trio
import trio.testing

from trio_replica.core.events import Delivery, Lagged, Resubscribed
from trio_replica.core.messages import IHave, MessageId
from trio_replica.node import Node
from trio_replica.testing import crash_component
from trio_replica.transports.memory import MemoryNetwork

from .harness import Cluster, full_views, overlay_ok, wait_until

TAG = "test"


class Collector:
    """Subscribes every node to TAG and records which message ids each node delivered."""

    def __init__(self) -> None:
        self.got: dict[str, collections.Counter[Any]] = collections.defaultdict(collections.Counter)
        self.notices: dict[str, int] = collections.Counter()
        #: `Lagged` notices by node: a subscriber's buffer never fills here, so each is a
        #: message of TAG the node's core gave up fetching (`Abandoned`), which may come
        #: later. (Messages of other tags given up on, such as the departure reports lost
        #: in the churn of 200 joins, are told to their own subscribers only.)
        self.lagged: dict[str, int] = collections.Counter()

    async def follow(self, node: Node, task_status: trio.TaskStatus[None]) -> None:
        async with node.subscribe(TAG, include_own=True) as sub:
            task_status.started()
            async for item in sub:
                if isinstance(item, Resubscribed):
                    self.notices[node.id] += 1
                elif isinstance(item, Lagged):
                    self.lagged[node.id] += item.missed
                else:
                    assert isinstance(item, Delivery)
                    self.got[node.id][item.payload["n"]] += 1

    def reached(self, n: int, nodes: list[Node]) -> int:
        return sum(self.got[node.id][n] > 0 for node in nodes)


def payload_received(nodes: list[Node]) -> int:
    return sum(node.stats()["broadcast"]["gossip_received"] for node in nodes)


async def test_200_nodes_reach_everyone_along_a_tree(
    autojump_clock: trio.testing.MockClock,
) -> None:
    n = 200
    rng = random.Random(11)
    net = MemoryNetwork(seed=11, latency=0.002)
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, net)
        seed = await c.start("b000")
        for i in range(1, n):
            await c.start(f"b{i:03d}", [seed.address])
        with trio.fail_after(120):
            await wait_until(lambda: overlay_ok(c.live()) and full_views(c.live(), 5) >= 0.9)
        nodes = c.live()
        collector = Collector()
        async with trio.open_nursery() as followers:
            for node in nodes:
                await followers.start(collector.follow, node)

            async def send_and_wait(count: int, first: int) -> None:
                for k in range(first, first + count):
                    await rng.choice(nodes).broadcast(TAG, {"n": k})
                    await trio.sleep(0.05)
                with trio.fail_after(30):
                    await wait_until(
                        lambda: all(
                            collector.reached(k, nodes) == n for k in range(first, first + count)
                        )
                    )

            await send_and_wait(20, 0)  # warm-up: duplicates prune the tree
            before = payload_received(nodes)
            await send_and_wait(100, 1000)
            received = payload_received(nodes) - before
            rmr = received / (100 * (n - 1)) - 1
            dupes = max(c for counts in collector.got.values() for c in counts.values())
            # Flooding the same overlay: every node forwards to every active peer but the
            # sender, so n - 1 first copies cost sum(degrees) - (n - 1) payload messages.
            degrees = sum(len(node.active_view()) for node in nodes)
            flood_rmr = (degrees - (n - 1)) / (n - 1) - 1
            print(
                f"\n{n} nodes, 100 broadcasts after warm-up: 100% reach, RMR {rmr:.4f} "
                f"(flooding this overlay: RMR {flood_rmr:.2f})"
            )
            assert rmr < 0.1
            assert dupes == 1  # exactly once per subscriber per message
            # No message of TAG was given up on while nothing failed.
            assert not collector.lagged, (
                dict(collector.lagged),
                {node.id: node.stats()["broadcast"]["missing_abandoned"] for node in nodes},
            )

            # 20% crash at once; after the overlay heals, broadcasts reach every survivor
            # (a message announced by a node that then crashed may be given up on for a
            # while, and a `Lagged` notice say so, before it comes by another path).
            for node in rng.sample(nodes, n // 5):
                c.crash(node.id)
            survivors = c.live()
            with trio.fail_after(60):
                await wait_until(lambda: overlay_ok(survivors, min_active=2), poll=0.25)
            await send_and_wait_survivors(survivors, collector, rng, 20, 5000)
            print(
                f"after crashing {n // 5} nodes: 20 broadcasts reached "
                f"all {len(survivors)} survivors"
            )
            followers.cancel_scope.cancel()
        nursery.cancel_scope.cancel()


async def send_and_wait_survivors(
    nodes: list[Node], collector: Collector, rng: random.Random, count: int, first: int
) -> None:
    for k in range(first, first + count):
        await rng.choice(nodes).broadcast(TAG, {"n": k})
        await trio.sleep(0.05)
    with trio.fail_after(30):
        await wait_until(
            lambda: all(
                collector.reached(k, nodes) == len(nodes) for k in range(first, first + count)
            )
        )


async def test_crashing_broadcast_component_resubscribes_and_names_what_was_missed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork(seed=12)
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, net)
        seed = await c.start("c0")
        for i in range(1, 6):
            await c.start(f"c{i}", [seed.address])
        with trio.fail_after(30):
            await wait_until(lambda: overlay_ok(c.live(), min_active=2))
        nodes = c.live()
        sender, receiver = c.nodes["c1"], c.nodes["c4"]
        collector = Collector()
        async with trio.open_nursery() as followers:
            for node in nodes:
                await followers.start(collector.follow, node)
            total = 60
            for k in range(total):
                await sender.broadcast(TAG, {"n": k})
                if k == 20:
                    crash_component(sender, "broadcast")
                if k == 40:
                    crash_component(receiver, "broadcast")
                await trio.sleep(0.02)
            await trio.sleep(5)
            for node in nodes:
                missed = sorted(set(range(total)) - set(collector.got[node.id]))
                print(f"{node.id}: resubscribed {collector.notices[node.id]}x, missed {missed}")
                assert all(count == 1 for count in collector.got[node.id].values())
            assert collector.notices["c1"] == 1 and collector.notices["c4"] == 1
            # Nodes whose component never crashed missed nothing.
            for node in nodes:
                if node.id not in ("c1", "c4"):
                    assert set(collector.got[node.id]) == set(range(total))
            # No task died: every component is running and counted exactly one crash.
            assert (
                sender.runtime.broadcaster.running.is_set()
                and receiver.runtime.broadcaster.running.is_set()
            )
            assert (
                sender.runtime.broadcaster.crashes == 1
                and receiver.runtime.broadcaster.crashes == 1
            )
            followers.cancel_scope.cancel()
        nursery.cancel_scope.cancel()


async def test_a_message_given_up_on_is_told_to_the_subscribers_of_its_tag_alone(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A peer announces a message it cannot send: the node grafts it, gives up, and after
    the grace tells the subscribers of the tag the announcement named, and nobody else."""
    net = MemoryNetwork(seed=13)
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, net)
        a = await c.start("g0")
        b = await c.start("g1", [a.address])
        with trio.fail_after(30):
            await wait_until(lambda: len(a.active_view()) == 1 and len(b.active_view()) == 1)
        async with a.subscribe("chat") as chat, a.subscribe("other") as other:
            to_a = b.active_view()[0]
            ghost = MessageId("ghost", 1, 1)
            assert b.runtime.send_to(to_a, IHave.of([(ghost, 1, "chat")]))
            with trio.fail_after(60):
                assert await chat.receive() == Lagged(1)
            stats = a.stats()["broadcast"]
            assert stats["reported_lost"] == 1 and stats["grafts_sent"] >= 1
            with pytest.raises(trio.WouldBlock):
                other.receive_nowait()
        nursery.cancel_scope.cancel()
