"""The replica layer of the simulator: the real replica core over a real OR-Map, in virtual time.

This module owns `ReplicaLayer`, a `sim.stack.Layer` that drives `core.replication.ReplicationCore`
as the runtime does (`trio_replica.runtime.replica`), over an `ormap.ORMap`: digest rounds and
sync chunks are the wire's own `SyncDigest` and `SyncChunk` messages, chunks are packed
by the runtime's `wire.Chunker`, and every message the layer sends is encoded with
`wire.encode_message` to count its bytes. Writes travel as the runtime's deltas on the
Plumtree layer of the same stack (`Simulator.broadcast` with a payload; `Delivered` comes
back as an event). What the simulator leaves out: a `Serve` is carried out at once (links
have no capacity here, so `peer_queue` never fills), and the host directory is an oracle
(`ReplicaLayer.host_added`, or every node hosts the instance and syncs with neighbours).

`replica_stack` builds stacks of membership, Plumtree and this layer; `write`, `digests`
and `converged` are the scenario helpers that bench/sim_replica.py uses.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Collection, Hashable, Iterable
from typing import Any

from ..core.antientropy import DigestRound
from ..core.effects import Effect, Send, SetTimer
from ..core.events import Delivered, Event, NodeRemoved, PeerDown, PeerUp
from ..core.hlc import Timestamp
from ..core.hyparview import HyParView, HyParViewConfig
from ..core.messages import Message, Peer, SyncChunk, SyncDigest
from ..core.ormap import Dot, ORMap, Tombstone, Value
from ..core.ormap_wire import from_wire, to_wire
from ..core.plumtree import Plumtree, PlumtreeConfig
from ..core.replication import (
    CancelServes,
    DigestSyncConfig,
    PushFullSync,
    RemoveNode,
    ReplicationCore,
    RequestFullSync,
    Serve,
    SyncCompleted,
)
from ..core.wire import Chunker, decode_payload, encode_message, encode_payload
from .broadcast import BROADCAST, PlumtreeLayer
from .overlay import Simulator
from .stack import MEMBERSHIP, HyParViewLayer, Stack, StackFactory

__all__ = ["REPLICA", "ReplicaLayer", "converged", "digests", "replica_stack", "write"]

#: The layer's name in a stack.
REPLICA = "replica"
#: The instance's name, and its broadcast tag (as `replica.TAG_PREFIX` makes it).
INSTANCE = "m"
TAG = "replica/" + INSTANCE
#: Virtual seconds to HLC milliseconds: dots start here, like a wall clock would.
EPOCH_MS = 1_700_000_000_000
MAX_PAYLOAD = 16 * 1024 * 1024


class ReplicaLayer:
    """One node's replica of instance `INSTANCE` (module docstring)."""

    kinds: tuple[type[Message], ...] = (SyncDigest, SyncChunk)

    def __init__(
        self,
        peer: Peer,
        rng: random.Random,
        *,
        state: ORMap | None = None,
        config: DigestSyncConfig | None = None,
        anti_entropy_interval: float = 30.0,
        chunk_bytes: int = 64 * 1024,
        hosts: Iterable[Peer] = (),
    ) -> None:
        self.peer = peer
        #: The hosts of the instance, as the directory would tell them (empty: every node
        #: hosts it, and the replica syncs with its neighbours).
        self.hosts = list(hosts)
        self.map = state if state is not None else ORMap()
        self.core = ReplicationCore(
            peer.id,
            source=self.map,
            rng=rng,
            config=config,
            anti_entropy_interval=anti_entropy_interval,
        )
        self.chunk_bytes = chunk_bytes
        self._started = False
        self._last = Timestamp(0, 0)
        #: Bytes this node sent, by message class name (encoded as on the wire).
        self.bytes_sent: Counter[str] = Counter()
        #: Messages it sent, by peer id.
        self.sent_to: Counter[str] = Counter()
        #: Entries it received in sync chunks, and nodes whose data it removed.
        self.entries_received = 0
        self.removed: list[str] = []
        #: Virtual times at which comparisons it opened completed.
        self.synced_at: list[float] = []

    # --- writes ---------------------------------------------------------------------------

    def local_write(self, key: Any, value: Any, now: float, *, delete: bool = False) -> bytes:
        """Apply a write here; return the delta payload to broadcast (as `broadcast_update`)."""
        wall = EPOCH_MS + int(now * 1000)
        last = self._last
        self._last = (
            Timestamp(wall, 0) if wall > last.wall else Timestamp(last.wall, last.logical + 1)
        )
        dot = Dot(self.peer.id, self._last)
        entry = Tombstone(dot) if delete else Value(value, dot)
        self.map.merge_entry(key, entry)
        return encode_payload(["d", to_wire([(key, entry)])], max_size=MAX_PAYLOAD)

    def _ingest(self, raw: Any) -> None:
        for key, entry in from_wire(raw):
            self.map.merge_entry(key, entry)

    # --- sim.stack.Layer ------------------------------------------------------------------

    def handle_message(self, sender: Peer, message: Message, now: float) -> list[Effect]:
        if isinstance(message, SyncDigest):
            round_ = DigestRound(message.level, message.parents, message.digests, message.want)
            return self._run(self.core.round_received(sender, message.session, round_, now))
        if isinstance(message, SyncChunk):
            items = decode_payload(message.items, max_size=MAX_PAYLOAD)
            self.entries_received += len(items)
            before = self.map.range_digest(0, 0)
            self._ingest(items)
            changed = self.map.range_digest(0, 0) != before
            return self._run(
                self.core.chunk_received(sender.id, message.sync_id, now, changed=changed)
            )
        return []

    def handle_timer(self, timer: Hashable, now: float) -> list[Effect]:
        return self._run(self.core.handle_timer(timer, now))

    def handle_link_down(self, peer: Peer, now: float) -> list[Effect]:
        return []

    def handle_event(self, event: Event, now: float) -> list[Effect]:
        if isinstance(event, PeerUp):
            if not self._started:
                # The first neighbour: the instance opens now (as a map opened at start
                # does once the node has joined).
                self._started = True
                return self._run(self.core.start([event.peer], self.hosts, now))
            return self._run(self.core.peer_up(event.peer, now))
        if isinstance(event, PeerDown):
            return self._run(self.core.peer_down(event.peer.id, now))
        if isinstance(event, NodeRemoved):
            return self._run(self.core.node_removed(event.node, now))
        if isinstance(event, Delivered) and event.tag == TAG:
            body = decode_payload(event.payload, max_size=MAX_PAYLOAD)
            self._ingest(body[1])
        return []

    def wants_link(self, peer_id: str) -> bool:
        # A comparison in progress keeps its (possibly temporary) link.
        return self.core.session_with(peer_id) is not None

    # --- effects --------------------------------------------------------------------------

    def _run(self, effects: Iterable[Any]) -> list[Effect]:
        out: list[Effect] = []
        for effect in effects:
            if isinstance(effect, SetTimer):
                out.append(effect)
            elif isinstance(effect, Serve):
                out += self._serve(effect)
            elif isinstance(effect, SyncCompleted):
                self.synced_at.append(effect.opened)
            elif isinstance(effect, RemoveNode):
                self.removed.append(effect.node)
            elif isinstance(effect, CancelServes | RequestFullSync | PushFullSync):
                pass  # nothing queued here; a map always has a digest
            else:
                raise TypeError(f"unknown effect {effect!r}")
        return out

    def _send(self, peer: Peer, message: Message) -> Send:
        self.bytes_sent[type(message).__name__] += len(encode_message(message))
        self.sent_to[peer.id] += 1
        return Send(peer, message)

    def _serve(self, serve: Serve) -> list[Effect]:
        """The entries of the ranges, then the rounds, in order (one FIFO link)."""
        out: list[Effect] = []
        peer, session = serve.peer, serve.session
        for level, index in serve.ranges:
            chunker = Chunker(self.chunk_bytes)
            seq = 0
            for keys in self.map.range_keys(level, index, 4096):
                for item in self.map.wire_entries(keys):
                    chunk = chunker.add(item)
                    if chunk is not None:
                        out.append(
                            self._send(peer, SyncChunk(INSTANCE, session, seq, False, chunk))
                        )
                        seq += 1
            last = chunker.flush()
            if last is not None:
                out.append(self._send(peer, SyncChunk(INSTANCE, session, seq, True, last)))
        for r in serve.rounds:
            message = SyncDigest(INSTANCE, session, r.level, r.parents, r.digests, r.want)
            out.append(self._send(peer, message))
        self.core.served(peer.id, serve.ticket)
        return out


