"""Digest anti-entropy end to end on the memory network (virtual time): replicas that
differ in a few keys move a few entries, a new node is filled once, and a peer that asks
too much gets bounded answers."""

from __future__ import annotations

import attrs
import trio
import trio.testing

from trio_replica.core.antientropy import opening
from trio_replica.core.messages import SyncDigest, SyncRequest
from trio_replica.core.ormap import Dot, Value
from trio_replica.core.replication import DigestSyncConfig
from trio_replica.node import Node
from trio_replica.runtime.config import NodeConfig, ReplicaConfig
from trio_replica.stores.maps import ReplicatedMap
from trio_replica.transports.memory import MemoryNetwork

from .harness import Cluster, overlay_ok, wait_until
from .test_flow_memory import KeySet, _pair
from .test_maps_memory import _fill_with_tombstones

NO_TICKS = ReplicaConfig(anti_entropy_interval=3600)


def _base(replica: ReplicaConfig = NO_TICKS) -> NodeConfig:
    return NodeConfig(name="x", replica=replica)


def _write_quietly(m: ReplicatedMap, node: Node, key: str, value: object) -> None:
    """A write that reached this replica only (its delta lost): for anti-entropy to find."""
    m._map.merge_entry(key, Value(value, Dot(node.id, node.clock.now())))


