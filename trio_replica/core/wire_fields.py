"""Field checks: the type and range of each field of a message decoded from a peer.

Each check returns the field when it is valid and raises `WireError` with reason ``"field"``
otherwise; the compound ones check message ids, IHave entries and whole digest rounds.
`trio_replica.core.wire` applies them kind by kind, and checks there the addresses and peers
that a node later dials (`wire.check_address`).
"""

from __future__ import annotations

from typing import Any, NoReturn

from ..errors import WireError
from .messages import (
    MAX_DIGEST_LEVEL,
    MAX_DIGEST_PARENTS,
    MAX_DIGESTS,
    MAX_IHAVE_ENTRIES,
    MAX_NODE_ID,
    MAX_ROUND,
    MAX_TAG,
    MAX_WANTS,
    U64,
    IHave,
    MessageId,
    SyncDigest,
    valid_node_id,
)


def fail_field(what: str) -> NoReturn:
    raise WireError(what, reason="field")


def check_int(v: Any, lo: int, hi: int, name: str) -> int:
    # bool is an int subclass in Python; it is never a valid integer field here.
    if type(v) is not int or not lo <= v <= hi:
        fail_field(f"{name} must be an integer in [{lo}, {hi}], got {v!r:.60}")
    return v


def check_bool(v: Any, name: str) -> bool:
    if type(v) is not bool:
        fail_field(f"{name} must be a boolean, got {v!r:.60}")
    return v


def check_str(v: Any, max_len: int, name: str, *, allow_empty: bool = False) -> str:
    if type(v) is not str or len(v) > max_len or (not v and not allow_empty):
        article = "a" if allow_empty else "a non-empty"
        fail_field(f"{name} must be {article} string of at most {max_len} characters")
    return v


def check_node_id(v: Any, name: str, *, allow_empty: bool = False) -> str:
    node_id = check_str(v, MAX_NODE_ID, name, allow_empty=allow_empty)
    if node_id and not valid_node_id(node_id):
        fail_field(f"{name} {node_id!r:.60} is not a node id (printable, no space or '#')")
    return node_id


def check_bytes(v: Any, max_len: int, name: str) -> bytes:
    if type(v) is not bytes or len(v) > max_len:
        fail_field(f"{name} must be a byte string of at most {max_len} bytes")
    return v


def check_list(v: Any, max_len: int, name: str) -> list[Any]:
    if type(v) is not list or len(v) > max_len:
        fail_field(f"{name} must be an array of at most {max_len} items")
    return v


def check_fixed_bytes(v: Any, size: int, name: str) -> bytes:
    if type(v) is not bytes or len(v) != size:
        fail_field(f"{name} must be exactly {size} bytes")
    return v


def check_message_id(v: Any) -> MessageId:
    if type(v) is not list or len(v) != 3:
        fail_field("message id must be [origin, stamp, nonce]")
    return MessageId(
        check_node_id(v[0], "message id origin"),
        check_int(v[1], 0, U64, "message id stamp"),
        check_int(v[2], 0, U64, "message id nonce"),
    )


def check_ihave(entries: Any, tags: Any) -> IHave:
    """An `IHave` from its two fields: every tag used, in range, and listed once."""
    names = tuple(
        check_str(t, MAX_TAG, "ihave tag")
        for t in check_list(tags, MAX_IHAVE_ENTRIES, "ihave tags")
    )
    if len(set(names)) != len(names):
        fail_field("ihave tags must be distinct")
    out = []
    used = [False] * len(names)
    for e in check_list(entries, MAX_IHAVE_ENTRIES, "ihave entries"):
        if type(e) is not list or len(e) != 3:
            fail_field("ihave entry must be [id, round, tag index]")
        if type(e[2]) is not int or not 0 <= e[2] < len(names):
            fail_field("ihave tag index out of range")
        used[e[2]] = True
        out.append((check_message_id(e[0]), check_int(e[1], 0, MAX_ROUND, "round"), e[2]))
    if not all(used):
        fail_field("ihave tag listed but not used")
    return IHave(tuple(out), names)


def check_digest_round(f: list[Any]) -> SyncDigest:
    """A `SyncDigest` from its positional fields; index bounds follow the round's level."""
    level = check_int(f[2], 1, MAX_DIGEST_LEVEL, "level")
    parent_limit = 16 ** (level - 1) - 1
    parents = tuple(
        check_int(p, 0, parent_limit, "parent")
        for p in check_list(f[3], MAX_DIGEST_PARENTS, "parents")
    )
    digests = []
    for d in check_list(f[4], MAX_DIGESTS, "digests"):
        if type(d) is not list or len(d) != 3:
            fail_field("digest must be [index, sum, count]")
        digests.append(
            (
                check_int(d[0], 0, 16**level - 1, "digest index"),
                check_int(d[1], 0, U64, "digest sum"),
                check_int(d[2], 1, U64, "digest count"),
            )
        )
    want = []
    for w in check_list(f[5], MAX_WANTS, "want"):
        if type(w) is not list or len(w) != 2:
            fail_field("wanted range must be [level, index]")
        want_level = check_int(w[0], 1, MAX_DIGEST_LEVEL, "wanted level")
        want.append((want_level, check_int(w[1], 0, 16**want_level - 1, "wanted index")))
    return SyncDigest(
        check_str(f[0], MAX_TAG, "name"),
        check_int(f[1], 0, U64, "session"),
        level,
        parents,
        tuple(digests),
        tuple(want),
    )
