"""Events a node hands to its subscribers: membership changes, deliveries, notices.

All are frozen value objects, created by the sans-IO cores (membership, broadcast) or by the
runtime (`Resubscribed`), and read by applications through `node.events()` and
`node.subscribe(tag)`.
"""

from __future__ import annotations

import enum
from typing import Any

import attrs

from .messages import MessageId, Peer


class Event:
    """Base class of every event."""

    __slots__ = ()


class DownReason(enum.Enum):
    """Why a peer left the active view.

    FAILED: the link broke or timed out (the peer may be dead);
    LEFT: the peer said it is leaving the cluster (graceful leave);
    EVICTED: the peer is alive but one of us dropped the other from the active view to make room.
    """

    FAILED = "failed"
    LEFT = "left"
    EVICTED = "evicted"


@attrs.frozen
class PeerUp(Event):
    """`peer` entered this node's active view (a symmetric, open link)."""

    peer: Peer


@attrs.frozen
class PeerDown(Event):
    """`peer` left this node's active view, for `reason`."""

    peer: Peer
    reason: DownReason


@attrs.frozen
class NodeRemoved(Event):
    """`node` is gone for the cluster: it left (LEFT), or its failure was confirmed
    (FAILED: reported by several of its neighbours, or by one and never refuted; see
    `trio_replica.runtime.departures`). Told once per departure on every node; replicas call
    `remove_node` for it. A peer that merely left the active view is not removed."""

    node: str
    reason: DownReason


@attrs.frozen
class Left(Event):
    """This node left the cluster gracefully; no more membership events follow."""


@attrs.frozen
class Delivered(Event):
    """A broadcast reached this node for the first time (emitted by the Plumtree core).

    `payload` is still CBOR-encoded bytes; `sender` is the peer it came from, or None for
    one of this node's own broadcasts. `hops` is the round: 0 at the origin.
    """

    id: MessageId
    tag: str
    payload: bytes
    hops: int
    sender: Peer | None
    #: It came after this node grafted it (its delay includes our repair timers).
    repaired: bool = False


@attrs.frozen
class Abandoned(Event):
    """A broadcast announced to this node could not be fetched (emitted by the Plumtree core).

    Every announcer was grafted and none delivered, or the table of missing messages was
    full. The subscribers of its tag are told with a `Lagged` notice; replicas then pull
    a sync. `tags` are the tags its announcers named, each once: honest announcers name
    the message's own, and a lying one cannot keep the loss from that tag's subscribers.
    """

    id: MessageId
    tags: tuple[str, ...]


@attrs.frozen
class Delivery(Event):
    """A broadcast as a subscriber receives it: decoded payload and where it came from."""

    tag: str
    payload: Any
    origin: str
    id: MessageId
    hops: int


@attrs.frozen
class Lagged(Event):
    """This subscriber fell behind and `missed` events were not kept for it.

    It comes in the stream exactly where the events went missing: everything before it was
    delivered, then `missed` events were lost (the subscriber's buffer was full, or, for a
    broadcast subscriber, a message of its tag announced to the node could not be fetched:
    `Abandoned`), then the stream goes on. The source never waits for a slow subscriber;
    it counts what it could not keep and says so here. A replica answers it with a sync
    pull.
    """

    missed: int


@attrs.frozen
class Resubscribed(Event):
    """The source of a subscription restarted; the channel carries on but may have missed
    messages while the source was down. A replica asks its peers for a full sync here."""

    source: str