async def test_replicas_that_differ_in_two_keys_exchange_only_those_leaves(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        a, b = await _pair(Cluster(nursery, MemoryNetwork(seed=60), base=_base()))
        ma, mb = await a.open_map("m"), await b.open_map("m")
        _fill_with_tombstones(ma, a, 20_000)
        with trio.fail_after(120):
            await wait_until(lambda: len(mb) == len(ma))
        assert ma._map == mb._map
        _write_quietly(ma, a, "k7", "only on a")
        _write_quietly(mb, b, "k12345", "only on b")
        assert ma.replica.uses_digest and mb.replica.uses_digest
        sent_before = (
            ma.replica.core.digest_stats.items_sent + mb.replica.core.digest_stats.items_sent
        )
        await ma.replica.compare_with(b.me)
        with trio.fail_after(30):
            await wait_until(lambda: mb.get("k7") == "only on a")
            await wait_until(lambda: ma.get("k12345") == "only on b")
            await wait_until(lambda: not ma.replica.core.busy())
        assert ma._map == mb._map
        moved = ma.replica.core.digest_stats.items_sent + mb.replica.core.digest_stats.items_sent
        # A differing range moves whole once it holds at most `exchange_below` entries
        # (both sides together): a few dozen entries per difference, not 20,000.
        exchange_below = DigestSyncConfig().compare.exchange_below
        assert 2 <= moved - sent_before <= 2 * exchange_below
        nursery.cancel_scope.cancel()


async def test_a_new_replica_is_filled_by_one_peer_then_compared_with_the_others(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, MemoryNetwork(seed=61), base=_base())
        seed = await c.start("s0")
        for i in range(1, 4):
            await c.start(f"s{i}", [seed.address])
        nodes = c.live()
        with trio.fail_after(30):
            await wait_until(lambda: overlay_ok(nodes, min_active=3))
        maps = [await n.open_map("m") for n in nodes]
        _fill_with_tombstones(maps[0], nodes[0], 5_000)
        with trio.fail_after(60):
            await wait_until(lambda: all(m._map == maps[0]._map for m in maps))
        sent0 = sum(m.replica.core.digest_stats.items_sent for m in maps)
        late = await c.start("late", [seed.address])
        with trio.fail_after(30):
            await late.wait_ready(min_active=3)
        fresh = await late.open_map("m")
        with trio.fail_after(60):
            await wait_until(lambda: fresh._map == maps[0]._map)
            await wait_until(lambda: not fresh.replica.core.busy())
        sent = sum(m.replica.core.digest_stats.items_sent for m in maps) - sent0
        # Every entry once (5,000 values and tombstones), not once per neighbour.
        entries = len(list(maps[0]._map.entries()))
        assert sent == entries, (sent, entries)
        stats = fresh.replica.core.digest_stats
        # One comparison with every host (the directory names all four; "late" < "s*",
        # so it opens them all), not only with its neighbours.
        assert stats.sessions_completed == len(late.hosts.hosts("m")) == 4
        nursery.cancel_scope.cancel()


async def test_a_peer_asking_for_everything_in_a_loop_gets_it_once_per_window(
    autojump_clock: trio.testing.MockClock,
) -> None:
    window = DigestSyncConfig().serve_window
    async with trio.open_nursery() as nursery:
        a, b = await _pair(Cluster(nursery, MemoryNetwork(seed=62), base=_base()))
        ma = await a.open_map("m")
        mb = await b.open_map("m")
        _fill_with_tombstones(ma, a, 8_000)
        with trio.fail_after(60):
            await wait_until(lambda: mb._map == ma._map)
        digest = ma.replica.core
        sent0 = digest.digest_stats.items_sent
        # b opens 200 comparisons in a burst, each claiming an empty map: "send me all".
        empty = attrs.evolve(opening(ma._map), digests=())
        for session in range(200):
            b.runtime.send_to(a.me, SyncDigest("m", session, 1, empty.parents, (), ()))
        await trio.sleep(window / 2)
        stats = digest.digest_stats
        assert stats.rounds_refused["rate"] + stats.rounds_refused["queue_full"] >= 150
        # The allowance: the whole map per window, refilled as time passes (here half a
        # window), whatever was asked.
        entries = len(list(ma._map.entries()))
        assert stats.items_sent - sent0 <= 1.5 * entries
        assert stats.ranges_refused > 0
        nursery.cancel_scope.cancel()


async def test_a_peer_that_does_not_host_the_map_ends_the_comparison_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        a, b = await _pair(Cluster(nursery, MemoryNetwork(seed=63), base=_base()))
        ma = await a.open_map("only-on-a")
        assert ma.replica.uses_digest
        with trio.fail_after(5):  # the session timeout is 30 s
            await wait_until(lambda: ma.replica.core.digest_stats.sessions_completed == 1)
        assert ma.replica.core.digest_stats.sessions_timed_out == 0
        assert b.stats()["drops"].get("no_such_replica:SyncDigest") == 1
        nursery.cancel_scope.cancel()


async def test_a_silent_peer_times_out_and_the_next_comparison_runs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = DigestSyncConfig(session_timeout=10.0)
    base = _base(attrs.evolve(NO_TICKS, digest=config))
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, MemoryNetwork(seed=64), base=base)
        a, b = await _pair(c)
        d = await c.start("d", [a.address])
        with trio.fail_after(30):
            await wait_until(lambda: overlay_ok([a, b, d]))
        ma, mb, md = await a.open_map("m"), await b.open_map("m"), await d.open_map("m")
        digest = ma.replica.core
        assert ma.replica.uses_digest and mb.replica.uses_digest
        with trio.fail_after(60):
            await wait_until(lambda: not digest.busy())
        # b hosts the map and keeps its link alive, but answers no round any more.
        mb.replica.core.round_received = lambda *args: []  # type: ignore[method-assign]
        _write_quietly(md, d, "kd", 1)
        started = trio.current_time()
        await ma.replica.compare_with(b.me)
        await ma.replica.compare_with(d.me)  # waits: one comparison at a time
        assert digest.snapshot()["sessions_waiting"] == 1
        with trio.fail_after(60):
            await wait_until(lambda: ma.get("kd") == 1)
        assert digest.digest_stats.sessions_timed_out == 1
        assert trio.current_time() - started >= config.session_timeout
        nursery.cancel_scope.cancel()


async def test_a_store_without_a_digest_serves_full_syncs_once_per_window(
    autojump_clock: trio.testing.MockClock,
) -> None:
    window = ReplicaConfig().full_sync_again_after
    async with trio.open_nursery() as nursery:
        a, b = await _pair(Cluster(nursery, MemoryNetwork(seed=65), base=_base()))
        owner = KeySet()
        owner.keys.update(range(100))
        replica = await a.open_replica("r", owner)
        await b.open_replica("r", KeySet())
        with trio.fail_after(10):
            await wait_until(lambda: replica.stats.syncs_sent >= 1)
        sent = replica.stats.syncs_sent
        for _ in range(500):
            b.runtime.send_to(a.me, SyncRequest("r"))
        await trio.sleep(window / 2)
        assert replica.stats.syncs_sent <= sent + 1
        await trio.sleep(window)
        # The requests folded into one more sync after the window, not 500.
        assert replica.stats.syncs_sent <= sent + 2
        assert replica.stats.syncs_deferred + replica.stats.syncs_coalesced >= 498
        nursery.cancel_scope.cancel()


