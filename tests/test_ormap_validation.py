"""`ingest` against hostile input: whatever a peer sends, a bad entry is rejected by name,
and the map and the clock stay exactly as they were."""

from __future__ import annotations

from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_replica.core import wire
from trio_replica.core.hlc import MAX_LOGICAL, MAX_WALL, HybridClock, Timestamp
from trio_replica.core.ormap import Dot, ORMap, Tombstone, Value
from trio_replica.core.ormap_wire import (
    DEFAULT_LIMITS,
    IngestResult,
    Limits,
    from_wire,
    ingest,
    to_wire,
)
from trio_replica.errors import WireError

NOW = 1_000_000
OFFSET = 5_000
MAX_SIZE = 1 << 22
REASONS = {"shape", "kind", "key", "node", "hlc", "skew", "value", "validator", "signature"}


def clock_at(ms: int = NOW) -> HybridClock:
    return HybridClock(lambda: ms, max_offset_ms=OFFSET)


def seeded_map() -> ORMap:
    m = ORMap()
    m.add("k", "v", Dot("a", Timestamp(NOW - 10, 0)))
    m.add(7, [1, 2], Dot("b", Timestamp(NOW - 5, 3)))
    m.remove("gone", Dot("a", Timestamp(NOW - 3, 0)))
    return m


def state(m: ORMap) -> list[bytes]:
    return sorted(cbor2.dumps(e, canonical=True) for e in to_wire(m.entries()))


def nest(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


def good_value_entry(key: Any = "x", wall: int = NOW, value: Any = 1) -> list[Any]:
    return [key, 1, "node-1", wall, 0, value]


# --- a corpus of malformed entries ---------------------------------------------------------

plain = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=4) | st.binary(max_size=4), inner, max_size=4)
    ),
    max_leaves=12,
)

