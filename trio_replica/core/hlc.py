"""The hybrid logical clock: timestamps that follow wall time and never go backwards.

This module owns `Timestamp` (the value) and `HybridClock` (the per-node state that mints
and absorbs them). It is sans-IO: the physical clock is an injected callable returning
milliseconds, so tests drive it by hand.

Theory of operation (Kulkarni, Demirbas et al., "Logical Physical Clocks", OPODIS 2014,
Fig. 5). A timestamp is ``(wall, logical)``: `wall` is the largest physical time, in
milliseconds, this node has heard of, and `logical` orders events that share a wall value.
Timestamps compare by wall, then logical. `now()` ticks for a local event (a write, a
message id); `update(remote)` absorbs a timestamp received from a peer so that everything
this node mints afterwards is ordered after it. Both return a timestamp strictly greater
than anything the clock returned or absorbed before, whatever the physical clock does.

What this clock adds to the paper and to barrel_p2p (SPEC section 6):

* **Skew bound.** A remote timestamp whose wall is more than `max_offset_ms` ahead of the
  local physical clock is refused with `ClockSkewError` and counted in `rejected`; the clock
  does not move. Without this one peer with a broken clock (or a forged entry) drags every
  clock in the cluster into the future, permanently: an HLC never comes back. The node's
  own data is not a peer's: `resume` absorbs it whatever its distance (a wall clock stepped
  back after a write must not lock a node out of its own store).
* **Range.** Both fields are plain non-negative integers (``bool`` is refused) with
  `wall <= MAX_WALL` (2**48 - 1 ms, the year 10889) and `logical <= MAX_LOGICAL` (2**32 - 1).
  The packed form ``wall << 32 | logical`` is therefore below 2**80 (`MAX_STAMP`), and the
  12-byte binary form (big-endian 64-bit wall, 32-bit logical) always fits.
* **Logical overflow.** When the logical counter would pass `MAX_LOGICAL` (four billion
  events inside one millisecond, or a peer that pushed it near the top) the clock moves its
  wall forward by one millisecond and restarts the counter at 0. The result is still
  strictly greater than every earlier timestamp; the wall runs at most 1 ms ahead of the
  physical clock per 2**32 events, which `now()` absorbs as soon as physical time catches
  up. Only a wall at `MAX_WALL` cannot advance: that raises `ClockExhausted`.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable

import attrs

from ..errors import ReplicaError

#: Largest wall value, in milliseconds since the Unix epoch (about the year 10889).
MAX_WALL = 2**48 - 1
#: Largest logical counter; it fits the 32 low bits of the packed form.
MAX_LOGICAL = 2**32 - 1
#: Largest packed timestamp, ``MAX_WALL << 32 | MAX_LOGICAL`` (below 2**80).
MAX_STAMP = 2**80 - 1
#: Default skew bound. Generous enough for machines whose clocks are only loosely
#: synchronised (laptops, VMs after a pause), tight enough that a rogue peer can push the
#: cluster's clocks at most a minute ahead. A refused entry is not lost for good: anti-entropy
#: offers it again, and it is accepted once the local physical clock is within the bound.
DEFAULT_MAX_OFFSET_MS = 60_000

_BINARY = struct.Struct(">QI")


class ClockError(ReplicaError):
    """Base class of the clock's errors."""


class InvalidTimestamp(ClockError, ValueError):
    """A timestamp field is not an integer in range (negative, too large, a bool, a float)."""


class ClockSkewError(ClockError):
    """A remote timestamp is further ahead of the local physical clock than the skew bound.

    `remote` is the refused timestamp and `limit` the largest wall that was acceptable.
    """

    def __init__(self, remote: Timestamp, limit: int) -> None:
        super().__init__(
            f"remote timestamp {remote} is {remote.wall - limit} ms beyond the skew bound"
        )
        self.remote = remote
        self.limit = limit


class ClockExhausted(ClockError):
    """The clock cannot mint a greater timestamp: its wall is at `MAX_WALL`."""


def _check_field(value: object, hi: int, name: str) -> None:
    # bool is an int subclass in Python; it is never a valid field here.
    if type(value) is not int or not 0 <= value <= hi:
        raise InvalidTimestamp(f"{name} must be an integer in [0, {hi}], got {_describe(value)}")


def _describe(value: object) -> str:
    # Never the repr of arbitrary data: its cost is unbounded, and a huge int's str() raises.
    if type(value) is int:
        return str(value) if value.bit_length() <= 96 else f"a {value.bit_length()}-bit integer"
    return f"a {type(value).__name__}"


