"""The replica driver: barrel_p2p_replica in Python, one supervised task per named instance.

An *instance* is a named piece of replicated state whose owner (a `ReplicatedMap`, or any
store with its own merge rules) implements `ReplicaCallbacks`. The driver moves the state
between nodes; the owner decides what it means. Every callback receives the instance name
first, so one owner object can back many instances.

What the driver does (SPEC section 8, with the seed's flaws fixed):

* **Updates**: `broadcast_update(Add(key, value) | Remove(key))` first waits for the node's
  outgoing budget (flow control: a writer faster than the cluster is slowed here, before
  anything is applied), then mints one HLC dot for the write, hands the delta to the
  owner's `merge_delta` (so the local state holds exactly the entry the cluster gets, and a
  persistent owner acknowledges only once it is durable), then queues its broadcast on the
  instance's tag without waiting again. `broadcast_custom(payload)` carries an
  owner-specific payload to `merge_custom` on every other node.
* **Bookkeeping** is the sans-IO `core.replication.ReplicationCore`: the peers (seeded from
  the active view at start, then `PeerUp` / `PeerDown`) and the hosts of the instance (the
  host directory, `trio_replica.stores.hosts`), whom to compare with and when (at start, with a
  new host or neighbour, every anti-entropy interval with +-25% integer jitter, after
  entries arrived, after lost deliveries or a restarted feed), the comparisons and their
  limits, and removals. This driver feeds it every input and carries out its effects:
  `Serve` (streamed by `digestsync.ServeQueue`), `SetTimer`, the owner's `remove_node` and
  `sync_completed`, and full-state pulls and pushes for owners without a digest.
* **Removal of a node's data** (`remove_node`) happens once per departure, on every node,
  when the node is gone for the cluster (`NodeRemoved`: it left, or its failure was
  confirmed, `trio_replica.runtime.departures`); never when a live peer was merely evicted from the
  active view or one link to it was lost (barrel_p2p drops a live node's data there).
* **Full sync** travels as direct `SyncRequest` / `SyncChunk` messages, not through
  Plumtree, so it works while the broadcast component restarts. A snapshot is a list of
  items; a sender task per peer encodes it in chunks of at most `sync_chunk_bytes` and
  queues each only when the link has room (it never holds the node's pressure), so a large
  map streams instead of flooding the outbox. One sync per peer runs at a time; requests
  that arrive meanwhile are folded into one more. Each chunk is applied on arrival. A chunk
  is a snapshot of some keys, so a partial sync never implies a removal.

Everything the driver receives (deliveries, membership events, direct messages, timer
ticks) goes through one `FairInbox` (bounded per source: deliveries, membership, each peer's
direct messages) and is handled by one task, so callbacks never run concurrently for one
instance. Its deliveries come from a subscription with backpressure: a driver that falls
behind slows the node's writers (and the peers' own broadcasts entering through the node)
before it loses anything, and a loss is told (`Lagged`) and repaired by a sync.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import math
import random
from collections import Counter
from collections.abc import AsyncGenerator, Hashable, Iterable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import attrs
import trio

from ..core.antientropy import DigestRound
from ..core.effects import SetTimer
from ..core.events import Delivery, Lagged, NodeRemoved, PeerDown, PeerUp, Resubscribed
from ..core.hlc import Timestamp
from ..core.messages import MAX_TAG, Peer, SyncChunk, SyncDigest, SyncRequest
from ..core.ormap import Dot
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
from ..core.wire import Chunker, decode_payload, encode_payload
from ..errors import LinkClosed, MessageTooLarge, NodeClosed, WireError
from .digestsync import ServeQueue
from .flow import FairInbox

if TYPE_CHECKING:
    from ..node import Node

log = logging.getLogger("trio_replica.replica")

#: Broadcast tags of replica instances start with this; applications should not use it.
TAG_PREFIX = "replica/"
#: Inputs handled (and deliveries moved to the inbox) per wake-up of a driver's tasks: a
#: wake-up per delivery made a busy driver fall behind its own broadcast component.
DRAIN_BATCH = 64


@runtime_checkable
class ReplicaCallbacks(Protocol):
    """What the owner of a replica instance implements (the seed's behaviour callbacks).

    All callbacks are awaited by the instance's driver task, one at a time. Deltas and
    snapshots come straight off the network: the owner must validate them (the
    `ReplicatedMap` does so with `ormap_wire.ingest`). A callback that raises is logged
    and counted in the driver's `callback_errors`; the driver keeps running.

    Optional members: ``async def merge_custom(name, payload)`` for `broadcast_custom`
    payloads; a boolean attribute ``anti_entropy`` that turns periodic anti-entropy on
    (for value-carrying stores with a full-state snapshot and tombstones);
    ``full_sync_stream(name)``, an async generator of lists of items, used instead of
    `full_sync_snapshot` when present: it walks the state as the sync streams (a batch is
    built when the link has room for the one before), so a large state is never copied
    whole; state that changes meanwhile travels as deltas anyway.

    Digest anti-entropy (`trio_replica.runtime.digestsync`), when the owner has both
    ``digest_source(name)`` (a `core.antientropy.DigestSource`) and
    ``range_stream(name, level, index)`` (an async generator of item batches): the state
    is compared with peers by range digests and only differing ranges move; full-state
    sync is then not used. With it, ``async def before_sync(name)`` runs before every
    comparison (the map drops stale entries there) and ``async def sync_completed(name,
    started_ms)`` after each comparison this node opened completes.
    """

    async def merge_delta(self, name: str, delta: Any) -> None:
        """Merge a delta (OR-Map wire entries) into the owner's state and run side effects."""

    async def apply_full_sync(self, name: str, snapshot: list[Any]) -> None:
        """Apply one chunk of a peer's full snapshot (never implies removal of other keys)."""

    async def full_sync_snapshot(self, name: str) -> list[Any] | None:
        """The owner's whole state as a new list of items, or None when there is nothing to
        send. The replica owns the list: it empties it once the snapshot has been sent."""

    async def remove_node(self, name: str, node: str) -> None:
        """Drop what `node` owned: it failed or left the cluster."""


@attrs.frozen
class Add:
    """Set `key` to `value` (one dot per write)."""

    key: Any
    value: Any


@attrs.frozen
class Remove:
    """Remove `key` (a tombstone with its own dot)."""

    key: Any


@attrs.frozen
class ReplicaConfig:
    """Settings of replica instances."""

    #: Mean anti-entropy period in seconds (each tick jittered by +-25%); SPEC default 30 s.
    anti_entropy_interval: float = 30.0
    #: Largest chunk of a full sync, in bytes of CBOR. Decoding one strictly and merging it
    #: takes loop time in proportion (about 25 ms for 64 KiB of small entries; 256 KiB held
    #: the loop for 100 ms, issue 13).
    sync_chunk_bytes: int = 64 * 1024
    #: Inputs of one source (deliveries, membership events, one peer's direct messages)
    #: waiting for the driver task; a source beyond it waits (a peer is then not read).
    inbox_size: int = 1024
    #: Bytes waiting for the driver task, all sources together (one source with nothing
    #: waiting is always admitted one input).
    inbox_bytes: int = 8 * 1024 * 1024
    #: Deliveries buffered between the broadcast component and the driver; at half of it
    #: the node slows down (backpressure) before the driver would miss any.
    delivery_buffer: int = 1024
    #: Shortest time between two sync pulls after `Lagged` notices.
    resync_interval: float = 1.0
    #: Digest anti-entropy (for owners that offer a digest: `digestsync`).
    digest: DigestSyncConfig = attrs.field(factory=DigestSyncConfig)
    #: A full sync (owners without a digest) served to one peer is not served to it again
    #: sooner than this: requests meanwhile wait, folded into one.
    full_sync_again_after: float = 10.0

    def __attrs_post_init__(self) -> None:
        from ..errors import ConfigError

        if not self.anti_entropy_interval > 0:
            raise ConfigError("replica.anti_entropy_interval must be positive")
        if self.sync_chunk_bytes < 1024:
            raise ConfigError("replica.sync_chunk_bytes must be at least 1024")
        for name in ("inbox_size", "inbox_bytes", "delivery_buffer"):
            if getattr(self, name) < 1:
                raise ConfigError(f"replica.{name} must be at least 1")
        if not (math.isfinite(self.resync_interval) and self.resync_interval >= 0):
            raise ConfigError("replica.resync_interval must be >= 0")


#: Items per batch when a snapshot list is streamed, and freed per step after.
RELEASE_SLICE = 8192


async def _batches_of(snapshot: list[Any]) -> AsyncGenerator[list[Any], None]:
    """A snapshot list as a stream of batches; emptied a slice at a time once sent
    (freeing a million entries in one go held the loop for 112 ms, bench/bigmap.py)."""
    try:
        for start in range(0, len(snapshot), RELEASE_SLICE):
            yield snapshot[start : start + RELEASE_SLICE]
    finally:
        with trio.CancelScope(shield=True):
            while snapshot:
                del snapshot[-RELEASE_SLICE:]
                await trio.lowlevel.checkpoint()


@attrs.define
class ReplicaStats:
    """What the driver moved; the bookkeeping's counters are the core's
    (`Replica.core.stats`, `core.digest_stats`)."""

    deltas_sent: int = 0
    deltas_received: int = 0
    customs_sent: int = 0
    customs_received: int = 0
    sync_requests_received: int = 0
    syncs_sent: int = 0
    chunks_sent: int = 0
    chunks_received: int = 0
    #: Sync requests folded into a sync already running or waiting for the same peer.
    syncs_coalesced: int = 0
    #: Full syncs put off because the peer had one within `full_sync_again_after`.
    syncs_deferred: int = 0
    #: Full syncs cut short because the peer's link closed.
    syncs_aborted: int = 0
    callback_errors: int = 0
    #: Digest answers not sent because the owner's `before_sync` had failed.
    serves_withheld: int = 0
    rejected: Counter[str] = attrs.Factory(Counter)


class Replica:
    """The driver of one replica instance. Created by `Node.open_replica`, which runs it."""

    def __init__(
        self,
        node: Node,
        name: str,
        callbacks: ReplicaCallbacks,
        config: ReplicaConfig,
        rng: random.Random,
    ) -> None:
        if not 0 < len(TAG_PREFIX + name) <= MAX_TAG:
            raise ValueError(f"instance name must be 1 to {MAX_TAG - len(TAG_PREFIX)} characters")
        self.node = node
        self.name = name
        self.tag = TAG_PREFIX + name
        self.callbacks = callbacks
        self.config = config
        self._rng = rng
        self.stats = ReplicaStats()
        self._inbox = FairInbox[tuple[str, Any]](
            source_items=config.inbox_size,
            source_bytes=config.inbox_bytes,
            total_bytes=config.inbox_bytes,
            on_taken=node.input_processed,
        )
        self._sync_ids = 0
        self.anti_entropy = bool(getattr(callbacks, "anti_entropy", False))
        self._scope = trio.CancelScope()
        self.closed = trio.Event()
        #: Full syncs being sent, by peer id; True when another was asked for meanwhile.
        self._sending: dict[str, bool] = {}
        self._nursery: trio.Nursery | None = None
        digest_owner = callable(getattr(callbacks, "digest_source", None)) and callable(
            getattr(callbacks, "range_stream", None)
        )
        #: The host directory itself is hosted by every node: it syncs with neighbours.
        from ..stores.hosts import DIRECTORY

        self._everywhere = name == DIRECTORY
        #: The bookkeeping (peers, hosts, comparisons, scheduling, removals): sans-IO.
        self.core = ReplicationCore(
            node.id,
            source=callbacks.digest_source(name) if digest_owner else None,  # type: ignore[attr-defined]
            rng=rng,
            config=config.digest,
            anti_entropy_interval=config.anti_entropy_interval if self.anti_entropy else None,
            resync_interval=config.resync_interval,
            everywhere=self._everywhere,
        )
        #: Carries out the core's `Serve` effects (digest owners only), once running.
        self._serves: ServeQueue | None = None
        self._timers: list[tuple[float, int, Hashable]] = []
        self._timer_seq = itertools.count()
        self._timers_changed = trio.Event()
        #: When the last full sync to each peer ended (`full_sync_again_after`), and the
        #: peers whose next one waits for that window.
        self._full_sync_done: dict[str, float] = {}
        self._deferred: set[str] = set()
        #: False while the owner's `before_sync` fails: our state must not go out.
        self._state_ready = True
        #: Host changes told by the directory, not yet handed to the core (latest per id).
        self._host_changes: dict[str, tuple[Peer, bool]] = {}

    @property
    def uses_digest(self) -> bool:
        """Whether this instance syncs by digest comparison (the owner offers a digest)."""
        return self.core.source is not None

    @property
    def peers(self) -> dict[str, Peer]:
        """The neighbours this instance knows, by id."""
        return self.core.neighbors

    async def compare_with(self, peer: Peer) -> None:
        """Compare with (digest owners) or pull from `peer` now, or once the comparisons
        running end. For tests and tools: anti-entropy does this on its own."""
        await self._before_sync()
        await self._apply(self.core.compare(peer, trio.current_time()))

    # --- API used by owners ---------------------------------------------------------------

    def new_dot(self) -> Dot:
        ts: Timestamp = self.node.clock.now()
        return Dot(self.node.id, ts)

    async def broadcast_update(self, update: Add | Remove) -> Dot:
        """Apply `update` locally through the owner, then broadcast it; return its dot.

        Raises what the owner's `merge_delta` raises for a local write (nothing is sent
        then), `MessageTooLarge` or `TypeError` for a value that cannot travel.
        """
        from ..core.ormap import Tombstone, Value
        from ..core.ormap_wire import to_wire

        self._check_open()
        # Flow control first: once applied here, the write must go out without waiting.
        await self.node.writable()
        self._check_open()
        dot = self.new_dot()
        entry = Value(update.value, dot) if isinstance(update, Add) else Tombstone(dot)
        delta = to_wire([(update.key, entry)])
        if self.node.config.identity.sign_broadcasts:
            # The entry itself is signed, not only the broadcast: it keeps its writer's
            # signature in every later sync and in the stores of the nodes it reaches.
            delta[0].append(self.node.sign_entry(self.name, update.key, entry))
        body = ["d", delta]
        # Encode before the local merge: a write that cannot travel must not be applied here.
        encoded = encode_payload(body, max_size=self.node.config.max_payload)
        # The owner gets the delta as every peer does, decoded from these bytes: a value the
        # caller mutates after the write can change neither the local state nor its digest
        # (an entry's hash is added at merge and subtracted at its replacement).
        local = decode_payload(encoded, max_size=self.node.config.max_payload)[1]
        await self.callbacks.merge_delta(self.name, local)
        self.node.broadcast_encoded_nowait(self.tag, encoded, body)
        self.stats.deltas_sent += 1
        return dot

    async def broadcast_custom(self, payload: Any) -> None:
        """Send an owner-specific payload to `merge_custom` on every other node."""
        self._check_open()
        await self.node.broadcast(self.tag, ["c", payload])
        self.stats.customs_sent += 1

    def _check_open(self) -> None:
        if self.closed.is_set() or self._scope.cancel_called:
            raise NodeClosed(f"replica {self.name!r} is closed")

    # --- inputs from the node -------------------------------------------------------------

    async def deliver_direct(
        self,
        source: Hashable,
        peer: Peer,
        message: SyncRequest | SyncChunk | SyncDigest,
        size: int,
    ) -> None:
        """A direct message for this instance arrived on `source` (a link).

        Waits while that link's share of the inbox is full: its reader stops, and the peer
        is slowed rather than its sync chunks dropped.
        """
        item = ("direct", (peer, message))
        # A sync chunk is a payload: its link grants credit once the driver takes it.
        credit = size if message.CREDITED else 0
        if not self._inbox.put_nowait(source, item, size, credit):
            await self._inbox.put(source, item, size, credit)

    # --- running --------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until `aclose` or the node closes. Started by `Node.open_replica`."""
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    await nursery.start(self._pump_broadcast)
                    await nursery.start(self._pump_membership)
                    nursery.start_soon(self._run_timers)
                    hosts: list[Peer] = []
                    if self.uses_digest:
                        self._serves = ServeQueue(
                            self.name,
                            self.callbacks,  # type: ignore[arg-type]
                            self.node.send_message,
                            lambda: Chunker(self.config.sync_chunk_bytes),
                            nursery,
                            self.core.served,
                        )
                        if not self._everywhere:
                            # Sync with the hosts of this instance, wherever they are.
                            self.node.hosts.listen(self.name, self._host_changed)
                            await self.node.hosts.announce(self.name)
                            hosts = self.node.hosts.hosts(self.name)
                        await self._before_sync()
                    # Seeded from the active view: PeerUp fires only for future peers.
                    await self._apply(
                        self.core.start(self.node.active_view(), hosts, trio.current_time())
                    )
                    task_status.started()
                    inbox = self._inbox
                    while True:
                        kind, data = await inbox.get()
                        await self._handle(kind, data)
                        for _ in range(DRAIN_BATCH):
                            try:
                                kind, data = inbox.get_nowait()
                            except trio.WouldBlock:
                                break
                            await self._handle(kind, data)
        finally:
            if self.uses_digest and not self._everywhere:
                self.node.hosts.unlisten(self.name)
            self.node.forget_replica(self)
            self.closed.set()

    async def aclose(self) -> None:
        """Stop the driver task (queued inputs are discarded) and tell the other nodes
        that this one no longer hosts the instance (within a second, best effort)."""
        if self.uses_digest and not self._everywhere and not self.closed.is_set():
            with trio.move_on_after(1.0), contextlib.suppress(NodeClosed):
                await self.node.hosts.withdraw(self.name)
        self._scope.cancel()
        await self.closed.wait()

    async def _pump_broadcast(self, *, task_status: trio.TaskStatus[None]) -> None:
        # Backpressure: a driver that falls behind slows the node before it misses anything.
        async with self.node.subscribe(
            self.tag, buffer=self.config.delivery_buffer, backpressure=True
        ) as sub:
            task_status.started()
            inbox = self._inbox
            while True:
                try:
                    batch = [await sub.receive()]
                except trio.EndOfChannel:
                    return
                # What is already buffered moves in the same wake-up.
                while len(batch) < DRAIN_BATCH:
                    try:
                        batch.append(sub.receive_nowait())
                    except trio.WouldBlock:
                        break
                for item in batch:
                    size = len(item.payload) if isinstance(item, Delivery) else 0
                    entry = ("delivery", item)
                    if not inbox.put_nowait("delivery", entry, size):
                        await inbox.put("delivery", entry, size)

    async def _pump_membership(self, *, task_status: trio.TaskStatus[None]) -> None:
        async with self.node.events() as events:
            task_status.started()
            async for event in events:
                await self._inbox.put("membership", ("membership", event), 0)

    async def _run_timers(self) -> None:
        """Hand the core's timers back to the driver task when they fall due."""
        while True:
            changed = self._timers_changed
            deadline = self._timers[0][0] if self._timers else math.inf
            with trio.move_on_at(deadline):
                await changed.wait()
            if changed.is_set():
                self._timers_changed = trio.Event()
            now = trio.current_time()
            while self._timers and self._timers[0][0] <= now:
                _, _, timer = heapq.heappop(self._timers)
                await self._inbox.put("tick", ("timer", timer), 0)

    # --- effects --------------------------------------------------------------------------

    async def _apply(self, effects: Iterable[Any]) -> None:
        """Carry out the core's effects, in order. An owner callback that raises is logged
        and counted; the effects after it still run (a timer lost would end anti-entropy)."""
        for effect in effects:
            try:
                await self._execute(effect)
            except Exception:
                self.stats.callback_errors += 1
                log.exception("replica %s: callback failed while applying %s", self.name, effect)

    async def _execute(self, effect: Any) -> None:
        match effect:
            case SetTimer(delay=delay, timer=timer):
                when = trio.current_time() + delay
                heapq.heappush(self._timers, (when, next(self._timer_seq), timer))
                self._timers_changed.set()
            case Serve():
                if self._serves is None:
                    # An owner without a digest: only the bare answer that ends a peer's
                    # comparison (`ReplicationCore.round_received`).
                    for r in effect.rounds:
                        message = SyncDigest(
                            self.name, effect.session, r.level, r.parents, r.digests, r.want
                        )
                        self.node.send_to(effect.peer, message)
                elif self._state_ready:
                    self._serves.push(effect)
                else:
                    self.stats.serves_withheld += 1
                    self.core.served(effect.peer.id, effect.ticket, sent=False)
            case CancelServes(peer_id=peer_id):
                if self._serves is not None:
                    self._serves.drop(peer_id)
            case SyncCompleted(opened=opened):
                sync_completed = getattr(self.callbacks, "sync_completed", None)
                if sync_completed is not None:
                    ago = trio.current_time() - opened
                    started_ms = self.node.clock.read_physical() - round(ago * 1000)
                    await sync_completed(self.name, started_ms)
            case RemoveNode(node=node_id):
                await self.callbacks.remove_node(self.name, node_id)
            case RequestFullSync(peer=peer):
                self.node.send_to(peer, SyncRequest(self.name))
            case PushFullSync(peer=peer):
                await self._send_full_sync(peer)
            case _:
                raise TypeError(f"unknown effect {effect!r}")

    # --- inputs ---------------------------------------------------------------------------

    async def _handle(self, kind: str, data: Any) -> None:
        core = self.core
        try:
            if kind == "delivery":
                await self._on_delivery(data)
            elif kind == "membership":
                await self._on_membership(data)
            elif kind == "direct":
                await self._on_direct(*data)
            elif kind == "timer":
                await self._before_sync()
                await self._apply(core.handle_timer(data, trio.current_time()))
            elif kind == "hosts":
                changes, self._host_changes = self._host_changes, {}
                await self._before_sync()
                for peer, added in changes.values():
                    now = trio.current_time()
                    if added:
                        await self._apply(core.host_added(peer, now))
                    else:
                        await self._apply(core.host_removed(peer.id, now))
            elif kind == "push":
                await self._send_full_sync(data)
        except (WireError, MessageTooLarge) as exc:
            self.stats.rejected[getattr(exc, "reason", "too_large")] += 1
            log.warning("replica %s: rejected input (%s): %s", self.name, kind, exc)
        except Exception:
            # The owner's callbacks are application code: a bug there must not end
            # replication for this instance. Logged with the traceback and counted.
            self.stats.callback_errors += 1
            log.exception("replica %s: callback failed while handling %s", self.name, kind)

    async def _on_delivery(self, item: Delivery | Lagged | Resubscribed) -> None:
        now = trio.current_time()
        if isinstance(item, Resubscribed):
            # The broadcast source restarted: deltas may have been missed. Recover them.
            await self._before_sync()
            await self._apply(self.core.resubscribed(self.node.active_view(), now))
            return
        if isinstance(item, Lagged):
            # Deltas were lost on the way to us (we fell behind, or a broadcast could not
            # be fetched): pull them, coalesced with other notices (the core).
            await self._before_sync()
            await self._apply(self.core.deliveries_lost(item.missed, now))
            return
        body = item.payload
        if type(body) is not list or len(body) != 2 or body[0] not in ("d", "c"):
            self.stats.rejected["envelope"] += 1
            log.warning("replica %s: malformed broadcast from %s", self.name, item.origin)
            return
        if body[0] == "d":
            self.stats.deltas_received += 1
            await self.callbacks.merge_delta(self.name, body[1])
        else:
            self.stats.customs_received += 1
            merge_custom = getattr(self.callbacks, "merge_custom", None)
            if merge_custom is not None:
                await merge_custom(self.name, body[1])

    async def _on_membership(self, event: Any) -> None:
        core, now = self.core, trio.current_time()
        if isinstance(event, Lagged):
            # Membership events were lost: the peer set may be stale, and a `NodeRemoved`
            # may be among them (`remove_node` stays once per departure).
            active = self.node.active_view()
            await self._apply(core.membership_lagged(active, self.node.departures.removed(), now))
            if self.uses_digest and not self._everywhere:
                # Host changes ride on the same events: take the directory as it stands.
                await self._apply(core.set_hosts(self.node.hosts.hosts(self.name), now))
        elif isinstance(event, Resubscribed):
            await self._before_sync()
            await self._apply(core.resubscribed(self.node.active_view(), now))
        elif isinstance(event, PeerUp):
            await self._before_sync()
            await self._apply(core.peer_up(event.peer, now))
        elif isinstance(event, PeerDown):
            self._full_sync_done.pop(event.peer.id, None)
            await self._apply(core.peer_down(event.peer.id, now))
        elif isinstance(event, NodeRemoved):
            # Gone for the cluster (left, or its failure confirmed: departures.py), told
            # once on every node. A peer that only left our active view (evicted, or a
            # link lost while others still reach it) keeps its data.
            await self._apply(core.node_removed(event.node, now))

    async def _on_direct(self, peer: Peer, message: SyncRequest | SyncChunk | SyncDigest) -> None:
        now = trio.current_time()
        if isinstance(message, SyncDigest):
            if self.uses_digest:
                await self._before_sync()
            round_ = DigestRound(message.level, message.parents, message.digests, message.want)
            await self._apply(self.core.round_received(peer, message.session, round_, now))
            return
        if isinstance(message, SyncRequest):
            self.stats.sync_requests_received += 1
            await self._send_full_sync(peer)
            return
        self.stats.chunks_received += 1
        items = decode_payload(message.items, max_size=self.node.config.max_payload)
        if type(items) is not list:
            raise WireError("a sync chunk must carry a list", reason="shape")
        source = self.core.source
        before = source.range_digest(0, 0) if source is not None else None
        await self.callbacks.apply_full_sync(self.name, items)
        # Whether it taught us anything (a follow-up comparison is worth it only then).
        changed = source is None or source.range_digest(0, 0) != before
        now = trio.current_time()
        await self._apply(self.core.chunk_received(peer.id, message.sync_id, now, changed=changed))

    def _host_changed(self, peer: Peer, added: bool) -> None:
        # Called by the directory's follower: never blocks, never loses a change. The
        # latest change per host waits here; one "hosts" input runs them all.
        if not self._host_changes:
            self._inbox.put_forced("tick", ("hosts", None), 0)
        self._host_changes.pop(peer.id, None)
        self._host_changes[peer.id] = (peer, added)

    async def _before_sync(self) -> None:
        """Let the owner prepare its state before it is compared (`before_sync`: a map out
        of touch for longer than its tombstone TTL drops what a forgotten delete hit).

        If that fails, nothing of this state goes out (`Serve`s are withheld, their
        sessions time out) until it succeeds: it runs again before every input. The core
        still gets the input, so its peers, timers and sessions stay true."""
        before_sync = getattr(self.callbacks, "before_sync", None)
        if before_sync is None:
            return
        try:
            await before_sync(self.name)
        except Exception:
            self.stats.callback_errors += 1
            if self._state_ready:
                log.exception("replica %s: before_sync failed; syncs withheld", self.name)
            self._state_ready = False
        else:
            self._state_ready = True

    async def _send_full_sync(self, peer: Peer) -> None:
        """Take a snapshot now and stream it to `peer` from a task of its own.

        One sync per peer at a time: asked again meanwhile, the running one is followed by
        one more with a fresh snapshot (requests are folded, never queued up).
        """
        if peer.id in self._sending or peer.id in self._deferred:
            if peer.id in self._sending:
                self._sending[peer.id] = True
            self.stats.syncs_coalesced += 1
            return
        done = self._full_sync_done.get(peer.id)
        allowed = -math.inf if done is None else done + self.config.full_sync_again_after
        if trio.current_time() < allowed:
            # Served a moment ago: one more, later, whatever the peer asks meanwhile (a
            # peer asking in a loop gets one full state per window, not one per request).
            assert self._nursery is not None
            self._deferred.add(peer.id)
            self.stats.syncs_deferred += 1
            self._nursery.start_soon(self._push_later, peer, allowed)
            return
        stream = getattr(self.callbacks, "full_sync_stream", None)
        if stream is not None:
            batches = stream(self.name)
        else:
            snapshot = await self.callbacks.full_sync_snapshot(self.name)
            if not snapshot:
                return
            batches = _batches_of(snapshot)
        assert self._nursery is not None
        self._sending[peer.id] = False
        self._nursery.start_soon(self._stream_sync, peer, batches)

    async def _push_later(self, peer: Peer, when: float) -> None:
        await trio.sleep_until(when)
        self._deferred.discard(peer.id)
        if peer.id in self.core.neighbors:
            await self._inbox.put("tick", ("push", peer), 0)

    async def _stream_sync(self, peer: Peer, batches: AsyncGenerator[list[Any], None]) -> None:
        try:
            async with contextlib.aclosing(batches):
                await self._stream_chunks(peer, batches)
            self._full_sync_done[peer.id] = trio.current_time()
        except LinkClosed:
            self.stats.syncs_aborted += 1
            log.info("replica %s: full sync to %s cut short: link closed", self.name, peer)
        finally:
            again = self._sending.pop(peer.id, False)
        if again and peer.id in self.core.neighbors:
            await self._inbox.put("tick", ("push", peer), 0)

    async def _stream_chunks(self, peer: Peer, batches: AsyncGenerator[list[Any], None]) -> None:
        self._sync_ids += 1
        sync_id = (self._rng.getrandbits(32) << 32) | (self._sync_ids & 0xFFFFFFFF)
        chunker = Chunker(self.config.sync_chunk_bytes)
        pending: bytes | None = None  # held back until we know whether it is the last
        seq = 0
        while True:
            try:
                batch = await anext(batches)
            except StopAsyncIteration:
                break
            except Exception:
                # The owner's generator is application code (the class docstring).
                self.stats.callback_errors += 1
                self.stats.syncs_aborted += 1
                log.exception(
                    "replica %s: full_sync_stream failed; sync to %s cut", self.name, peer
                )
                return
            for item in batch:
                chunk = chunker.add(item)
                if chunk is None:
                    continue
                if pending is not None:
                    await self._send_chunk(peer, sync_id, seq, False, pending)
                    seq += 1
                pending = chunk
        last = chunker.flush()
        if last is not None:
            if pending is not None:
                await self._send_chunk(peer, sync_id, seq, False, pending)
                seq += 1
            pending = last
        if pending is None:
            return
        await self._send_chunk(peer, sync_id, seq, True, pending)
        self.stats.syncs_sent += 1

    async def _send_chunk(
        self, peer: Peer, sync_id: int, seq: int, last: bool, chunk: bytes
    ) -> None:
        if len(chunk) > self.node.config.max_payload:
            self.node.stats_counters.drop("sync_item_too_large")
            return
        # Waits for room on the link: a large snapshot streams, it does not flood.
        await self.node.send_message(peer, SyncChunk(self.name, sync_id, seq, last, chunk))
        self.stats.chunks_sent += 1
