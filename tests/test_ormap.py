"""The OR-Map (LWW map with HLC dots): merge rules and the join-semilattice properties.

Strategies draw dots from a tiny space (three nodes, four walls, three logical values) so
that equal HLCs across writers, value-vs-tombstone ties and even identical dots with
different values happen constantly: every tie-break in `supersedes` is exercised.
"""

from __future__ import annotations

import random
from typing import Any

import cbor2
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from trio_replica.core import wire
from trio_replica.core.hlc import HybridClock, Timestamp
from trio_replica.core.ormap import Dot, Entry, Key, ORMap, Tombstone, Value, supersedes
from trio_replica.core.ormap_wire import ingest, to_wire

NODES = ["a", "b", "c"]
keys = st.sampled_from(["k1", "k2", "k3", b"k1", 1, -2])
values = st.one_of(
    st.integers(-2, 2),
    st.booleans(),  # True vs 1 under the same dot: different data, ordered by encoding
    st.sampled_from([0.0, -0.0, 1.0, "x", "", b"x", None]),
    st.lists(st.integers(0, 1), max_size=2),
    st.dictionaries(st.sampled_from(["p", "q"]), st.integers(0, 1), max_size=2),
)
timestamps = st.builds(Timestamp, st.integers(0, 3), st.integers(0, 2))
dots = st.builds(Dot, st.sampled_from(NODES), timestamps)
entries = st.one_of(st.builds(Value, values, dots), st.builds(Tombstone, dots))
# Mostly a tiny space where two entries for one key often share the very same dot.
tight_dots = st.builds(
    Dot, st.sampled_from(NODES[:2]), st.builds(Timestamp, st.integers(0, 1), st.just(0))
)
tight_entries = st.one_of(st.builds(Value, values, tight_dots), st.builds(Tombstone, tight_dots))
deltas = st.one_of(
    st.lists(st.tuples(keys, entries), max_size=12),
    st.lists(st.tuples(st.sampled_from(["k", 1]), tight_entries), max_size=8),
)
MAX_SIZE = 1 << 20


def build(delta: list[tuple[Key, Entry]]) -> ORMap:
    m = ORMap()
    for key, entry in delta:
        m.merge_entry(key, entry)
    return m


def state(m: ORMap) -> list[bytes]:
    """The full state (tombstones included) in a canonical, order-free, type-exact form."""
    return sorted(cbor2.dumps(e, canonical=True) for e in to_wire(m.entries()))


def visible(m: ORMap) -> dict[Any, bytes]:
    return {(type(k), k): cbor2.dumps(v, canonical=True) for k, v in m.items()}


def merged(a: ORMap, b: ORMap) -> ORMap:
    out = a.copy()
    out.merge(b)
    return out


def rank(entry: Entry) -> tuple[Any, ...]:
    """The SPEC's order, written independently of `supersedes`: HLC, then a value beats a
    tombstone at equal HLC, then node id, then canonical encoding of the value."""
    is_value = isinstance(entry, Value)
    data = cbor2.dumps(entry.value, canonical=True) if isinstance(entry, Value) else b""
    return (entry.dot.ts.wall, entry.dot.ts.logical, is_value, entry.dot.node, data)


def through_wire(delta: list[tuple[Key, Entry]]) -> Any:
    """A delta as a peer receives it: encoded, then strictly decoded."""
    return wire.decode_payload(
        wire.encode_payload(to_wire(delta), max_size=MAX_SIZE), max_size=MAX_SIZE
    )


def receiving_clock() -> HybridClock:
    # Far enough ahead of the strategies' walls that the skew bound never interferes.
    return HybridClock(lambda: 10_000)


# --- merge rules, literally ----------------------------------------------------------------


def d(node: str, wall: int, logical: int = 0) -> Dot:
    return Dot(node, Timestamp(wall, logical))


def test_add_get_remove() -> None:
    m = ORMap()
    assert m.add("k", {"v": 1}, d("a", 1))
    assert m.get("k") == {"v": 1}
    assert m["k"] == {"v": 1}
    assert "k" in m and len(m) == 1 and list(m.keys()) == ["k"]
    assert m.remove("k", d("a", 2))
    assert m.get("k") is None and m.get("k", 7) == 7
    assert "k" not in m and len(m) == 0 and m.tombstones == 1
    assert isinstance(m.entry("k"), Tombstone)


