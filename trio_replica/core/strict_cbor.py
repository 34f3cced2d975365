"""Strict CBOR decoding: one item from bytes a peer sent, under rules that trust nothing.

cbor2 runs with a small `max_depth`, no indefinite lengths, no duplicate map keys, only text
or byte map keys, and every semantic tag refused (dates, bignums, regexes, MIME, shared
values, string refs); trailing bytes are refused, and so is anything but plain data (no
simple values, no `undefined`). Anything wrong raises `WireError` with reason ``"cbor"``.
`trio_replica.core.wire` decodes frames and payloads under these rules.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable
from typing import Any, NoReturn

import cbor2

from ..errors import WireError


class _RefuseAllTags(dict[int, Callable[[Any], Any]]):
    """A `semantic_decoders` table that answers every tag number with a refusal.

    cbor2 consults this mapping for the tags it knows (0-55799); `refuse_tag_hook` catches
    the rest. Refusing them all removes dates, bignums, regex and MIME parsing, shared and
    cyclic values and string references from what a peer can make us build.
    """

    def __contains__(self, tag: object) -> bool:
        return True

    def get(self, tag: int, default: Any = None) -> Callable[[Any], Any]:
        return self[tag]

    def __getitem__(self, tag: int) -> Callable[[Any], Any]:
        def refuse(_decoder: Any) -> NoReturn:
            raise cbor2.CBORDecodeError(f"semantic tag {tag} is not allowed")

        return refuse


#: The tag table and hook of every strict decoder: `strict_loads` here, and the decoder
#: `wire.decode_frame` builds to read a frame message by message.
REFUSE_TAGS = _RefuseAllTags()


def refuse_tag_hook(_decoder: Any, tag: Any) -> NoReturn:
    raise cbor2.CBORDecodeError(f"semantic tag {tag.tag} is not allowed")


def strict_loads(data: bytes, *, max_depth: int) -> Any:
    """Decode one CBOR item under the hardened rules; raise `WireError` on anything else."""
    fp = io.BytesIO(data)
    try:
        decoder = cbor2.CBORDecoder(
            fp,
            semantic_decoders=REFUSE_TAGS,
            tag_hook=refuse_tag_hook,
            max_depth=max_depth,
            allow_indefinite=False,
            allow_duplicate_keys=False,
            strict_hashable_types=True,
        )
        value = decoder.decode()
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise WireError(f"invalid CBOR: {exc}", reason="cbor") from None
    except EOFError:
        raise WireError("truncated CBOR", reason="cbor") from None
    if fp.tell() != len(data):
        raise WireError(f"{len(data) - fp.tell()} trailing bytes after CBOR item", reason="cbor")
    check_plain(value)
    return value


#: What the hardened decoder may give back besides lists and dicts (exact types: cbor2 builds
#: no subclasses of these, and a simple value or `undefined` is none of them).
_PLAIN_SCALARS = frozenset((type(None), bool, int, str, bytes, float))


def check_plain(value: Any) -> None:
    """Refuse CBOR simple values and `undefined`: only JSON-like data plus bytes is allowed.

    Called on every message of every frame: scalars are checked where they are found
    instead of being pushed on the stack, and only containers are walked.
    """
    scalars = _PLAIN_SCALARS
    stack = [value]
    while stack:
        v = stack.pop()
        t = type(v)
        if t is list:
            items: Iterable[Any] = v
        elif t is dict:
            items = v.values()
        elif t in scalars:
            continue
        else:
            _not_plain(v)
        for x in items:
            tx = type(x)
            if tx in scalars:
                continue
            if tx is list or tx is dict:
                stack.append(x)
            else:
                _not_plain(x)


def _not_plain(v: Any) -> NoReturn:
    raise WireError(f"CBOR value of type {type(v).__name__} is not allowed", reason="cbor")