async def test_a_map_hosted_by_3_of_30_nodes_syncs_between_its_hosts_only(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Sync peers come from the host directory, not from the overlay's neighbours: a host
    # whose neighbours host nothing still gets its initial sync and anti-entropy.
    base = _base(ReplicaConfig(anti_entropy_interval=10.0))
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, MemoryNetwork(seed=66), base=base)
        seed = await c.start("n00")
        for i in range(1, 30):
            await c.start(f"n{i:02d}", [seed.address])
        nodes = c.live()
        with trio.fail_after(60):
            await wait_until(lambda: overlay_ok(nodes, min_active=2))
        # Three hosts, no two of them neighbours.
        hosts: list[Node] = []
        for node in nodes[1:]:
            near = {p.id for p in node.active_view()}
            if all(
                h.id not in near and node.id not in {p.id for p in h.active_view()} for h in hosts
            ):
                hosts.append(node)
            if len(hosts) == 3:
                break
        first, second, late = hosts
        m1, m2 = await first.open_map("m"), await second.open_map("m")
        for i in range(200):
            await (m1 if i % 2 else m2).put(f"k{i}", i)
        with trio.fail_after(60):
            await wait_until(lambda: len(m1) == len(m2) == 200)
        m3 = await late.open_map("m")
        with trio.fail_after(120):
            await wait_until(lambda: m3._map == m1._map)
        others = [n for n in nodes if n not in hosts]

        def asked_non_hosts() -> int:
            # Only the first host, which knew no other, fell back to its neighbours.
            return sum(n.stats()["drops"].get("no_such_replica:SyncDigest", 0) for n in others)

        before = asked_non_hosts()
        # A write only `first` holds (its delta lost) reaches both others by anti-entropy,
        # which compares with hosts only.
        _write_quietly(m1, first, "quiet", "only on first")
        with trio.fail_after(300):
            await wait_until(lambda: m2.get("quiet") == m3.get("quiet") == "only on first")
        assert asked_non_hosts() == before
        # One comparison per pair of hosts (whichever id is smaller opened it), whatever
        # the ids: the late host was compared with both others.
        assert sum(m.replica.core.digest_stats.sessions_completed for m in (m1, m2, m3)) >= 2
        nursery.cancel_scope.cancel()


async def test_a_failing_before_sync_withholds_the_state_and_anti_entropy_goes_on(
    autojump_clock: trio.testing.MockClock,
) -> None:
    base = _base(ReplicaConfig(anti_entropy_interval=10.0))
    async with trio.open_nursery() as nursery:
        a, b = await _pair(Cluster(nursery, MemoryNetwork(seed=67), base=base))
        ma, mb = await a.open_map("m"), await b.open_map("m")
        with trio.fail_after(60):
            await wait_until(lambda: not ma.replica.core.busy() and not mb.replica.core.busy())
        failing = True

        async def before_sync(name: str) -> None:
            if failing:
                raise OSError("disk gone")

        # b cannot make its state safe to send (a map's stale-entry drop failing).
        mb.before_sync = before_sync  # type: ignore[method-assign]
        _write_quietly(mb, b, "kb", "only on b")
        pulls = mb.replica.core.stats.anti_entropy_pulls
        await trio.sleep(60)
        assert ma.get("kb") is None  # nothing of b's state went out
        assert mb.replica.stats.serves_withheld > 0
        # Its anti-entropy timer is still armed: it kept trying (each withheld comparison
        # waits for its 30 s timeout; ticks meanwhile fold into it).
        assert mb.replica.core.stats.anti_entropy_pulls >= pulls + 1
        failing = False
        with trio.fail_after(120):
            await wait_until(lambda: ma.get("kb") == "only on b")
        nursery.cancel_scope.cancel()


async def test_a_store_without_a_digest_ends_a_peers_comparison_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        a, b = await _pair(Cluster(nursery, MemoryNetwork(seed=68), base=_base()))
        # The same instance: a map on a, an owner with no digest on b.
        other = await b.open_replica("r", KeySet())
        ma = await a.open_map("r")
        with trio.fail_after(5):  # the session timeout is 30 s
            await wait_until(lambda: ma.replica.core.digest_stats.sessions_completed >= 1)
        for _ in range(20):
            await ma.replica.compare_with(b.me)
            await wait_until(lambda: not ma.replica.core.busy())
        core = ma.replica.core
        assert core.digest_stats.sessions_timed_out == 0
        assert core.digest_stats.sessions_completed >= 21
        assert other.stats.callback_errors == 0 and other.core._outstanding == {}
        nursery.cancel_scope.cancel()
