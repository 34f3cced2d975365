"""The replicated map's state: a last-writer-wins map with HLC dots and HLC tombstones.

This module owns the entries and their merge rule; `trio_replica.ormap_wire` owns their wire
form and the validation of entries received from peers. Nothing here does I/O or reads a
clock: dots are minted by the caller (`HybridClock.now()` plus the node id).

Theory of operation (SPEC section 7). barrel_p2p calls it an OR-Map; it is in fact an LWW
map whose entries are stamped with a *dot* ``(node id, HLC timestamp)``:

* ``Value(value, dot)``: the key holds `value`, written by `dot.node` at `dot.ts`. Only the
  greatest dot is kept (one dot per write), so an entry's size never grows with the number
  of writes, unlike barrel_p2p's dot sets.
* ``Tombstone(dot)``: the key was removed by `dot.node` at `dot.ts`. A tombstone is kept
  (invisible) so that a delayed, older add cannot resurrect the key.

Merge per key keeps the greater entry in one total order (`supersedes`):

1. the greater HLC wins;
2. at the same HLC a value beats a tombstone: a tombstone wins only when *strictly* newer
   than the value's dot, so a remove concurrent with a write (same HLC) loses, as in an
   add-wins OR-Set;
3. at the same HLC and kind, the greater node id wins (the SPEC's tie-break);
4. two values with the very same dot (a node that reused its id after its clock went back)
   are ordered by their canonical CBOR encoding, so every replica still picks the same one.

Because the order is total, merge is a join-semilattice (commutative, associative,
idempotent) on whole entries, not only on visible values, and any delivery order,
duplication or loss-then-resend of deltas converges to the same map. A delta or snapshot
only ever carries entries, never absences: a partial sync cannot remove a key.

Tombstone collection: `gc_tombstones(now_ms, ttl_ms)` drops tombstones older than a TTL.
Caveat, inherent to every TTL-collected tombstone scheme: a peer that was partitioned for
longer than the TTL and still holds a value older than the (now forgotten) remove will
resurrect that key when it syncs again. Choose a TTL longer than any partition you expect
to heal by sync rather than by rejoining from scratch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import attrs
import cbor2

from .hlc import HybridClock, Timestamp

#: A map key: plain CBOR scalars that hash the same on every node.
Key = str | bytes | int
#: An entry's kind on the wire (`ormap_wire`): ``[key, kind, node, wall, logical, value?]``.
WIRE_TOMBSTONE = 0
WIRE_VALUE = 1


@attrs.frozen(order=False)
class Dot:
    """Who wrote an entry and when: a node id and its HLC timestamp at that write.

    Dots order by timestamp, then node id (the SPEC's tie-break between writers).
    """

    node: str
    ts: Timestamp

    def __lt__(self, other: Dot) -> bool:
        return (self.ts, self.node) < (other.ts, other.node)

    def __le__(self, other: Dot) -> bool:
        return (self.ts, self.node) <= (other.ts, other.node)

    def __gt__(self, other: Dot) -> bool:
        return (self.ts, self.node) > (other.ts, other.node)

    def __ge__(self, other: Dot) -> bool:
        return (self.ts, self.node) >= (other.ts, other.node)

    def __str__(self) -> str:
        return f"{self.node}@{self.ts}"


@attrs.frozen
class Value:
    """A key's live value and the dot of the write that set it."""

    value: Any
    dot: Dot


@attrs.frozen
class Tombstone:
    """A key's removal: the dot of the remove (the remover's node id and its HLC)."""

    dot: Dot


Entry = Value | Tombstone


def _canonical(value: Any) -> bytes:
    """Canonical CBOR of a value: the last-resort tie-break between two equal dots."""
    try:
        return bytes(cbor2.dumps(value, canonical=True))
    except (cbor2.CBOREncodeError, TypeError, ValueError):
        # Only a local value that bypassed validation gets here; it never travels, so a
        # stable local order is enough.
        return b"\xff" + repr(value).encode("utf-8", "backslashreplace")


def supersedes(new: Entry, old: Entry) -> bool:
    """Whether `new` replaces `old` in the merge order (module doc, rules 1-4).

    Strict: an entry never supersedes itself or an identical copy.
    """
    new_ts = new.dot.ts
    old_ts = old.dot.ts
    if new_ts != old_ts:
        return new_ts > old_ts
    if isinstance(new, Value):
        if not isinstance(old, Value):
            return True
        if new.dot.node != old.dot.node:
            return new.dot.node > old.dot.node
        return new.value is not old.value and _canonical(new.value) > _canonical(old.value)
    if isinstance(old, Value):
        return False
    return new.dot.node > old.dot.node


def visible_change(old: Entry | None, new: Entry | None) -> bool:
    """Whether replacing `old` by `new` changes what a reader sees (presence or value).

    Values compare by canonical encoding, so ``1`` and ``True``, or ``0.0`` and ``-0.0``,
    count as different (they travel differently) and a rewrite of the same data does not.
    """
    if not isinstance(old, Value) or not isinstance(new, Value):
        return isinstance(old, Value) != isinstance(new, Value)
    return old.value is not new.value and _canonical(old.value) != _canonical(new.value)


#: How an entry is stored: an exact tuple of plain fields, ``(wall, logical, node)`` for a
#: tombstone and ``(wall, logical, node, value)`` for a value. CPython's collector stops
#: tracking such a tuple once it sees that every field is untracked (numbers, strings,
#: bytes, None), where a `Value` with its `Dot` and `Timestamp` is three tracked objects
#: per key for ever: with a million keys a full collection walked three million objects,
#: 629 ms during which the event loop stood still (bench/bigmap.py, issue 13). A value
#: that is itself a list or a map keeps its tuple tracked; that costs what it costs.
Packed = tuple[Any, ...]

#: The entries are spread over this many dicts by key hash. A dict grows by copying itself
#: whole, in one step: at 1.4 million keys that step took 43 ms on an idle machine and
#: 100 ms under load (bench/bigmap.py), time in which the event loop stands still. Spread
#: over 64 dicts, each copy is a 64th of that, at the cost of one hash per access and a few
#: kilobytes of empty tables for a small map.
SHARDS = 64
_SHARD_MASK = SHARDS - 1


def pack(entry: Entry) -> Packed:
    ts = entry.dot.ts
    if type(entry) is Value:
        return (ts.wall, ts.logical, entry.dot.node, entry.value)
    return (ts.wall, ts.logical, entry.dot.node)


def unpack(packed: Packed) -> Entry:
    dot = Dot(packed[2], Timestamp(packed[0], packed[1]))
    return Value(packed[3], dot) if len(packed) == 4 else Tombstone(dot)


def _packed_supersedes(new: Packed, old: Packed) -> bool:
    """`supersedes` on the stored form (the merge's inner loop: no objects built)."""
    if new[0] != old[0]:
        return bool(new[0] > old[0])
    if new[1] != old[1]:
        return bool(new[1] > old[1])
    if len(new) != len(old):
        return len(new) == 4  # same HLC: the value beats the tombstone
    if new[2] != old[2]:
        return bool(new[2] > old[2])
    if len(new) == 3:
        return False
    return new[3] is not old[3] and _canonical(new[3]) > _canonical(old[3])


class ORMap:
    """One replica's entries, mutable in place; reads are plain dict lookups.

    Visible reads (`get`, `keys`, `items`, `len`, `in`) see values only; `entry` and
    `entries` also show tombstones (built on demand from the stored form, `Packed`). Keys
    must be str, bytes or int and values plain CBOR data; entries from peers are checked
    by `trio_replica.ormap_wire.ingest`, local writes by their caller.
    """

    __slots__ = ("_count", "_live", "_shards")

    #: The entries, spread over `SHARDS` dicts by key hash (see `SHARDS`).
    _shards: tuple[dict[Key, Packed], ...]
    #: Count of stored entries and of visible values, so that len() is O(1).
    _count: int
    _live: int

    def __init__(self, entries: dict[Key, Entry] | None = None) -> None:
        self._shards = tuple({} for _ in range(SHARDS))
        self._count = self._live = 0
        for key, entry in (entries or {}).items():
            self.restore(key, entry)

    def _stored(self) -> Iterator[tuple[Key, Packed]]:
        for shard in self._shards:
            yield from shard.items()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ORMap):
            return NotImplemented
        return self._count == other._count and all(
            other._shards[hash(k) & _SHARD_MASK].get(k) == e for k, e in self._stored()
        )

    __hash__ = None  # type: ignore[assignment]

    # --- writes ---------------------------------------------------------------------------

    def merge_entry(self, key: Key, entry: Entry) -> bool:
        """Merge one entry; return whether it replaced the stored one (state changed)."""
        return self._merge_packed(key, pack(entry))

    def _merge_packed(self, key: Key, new: Packed) -> bool:
        shard = self._shards[hash(key) & _SHARD_MASK]
        old = shard.get(key)
        if old is not None and not _packed_supersedes(new, old):
            return False
        shard[key] = new
        self._count += old is None
        self._live += (len(new) == 4) - (old is not None and len(old) == 4)
        return True

    def restore(self, key: Key, entry: Entry | None) -> None:
        """Put back a key's earlier entry (or absence), bypassing the merge order.

        Only for undoing a local write that could not be made durable: it may move the
        state backwards, which a merge never does.
        """
        shard = self._shards[hash(key) & _SHARD_MASK]
        old = shard.pop(key, None)
        self._count -= old is not None
        self._live -= old is not None and len(old) == 4
        if entry is not None:
            packed = shard[key] = pack(entry)
            self._count += 1
            self._live += len(packed) == 4

    def add(self, key: Key, value: Any, dot: Dot) -> bool:
        """Write `value` under `key` with a freshly minted `dot`; True if it took effect."""
        return self.merge_entry(key, Value(value, dot))

    def remove(self, key: Key, dot: Dot) -> bool:
        """Remove `key` with a freshly minted `dot`; True if the tombstone took effect.

        The tombstone is stored even if the key is absent here: the add it cancels may still
        be on its way.
        """
        return self.merge_entry(key, Tombstone(dot))

    def merge(self, other: ORMap) -> list[Key]:
        """Merge every entry of `other` into this map (in place).

        Return the keys whose visible value changed, for change events.
        """
        changed: list[Key] = []
        shards = self._shards
        for key, new in other._stored():
            shard = shards[hash(key) & _SHARD_MASK]
            old = shard.get(key)
            if old is not None and not _packed_supersedes(new, old):
                continue
            shard[key] = new
            self._count += old is None
            self._live += (len(new) == 4) - (old is not None and len(old) == 4)
            if _packed_visible_change(old, new):
                changed.append(key)
        return changed

    def expired_tombstones(self, now_ms: int, ttl_ms: int) -> list[Key]:
        """Keys whose tombstone's HLC wall is more than `ttl_ms` before `now_ms`."""
        if self._count == self._live:
            return []
        horizon = now_ms - ttl_ms
        return [key for key, e in self._stored() if len(e) == 3 and e[0] < horizon]

    def gc_tombstones(self, now_ms: int, ttl_ms: int) -> int:
        """Drop tombstones whose HLC wall is more than `ttl_ms` before `now_ms`.

        Return how many were dropped. See the module doc for the resurrection caveat.
        """
        expired = self.expired_tombstones(now_ms, ttl_ms)
        for key in expired:
            self.restore(key, None)
        return len(expired)

    def absorb_clock(self, clock: HybridClock) -> None:
        """Move `clock` past the greatest HLC held here, e.g. after loading from disk, so
        that the next local write supersedes every stored entry.

        Raises `ClockSkewError` (clock unmoved) if that HLC is beyond the clock's skew
        bound: the local physical clock went back further than the bound allows.
        """
        if self._count:
            wall, logical = max((e[0], e[1]) for _, e in self._stored())
            clock.update(Timestamp(wall, logical))

    # --- reads ----------------------------------------------------------------------------

    def get(self, key: Key, default: Any = None) -> Any:
        e = self._shards[hash(key) & _SHARD_MASK].get(key)
        return e[3] if e is not None and len(e) == 4 else default

    def __getitem__(self, key: Key) -> Any:
        e = self._shards[hash(key) & _SHARD_MASK].get(key)
        if e is None or len(e) != 4:
            raise KeyError(key)
        return e[3]

    def __contains__(self, key: object) -> bool:
        try:
            e = self._shards[hash(key) & _SHARD_MASK].get(key)  # type: ignore[call-overload]
        except TypeError:  # unhashable: not a key
            return False
        return e is not None and len(e) == 4

    def __len__(self) -> int:
        return self._live

    def keys(self) -> Iterator[Key]:
        return (k for k, e in self._stored() if len(e) == 4)

    def items(self) -> Iterator[tuple[Key, Any]]:
        return ((k, e[3]) for k, e in self._stored() if len(e) == 4)

    def entry(self, key: Key) -> Entry | None:
        """The stored entry for `key` (value or tombstone), or None."""
        e = self._shards[hash(key) & _SHARD_MASK].get(key)
        return None if e is None else unpack(e)

    def key_slices(self, size: int) -> Iterator[list[Key]]:
        """Every key with a stored entry, in lists of at most `size`, taken from one shard
        at a time when the walk reaches it: no list of every key is ever built. A key
        added meanwhile may or may not be included."""
        for shard in self._shards:
            keys = list(shard)
            for start in range(0, len(keys), size):
                yield keys[start : start + size]

    def entries(self) -> Iterator[tuple[Key, Entry]]:
        """Every stored entry, tombstones included: what a full snapshot carries."""
        return ((k, unpack(e)) for k, e in self._stored())

    def wire_entries(self, keys: Iterable[Key]) -> list[tuple[Any, ...]]:
        """The wire form (`ormap_wire.to_wire`) of the entries stored under `keys` (absent
        keys skipped), straight from the stored form and as tuples, which encode the same
        and which the collector stops tracking too: a snapshot of a million keys is held
        for the whole sync."""
        out: list[tuple[Any, ...]] = []
        shards = self._shards
        for key in keys:
            e = shards[hash(key) & _SHARD_MASK].get(key)
            if e is None:
                continue
            if len(e) == 4:
                out.append((key, WIRE_VALUE, e[2], e[0], e[1], e[3]))
            else:
                out.append((key, WIRE_TOMBSTONE, e[2], e[0], e[1]))
        return out

    @property
    def tombstones(self) -> int:
        """How many tombstones are stored."""
        return self._count - self._live

    def copy(self) -> ORMap:
        """An independent map with the same entries (entries are immutable and shared)."""
        twin = ORMap()
        twin._shards = tuple(dict(shard) for shard in self._shards)
        twin._count, twin._live = self._count, self._live
        return twin

    def __repr__(self) -> str:
        return f"ORMap({dict(self.entries())!r})"


def _packed_visible_change(old: Packed | None, new: Packed) -> bool:
    if old is None or len(old) != 4 or len(new) != 4:
        return (old is not None and len(old) == 4) != (len(new) == 4)
    return old[3] is not new[3] and _canonical(old[3]) != _canonical(new[3])
