"""A seeded, deterministic discrete-event simulator over the sans-IO protocol cores.

This module owns a virtual network of nodes, each a `Stack` of protocol cores (HyParView
today; Plumtree plugs in as another `Layer`), and a plain `heapq` event loop in virtual
time. No trio, no sockets, no wall clock: the same seed gives the same run, event for event,
which is what makes 1,000-node experiments and exact regression tests possible (SPEC
section 2, the "simulation" figures of section 13).

The network model is the runtime's, reduced to what the cores can observe:

* A link joins two nodes; `Send` opens one if needed (a dial) and messages on it arrive in
  order after the pair's latency (drawn once per pair). A dial to a crashed, unknown or
  partitioned node fails: the sender gets `handle_link_down` after `dial_fail_delay`.
* `CloseLink` lets what the closer queued before it drain, then the other side gets
  `handle_link_down` (as it would see the websocket close); what that side had in flight
  towards the closer is lost.
* A crash (or a partition cutting a link) silences the link at once; each live endpoint
  gets `handle_link_down` after `detect_delay`, the ping timeout of the real runtime.
* `loss` drops a fraction of messages silently, to exercise the cores' timeouts (the real
  transport is reliable: there a loss is a link failure).
* Links nobody wants (`wants_link` false at both ends) and with nothing in flight are
  closed by a periodic sweep, as the runtime closes idle temporary links.

A small driver per node does what the runtime does around the membership core: JOIN through
a random seed while `needs_join()` (with exponential backoff), and every `rejoin_interval`
JOIN again through a seed when `should_rejoin(seed_ids)` says so.

Broadcast layers (issue 8). `PlumtreeLayer` drives the real Plumtree core (the runtime's
broadcast component does the same: PeerUp/PeerDown from membership become
`neighbor_up`/`neighbor_down`). `FloodLayer` is the baseline of both papers: every node
forwards the first copy of a message to every active peer but the sender (HyParView paper
section 5, "flooding over the active view"; SRDS 2007 section 4 compares Plumtree with it).
Flooding travels as `FloodGossip`, a simulator-only message class, so that both layers sit
in one stack and run over the very same overlay at the same time. `Simulator.broadcast`
starts a message on either; the simulator itself (not the layers) measures each message:
which node delivered it at which hop, and how many payload copies live nodes received, from
which `BroadcastRecord.metrics` gives the papers' figures: reliability, RMR (relative
message redundancy, m / (n - 1) - 1) and LDH (last delivery hop).

The graph helpers at the bottom (`is_connected`, `asymmetric_links`, ...) read the overlay
that the active views form.
"""

from __future__ import annotations

import heapq
import random
from collections import Counter, deque
from collections.abc import Callable, Collection, Hashable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import attrs

from ..core.effects import CloseLink, Effect, Emit, Send, SetTimer
from ..core.events import Delivered, Event, PeerDown, PeerUp
from ..core.hyparview import HyParView, HyParViewConfig
from ..core.messages import HYPARVIEW_KINDS, PLUMTREE_KINDS, Gossip, Message, MessageId, Peer
from ..core.plumtree import Plumtree, PlumtreeConfig

__all__ = [
    "BROADCAST",
    "FLOOD",
    "BroadcastLayer",
    "BroadcastMetrics",
    "BroadcastRecord",
    "DriverConfig",
    "FloodGossip",
    "FloodLayer",
    "HyParViewLayer",
    "Layer",
    "NetworkConfig",
    "PlumtreeLayer",
    "SimNode",
    "Simulator",
    "Stack",
    "active_graph",
    "asymmetric_links",
    "average_shortest_path",
    "broadcast_stack",
    "clustering_coefficient",
    "components",
    "in_degree_distribution",
    "is_connected",
]

MEMBERSHIP = "membership"
#: Layer names used by `broadcast_stack`.
BROADCAST = "plumtree"
FLOOD = "flood"


# --- the per-node stack ---------------------------------------------------------------------------


