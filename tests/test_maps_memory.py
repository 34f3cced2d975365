"""Replicated maps over the in-memory network (virtual time)."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

from trio_replica import testing
from trio_replica.node import Node
from trio_replica.runtime.config import NodeConfig, ReplicaConfig
from trio_replica.stores.maps import Put, Removed, ReplicatedMap
from trio_replica.testing import crash_component
from trio_replica.transports.memory import MemoryNetwork

from .harness import Cluster, overlay_ok, wait_until


async def _cluster(c: Cluster, n: int, prefix: str = "m") -> list[Node]:
    seed = await c.start(f"{prefix}0")
    for i in range(1, n):
        await c.start(f"{prefix}{i}", [seed.address])
    with trio.fail_after(60):
        await wait_until(lambda: overlay_ok(c.live(), min_active=min(2, n - 1)))
    return c.live()


def _fill_with_tombstones(m: ReplicatedMap, node: Node, keys: int) -> None:
    """`keys` entries straight into the map (not broadcast), every 97th a tombstone."""
    from trio_replica.core.ormap import Dot, Tombstone, Value

    for i in range(keys):
        m._map.merge_entry(f"k{i}", Value(i, Dot(node.id, node.clock.now())))
    for i in range(0, keys, 97):
        m._map.merge_entry(f"k{i}", Tombstone(Dot(node.id, node.clock.now())))


def converged(maps: list[ReplicatedMap]) -> bool:
    first = sorted(maps[0].items())
    return all(sorted(m.items()) == first for m in maps[1:])


async def test_put_delete_and_concurrent_writes_converge(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork(seed=21)
    async with trio.open_nursery() as nursery:
        nodes = await _cluster(Cluster(nursery, net), 5)
        maps = [await n.open_map("users") for n in nodes]
        async with maps[3].subscribe() as events:
            await maps[0].put("alice", {"age": 30})
            with trio.fail_after(5):
                await wait_until(lambda: all(m.get("alice") == {"age": 30} for m in maps))
                assert await events.receive() == Put("alice", {"age": 30}, nodes[0].id)
            await maps[1].delete("alice")
            with trio.fail_after(5):
                await wait_until(lambda: all("alice" not in m for m in maps))
                assert await events.receive() == Removed("alice", nodes[1].id)
        # Concurrent writes to one key from every node: one winner everywhere.
        async with trio.open_nursery() as writers:
            for i, m in enumerate(maps):
                writers.start_soon(m.put, "k", i)
        with trio.fail_after(10):
            await wait_until(lambda: converged(maps) and "k" in maps[0])
        winner = maps[0].entry("k")
        assert winner is not None
        assert all(m.entry("k") == winner for m in maps)
        assert (await nodes[0].open_map("users")) is maps[0]  # same name, same map
        nursery.cancel_scope.cancel()


async def test_map_opened_late_gets_existing_state(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork(seed=22)
    async with trio.open_nursery() as nursery:
        nodes = await _cluster(Cluster(nursery, net), 4)
        first = await nodes[0].open_map("late")
        for i in range(50):
            await first.put(f"k{i}", i)
        await first.delete("k0")
        others = [await n.open_map("late") for n in nodes[1:]]
        with trio.fail_after(10):
            await wait_until(lambda: converged([first, *others]))
        assert len(others[-1]) == 49 and "k0" not in others[-1]
        nursery.cancel_scope.cancel()


async def test_partitioned_halves_converge_after_heal(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork(seed=23)
    ae = 10.0
    base = NodeConfig(name="x", replica=ReplicaConfig(anti_entropy_interval=ae))
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, net, base=base)
        nodes = await _cluster(c, 20, prefix="p")
        maps = [await n.open_map("data") for n in nodes]
        left, right = [n.id for n in nodes[:10]], [n.id for n in nodes[10:]]
        net.partition(left, right)
        for i in range(30):
            await maps[i % 10].put(f"L{i}", i)
            await maps[10 + i % 10].put(f"R{i}", i)
            await maps[i % 20].put("shared", f"w{i}")  # written on both sides
            await trio.sleep(0.1)
        await trio.sleep(10)  # both sides notice the cut and carry on
        net.heal()
        healed = trio.current_time()
        with trio.fail_after(ae * 1.25 + 60):
            await wait_until(lambda: converged(maps) and len(maps[0]) == 61, poll=0.5)
        took = trio.current_time() - healed
        print(f"\n20 nodes, two halves written apart: converged {took:.1f} s after the heal")
        winner = max((m.entry("shared") for m in maps), key=lambda e: e.dot)  # type: ignore[arg-type,return-value]
        assert all(m.entry("shared") == winner for m in maps)
        nursery.cancel_scope.cancel()


class NoAntiEntropyMap(ReplicatedMap):
    anti_entropy = False


async def _missed_delta(
    net: MemoryNetwork, nodes: list[Node], maps: list[Any], victim: int
) -> None:
    """Drop every frame to and from one node long enough to lose a delta and its IHAVEs."""
    others = [n.id for i, n in enumerate(nodes) if i != victim]
    for other in others:
        net.set_link(nodes[victim].id, other, loss=1.0)
    await maps[0].put("missed", 1)
    # Longer than any repair that could still reach it (an IHAVE batch window, timeout1,
    # the graft, and the grafter's own IHAVE batch: 1.25 s with the 250 ms window), shorter
    # than the idle timeout (the links must stay up).
    await trio.sleep(2.5)
    for other in others:
        net.set_link(nodes[victim].id, other, loss=0.0)


async def test_anti_entropy_off_stays_behind_on_catches_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    for anti_entropy in (False, True):
        net = MemoryNetwork(seed=24)
        base = NodeConfig(name="x", replica=ReplicaConfig(anti_entropy_interval=5.0))
        async with trio.open_nursery() as nursery:
            nodes = await _cluster(Cluster(nursery, net, base=base), 4, prefix=f"a{anti_entropy:d}")
            if anti_entropy:
                maps: list[Any] = [await n.open_map("ae") for n in nodes]
            else:
                maps = []
                for n in nodes:
                    m = NoAntiEntropyMap(
                        n.runtime,
                        "ae",
                        validator=None,
                        tombstone_ttl=3600,
                        on_close=n.map_host.close,
                    )
                    m.replica = await n.open_replica("ae", m)
                    maps.append(m)
            await trio.sleep(1)
            await _missed_delta(net, nodes, maps, victim=3)
            await trio.sleep(30)
            caught_up = maps[3].get("missed") == 1
            assert all(m.get("missed") == 1 for m in maps[:3])
            assert caught_up is anti_entropy, f"anti_entropy={anti_entropy}"
            nursery.cancel_scope.cancel()


async def test_receiver_broadcast_crash_recovers_every_write(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork(seed=25)
    async with trio.open_nursery() as nursery:
        nodes = await _cluster(Cluster(nursery, net), 5, prefix="r")
        maps = [await n.open_map("stream") for n in nodes]
        writer, receiver = maps[0], maps[4]
        for i in range(100):
            await writer.put(i, i)
            if i == 50:
                crash_component(nodes[4], "broadcast")
            await trio.sleep(0.01)
        with trio.fail_after(10):
            await wait_until(lambda: len(receiver) == 100)
        assert receiver.replica.core.stats.resyncs_after_resubscribe >= 1
        assert nodes[4].runtime.broadcaster.crashes == 1
        assert converged(maps)
        nursery.cancel_scope.cancel()


async def test_malformed_gossip_and_sync_are_rejected_and_change_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from trio_replica.core.hlc import Timestamp
    from trio_replica.core.messages import Gossip, MessageId, Peer, Role, SyncChunk
    from trio_replica.core.wire import cbor_array, encode_frame, encode_payload
    from trio_replica.runtime.handshake import Credentials, handshake_as_dialer

    net = MemoryNetwork(seed=26)
    async with trio.open_nursery() as nursery:
        nodes = await _cluster(Cluster(nursery, net), 3, prefix="v")
        maps = [
            await n.open_map("guarded", validator=lambda k, v: isinstance(v, int) and v >= 0)
            for n in nodes
        ]
        await maps[0].put("good", 1)
        with trio.fail_after(5):
            await wait_until(lambda: all(m.get("good") == 1 for m in maps))
        target, target_map = nodes[1], maps[1]
        clock_before = target.clock.last
        entries_before = sorted(target_map.items())
        far_future = Timestamp(target.clock.read_physical() + 3_600_000, 0)
        bad_deltas: list[Any] = [
            "not a list",
            [["k", 1, "evil", True, 0, 5]],  # bool where the wall belongs
            [["k", 1, "evil", far_future.wall, 0, 5]],  # far-future dot
            [["k", 1, "", 1, 0, 5]],  # empty node id
            [["k", 1, "evil", 1, 0, -5]],  # fails the validator
            [["k", 7, "evil", 1, 0, 5]],  # unknown entry kind
            [[["nested"], 1, "evil", 1, 0, 5]],  # a list is not a key
        ]
        async with net.transport("evil").open_connection(target.address, timeout=5) as conn:
            creds = Credentials("trio-replica", b"", Peer("evil", "mem://evil"))
            await handshake_as_dialer(conn, creds, role=Role.NODE, timeout=5)
            for i, delta in enumerate(bad_deltas):
                payload = encode_payload(["d", delta], max_size=1 << 20)
                gossip = Gossip(MessageId("evil", i + 1, i), 1, "replica/guarded", payload)
                chunk = SyncChunk(
                    "guarded",
                    i,
                    0,
                    True,
                    cbor_array(
                        [
                            encode_payload(d, max_size=1 << 20)
                            for d in (delta if isinstance(delta, list) else [delta])
                        ]
                    ),
                )
                await conn.send(encode_frame([gossip, chunk]))
            await conn.send(encode_frame([SyncChunk("guarded", 99, 0, True, b"\xff\x00")]))
            with trio.fail_after(10):
                await wait_until(
                    lambda: (
                        sum(target_map.stats.rejected.values()) >= 2 * (len(bad_deltas) - 1)
                        and target_map.replica.stats.rejected["cbor"] >= 1
                    )
                )
        stats = target.stats()
        print("\nrejected:", stats["rejected"], target_map.stats.rejected)
        assert sum(target_map.stats.rejected.values()) >= 2 * (len(bad_deltas) - 1)
        for reason in ("hlc", "skew", "node", "validator", "kind", "key"):
            assert target_map.stats.rejected[reason] >= 1, reason
        assert target_map.replica.stats.rejected  # the undecodable chunk and the bad shapes
        assert sorted(target_map.items()) == entries_before
        assert target.clock.last == clock_before  # only accepted entries move the clock
        # The node keeps serving: a good write still replicates.
        await maps[2].put("after", 2)
        with trio.fail_after(5):
            await wait_until(lambda: target_map.get("after") == 2)
        nursery.cancel_scope.cancel()


async def test_a_put_that_cannot_be_made_durable_is_undone_and_not_sent(
    autojump_clock: trio.testing.MockClock, tmp_path: Any, monkeypatch: Any
) -> None:
    import pytest

    from trio_replica.stores.store import MapStore, StoreError

    net = MemoryNetwork(seed=27)
    base = NodeConfig(name="x", data_dir=tmp_path)
    async with trio.open_nursery() as nursery:
        nodes = await _cluster(Cluster(nursery, net, base=base), 2, prefix="d")
        local = await nodes[0].open_map("durable", persist=True)
        remote = await nodes[1].open_map("durable")
        await local.put("k", "v1")
        with trio.fail_after(5):
            await wait_until(lambda: remote.get("k") == "v1")

        async def disk_full(self: MapStore, entries: Any, signatures: Any = None) -> None:
            raise StoreError("disk full")

        monkeypatch.setattr(MapStore, "write", disk_full)
        with pytest.raises(StoreError):
            await local.put("k", "v2")
        with pytest.raises(StoreError):
            await local.delete("k")
        await trio.sleep(2)
        assert local.get("k") == "v1" and remote.get("k") == "v1"
        nursery.cancel_scope.cancel()


async def test_a_large_snapshot_is_built_and_merged_in_slices(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # No step of a full sync holds the event loop for the whole map (issue 13): another
    # task gets its turn between slices of the snapshot and of the merge.
    from trio_replica.stores.maps import INGEST_SLICE, SNAPSHOT_SLICE

    net = MemoryNetwork(seed=29)
    async with trio.open_nursery() as nursery:
        nodes = await _cluster(Cluster(nursery, net), 2)
        a, b = [await n.open_map("big") for n in nodes]
        keys = 3 * SNAPSHOT_SLICE + 7
        # Tombstones travel in a snapshot too (a snapshot never implies a removal).
        _fill_with_tombstones(a, nodes[0], keys)
        turns = 0

        async def other_task() -> None:
            nonlocal turns
            while True:
                await trio.lowlevel.checkpoint()
                turns += 1

        nursery.start_soon(other_task)
        await trio.lowlevel.checkpoint()
        turns = 0
        snapshot = await a.full_sync_snapshot("big")
        assert snapshot is not None and len(snapshot) == keys  # tombstones included
        assert turns >= 2  # without slices: 0
        turns = 0
        await b.apply_full_sync("big", snapshot)
        assert len(b) == len(a) and b.tombstones == a.tombstones > 0
        assert turns >= keys // INGEST_SLICE // 2
        assert sorted(b.items()) == sorted(a.items())
        nursery.cancel_scope.cancel()


async def test_a_large_map_syncs_as_a_stream_walked_slice_by_slice(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A map opened late compares digests with its peer: empty, it is sent every range in
    # one exchange, each walked a slice at a time as the chunks go (`range_stream`), never
    # a snapshot of every entry at once.
    from trio_replica.stores.maps import SNAPSHOT_SLICE

    net = MemoryNetwork(seed=30)
    async with trio.open_nursery() as nursery:
        nodes = await _cluster(Cluster(nursery, net), 2)
        a = await nodes[0].open_map("big")
        keys = 3 * SNAPSHOT_SLICE + 7
        _fill_with_tombstones(a, nodes[0], keys)
        batches = [len(batch) async for batch in a.full_sync_stream("big")]
        assert sum(batches) == keys and max(batches) <= SNAPSHOT_SLICE and len(batches) > 3
        b = await nodes[1].open_map("big")
        with trio.fail_after(60):
            await wait_until(lambda: len(b) == len(a) and b.tombstones == a.tombstones)
        assert sorted(b.items()) == sorted(a.items())
        # One comparison, opened by the new node, every entry sent once, no full sync.
        assert b.replica.uses_digest and a.replica.uses_digest
        assert b.replica.core.digest_stats.sessions_completed == 1
        assert a.replica.core.digest_stats.items_sent == keys
        assert a.replica.stats.syncs_sent == 0
        ranges = [len(k) for level1 in range(16) for k in a._map.range_keys(1, level1, 10**6)]
        assert sum(ranges) == keys and a.replica.core.digest_stats.ranges_sent == len(ranges)
        nursery.cancel_scope.cancel()


def test_chunks_fill_across_batches_and_stay_under_the_bound() -> None:
    import cbor2

    from trio_replica.core.wire import Chunker

    def chunks(items: list[Any], batch: int) -> list[bytes]:
        chunker, out = Chunker(4096), []
        for start in range(0, len(items), batch):
            for item in items[start : start + batch]:
                if (chunk := chunker.add(item)) is not None:
                    out.append(chunk)
        if (last := chunker.flush()) is not None:
            out.append(last)
        return out

    items = [[f"k{i}", 1, "n", i, 0, "v" * (i % 50)] for i in range(3000)]
    whole = chunks(items, len(items))
    # The same items in batches of 7 pack into the very same chunks.
    assert chunks(items, 7) == whole and len(whole) > 10
    assert all(len(c) <= 4096 for c in whole)
    assert [x for c in whole for x in cbor2.loads(c)] == items
    # One item larger than the bound travels alone.
    big = ["big", 1, "n", 1, 0, "x" * 10_000]
    assert [cbor2.loads(c) for c in chunks([["a"], big, ["b"]], 3)] == [[["a"]], [big], [["b"]]]
    assert Chunker(4096).flush() is None


async def test_remote_changes_count_only_what_peers_changed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """`map_remote_changes_total` is "changed by peers": a node's own writes are not."""
    async with testing.cluster(2) as c:
        mine, theirs = [await c[name].open_map("m") for name in ("n1", "n2")]
        # Each write on its own: a put and a delete in one batch would reach the peer as
        # one change of its visible value (none at all: absent, then deleted).
        await mine.put("k", 1)
        with trio.fail_after(60):
            await c.converged("m")
        await mine.delete("k")
        with trio.fail_after(60):
            await c.converged("m")
        assert mine.stats.remote_changes == 0
        assert theirs.stats.remote_changes == 2
