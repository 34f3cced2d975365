"""The node an application holds: `open_node(config)` and the `Node` facade.

`open_node` binds the listener, starts the runtime (membership, broadcast, the seeding
policy), opens the host directory, and yields a `Node`. Leaving the block leaves the
cluster gracefully (DISCONNECT to every active peer, flushed under a shielded deadline)
and cancels everything the node started: no task outlives it.

`Node` is a facade: the machinery is the runtime's (`trio_replica.runtime.node_runtime`,
reachable as `node.runtime` for tools and tests); the maps are the stores room's
(`stores.hosting.MapHost`), as are the built-ins; the control operations are the ops
room's. ARCHITECTURE.md draws the rooms.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import trio

from .core.events import Delivery, Event
from .core.hlc import HybridClock
from .core.messages import ControlRequest, MessageId, Peer
from .core.ormap_wire import Validator
from .ops.control_ops import ControlOps
from .ops.status import node_readiness, node_status
from .runtime.component import Component
from .runtime.config import NodeConfig
from .runtime.control import answer_control
from .runtime.direct import DirectMessaging, Handler
from .runtime.identity import TrustStore
from .runtime.link import Link
from .runtime.logs import node_context
from .runtime.node_runtime import NodeRuntime
from .runtime.replica import Replica
from .runtime.replica_api import ReplicaCallbacks
from .runtime.subscription import Subscription
from .stores.hosting import MapHost
from .stores.hosts import HostDirectory
from .stores.leader import Election, Leadership
from .stores.maps import DEFAULT_TOMBSTONE_TTL, ReplicatedMap
from .stores.registry import Registry
from .stores.reminders import Reminders
from .stores.shard import Shard
from .transports.base import Transport


def default_transport(config: NodeConfig) -> Transport:
    """The websocket transport configured from `config` (imported lazily: tests may not need it)."""
    from .transports.websocket import WebsocketTransport

    return WebsocketTransport(
        server_ssl=config.server_ssl, client_ssl=config.client_ssl, max_frame=config.link.max_frame
    )


class Node:
    """A running node; obtain one with `open_node`. All methods are called from Trio tasks.

    Reads (`active_view`, `stats`, ...) never block. The node is single-threaded: every
    method runs to completion between two checkpoints, so no locking is needed.
    """

    def __init__(self, config: NodeConfig, transport: Transport, nursery: trio.Nursery) -> None:
        #: The machinery: links, components, replica drivers (for tools and tests).
        self.runtime = runtime = NodeRuntime(config, transport, nursery)
        #: The maps this node hosts (`open_map`).
        self.map_host = MapHost(runtime)
        #: Who hosts which replica instance: a map every node hosts (stores/hosts.py).
        self.hosts = HostDirectory(runtime, self.map_host)
        runtime.attach_directory(self.hosts)
        #: The service registry (its map opens on first use).
        self.registry = Registry(self, config.registry)
        #: Placement of keys on the live members (``await node.shard.open()`` to join).
        self.shard = Shard(self, config.shard)
        #: Leader elections (``async with node.leader(name)``).
        self.election = Election(self, config.leader)
        #: Durable reminders, fired by the nodes that subscribe to them.
        self.reminders = Reminders(self, config.reminders)
        operations = ControlOps(self)
        ops, streams = operations.ops(), operations.streams()

        def answer(link: Link, request: ControlRequest) -> None:
            answer_control(runtime, link, request, ops, streams)

        runtime.client_handler = answer
        #: Set once the application's maps are open (`mark_control_ready`): map operations
        #: on the control path wait for it, `/readyz` reports it.
        self.control_ready = trio.Event()

    # --- who and where ------------------------------------------------------------------

    @property
    def config(self) -> NodeConfig:
        return self.runtime.config

    @property
    def id(self) -> str:
        return self.runtime.id

    @property
    def address(self) -> str:
        """The address other nodes dial (known once the node listens)."""
        return self.runtime.address

    @property
    def me(self) -> Peer:
        return self.runtime.me

    @property
    def public_key(self) -> bytes:
        """This node's Ed25519 public key, raw (``identity.format_key`` prints it)."""
        return self.runtime.public_key

    @property
    def trust(self) -> TrustStore:
        """Which key each node id may use (`trio_replica.runtime.identity`)."""
        return self.runtime.trust

    @property
    def clock(self) -> HybridClock:
        return self.runtime.clock

    @property
    def direct(self) -> DirectMessaging:
        return self.runtime.direct

    # --- lifecycle ----------------------------------------------------------------------

    def spawn(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        """Run `fn(*args)` as a task of the node; it ends when the node closes."""
        self.runtime.spawn(fn, *args)

    async def wait_ready(self, min_active: int = 1) -> None:
        """Wait until this node is part of the overlay: `min_active` peers in its active
        view (at most the active view's size). Bound it with your own deadline
        (``with trio.fail_after(10): await node.wait_ready()``); a node with no seeds waits
        until another node joins through it."""
        await self.runtime.wait_ready(min_active)

    async def leave(self) -> None:
        """Leave the cluster gracefully now: tell the active peers, flush, within about 2 s.

        The node keeps running until its ``open_node`` block exits, which leaves by itself
        if this was not called; calling it first lets many nodes leave at once (each
        leave waits for its links to flush). Idempotent.
        """
        await self.runtime.stop()

    def abort(self) -> None:
        """Stop the node at once, as a crash would: no graceful leave, every task cancelled.

        Peers notice through their links (closed connections, or idle timeouts). For tests
        and chaos runs; the ``async with open_node(...)`` block is cancelled too.
        """
        self.runtime.abort()

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
        return self.runtime.direct.serve(tag, handler)

    async def send(self, peer: str | Peer, tag: str, payload: Any, *, timeout: float = 5.0) -> None:
        """Send `payload` (plain data) to `peer`'s handler of `tag`; no answer.

        Raises `UnknownPeer`, `RequestTimeout` (not sent in time), `RequestFailed` (the
        link failed), `TypeError` or `MessageTooLarge` for a payload that cannot travel.
        """
        await self.runtime.direct.send(peer, tag, payload, timeout=timeout)

    async def request(
        self, peer: str | Peer, tag: str, payload: Any, *, timeout: float = 5.0
    ) -> Any:
        """Ask `peer`'s handler of `tag` with `payload` and return its answer.

        Raises `UnknownPeer`, `NoHandler`, `RequestFailed` (the handler raised),
        `RequestTimeout` (no answer in time: it may or may not have run).
        """
        return await self.runtime.direct.request(peer, tag, payload, timeout=timeout)

    # --- views --------------------------------------------------------------------------

    def known_peer(self, peer_id: str) -> Peer | None:
        """The address this node knows for `peer_id`: from a link, its views, its lost
        contacts, or the host directory; None if none."""
        return self.runtime.known_peer(peer_id)

    def active_view(self) -> list[Peer]:
        """The peers of this node's active view (symmetric, with open links)."""
        return self.runtime.active_view()

    def passive_view(self) -> list[Peer]:
        """The peers of this node's passive view (known, not connected)."""
        return self.runtime.passive_view()

    def links(self) -> list[Peer]:
        """Peers with an open link right now (active peers plus temporary links)."""
        return self.runtime.links()

    def events(self) -> contextlib.AbstractAsyncContextManager[Subscription[Event]]:
        """Subscribe to membership events (`PeerUp`, `PeerDown`, `Left`, `NodeRemoved`).

        Yields a `Subscription`: iterate it or call `receive()`. If the membership
        component crashes and restarts, the subscription re-attaches by itself and yields a
        `Resubscribed` notice. It holds `config.subscriber_buffer` events; a subscriber
        that falls further behind misses events (counted in
        ``stats()["drops"]["subscriber_full"]``) and then receives `Lagged(missed)`.
        """
        return self.runtime.events()

    # --- broadcasts ---------------------------------------------------------------------

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
        return await self.runtime.broadcast(tag, payload)

    async def writable(self) -> None:
        """Return once the node can take another broadcast (its outgoing budget is not spent).

        A checkpoint either way. For writers that must apply a write locally only once it
        can be sent (`Replica.broadcast_update`). Raises `NodeClosed` if the node closes.
        """
        await self.runtime.writable()

    def subscribe(
        self,
        tag: str,
        *,
        include_own: bool = False,
        buffer: int | None = None,
        buffer_bytes: int | None = None,
        backpressure: bool = False,
    ) -> contextlib.AbstractAsyncContextManager[Subscription[Delivery]]:
        """Receive the broadcasts of `tag` as `Delivery` events, each message exactly once.

        Own broadcasts are delivered only with `include_own`. If the broadcast component
        crashes and restarts, the subscription re-attaches and yields `Resubscribed`
        (messages delivered while it was detached are missed: re-sync on that notice).
        The subscription holds `buffer` deliveries and `buffer_bytes` bytes of payload
        (defaults: `config.subscriber_buffer`, `config.flow.subscriber_bytes`); a
        subscriber further behind misses deliveries, counted in
        ``stats()["drops"]["subscriber_full"]``, and then receives `Lagged(missed)` where
        they went missing. It also receives `Lagged` when a broadcast announced to this
        node could not be fetched, if this subscription's tag is one its announcers named.

        With `backpressure=True`, a subscriber at half its buffer holds the node's pressure:
        the node's writers wait, and peers' own broadcasts entering here are held to their
        limit, so a consumer slower than the traffic slows it down before it misses
        anything. The node itself never waits for it: one that stops reading still misses
        deliveries, and is told (README "Flow control").
        """
        return self.runtime.subscribe(
            tag,
            include_own=include_own,
            buffer=buffer,
            buffer_bytes=buffer_bytes,
            backpressure=backpressure,
        )

    # --- replicas and maps ----------------------------------------------------------------

    async def open_replica(self, name: str, callbacks: ReplicaCallbacks) -> Replica:
        """Start the replica driver of instance `name`, owned by `callbacks` (already running).

        One driver per name on a node; the instance's broadcasts are scoped by its name.
        """
        return await self.runtime.open_replica(name, callbacks)

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
        return await self.map_host.open(
            name, validator=validator, persist=persist, tombstone_ttl=tombstone_ttl
        )

    def maps(self) -> dict[str, ReplicatedMap]:
        """The maps open on this node, by name (not the node's own, such as the host
        directory: names starting with ``_``)."""
        return self.map_host.user_maps()

    # --- health and counters ------------------------------------------------------------

    def components(self) -> dict[str, Component]:
        """The node's supervised protocol components, by name (``membership``,
        ``broadcast``); `trio_replica.testing.crash_component` crashes one."""
        return self.runtime.components()

    def stats(self) -> dict[str, Any]:
        """Every counter of the node, as plain data (see `NodeStats`)."""
        return self.runtime.stats()

    def mark_control_ready(self) -> None:
        """The maps this node is meant to host are open: control requests for them are
        served from now on (`open_node` calls it before yielding unless told to hold)."""
        self.control_ready.set()

    def readiness(self) -> tuple[bool, str]:
        """Whether the node is ready to serve, and why not: joined (a neighbour, or no
        seed but itself to join through) and its maps open (`mark_control_ready`)."""
        return node_readiness(self)

    def liveness(self) -> tuple[bool, str]:
        """Whether the node's machinery runs: not closing, the membership and broadcast
        components and the replica drivers running (a crashed one restarts; meanwhile
        the node is unhealthy; one that crashes past its restart budget closes the
        node)."""
        return self.runtime.liveness()

    def status(self) -> dict[str, Any]:
        """What the `status` control operation returns: identity, views and counters."""
        return node_status(self)

    @property
    def closing(self) -> bool:
        return self.runtime.closing

    @property
    def http_refusals(self) -> Any:
        """Requests the node's HTTP endpoint (/metrics, /readyz) refused."""
        return self.runtime.http_refusals


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
            runtime = node.runtime
            try:
                await runtime.start()
                # Who hosts which instance: a map every node hosts (stores/hosts.py).
                await node.hosts.start()
                await runtime.start_drivers()
                yield node
            finally:
                try:
                    await runtime.stop()
                finally:
                    runtime.tasks.cancel_nursery()
    finally:
        # Every task has ended: no write can be in flight while the stores close.
        if node is not None:
            with trio.CancelScope(shield=True):
                await node.map_host.close_stores()