class Layer(Protocol):
    """One protocol core as the simulator (and the runtime) drives it.

    `kinds` are the message classes routed to this layer. `handle_event` receives the
    events the *other* layers of the same node emit (e.g. HyParView's PeerUp/PeerDown for
    Plumtree's eager set).
    """

    kinds: tuple[type[Message], ...]

    def handle_message(self, sender: Peer, message: Message, now: float) -> list[Effect]: ...

    def handle_timer(self, timer: Hashable, now: float) -> list[Effect]: ...

    def handle_link_down(self, peer: Peer, now: float) -> list[Effect]: ...

    def handle_event(self, event: Event, now: float) -> list[Effect]: ...

    def wants_link(self, peer_id: str) -> bool: ...


class HyParViewLayer:
    """Adapts the HyParView core to `Layer` (it consumes no other layer's events)."""

    kinds: tuple[type[Message], ...] = HYPARVIEW_KINDS

    def __init__(self, core: HyParView) -> None:
        self.core = core

    def handle_message(self, sender: Peer, message: Message, now: float) -> list[Effect]:
        return self.core.handle_message(sender, message, now)

    def handle_timer(self, timer: Hashable, now: float) -> list[Effect]:
        return self.core.handle_timer(timer, now)

    def handle_link_down(self, peer: Peer, now: float) -> list[Effect]:
        return self.core.handle_link_down(peer, now)

    def handle_event(self, event: Event, now: float) -> list[Effect]:
        return []

    def wants_link(self, peer_id: str) -> bool:
        return self.core.wants_link(peer_id)


class Stack:
    """The protocol layers of one node, by name, and the message routing between them.

    The layer named ``"membership"`` must be a `HyParViewLayer`: the driver and the graph
    helpers read its core.
    """

    def __init__(self, layers: Mapping[str, Layer]) -> None:
        self.layers = dict(layers)
        self.routes: dict[type[Message], str] = {}
        for name, layer in self.layers.items():
            for kind in layer.kinds:
                if kind in self.routes:
                    raise ValueError(f"{kind.__name__} routed to {self.routes[kind]} and {name}")
                self.routes[kind] = name
        membership = self.layers.get(MEMBERSHIP)
        if not isinstance(membership, HyParViewLayer):
            raise ValueError(f"a stack needs a HyParViewLayer named {MEMBERSHIP!r}")
        self.hyparview: HyParView = membership.core

    def wants_link(self, peer_id: str) -> bool:
        return any(layer.wants_link(peer_id) for layer in self.layers.values())


StackFactory = Callable[[Peer, random.Random], Stack]


def hyparview_stack(config: HyParViewConfig) -> StackFactory:
    """A factory of stacks holding only the membership layer."""

    def make(peer: Peer, rng: random.Random) -> Stack:
        return Stack({MEMBERSHIP: HyParViewLayer(HyParView(peer, config, rng))})

    return make


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

    def __init__(self, core: Plumtree) -> None:
        self.core = core

    def broadcast(self, id: MessageId, tag: str, payload: bytes, now: float) -> list[Effect]:
        return self.core.broadcast(id, tag, payload, now)

    def handle_message(self, sender: Peer, message: Message, now: float) -> list[Effect]:
        return self.core.handle_message(sender, message, now)

    def handle_timer(self, timer: Hashable, now: float) -> list[Effect]:
        return self.core.handle_timer(timer, now)

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
        effects: list[Effect] = [Send(p, forward) for p in self.neighbors if p != sender]
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


# --- configuration and state ----------------------------------------------------------------------


@attrs.frozen
class NetworkConfig:
    """The virtual network's behaviour; times in seconds."""

    #: One-way latency of a pair of nodes, drawn uniformly once per pair.
    latency_min: float = 0.005
    latency_max: float = 0.050
    #: Fraction of messages dropped silently (0 = reliable links, as over TCP).
    loss: float = 0.0
    #: Delay before a failed dial is reported (connection refused or timed out).
    dial_fail_delay: float = 1.0
    #: Delay before a link to a crashed or cut-off peer is reported down (ping timeout).
    detect_delay: float = 3.0
    #: Period of the idle-link sweep; 0 turns it off.
    idle_sweep_interval: float = 10.0


