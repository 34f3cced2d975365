"""The node: one nursery that owns the listener, the links and the protocol components.

`open_node(config)` binds the listener, starts the membership component (and the
broadcast component), joins through the seeds, and yields a `Node`. Leaving the block
leaves the cluster gracefully (DISCONNECT to every active peer, flushed under a shielded
deadline) and cancels everything the node started: no task outlives it.

Links are kept here, one per peer id. Two nodes that dial each other at the same moment
end up with two connections; both sides keep the one dialed by the node with the smaller
id and move anything queued on the other to it, so the choice agrees without a message.
Links that membership no longer needs (a shuffle reply's temporary link, a peer dropped
from the active view) are closed once idle for `link.linger` seconds.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import random
import re
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import attrs
import trio

from transports.base import ConnectError, Connection, Refusals, Transport

from .core.effects import Effect
from .core.events import Delivery, Event, PeerDown, PeerUp
from .core.hlc import HybridClock
from .core.hyparview import HyParView
from .core.messages import (
    DIRECT_KINDS,
    HYPARVIEW_KINDS,
    MAX_TAG,
    PLUMTREE_KINDS,
    REPLICA_KINDS,
    ControlRequest,
    Direct,
    DirectReply,
    Gossip,
    Hello,
    Message,
    MessageId,
    Peer,
    Role,
    SyncChunk,
    SyncDigest,
    SyncRequest,
)
from .core.ormap import Entry, Key
from .core.ormap_wire import DEFAULT_LIMITS, Validator, signed_entry_bytes
from .core.plumtree import Plumtree
from .core.wire import encode_message, encode_payload
from .errors import ConfigError, HandshakeError, LinkClosed, MessageTooLarge, NodeClosed
from .ops.control_ops import ControlOps
from .runtime.admission import Admission
from .runtime.broadcast import Broadcast
from .runtime.component import LOCAL, Component
from .runtime.config import NodeConfig
from .runtime.control import ControlOp, ControlStream
from .runtime.departures import Departures
from .runtime.dialing import DialBudget
from .runtime.direct import DirectMessaging, Handler
from .runtime.flow import Fanout, Feed, Pressure
from .runtime.health import loop_health
from .runtime.identity import (
    KNOWN_FILE,
    TrustStore,
    endorse,
    load_private_key,
    node_key,
    public_bytes,
    sign_gossip,
)
from .runtime.link import (
    Authenticated,
    Credentials,
    Link,
    handshake_as_dialer,
    handshake_as_listener,
)
from .runtime.logs import PEER, node_context
from .runtime.membership import Membership
from .runtime.replica import Replica, ReplicaCallbacks
from .runtime.stats import NodeStats
from .runtime.subscription import Subscription
from .stores.hosts import HostDirectory
from .stores.leader import Election, Leadership
from .stores.maps import DEFAULT_TOMBSTONE_TTL, ReplicatedMap
from .stores.registry import Registry
from .stores.reminders import Reminders
from .stores.shard import Shard

log = logging.getLogger("trio_replica.node")

_MEMBERSHIP_KINDS = frozenset(HYPARVIEW_KINDS)
_BROADCAST_KINDS = frozenset(PLUMTREE_KINDS)
_REPLICA_KINDS = frozenset(REPLICA_KINDS)
_DIRECT_KINDS = frozenset(DIRECT_KINDS)
#: Names of persisted maps become file names: keep them to a safe alphabet.
_MAP_NAME = re.compile(r"[A-Za-z0-9_.-]{1,100}")


@attrs.define
class _Dial:
    """A dial in progress: messages waiting for the link, and who waits for the outcome."""

    address: str
    expected: Peer | None
    queue: list[Message] = attrs.Factory(list)
    queued_bytes: int = 0
    done: trio.Event = attrs.Factory(trio.Event)
    peer: Peer | None = None
    error: str | None = None


def default_transport(config: NodeConfig) -> Transport:
    """The websocket transport configured from `config` (imported lazily: tests may not need it)."""
    from transports.websocket import WebsocketTransport

    return WebsocketTransport(
        server_ssl=config.server_ssl, client_ssl=config.client_ssl, max_frame=config.link.max_frame
    )


class Node:
    """A running node; obtain one with `open_node`. All methods are called from Trio tasks.

    Reads (`active_view`, `stats`, ...) never block. The node is single-threaded: every
    method runs to completion between two checkpoints, so no locking is needed.
    """

    def __init__(self, config: NodeConfig, transport: Transport, nursery: trio.Nursery) -> None:
        self.config = config
        self.id = config.name
        self.transport = transport
        self._nursery = nursery
        self.stats_counters = NodeStats()
        self._rng = random.Random(config.rng_seed)
        self._links: dict[str, Link] = {}
        self._clients: set[Link] = set()
        self._dials: dict[str, _Dial] = {}
        #: Buffers over their high-water mark: writers wait on it, and while it is held
        #: peers' own broadcasts entering here are held to their limit.
        self.pressure = Pressure()
        #: The loop's lag, shared with every node of this process (health.py).
        self.health = loop_health(config.health)
        self.dial_budget = DialBudget(
            rate=config.link.dial_rate, burst=config.link.dial_burst, rng=self._rng
        )
        self._congestion_ms = config.flow.congestion_delay * 1000
        self._event_feeds = Fanout[Event]()
        self._ready = trio.Event()
        #: Set (and replaced) whenever the active view changes: `wait_ready` waits on it.
        self._view_changed = trio.Event()
        self._closing = False
        self._aborted = False
        self._task_scopes: set[trio.CancelScope] = set()
        #: The handshake slots of connections not yet authenticated (admission.py).
        self.admission = Admission(
            config.link, self.stats_counters, Refusals(log, f"node {config.name}")
        )
        #: Requests the node's HTTP endpoint (/metrics, /readyz) refused.
        self.http_refusals = Refusals(log, f"node {config.name} metrics endpoint")
        #: Losing duplicates of a link, still delivering what was in flight on them.
        self._retired: set[Link] = set()
        self._tasks_cancelled = False
        self.seed_ids: set[str] = set()
        self.address = ""
        self.me = Peer(self.id, "")
        self._key = node_key(config.identity, config.data_dir)
        #: This node's Ed25519 public key, raw (``identity.format_key`` prints it).
        self.public_key = public_bytes(self._key)
        #: Which key each node id may use (identity.py); its clock is the node's wall clock.
        self.trust = TrustStore(
            config.identity.trust,
            cluster=config.cluster,
            known_file=config.data_dir / KNOWN_FILE if config.data_dir is not None else None,
            allowlist=config.identity.allowlist,
            wall=lambda: self.clock.physical() / 1000,
        )
        self.membership: Membership
        self._replicas: dict[str, Replica] = {}
        self.hosts = HostDirectory(self)
        self.departures = Departures(self, config.departures)
        self._maps: dict[str, ReplicatedMap] = {}
        self._map_tasks: dict[str, trio.CancelScope] = {}
        self._map_lock = trio.Lock()
        self.broadcaster: Broadcast
        self.clock = HybridClock()
        self._creds = self._credentials()
        #: Messages to one node (`send`, `request`, `serve`).
        self.direct = DirectMessaging(self)
        #: The service registry (its map opens on first use).
        self.registry = Registry(self, config.registry)
        #: Placement of keys on the live members (``await node.shard.open()`` to join).
        self.shard = Shard(self, config.shard)
        #: Leader elections (``async with node.leader(name)``).
        self.election = Election(self, config.leader)
        #: Durable reminders, fired by the nodes that subscribe to them.
        self.reminders = Reminders(self, config.reminders)
        operations = ControlOps(self)
        self._control_ops: dict[str, ControlOp] = operations.ops()
        self._control_streams: dict[str, ControlStream] = operations.streams()
        #: Set once the application's maps are open (`mark_control_ready`): map operations
        #: on the control path wait for it, `/readyz` reports it.
        self.control_ready = trio.Event()

    def sign_gossip(self, id: MessageId, tag: str, payload: bytes) -> bytes:
        """This node's signature of a broadcast it originates (identity.py)."""
        return sign_gossip(self._key, id.origin, id.stamp, id.nonce, tag, payload)

    def sign_entry(self, name: str, key: Key, entry: Entry) -> bytes:
        """This node's signature of a map entry it writes (`ormap_wire.signed_entry_bytes`)."""
        return self._key.sign(signed_entry_bytes(self.config.cluster, name, key, entry))

    def _credentials(self) -> Credentials:
        identity = self.config.identity
        endorsement = b""
        if identity.previous_key is not None and identity.rotate_until is not None:
            if identity.rotate_until > self.clock.physical() / 1000:
                previous = load_private_key(identity.previous_key)
                endorsement = endorse(
                    previous, self.config.cluster, self.id, self.public_key, identity.rotate_until
                )
            else:
                log.warning(
                    "node %s: the key rotation window ended at %.0f; not endorsing the new key",
                    self.id,
                    identity.rotate_until,
                )
        return Credentials(
            self.config.cluster,
            self.config.secret or b"",
            self.me,
            key=self._key,
            accepted=self.config.accepted_secrets,
            endorsement=endorsement,
            trust=self.trust,
        )

    # --- lifecycle ----------------------------------------------------------------------

    async def _start(self) -> None:
        bound = await self.start_task(
            self.transport.serve, self.config.listen, self._handle_incoming
        )
        if self.config.advertise is None and _unspecified_host(bound):
            raise ConfigError(
                f"listening on all interfaces ({bound}) but other nodes need an address to "
                "dial: set advertise (--advertise HOST:PORT)"
            )
        self.address = self.config.advertise or bound
        self.me = Peer(self.id, self.address)
        self._creds = self._credentials()
        if not self.config.secret and not self.address.startswith("mem://"):
            log.warning(
                "node %s has no cluster secret: listening on loopback %s only",
                self.id,
                self.address,
            )
        core = HyParView(self.me, self.config.membership, random.Random(self._rng.getrandbits(64)))
        self.membership = Membership(self, core)
        self.broadcaster = Broadcast(
            self,
            lambda: Plumtree(
                self.id, self.config.broadcast, random.Random(self._rng.getrandbits(64))
            ),
        )
        await self.start_task(self.membership.serve)
        await self.start_task(self.broadcaster.serve)
        self._ready.set()
        # Who hosts which instance: a map every node hosts (hosts.py).
        await self.hosts.start()
        # Which nodes are gone for the cluster (departures.py): what replicas remove.
        await self.start_task(self.departures.serve)
        self.spawn(self.health.serve)
        self.spawn(self._seeder)
        self.spawn(self._janitor)
        log.info("node %s listening on %s", self.id, self.address)

    async def _close_stores(self) -> None:
        with trio.CancelScope(shield=True):
            for the_map in self._maps.values():
                if the_map._store is not None:
                    await the_map._store.aclose()

    def abort(self) -> None:
        """Stop the node at once, as a crash would: no graceful leave, every task cancelled.

        Peers notice through their links (closed connections, or idle timeouts). For tests
        and chaos runs; the ``async with open_node(...)`` block is cancelled too.
        """
        self._aborted = True
        self._closing = True
        self._cancel_tasks()
        self._nursery.cancel_scope.cancel()

    # --- tasks ----------------------------------------------------------------------------
    #
    # Every task of the node runs in a shielded cancel scope of its own, registered here.
    # Cancelling the caller's block must not kill the links before the graceful leave has
    # flushed its DISCONNECTs, so the node's tasks are cancelled by the node itself, in
    # `open_node`'s cleanup, right after the (bounded) leave.

    def spawn(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        """Run `fn(*args)` as a task of the node; it ends when the node closes."""
        scope = self._new_task_scope()
        self._nursery.start_soon(self._in_scope, scope, fn, args)

    async def start_task(self, fn: Callable[..., Awaitable[object]], *args: object) -> Any:
        """Like `spawn`, for a task that reports readiness through ``task_status``."""
        # Shield only once started: a shielded task that is still starting when the caller
        # is cancelled stays in trio's temporary start nursery, which then never exits.
        scope = self._new_task_scope(shield=False)
        value = await self._nursery.start(self._in_scope_started, scope, fn, args)
        scope.shield = True
        return value

    def _new_task_scope(self, *, shield: bool = True) -> trio.CancelScope:
        scope = trio.CancelScope(shield=shield)
        if self._tasks_cancelled:
            scope.cancel()
        self._task_scopes.add(scope)
        return scope

    async def _in_scope(
        self,
        scope: trio.CancelScope,
        fn: Callable[..., Awaitable[object]],
        args: tuple[object, ...],
    ) -> None:
        try:
            with scope:
                await fn(*args)
        finally:
            self._task_scopes.discard(scope)

    async def _in_scope_started(
        self,
        scope: trio.CancelScope,
        fn: Callable[..., Awaitable[object]],
        args: tuple[object, ...],
        task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            with scope:
                await fn(*args, task_status=task_status)
        finally:
            self._task_scopes.discard(scope)

    def _cancel_tasks(self) -> None:
        self._tasks_cancelled = True
        for scope in list(self._task_scopes):
            scope.cancel()

    async def _stop(self) -> None:
        """Leave gracefully: tell active peers, let the links flush, within a deadline."""
        if self._closing or not self._ready.is_set():
            return
        with trio.move_on_after(self.config.link.close_timeout * 2) as scope:
            scope.shield = True
            self.membership.apply(self.membership.core.leave(trio.current_time()))
            self._closing = True
            # The Disconnects are queued on links now closing: wait until they are flushed.
            for link in [link for link in self._links.values() if not link.is_open]:
                await link.closed.wait()

    # --- public API ---------------------------------------------------------------------

    async def wait_ready(self, min_active: int = 1) -> None:
        """Wait until this node is part of the overlay: `min_active` peers in its active
        view (at most the active view's size). Bound it with your own deadline
        (``with trio.fail_after(10): await node.wait_ready()``); a node with no seeds waits
        until another node joins through it."""
        await trio.lowlevel.checkpoint()
        wanted = min(max(1, min_active), self.config.membership.active_size)
        while len(self.membership.core.active) < wanted:
            await self._view_changed.wait()

    async def leave(self) -> None:
        """Leave the cluster gracefully now: tell the active peers, flush, within about 2 s.

        The node keeps running until its ``open_node`` block exits, which leaves by itself
        if this was not called; calling it first lets many nodes leave at once (each
        leave waits for its links to flush). Idempotent.
        """
        await self._stop()

    # --- leader election ---------------------------------------------------------------

    def leader(
        self, name: str, priority: int = 0
    ) -> contextlib.AbstractAsyncContextManager[Leadership]:
        """Stand for leader of `name` while the block runs: ``async with node.leader(name)
        as lead:``, then ``async for change in lead`` (`Elected(fence)` / `Revoked`) or
        ``await lead.wait_elected()`` (`trio_replica.stores.leader`)."""
        return self.election.candidate(name, priority)

    def leader_of(self, name: str) -> str | None:
        """Who leads `name` as this node sees the candidates (``await
        node.election.open()`` first on a node that does not stand itself)."""
        return self.election.leader_of(name)

    def fence(self, name: str) -> int | None:
        """The greatest fencing token of `name` this node has seen."""
        return self.election.fence(name)

    # --- direct messages -----------------------------------------------------------------

    def serve(self, tag: str, handler: Handler) -> contextlib.AbstractContextManager[None]:
        """Handle direct messages with `tag` while the block runs: ``with node.serve(tag,
        handler):``, where ``async def handler(sender: Peer, payload) -> answer``
        (`trio_replica.runtime.direct`)."""
        return self.direct.serve(tag, handler)

    async def send(self, peer: str | Peer, tag: str, payload: Any, *, timeout: float = 5.0) -> None:
        """Send `payload` (plain data) to `peer`'s handler of `tag`; no answer.

        Raises `UnknownPeer`, `RequestTimeout` (not sent in time), `RequestFailed` (the
        link failed), `TypeError` or `MessageTooLarge` for a payload that cannot travel.
        """
        await self.direct.send(peer, tag, payload, timeout=timeout)

    async def request(
        self, peer: str | Peer, tag: str, payload: Any, *, timeout: float = 5.0
    ) -> Any:
        """Ask `peer`'s handler of `tag` with `payload` and return its answer.

        Raises `UnknownPeer`, `NoHandler`, `RequestFailed` (the handler raised),
        `RequestTimeout` (no answer in time: it may or may not have run).
        """
        return await self.direct.request(peer, tag, payload, timeout=timeout)

    def known_peer(self, peer_id: str) -> Peer | None:
        """The address this node knows for `peer_id`: from a link, its views, its lost
        contacts, or the host directory; None if none."""
        link = self._links.get(peer_id)
        if link is not None and link.is_open:
            return link.peer
        core = self.membership.core
        for peer in (*core.active, *core.passive, *core.lost):
            if peer.id == peer_id:
                return peer
        return self.hosts.address_of(peer_id)

    def active_view(self) -> list[Peer]:
        """The peers of this node's active view (symmetric, with open links)."""
        return sorted(self.membership.core.active)

    def passive_view(self) -> list[Peer]:
        """The peers of this node's passive view (known, not connected)."""
        return sorted(self.membership.core.passive)

    def links(self) -> list[Peer]:
        """Peers with an open link right now (active peers plus temporary links)."""
        return sorted(link.peer for link in self._links.values() if link.is_open)

    def link_to(self, peer: Peer) -> Link | None:
        """The link to the node `peer` names (open or closing), if there is one."""
        return self._links.get(peer.id)

    @contextlib.asynccontextmanager
    async def events(self) -> AsyncIterator[Subscription[Event]]:
        """Subscribe to membership events (`PeerUp`, `PeerDown`, `Left`).

        Yields a `Subscription`: iterate it or call `receive()`. If the membership
        component crashes and restarts, the subscription re-attaches by itself and yields a
        `Resubscribed` notice. It holds `config.subscriber_buffer` events; a subscriber
        that falls further behind misses events (counted in
        ``stats()["drops"]["subscriber_full"]``) and then receives `Lagged(missed)`.
        """
        attached: list[Feed[Event]] = []

        def attach() -> Feed[Event] | None:
            if not self.membership.running.is_set():
                return None
            feed = Feed[Event](
                max_items=self.config.subscriber_buffer,
                max_bytes=self.config.flow.subscriber_bytes,
            )
            self._event_feeds.add(feed)
            attached.append(feed)
            return feed

        subscription = Subscription[Event]("membership", attach, lambda: self._closing)
        try:
            yield subscription
        finally:
            for feed in attached:
                self._event_feeds.discard(feed)
                feed.close()

    async def broadcast(self, tag: str, payload: Any) -> MessageId:
        """Broadcast `payload` (plain CBOR-encodable data) to every node, under `tag`.

        Waits (a checkpoint, never a spin) while the node's outgoing budget is spent: a
        link's outbox or a replica's delivery buffer over its high-water mark, or the
        broadcast component behind (README "Flow control"). Bound the wait with your own
        cancel scope; a cancelled call has broadcast nothing.
        Returns the message id once the broadcast is handed to the broadcast component.
        Raises `MessageTooLarge` beyond `config.max_payload` bytes, `TypeError` for data
        that is not plain, `ValueError` for a bad tag, `NodeClosed` after the node closed.
        """
        encoded = encode_payload(payload, max_size=self.config.max_payload)
        return await self.broadcast_encoded(tag, encoded, payload)

    async def broadcast_encoded(self, tag: str, encoded: bytes, payload: Any) -> MessageId:
        """`broadcast` for a payload already encoded with `wire.encode_payload` (`payload`
        is its decoded form, handed to local subscribers)."""
        self._check_broadcast(tag, encoded)
        await self.writable()
        return self.broadcast_encoded_nowait(tag, encoded, payload)

    async def writable(self) -> None:
        """Return once the node can take another broadcast (its outgoing budget is not spent).

        A checkpoint either way. For writers that must apply a write locally only once it
        can be sent (`Replica.broadcast_update`): wait here, apply, then
        `broadcast_encoded_nowait`. Raises `NodeClosed` if the node closes.
        """
        if self._closing:
            raise NodeClosed("the node is closing")
        await self.pressure.wait_clear("writer")
        await self.broadcaster.wait_room(LOCAL)
        await self.broadcaster.pacer.wait_turn()
        if self._closing:
            raise NodeClosed("the node is closing")

    def broadcast_encoded_nowait(self, tag: str, encoded: bytes, payload: Any) -> MessageId:
        """Hand a broadcast to the broadcast component now, whatever the budget.

        Never blocks. Only for a caller that waited for `writable()` just before: the
        budget is what keeps the node's memory bounded.
        """
        self._check_broadcast(tag, encoded)
        message_id = self.broadcaster.new_id(self._rng)
        self.broadcaster.post_forced(
            self.broadcaster.originate(message_id, tag, encoded, payload),
            source=LOCAL,
            size=len(encoded),
        )
        return message_id

    def _check_broadcast(self, tag: str, encoded: bytes) -> None:
        if self._closing:
            raise NodeClosed("the node is closing")
        if not isinstance(tag, str) or not 0 < len(tag) <= MAX_TAG:
            raise ValueError(f"tag must be a string of 1 to {MAX_TAG} characters")
        if len(encoded) > self.config.max_payload:
            raise MessageTooLarge(
                f"payload is {len(encoded)} bytes, the limit is {self.config.max_payload}"
            )

    @contextlib.asynccontextmanager
    async def subscribe(
        self,
        tag: str,
        *,
        include_own: bool = False,
        buffer: int | None = None,
        buffer_bytes: int | None = None,
        backpressure: bool = False,
    ) -> AsyncIterator[Subscription[Delivery]]:
        """Receive the broadcasts of `tag` as `Delivery` events, each message exactly once.

        Own broadcasts are delivered only with `include_own`. If the broadcast component
        crashes and restarts, the subscription re-attaches and yields `Resubscribed`
        (messages delivered while it was detached are missed: re-sync on that notice).
        The subscription holds `buffer` deliveries and `buffer_bytes` bytes of payload
        (defaults: `config.subscriber_buffer`, `config.flow.subscriber_bytes`); a
        subscriber further behind misses deliveries, counted in
        ``stats()["drops"]["subscriber_full"]``, and then receives `Lagged(missed)` where
        they went missing. It also receives `Lagged` when a broadcast announced to this
        node could not be fetched (its tag is unknown, so every subscriber is told).

        With `backpressure=True`, a subscriber at half its buffer holds the node's pressure:
        the node's writers wait, and peers' own broadcasts entering here are held to their
        limit, so a consumer slower than the traffic slows it down before it misses
        anything. The node itself never waits for it: one that stops reading still misses
        deliveries, and is told (README "Flow control").
        """
        max_items = buffer or self.config.subscriber_buffer
        max_bytes = buffer_bytes or self.config.flow.subscriber_bytes
        pressure = self.pressure if backpressure else None
        attached: list[Feed[Delivery]] = []

        def attach() -> Feed[Delivery] | None:
            feed = self.broadcaster.attach(
                tag,
                include_own=include_own,
                max_items=max_items,
                max_bytes=max_bytes,
                pressure=pressure,
            )
            if feed is not None:
                attached.append(feed)
            return feed

        subscription = Subscription[Delivery]("broadcast", attach, lambda: self._closing)
        try:
            yield subscription
        finally:
            for feed in attached:
                self.broadcaster.detach(tag, feed)

    def stats(self) -> dict[str, Any]:
        """Every counter of the node, as plain data (see `NodeStats`)."""
        out = self.stats_counters.snapshot()
        # Connections the transport closed before their upgrade (websocket listener bounds).
        transport_refusals = getattr(self.transport, "refusals", None)
        refused = self.http_refusals.counts.copy()
        if isinstance(transport_refusals, Refusals):
            refused.update(transport_refusals.counts)
        out["connections_refused"] = dict(refused)
        core = self.membership.core
        out["membership"] = {
            "active_size": len(core.active),
            "passive_size": len(core.passive),
            **attrs.asdict(core.stats),
            "inbox": self.membership.inbox_depth(),
            "crashes": self.membership.crashes,
        }
        bcore = self.broadcaster.core
        out["broadcast"] = {
            **attrs.asdict(bcore.stats),
            "eager_size": len(bcore.eager),
            "lazy_size": len(bcore.lazy),
            "inbox": self.broadcaster.inbox_depth(),
            "crashes": self.broadcaster.crashes,
            "hops": {str(h): n for h, n in sorted(self.broadcaster.hops.items())},
            "unsubscribed": dict(self.broadcaster.unsubscribed),
        }
        links = list(self._links.values())
        out["links"] = {
            "open": len(links),
            "clients": len(self._clients),
            "dialing": len(self._dials),
            "queued": sum(link.queued() for link in links),
            "queued_bytes": sum(link.queued_bytes() for link in links),
            "congested": sum(link.congested for link in links),
        }
        pressure = self.pressure
        out["flow"] = {
            "pressure": dict(pressure.holders()),
            "waits": dict(pressure.waits),
            "waited_seconds": {who: round(t, 3) for who, t in pressure.waited.items()},
            "inbox_bytes": {
                "membership": self.membership.inbox_bytes(),
                "broadcast": self.broadcaster.inbox_bytes(),
            },
            "throttled": {
                "membership": self.membership.throttled,
                "broadcast": self.broadcaster.throttled,
            },
            "queueing_delay_ms": round(self.broadcaster.delay.current_ms, 1),
            "write_interval_ms": round(self.broadcaster.pacer.interval * 1000, 3),
            "paced_seconds": round(self.broadcaster.pacer.waited, 3),
            "origination_limited": self.broadcaster.origination.limited,
            "origination_waited_seconds": round(self.broadcaster.origination.waited, 3),
            **self.stats_counters.flow,
        }
        out["loop"] = self.health.snapshot()
        out["departures"] = self.departures.snapshot()
        out["dials"] = {
            "delayed": self.dial_budget.delayed,
            "waited_seconds": round(self.dial_budget.waited, 3),
        }
        return out

    def mark_control_ready(self) -> None:
        """The maps this node is meant to host are open: control requests for them are
        served from now on (`open_node` calls it before yielding unless told to hold)."""
        self.control_ready.set()

    def readiness(self) -> tuple[bool, str]:
        """Whether the node is ready to serve, and why not: joined (a neighbour, or no
        seed but itself to join through) and its maps open (`mark_control_ready`)."""
        if self._closing:
            return False, "closing"
        if not self.control_ready.is_set():
            return False, "starting: maps not open yet"
        for name, the_map in sorted(self._maps.items()):
            if the_map.recovering:
                return False, f"map {name} is pulling back from peers the writes its store lost"
        alone = not [s for s in self.config.seeds if s != self.address]
        if not self.membership.core.active and not alone:
            return False, "not joined: no neighbour yet"
        return True, "ready"

    def liveness(self) -> tuple[bool, str]:
        """Whether the node's machinery runs: not closing, membership and broadcast
        components running (a crashed one restarts; meanwhile the node is unhealthy; one
        that crashes past its restart intensity closes the node)."""
        if self._closing:
            return False, "closing"
        for component in self.components().values():
            if component.dead is not None:
                return False, f"{component.name} dead: {component.dead}"
            if not component.running.is_set():
                return False, f"{component.name} restarting"
        return True, "ok"

    def status(self) -> dict[str, Any]:
        """What the `status` control operation returns: identity, views and counters."""
        ready, why = self.readiness()
        return {
            "id": self.id,
            "address": self.address,
            "cluster": self.config.cluster,
            "ready": ready,
            "readiness": why,
            "active": [[p.id, p.address] for p in self.active_view()],
            "passive": [[p.id, p.address] for p in self.passive_view()],
            "stats": self.stats(),
            "maps": {
                name: {"size": len(m), "tombstones": m.tombstones, "recovering": m.recovering}
                for name, m in sorted(self.maps().items())
            },
            "builtins": self._builtins_status(),
            "components": {
                c.name: (
                    f"dead: {c.dead}"
                    if c.dead is not None
                    else "running"
                    if c.running.is_set()
                    else "restarting"
                )
                for c in self.components().values()
            },
        }

    def _builtins_status(self) -> dict[str, Any]:
        """The built-ins this node uses (those whose map it hosts), for `status`."""
        out: dict[str, Any] = {}
        if self.registry.is_open:
            out["registry"] = {"names": len(self.registry.names())}
        if self.shard.is_open:
            out["shard"] = {
                "ring_size": self.shard.ring_size,
                "members": self.shard.members(),
                "owned": len(self.shard.owned()),
            }
        if self.election.is_open:
            out["leaders"] = {
                name: {"leader": self.election.leader_of(name), "fence": self.election.fence(name)}
                for name in self.election.names()
            }
        if self.reminders.is_open:
            stats = self.reminders.stats
            out["reminders"] = {
                "pending": len(self.reminders.pending()),
                "workers": len(self.reminders.workers()),
                "fired": stats.fired,
                "acknowledged": stats.acknowledged,
            }
        return out

    # --- replicas and maps ------------------------------------------------------------------

    async def open_replica(self, name: str, callbacks: ReplicaCallbacks) -> Replica:
        """Start the replica driver of instance `name`, owned by `callbacks` (already running).

        One driver per name on a node; the instance's broadcasts are scoped by its name.
        """
        if self._closing:
            raise NodeClosed("the node is closing")
        if name in self._replicas:
            raise ValueError(f"replica instance {name!r} is already open on this node")
        replica = Replica(
            self, name, callbacks, self.config.replica, random.Random(self._rng.getrandbits(64))
        )
        self._replicas[name] = replica
        try:
            await self.start_task(replica.run)
        except BaseException:
            self._replicas.pop(name, None)
            raise
        return replica

    async def open_map(
        self,
        name: str,
        *,
        validator: Validator | None = None,
        persist: bool = False,
        tombstone_ttl: float = DEFAULT_TOMBSTONE_TTL,
    ) -> ReplicatedMap:
        """Open (or return the already open) replicated map `name` on this node.

        `validator(key, value)` refuses a local put with `ValidationError` and a remote
        entry with a counted rejection. With `persist=True` the map lives in an SQLite file
        in `config.data_dir`: a put returns once it is durable, and reopening the map after
        a restart recovers it, then pulls what it missed from the peers.
        """
        if name.startswith("_"):
            raise ValueError("map names starting with '_' are reserved for the node")
        return await self._open_map_unchecked(
            name, validator=validator, persist=persist, tombstone_ttl=tombstone_ttl
        )

    async def _open_map_unchecked(
        self,
        name: str,
        *,
        validator: Validator | None = None,
        persist: bool = False,
        tombstone_ttl: float = DEFAULT_TOMBSTONE_TTL,
    ) -> ReplicatedMap:
        async with self._map_lock:
            existing = self._maps.get(name)
            if existing is not None:
                if (
                    existing._validator is not validator
                    or (existing._store is not None) != persist
                    or existing.tombstone_ttl != tombstone_ttl
                ):
                    raise ValueError(
                        f"map {name!r} is already open with other options; close it first"
                    )
                return existing
            if not _MAP_NAME.fullmatch(name):
                raise ValueError("map names are 1 to 100 characters of [A-Za-z0-9_.-]")
            if not tombstone_ttl > 0:
                raise ValueError("tombstone_ttl must be positive")
            store = None
            if persist:
                if self.config.data_dir is None:
                    raise ConfigError("persist=True needs NodeConfig.data_dir (--data-dir)")
                from .stores.store import MapStore

                self.config.data_dir.mkdir(parents=True, exist_ok=True)
                store = await MapStore.open(
                    self.config.data_dir / f"{name}.sqlite3", name=name, limits=DEFAULT_LIMITS
                )
            the_map = ReplicatedMap(
                self, name, validator=validator, tombstone_ttl=tombstone_ttl, store=store
            )
            try:
                recovered = await the_map._recover()
                if recovered:
                    log.info("node %s: map %s recovered %d entries", self.id, name, recovered)
                the_map.replica = await self.open_replica(name, the_map)
            except BaseException:
                if store is not None:
                    with trio.CancelScope(shield=True):
                        await store.aclose()
                raise
            gc_scope = trio.CancelScope()
            self._map_tasks[name] = gc_scope
            self.spawn(self._run_in, gc_scope, the_map._collect_tombstones)
            self._maps[name] = the_map
            return the_map

    def forget_replica(self, replica: Replica) -> None:
        """Called by a replica driver that stopped: its name is free again."""
        if self._replicas.get(replica.name) is replica:
            del self._replicas[replica.name]

    async def _run_in(self, scope: trio.CancelScope, fn: Callable[[], Awaitable[None]]) -> None:
        with scope:
            await fn()

    async def _close_map(self, name: str) -> None:
        the_map = self._maps.pop(name, None)
        if the_map is None:
            return
        self._map_tasks.pop(name).cancel()
        the_map._close_subscribers()
        await self._replicas[name].aclose()
        if the_map._store is not None:
            with trio.CancelScope(shield=True):
                await the_map._store.aclose()

    def maps(self) -> dict[str, ReplicatedMap]:
        """The maps open on this node, by name (not the node's own, such as the host
        directory: names starting with ``_``)."""
        return {name: m for name, m in self._maps.items() if not name.startswith("_")}

    def components(self) -> dict[str, Component]:
        """The node's supervised protocol components, by name (``membership``,
        ``broadcast``); `trio_replica.testing.crash_component` crashes one."""
        return {"membership": self.membership, "broadcast": self.broadcaster}

    # --- used by components -------------------------------------------------------------

    def send_to(self, peer: Peer, message: Message, *, repair: bool = False) -> bool:
        """Queue `message` for `peer`, dialing it if needed; never blocks.

        Returns False when it could not be queued: a payload message that does not fit the
        link's outbox (or the queue of a dial in progress), which the caller must handle
        (the broadcast component announces it lazily instead); or a control message on a
        link that then failed (counted; membership hears of the link going down). A
        `repair` (`Link.send_nowait`) has room beyond the outbox's usual bound.
        """
        link = self._links.get(peer.id)
        if link is not None and link.is_open:
            return link.send_nowait(message, repair=repair)
        dial = self._dials.get(peer.id)
        if dial is None:
            if len(self._dials) >= self.config.link.max_dials:
                # Peers can make us dial addresses they name (shuffles, forward joins):
                # bound the sockets that costs. The core treats it as an unreachable peer.
                self.stats_counters.drop("too_many_dials", message)
                self._post_link_down(peer)
                return False
            dial = self._start_dial(peer.address, peer)
        size = len(encode_message(message))
        if (
            len(dial.queue) >= self.config.link.dial_queue_messages
            or dial.queued_bytes + size > self.config.flow.dial_queue_bytes
        ):
            self.stats_counters.drop("dial_queue_full", message)
            return False
        dial.queue.append(message)
        dial.queued_bytes += size
        return True

    async def send_message(self, peer: Peer, message: Message) -> None:
        """Queue `message` for `peer`, waiting for room on its link (bulk senders: syncs).

        Dials the peer if no link is open. Raises `LinkClosed` if the message cannot be
        queued (the link closed, or the dial's queue is full).
        """
        link = self._links.get(peer.id)
        if link is not None and link.is_open:
            await link.send(message)
            return
        await trio.lowlevel.checkpoint()
        if not self.send_to(peer, message):
            raise LinkClosed(f"no link to {peer} to send on")

    def close_link(self, peer: Peer) -> None:
        link = self._links.get(peer.id)
        if link is not None and link.is_open:
            link.close_soon()

    def publish_membership_event(self, event: Event) -> None:
        if isinstance(event, PeerUp | PeerDown):
            self.broadcaster.post_notice(self.broadcaster.membership_changed(event))
            self._view_changed.set()
            self._view_changed = trio.Event()
        missed = self._event_feeds.publish(event)
        if missed:
            self.stats_counters.drop("subscriber_full", count=missed)

    def close_subscriptions(self, source: str) -> None:
        if source == "membership":
            self._event_feeds.close_all()

    # --- links --------------------------------------------------------------------------

    def _start_dial(self, address: str, expected: Peer | None) -> _Dial:
        dial = _Dial(address, expected)
        if expected is not None:
            self._dials[expected.id] = dial
        self.spawn(self._dial_task, dial)
        return dial

    async def _dial_task(self, dial: _Dial) -> None:
        cfg = self.config.link
        await self.dial_budget.acquire()
        health = self.health
        try:
            async with self.transport.open_connection(
                dial.address, timeout=health.timeout(cfg.connect_timeout)
            ) as conn:
                try:
                    auth = await handshake_as_dialer(
                        conn,
                        self._creds,
                        role=Role.NODE,
                        timeout=health.timeout(cfg.handshake_timeout),
                    )
                except HandshakeError as exc:
                    self.stats_counters.handshakes_refused[exc.reason] += 1
                    self._dial_failed(dial, exc.reason, str(exc))
                    return
                peer = auth.peer
                if dial.expected is not None and peer.id != dial.expected.id:
                    self._dial_failed(
                        dial, "wrong_id", f"{dial.address} is {peer.id}, not {dial.expected.id}"
                    )
                    return
                taken = self._held_by_other_key(peer.id, auth.key)
                if taken is not None:
                    self.stats_counters.handshakes_refused["id_taken"] += 1
                    self._dial_failed(dial, "id_taken", taken)
                    return
                link = self._new_link(conn, auth, outbound=True)
                self._register(link, dial)
                dial.peer = peer
                dial.done.set()
                await self._run_link(link)
        except ConnectError as exc:
            self._dial_failed(dial, "connect", str(exc))
        except Exception as exc:
            # Whatever else dialing a peer-supplied address raises must not end the node.
            log.warning("node %s: dialing %s failed", self.id, dial.address, exc_info=True)
            if not dial.done.is_set():
                self._dial_failed(dial, "error", repr(exc))

    def _dial_failed(self, dial: _Dial, reason: str, detail: str) -> None:
        self.stats_counters.dial_failures[reason] += 1
        log.info("node %s: dialing %s failed (%s): %s", self.id, dial.address, reason, detail)
        dial.error = reason
        dial.done.set()
        if dial.expected is not None:
            if self._dials.get(dial.expected.id) is dial:
                del self._dials[dial.expected.id]
            for message in dial.queue:
                self.stats_counters.drop("unreachable", message)
            dial.queue.clear()
            dial.queued_bytes = 0
            link = self._links.get(dial.expected.id)
            if link is None or not link.is_open:
                self._post_link_down(dial.expected)

    def _post_link_down(self, peer: Peer, link: Link | None = None) -> None:
        """Tell membership that `peer` is out of reach; after what `link` (the link that
        ended, if any) delivered before it ended."""
        if self._closing:
            return
        core = self.membership.core

        def down(now: float) -> Iterable[Effect]:
            current = self._links.get(peer.id)
            if link is not None and current is not None and current is not link:
                # A newer link to the peer came up while this news waited behind the old
                # link's messages: the peer is reachable, the old link's end is stale.
                return ()
            return core.handle_link_down(peer, now)

        if link is None:
            self.membership.post_notice(down)
        else:
            self.membership.post_after(link, down)

    def _new_link(self, conn: Connection, auth: Authenticated, *, outbound: bool) -> Link:
        node_link = auth.role == Role.NODE
        return Link(
            conn,
            auth.peer,
            role=auth.role,
            key=auth.key,
            outbound=outbound,
            config=self.config.link,
            stats=self.stats_counters,
            on_message=self._on_message,
            pressure=self.pressure if node_link else None,
            health=self.health,
        )

    def _register(self, link: Link, dial: _Dial | None = None) -> None:
        """Make `link` the link to its peer, resolving a duplicate, and flush queued sends."""
        peer_id = link.peer.id
        self.stats_counters.links_established += 1
        old = self._links.get(peer_id)
        winner = link
        if old is not None and old.is_open:
            # Keep the connection dialed by the smaller id; the peer makes the same choice.
            keep_new = link.outbound == (self.id < peer_id)
            winner, loser = (link, old) if keep_new else (old, link)
            winner.take_over(loser.drain_queue())
            loser.retire("superseded")
            self._retired.add(loser)
        self._links[peer_id] = winner
        pending = self._dials.pop(peer_id, None)
        for d in {id(x): x for x in (pending, dial) if x is not None}.values():
            winner.take_over(d.queue)
            d.queue.clear()
            d.queued_bytes = 0

    async def _run_link(self, link: Link) -> None:
        # This task serves one peer until the link ends: label its records (and its reader's
        # and writer's) with that peer.
        PEER.set(link.peer.id)
        reason = "closed"
        try:
            reason = await link.run()
        finally:
            self._retired.discard(link)
            self.broadcaster.origination.forget(link)
            self.stats_counters.links_closed[reason] += 1
            if self._links.get(link.peer.id) is link:
                del self._links[link.peer.id]
                # A dial to the same peer in flight reports its own outcome: reporting this
                # old link's end would fail a peer whose new link is about to come up.
                if reason != "superseded" and link.peer.id not in self._dials:
                    log.info("node %s: link to %s closed (%s)", self.id, link.peer, reason)
                    self._post_link_down(link.peer, link)

    async def _handle_incoming(self, conn: Connection) -> None:
        cfg = self.config.link
        slot = self.admission.enter(conn.remote)
        if slot is None:
            return
        try:
            # Counted while it waits for the node to be ready too: a burst at startup is
            # bounded like any other.
            with trio.move_on_after(cfg.handshake_timeout):
                await self._ready.wait()
            if not self._ready.is_set() or self._closing:
                return
            auth = await handshake_as_listener(
                conn,
                self._creds,
                timeout=self.health.timeout(cfg.handshake_timeout),
                hello_timeout=self.health.timeout(cfg.hello_timeout),
                accept=self._accept,
                admit=slot.admit,
            )
        except HandshakeError as exc:
            self.admission.refused(exc.reason, conn.remote, f": {exc}")
            return
        finally:
            slot.release()
        link = self._new_link(conn, auth, outbound=False)
        if auth.role == Role.CLIENT:
            self._clients.add(link)
            try:
                await link.run()
            finally:
                self._clients.discard(link)
            return
        self._register(link)
        await self._run_link(link)

    def _accept(self, hello: Hello) -> tuple[str, str] | None:
        if self._closing:
            return "closing", "node is shutting down"
        if hello.role == Role.NODE:
            taken = self._held_by_other_key(hello.node_id, hello.key)
            if taken is not None:
                return "id_taken", taken
        return None

    def _held_by_other_key(self, node_id: str, key: bytes) -> str | None:
        """Why `node_id` cannot be linked with `key`: an open link holds it with another key.

        In every trust mode an id is bound to its key while linked: another process with
        the cluster secret cannot take over a live node's links (and two nodes given one
        name cannot keep taking over each other's). The operator must give them distinct
        names; a node that restarted with a new key is accepted once its old link is gone.
        """
        current = self._links.get(node_id)
        if current is not None and current.is_open and current.key != key:
            return f"node id {node_id!r} is already linked with another key"
        return None

    async def _on_message(self, link: Link, message: Message, size: int) -> None:
        if link.role == Role.CLIENT:
            if isinstance(message, ControlRequest):
                from .runtime.control import answer_control

                answer_control(self, link, message, self._control_ops, self._control_streams)
            else:
                self.stats_counters.reject("client_kind")
            return
        kind = type(message)
        peer = link.peer
        # Inputs are queued without a checkpoint while the inbox has room (the reader
        # checkpoints once per frame anyway); a full inbox makes the reader wait, which is
        # the backpressure on a peer that floods us.
        if kind in _BROADCAST_KINDS:
            broadcaster = self.broadcaster
            credit = 0
            if isinstance(message, Gossip):
                if message.id.origin == peer.id and (
                    self.pressure.held_within(self.config.flow.congestion_hold)
                    or broadcaster.delay.excluding(peer.id) > self._congestion_ms
                ):
                    # The peer's own broadcast entering the tree while the cluster is
                    # congested: held to its limit (flow.OriginationLimit).
                    await broadcaster.origination.admit(link, size)
                run = broadcaster.receive_gossip(peer, message)
                if run is None:
                    link.processed(size)  # refused: done with it
                    return
                credit = size
            else:
                run = broadcaster.receive(peer, message)
            if not broadcaster.post_nowait(run, source=link, size=size, credit=credit):
                await broadcaster.post(run, source=link, size=size, credit=credit)
        elif kind in _MEMBERSHIP_KINDS:
            core = self.membership.core

            def handle(now: float) -> list[Effect]:
                return core.handle_message(peer, message, now)

            if not self.membership.post_nowait(handle, source=link, size=size):
                await self.membership.post(handle, source=link, size=size)
        elif kind in _DIRECT_KINDS:
            assert isinstance(message, Direct | DirectReply)
            await self.direct.deliver(link, message, size)
        elif kind in _REPLICA_KINDS:
            assert isinstance(message, SyncRequest | SyncChunk | SyncDigest)
            replica = self._replicas.get(message.name)
            if replica is None:
                # Not an error of the peer: it hosts a map this node does not (yet) open.
                self.stats_counters.drop(f"no_such_replica:{kind.__name__}")
                if message.CREDITED:
                    link.processed(size)
                if isinstance(message, SyncDigest) and (message.parents or message.want):
                    # A bare answer ends the peer's comparison: nothing here to compare.
                    bare = SyncDigest(message.name, message.session, 1, (), (), ())
                    self.send_to(peer, bare)
            else:
                await replica.deliver_direct(link, peer, message, size)
        else:
            self.stats_counters.reject("unexpected_kind")
            log.warning("node %s: unexpected %s from %s", self.id, kind.__name__, peer)

    def input_processed(self, source: object, credit: int) -> None:
        """A payload input from `source` left a component's inbox: grant its link credit."""
        if isinstance(source, Link):
            source.processed(credit)

    # --- background tasks ---------------------------------------------------------------

    async def connect_seed(self, address: str) -> Peer | None:
        """Dial a seed by address; return its peer once the link is up, None on failure."""
        dial = self._start_dial(address, None)
        await dial.done.wait()
        return dial.peer

    async def _seeder(self) -> None:
        """Join through the seeds while isolated, with backoff; keep the overlay whole.

        Every `rejoin_interval`: a seed (a node whose own address is among its seeds) asks
        the next other seed that is not its neighbour, in turn, to be one (`reach`: a
        high-priority NEIGHBOR), so that overlays that formed or healed apart through
        different seeds merge, whichever side each seed is on; any other node, with
        `rejoin_chance`, JOINs through a seed if it holds none in its views
        (`should_rejoin`). A node's own lost contacts (the membership core) do the rest.
        """
        cfg = self.config
        seeds = [s for s in cfg.seeds if s != self.address]
        if not seeds:
            return
        if len(seeds) < len(cfg.seeds):
            # Our own address is among the seeds: we are one (`should_rejoin` on a seed).
            self.seed_ids.add(self.id)
        backoff = cfg.seed_retry_min
        rejoin = cfg.membership.rejoin_interval
        # The first check early in the first interval: seeds that started apart (each
        # joined through a different one) find each other within seconds, not a minute.
        first = rejoin * self._rng.uniform(0.25, 0.5)
        next_rejoin = trio.current_time() + first if rejoin > 0 else float("inf")
        core = self.membership.core
        #: Seed addresses in the order a seed asks them (rotated), and their ids once known.
        rotation = self._rng.sample(seeds, len(seeds))
        seed_at: dict[str, str] = {}
        while True:
            now = trio.current_time()
            if core.needs_join():
                await self._join_a_seed(seeds, seed_at)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, cfg.seed_retry_max)
                continue
            backoff = cfg.seed_retry_min
            if now >= next_rejoin:
                next_rejoin = now + rejoin
                if self.id in self.seed_ids:
                    await self._reach_a_seed(rotation, seed_at)
                elif self._rng.random() < cfg.membership.rejoin_chance and core.should_rejoin(
                    self.seed_ids
                ):
                    log.info(
                        "node %s: no seed in view; re-joining to merge a split overlay", self.id
                    )
                    await self._join_a_seed(seeds, seed_at)
            if core.active:
                # In the overlay: nothing to do until the view changes (losing the last
                # peer is a PeerDown) or a re-join is due; no idle polling.
                with trio.move_on_at(min(next_rejoin, now + cfg.seed_retry_max)):
                    await self._view_changed.wait()
            else:
                # A JOIN is pending: its timeout clears it without any view change.
                await trio.sleep(cfg.seed_retry_min)

    async def _join_a_seed(self, seeds: list[str], seed_at: dict[str, str]) -> None:
        """JOIN through the first seed, in random order, that answers a dial."""
        for address in self._rng.sample(seeds, len(seeds)):
            peer = await self.connect_seed(address)
            if peer is not None:
                self.seed_ids.add(peer.id)
                seed_at[address] = peer.id
                core = self.membership.core
                await self.membership.post(functools.partial(_join, core, peer))
                return

    async def _reach_a_seed(self, rotation: list[str], seed_at: dict[str, str]) -> None:
        """Ask the next seed in `rotation` that is in neither of our views to be our
        neighbour (`_seeder`; the core declines a seed it already knows)."""
        core = self.membership.core
        for _ in range(len(rotation)):
            address = rotation.pop(0)
            rotation.append(address)
            known = seed_at.get(address)
            if known is not None and (core.is_active(known) or core.is_passive(known)):
                continue
            peer = await self.connect_seed(address)
            if peer is None:
                continue  # down or cut off: the next one (the next interval tries it again)
            self.seed_ids.add(peer.id)
            seed_at[address] = peer.id
            if peer.id == self.id or core.is_active(peer.id) or core.is_passive(peer.id):
                continue
            await self.membership.post(functools.partial(_reach, core, peer))
            return

    async def _janitor(self) -> None:
        """Close links membership no longer wants once they have been idle for `linger`."""
        linger = self.config.link.linger
        core = self.membership.core
        while True:
            await trio.sleep(linger / 2)
            now = trio.current_time()
            for link in list(self._retired):
                # The side that dialed a retired link closes it once it has gone quiet (the
                # other side only waits, so both never close at once mid-flight); the other
                # side gives up after a longer wait in case that close never comes.
                quiet = now - link.last_activity
                if quiet > (linger if link.outbound else 4 * linger):
                    link.fail("superseded")
            for link in list(self._links.values()):
                if (
                    link.is_open
                    and not core.wants_link(link.peer.id)
                    and now - link.last_activity > linger
                ):
                    link.close_soon()


def _unspecified_host(address: str) -> bool:
    host = urllib.parse.urlsplit(address).hostname or ""
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _join(core: HyParView, contact: Peer, now: float) -> list[Effect]:
    return core.join(contact, now)


def _reach(core: HyParView, peer: Peer, now: float) -> list[Effect]:
    return core.reach(peer, now)


@contextlib.asynccontextmanager
async def open_node(
    config: NodeConfig, *, transport: Transport | None = None, hold_control: bool = False
) -> AsyncIterator[Node]:
    """Start a node, yield it, and leave the cluster gracefully when the block exits.

    Cancelling the block (or an exception inside it) still runs the graceful leave, shielded
    and bounded by a few seconds, then cancels every task the node started.

    `hold_control`: map operations on the control path (and `/readyz`) wait until the
    caller opens its maps and calls `node.mark_control_ready()`; by default the node is
    ready for them as soon as it is yielded.
    """
    if transport is None:
        transport = default_transport(config)
    # Every task the node starts copies this context: their log records carry the node id.
    with node_context(config.name):
        async with _open_node_tasks(config, transport) as node:
            if not hold_control:
                node.mark_control_ready()
            yield node


@contextlib.asynccontextmanager
async def _open_node_tasks(config: NodeConfig, transport: Transport) -> AsyncIterator[Node]:
    node: Node | None = None
    try:
        async with trio.open_nursery() as nursery:
            node = Node(config, transport, nursery)
            try:
                await node._start()
                yield node
            finally:
                try:
                    await node._stop()
                finally:
                    node._cancel_tasks()
                    nursery.cancel_scope.cancel()
    finally:
        # Every task has ended: no write can be in flight while the stores close.
        if node is not None:
            await node._close_stores()
