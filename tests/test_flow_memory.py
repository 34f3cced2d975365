"""Flow control end to end on the memory network (virtual time): nothing lost, nothing silent.

Writers are slowed rather than their updates dropped, a push a link cannot take is announced
and grafted, a subscriber that falls behind is told (`Lagged`), a replica behind catches up
by a sync pull, and what peers choose (tags) cannot grow what a node reports.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import trio
import trio.testing
from prometheus_client import generate_latest

from trio_replica.core.events import Delivery, Lagged
from trio_replica.core.hlc import Timestamp
from trio_replica.core.ormap import Dot, Value
from trio_replica.core.ormap_wire import from_wire, to_wire
from trio_replica.core.wire import encode_payload
from trio_replica.node import Node
from trio_replica.ops.metrics import metrics_registry
from trio_replica.runtime.broadcast import MAX_COUNTED_TAGS
from trio_replica.runtime.config import NodeConfig, ReplicaConfig
from trio_replica.runtime.linkconfig import LinkConfig
from trio_replica.runtime.replica_api import Add
from trio_replica.stores.maps import Put
from trio_replica.transports.memory import MemoryNetwork

from .harness import Cluster, overlay_ok, wait_until


class KeySet:
    """A replica owner that keeps the keys it saw (custom callbacks, no anti-entropy)."""

    def __init__(self, merge_delay: float = 0.0) -> None:
        self.keys: set[Any] = set()
        self.merge_delay = merge_delay

    def _absorb(self, wire: Any) -> None:
        for key, _entry in from_wire(wire):
            self.keys.add(key)

    async def merge_delta(self, name: str, delta: Any) -> None:
        if self.merge_delay:
            await trio.sleep(self.merge_delay)
        self._absorb(delta)

    async def apply_full_sync(self, name: str, snapshot: list[Any]) -> None:
        self._absorb(snapshot)

    async def full_sync_snapshot(self, name: str) -> list[Any] | None:
        dot = Dot("owner", Timestamp(1, 0))
        return to_wire([(key, Value(True, dot)) for key in sorted(self.keys)]) or None

    async def remove_node(self, name: str, node: str) -> None:
        return None


async def _pair(c: Cluster) -> tuple[Node, Node]:
    a = await c.start("a")
    b = await c.start("b", [a.address])
    with trio.fail_after(30):
        await wait_until(lambda: overlay_ok([a, b]))
    return a, b


async def test_20000_updates_as_fast_as_they_return_are_all_merged(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Issue 12: every call used to return while the sender's outbox dropped most of them."""
    async with trio.open_nursery() as nursery:
        a, b = await _pair(Cluster(nursery, MemoryNetwork(seed=1)))
        sender, receiver = KeySet(), KeySet()
        replica = await a.open_replica("r", sender)
        await b.open_replica("r", receiver)
        for i in range(20_000):
            await replica.broadcast_update(Add(i, i))
        with trio.fail_after(60):
            await wait_until(lambda: len(receiver.keys) == 20_000)
        for node in (a, b):
            drops = node.stats()["drops"]
            assert drops == {}, f"{node.id} dropped {drops}"
        nursery.cancel_scope.cancel()


