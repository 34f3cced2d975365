"""Messages as positional lists: the plain form that `trio_replica.core.wire` encodes.

A message goes on the wire as ``[KIND, field, ...]`` with its value objects (message ids,
peers) as nested arrays; the kinds sent most often have hand-written forms.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .messages import Gossip, IHave, Message, MessageId, Peer, Ping


def message_fields(message: Message) -> list[Any]:
    """The positional form of a message: ``[KIND, *fields]`` in declaration order."""
    return [message.KIND, *(getattr(message, a.name) for a in message.__attrs_attrs__)]  # type: ignore[attr-defined]


def _plain(value: Any) -> Any:
    """A field value with our value objects (and tuples of them) as positional arrays."""
    t = type(value)
    if t is MessageId:
        return [value.origin, value.stamp, value.nonce]
    if t is Peer:
        return [value.id, value.address]
    if t is tuple or t is list:
        return [_plain(x) for x in value]
    return value


def positional(message: Message) -> list[Any]:
    """Any message as nested plain lists: the generic path of `encode_message`."""
    return [message.KIND, *(_plain(v) for v in message_fields(message)[1:])]


def _gossip_positional(m: Gossip) -> list[Any]:
    i = m.id
    return [
        Gossip.KIND,
        [i.origin, i.stamp, i.nonce],
        m.round,
        m.tag,
        m.payload,
        m.own_tree,
        m.signature,
    ]


def _ihave_positional(m: IHave) -> list[Any]:
    return [
        IHave.KIND,
        [[[i.origin, i.stamp, i.nonce], r, t] for i, r, t in m.entries],
        list(m.tags),
    ]


def _ping_positional(m: Ping) -> list[Any]:
    return [Ping.KIND, m.nonce, m.lag_ms]


#: Hand-written positional forms of the kinds sent per broadcast or per idle second; they
#: give exactly the bytes of the generic form (tests/test_hot_paths.py checks) at a fraction
#: of its cost. Every kind is encoded from plain lists: a cbor2 `default` hook called back
#: into Python for each value object and cost 7 us per gossip instead of under 2.
POSITIONAL: dict[type[Message], Callable[[Any], list[Any]]] = {
    Gossip: _gossip_positional,
    IHave: _ihave_positional,
    Ping: _ping_positional,
}
