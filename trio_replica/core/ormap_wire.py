"""OR-Map entries on the wire, and the validation every entry from a peer passes first.

This module owns the plain-data form of deltas and snapshots (`to_wire`, `from_wire`) and
`ingest`, the one door through which entries from peers reach an `ORMap` and its clock.
It is sans-IO; the byte encoding is `trio_replica.core.wire.encode_payload` / `decode_payload`.

Wire form. A delta is a CBOR array of entries; a snapshot is a delta holding every entry,
tombstones included (a snapshot never implies that a missing key was removed). Entries are
positional arrays, so keys of any allowed type (str, bytes, int) travel unchanged:

* value:     ``[key, 1, node, wall, logical, value]``
* tombstone: ``[key, 0, node, wall, logical]``

`wall` and `logical` are the dot's HLC fields as two integers (each fits CBOR's 64 bits;
the packed form would not). `value` is plain CBOR data.

Why validate (the seed's "wire safety" note): barrel_p2p merges entries straight off gossip,
and one malformed dot, HLC or payload crashes the merge or the shared clock server. Here
`ingest` checks every field of every entry before anything is merged, rejects bad entries
one by one (the rest of the delta still applies), and lets only accepted entries move the
clock (SPEC section 7, "wire validation before any merge").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
import cbor2

from ..errors import MessageTooLarge, WireError
from .hlc import ClockExhausted, ClockSkewError, HybridClock, InvalidTimestamp, Timestamp
from .messages import MAX_NODE_ID, U64
from .ormap import WIRE_TOMBSTONE as _TOMBSTONE
from .ormap import WIRE_VALUE as _VALUE
from .ormap import Dot, Entry, Key, ORMap, Tombstone, Value, supersedes, visible_change

_INT_MIN = -(2**64)

#: Signature of a per-value validator: ``validator(key, value)``; a false result or an
#: exception rejects that entry only.
Validator = Callable[[Key, Any], object]


@attrs.frozen
class Limits:
    """Bounds on what one delta may carry; all sizes in bytes of CBOR encoding.

    `max_value_depth` counts nested arrays and maps inside a value. It stays well under the
    payload decoder's limit (`wire.PAYLOAD_MAX_DEPTH`, 32) because a value travels inside a
    delta inside the replica's envelope: a value deeper than that could be written locally
    and then refused by every peer's decoder.
    """

    #: Entries per delta; a snapshot is chunked by its sender to stay under this.
    max_entries: int = 65_536
    #: Encoded size of a key: keys are identifiers, not data.
    max_key_bytes: int = 1024
    #: Encoded size of one value; a delta carrying it must still fit one payload.
    max_value_bytes: int = 64 * 1024
    max_value_depth: int = 16
    max_node_id: int = MAX_NODE_ID


DEFAULT_LIMITS = Limits()


@attrs.frozen
class Rejection:
    """One refused entry: its position in the delta, its key when that was readable, a
    stable `reason` token (``shape``, ``kind``, ``key``, ``node``, ``hlc``, ``skew``,
    ``value``, ``validator``, ``clock``, ``signature``) for counters, and a `detail` for
    the log."""

    index: int
    key: Key | None
    reason: str
    detail: str


@attrs.frozen
class IngestResult:
    """What `ingest` did.

    `changed_keys`: keys whose visible value changed (appeared, disappeared, or now hold
    different data), each once, for change events. `applied`: accepted entries that
    replaced the stored entry (tombstone updates included). `rejected`: refused entries.
    """

    changed_keys: tuple[Key, ...]
    applied: int
    rejected: tuple[Rejection, ...]
    #: Keys whose stored entry was replaced (what a persistent store must write).
    applied_keys: tuple[Key, ...] = ()
    #: The writer's signature each applied entry carried (empty: none).
    signatures: dict[Key, bytes] = attrs.field(factory=dict)
    #: The entry each applied key held before (None: absent), to undo a local write.
    replaced: dict[Key, Entry | None] = attrs.field(factory=dict)


class _Rejected(Exception):
    """Internal: one entry failed a check (never escapes this module)."""

    def __init__(
        self, reason: str, detail: str, key: Key | None = None, *, too_large: bool = False
    ) -> None:
        super().__init__(detail)
        self.too_large = too_large
        self.reason = reason
        self.detail = detail
        self.key = key


# --- encoding ------------------------------------------------------------------------------


def to_wire(
    entries: Iterable[tuple[Key, Entry]], signatures: Mapping[Key, bytes] | None = None
) -> list[list[Any]]:
    """The plain-data form of entries (a delta, or a snapshot if given every entry); an
    entry whose key has a signature in `signatures` carries it as a last field."""
    out: list[list[Any]] = []
    for key, entry in entries:
        dot = entry.dot
        if isinstance(entry, Value):
            item = [key, _VALUE, dot.node, dot.ts.wall, dot.ts.logical, entry.value]
        else:
            item = [key, _TOMBSTONE, dot.node, dot.ts.wall, dot.ts.logical]
        if signatures and (signature := signatures.get(key)):
            item.append(signature)
        out.append(item)
    return out


#: Length of an entry's signature by its writer (Ed25519).
ENTRY_SIGNATURE_BYTES = 64


def signed_entry_bytes(cluster: str, name: str, key: Key, entry: Entry) -> bytes:
    """What a writer signs for one entry of map `name` in `cluster`: the cluster, the map,
    the key, the dot and kind, and the value in canonical CBOR, so that no part can be
    swapped for another's (nor the entry replayed into another cluster using the key)."""
    dot = entry.dot
    kind = _VALUE if isinstance(entry, Value) else _TOMBSTONE
    fields = [cluster, name, key, kind, dot.node, dot.ts.wall, dot.ts.logical]
    head = cbor2.dumps(fields, canonical=True)
    body = cbor2.dumps(entry.value, canonical=True) if isinstance(entry, Value) else b""
    return b"trio_replica entry v1\0" + len(head).to_bytes(4, "big") + head + body