@attrs.frozen
class DriverConfig:
    """What the per-node driver does around the membership core."""

    #: First and largest delay between two JOIN attempts of an isolated node.
    join_backoff_min: float = 1.0
    join_backoff_max: float = 30.0
    #: Which nodes run the periodic `should_rejoin` check ("seeds": seed nodes only).
    rejoin: Literal["off", "seeds", "all"] = "seeds"
    #: Keep every emitted event per node (off for large runs: only counts are kept).
    record_events: bool = False


@attrs.define(eq=False)
class SimNode:
    """One simulated node: its stack, liveness, seeds and driver state."""

    peer: Peer
    stack: Stack
    seeds: tuple[Peer, ...]
    alive: bool = True
    #: Bumped at every restart: timers and dials of an older life are ignored.
    life: int = 0
    join_backoff: float = 0.0
    links: set[tuple[str, str]] = attrs.field(factory=set)
    events: list[Event] = attrs.field(factory=list)
    event_counts: Counter[str] = attrs.field(factory=Counter)
    rejoins: int = 0

    @property
    def id(self) -> str:
        return self.peer.id

    @property
    def hyparview(self) -> HyParView:
        return self.stack.hyparview


@attrs.define(eq=False)
class _Link:
    key: tuple[str, str]
    latency: float
    inc: int = 0
    open: bool = False
    #: Silenced by a crash or a partition; detection events are scheduled.
    dead: bool = False
    in_flight: int = 0
    #: Per destination id: the latest scheduled delivery, to keep each direction FIFO.
    last: dict[str, float] = attrs.field(factory=dict)
    #: Incarnation -> id of the side that closed it, while its queued messages drain.
    closing: dict[int, str] = attrs.field(factory=dict)