async def test_a_push_no_link_can_take_is_always_delivered_later(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Outboxes of three payloads, windows of two: pushes are refused, announced, grafted.

    (With windows and outboxes of one, a link carries one payload per round trip and
    repairs can outlast the 30 s a payload stays cached: the message is then reported
    lost, and a replica pulls it; that is the guarantee's boundary.)
    """
    tiny = LinkConfig(window_messages=2, outbox_payload=3, outbox_high_items=2)
    base = NodeConfig(name="x", link=tiny)
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, MemoryNetwork(seed=2, latency=0.005), base=base)
        seed = await c.start("d0")
        for i in range(1, 6):
            await c.start(f"d{i}", [seed.address])
        nodes = c.live()
        with trio.fail_after(60):
            await wait_until(lambda: overlay_ok(nodes, min_active=2))
        got: dict[str, set[Any]] = {n.id: set() for n in nodes}

        async def follow(node: Node, task_status: trio.TaskStatus[None]) -> None:
            async with node.subscribe("t", include_own=True) as sub:
                task_status.started()
                async for item in sub:
                    # Lagged may come: so congested, a fetch can outlast the grace after
                    # which a node reports a message lost (a false alarm errs the safe
                    # way); what matters is that every message arrives.
                    if isinstance(item, Delivery):
                        got[node.id].add(item.payload)

        async with trio.open_nursery() as followers:
            for node in nodes:
                await followers.start(follow, node)

            async def write(node: Node) -> None:
                for k in range(40):
                    await node.broadcast("t", f"{node.id}/{k}")

            async with trio.open_nursery() as writers:
                for node in nodes:
                    writers.start_soon(write, node)
            expected = {f"{n.id}/{k}" for n in nodes for k in range(40)}
            with trio.fail_after(120):
                await wait_until(lambda: all(got[n.id] == expected for n in nodes))
            followers.cancel_scope.cancel()
        deferred = sum(n.stats()["broadcast"]["pushes_deferred"] for n in nodes)
        assert deferred > 0, "the refusals this test is about did not happen"
        nursery.cancel_scope.cancel()


async def test_a_subscriber_that_never_reads_is_told_what_it_missed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        a, b = await _pair(Cluster(nursery, MemoryNetwork(seed=3)))
        async with b.subscribe("news", buffer=5) as sub:
            for i in range(20):
                await a.broadcast("news", i)
            with trio.fail_after(10):
                await wait_until(lambda: b.stats()["broadcast"]["delivered"] >= 20)
            received = [await sub.receive() for _ in range(6)]
        assert [d.payload for d in received[:5] if isinstance(d, Delivery)] == [0, 1, 2, 3, 4]
        assert received[5] == Lagged(15)
        assert b.stats()["drops"]["subscriber_full"] == 15
        nursery.cancel_scope.cancel()


async def test_a_replica_that_fell_behind_catches_up_through_a_sync_pull(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # One write per delta (no batching), so that 200 deliveries overrun the slow replica.
    slow_replica = ReplicaConfig(
        delivery_buffer=4, inbox_size=4, anti_entropy_interval=3600, batch_entries=1
    )
    base = NodeConfig(name="x", replica=slow_replica)
    async with trio.open_nursery() as nursery:
        a, b = await _pair(Cluster(nursery, MemoryNetwork(seed=4), base=base))
        writer, slow = KeySet(), KeySet(merge_delay=0.05)
        replica = await a.open_replica("r", writer)
        behind = await b.open_replica("r", slow)
        for i in range(200):
            await replica.broadcast_update(Add(i, i))
        with trio.fail_after(60):
            await wait_until(lambda: len(slow.keys) == 200)
        assert behind.core.stats.resyncs_after_lag >= 1 and behind.core.stats.deliveries_missed > 0
        nursery.cancel_scope.cancel()


async def test_a_map_subscriber_that_falls_behind_is_told(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        a, _ = await _pair(Cluster(nursery, MemoryNetwork(seed=5)))
        users = await a.open_map("users")
        async with users.subscribe(buffer=2) as changes:
            for i in range(10):
                await users.put(f"k{i}", i)
            assert [await changes.receive() for _ in range(3)] == [
                Put("k0", 0, "a"),
                Put("k1", 1, "a"),
                Lagged(8),
            ]
        assert users.stats.subscriber_drops == 8
        nursery.cancel_scope.cancel()


async def test_what_peers_choose_cannot_grow_status_or_metrics(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A flood of distinct tags used to make `status` fail with MessageTooLarge."""
    async with trio.open_nursery() as nursery:
        a, b = await _pair(Cluster(nursery, MemoryNetwork(seed=6)))
        for i in range(2_000):
            await a.broadcast(f"tag-{i}", None)
        with trio.fail_after(30):
            await wait_until(lambda: b.stats()["broadcast"]["delivered"] >= 2_000)
        unsubscribed = b.stats()["broadcast"]["unsubscribed"]
        assert len(unsubscribed) == MAX_COUNTED_TAGS and sum(unsubscribed.values()) == 2_000
        encode_payload(b.status(), max_size=b.config.max_payload)
        text = generate_latest(metrics_registry(b)).decode()
        assert text.count("trio_replica_broadcast_unsubscribed_total{") == MAX_COUNTED_TAGS
        nursery.cancel_scope.cancel()


class BrokenStream(KeySet):
    """Streams its state, and fails after the first batch (a bug in application code)."""

    async def full_sync_stream(self, name: str) -> AsyncGenerator[list[Any], None]:
        dot = Dot("owner", Timestamp(1, 0))
        yield to_wire([(key, Value(True, dot)) for key in sorted(self.keys)[:10]])
        raise RuntimeError("owner bug")


async def test_a_failing_full_sync_stream_is_counted_and_replication_goes_on(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork(seed=31)
    async with trio.open_nursery() as nursery:
        a, b = await _pair(Cluster(nursery, net))
        owner = BrokenStream()
        owner.keys = {f"k{i}" for i in range(20)}
        replica = await a.open_replica("r", owner)
        receiver = KeySet()
        await b.open_replica("r", receiver)
        with trio.fail_after(30):
            await wait_until(lambda: replica.stats.callback_errors >= 1)
        assert replica.stats.syncs_aborted >= 1
        # The sync was cut (the chunk held back for its `last` flag never went); the
        # driver still runs and still replicates.
        await replica.broadcast_update(Add("later", True))
        with trio.fail_after(30):
            await wait_until(lambda: "later" in receiver.keys)
        nursery.cancel_scope.cancel()
