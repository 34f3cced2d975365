"""The hybrid logical clock: timestamp forms, monotonicity, the skew bound, overflow."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_replica.core.hlc import (
    MAX_LOGICAL,
    MAX_STAMP,
    MAX_WALL,
    ZERO,
    ClockExhausted,
    ClockSkewError,
    HybridClock,
    InvalidTimestamp,
    Timestamp,
    system_ms,
)
from trio_replica.errors import ReplicaError

walls = st.integers(0, MAX_WALL)
logicals = st.integers(0, MAX_LOGICAL)
timestamps = st.builds(Timestamp, walls, logicals)


class FakePhysical:
    """A physical clock the test sets by hand."""

    def __init__(self, ms: int = 1_000) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def make_clock(ms: int = 1_000, offset: int = 500) -> tuple[HybridClock, FakePhysical]:
    physical = FakePhysical(ms)
    return HybridClock(physical, max_offset_ms=offset), physical


# --- Timestamp ------------------------------------------------------------------------------


def test_order_is_wall_then_logical() -> None:
    assert Timestamp(1, 5) < Timestamp(2, 0) < Timestamp(2, 1)
    assert Timestamp(3, 3) == Timestamp(3, 3)
    assert str(Timestamp(7, 2)) == "7.2"


@given(timestamps)
def test_pack_round_trip(ts: Timestamp) -> None:
    packed = ts.pack()
    assert 0 <= packed <= MAX_STAMP
    assert packed == ts.wall << 32 | ts.logical
    assert Timestamp.unpack(packed) == ts


@given(timestamps)
def test_binary_round_trip(ts: Timestamp) -> None:
    data = ts.to_bytes()
    assert len(data) == 12
    assert data == ts.wall.to_bytes(8, "big") + ts.logical.to_bytes(4, "big")
    assert Timestamp.from_bytes(data) == ts


@given(timestamps, timestamps)
def test_packed_and_binary_forms_keep_the_order(a: Timestamp, b: Timestamp) -> None:
    assert (a < b) == (a.pack() < b.pack()) == (a.to_bytes() < b.to_bytes())


@pytest.mark.parametrize(
    ("wall", "logical"),
    [
        (-1, 0),
        (0, -1),
        (MAX_WALL + 1, 0),
        (0, MAX_LOGICAL + 1),
        (True, 0),
        (0, False),
        (1.0, 0),
        (0, "1"),
        (None, 0),
        # str() of this int raises ValueError; the error message must not try it.
        pytest.param(10**5000, 0, id="huge-int"),
        ([1], 0),
    ],
)
def test_invalid_fields_are_refused(wall: object, logical: object) -> None:
    with pytest.raises(InvalidTimestamp):
        Timestamp(wall, logical)  # type: ignore[arg-type]


def test_invalid_timestamp_is_a_replica_error_and_a_value_error() -> None:
    assert issubclass(InvalidTimestamp, ReplicaError)
    assert issubclass(InvalidTimestamp, ValueError)
    assert issubclass(ClockSkewError, ReplicaError)


@pytest.mark.parametrize("stamp", [-1, MAX_STAMP + 1, True, 1.5, "1", None])
def test_unpack_refuses_out_of_range(stamp: object) -> None:
    with pytest.raises(InvalidTimestamp):
        Timestamp.unpack(stamp)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00" * 11, b"\x00" * 13, bytearray(12), "x" * 12, b"\xff" * 8 + b"\x00" * 4],
)
def test_from_bytes_refuses_bad_input(data: object) -> None:
    with pytest.raises(InvalidTimestamp):
        Timestamp.from_bytes(data)  # type: ignore[arg-type]


# --- now() ---------------------------------------------------------------------------------


def test_now_follows_physical_time() -> None:
    clock, physical = make_clock(1_000)
    assert clock.now() == Timestamp(1_000, 0)
    assert clock.now() == Timestamp(1_000, 1)
    physical.ms = 1_005
    assert clock.now() == Timestamp(1_005, 0)


def test_now_holds_its_wall_when_physical_time_goes_back() -> None:
    clock, physical = make_clock(1_000)
    clock.now()
    physical.ms = 400
    assert clock.now() == Timestamp(1_000, 1)
    assert clock.now() == Timestamp(1_000, 2)


@given(st.lists(st.integers(-(2**50), MAX_WALL + 2**40), min_size=1, max_size=60))
def test_now_is_strictly_increasing_whatever_the_physical_clock(readings: list[int]) -> None:
    clock, physical = make_clock(0)
    previous = clock.last
    for ms in readings:
        physical.ms = ms
        ts = clock.now()
        assert ts > previous
        assert ts == clock.last
        previous = ts


def test_negative_physical_reading_counts_as_zero() -> None:
    clock, _ = make_clock(-5_000)
    assert clock.now() == Timestamp(0, 1)


def test_default_physical_clock_is_unix_milliseconds() -> None:
    assert 1_600_000_000_000 < system_ms() < MAX_WALL
    assert HybridClock().now().wall > 0


def test_max_offset_must_be_a_non_negative_int() -> None:
    with pytest.raises(ValueError):
        HybridClock(max_offset_ms=-1)
    with pytest.raises(ValueError):
        HybridClock(max_offset_ms=True)


# --- update() ------------------------------------------------------------------------------


def test_update_rule_cases() -> None:
    # OPODIS 2014, Fig. 5: the four cases of the receive rule.
    clock, physical = make_clock(1_000)
    clock.last = Timestamp(1_100, 4)
    # Local wall is the greatest: logical + 1.
    assert clock.update(Timestamp(1_050, 9)) == Timestamp(1_100, 5)
    # Remote wall is the greatest: remote logical + 1.
    assert clock.update(Timestamp(1_200, 7)) == Timestamp(1_200, 8)
    # Both walls equal and greatest: max logical + 1.
    assert clock.update(Timestamp(1_200, 3)) == Timestamp(1_200, 9)
    assert clock.update(Timestamp(1_200, 20)) == Timestamp(1_200, 21)
    # Physical time is the greatest: logical restarts at 0.
    physical.ms = 1_300
    assert clock.update(Timestamp(1_250, 2)) == Timestamp(1_300, 0)


@given(
    st.lists(
        st.tuples(st.booleans(), st.integers(0, 3_000), st.integers(0, 2_000), logicals),
        min_size=1,
        max_size=60,
    )
)
def test_update_and_now_are_strictly_increasing_and_pass_the_remote(
    steps: list[tuple[bool, int, int, int]],
) -> None:
    clock, physical = make_clock(1_000, offset=500)
    previous = clock.last
    for is_update, ms, remote_wall, remote_logical in steps:
        physical.ms = ms
        if is_update:
            remote = Timestamp(remote_wall, remote_logical)
            try:
                ts = clock.update(remote)
            except ClockSkewError:
                assert remote.wall > ms + 500
                assert clock.last == previous
                continue
            assert ts > remote
        else:
            ts = clock.now()
        assert ts > previous
        previous = ts


def test_far_future_remote_is_rejected_counted_and_leaves_the_clock_alone() -> None:
    clock, _ = make_clock(1_000, offset=500)
    before = clock.now()
    with pytest.raises(ClockSkewError) as info:
        clock.update(Timestamp(1_501, 0))
    assert info.value.remote == Timestamp(1_501, 0)
    assert info.value.limit == 1_500
    assert clock.rejected == 1
    assert clock.last == before
    with pytest.raises(ClockSkewError):
        clock.check(Timestamp(10**9, 0))
    assert clock.rejected == 2
    assert clock.last == before
    # Exactly at the bound is accepted.
    assert clock.update(Timestamp(1_500, 0)) == Timestamp(1_500, 1)
    assert clock.rejected == 2


def test_resume_absorbs_the_nodes_own_data_beyond_the_skew_bound() -> None:
    # A store written while the wall clock was two hours ahead, read back after a step
    # back: the node's own data, not a peer's, so the bound does not apply.
    clock, physical = make_clock(1_000, offset=500)
    stored = Timestamp(1_000 + 7_200_000, 7)
    assert clock.resume(stored) == Timestamp(stored.wall, 8)
    assert clock.rejected == 0
    assert clock.now() == Timestamp(stored.wall, 9)  # held until physical time catches up
    # Peers still face the bound, measured from the physical clock.
    with pytest.raises(ClockSkewError):
        clock.update(Timestamp(1_501, 0))
    assert clock.rejected == 1 and clock.last == Timestamp(stored.wall, 9)
    physical.ms = stored.wall + 1
    assert clock.now() == Timestamp(stored.wall + 1, 0)
    with pytest.raises(TypeError):
        clock.resume((1, 2))  # type: ignore[arg-type]


@settings(max_examples=200)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["now", "update", "resume"]),
            st.integers(-10_000_000, 10_000_000),
            st.integers(-10_000_000, 10_000_000),
        ),
        min_size=1,
        max_size=40,
    )
)
def test_the_clock_never_goes_back_whatever_the_physical_clock_does(
    steps: list[tuple[str, int, int]],
) -> None:
    """The physical clock jumps back and forth by hours; local events, peers' timestamps
    (within the bound or not) and the node's own stored timestamps never move it back."""
    base = 10**12
    clock, physical = make_clock(base, offset=60_000)
    previous = clock.last
    for kind, jump, distance in steps:
        physical.ms = base + jump
        other = Timestamp(physical.ms + distance, 0)
        if kind == "now":
            ts = clock.now()
        elif kind == "resume":
            ts = clock.resume(other)
            assert ts > other
        else:
            try:
                ts = clock.update(other)
            except ClockSkewError:
                assert distance > 60_000 and clock.last == previous
                continue
            assert ts > other
        assert ts > previous and ts.wall >= physical.ms
        previous = ts


