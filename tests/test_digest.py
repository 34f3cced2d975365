"""The map's digest: range sums and counts that depend on the entries only, never on how
they arrived, and that name the same keys on every node."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from trio_replica.core.hlc import Timestamp
from trio_replica.core.ormap import (
    FANOUT_BITS,
    LEAF_BITS,
    LEAF_LEVEL,
    Dot,
    Entry,
    Key,
    ORMap,
    Tombstone,
    Value,
    key_leaf,
)

# Enough distinct keys to spread over many leaves, few enough to collide on some.
keys = st.one_of(
    st.integers(0, 300).map(lambda i: f"k{i}"),
    st.integers(-50, 50),
    st.binary(min_size=0, max_size=3),
)
timestamps = st.builds(Timestamp, st.integers(0, 5), st.integers(0, 2))
dots = st.builds(Dot, st.sampled_from(["a", "b", "c"]), timestamps)
entries = st.one_of(st.builds(Value, st.integers(0, 3), dots), st.builds(Tombstone, dots))
deltas = st.lists(st.tuples(keys, entries), max_size=60)


def build(delta: list[tuple[Key, Entry]]) -> ORMap:
    m = ORMap()
    for key, entry in delta:
        m.merge_entry(key, entry)
    return m


def fresh(m: ORMap) -> ORMap:
    """A map holding exactly `m`'s entries, built from nothing."""
    return ORMap(dict(m.entries()))


def every_digest(m: ORMap) -> list[tuple[int, int, int, int]]:
    """Every non-empty range of every level, as (level, index, sum, count)."""
    out: list[tuple[int, int, int, int]] = []
    parents = [0]
    out.append((0, 0, *m.range_digest(0, 0)))
    for level in range(LEAF_LEVEL):
        children = [c for p in parents for c in m.child_digests(level, p)]
        out += [(level + 1, *c) for c in children]
        parents = [c[0] for c in children]
    return out


@given(deltas, st.randoms(use_true_random=False))
def test_the_digest_depends_on_the_entries_not_on_their_order(
    delta: list[tuple[Key, Entry]], rnd: object
) -> None:
    shuffled = list(delta) + list(delta[: len(delta) // 2])  # duplicates too
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    a, b = build(delta), build(shuffled)
    assert a == b
    assert every_digest(a) == every_digest(b) == every_digest(fresh(a))


@given(deltas, deltas)
def test_merged_maps_have_equal_digests_and_different_maps_different_ones(
    da: list[tuple[Key, Entry]], db: list[tuple[Key, Entry]]
) -> None:
    a, b = build(da), build(db)
    if a == b:
        assert a.range_digest(0, 0) == b.range_digest(0, 0)
    else:
        # Different entries: the root differs unless two 64-bit sums collide.
        assert a.range_digest(0, 0) != b.range_digest(0, 0)
    ab, ba = a.copy(), b.copy()
    ab.merge(b)
    ba.merge(a)
    assert every_digest(ab) == every_digest(ba) == every_digest(fresh(ab))


@given(deltas, st.integers(0, 6), st.integers(0, 6))
def test_removals_keep_the_digest_exact(delta: list[tuple[Key, Entry]], now: int, ttl: int) -> None:
    m = build(delta)
    m.gc_tombstones(now, ttl)
    for key, _ in delta[::3]:
        m.restore(key, None)
    assert every_digest(m) == every_digest(fresh(m))
    if not len(list(m.entries())):
        assert every_digest(m) == [(0, 0, 0, 0)]


@given(deltas)
def test_each_level_sums_its_children_and_ranges_list_their_keys(
    delta: list[tuple[Key, Entry]],
) -> None:
    m = build(delta)
    for level in range(LEAF_LEVEL + 1):
        width = FANOUT_BITS * (LEAF_LEVEL - level)
        seen: list[Key] = []
        for index in range(1 << (FANOUT_BITS * level)) if level <= 2 else []:
            total, count = m.range_digest(level, index)
            listed = [k for batch in m.range_keys(level, index, 7) for k in batch]
            assert all(len(batch) <= 7 for batch in m.range_keys(level, index, 7))
            assert len(listed) == count
            assert all(key_leaf(k) >> width == index for k in listed)
            seen += listed
            if level < LEAF_LEVEL:
                children = m.child_digests(level, index)
                assert sum(c[2] for c in children) == count
                assert sum(c[1] for c in children) % (1 << 64) == total
        if level <= 2:
            assert sorted(map(repr, seen)) == sorted(repr(k) for k, _ in m.entries())


def test_a_key_lands_in_the_same_leaf_in_every_process() -> None:
    # A CRC-32 of the key's bytes, never Python's per-process hash: fixed values.
    assert key_leaf("a") == 0xE8B7BE43 >> (32 - LEAF_BITS)
    assert key_leaf(b"a") != key_leaf("a")
    assert key_leaf(1) == key_leaf(True)


@settings(max_examples=20)
@given(st.integers(0, 2000))
def test_a_large_map_spreads_over_leaves(n: int) -> None:
    m = ORMap()
    for i in range(n):
        m.add(f"key-{i}", i, Dot("a", Timestamp(1, 0)))
    leaves = {key_leaf(f"key-{i}") for i in range(n)}
    assert m.range_digest(0, 0)[1] == n
    assert len(leaves) >= min(n, 0.9 * n)