bad_keys = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
    st.integers(min_value=2**64),
    st.integers(max_value=-(2**64) - 1),
    st.just("k" * (DEFAULT_LIMITS.max_key_bytes + 1)),
    st.just(b"k" * (DEFAULT_LIMITS.max_key_bytes + 1)),
    st.just("é" * (DEFAULT_LIMITS.max_key_bytes // 2 + 1)),  # short in characters, long in bytes
    st.just("\ud800"),  # a lone surrogate: not encodable
    st.just(bytearray(b"k")),
    st.just(("t",)),
)
bad_kinds = st.one_of(
    st.integers().filter(lambda k: k not in (0, 1)),
    st.booleans(),
    st.just(1.0),
    st.just("1"),
    st.none(),
)
bad_nodes = st.one_of(
    st.just(""),
    st.just("n" * 129),
    st.just("\udfff"),
    st.integers(),
    st.binary(max_size=4),
    st.none(),
    st.booleans(),
    st.lists(st.text(max_size=2), max_size=2),
)
bad_hlc_fields = st.one_of(
    st.integers(max_value=-1),
    st.booleans(),
    st.floats(),
    st.none(),
    st.text(max_size=3),
    st.just(2**64),
    st.just(10**30),
)
bad_values = st.one_of(
    st.just(nest(DEFAULT_LIMITS.max_value_depth + 1)),
    st.just(nest(40)),
    st.just(nest(3_000)),  # deeper than the interpreter's recursion limit would allow
    st.just({"a": nest(20)}),
    st.just(b"x" * (DEFAULT_LIMITS.max_value_bytes + 1)),
    st.just({1: "int map key"}),
    st.just({(1,): "tuple map key"}),
    st.just({1.5}),
    st.just(frozenset()),
    st.just(object()),
    st.just(2**64),
    st.just([-(2**64) - 1]),
    st.just("\ud800"),
    st.just(bytearray(b"x")),
    st.just(ValueError("boom")),
)


@st.composite
def near_misses(draw: st.DrawFn) -> Any:
    """A well-formed entry with exactly one thing wrong."""
    kind = draw(st.sampled_from([0, 1]))
    entry: list[Any] = ["key", kind, "node", NOW, 0] + ([{"v": 1}] if kind == 1 else [])
    flaw = draw(st.sampled_from(["key", "kind", "node", "wall", "logical", "value", "length"]))
    if flaw == "key":
        entry[0] = draw(bad_keys)
    elif flaw == "kind":
        entry[1] = draw(bad_kinds)
    elif flaw == "node":
        entry[2] = draw(bad_nodes)
    elif flaw in ("wall", "logical"):
        field = 3 if flaw == "wall" else 4
        entry[field] = draw(
            bad_hlc_fields
            | st.just(MAX_WALL + 1 if flaw == "wall" else MAX_LOGICAL + 1)
            | st.integers(NOW + OFFSET + 1, MAX_WALL)  # far future: the skew bound
            if flaw == "wall"
            else bad_hlc_fields | st.just(MAX_LOGICAL + 1)
        )
    elif flaw == "value":
        entry[1] = 1
        entry[5:] = [draw(bad_values)]
    else:
        entry = draw(
            st.sampled_from(
                [entry[:n] for n in range(len(entry))]
                + [[*entry, None], [*entry, 0, 0], ["key", 0, "n", 1, 0, "tombstone+value"]]
            )
        )
    return entry


malformed = st.one_of(near_misses(), plain.filter(lambda v: not isinstance(v, list) or len(v) < 2))


# --- the fuzzed corpus ---------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.lists(malformed, min_size=1, max_size=8))
def test_malformed_entries_are_rejected_and_change_nothing(corpus: list[Any]) -> None:
    m = seeded_map()
    clock = clock_at()
    clock.now()
    before_state, before_len, before_last = state(m), len(m), clock.last
    calls: list[Any] = []

    def validator(key: Any, value: Any) -> bool:
        calls.append(key)
        return True

    result = ingest(m, corpus, clock, validator=validator)
    assert isinstance(result, IngestResult)
    assert [r.index for r in result.rejected] == list(range(len(corpus)))
    assert {r.reason for r in result.rejected} <= REASONS
    assert result.changed_keys == () and result.applied == 0
    assert calls == []  # the validator only ever sees otherwise valid entries
    assert state(m) == before_state and len(m) == before_len
    assert clock.last == before_last
    assert clock.rejected == sum(r.reason == "skew" for r in result.rejected)


class Good(int):
    """Marks, in a drawn list, where a valid entry goes (the int is its value and age)."""


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(malformed, st.builds(Good, st.integers(0, 50))), max_size=10))
def test_good_entries_still_apply_beside_bad_ones(mixed: list[Any]) -> None:
    raw = [good_value_entry(f"good{x}", NOW - x, int(x)) if type(x) is Good else x for x in mixed]
    good = [e for e, x in zip(raw, mixed, strict=True) if type(x) is Good]
    alone, alone_clock = seeded_map(), clock_at()
    expected = ingest(alone, good, alone_clock)
    m, clock = seeded_map(), clock_at()
    result = ingest(m, raw, clock)
    assert state(m) == state(alone)
    assert result.changed_keys == expected.changed_keys
    assert clock.last == alone_clock.last
    assert len(result.rejected) == len(raw) - len(good)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64) | plain.map(lambda v: cbor2.dumps(v)))
def test_arbitrary_bytes_give_wire_error_or_a_clean_result(data: bytes) -> None:
    m, clock = seeded_map(), clock_at()
    before = state(m)
    try:
        raw = wire.decode_payload(data, max_size=MAX_SIZE)
        result = ingest(m, raw, clock)
    except WireError as exc:
        assert exc.reason in {"cbor", "shape", "too_large"}
        assert state(m) == before
        return
    assert result.applied == 0 or state(m) != before


@pytest.mark.parametrize("raw", [None, 1, "delta", b"delta", {"k": 1}, True, 1.5, {1, 2}])
def test_a_delta_that_is_not_an_array_is_a_wire_error(raw: Any) -> None:
    m, clock = seeded_map(), clock_at()
    before = state(m)
    with pytest.raises(WireError) as info:
        ingest(m, raw, clock)
    assert info.value.reason == "shape"
    assert state(m) == before and clock.rejected == 0