def test_check_and_update_can_share_one_physical_reading() -> None:
    clock, physical = make_clock(1_000, offset=0)
    remote = Timestamp(1_000, 3)
    clock.check(remote, physical=1_000)
    physical.ms = 0  # the physical clock steps back between the check and the update
    assert clock.update(remote, physical=1_000) == Timestamp(1_000, 4)


def test_update_refuses_what_is_not_a_timestamp() -> None:
    clock, _ = make_clock()
    with pytest.raises(TypeError):
        clock.update((1, 2))  # type: ignore[arg-type]


# --- logical overflow ----------------------------------------------------------------------


def test_now_carries_logical_overflow_into_the_wall() -> None:
    clock, _ = make_clock(1_000)
    clock.last = Timestamp(1_000, MAX_LOGICAL)
    ts = clock.now()
    assert ts == Timestamp(1_001, 0)
    assert clock.now() == Timestamp(1_001, 1)


def test_update_carries_logical_overflow_into_the_wall() -> None:
    clock, _ = make_clock(1_000)
    remote = Timestamp(1_200, MAX_LOGICAL)
    ts = clock.update(remote)
    assert ts == Timestamp(1_201, 0)
    assert ts > remote


def test_an_exhausted_clock_raises_without_corrupting_itself() -> None:
    clock, _ = make_clock(MAX_WALL, offset=0)
    clock.last = Timestamp(MAX_WALL, MAX_LOGICAL - 1)
    assert clock.now() == Timestamp(MAX_WALL, MAX_LOGICAL)
    with pytest.raises(ClockExhausted):
        clock.now()
    assert clock.last == Timestamp(MAX_WALL, MAX_LOGICAL)


@settings(max_examples=50)
@given(st.integers(0, 5), st.integers(MAX_LOGICAL - 3, MAX_LOGICAL))
def test_overflow_keeps_timestamps_valid_and_increasing(extra: int, start: int) -> None:
    clock, _ = make_clock(5_000)
    clock.last = Timestamp(5_000, start)
    previous = clock.last
    for _ in range(extra + 4):
        ts = clock.now()
        assert ts > previous
        assert ts.logical <= MAX_LOGICAL
        previous = ts


def test_zero_is_below_everything() -> None:
    assert Timestamp(0, 0) == ZERO
    assert HybridClock(FakePhysical(0)).now() > ZERO


def test_timestamps_do_not_compare_with_other_types() -> None:
    with pytest.raises(TypeError):
        _ = Timestamp(1, 0) < (1, 0)  # type: ignore[operator]
    assert Timestamp(1, 0) != (1, 0)  # type: ignore[comparison-overlap]
    assert sorted([Timestamp(2, 0), Timestamp(1, 9), Timestamp(1, 2)]) == [
        Timestamp(1, 2),
        Timestamp(1, 9),
        Timestamp(2, 0),
    ]
