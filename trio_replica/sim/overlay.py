"""A seeded, deterministic discrete-event simulator over the sans-IO protocol cores.

This module owns `Simulator`: a virtual network of nodes, each a `Stack` of protocol cores
(HyParView; Plumtree and flooding as broadcast layers, `sim.broadcast`), run in virtual
time over `sim.network.Network`. No trio, no sockets, no wall clock: the same seed gives the
same run, event for event, which is what makes 1,000-node experiments and exact regression
tests possible (SPEC section 2, the "simulation" figures of section 13). The graph metrics
of the overlay the active views form are in `sim.graph`.

The simulator carries out the layers' effects (`Send`, `CloseLink`, `SetTimer`, `Emit`:
an event one layer emits goes to the node's other layers) and measures each broadcast
(`BroadcastRecord`).

Around the membership core each node runs the runtime's own driver policy
(`core.seeding.SeedPolicy`: join through the seeds while isolated, with backoff; every
`rejoin_interval` a seed reaches the next seed it does not know, another node re-joins
when `should_rejoin`), carried out here as the runtime's seeding task does it: a seed
"answers a dial" when it is alive and reachable. In the overlay, the driver waits, as the
runtime's does, for a change of the active view (a PeerUp or PeerDown of membership), a
re-join that falls due, or `join_backoff_max`, whichever comes first. Links
nobody wants (`wants_link` false at both ends) and with nothing in flight are closed by
a periodic sweep, as the runtime closes idle temporary links.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Hashable, Sequence
from typing import Literal

import attrs

from ..core.effects import CloseLink, Effect, Emit, Send, SetTimer
from ..core.events import Delivered, Event, PeerDown, PeerUp
from ..core.hyparview import HyParView, HyParViewConfig, ShuffleTimer
from ..core.messages import Gossip, Message, MessageId, Peer
from ..core.seeding import Join, Reach, SeedingConfig, SeedPolicy
from .broadcast import BROADCAST, BroadcastLayer, BroadcastRecord, FloodGossip
from .network import Network, NetworkConfig
from .stack import MEMBERSHIP, HyParViewLayer, Stack, StackFactory, hyparview_stack

__all__ = ["DriverConfig", "SimNode", "Simulator"]

#: Messages that carry a broadcast's payload (`BroadcastRecord.payloads` counts them).
_PAYLOADS = (Gossip, FloodGossip)


@attrs.frozen
class DriverConfig:
    """What the per-node driver does around the membership core."""

    #: The seeding policy's `retry_min` and `retry_max`: first and largest delay between
    #: two JOIN attempts of an isolated node; the largest is also the longest the driver
    #: of a node in the overlay waits for a view change.
    join_backoff_min: float = 1.0
    join_backoff_max: float = 30.0
    #: Which nodes run the periodic re-join check: "seeds" (seed nodes only: the
    #: runtime's `rejoin_chance` 0), "all" (`rejoin_chance` 1), "runtime" (the
    #: membership config's `rejoin_chance`, as nodes do), "off".
    rejoin: Literal["off", "seeds", "all", "runtime"] = "seeds"
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
    #: The driver policy of the current life (the runtime's: `core.seeding`).
    policy: SeedPolicy | None = None
    links: set[tuple[str, str]] = attrs.field(factory=set)
    events: list[Event] = attrs.field(factory=list)
    #: Emitted events by class (kept even when `events` is not).
    event_counts: Counter[type[Event]] = attrs.field(factory=Counter)
    #: The driver's next step: only the latest one scheduled runs (`Simulator._drive`).
    drive_token: int = 0
    #: The driver waits for a change of the active view (or its deadline).
    waiting: bool = False

    @property
    def rejoins(self) -> int:
        """Re-joins and reaches the driver started, over the node's current life."""
        return self.policy.rejoins if self.policy is not None else 0

    @property
    def id(self) -> str:
        return self.peer.id

    @property
    def hyparview(self) -> HyParView:
        return self.stack.hyparview