def test_stale_add_never_resurrects() -> None:
    m = ORMap()
    m.remove("k", d("a", 5))
    assert not m.add("k", "old", d("b", 4))
    assert not m.add("k", "same-time-other-node", d("z", 4, 9))
    assert "k" not in m


def test_tombstone_beats_value_only_when_strictly_newer() -> None:
    m = ORMap()
    m.add("k", "v", d("a", 5, 1))
    # Same HLC, even from a greater node id: the value stays.
    assert not m.remove("k", d("z", 5, 1))
    assert m.get("k") == "v"
    assert m.remove("k", d("a", 5, 2))
    assert "k" not in m
    # And the other way round: a value at the tombstone's HLC wins.
    assert m.add("k", "back", d("a", 5, 2))
    assert m.get("k") == "back"


def test_value_ties_break_on_node_id() -> None:
    m = ORMap()
    m.add("k", "from-b", d("b", 3))
    assert not m.add("k", "from-a", d("a", 3))
    assert m.add("k", "from-c", d("c", 3))
    assert m.get("k") == "from-c"


def test_identical_dots_break_on_canonical_encoding() -> None:
    a = Value(1, d("n", 1))
    b = Value(True, d("n", 1))
    assert supersedes(a, b) != supersedes(b, a)
    assert not supersedes(a, a) and not supersedes(a, Value(1, d("n", 1)))
    t = Tombstone(d("n", 1))
    assert not supersedes(t, Tombstone(d("n", 1)))


def test_entry_size_does_not_grow_with_writes() -> None:
    m = ORMap()
    for i in range(100):
        m.add("k", i, d("a", i))
    entry = m.entry("k")
    assert entry == Value(99, d("a", 99))
    assert len(to_wire(m.entries())) == 1


def test_merge_reports_only_visible_changes() -> None:
    a = ORMap()
    a.add("same", [1], d("a", 1))
    a.add("gone", 1, d("a", 1))
    a.remove("dead", d("a", 1))
    b = ORMap()
    b.add("same", [1], d("b", 2))  # newer dot, same data: no visible change
    b.remove("gone", d("b", 2))
    b.remove("dead", d("b", 2))  # tombstone over tombstone: nothing visible
    b.add("new", "x", d("b", 2))
    b.add("int-vs-bool", True, d("b", 2))
    a.add("int-vs-bool", 1, d("a", 1))
    changed = a.merge(b)
    assert sorted(map(str, changed)) == ["gone", "int-vs-bool", "new"]
    assert a.entry("same") == Value([1], d("b", 2))


def test_keys_of_every_type_are_distinct() -> None:
    m = ORMap()
    m.add("1", "str", d("a", 1))
    m.add(b"1", "bytes", d("a", 1))
    m.add(1, "int", d("a", 1))
    assert len(m) == 3
    assert (m["1"], m[b"1"], m[1]) == ("str", "bytes", "int")


def test_gc_tombstones_by_age() -> None:
    m = ORMap()
    m.add("live", 1, d("a", 10))
    m.remove("old", d("a", 100))
    m.remove("young", d("a", 900))
    assert m.gc_tombstones(now_ms=1_000, ttl_ms=500) == 1
    assert m.entry("old") is None
    assert isinstance(m.entry("young"), Tombstone)
    assert m.get("live") == 1  # values are never collected, whatever their age
    assert m.gc_tombstones(now_ms=1_000, ttl_ms=500) == 0
    assert len(m) == 1 and m.tombstones == 1


def test_gc_resurrection_caveat_is_real() -> None:
    # The documented limit of TTL collection: once the tombstone is gone, a peer that was
    # away longer than the TTL and still holds the older value brings it back.
    here = ORMap()
    here.add("k", "v", d("a", 1))
    away = here.copy()
    here.remove("k", d("a", 2))
    here.gc_tombstones(now_ms=10_000, ttl_ms=1_000)
    here.merge(away)
    assert here.get("k") == "v"


def test_absorb_clock_moves_past_every_stored_entry() -> None:
    m = ORMap()
    m.add("k", 1, d("a", 1_400, 7))
    m.remove("j", d("b", 1_450, 2))
    clock = HybridClock(lambda: 1_000, max_offset_ms=500)
    m.absorb_clock(clock)
    assert clock.last > Timestamp(1_450, 2)
    assert m.add("k", 2, Dot("a", clock.now()))
    ORMap().absorb_clock(clock)  # an empty map leaves the clock alone


