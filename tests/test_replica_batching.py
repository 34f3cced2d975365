"""Issue 19: a replica's writes are merged in groups and broadcast in batches.

`trio_replica.runtime.replica_writes`: concurrent writes share one `merge_local` call (one
fsync for a persistent map), the writes made while the node cannot send travel as one
delta, a lone write goes out at once, and a write's outcome stays all or nothing.
"""

from __future__ import annotations

from typing import Any

import cbor2
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from trio_replica import testing
from trio_replica.core.hlc import Timestamp
from trio_replica.core.ormap import Dot, Value
from trio_replica.core.ormap_wire import from_wire, to_wire
from trio_replica.core.wire import PAYLOAD_MAX_DEPTH
from trio_replica.errors import ConfigError, NodeClosed
from trio_replica.node import Node
from trio_replica.runtime.config import NodeConfig, ReplicaConfig
from trio_replica.runtime.replica import Replica
from trio_replica.runtime.replica_api import Add
from trio_replica.runtime.replica_writes import delta_bytes
from trio_replica.stores.store import StoreError
from trio_replica.transports.memory import MemoryNetwork

from .harness import Cluster, overlay_ok, wait_until


class Recorder:
    """A replica owner that records every call: the groups merged locally, the deltas
    received, and can be told to fail or to take its time merging its own writes."""

    def __init__(self) -> None:
        self.local_groups: list[list[Any]] = []
        self.remote_deltas: list[list[Any]] = []
        self.keys: set[Any] = set()
        self.fail_next = False
        self.merge_delay = 0.0

    async def merge_local(self, name: str, delta: Any) -> None:
        fail, self.fail_next = self.fail_next, False
        if self.merge_delay:
            await trio.sleep(self.merge_delay)
        if fail:
            raise StoreError("disk full")
        self.local_groups.append([key for key, _ in from_wire(delta)])
        self.keys.update(self.local_groups[-1])

    async def merge_delta(self, name: str, delta: Any) -> None:
        self.remote_deltas.append([key for key, _ in from_wire(delta)])
        self.keys.update(self.remote_deltas[-1])

    async def apply_full_sync(self, name: str, snapshot: list[Any]) -> None:
        return None

    async def full_sync_snapshot(self, name: str) -> list[Any] | None:
        return None

    async def remove_node(self, name: str, node: str) -> None:
        return None


async def _pair(nursery: trio.Nursery, config: ReplicaConfig | None = None) -> tuple[Node, Node]:
    base = NodeConfig(name="x", replica=config or ReplicaConfig(anti_entropy_interval=3600))
    c = Cluster(nursery, MemoryNetwork(seed=19), base=base)
    a = await c.start("a")
    b = await c.start("b", [a.address])
    with trio.fail_after(30):
        await wait_until(lambda: overlay_ok([a, b]))
    return a, b


async def _writer_and_peer(
    nursery: trio.Nursery, *, merge_delay: float = 0.0, config: ReplicaConfig | None = None
) -> tuple[Replica, Recorder, Recorder]:
    """Two nodes with the instance "r" on both: the writer's driver, and both owners (the
    writer's merging its own writes in `merge_delay` seconds, as a disk would)."""
    a, b = await _pair(nursery, config)
    mine, theirs = Recorder(), Recorder()
    mine.merge_delay = merge_delay
    replica = await a.open_replica("r", mine)
    await b.open_replica("r", theirs)
    return replica, mine, theirs


async def test_a_lone_write_is_merged_and_broadcast_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        replica, mine, theirs = await _writer_and_peer(nursery)
        started = trio.current_time()
        await replica.broadcast_update(Add("k", 1))
        assert mine.local_groups == [["k"]]
        with trio.fail_after(5):
            await wait_until(lambda: theirs.remote_deltas == [["k"]], poll=0.001)
        # The memory network's links take a few ms: nothing waited for a batch window.
        assert trio.current_time() - started < 0.05
        assert replica.stats.deltas_sent == replica.stats.updates_sent == 1
        nursery.cancel_scope.cancel()


