"""The broadcast layers of the simulator, and what it measures of each broadcast.

This module owns the layers that can originate a broadcast (issue 8). `PlumtreeLayer`
drives the real Plumtree core (the runtime's broadcast component does the same:
PeerUp/PeerDown from membership become `neighbor_up`/`neighbor_down`). `FloodLayer` is the
baseline of both papers: every node forwards the first copy of a message to every active
peer but the sender (HyParView paper section 5, "flooding over the active view"; SRDS 2007
section 4 compares Plumtree with it). Flooding travels as `FloodGossip`, a simulator-only
message class, so that both layers sit in one stack and run over the very same overlay at
the same time. `Simulator.broadcast` starts a message on either; the simulator itself (not
the layers) measures each message: which node delivered it at which hop, and how many
payload copies live nodes received, from which `BroadcastRecord.metrics` gives the papers'
figures: reliability, RMR (relative message redundancy, m / (n - 1) - 1) and LDH (last
delivery hop).
"""

from __future__ import annotations

import random
from collections.abc import Collection, Hashable
from typing import ClassVar, Protocol, runtime_checkable

import attrs

from ..core.effects import Effect, Emit, Send
from ..core.events import Delivered, Event, PeerDown, PeerUp
from ..core.hyparview import HyParView, HyParViewConfig
from ..core.messages import PLUMTREE_KINDS, Message, MessageId, Peer
from ..core.plumtree import Plumtree, PlumtreeConfig
from .stack import MEMBERSHIP, HyParViewLayer, Layer, Stack, StackFactory

__all__ = [
    "BROADCAST",
    "FLOOD",
    "BroadcastLayer",
    "BroadcastMetrics",
    "BroadcastRecord",
    "FloodGossip",
    "FloodLayer",
    "PlumtreeLayer",
    "broadcast_stack",
]

#: Layer names used by `broadcast_stack`.
BROADCAST = "plumtree"
FLOOD = "flood"


@runtime_checkable
class BroadcastLayer(Layer, Protocol):
    """A layer that can originate a broadcast (`Simulator.broadcast` calls it)."""

    def broadcast(self, id: MessageId, tag: str, payload: bytes, now: float) -> list[Effect]: ...


class PlumtreeLayer:
    """Adapts the Plumtree core to `Layer`, fed by membership events as the runtime feeds it.

    The core's sets follow PeerUp/PeerDown only (Algorithm 1, NeighborUp/NeighborDown); a
    link going down is membership's business, which reports it as PeerDown.
    """

    kinds: tuple[type[Message], ...] = PLUMTREE_KINDS
    __slots__ = ("core", "handle_message", "handle_timer")

    def __init__(self, core: Plumtree) -> None:
        self.core = core
        # The core's own methods: a method forwarding to them would add a call to every
        # message of every run.
        self.handle_message = core.handle_message
        self.handle_timer = core.handle_timer

    def broadcast(self, id: MessageId, tag: str, payload: bytes, now: float) -> list[Effect]:
        return self.core.broadcast(id, tag, payload, now)

    def handle_link_down(self, peer: Peer, now: float) -> list[Effect]:
        return []

    def handle_event(self, event: Event, now: float) -> list[Effect]:
        if isinstance(event, PeerUp):
            return self.core.neighbor_up(event.peer, now)
        if isinstance(event, PeerDown):
            return self.core.neighbor_down(event.peer, now)
        return []

    def wants_link(self, peer_id: str) -> bool:
        return False


@attrs.frozen
class FloodGossip(Message):
    """Simulator-only payload of the flooding baseline (never on the wire)."""

    KIND: ClassVar[int] = -1
    CONTROL: ClassVar[bool] = False
    id: MessageId
    round: int