def from_wire(raw: Any, *, limits: Limits = DEFAULT_LIMITS) -> list[tuple[Key, Entry]]:
    """Parse a delta all-or-nothing: raise `WireError` at the first malformed entry.

    For data this node wrote itself (its own persisted state). It does not check clock
    skew and runs no validator: entries from peers go through `ingest`.
    """
    return [(key, entry) for key, entry, _ in from_wire_signed(raw, limits=limits)]


def from_wire_signed(
    raw: Any, *, limits: Limits = DEFAULT_LIMITS
) -> list[tuple[Key, Entry, bytes]]:
    """`from_wire`, keeping each entry's signature (empty when it has none)."""
    out = []
    for index, raw_entry in enumerate(_check_delta(raw, limits)):
        try:
            out.append(_parse_entry(raw_entry, limits))
        except _Rejected as exc:
            raise WireError(f"entry {index}: {exc.detail}", reason="field") from None
    return out


# --- validation ----------------------------------------------------------------------------


def check_delta(raw: Any, limits: Limits = DEFAULT_LIMITS) -> list[Any] | tuple[Any, ...]:
    """The entries of a delta, or `WireError` if it is not an array or has too many."""
    return _check_delta(raw, limits)


def _check_delta(raw: Any, limits: Limits) -> list[Any] | tuple[Any, ...]:
    if type(raw) is not list and type(raw) is not tuple:
        raise WireError("a delta must be an array of entries", reason="shape")
    if len(raw) > limits.max_entries:
        raise WireError(
            f"delta has {len(raw)} entries, the limit is {limits.max_entries}", reason="too_large"
        )
    return raw


def _parse_entry(raw: Any, limits: Limits) -> tuple[Key, Entry, bytes]:
    """Check one entry's shape and every field; raise `_Rejected` on the first fault.

    Returns the key, the entry, and the writer's signature (empty if it carries none)."""
    if (type(raw) is not list and type(raw) is not tuple) or len(raw) < 2:
        raise _Rejected("shape", "entry must be an array [key, kind, node, wall, logical, ...]")
    kind = raw[1]
    if type(kind) is not int or (kind != _VALUE and kind != _TOMBSTONE):
        raise _Rejected("kind", f"entry kind must be 0 or 1, got {_describe(kind)}")
    fields = 6 if kind == _VALUE else 5
    if len(raw) not in (fields, fields + 1):
        raise _Rejected("shape", f"entry of kind {kind} has {len(raw)} fields")
    key = _check_key(raw[0], limits)
    signature = b""
    if len(raw) == fields + 1:
        signature = raw[fields]
        if type(signature) is not bytes or len(signature) != ENTRY_SIGNATURE_BYTES:
            raise _Rejected("signature", "an entry's signature is 64 bytes", key)
    node = raw[2]
    if type(node) is not str or not 0 < len(node) <= limits.max_node_id or not _utf8(node):
        raise _Rejected("node", f"node id must be 1-{limits.max_node_id} characters", key)
    try:
        dot = Dot(node, Timestamp(raw[3], raw[4]))
    except InvalidTimestamp as exc:
        raise _Rejected("hlc", str(exc), key) from None
    if kind == _TOMBSTONE:
        return key, Tombstone(dot), signature
    value = raw[5]
    _check_value(value, key, limits)
    return key, Value(value, dot), signature