def replica_stack(
    hyparview: HyParViewConfig,
    *,
    plumtree: PlumtreeConfig | None = None,
    digest: DigestSyncConfig | None = None,
    anti_entropy_interval: float = 30.0,
    initial: Callable[[str], ORMap | None] | None = None,
    hosts: Collection[str] | None = None,
) -> StackFactory:
    """Stacks of membership, Plumtree and (on `hosts`, or every node) a `ReplicaLayer`.

    `initial(node_id)` gives a node's starting state (None: empty). Each core gets its
    own generator derived from the node's, so the overlay is the one the membership-only
    stacks of the same seed form.
    """
    plumtree_config = plumtree or PlumtreeConfig()

    def derived(rng: random.Random, salt: int) -> random.Random:
        twin = random.Random()
        twin.setstate(rng.getstate())
        twin.seed(twin.getrandbits(64) ^ salt)
        return twin

    def make(peer: Peer, rng: random.Random) -> Stack:
        layers: dict[str, Any] = {
            MEMBERSHIP: HyParViewLayer(HyParView(peer, hyparview, rng)),
            BROADCAST: PlumtreeLayer(
                Plumtree(peer.id, plumtree_config, derived(rng, 0x9E3779B97F4A7C15))
            ),
        }
        if hosts is None or peer.id in hosts:
            layers[REPLICA] = ReplicaLayer(
                peer,
                derived(rng, 0x5851F42D4C957F2D),
                hosts=[Peer(h, f"sim://{h}") for h in sorted(hosts or ())],
                state=initial(peer.id) if initial is not None else None,
                config=digest,
                anti_entropy_interval=anti_entropy_interval,
            )
        return Stack(layers)

    return make