def test_constructor_counts_live_values() -> None:
    m = ORMap(entries={"a": Value(1, d("a", 1)), "b": Tombstone(d("a", 1))})
    assert len(m) == 1 and m.tombstones == 1
    twin = m.copy()
    twin.add("c", 3, d("a", 2))
    assert len(m) == 1 and len(twin) == 2


# --- the join-semilattice ------------------------------------------------------------------


@given(deltas, deltas)
def test_merge_is_commutative(da: list[tuple[Key, Entry]], db: list[tuple[Key, Entry]]) -> None:
    a, b = build(da), build(db)
    assert state(merged(a, b)) == state(merged(b, a))


@given(deltas, deltas, deltas)
def test_merge_is_associative(
    da: list[tuple[Key, Entry]], db: list[tuple[Key, Entry]], dc: list[tuple[Key, Entry]]
) -> None:
    a, b, c = build(da), build(db), build(dc)
    assert state(merged(merged(a, b), c)) == state(merged(a, merged(b, c)))


@given(deltas)
def test_merge_is_idempotent(da: list[tuple[Key, Entry]]) -> None:
    a = build(da)
    again = merged(a, a)
    assert state(again) == state(a)
    assert a.merge(a.copy()) == []


@given(deltas)
def test_each_key_holds_the_greatest_entry(delta: list[tuple[Key, Entry]]) -> None:
    m = build(delta)
    expected: dict[Any, Entry] = {}
    for key, entry in delta:
        slot = (type(key), key)
        if slot not in expected or rank(entry) > rank(expected[slot]):
            expected[slot] = entry
    assert state(m) == state(build([(k, e) for (_, k), e in expected.items()]))
    assert len(m) == sum(isinstance(e, Value) for e in expected.values())


@given(deltas, deltas)
def test_merge_reports_exactly_the_visible_changes(
    da: list[tuple[Key, Entry]], db: list[tuple[Key, Entry]]
) -> None:
    a, b = build(da), build(db)
    before = visible(a)
    changed = a.merge(b)
    after = visible(a)
    slots = {(type(k), k) for k in changed}
    assert len(slots) == len(changed)
    assert slots == {s for s in before.keys() | after.keys() if before.get(s) != after.get(s)}


@settings(deadline=None)
@given(st.lists(deltas, min_size=1, max_size=5), st.data())
def test_any_delivery_order_with_duplicates_converges(
    batches: list[list[tuple[Key, Entry]]], data: st.DataObject
) -> None:
    reference = build([e for batch in batches for e in batch])
    extra = data.draw(st.lists(st.integers(0, len(batches) - 1), max_size=5))
    schedule = data.draw(st.permutations(list(range(len(batches))) + extra))
    replica, clock = ORMap(), receiving_clock()
    for i in schedule:
        result = ingest(replica, through_wire(batches[i]), clock)
        assert result.rejected == ()
    assert state(replica) == state(reference)


@given(deltas, st.data())
def test_any_rechunking_of_a_snapshot_converges(
    delta: list[tuple[Key, Entry]], data: st.DataObject
) -> None:
    source = build(delta)
    snapshot = list(source.entries())
    order = data.draw(st.permutations(snapshot))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(order)), max_size=4)))
    replica, clock = ORMap(), receiving_clock()
    for lo, hi in zip([0, *cuts], [*cuts, len(order)], strict=True):
        ingest(replica, through_wire(order[lo:hi]), clock)
    assert state(replica) == state(source)


@given(deltas, deltas, st.data())
def test_a_partial_sync_never_implies_a_removal(
    da: list[tuple[Key, Entry]], db: list[tuple[Key, Entry]], data: st.DataObject
) -> None:
    local, remote = build(da), build(db)
    snapshot = list(remote.entries())
    mask = data.draw(st.lists(st.booleans(), min_size=len(snapshot), max_size=len(snapshot)))
    part = [e for e, keep in zip(snapshot, mask, strict=True) if keep]
    before = {(type(k), k): e for k, e in local.entries()}
    ingest(local, through_wire(part), receiving_clock())
    sent = {(type(k), k): e for k, e in part}
    for (_, key), entry in before.items():
        if (type(key), key) not in sent:
            assert local.entry(key) == entry  # untouched
        elif key not in local:
            # Gone only because the sync carried a tombstone that wins over what we had.
            new = local.entry(key)
            assert isinstance(new, Tombstone) and not supersedes(entry, new)


