"""The node's runtime: its identity, its tasks, its links, and the components on them.

This module owns `NodeRuntime`, what every piece of the runtime is handed (typed by the
small protocol of what it uses: `services.py`): who the node is (id, address, keys,
trust, clock), its tasks (`tasks.TaskScopes`), its links (`connections.Connections`),
where messages go (`routing.Router`), the supervised components that drive the
membership and broadcast cores, the replica drivers, direct messages and departures, and
the seeding policy's task. The public `Node` (`trio_replica.node`) is a facade over it
that adds the maps, the built-ins and the control operations.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import random
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import trio

from ..core.effects import Effect
from ..core.events import Delivery, Event, PeerDown, PeerUp
from ..core.hlc import HybridClock
from ..core.hyparview import HyParView
from ..core.messages import MAX_TAG, Message, MessageId, Peer
from ..core.ormap import Entry, Key
from ..core.ormap_wire import signed_entry_bytes
from ..core.plumtree import Plumtree
from ..core.seeding import SeedPolicy
from ..errors import ConfigError, MessageTooLarge, NodeClosed
from ..transports.base import Refusals, Transport
from .admission import Admission
from .broadcast import Broadcast
from .component import LOCAL, Component
from .config import NodeConfig
from .connections import Connections
from .departures import Departures
from .dialing import DialBudget
from .direct import DirectMessaging
from .feeds import Fanout, Feed
from .flow import Pressure
from .handshake import Credentials
from .health import loop_health
from .identity import (
    KNOWN_FILE,
    TrustStore,
    endorse,
    load_private_key,
    node_key,
    public_bytes,
    sign_gossip,
)
from .link import Link
from .membership import Membership
from .replica import Replica
from .replica_api import ReplicaCallbacks
from .routing import Router
from .seeding import policy_config, run_seeding
from .services import Directory
from .snapshot import runtime_stats
from .stats import NodeStats
from .subscription import Subscription
from .tasks import TaskScopes

log = logging.getLogger("trio_replica.node")


class NodeRuntime:
    """The machinery of one node (module docstring). Built and started by `open_node`."""

    def __init__(self, config: NodeConfig, transport: Transport, nursery: trio.Nursery) -> None:
        self.config = config
        self.id = config.name
        self.transport = transport
        self.tasks = TaskScopes(nursery)
        self.stats_counters = NodeStats()
        self._rng = random.Random(config.rng_seed)
        #: Buffers over their high-water mark: writers wait on it, and while it is held
        #: peers' own broadcasts entering here are held to their limit.
        self.pressure = Pressure(hold=config.flow.congestion_hold)
        #: The loop's lag, shared with every node of this process (health.py).
        self.health = loop_health(config.health)
        self.dial_budget = DialBudget(
            rate=config.link.dial_rate, burst=config.link.dial_burst, rng=self._rng
        )
        self._event_feeds = Fanout[Event]()
        self.ready = trio.Event()
        #: Set (and replaced) whenever the active view changes: `wait_ready` waits on it.
        self._view_changed = trio.Event()
        self.closing = False
        #: The handshake slots of connections not yet authenticated (admission.py).
        self.admission = Admission(
            config.link,
            self.stats_counters,
            # A node shutting down refuses newcomers: normal, not worth a warning.
            Refusals(log, f"node {config.name}", quiet=("closing",)),
        )
        #: Requests the node's HTTP endpoint (/metrics, /readyz) refused.
        self.http_refusals = Refusals(log, f"node {config.name} metrics endpoint")
        self.address = ""
        self.me = Peer(self.id, "")
        self._key = node_key(config.identity, config.data_dir)
        #: This node's Ed25519 public key, raw (``identity.format_key`` prints it).
        self.public_key = public_bytes(self._key)
        self.clock = HybridClock(max_offset_ms=round(config.max_clock_offset * 1000))
        #: Which key each node id may use (identity.py); its clock is the node's wall clock.
        self.trust = TrustStore(
            config.identity.trust,
            cluster=config.cluster,
            known_file=config.data_dir / KNOWN_FILE if config.data_dir is not None else None,
            allowlist=config.identity.allowlist,
            wall=lambda: self.clock.physical() / 1000,
        )
        self._creds = self._credentials()
        self.connections = Connections(
            node_id=self.id,
            config=config,
            transport=transport,
            tasks=self.tasks,
            stats=self.stats_counters,
            health=self.health,
            pressure=self.pressure,
            admission=self.admission,
            dial_budget=self.dial_budget,
            credentials=lambda: self._creds,
            on_message=self._route,
            on_link_down=self._post_link_down,
            on_link_closed=self._link_closed,
            closing=lambda: self.closing,
            ready=self.ready,
        )
        self.replicas: dict[str, Replica] = {}
        #: Who hosts which instance: provided by the stores room (`attach_directory`).
        self._hosts: Directory | None = None
        self.departures = Departures(self, config.departures)
        #: Messages to one node (`send`, `request`, `serve`).
        self.direct = DirectMessaging(self)
        self.membership: Membership
        self.broadcaster: Broadcast
        self.router: Router
        self.seeding: SeedPolicy | None = None
        #: Answers control requests of client links (set before `start`).
        self.client_handler: Callable[[Link, Any], None] | None = None

    # --- identity -----------------------------------------------------------------------

    def child_rng(self) -> random.Random:
        return random.Random(self._rng.getrandbits(64))

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

    @property
    def hosts(self) -> Directory:
        if self._hosts is None:
            raise RuntimeError("the node's host directory is not attached yet")
        return self._hosts

    def attach_directory(self, directory: Directory) -> None:
        self._hosts = directory

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Listen, start membership and broadcast; the caller starts the rest."""
        bound = await self.start_task(
            self.transport.serve, self.config.listen, self.connections.handle_incoming
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
            # Normal for local work (the config refuses anything but loopback without a
            # secret): said once, at INFO.
            log.info(
                "node %s has no cluster secret: listening on loopback %s only",
                self.id,
                self.address,
            )
        me, cfg = self.me, self.config
        self.membership = Membership(self, lambda: HyParView(me, cfg.membership, self.child_rng()))
        self.broadcaster = Broadcast(
            self, lambda: Plumtree(self.id, cfg.broadcast, self.child_rng())
        )
        self.router = Router(
            node_id=self.id,
            config=cfg,
            stats=self.stats_counters,
            pressure=self.pressure,
            membership=self.membership,
            broadcast=self.broadcaster,
            direct=self.direct,
            replicas=self.replicas,
            send_to=self.send_to,
            client_handler=self.client_handler,
        )
        await self.start_task(self.membership.serve)
        await self.start_task(self.broadcaster.serve)
        self.ready.set()

    async def start_drivers(self) -> None:
        """Departures, the loop's health, the seeding policy, the link sweep."""
        await self.start_task(self.departures.serve)
        self.spawn(self.health.serve)
        cfg = self.config
        seeds = [s for s in cfg.seeds if s != self.address]
        if seeds:
            self.seeding = SeedPolicy(
                self.id,
                seeds,
                # Our own address is among the seeds: we are one (`should_rejoin`).
                is_seed=len(seeds) < len(cfg.seeds),
                config=policy_config(cfg.seed_retry_min, cfg.seed_retry_max, self.membership.core),
                rng=self.child_rng(),
                now=trio.current_time(),
            )
            self.spawn(run_seeding, self, self.seeding, cfg.seed_retry_min)
        self.spawn(self.connections.sweep, lambda peer_id: self.membership.core.wants_link(peer_id))
        log.info("node %s listening on %s", self.id, self.address)

    async def stop(self) -> None:
        """Leave gracefully: tell active peers, let the links flush, within a deadline."""
        if self.closing or not self.ready.is_set():
            return
        with trio.move_on_after(self.config.link.close_timeout * 2) as scope:
            scope.shield = True
            # Writes merged here and waiting for their batch go before the goodbye: a put
            # just before a leave must reach the peers. The broadcast component queues them
            # on the links before the Disconnects: a marker posted behind them (one source
            # keeps its order) says when it has.
            if sum(replica.writes.flush(final=True) for replica in self.replicas.values()):
                queued = trio.Event()

                def mark(now: float) -> list[Effect]:
                    queued.set()
                    return []

                self.broadcaster.post_forced(mark, source=LOCAL)
                with trio.move_on_after(self.config.link.close_timeout / 2):
                    await queued.wait()
            self.membership.apply(self.membership.core.leave(trio.current_time()))
            self.closing = True
            # The Disconnects are queued on links now closing: wait until they are flushed.
            await self.connections.wait_flushed()

    def abort(self) -> None:
        """Stop at once, as a crash would (`Node.abort`)."""
        self.closing = True
        self.tasks.cancel_nursery()

    def spawn(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        self.tasks.spawn(fn, *args)

    async def start_task(self, fn: Callable[..., Awaitable[object]], *args: object) -> Any:
        return await self.tasks.start(fn, *args)

    # --- views and links ------------------------------------------------------------------

    async def wait_ready(self, min_active: int = 1) -> None:
        await trio.lowlevel.checkpoint()
        wanted = min(max(1, min_active), self.config.membership.active_size)
        while len(self.membership.core.active) < wanted:
            await self._view_changed.wait()

    def view_changed(self) -> Awaitable[None]:
        """Wait for the next change of the active view."""
        return self._view_changed.wait()

    @property
    def membership_core(self) -> HyParView:
        return self.membership.core

    async def post_membership(self, run: Callable[[HyParView, float], list[Effect]]) -> None:
        """Run `run(core, now)` in the membership component, on its current core."""
        membership = self.membership
        await membership.post(lambda now: run(membership.core, now))

    def known_peer(self, peer_id: str) -> Peer | None:
        link = self.connections.open_link(peer_id)
        if link is not None:
            return link.peer
        core = self.membership.core
        for peer in (*core.active, *core.passive, *core.lost):
            if peer.id == peer_id:
                return peer
        return self._hosts.address_of(peer_id) if self._hosts is not None else None

    def active_view(self) -> list[Peer]:
        return sorted(self.membership.core.active)

    def passive_view(self) -> list[Peer]:
        return sorted(self.membership.core.passive)

    def links(self) -> list[Peer]:
        return sorted(link.peer for link in self.connections.all() if link.is_open)

    def linked_ids(self) -> set[str]:
        return self.connections.linked_ids()

    def link_to(self, peer: Peer) -> Link | None:
        return self.connections.get(peer.id)

    def send_to(self, peer: Peer, message: Message, *, repair: bool = False) -> bool:
        return self.connections.send_to(peer, message, repair=repair)

    async def send_message(self, peer: Peer, message: Message) -> None:
        await self.connections.send_message(peer, message)

    def close_link(self, peer: Peer) -> None:
        self.connections.close_link(peer)

    async def connect_seed(self, address: str) -> Peer | None:
        return await self.connections.connect(address)

    def connect_error(self, address: str) -> str | None:
        """Why the last dial of `address` by `connect_seed` failed, if it did."""
        return self.connections.connect_errors.get(address)

    def input_processed(self, source: object, credit: int) -> None:
        """A payload input from `source` left a component's inbox: grant its link credit."""
        if isinstance(source, Link):
            source.processed(credit)

    async def _route(self, link: Link, message: Message, size: int) -> None:
        await self.router.route(link, message, size)

    def _link_closed(self, link: Link) -> None:
        self.broadcaster.origination.forget(link)

    def _post_link_down(self, peer: Peer, link: Link | None) -> None:
        """Tell membership that `peer` is out of reach; after what `link` (the link that
        ended, if any) delivered before it ended."""
        membership = self.membership
        connections = self.connections

        def down(now: float) -> list[Effect]:
            if connections.superseded_by(peer, link):
                # A newer link to the peer came up while this news waited behind the old
                # link's messages: the peer is reachable, the old link's end is stale.
                return []
            return membership.core.handle_link_down(peer, now)

        if link is None:
            membership.post_notice(down)
        else:
            membership.post_after(link, down)

    # --- events and broadcasts ------------------------------------------------------------

    def publish_membership_event(self, event: Event) -> None:
        if isinstance(event, PeerUp | PeerDown):
            self.broadcaster.post_notice(self.broadcaster.membership_changed(event))
            self._view_changed.set()
            self._view_changed = trio.Event()
        missed = self._event_feeds.publish(event)
        if missed:
            self.stats_counters.drop("subscriber_full", count=missed)

    @contextlib.asynccontextmanager
    async def events(self) -> AsyncIterator[Subscription[Event]]:
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

        subscription = Subscription[Event]("membership", attach, lambda: self.closing)
        try:
            yield subscription
        finally:
            for feed in attached:
                self._event_feeds.discard(feed)
                feed.close()

    async def broadcast(self, tag: str, payload: Any) -> MessageId:
        from ..core.wire import encode_payload

        encoded = encode_payload(payload, max_size=self.config.max_payload)
        return await self.broadcast_encoded(tag, encoded, payload)

    async def broadcast_encoded(self, tag: str, encoded: bytes, payload: Any) -> MessageId:
        self._check_broadcast(tag, encoded)
        await self.writable()
        return self.broadcast_encoded_nowait(tag, encoded, payload)

    async def writable(self) -> None:
        if self.closing:
            raise NodeClosed("the node is closing")
        await self.pressure.wait_clear("writer")
        await self.broadcaster.wait_room(LOCAL)
        await self.broadcaster.pacer.wait_turn()
        if self.closing:
            raise NodeClosed("the node is closing")

    def broadcast_encoded_nowait(self, tag: str, encoded: bytes, payload: Any) -> MessageId:
        self._check_broadcast(tag, encoded)
        message_id = self.broadcaster.new_id(self._rng)
        self.broadcaster.post_forced(
            self.broadcaster.originate(message_id, tag, encoded, payload),
            source=LOCAL,
            size=len(encoded),
        )
        return message_id

    def _check_broadcast(self, tag: str, encoded: bytes) -> None:
        if self.closing:
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

        subscription = Subscription[Delivery]("broadcast", attach, lambda: self.closing)
        try:
            yield subscription
        finally:
            for feed in attached:
                self.broadcaster.detach(tag, feed)

    # --- replicas, components, counters ---------------------------------------------------

    async def open_replica(
        self, name: str, callbacks: ReplicaCallbacks, *, everywhere: bool = False
    ) -> Replica:
        if self.closing:
            raise NodeClosed("the node is closing")
        if name in self.replicas:
            raise ValueError(f"replica instance {name!r} is already open on this node")
        replica = Replica(
            self, name, callbacks, self.config.replica, self.child_rng(), everywhere=everywhere
        )
        self.replicas[name] = replica
        try:
            await self.start_task(replica.run)
        except BaseException:
            self.replicas.pop(name, None)
            raise
        return replica

    def forget_replica(self, replica: Replica) -> None:
        """Called by a replica driver that stopped: its name is free again."""
        if self.replicas.get(replica.name) is replica:
            del self.replicas[replica.name]

    def components(self) -> dict[str, Component]:
        return {"membership": self.membership, "broadcast": self.broadcaster}

    def liveness(self) -> tuple[bool, str]:
        if self.closing:
            return False, "closing"
        for component in self.components().values():
            if component.dead is not None:
                return False, f"{component.name} dead: {component.dead}"
            if not component.running.is_set():
                return False, f"{component.name} restarting"
        for name, replica in sorted(self.replicas.items()):
            if replica.restarting:
                return False, f"replica {name} restarting"
        return True, "ok"

    def stats(self) -> dict[str, Any]:
        """Every counter of the node, as plain data (see `NodeStats`)."""
        return runtime_stats(
            counters=self.stats_counters,
            transport=self.transport,
            http_refusals=self.http_refusals,
            membership=self.membership,
            broadcaster=self.broadcaster,
            connections=self.connections,
            pressure=self.pressure,
            health=self.health,
            departures=self.departures,
            dial_budget=self.dial_budget,
        )


def _unspecified_host(address: str) -> bool:
    host = urllib.parse.urlsplit(address).hostname or ""
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False