class Simulator:
    """N nodes, a virtual network and a heapq of timed events. Deterministic per `seed`."""

    def __init__(
        self,
        seed: int,
        *,
        network: NetworkConfig | None = None,
        hyparview: HyParViewConfig | None = None,
        driver: DriverConfig | None = None,
        stack_factory: StackFactory | None = None,
    ) -> None:
        self.seed = seed
        self.network = network or NetworkConfig()
        self.hyparview_config = hyparview or HyParViewConfig()
        self.driver = driver or DriverConfig()
        self._stack_factory = stack_factory or hyparview_stack(self.hyparview_config)
        self.rng = random.Random(seed)
        self.now = 0.0
        self.nodes: dict[str, SimNode] = {}
        self.sent: Counter[str] = Counter()
        self.delivered: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.events_processed = 0
        self._queue: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = 0
        self._links: dict[tuple[str, str], _Link] = {}
        self._latency: dict[tuple[str, str], float] = {}
        self._failing_dials: set[tuple[str, str]] = set()
        self._groups: dict[str, int] | None = None
        self._seed_set: set[str] = set()
        #: Every broadcast started by `broadcast`, by id, in send order.
        self.broadcasts: dict[MessageId, BroadcastRecord] = {}
        if self.network.idle_sweep_interval > 0:
            self._schedule(self.network.idle_sweep_interval, self._sweep_idle_links, ())

    # --- scenario API ---------------------------------------------------------------------

    def add_node(
        self, node_id: str, seeds: Sequence[str] = (), *, at: float | None = None
    ) -> SimNode:
        """Create a node (address ``sim://<id>``) that starts, and joins through `seeds`, at `at`.

        Seeds are node ids; a node listed as its own seed ignores itself.
        """
        if node_id in self.nodes:
            raise ValueError(f"node {node_id!r} exists")
        peer = Peer(node_id, f"sim://{node_id}")
        seed_peers = tuple(Peer(s, f"sim://{s}") for s in seeds if s != node_id)
        node = SimNode(peer, self._new_stack(peer, 0), seed_peers)
        node.alive = False  # until its start event
        self.nodes[node_id] = node
        self._seed_set.update(seed.id for seed in seed_peers)
        self._schedule(
            max((at if at is not None else self.now) - self.now, 0.0), self._boot, (node, 0)
        )
        return node

    def crash(self, node_ids: Iterable[str]) -> None:
        """Stop nodes at once, without a word to anyone; their peers detect it later."""
        for node_id in node_ids:
            node = self.nodes[node_id]
            if not node.alive:
                continue
            node.alive = False
            for key in sorted(node.links):  # sorted: set order varies with the hash seed
                link = self._links.get(key)
                if link is not None and link.open and not link.dead:
                    link.dead = True
                    other = key[0] if key[1] == node_id else key[1]
                    self._schedule(
                        self.network.detect_delay, self._detect, (link, link.inc, other, node_id)
                    )

    def restart(self, node_id: str) -> None:
        """Bring a crashed node back with a fresh stack (empty views); it joins its seeds."""
        node = self.nodes[node_id]
        if node.alive:
            raise ValueError(f"node {node_id!r} is running")
        node.life += 1
        node.stack = self._new_stack(node.peer, node.life)
        self._boot(node, node.life)

    def leave(self, node_id: str) -> None:
        """Graceful leave of one node (the core's `leave`), after which it stops."""
        node = self.nodes[node_id]
        for name, layer in node.stack.layers.items():
            if isinstance(layer, HyParViewLayer):
                self._apply(node, name, layer.core.leave(self.now))
        # Links the leave did not close (temporary ones) go down as the process exits.
        self.crash([node_id])

    def partition(self, groups: Sequence[Collection[str]]) -> None:
        """Split the network: nodes talk only within their group (unlisted nodes form one
        more group). Links across groups are silenced and detected as failed."""
        self._groups = {}
        for index, group in enumerate(groups):
            for node_id in group:
                self._groups[node_id] = index
        for key, link in list(self._links.items()):
            if link.open and not link.dead and not self._reachable(*key):
                link.dead = True
                self._schedule(
                    self.network.detect_delay, self._detect, (link, link.inc, key[0], key[1])
                )
                self._schedule(
                    self.network.detect_delay, self._detect, (link, link.inc, key[1], key[0])
                )

    def heal(self) -> None:
        """End the partition: dials across former groups succeed again."""
        self._groups = None

    def broadcast(
        self, origin: str, layer: str = BROADCAST, tag: str = "sim", payload: bytes = b""
    ) -> MessageId:
        """Start a broadcast from live node `origin` on its `BroadcastLayer` named `layer`.

        The id is minted here (origin, a simulator-wide sequence number); the returned id
        keys `broadcasts`, whose record fills in as the message spreads.
        """
        node = self.nodes[origin]
        if not node.alive:
            raise ValueError(f"node {origin!r} is not running")
        target = node.stack.layers[layer]
        if not isinstance(target, BroadcastLayer):
            raise TypeError(f"layer {layer!r} cannot broadcast")
        id = MessageId(origin, len(self.broadcasts) + 1, 0)
        alive = frozenset(n.id for n in self.nodes.values() if n.alive)
        self.broadcasts[id] = BroadcastRecord(id, layer, self.now, alive)
        self._apply(node, layer, target.broadcast(id, tag, payload, self.now))
        return id

    def emit(self, node_id: str, event: Event) -> None:
        """Hand `event` to every layer of live node `node_id`, as if a layer of its own had
        emitted it (e.g. a `NodeRemoved` the departures logic would have told it)."""
        node = self.nodes[node_id]
        for name, layer in node.stack.layers.items():
            if not node.alive:
                return
            self._apply(node, name, layer.handle_event(event, self.now))

    def run(self, until: float) -> None:
        """Process events in time order up to virtual time `until` (inclusive)."""
        queue = self._queue
        while queue and queue[0][0] <= until:
            when, _, action, args = heapq.heappop(queue)
            self.now = when
            self.events_processed += 1
            action(*args)
        self.now = max(self.now, until)

    def run_for(self, seconds: float) -> None:
        self.run(self.now + seconds)

    def alive_nodes(self) -> list[SimNode]:
        return [node for node in self.nodes.values() if node.alive]

    def open_links(self) -> int:
        return sum(1 for link in self._links.values() if link.open)

    def check_invariants(self) -> None:
        """Every live core's view invariants (raises AssertionError)."""
        for node in self.alive_nodes():
            node.hyparview.check_invariants()

    # --- internals: nodes and drivers -----------------------------------------------------

    def _new_stack(self, peer: Peer, life: int) -> Stack:
        return self._stack_factory(peer, random.Random(f"{self.seed}/{peer.id}/{life}"))

    def _boot(self, node: SimNode, life: int) -> None:
        if life != node.life:
            return
        node.alive = True
        node.join_backoff = self.driver.join_backoff_min
        self._apply(node, MEMBERSHIP, node.hyparview.start(self.now))
        self._driver_join(node, life)
        interval = self.hyparview_config.rejoin_interval
        if interval > 0 and self._runs_rejoin(node):
            self._schedule(interval * self.rng.uniform(0.5, 1.5), self._driver_rejoin, (node, life))

    def _runs_rejoin(self, node: SimNode) -> bool:
        if self.driver.rejoin == "off" or not node.seeds:
            return False
        return self.driver.rejoin == "all" or node.id in self._seed_set

    def _driver_join(self, node: SimNode, life: int) -> None:
        """JOIN through a random seed while the node is isolated, with backoff."""
        if not node.alive or life != node.life:
            return
        core = node.hyparview
        if core.needs_join() and node.seeds:
            contact = self.rng.choice(node.seeds)
            self._apply(node, MEMBERSHIP, core.join(contact, self.now))
            delay = node.join_backoff
            node.join_backoff = min(node.join_backoff * 2, self.driver.join_backoff_max)
        else:
            node.join_backoff = self.driver.join_backoff_min
            delay = node.join_backoff
        self._schedule(delay * self.rng.uniform(0.8, 1.2), self._driver_join, (node, life))

    def _driver_rejoin(self, node: SimNode, life: int) -> None:
        """Partition merge (SPEC section 4, bootstrap), as the runtime's seeder does it: a
        seed asks the next other seed that is not its neighbour to be one (`reach`); any
        other node JOINs a seed when `should_rejoin`."""
        if not node.alive or life != node.life:
            return
        core = node.hyparview
        seed_ids = {seed.id for seed in node.seeds}
        if node.id in self._seed_set:
            others = [s for s in node.seeds if not (core.is_active(s.id) or core.is_passive(s.id))]
            if others:
                # The rotation: the seed asked longest ago first.
                node.seeds = (*[s for s in node.seeds if s != others[0]], others[0])
                node.rejoins += 1
                self._apply(node, MEMBERSHIP, core.reach(others[0], self.now))
        elif core.should_rejoin(seed_ids):
            candidates = [s for s in node.seeds if not core.is_active(s.id)]
            if candidates:
                node.rejoins += 1
                self._apply(node, MEMBERSHIP, core.join(self.rng.choice(candidates), self.now))
        interval = self.hyparview_config.rejoin_interval
        self._schedule(interval * self.rng.uniform(0.75, 1.25), self._driver_rejoin, (node, life))

    # --- internals: effects ---------------------------------------------------------------

    def _apply(self, node: SimNode, layer_name: str, effects: list[Effect]) -> None:
        for effect in effects:
            if not node.alive:
                return
            match effect:
                case Send(peer=peer, message=message):
                    self._send(node, peer, message)
                case CloseLink(peer=peer):
                    self._close(node, peer)
                case SetTimer(delay=delay, timer=timer):
                    self._schedule(delay, self._fire_timer, (node, node.life, layer_name, timer))
                case Emit(event=event):
                    if isinstance(event, Delivered):
                        record = self.broadcasts.get(event.id)
                        if record is not None:
                            record.hops.setdefault(node.id, event.hops)
                    node.event_counts[type(event).__name__] += 1
                    if self.driver.record_events:
                        node.events.append(event)
                    for name, layer in node.stack.layers.items():
                        if name != layer_name:
                            self._apply(node, name, layer.handle_event(event, self.now))

    def _fire_timer(self, node: SimNode, life: int, layer_name: str, timer: Hashable) -> None:
        if node.alive and life == node.life:
            layer = node.stack.layers[layer_name]
            self._apply(node, layer_name, layer.handle_timer(timer, self.now))

    def _link_down(self, node: SimNode, peer: Peer) -> None:
        for name, layer in node.stack.layers.items():
            if not node.alive:
                return
            self._apply(node, name, layer.handle_link_down(peer, self.now))

    # --- internals: network ---------------------------------------------------------------

    def _schedule(self, delay: float, action: Callable[..., None], args: tuple[Any, ...]) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (self.now + delay, self._seq, action, args))

    def _reachable(self, a: str, b: str) -> bool:
        groups = self._groups
        return groups is None or groups.get(a, -1) == groups.get(b, -1)

    def _link(self, a: str, b: str) -> _Link:
        key = (a, b) if a < b else (b, a)
        link = self._links.get(key)
        if link is None:
            latency = self._latency.get(key)
            if latency is None:
                net = self.network
                latency = self.rng.uniform(net.latency_min, net.latency_max)
                self._latency[key] = latency
            link = self._links[key] = _Link(key, latency)
        return link

    def _send(self, node: SimNode, peer: Peer, message: Message) -> None:
        kind = type(message).__name__
        self.sent[kind] += 1
        target = self.nodes.get(peer.id)
        link = self._link(node.id, peer.id)
        if not link.open:
            if target is None or not target.alive or not self._reachable(node.id, peer.id):
                self.dropped[kind] += 1
                dial = (node.id, peer.id)
                if dial not in self._failing_dials:
                    self._failing_dials.add(dial)
                    self._schedule(
                        self.network.dial_fail_delay, self._dial_failed, (node, node.life, peer)
                    )
                return
            link.inc += 1
            link.open = True
            node.links.add(link.key)
            target.links.add(link.key)
        if link.dead or (self.network.loss and self.rng.random() < self.network.loss):
            self.dropped[kind] += 1
            return
        when = max(self.now + link.latency, link.last.get(peer.id, 0.0))
        link.last[peer.id] = when
        link.in_flight += 1
        self._seq += 1
        heapq.heappush(
            self._queue, (when, self._seq, self._deliver, (link, link.inc, node, peer.id, message))
        )

    def _deliver(
        self, link: _Link, inc: int, source: SimNode, dest_id: str, message: Message
    ) -> None:
        link.in_flight -= 1
        kind = type(message).__name__
        dest = self.nodes[dest_id]
        if inc == link.inc and link.open:
            ok = not link.dead
        else:
            closer = link.closing.get(inc)
            ok = closer is not None and closer != dest_id and not link.dead
        if not ok or not dest.alive or not self._reachable(source.id, dest_id):
            self.dropped[kind] += 1
            return
        self.delivered[kind] += 1
        if isinstance(message, Gossip | FloodGossip):
            record = self.broadcasts.get(message.id)
            if record is not None:
                record.payloads += 1
        layer_name = dest.stack.routes.get(type(message))
        if layer_name is None:
            self.dropped[kind] += 1
            return
        layer = dest.stack.layers[layer_name]
        self._apply(dest, layer_name, layer.handle_message(source.peer, message, self.now))

    def _dial_failed(self, node: SimNode, life: int, peer: Peer) -> None:
        self._failing_dials.discard((node.id, peer.id))
        if node.alive and life == node.life:
            self._link_down(node, peer)

    def _close(self, node: SimNode, peer: Peer) -> None:
        key = (node.id, peer.id) if node.id < peer.id else (peer.id, node.id)
        link = self._links.get(key)
        if link is None or not link.open or link.dead:
            return
        link.open = False
        link.closing[link.inc] = node.id
        when = max(self.now + link.latency, link.last.get(peer.id, 0.0))
        self._seq += 1
        heapq.heappush(
            self._queue, (when, self._seq, self._close_done, (link, link.inc, node.id, peer.id))
        )

    def _close_done(self, link: _Link, inc: int, closer_id: str, other_id: str) -> None:
        link.closing.pop(inc, None)
        if link.inc != inc or link.open:
            return  # reopened meanwhile: the other side sees a working link
        self._forget_link(link)
        other = self.nodes[other_id]
        if other.alive and not link.dead:
            self._link_down(other, self.nodes[closer_id].peer)

    def _detect(self, link: _Link, inc: int, node_id: str, peer_id: str) -> None:
        if link.inc == inc:
            link.open = False
            link.dead = False
            self._forget_link(link)
        node = self.nodes[node_id]
        if node.alive:
            self._link_down(node, self.nodes[peer_id].peer)

    def _forget_link(self, link: _Link) -> None:
        for node_id in link.key:
            node = self.nodes.get(node_id)
            if node is not None:
                node.links.discard(link.key)

    def _sweep_idle_links(self) -> None:
        for key, link in list(self._links.items()):
            if link.in_flight or link.closing or link.dead:
                continue
            if link.open:
                a, b = self.nodes[key[0]], self.nodes[key[1]]
                if (a.alive and a.stack.wants_link(b.id)) or (b.alive and b.stack.wants_link(a.id)):
                    continue
                self._forget_link(link)
            del self._links[key]
        self._schedule(self.network.idle_sweep_interval, self._sweep_idle_links, ())


