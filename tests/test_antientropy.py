"""Digest anti-entropy (core/antientropy.py): two replicas compared round by round end equal,
moving only the entries of the ranges that differ."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_replica.core.antientropy import (
    LEAF_LEVEL,
    AntiEntropyConfig,
    DigestRound,
    answer,
    check_round,
    opening,
    ranges_in,
)
from trio_replica.core.hlc import Timestamp
from trio_replica.core.ormap import Dot, ORMap, Tombstone, Value

from .test_digest import build, deltas


@attrs.define
class Exchange:
    rounds: int = 0
    moved: int = 0
    digests: int = 0


def compare(a: ORMap, b: ORMap, config: AntiEntropyConfig | None = None) -> Exchange:
    """Run a comparison from `a` to `b` to its end, moving entries as the rounds say."""
    stats = Exchange()
    maps = {"a": a, "b": b}
    queue: list[tuple[str, DigestRound]] = [("b", opening(a))]
    while queue:
        to, round_ = queue.pop(0)
        assert check_round(round_, config) is None, round_
        stats.rounds += 1
        stats.digests += len(round_.digests)
        here, there = maps[to], maps["a" if to == "b" else "b"]
        replies, send = answer(here, round_, config)
        assert replies or round_.bare
        for level, index in ranges_in(send):
            for keys in here.range_keys(level, index, 50):
                for key in keys:
                    entry = here.entry(key)
                    assert entry is not None
                    there.merge_entry(key, entry)
                    stats.moved += 1
        queue += [("a" if to == "b" else "b", r) for r in replies]
    return stats


@settings(deadline=None)
@given(deltas, deltas, deltas)
def test_a_comparison_leaves_both_replicas_equal(shared, only_a, only_b) -> None:  # type: ignore[no-untyped-def]
    a, b = build(shared + only_a), build(shared + only_b)
    union = a.copy()
    union.merge(b)
    compare(a, b)
    assert a == b == union


@settings(deadline=None, max_examples=30)
@given(deltas, deltas, st.integers(0, 70), st.integers(1, 4))
def test_any_bounds_converge(shared, only_a, exchange_below, max_parents) -> None:  # type: ignore[no-untyped-def]
    config = AntiEntropyConfig(exchange_below=exchange_below, max_parents=max_parents)
    a, b = build(shared + only_a), build(shared)
    compare(a, b, config)
    assert a == b


def fill(m: ORMap, n: int, node: str = "a") -> None:
    for i in range(n):
        m.add(f"key-{i:07d}", i, Dot(node, Timestamp(1_000 + i, 0)))


def test_equal_replicas_cost_one_round_trip() -> None:
    a = ORMap()
    fill(a, 5_000)
    b = a.copy()
    stats = compare(a, b)
    assert stats.rounds == 2 and stats.moved == 0


def test_two_changes_in_a_large_map_move_a_few_entries() -> None:
    a = ORMap()
    fill(a, 200_000)
    b = a.copy()
    a.add("key-0000007", "new on a", Dot("a", Timestamp(5_000_000, 0)))
    b.remove("key-0100000", Dot("b", Timestamp(5_000_000, 0)))
    stats = compare(a, b)
    assert a == b
    # Two leaves of ~3 entries each way, not 200,000 entries.
    assert 2 <= stats.moved <= 40, stats
    assert stats.rounds <= 2 * (LEAF_LEVEL + 1)
    assert stats.digests <= 2 * 16 * LEAF_LEVEL + 16


def test_an_empty_replica_gets_everything_in_one_exchange() -> None:
    a, b = ORMap(), ORMap()
    fill(a, 3_000)
    stats = compare(b, a)  # the new node opens
    assert a == b
    assert stats.moved == 3_000
    assert stats.rounds == 2


def test_a_broken_full_sync_resumes_with_what_is_missing() -> None:
    a, b = ORMap(), ORMap()
    fill(a, 20_000)
    # Half of a level-1 range arrived before the stream broke, and 7 ranges whole.
    for level, index in [(1, i) for i in range(7)] + [(2, 7 * 16 + i) for i in range(8)]:
        for keys in a.range_keys(level, index, 1000):
            for key in keys:
                entry = a.entry(key)
                assert entry is not None
                b.merge_entry(key, entry)
    held = len(b)
    stats = compare(b, a)
    assert a == b
    assert stats.moved == 20_000 - held


def test_malformed_rounds_are_named() -> None:
    assert check_round(DigestRound(0, (0,), ())) is not None
    assert check_round(DigestRound(LEAF_LEVEL + 1, (0,), ())) is not None
    assert check_round(DigestRound(1, (1,), ())) is not None  # level 0 has one range
    assert check_round(DigestRound(2, (3, 3), ())) is not None
    assert check_round(DigestRound(2, (3,), ((4 * 16, 1, 1),))) is not None  # not a child
    assert check_round(DigestRound(2, (3,), ((3 * 16, 1, 0),))) is not None  # empty
    assert check_round(DigestRound(2, (3,), ((3 * 16, 1, 1), (3 * 16, 2, 1)))) is not None
    assert check_round(DigestRound(2, (), (), ((9, 0),))) is not None
    config = AntiEntropyConfig(max_parents=2)
    assert check_round(DigestRound(2, (1, 2, 3), ()), config) is not None
    assert check_round(DigestRound(2, (3,), ((3 * 16 + 1, 5, 2),), ((2, 255),))) is None


@pytest.mark.parametrize(
    ("ranges", "expected"),
    [
        ([(2, 17), (1, 1), (1, 1), (3, 1 * 256 + 5), (3, 2 * 256)], [(1, 1), (3, 512)]),
        ([(4, 0), (4, 0)], [(4, 0)]),
    ],
)
def test_ranges_in_drops_duplicates_and_nested_ranges(
    ranges: list[tuple[int, int]], expected: list[tuple[int, int]]
) -> None:
    assert ranges_in(ranges) == expected


def test_tombstones_travel_like_values() -> None:
    a, b = ORMap(), ORMap()
    fill(a, 100)
    b.merge(a)
    b.merge_entry("key-0000003", Tombstone(Dot("b", Timestamp(9_999, 0))))
    compare(a, b)
    assert "key-0000003" not in a and a == b
    assert isinstance(a.entry("key-0000003"), Tombstone)
    assert a.entry("key-0000004") == Value(4, Dot("a", Timestamp(1_004, 0)))