def test_too_many_entries_is_a_wire_error() -> None:
    limits = Limits(max_entries=3)
    with pytest.raises(WireError) as info:
        ingest(ORMap(), [good_value_entry()] * 4, clock_at(), limits=limits)
    assert info.value.reason == "too_large"
    assert ingest(ORMap(), [good_value_entry()] * 3, clock_at(), limits=limits).applied == 1


# --- the skew bound and the clock ----------------------------------------------------------


def test_far_future_entries_are_rejected_counted_and_do_not_move_the_clock() -> None:
    m, clock = ORMap(), clock_at()
    first = clock.now()
    result = ingest(
        m,
        [good_value_entry("future", NOW + OFFSET + 1), [b"t", 0, "n", MAX_WALL, MAX_LOGICAL]],
        clock,
    )
    assert [(r.key, r.reason) for r in result.rejected] == [("future", "skew"), (b"t", "skew")]
    assert clock.rejected == 2 and clock.last == first and len(m) == 0 and m.tombstones == 0
    at_bound = ingest(m, [good_value_entry("edge", NOW + OFFSET)], clock)
    assert at_bound.changed_keys == ("edge",)
    assert clock.last > Timestamp(NOW + OFFSET, 0)


def test_only_accepted_entries_move_the_clock() -> None:
    m, clock = ORMap(), clock_at()
    raw = [good_value_entry("ok", NOW + 100), good_value_entry("refused", NOW + 4_000)]
    result = ingest(m, raw, clock, validator=lambda k, v: k == "ok")
    assert [r.reason for r in result.rejected] == ["validator"]
    assert clock.last == Timestamp(NOW + 100, 1)


def test_own_entries_skip_the_skew_bound_and_leave_the_clock_alone() -> None:
    # The clock resumed from a store written two hours ahead (its wall clock stepped back
    # since): its own writes apply here, and a peer with the same physical time refuses them.
    clock = clock_at()
    clock.resume(Timestamp(NOW + 7_200_000, 0))
    ts = clock.now()
    raw = [["k", 1, "me", ts.wall, ts.logical, "v"]]
    mine = ORMap()
    result = ingest(mine, raw, clock, own=True)
    assert result.applied_keys == ("k",) and not result.rejected
    assert mine.get("k") == "v" and clock.last == ts and clock.rejected == 0
    peer = clock_at()
    refused = ingest(ORMap(), raw, peer)
    assert [r.reason for r in refused.rejected] == ["skew"] and peer.rejected == 1


def test_an_exhausted_clock_refuses_everything_and_changes_nothing() -> None:
    clock = HybridClock(lambda: MAX_WALL, max_offset_ms=0)
    clock.last = Timestamp(MAX_WALL, MAX_LOGICAL)
    m = seeded_map()
    before = state(m)
    result = ingest(m, [good_value_entry("x", 1), ["y", 0, "n", 2, 0]], clock)
    assert [(r.index, r.reason) for r in result.rejected] == [(0, "clock"), (1, "clock")]
    assert result.applied == 0 and state(m) == before


# --- the per-value validator ---------------------------------------------------------------