# --- graph metrics over the active views ----------------------------------------------------------

Graph = dict[str, set[str]]


def active_graph(sim: Simulator) -> Graph:
    """Directed graph of the live nodes' active views (edges to crashed nodes left out)."""
    alive = {node.id for node in sim.alive_nodes()}
    return {
        node_id: {peer.id for peer in sim.nodes[node_id].hyparview.active if peer.id in alive}
        for node_id in alive
    }


def _undirected(graph: Graph) -> Graph:
    result: Graph = {node: set(peers) for node, peers in graph.items()}
    for node, peers in graph.items():
        for peer in peers:
            result.setdefault(peer, set()).add(node)
    return result


def components(graph: Graph) -> list[set[str]]:
    """Connected components of the graph taken as undirected, largest first."""
    undirected = _undirected(graph)
    seen: set[str] = set()
    result: list[set[str]] = []
    for start in undirected:
        if start in seen:
            continue
        component = {start}
        queue = deque([start])
        while queue:
            for peer in undirected[queue.popleft()]:
                if peer not in component:
                    component.add(peer)
                    queue.append(peer)
        seen |= component
        result.append(component)
    result.sort(key=len, reverse=True)
    return result


def is_connected(graph: Graph) -> bool:
    return len(components(graph)) <= 1


def asymmetric_links(graph: Graph) -> list[tuple[str, str]]:
    """Edges a -> b whose reverse b -> a is missing (both ends in the graph)."""
    return sorted(
        (a, b) for a, peers in graph.items() for b in peers if b in graph and a not in graph[b]
    )