class FloodLayer:
    """Flooding over the active view: the baseline both papers measure against.

    The first copy of a message is delivered and forwarded to every neighbour but its
    sender; later copies are dropped. Neighbours are the active view, as PeerUp/PeerDown
    report it. Seen ids are kept for the whole run (a simulation is short).
    """

    kinds: tuple[type[Message], ...] = (FloodGossip,)
    __slots__ = ("neighbors", "seen")

    def __init__(self) -> None:
        # dict as an ordered set: the send order must not depend on the hash seed.
        self.neighbors: dict[Peer, None] = {}
        self.seen: set[MessageId] = set()

    def broadcast(self, id: MessageId, tag: str, payload: bytes, now: float) -> list[Effect]:
        self.seen.add(id)
        effects: list[Effect] = [Send(peer, FloodGossip(id, 1)) for peer in self.neighbors]
        effects.append(Emit(Delivered(id, tag, payload, 0, None)))
        return effects

    def handle_message(self, sender: Peer, message: Message, now: float) -> list[Effect]:
        if not isinstance(message, FloodGossip) or message.id in self.seen:
            return []
        self.seen.add(message.id)
        forward = FloodGossip(message.id, message.round + 1)
        # Every neighbour but the sender: the dict drops it by hash (it holds at most one
        # key equal to it), faster than comparing each neighbour with it.
        others = dict(self.neighbors)
        others.pop(sender, None)
        effects: list[Effect] = [Send(p, forward) for p in others]
        effects.append(Emit(Delivered(message.id, "", b"", message.round, sender)))
        return effects

    def handle_timer(self, timer: Hashable, now: float) -> list[Effect]:
        return []

    def handle_link_down(self, peer: Peer, now: float) -> list[Effect]:
        return []

    def handle_event(self, event: Event, now: float) -> list[Effect]:
        if isinstance(event, PeerUp):
            self.neighbors[event.peer] = None
        elif isinstance(event, PeerDown):
            self.neighbors.pop(event.peer, None)
        return []

    def wants_link(self, peer_id: str) -> bool:
        return False


def broadcast_stack(
    hyparview: HyParViewConfig, plumtree: PlumtreeConfig | None = None
) -> StackFactory:
    """Stacks of membership, Plumtree (`BROADCAST`) and flooding (`FLOOD`) over one overlay.

    Each core gets its own generator derived from the node's, so adding the broadcast
    layers leaves the membership's random choices (hence the overlay) as they were.
    """
    plumtree_config = plumtree or PlumtreeConfig()

    def make(peer: Peer, rng: random.Random) -> Stack:
        # A copy of the node's generator, reseeded: `rng` itself is left untouched.
        plumtree_rng = random.Random()
        plumtree_rng.setstate(rng.getstate())
        plumtree_rng.seed(plumtree_rng.getrandbits(64) ^ 0x9E3779B97F4A7C15)
        return Stack(
            {
                MEMBERSHIP: HyParViewLayer(HyParView(peer, hyparview, rng)),
                BROADCAST: PlumtreeLayer(Plumtree(peer.id, plumtree_config, plumtree_rng)),
                FLOOD: FloodLayer(),
            }
        )

    return make


@attrs.frozen
class BroadcastMetrics:
    """The papers' figures for one message (SRDS 2007 section 4.1)."""

    #: Fraction of the eligible nodes that delivered it.
    reliability: float
    #: Relative message redundancy: payloads received / (deliveries - 1) - 1 (0 for a tree).
    rmr: float
    #: Last delivery hop: the largest hop count of a delivery.
    ldh: int
    delivered: int
    eligible: int
    payloads: int


@attrs.define
class BroadcastRecord:
    """What the simulator saw of one broadcast: deliveries by node and payload copies."""

    id: MessageId
    layer: str
    sent_at: float
    #: Live nodes when it was sent (the reliability denominator, less later crashes).
    alive_at_send: frozenset[str]
    hops: dict[str, int] = attrs.field(factory=dict)
    #: Virtual time of the latest first delivery (`sent_at` until one happens).
    last_delivery_at: float = attrs.field(
        default=attrs.Factory(lambda record: record.sent_at, takes_self=True)
    )
    #: Payload messages (GOSSIP or flood copies, grafted resends included) received by
    #: live nodes: the paper's m.
    payloads: int = 0

    def metrics(self, eligible: Collection[str] | None = None) -> BroadcastMetrics:
        """Figures against `eligible` nodes (default: alive at send time)."""
        targets = self.alive_at_send if eligible is None else eligible
        reached = sum(1 for node_id in targets if node_id in self.hops)
        delivered = len(self.hops)
        rmr = self.payloads / (delivered - 1) - 1 if delivered > 1 else 0.0
        return BroadcastMetrics(
            reliability=reached / len(targets) if targets else 1.0,
            rmr=rmr,
            ldh=max(self.hops.values(), default=0),
            delivered=delivered,
            eligible=len(targets),
            payloads=self.payloads,
        )