class BadText(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text for you")


class Unboolable:
    def __bool__(self) -> bool:
        raise ValueError("neither true nor false")


@pytest.mark.parametrize(
    "verdict",
    [
        lambda k, v: False,
        lambda k, v: None,
        lambda k, v: 0,
        lambda k, v: Unboolable(),
        lambda k, v: (_ for _ in ()).throw(ValueError("bad value")),
        lambda k, v: (_ for _ in ()).throw(BadText()),
        lambda k, v: 1 / 0,
    ],
    ids=["false", "none", "zero", "unboolable", "raises", "raises-unprintable", "zerodiv"],
)
def test_a_refusing_validator_rejects_that_entry_only(verdict: Any) -> None:
    def validator(key: Any, value: Any) -> Any:
        return True if key == "fine" else verdict(key, value)

    m, clock = ORMap(), clock_at()
    raw = [good_value_entry("fine"), good_value_entry("refused"), ["refused2", 0, "n", NOW, 1]]
    result = ingest(m, raw, clock, validator=validator)
    assert [(r.index, r.key, r.reason) for r in result.rejected] == [(1, "refused", "validator")]
    assert m.get("fine") == 1 and "refused" not in m
    # Tombstones carry no value: the validator is not asked about them.
    assert isinstance(m.entry("refused2"), Tombstone)


def test_validator_sees_decoded_values() -> None:
    seen: list[tuple[Any, Any]] = []
    raw = [good_value_entry(b"k", NOW, {"a": [1, b"x"]}), good_value_entry(-3, NOW, None)]

    def validator(key: Any, value: Any) -> bool:
        seen.append((key, value))
        return True

    ingest(ORMap(), raw, clock_at(), validator=validator)
    assert seen == [(b"k", {"a": [1, b"x"]}), (-3, None)]


# --- limits, keys, round trips -------------------------------------------------------------


def test_limits_are_configurable() -> None:
    limits = Limits(max_key_bytes=4, max_value_bytes=16, max_value_depth=2, max_node_id=6)
    raw = [
        good_value_entry("12345"),
        good_value_entry("v", NOW, "x" * 20),
        good_value_entry("d", NOW, [[[1]]]),
        ["n", 0, "node-12", NOW, 0],
        good_value_entry("ok", NOW, [[1]]),
    ]
    result = ingest(ORMap(), raw, clock_at(), limits=limits)
    reasons = [(r.index, r.reason) for r in result.rejected]
    assert reasons == [(0, "key"), (1, "value"), (2, "value"), (3, "node")]
    assert result.changed_keys == ("ok",)


def test_wire_round_trip_keeps_types_and_tombstones() -> None:
    m = ORMap()
    m.add("s", ("tuple", "travels", "as", "array"), Dot("a", Timestamp(5, 1)))
    m.add(b"b", {"x": b"\x00", "y": [1.5, None, True]}, Dot("b", Timestamp(6, 0)))
    m.add(-(2**63), 2**64 - 1, Dot("c", Timestamp(7, MAX_LOGICAL)))
    m.remove(0, Dot("a", Timestamp(MAX_WALL, 0)))
    payload = wire.encode_payload(to_wire(m.entries()), max_size=MAX_SIZE)
    raw = wire.decode_payload(payload, max_size=MAX_SIZE)
    parsed = from_wire(raw)
    # A map keeps no order: compare by key (int and str keys stay apart).
    by_key = {(type(k), k): e for k, e in parsed}
    assert sorted(map(repr, by_key)) == sorted(repr((type(k), k)) for k in ["s", b"b", -(2**63), 0])
    assert by_key[str, "s"] == Value(["tuple", "travels", "as", "array"], Dot("a", Timestamp(5, 1)))
    assert by_key[int, 0] == Tombstone(Dot("a", Timestamp(MAX_WALL, 0)))
    back = ORMap()
    for key, entry in parsed:
        back.merge_entry(key, entry)
    assert state(back) == state(m)


def test_from_wire_is_all_or_nothing() -> None:
    with pytest.raises(WireError) as info:
        from_wire([good_value_entry("a"), good_value_entry("b", -1)])
    assert "entry 1" in str(info.value)
    with pytest.raises(WireError):
        from_wire({"not": "a list"})
    # It trusts the clock: a far-future entry parses (it is for our own stored state).
    assert len(from_wire([good_value_entry("a", MAX_WALL)])) == 1


def test_ingest_accepts_tuples_from_local_callers() -> None:
    raw = (("k", 1, "n", NOW, 0, ("a",)),)
    assert ingest(ORMap(), raw, clock_at()).changed_keys == ("k",)
