"""The replicated map's state: a last-writer-wins map with HLC dots and HLC tombstones.

This module owns the entries and their merge rule; `trio_replica.core.ormap_wire` owns their wire
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
On its own that lets a peer out of touch for longer than the TTL resurrect a key whose
remove was forgotten; `trio_replica.stores.maps.ReplicatedMap.before_sync` closes that gap (such
a peer drops its old entries before it syncs again).
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterable, Iterator
from typing import Any

import attrs
import cbor2

from .antientropy import FANOUT_BITS, LEAF_BITS, LEAF_LEVEL
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

_MASK64 = (1 << 64) - 1
#: Sums and counts are kept per leaf and per range of this level (256 ranges); the other
#: levels are summed from them when asked (at most 256 additions per range asked): two
#: updates per write instead of five.
_MID_LEVEL = 2
_MID_SHIFT = FANOUT_BITS * (LEAF_LEVEL - _MID_LEVEL)


# Where a key lives: every node puts a key in the same one of ``2**LEAF_BITS`` leaves (a
# CRC-32 of the key's bytes, `key_leaf`, not Python's per-process `hash`). Each leaf is a
# dict of its own, so (1) no dict ever grows by copying a big table in one step (at 1.4
# million keys one dict's growth took 43-100 ms, time in which the event loop stood
# still: bench/bigmap.py, issue 13), and (2) the digest (`core.antientropy`) can name a
# range of keys that means the same on every node and list it without walking the map.


def key_bytes(key: Key) -> bytes:
    """The bytes a key is hashed by, the same on every node (str, bytes or int; an int
    and the bool equal to it hash alike, as they are the same dict key)."""
    if isinstance(key, str):
        return key.encode("utf-8", "surrogatepass")
    if isinstance(key, bytes):
        return b"\x00b" + key
    return b"\x00i" + str(int(key)).encode()


def key_leaf(key: Key) -> int:
    """The leaf that holds `key` on every node."""
    return zlib.crc32(key_bytes(key)) >> (32 - LEAF_BITS)


def entry_hash(kb: bytes, packed: Packed) -> int:
    """A 64-bit hash of one stored entry: its key, dot, kind and value (the value by its
    canonical encoding, the form the merge order compares: two replicas that hold one dot
    with different values, which a node reusing its id after its clock went back can
    cause, differ in the digest too and settle by rule 4). A range's digest is the sum of
    these modulo 2**64, kept up to date by adding and subtracting one hash per change."""
    h = hashlib.blake2b(
        b"%b\0%d:%d:%d:%b\0"
        % (
            kb,
            packed[0],
            packed[1],
            len(packed),
            packed[2].encode("utf-8", "surrogatepass"),
        ),
        digest_size=8,
    )
    if len(packed) == 4:
        h.update(_canonical(packed[3]))
    return int.from_bytes(h.digest(), "little")


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
    by `trio_replica.core.ormap_wire.ingest`, local writes by their caller.

    Digest. The map keeps, for every range of the leaf tree (level ``l`` splits the
    ``2**LEAF_BITS`` leaves into ``16**l`` ranges by their leading bits), the count of
    entries in it and the sum of their `entry_hash` modulo 2**64, updated on every change.
    Two replicas whose sums differ in a range differ in it; equal sums mean equal entries
    there unless 64-bit hashes collide. `range_digests` reads them, `range_keys` lists a
    range's keys; anti-entropy compares ranges from the top and moves only the entries of
    the ranges that differ (`trio_replica.core.antientropy`).
    """

    __slots__ = ("_count", "_leaf_sums", "_leaves", "_live", "_mid_counts", "_mid_sums")

    #: The entries, one dict per non-empty leaf (see `LEAF_BITS`).
    _leaves: dict[int, dict[Key, Packed]]
    #: Digest sums per non-empty leaf, and sums and entry counts per non-empty range of
    #: `_MID_LEVEL` (a leaf's count is its dict's length).
    _leaf_sums: dict[int, int]
    _mid_sums: dict[int, int]
    _mid_counts: dict[int, int]
    #: Count of stored entries and of visible values, so that len() is O(1).
    _count: int
    _live: int

    def __init__(self, entries: dict[Key, Entry] | None = None) -> None:
        self._leaves = {}
        self._leaf_sums, self._mid_sums, self._mid_counts = {}, {}, {}
        self._count = self._live = 0
        for key, entry in (entries or {}).items():
            self.restore(key, entry)

    def _stored(self) -> Iterator[tuple[Key, Packed]]:
        for leaf in list(self._leaves.values()):
            yield from leaf.items()

    def _find(self, key: Key) -> Packed | None:
        leaf = self._leaves.get(key_leaf(key))
        return None if leaf is None else leaf.get(key)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ORMap):
            return NotImplemented
        return self._count == other._count and all(other._find(k) == e for k, e in self._stored())

    __hash__ = None  # type: ignore[assignment]

    # --- writes ---------------------------------------------------------------------------

    def _set(
        self, key: Key, new: Packed | None, kb: bytes | None = None, index: int = -1
    ) -> Packed | None:
        """Store `new` under `key` (None: drop the key) unconditionally and keep the counts
        and the digest; return what was stored before. `kb` and `index` are the key's
        bytes and leaf when the caller has them already."""
        if kb is None:
            kb = key_bytes(key)
            index = zlib.crc32(kb) >> (32 - LEAF_BITS)
        leaf = self._leaves.get(index)
        if leaf is None:
            if new is None:
                return None
            leaf = self._leaves[index] = {}
        old = leaf.get(key)
        if new is None:
            if old is None:
                return None
            del leaf[key]
        else:
            leaf[key] = new
        delta = (entry_hash(kb, new) if new is not None else 0) - (
            entry_hash(kb, old) if old is not None else 0
        )
        grown = (new is not None) - (old is not None)
        self._count += grown
        self._live += (new is not None and len(new) == 4) - (old is not None and len(old) == 4)
        mid = index >> _MID_SHIFT
        mid_count = self._mid_counts.get(mid, 0) + grown
        if mid_count:
            self._mid_counts[mid] = mid_count
            self._mid_sums[mid] = (self._mid_sums.get(mid, 0) + delta) & _MASK64
        else:
            self._mid_counts.pop(mid, None)
            self._mid_sums.pop(mid, None)
        if leaf:
            self._leaf_sums[index] = (self._leaf_sums.get(index, 0) + delta) & _MASK64
        else:
            del self._leaves[index]
            self._leaf_sums.pop(index, None)
        return old

    def merge_entry(self, key: Key, entry: Entry) -> bool:
        """Merge one entry; return whether it replaced the stored one (state changed)."""
        return self._merge_packed(key, pack(entry))

    def _merge_packed(self, key: Key, new: Packed) -> bool:
        kb = key_bytes(key)
        index = zlib.crc32(kb) >> (32 - LEAF_BITS)
        leaf = self._leaves.get(index)
        old = None if leaf is None else leaf.get(key)
        if old is not None and not _packed_supersedes(new, old):
            return False
        self._set(key, new, kb, index)
        return True

    def restore(self, key: Key, entry: Entry | None) -> None:
        """Put back a key's earlier entry (or absence), bypassing the merge order.

        Only for undoing a local write that could not be made durable: it may move the
        state backwards, which a merge never does.
        """
        self._set(key, None if entry is None else pack(entry))

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
        for key, new in other._stored():
            old = self._find(key)
            if old is not None and not _packed_supersedes(new, old):
                continue
            self._set(key, new)
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

        Return how many were dropped. See the module doc on resurrection.
        """
        expired = self.expired_tombstones(now_ms, ttl_ms)
        for key in expired:
            self._set(key, None)
        return len(expired)

    def absorb_clock(self, clock: HybridClock) -> None:
        """Move `clock` past the greatest HLC held here, after loading from disk, so that
        the next local write supersedes every stored entry.

        Without the skew bound (`HybridClock.resume`): what the node's store holds is its
        own, even when its wall clock has since been stepped back further than the bound.
        """
        if self._count:
            wall, logical = max((e[0], e[1]) for _, e in self._stored())
            clock.resume(Timestamp(wall, logical))

    # --- reads ----------------------------------------------------------------------------

    def get(self, key: Key, default: Any = None) -> Any:
        e = self._find(key)
        return e[3] if e is not None and len(e) == 4 else default

    def __getitem__(self, key: Key) -> Any:
        e = self._find(key)
        if e is None or len(e) != 4:
            raise KeyError(key)
        return e[3]

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str | bytes | int):
            return False
        e = self._find(key)
        return e is not None and len(e) == 4

    def __len__(self) -> int:
        return self._live

    def keys(self) -> Iterator[Key]:
        return (k for k, e in self._stored() if len(e) == 4)

    def items(self) -> Iterator[tuple[Key, Any]]:
        return ((k, e[3]) for k, e in self._stored() if len(e) == 4)

    def entry(self, key: Key) -> Entry | None:
        """The stored entry for `key` (value or tombstone), or None."""
        e = self._find(key)
        return None if e is None else unpack(e)

    def key_slices(self, size: int) -> Iterator[list[Key]]:
        """Every key with a stored entry, in lists of at most `size`, taken leaf by leaf
        as the walk reaches them: no list of every key is ever built. A key added
        meanwhile may or may not be included."""
        return self.range_keys(0, 0, size)

    def range_keys(self, level: int, index: int, size: int) -> Iterator[list[Key]]:
        """The keys stored in range `index` of `level`, in lists of at most `size`, taken
        leaf by leaf as the walk reaches them (a key added meanwhile may or may not be
        included)."""
        shift = FANOUT_BITS * (LEAF_LEVEL - level)
        first, end = index << shift, (index + 1) << shift
        leaves = self._leaves
        batch: list[Key] = []
        if end - first > len(leaves):
            # A wide range of a sparse map: walk the leaves that exist, in order.
            indexes: Iterable[int] = sorted(i for i in leaves if first <= i < end)
        else:
            indexes = range(first, end)
        for i in indexes:
            leaf = leaves.get(i)
            if not leaf:
                continue
            batch.extend(leaf)
            while len(batch) >= size:
                yield batch[:size]
                batch = batch[size:]
        if batch:
            yield batch

    def range_digest(self, level: int, index: int) -> tuple[int, int]:
        """``(sum, count)`` of range `index` of `level` (``0, 0`` when it holds nothing)."""
        if level == LEAF_LEVEL:
            return self._leaf_sums.get(index, 0), len(self._leaves.get(index, ()))
        if level == _MID_LEVEL:
            return self._mid_sums.get(index, 0), self._mid_counts.get(index, 0)
        if level < _MID_LEVEL:
            sums, counts, shift = self._mid_sums, self._mid_counts, _MID_SHIFT
        else:
            sums, counts, shift = self._leaf_sums, None, 0
        width = FANOUT_BITS * (LEAF_LEVEL - level) - shift
        first = index << width
        total = count = 0
        for i in range(first, first + (1 << width)):
            part = sums.get(i)
            if part is not None:
                total += part
                count += counts[i] if counts is not None else len(self._leaves[i])
        return total & _MASK64, count

    def range_digests(self, level: int, indexes: Iterable[int]) -> list[tuple[int, int, int]]:
        """``(index, sum, count)`` of each of `indexes` at `level`."""
        return [(i, *self.range_digest(level, i)) for i in indexes]

    def child_digests(self, level: int, index: int) -> list[tuple[int, int, int]]:
        """``(index, sum, count)`` of the non-empty ranges of ``level + 1`` inside range
        `index` of `level`."""
        first = index << FANOUT_BITS
        out = []
        for i in range(first, first + (1 << FANOUT_BITS)):
            total, count = self.range_digest(level + 1, i)
            if count:
                out.append((i, total, count))
        return out

    def entries(self) -> Iterator[tuple[Key, Entry]]:
        """Every stored entry, tombstones included: what a full snapshot carries."""
        return ((k, unpack(e)) for k, e in self._stored())

    def wire_entries(self, keys: Iterable[Key]) -> list[tuple[Any, ...]]:
        """The wire form (`ormap_wire.to_wire`) of the entries stored under `keys` (absent
        keys skipped), straight from the stored form and as tuples, which encode the same
        and which the collector stops tracking too: a snapshot of a million keys is held
        for the whole sync."""
        out: list[tuple[Any, ...]] = []
        find = self._find
        for key in keys:
            e = find(key)
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
        twin._leaves = {i: dict(leaf) for i, leaf in self._leaves.items()}
        twin._leaf_sums = dict(self._leaf_sums)
        twin._mid_sums, twin._mid_counts = dict(self._mid_sums), dict(self._mid_counts)
        twin._count, twin._live = self._count, self._live
        return twin

    def __repr__(self) -> str:
        return f"ORMap({dict(self.entries())!r})"


def _packed_visible_change(old: Packed | None, new: Packed) -> bool:
    if old is None or len(old) != 4 or len(new) != 4:
        return (old is not None and len(old) == 4) != (len(new) == 4)
    return old[3] is not new[3] and _canonical(old[3]) != _canonical(new[3])