async def test_concurrent_writes_share_merges_and_broadcasts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        # Merging takes a while (a disk): the writes arriving meanwhile form the next group.
        replica, mine, theirs = await _writer_and_peer(nursery, merge_delay=0.01)
        async with trio.open_nursery() as writers:
            for i in range(200):
                writers.start_soon(replica.broadcast_update, Add(i, i))
        assert sorted(k for g in mine.local_groups for k in g) == list(range(200))
        assert len(mine.local_groups) <= 3, mine.local_groups
        with trio.fail_after(30):
            await wait_until(lambda: theirs.keys == set(range(200)))
        assert sum(map(len, theirs.remote_deltas)) == 200
        assert len(theirs.remote_deltas) == replica.stats.deltas_sent < 10
        assert replica.stats.updates_sent == 200
        nursery.cancel_scope.cancel()


async def test_a_batch_holds_at_most_batch_entries(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = ReplicaConfig(anti_entropy_interval=3600, batch_entries=3)
    async with trio.open_nursery() as nursery:
        replica, _mine, theirs = await _writer_and_peer(nursery, merge_delay=0.01, config=config)
        async with trio.open_nursery() as writers:
            for i in range(30):
                writers.start_soon(replica.broadcast_update, Add(i, i))
        with trio.fail_after(30):
            await wait_until(lambda: theirs.keys == set(range(30)))
        assert max(map(len, theirs.remote_deltas)) <= 3
        assert replica.stats.deltas_sent == len(theirs.remote_deltas) >= 10
        nursery.cancel_scope.cancel()


async def test_a_failed_group_fails_each_of_its_writes_and_sends_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        replica, mine, theirs = await _writer_and_peer(nursery, merge_delay=0.01)
        outcomes: dict[int, str] = {}

        async def write(i: int) -> None:
            try:
                await replica.broadcast_update(Add(i, i))
                outcomes[i] = "ok"
            except StoreError:
                outcomes[i] = "failed"

        # The first write merges alone; the next five wait for it and form one group,
        # which fails as a whole.
        async with trio.open_nursery() as writers:
            writers.start_soon(write, 0)
            await trio.sleep(0.001)
            for i in range(1, 6):
                writers.start_soon(write, i)
            mine.fail_next = True
        assert outcomes == {0: "ok", **{i: "failed" for i in range(1, 6)}}
        await replica.broadcast_update(Add("after", 1))
        with trio.fail_after(10):
            await wait_until(lambda: "after" in theirs.keys)
        assert theirs.keys == {0, "after"}
        nursery.cancel_scope.cancel()


async def test_a_write_cancelled_while_it_waits_for_its_group_is_not_written(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        replica, mine, theirs = await _writer_and_peer(nursery, merge_delay=0.05)
        async with trio.open_nursery() as writers:
            writers.start_soon(replica.broadcast_update, Add("first", 1))
            await trio.sleep(0.01)  # "first" is merging now
            with trio.move_on_after(0.01):
                await replica.broadcast_update(Add("cancelled", 1))
            writers.start_soon(replica.broadcast_update, Add("later", 1))
        with trio.fail_after(10):
            await wait_until(lambda: theirs.keys == {"first", "later"})
        await trio.sleep(1)
        assert "cancelled" not in mine.keys and "cancelled" not in theirs.keys
        nursery.cancel_scope.cancel()


async def test_a_cancelled_merging_write_is_still_merged_and_sent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Once its group merges, a write is certain to go out: cancelling its caller then
    cuts neither the merge nor the broadcast."""
    async with trio.open_nursery() as nursery:
        replica, mine, theirs = await _writer_and_peer(nursery, merge_delay=0.05)
        started = trio.current_time()
        with trio.move_on_after(0.01):
            await replica.broadcast_update(Add("k", 1))
        assert trio.current_time() - started >= 0.05  # the merge was not cut
        with trio.fail_after(10):
            await wait_until(lambda: theirs.keys == {"k"})
        assert mine.keys == {"k"}
        nursery.cancel_scope.cancel()


async def test_map_writes_from_many_tasks_reach_every_node(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with testing.cluster(3) as c:
        maps = [await c[name].open_map("m") for name in ("n1", "n2", "n3")]

        async def write(w: int) -> None:
            for i in range(50):
                await maps[w % 3].put(f"{w}:{i}", i)

        async with trio.open_nursery() as writers:
            for w in range(12):
                writers.start_soon(write, w)
        with trio.fail_after(60):
            await c.converged("m")
        assert all(len(m) == 600 for m in maps)
        sent = [m.replica.stats for m in maps]
        assert sum(s.updates_sent for s in sent) == 600
        assert sum(s.deltas_sent for s in sent) < 600


@pytest.mark.parametrize("n", [0, 1, 23, 24, 255, 256, 65535, 65536])
def test_delta_bytes_is_the_cbor_of_the_delta(n: int) -> None:
    entries = [[i, 0] for i in range(n)]
    assert delta_bytes([cbor2.dumps(e) for e in entries]) == cbor2.dumps(["d", entries])


@given(st.lists(st.lists(st.integers() | st.text(max_size=5), max_size=4), max_size=40))
def test_delta_bytes_round_trips(entries: list[list[Any]]) -> None:
    assert cbor2.loads(delta_bytes([cbor2.dumps(e) for e in entries])) == ["d", entries]


def test_batch_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="batch_entries"):
        ReplicaConfig(batch_entries=0)
    with pytest.raises(ConfigError, match="batch_bytes"):
        ReplicaConfig(batch_bytes=100)


async def test_a_group_merged_after_its_replica_closed_is_still_sent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The merge is shielded: closing the replica while it runs must not strand the write
    (merged here, acknowledged, and no flusher left to send it)."""
    async with trio.open_nursery() as nursery:
        replica, mine, theirs = await _writer_and_peer(nursery, merge_delay=0.05)
        async with trio.open_nursery() as writers:
            writers.start_soon(replica.broadcast_update, Add("k", 1))
            await trio.sleep(0.01)  # merging now
            writers.start_soon(replica.aclose)
        assert mine.keys == {"k"}
        with trio.fail_after(10):
            await wait_until(lambda: theirs.keys == {"k"}, poll=0.01)
        nursery.cancel_scope.cancel()


async def test_writers_waiting_for_room_get_node_closed_when_the_replica_closes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = ReplicaConfig(anti_entropy_interval=3600, batch_entries=2)
    async with trio.open_nursery() as nursery:
        a, _b = await _pair(nursery, config)
        mine = Recorder()
        mine.merge_delay = 1.0
        replica = await a.open_replica("r", mine)
        outcomes: list[str] = []

        async def write(i: int) -> None:
            try:
                await replica.broadcast_update(Add(i, i))
                outcomes.append("ok")
            except NodeClosed:
                outcomes.append("closed")

        async with trio.open_nursery() as writers:
            for i in range(6):
                writers.start_soon(write, i)
            await trio.sleep(0.1)  # one merges, two form the next group, three wait for room
            await replica.aclose()
        assert sorted(outcomes) == ["closed"] * 5 + ["ok"], outcomes
        assert len(mine.keys) == 1
        nursery.cancel_scope.cancel()


async def test_a_batch_holds_at_most_batch_bytes(autojump_clock: trio.testing.MockClock) -> None:
    config = ReplicaConfig(anti_entropy_interval=3600, batch_bytes=4096)
    async with trio.open_nursery() as nursery:
        replica, mine, theirs = await _writer_and_peer(nursery, merge_delay=0.01, config=config)
        async with trio.open_nursery() as writers:
            for i in range(40):
                writers.start_soon(replica.broadcast_update, Add(i, "v" * 1000))
        with trio.fail_after(30):
            await wait_until(lambda: theirs.keys == set(range(40)))
        # About 1 KiB each: at most 4 per delta. A group may pass the bound by its last
        # write (a write's size is known once it is encoded, after its wait for room).
        assert max(map(len, theirs.remote_deltas)) <= 4, theirs.remote_deltas
        assert max(map(len, mine.local_groups)) <= 5, mine.local_groups
        nursery.cancel_scope.cancel()


async def test_a_value_nested_too_deep_for_a_delta_is_refused_before_it_is_applied(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The delta nests an entry two levels deeper than the entry alone: checked as sent."""
    async with trio.open_nursery() as nursery:
        a, _b = await _pair(nursery)
        mine = Recorder()
        replica = await a.open_replica("r", mine)
        deep: Any = 1
        # Within the limit alone (an entry adds one level), beyond it in a delta (three).
        for _ in range(PAYLOAD_MAX_DEPTH - 2):
            deep = [deep]
        with pytest.raises(TypeError, match="nests deeper"):
            await replica.broadcast_update(Add("deep", deep))
        assert mine.local_groups == []
        await replica.broadcast_update(Add("fine", 1))
        assert mine.local_groups == [["fine"]]
        nursery.cancel_scope.cancel()


async def test_a_graceful_leave_sends_the_writes_still_waiting_for_their_batch(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with testing.cluster(2) as c:
        mine, theirs = [await c[name].open_map("m") for name in ("n1", "n2")]
        async with trio.open_nursery() as writers:
            for i in range(300):
                writers.start_soon(mine.put, f"k{i}", i)
        # Straight to the leave: some writes still wait in the outgoing batch.
        waiting = mine.replica.writes.pending
        await c["n1"].leave()
        with trio.fail_after(30):
            await wait_until(lambda: len(theirs) == 300)
        assert waiting > 0, "nothing was waiting: the test did not test the leave"
        assert mine.replica.stats.updates_unsent == 0


class Holder(Recorder):
    """An owner without a digest holding many entries (full-state sync, in chunks), and
    slow to apply what arrives."""

    async def full_sync_snapshot(self, name: str) -> list[Any] | None:
        dot = Dot("a", Timestamp(1, 0))
        return to_wire([(f"k{i:05d}", Value("v" * 40, dot)) for i in range(3000)])

    async def apply_full_sync(self, name: str, snapshot: list[Any]) -> None:
        await trio.sleep(0.05)
        self.keys.update(key for key, _ in from_wire(snapshot))


async def test_a_replica_closed_mid_sync_gives_back_the_credit_of_what_it_dropped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Sync chunks queued for a replica that closes are dropped: their link credit must
    come back, or the holder runs out of credit on that link and sends nothing more on it
    (a map reopened there waited for good)."""
    config = ReplicaConfig(anti_entropy_interval=3600, inbox_size=2)
    async with trio.open_nursery() as nursery:
        a, b = await _pair(nursery, config)
        await a.open_replica("r", Holder())
        link = b.runtime.connections._links[a.id]
        for _ in range(3):
            slow = Holder()
            replica = await b.open_replica("r", slow)
            with trio.fail_after(10):
                await wait_until(lambda r=replica: r.stats.chunks_received > 0, poll=0.001)
            await replica.aclose()  # chunks still queued for it, and more on the way
        await trio.sleep(5)
        assert link._unprocessed == 0
        # Every credit is the holder's again, or in the grant b batches up for it.
        back = a.runtime.connections._links[b.id]
        assert back._credit_messages + link._processed_messages == back.config.window_messages
        # And the instance opens and syncs in full once more.
        again = Holder()
        await b.open_replica("r", again)
        with trio.fail_after(60):
            await wait_until(lambda: len(again.keys) == 3000)
        nursery.cancel_scope.cancel()