class Simulator(Network[SimNode]):
    """N nodes, a virtual network and a calendar of timed events. Deterministic per `seed`."""

    def __init__(
        self,
        seed: int,
        *,
        network: NetworkConfig | None = None,
        hyparview: HyParViewConfig | None = None,
        driver: DriverConfig | None = None,
        stack_factory: StackFactory | None = None,
    ) -> None:
        super().__init__(network or NetworkConfig(), random.Random(seed))
        self.seed = seed
        self.hyparview_config = hyparview or HyParViewConfig()
        self.driver = driver or DriverConfig()
        self._stack_factory = stack_factory or hyparview_stack(self.hyparview_config)
        self._seed_set: set[str] = set()
        #: Every broadcast started by `broadcast`, by id, in send order.
        self.broadcasts: dict[MessageId, BroadcastRecord] = {}
        #: Membership rounds (shuffles) held until this virtual time: `hold_rounds`.
        self.rounds_from = 0.0
        self._rounds_rng = random.Random(f"{seed}/rounds")
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

    def restart(self, node_id: str) -> None:
        """Bring a crashed node back with a fresh stack (empty views); it joins its seeds."""
        node = self.nodes[node_id]
        if node.alive:
            raise ValueError(f"node {node_id!r} is running")
        node.life += 1
        node.stack = self._new_stack(node.peer, node.life)
        self._boot(node, node.life)

    def join(self, node_id: str, contact: str) -> None:
        """Live node `node_id` sends one JOIN to `contact` (no seeding policy: a node added
        without seeds never joins by itself, and never re-joins)."""
        node = self.nodes[node_id]
        if not node.alive:
            raise ValueError(f"node {node_id!r} is not running")
        self._apply(node, MEMBERSHIP, node.hyparview.join(self.nodes[contact].peer, self.now))

    def hold_rounds(self, until: float) -> None:
        """No shuffle before virtual time `until`: a shuffle due earlier runs at a random
        point of the first period after it. The papers' simulations join every node before
        the first membership round; this is how the simulator runs that model."""
        self.rounds_from = until

    def leave(self, node_id: str) -> None:
        """Graceful leave of one node (the core's `leave`), after which it stops."""
        node = self.nodes[node_id]
        for name, layer in node.stack.layers.items():
            if isinstance(layer, HyParViewLayer):
                self._apply(node, name, layer.core.leave(self.now))
        # Links the leave did not close (temporary ones) go down as the process exits.
        self.crash([node_id])

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
        alive = frozenset([node_id for node_id, n in self.nodes.items() if n.alive])
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

    def alive_nodes(self) -> list[SimNode]:
        return [node for node in self.nodes.values() if node.alive]

    def check_invariants(self) -> None:
        """Every live core's view invariants (raises AssertionError)."""
        for node in self.alive_nodes():
            node.hyparview.check_invariants()

    # --- internals: the driver (seeding, re-join, idle-link sweep) ------------------------

    def _boot(self, node: SimNode, life: int) -> None:
        if life != node.life:
            return
        node.alive = True
        self._apply(node, MEMBERSHIP, node.hyparview.start(self.now))
        if not node.seeds:
            return
        cfg, driver = self.hyparview_config, self.driver
        chance = {"off": 0.0, "seeds": 0.0, "all": 1.0, "runtime": cfg.rejoin_chance}
        node.policy = SeedPolicy(
            node.id,
            [seed.address for seed in node.seeds],
            is_seed=node.id in self._seed_set and driver.rejoin != "off",
            config=SeedingConfig(
                retry_min=driver.join_backoff_min,
                retry_max=driver.join_backoff_max,
                rejoin_interval=0.0 if driver.rejoin == "off" else cfg.rejoin_interval,
                rejoin_chance=chance[driver.rejoin],
            ),
            rng=random.Random(f"{self.seed}/{node.id}/{life}/seeding"),
            now=self.now,
        )
        for seed in node.seeds:
            node.policy.learned(seed.address, seed.id)  # the simulator knows every id
        node.drive_token += 1
        self._drive(node, life, node.drive_token)

    def _answers(self, node: SimNode, address: str) -> SimNode | None:
        """The seed at `address`, if a dial from `node` would reach it now."""
        seed = self.nodes.get(address.removeprefix("sim://"))
        if seed is None or not seed.alive or not self._reachable(node.id, seed.id):
            return None
        return seed

    def _drive(self, node: SimNode, life: int, token: int) -> None:
        """One step of the node's seeding policy (`runtime.seeding` does the same)."""
        if not node.alive or life != node.life or node.policy is None or token != node.drive_token:
            return
        policy, core = node.policy, node.stack.hyparview
        step = policy.step(core, self.now)
        delay: float
        waiting = False
        if isinstance(step, Join):
            contact = next((s for a in step.seeds if (s := self._answers(node, a))), None)
            if contact is not None:
                self._apply(node, MEMBERSHIP, core.join(contact.peer, self.now))
            delay = 0.0 if step.rejoin else policy.retry_delay()
        elif isinstance(step, Reach):
            for address in step.seeds:
                policy.tried(address)
                seed = self._answers(node, address)
                if seed is not None and policy.may_reach(core, seed.id):
                    self._apply(node, MEMBERSHIP, core.reach(seed.peer, self.now))
                    break
            delay = 0.0
        elif core.active:
            # In the overlay: until the view changes (`_emit` wakes us), a re-join falls
            # due, or the longest backoff passes.
            waiting = True
            delay = max(0.0, min(step.until - self.now, policy.config.retry_max))
        else:
            delay = policy.config.retry_min  # a JOIN is pending: its timeout clears it
        self._next_drive(node, delay, waiting=waiting)

    def _next_drive(self, node: SimNode, delay: float, *, waiting: bool) -> None:
        node.drive_token += 1
        node.waiting = waiting
        self._schedule(delay, self._drive, (node, node.life, node.drive_token))

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

    # --- internals: stacks and effects ----------------------------------------------------

    def _new_stack(self, peer: Peer, life: int) -> Stack:
        return self._stack_factory(peer, random.Random(f"{self.seed}/{peer.id}/{life}"))

    def _apply(self, node: SimNode, layer_name: str, effects: list[Effect]) -> None:
        # Dispatch on the exact class first (the effects are final classes): this runs for
        # every effect of every run, and a `match` on class patterns costs several times
        # more. Anything else goes through the isinstance chain.
        for effect in effects:
            if not node.alive:
                return
            if type(effect) is Send:
                self._send(node, effect.peer, effect.message)
            elif type(effect) is SetTimer:
                self._schedule(
                    effect.delay,
                    self._fire_timer,
                    (node, node.life, layer_name, effect.timer),
                )
            elif type(effect) is Emit:
                self._emit(node, layer_name, effect.event)
            elif isinstance(effect, Send):
                self._send(node, effect.peer, effect.message)
            elif isinstance(effect, CloseLink):
                self._close(node, effect.peer)
            elif isinstance(effect, SetTimer):
                self._schedule(
                    effect.delay, self._fire_timer, (node, node.life, layer_name, effect.timer)
                )
            elif isinstance(effect, Emit):
                self._emit(node, layer_name, effect.event)

    def _emit(self, node: SimNode, layer_name: str, event: Event) -> None:
        """`event`, emitted by `node`'s layer `layer_name`, goes to its other layers."""
        if isinstance(event, Delivered):
            record = self.broadcasts.get(event.id)
            if record is not None and node.peer.id not in record.hops:
                record.hops[node.peer.id] = event.hops
                record.last_delivery_at = self.now
        elif node.waiting and isinstance(event, PeerUp | PeerDown) and layer_name == MEMBERSHIP:
            self._next_drive(node, 0.0, waiting=False)  # the runtime's `view_changed`
        node.event_counts[type(event)] += 1
        if self.driver.record_events:
            node.events.append(event)
        now = self.now
        for name, layer in node.stack.layers.items():
            if name != layer_name:
                effects = layer.handle_event(event, now)
                if effects:
                    self._apply(node, name, effects)

    def _fire_timer(self, node: SimNode, life: int, layer_name: str, timer: Hashable) -> None:
        if not node.alive or life != node.life:
            return
        if isinstance(timer, ShuffleTimer) and self.now < self.rounds_from:
            period = self.hyparview_config.shuffle_interval
            delay = self.rounds_from - self.now + self._rounds_rng.uniform(0, period)
            self._schedule(delay, self._fire_timer, (node, life, layer_name, timer))
            return
        effects = node.stack.layers[layer_name].handle_timer(timer, self.now)
        if effects:
            self._apply(node, layer_name, effects)

    def _link_down(self, node: SimNode, peer: Peer) -> None:
        for name, layer in node.stack.layers.items():
            if not node.alive:
                return
            self._apply(node, name, layer.handle_link_down(peer, self.now))

    def _receive(self, source: SimNode, dest: SimNode, message: Message) -> None:
        if isinstance(message, _PAYLOADS):
            record = self.broadcasts.get(message.id)
            if record is not None:
                record.payloads += 1
        stack = dest.stack
        layer_name = stack.routes.get(type(message))
        if layer_name is None:
            self._dropped[type(message)] += 1
            return
        effects = stack.layers[layer_name].handle_message(source.peer, message, self.now)
        if effects:
            self._apply(dest, layer_name, effects)
