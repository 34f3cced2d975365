"""The replica driver: barrel_p2p_replica in Python, one supervised task per named instance.

An *instance* is a named piece of replicated state whose owner implements `ReplicaCallbacks`
(`trio_replica.runtime.replica_api`: what owners implement and see). The driver moves the
state between nodes; the owner decides what it means.

What the driver does (SPEC section 8, with the seed's flaws fixed):

* **Updates** (`broadcast_update`, `broadcast_custom`) are the owner's writes, carried out
  by `replica_writes.ReplicaWriter`: one HLC dot each, the local merge (concurrent writes
  merged together), then the broadcast on the instance's tag, the writes of a busy moment
  batched into one delta by the writer's flusher (a task of each life).
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
* **Full sync** travels as direct `SyncRequest` / `SyncChunk` messages, streamed per peer
  by `fullsync.FullSyncSender`. Each chunk is applied on arrival. A chunk is a snapshot of
  some keys, so a partial sync never implies a removal.

Everything the driver receives (deliveries, membership events, direct messages, timer
ticks, fed by `replica_inputs`) goes through one `FairInbox` (bounded per source:
deliveries, membership, each peer's direct messages) and is handled by one task, so
callbacks never run concurrently for one instance. Its deliveries come from a subscription
with backpressure: a driver that falls behind slows the node's writers (and the peers' own
broadcasts entering through the node) before it loses anything, and a loss is told
(`Lagged`) and repaired by a sync.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Callable, Hashable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

import trio

from ..core.antientropy import DigestRound
from ..core.effects import SetTimer
from ..core.events import Delivery, Lagged, NodeRemoved, PeerDown, PeerUp, Resubscribed
from ..core.messages import MAX_TAG, Peer, SyncChunk, SyncDigest, SyncRequest
from ..core.ormap import Dot
from ..core.replication import (
    CancelServes,
    PushFullSync,
    RemoveNode,
    ReplicationCore,
    RequestFullSync,
    Serve,
    SyncCompleted,
)
from ..core.wire import Chunker, decode_payload
from ..errors import CallbackHung, MessageTooLarge, NodeClosed, WireError
from .component import ComponentCrash
from .config import ReplicaConfig
from .digestsync import ServeQueue
from .fullsync import FullSyncSender
from .inbox import FairInbox
from .replica_api import TAG_PREFIX, Add, Remove, ReplicaCallbacks, ReplicaStats
from .replica_inputs import DRAIN_BATCH, TimerQueue, pump_broadcast, pump_membership
from .replica_writes import ReplicaWriter, WriterHost
from .services import Directory, Sending
from .supervision import Restarts
from .watchdog import CallbackWatch, hung_error

if TYPE_CHECKING:
    from .departures import Departures

log = logging.getLogger("trio_replica.replica")


class ReplicaHost(WriterHost, Sending, Protocol):
    """What a replica driver uses of its node."""

    @property
    def hosts(self) -> Directory: ...
    @property
    def departures(self) -> Departures: ...

    def forget_replica(self, replica: Replica) -> None: ...


class Replica:
    """The driver of one replica instance. Created by `Node.open_replica`, which runs it."""

    def __init__(
        self,
        node: ReplicaHost,
        name: str,
        callbacks: ReplicaCallbacks,
        config: ReplicaConfig,
        rng: random.Random,
        *,
        everywhere: bool = False,
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
        self.anti_entropy = bool(getattr(callbacks, "anti_entropy", False))
        self._scope = trio.CancelScope()
        self.closed = trio.Event()
        self.writes = ReplicaWriter(  # the owner's writes, batched
            node, name, self.tag, callbacks, self.stats, self.closed, self._scope, config
        )
        self._nursery: trio.Nursery | None = None
        digest_owner = callable(getattr(callbacks, "digest_source", None)) and callable(
            getattr(callbacks, "range_stream", None)
        )
        #: An instance every node hosts (the host directory) syncs with its neighbours.
        self._everywhere = everywhere
        self._digest_owner = digest_owner
        #: The bookkeeping (peers, hosts, comparisons, scheduling, removals): sans-IO.
        self.core = self._new_core()
        #: Crashes, restarts and the restart budget of the driver (`supervision.Restarts`).
        self.supervision = Restarts(f"replica {name}")
        self._crash_requested = False
        #: Owner callbacks run through it; its task ends a life one of them hangs.
        self._watch = CallbackWatch(name, config.callback_timeout, node.health)
        self._callback = self._watch.call
        self._hung: CallbackHung | None = None
        #: Set while a life of the driver runs (replaced when it crashes).
        self.running = trio.Event()
        #: Carries out the core's `Serve` effects (digest owners only), once running.
        self._serves: ServeQueue | None = None
        self._timers = TimerQueue(self._inbox)
        #: Streams this instance's full state to the peers that ask for it or are pushed it.
        self._full_sync = FullSyncSender(
            node, name, callbacks, config, rng, self.stats, self._callback, self._push_again
        )
        #: False while the owner's `before_sync` fails: our state must not go out.
        self._state_ready = True
        #: Host changes told by the directory, not yet handed to the core (latest per id).
        self._host_changes: dict[str, tuple[Peer, bool]] = {}

    def _new_core(self) -> ReplicationCore:
        callbacks, config = self.callbacks, self.config
        source = callbacks.digest_source(self.name) if self._digest_owner else None  # type: ignore[attr-defined]
        return ReplicationCore(
            self.node.id,
            source=source,
            rng=self._rng,
            config=config.digest,
            anti_entropy_interval=config.anti_entropy_interval if self.anti_entropy else None,
            resync_interval=config.resync_interval,
            everywhere=self._everywhere,
        )

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
        return self.writes.new_dot()

    async def broadcast_update(self, update: Add | Remove) -> Dot:
        """Apply `update` here, then broadcast it; its dot (`ReplicaWriter`: what it raises)."""
        return await self.writes.broadcast_update(update)

    async def broadcast_custom(self, payload: Any) -> None:
        """Send an owner-specific payload to `merge_custom` on every other node."""
        await self.writes.broadcast_custom(payload)

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
        """Run until `aclose` or the node closes. Started by `Node.open_replica`.

        Supervised like a component once it has started (a failure before that is the
        opener's to see): a crash of the driver (a bug in it, or a callback that did not
        return within `callback_timeout`) is logged, and the driver starts again after a
        backoff with a fresh core, seeded from the active view and the instance's hosts
        as at its start (its inbox is kept: nothing queued is lost, and the comparisons
        it opens bring back what it missed meanwhile); past its restart budget
        `ComponentDead` closes the node (`supervision.Restarts`).
        """
        supervision = self.supervision
        started = False

        def report_started() -> None:
            nonlocal started
            if not started:
                started = True
                task_status.started()

        try:
            with self._scope:
                fresh = True
                while True:
                    supervision.started(trio.current_time())
                    try:
                        if not fresh:
                            self._reset()  # the owner's `digest_source` may raise: a crash too
                        fresh = False
                        await self._run_once(report_started)
                    except Exception as exc:
                        if not started:
                            raise
                        hung = hung_error(exc)
                        if hung is not None:
                            log.error("replica %s: %s; restarting its driver", self.name, hung)
                        else:
                            log.exception("replica %s: driver crashed; restarting", self.name)
                    if self.running.is_set():  # (`crash` may have replaced it already)
                        self.running = trio.Event()
                    # Past its budget this raises `ComponentDead`: the node closes.
                    await trio.sleep(supervision.crashed(trio.current_time()))
        finally:
            self.writes.close()
            self._inbox.close()  # what waits in it is dropped, its link credit returned
            if self.uses_digest and not self._everywhere:
                self.node.hosts.unlisten(self.name)
            self.node.forget_replica(self)
            self.closed.set()

    def crash(self) -> None:
        """Make the running driver fail as a crash would (`testing.crash_replica`); wait
        for `running` first: between two lives there is nothing to crash."""
        if self._nursery is None:
            raise RuntimeError(f"replica {self.name}: no life of the driver is running")
        self._crash_requested = True
        if self.running.is_set():
            self.running = trio.Event()
        self._nursery.cancel_scope.cancel()

    async def _run_once(self, report_started: Callable[[], None]) -> None:
        """One life of the driver: its pumps, its timers, its inputs."""
        self._hung = None
        try:
            await self._serve_life(report_started)
        finally:
            self._nursery = None
            if self._crash_requested:
                self._crash_requested = False
                raise ComponentCrash(f"replica {self.name}: crash requested")
            if self._hung is not None:
                raise self._hung

    async def _serve_life(self, report_started: Callable[[], None]) -> None:
        self._watch.watched = trio.lowlevel.current_task()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._full_sync.attach(nursery)
            buffer = self.config.delivery_buffer
            await nursery.start(pump_broadcast, self.node, self.tag, buffer, self._inbox)
            await nursery.start(pump_membership, self.node, self._inbox)
            nursery.start_soon(self._timers.run)
            nursery.start_soon(self.writes.run_flusher)
            nursery.start_soon(self._watch.run, self._end_hung_life)
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
            await self._apply(self.core.start(self.node.active_view(), hosts, trio.current_time()))
            report_started()
            self.supervision.started_once = True
            self.running.set()
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

    def _reset(self) -> None:
        """After a crash: a fresh core; what the dead life's tasks were doing is gone."""
        self.core = self._new_core()
        self._timers.clear()
        self._serves = None
        self._nursery = None
        self._full_sync.reset()
        self._host_changes.clear()

    @property
    def restarting(self) -> bool:
        """The driver started once and its current life is not running (yet)."""
        return self.supervision.started_once and not self.running.is_set()

    def _end_hung_life(self, error: CallbackHung) -> None:
        self.stats.callbacks_hung += 1
        if self.running.is_set():
            self.running = trio.Event()
        self._hung = error
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()

    async def aclose(self) -> None:
        """Stop the driver task (queued inputs are discarded) and tell the other nodes
        that this one no longer hosts the instance (within a second, best effort)."""
        if self.uses_digest and not self._everywhere and not self.closed.is_set():
            with trio.move_on_after(1.0), contextlib.suppress(NodeClosed):
                await self.node.hosts.withdraw(self.name)
        self._scope.cancel()
        await self.closed.wait()

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
                self._timers.set(delay, timer)
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
                    await self._callback("sync_completed", sync_completed, started_ms)
            case RemoveNode(node=node_id):
                await self._callback("remove_node", self.callbacks.remove_node, node_id)
            case RequestFullSync(peer=peer):
                self.node.send_to(peer, SyncRequest(self.name))
            case PushFullSync(peer=peer):
                await self._full_sync.send(peer)
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
                generation, timer = data
                if generation != self._timers.generation:
                    return  # armed by the core of a life that crashed
                await self._before_sync()
                await self._apply(core.handle_timer(timer, trio.current_time()))
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
                await self._full_sync.send(data)
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
            await self._callback("merge_delta", self.callbacks.merge_delta, body[1])
        else:
            self.stats.customs_received += 1
            merge_custom = getattr(self.callbacks, "merge_custom", None)
            if merge_custom is not None:
                await self._callback("merge_custom", merge_custom, body[1])

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
            self._full_sync.peer_down(event.peer.id)
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
            await self._full_sync.send(peer)
            return
        self.stats.chunks_received += 1
        items = decode_payload(message.items, max_size=self.node.config.max_payload)
        if type(items) is not list:
            raise WireError("a sync chunk must carry a list", reason="shape")
        source = self.core.source
        before = source.range_digest(0, 0) if source is not None else None
        await self._callback("apply_full_sync", self.callbacks.apply_full_sync, items)
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
            await self._callback("before_sync", before_sync)
        except Exception:
            self.stats.callback_errors += 1
            if self._state_ready:
                log.exception("replica %s: before_sync failed; syncs withheld", self.name)
            self._state_ready = False
        else:
            self._state_ready = True

    async def _push_again(self, peer: Peer) -> None:
        """One more full sync to `peer` (`FullSyncSender`), if it is still a neighbour."""
        if peer.id in self.core.neighbors:
            await self._inbox.put("tick", ("push", peer), 0)