def _layers(sim: Simulator) -> list[ReplicaLayer]:
    out = []
    for node in sim.alive_nodes():
        layer = node.stack.layers.get(REPLICA)
        if isinstance(layer, ReplicaLayer):
            out.append(layer)
    return out


def write(sim: Simulator, node_id: str, key: Any, value: Any, *, delete: bool = False) -> None:
    """A write on live node `node_id`: applied there, then broadcast as a delta."""
    layer = sim.nodes[node_id].stack.layers[REPLICA]
    assert isinstance(layer, ReplicaLayer)
    payload = layer.local_write(key, value, sim.now, delete=delete)
    sim.broadcast(node_id, tag=TAG, payload=payload)


def digests(sim: Simulator) -> Counter[tuple[int, int]]:
    """How many live replicas hold each whole-state digest ``(sum, count)``."""
    return Counter(layer.map.range_digest(0, 0) for layer in _layers(sim))


def converged(sim: Simulator) -> bool:
    """Every live replica holds the same entries."""
    return len(digests(sim)) <= 1


def bytes_sent(sim: Simulator) -> Counter[str]:
    """Bytes the live replicas sent, by message class, since they started."""
    total: Counter[str] = Counter()
    for layer in _layers(sim):
        total.update(layer.bytes_sent)
    return total