@given(deltas, deltas)
def test_ingest_from_the_wire_equals_merge(
    da: list[tuple[Key, Entry]], db: list[tuple[Key, Entry]]
) -> None:
    a, b = build(da), build(db)
    via_merge = merged(a, b)
    via_ingest = a.copy()
    changed = ingest(via_ingest, through_wire(list(b.entries())), receiving_clock()).changed_keys
    assert state(via_ingest) == state(via_merge)
    assert {(type(k), k) for k in changed} == {(type(k), k) for k in a.copy().merge(b)}


# --- replicas exchanging deltas ------------------------------------------------------------


class Replicas(RuleBasedStateMachine):
    """Three replicas writing concurrently under a shared, jumpy physical clock (so HLCs
    collide across nodes), exchanging deltas that are delayed, reordered, duplicated, and
    partial snapshots. Invariant: a local write is visible at once. At the end, after
    every pending delta arrives, all replicas hold exactly the same entries."""

    def __init__(self) -> None:
        super().__init__()
        self.ms = 100
        self.maps = {n: ORMap() for n in NODES}
        self.clocks = {n: HybridClock(lambda: self.ms, max_offset_ms=1_000) for n in NODES}
        self.inbox: dict[str, list[Any]] = {n: [] for n in NODES}
        self.rng = random.Random(0)

    def _broadcast(self, origin: str, key: Key, entry: Entry) -> None:
        raw = through_wire([(key, entry)])
        for node in NODES:
            if node != origin:
                self.inbox[node].append(raw)

    @rule(node=st.sampled_from(NODES), key=keys, value=values)
    def put(self, node: str, key: Key, value: Any) -> None:
        dot = Dot(node, self.clocks[node].now())
        assert self.maps[node].add(key, value, dot)
        assert cbor2.dumps(self.maps[node][key], canonical=True) == cbor2.dumps(
            value, canonical=True
        )
        self._broadcast(node, key, Value(value, dot))

    @rule(node=st.sampled_from(NODES), key=keys)
    def delete(self, node: str, key: Key) -> None:
        dot = Dot(node, self.clocks[node].now())
        assert self.maps[node].remove(key, dot)
        assert key not in self.maps[node]
        self._broadcast(node, key, Tombstone(dot))

    @rule(step=st.integers(-3, 3))
    def move_time(self, step: int) -> None:
        self.ms = max(0, self.ms + step)

    @precondition(lambda self: any(self.inbox.values()))
    @rule(node=st.sampled_from(NODES), pick=st.integers(0, 2**16), keep=st.booleans())
    def deliver(self, node: str, pick: int, keep: bool) -> None:
        box = self.inbox[node]
        if not box:
            return
        raw = box[pick % len(box)] if keep else box.pop(pick % len(box))
        result = ingest(self.maps[node], raw, self.clocks[node])
        assert result.rejected == ()

    @rule(src=st.sampled_from(NODES), dst=st.sampled_from(NODES), seed=st.integers(0, 99))
    def partial_sync(self, src: str, dst: str, seed: int) -> None:
        snapshot = list(self.maps[src].entries())
        part = random.Random(seed).sample(snapshot, len(snapshot) // 2)
        ingest(self.maps[dst], through_wire(part), self.clocks[dst])

    @invariant()
    def clocks_are_ahead_of_their_maps(self) -> None:
        for node in NODES:
            for _, entry in self.maps[node].entries():
                assert self.clocks[node].last >= entry.dot.ts

    def teardown(self) -> None:
        for node in NODES:
            box = self.inbox[node]
            self.rng.shuffle(box)
            for raw in box:
                ingest(self.maps[node], raw, self.clocks[node])
        states = {node: state(self.maps[node]) for node in NODES}
        assert states["a"] == states["b"] == states["c"]


TestReplicas = Replicas.TestCase
TestReplicas.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


def test_stored_entries_of_plain_values_are_not_tracked_by_the_collector() -> None:
    # The point of the stored form (ormap.Packed): a million keys must not mean millions
    # of objects for every full collection to walk while the event loop waits.
    import gc

    m = ORMap()
    m.add("a", 1, d("n", 1))
    m.add("b", b"x", d("n", 2))
    m.remove("c", d("n", 3))
    m.add("d", [1, 2], d("n", 4))
    gc.collect()
    stored = dict(m._stored())
    assert not any(gc.is_tracked(stored[k]) for k in "abc")
    assert gc.is_tracked(stored["d"])  # a list value keeps its entry tracked
    assert m.entry("a") == Value(1, d("n", 1)) and m.entry("c") == Tombstone(d("n", 3))