def _utf8(text: str) -> bool:
    # A str built locally may hold lone surrogates, which no peer could decode.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_key(key: Any, limits: Limits) -> Key:
    kind = type(key)
    if kind is str:
        try:
            size = len(key.encode("utf-8"))
        except UnicodeEncodeError:
            raise _Rejected("key", "key is not valid UTF-8") from None
    elif kind is bytes:
        size = len(key)
    elif kind is int:
        if not _INT_MIN <= key <= U64:
            raise _Rejected("key", "integer key must fit in 64 bits")
        return key  # type: ignore[no-any-return]
    else:
        raise _Rejected("key", f"key must be str, bytes or int, not {kind.__name__}")
    if size > limits.max_key_bytes:
        raise _Rejected(
            "key", f"key is {size} bytes, the limit is {limits.max_key_bytes}", too_large=True
        )
    return key  # type: ignore[no-any-return]


_SCALARS = (type(None), bool, float, str, bytes)


def _check_value(value: Any, key: Key, limits: Limits) -> None:
    """Plain CBOR data only (what `wire.encode_payload` accepts, with exact types, so no
    subclass can run code here), bounded in depth and in encoded size."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        t = type(v)
        if t in _SCALARS:
            continue
        if t is int:
            if not _INT_MIN <= v <= U64:
                raise _Rejected("value", "integers must fit in 64 bits", key)
            continue
        if t is not list and t is not tuple and t is not dict:
            raise _Rejected("value", f"value holds a {t.__name__}, which is not plain data", key)
        if depth >= limits.max_value_depth:
            raise _Rejected("value", f"value nests deeper than {limits.max_value_depth}", key)
        if t is dict:
            for k in v:
                if type(k) is not str and type(k) is not bytes:
                    raise _Rejected("value", "map keys inside a value must be str or bytes", key)
            stack.extend((x, depth + 1) for x in v.values())
        else:
            stack.extend((x, depth + 1) for x in v)
    try:
        size = len(cbor2.dumps(value))
    except (cbor2.CBOREncodeError, ValueError, TypeError, OverflowError) as exc:
        raise _Rejected("value", f"value is not encodable: {exc}", key) from None
    if size > limits.max_value_bytes:
        raise _Rejected(
            "value",
            f"value is {size} bytes, the limit is {limits.max_value_bytes}",
            key,
            too_large=True,
        )


def check_local_entry(key: Any, value: Any, limits: Limits = DEFAULT_LIMITS) -> None:
    """Check a local write with the rules every peer applies to it, before it is made.

    Raises `TypeError` for a key or value that is not plain data and `MessageTooLarge`
    for one beyond `limits`: a write that peers would reject must fail for its writer.
    """
    try:
        key = _check_key(key, limits)
        _check_value(value, key, limits)
    except _Rejected as exc:
        if exc.too_large:
            raise MessageTooLarge(exc.detail) from None
        raise TypeError(exc.detail) from None


# --- ingest --------------------------------------------------------------------------------


def ingest(
    local: ORMap,
    incoming: Any,
    clock: HybridClock,
    *,
    validator: Validator | None = None,
    limits: Limits = DEFAULT_LIMITS,
    authenticate: Callable[[Key, Entry, bytes], bool] | None = None,
    required: bool = True,
    own: bool = False,
) -> IngestResult:
    """Validate a delta or snapshot from a peer and merge what passes into `local`, in place.

    `incoming` is the decoded plain data (`wire.decode_payload` output). Every entry is
    checked before any is merged: shape, field types and ranges, key and value size, node
    id, HLC range, the clock's skew bound (a far-future entry is refused and counted in
    `clock.rejected`), then `validator(key, value)` for values. A bad entry is rejected
    alone; the others still apply. Then the clock absorbs the greatest accepted HLC, so
    only accepted entries move it, and the accepted entries are merged.

    Raises `WireError` only when `incoming` as a whole is unusable (not an array, too many
    entries); in that case nothing changed. No other exception escapes, except what the
    validator raises that is not an `Exception` (cancellation, KeyboardInterrupt).

    `authenticate(key, entry, signature)` checks an entry's writer signature (empty if it
    has none). With `required`, an entry it refuses is refused (``signature``); without,
    the entry is taken and only its signature dropped (a node that signs but does not
    require must not pass on signatures it could not check). Entries that cannot replace
    the stored one are not checked: a digest range that differs re-sends entries already
    held, and each check costs tens of microseconds.

    `own`: the entries are this node's writes, their dots minted by `clock` itself; the
    skew bound is for peers, and the clock is past them already. (A clock ahead of its
    physical clock by more than the bound, after a step back, still writes here.)
    """
    raw_entries = _check_delta(incoming, limits)
    physical = clock.read_physical()
    accepted: list[tuple[int, Key, Entry, bytes]] = []
    rejected: list[Rejection] = []
    for index, raw_entry in enumerate(raw_entries):
        try:
            key, entry, signature = _parse_entry(raw_entry, limits)
            if authenticate is not None:
                stored = local.entry(key)
                if (stored is None or supersedes(entry, stored)) and not authenticate(
                    key, entry, signature
                ):
                    if required:
                        what = "a bad signature" if signature else "no signature"
                        raise _Rejected("signature", f"entry of {entry.dot.node} with {what}", key)
                    signature = b""
            try:
                if not own:
                    clock.check(entry.dot.ts, physical=physical)
            except ClockSkewError as exc:
                raise _Rejected("skew", str(exc), key) from None
            if validator is not None and isinstance(entry, Value):
                _run_validator(validator, key, entry.value)
        except _Rejected as exc:
            rejected.append(Rejection(index, exc.key, exc.reason, exc.detail))
            continue
        accepted.append((index, key, entry, signature))
    if not accepted:
        return IngestResult((), 0, tuple(rejected))

    try:
        # Same physical reading as the checks above, so the skew check cannot fail here.
        if not own:
            clock.update(max(entry.dot.ts for _, _, entry, _ in accepted), physical=physical)
    except ClockExhausted as exc:
        # Only when the local clock is at the end of its range: nothing can be absorbed.
        rejected.extend(Rejection(i, k, "clock", str(exc)) for i, k, _, _ in accepted)
        return IngestResult((), 0, tuple(rejected))

    before: dict[Key, Entry | None] = {}
    # The signature of the entry each replaced key holds now: the last one that won.
    won: dict[Key, bytes] = {}
    applied = 0
    for _, key, entry, signature in accepted:
        old = local.entry(key)
        if local.merge_entry(key, entry):
            applied += 1
            before.setdefault(key, old)
            won[key] = signature
    changed = tuple(k for k, old in before.items() if visible_change(old, local.entry(k)))
    return IngestResult(
        changed,
        applied,
        tuple(rejected),
        tuple(before),
        {k: s for k, s in won.items() if s},
        before,
    )


def _run_validator(validator: Validator, key: Key, value: Any) -> None:
    try:
        ok = bool(validator(key, value))
    except Exception as exc:
        # The validator is application code: whatever it raises rejects this one entry,
        # is reported with the rejection, and never reaches the merge.
        raise _Rejected("validator", f"validator raised {_exception_text(exc)}", key) from None
    if not ok:
        raise _Rejected("validator", "validator refused the value", key)


def _exception_text(exc: Exception) -> str:
    name = type(exc).__name__
    try:
        return f"{name}: {exc}"[:200]
    except Exception:
        # An application exception whose __str__ itself fails: its type name must do.
        return name


def _describe(value: object) -> str:
    """Name an offending field without running its repr (size, or code, is unbounded)."""
    if type(value) is int:
        return str(value) if value.bit_length() <= 96 else f"a {value.bit_length()}-bit integer"
    return f"a {type(value).__name__}"