def clustering_coefficient(graph: Graph) -> float:
    """Average local clustering coefficient of the undirected graph (paper, section 5.2)."""
    undirected = _undirected(graph)
    total = 0.0
    for peers in undirected.values():
        k = len(peers)
        if k < 2:
            continue
        links = sum(1 for a in peers for b in undirected[a] if b in peers) / 2
        total += links / (k * (k - 1) / 2)
    return total / len(undirected) if undirected else 0.0


def average_shortest_path(
    graph: Graph, *, sources: int | None = None, rng: random.Random | None = None
) -> float:
    """Mean hop count between reachable pairs (BFS from all, or `sources` sampled, nodes)."""
    undirected = _undirected(graph)
    nodes = sorted(undirected)
    if sources is not None and sources < len(nodes):
        nodes = (rng or random.Random(0)).sample(nodes, sources)
    total = 0
    pairs = 0
    for start in nodes:
        dist = {start: 0}
        queue = deque([start])
        while queue:
            current = queue.popleft()
            for peer in undirected[current]:
                if peer not in dist:
                    dist[peer] = dist[current] + 1
                    queue.append(peer)
        total += sum(dist.values())
        pairs += len(dist) - 1
    return total / pairs if pairs else 0.0


def in_degree_distribution(graph: Graph) -> dict[int, int]:
    """Number of nodes per in-degree (how many active views hold the node)."""
    indegree = dict.fromkeys(graph, 0)
    for peers in graph.values():
        for peer in peers:
            if peer in indegree:
                indegree[peer] += 1
    return dict(sorted(Counter(indegree.values()).items()))