@attrs.frozen(order=False)
class Timestamp:
    """One HLC reading: wall milliseconds and a logical counter, ordered by (wall, logical).

    The constructor checks both fields (type and range) and raises `InvalidTimestamp`, so
    a `Timestamp` that exists is always valid and always packs.
    """

    wall: int
    logical: int

    def __attrs_post_init__(self) -> None:
        _check_field(self.wall, MAX_WALL, "wall")
        _check_field(self.logical, MAX_LOGICAL, "logical")

    # Written out rather than attrs' generic `order=True`: merges compare timestamps in
    # their inner loop, and these are several times faster.
    def __lt__(self, other: Timestamp) -> bool:
        if type(other) is not Timestamp:
            return NotImplemented
        return (self.wall, self.logical) < (other.wall, other.logical)

    def __le__(self, other: Timestamp) -> bool:
        if type(other) is not Timestamp:
            return NotImplemented
        return (self.wall, self.logical) <= (other.wall, other.logical)

    def __gt__(self, other: Timestamp) -> bool:
        if type(other) is not Timestamp:
            return NotImplemented
        return (self.wall, self.logical) > (other.wall, other.logical)

    def __ge__(self, other: Timestamp) -> bool:
        if type(other) is not Timestamp:
            return NotImplemented
        return (self.wall, self.logical) >= (other.wall, other.logical)

    def pack(self) -> int:
        """One integer, ordered like the timestamps: a version number or a fencing token."""
        return self.wall << 32 | self.logical

    @classmethod
    def unpack(cls, stamp: int) -> Timestamp:
        """Inverse of `pack`; raise `InvalidTimestamp` for anything but an int in range."""
        _check_field(stamp, MAX_STAMP, "packed timestamp")
        return cls(stamp >> 32, stamp & MAX_LOGICAL)

    def to_bytes(self) -> bytes:
        """The 12-byte form: big-endian 64-bit wall, then 32-bit logical (SPEC section 6)."""
        return _BINARY.pack(self.wall, self.logical)

    @classmethod
    def from_bytes(cls, data: bytes) -> Timestamp:
        """Inverse of `to_bytes`; raise `InvalidTimestamp` for a wrong length or range."""
        if type(data) is not bytes or len(data) != _BINARY.size:
            raise InvalidTimestamp(f"binary timestamp must be {_BINARY.size} bytes")
        wall, logical = _BINARY.unpack(data)
        return cls(wall, logical)

    def __str__(self) -> str:
        return f"{self.wall}.{self.logical}"


#: The timestamp a fresh clock starts from; every minted timestamp is greater.
ZERO = Timestamp(0, 0)


def system_ms() -> int:
    """Physical time in milliseconds since the Unix epoch (the default physical clock)."""
    return time.time_ns() // 1_000_000


@attrs.define
class HybridClock:
    """A node's hybrid logical clock (mutable; one per node, no locking: Trio is one thread).

    `physical` returns the physical time in integer milliseconds; a negative reading counts
    as 0. `last` is the greatest timestamp minted or absorbed so far (pass a recovered value
    to resume after a restart). `rejected` counts remote timestamps refused for skew.
    Nothing here blocks.
    """

    physical: Callable[[], int] = system_ms
    max_offset_ms: int = attrs.field(default=DEFAULT_MAX_OFFSET_MS, kw_only=True)
    last: Timestamp = attrs.field(default=ZERO, kw_only=True)
    rejected: int = attrs.field(default=0, kw_only=True)

    def __attrs_post_init__(self) -> None:
        if type(self.max_offset_ms) is not int or self.max_offset_ms < 0:
            raise ValueError("max_offset_ms must be a non-negative integer")

    def read_physical(self) -> int:
        """The physical clock now, clamped to [0, MAX_WALL]."""
        return min(max(self.physical(), 0), MAX_WALL)

    def now(self) -> Timestamp:
        """Mint a timestamp for a local event, greater than every earlier one (OPODIS 2014,
        Fig. 5, "send or local event")."""
        pt = self.read_physical()
        last = self.last
        ts = _tick(last.wall, last.logical + 1) if last.wall >= pt else Timestamp(pt, 0)
        self.last = ts
        return ts

    def check(self, remote: Timestamp, *, physical: int | None = None) -> None:
        """Refuse `remote` if it lies beyond the skew bound: count it and raise
        `ClockSkewError`. `physical` reuses a reading taken by the caller."""
        pt = self.read_physical() if physical is None else physical
        limit = pt + self.max_offset_ms
        if remote.wall > limit:
            self.rejected += 1
            raise ClockSkewError(remote, limit)

    def update(self, remote: Timestamp, *, physical: int | None = None) -> Timestamp:
        """Absorb a peer's timestamp (OPODIS 2014, Fig. 5, "receive event").

        Return a timestamp greater than both `remote` and every earlier one. A `remote` beyond
        the skew bound raises `ClockSkewError` and leaves the clock as it was. `physical`
        reuses a reading taken by the caller, so that a `check` and the `update` that follows
        agree even if the physical clock moves in between.
        """
        if type(remote) is not Timestamp:
            raise TypeError(f"expected a Timestamp, got {type(remote).__name__}")
        pt = self.read_physical() if physical is None else physical
        self.check(remote, physical=pt)
        return self._absorb(remote, pt)

    def resume(self, own: Timestamp) -> Timestamp:
        """Absorb a timestamp of this node's own data (its store, read back on open).

        The same rule as `update`, without the skew bound: the bound guards against what
        peers send, and this timestamp is the node's own. A node whose wall clock was
        stepped back (an NTP correction) after it wrote must still open what it wrote, and
        its next writes must still supersede those entries; so the clock moves past them,
        however far ahead of the physical clock they are, and stays there until physical
        time catches up (as an HLC does). Raises `ClockExhausted` at `MAX_WALL`.
        """
        if type(own) is not Timestamp:
            raise TypeError(f"expected a Timestamp, got {type(own).__name__}")
        return self._absorb(own, self.read_physical())

    def _absorb(self, remote: Timestamp, pt: int) -> Timestamp:
        last = self.last
        wall = max(last.wall, remote.wall, pt)
        if wall == last.wall == remote.wall:
            logical = max(last.logical, remote.logical) + 1
        elif wall == last.wall:
            logical = last.logical + 1
        elif wall == remote.wall:
            logical = remote.logical + 1
        else:
            logical = 0
        ts = _tick(wall, logical)
        self.last = ts
        return ts


def _tick(wall: int, logical: int) -> Timestamp:
    """Build (wall, logical), carrying a logical overflow into the wall (see module doc)."""
    if logical > MAX_LOGICAL:
        if wall >= MAX_WALL:
            raise ClockExhausted("the hybrid clock reached its largest representable timestamp")
        return Timestamp(wall + 1, 0)
    return Timestamp(wall, logical)
