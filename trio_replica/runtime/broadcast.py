"""The broadcast component: the Plumtree core driven inside a node, and its subscribers.

Incoming GOSSIP payloads are decoded strictly *before* they reach the core, so a
malformed payload is rejected (and counted) at the first hop instead of being forwarded
through the tree. Each delivery is offered to the feeds of its tag only, exactly once per
message id: the set of delivered ids belongs to the component, not to the core, so it
survives a crash of the task.

Flow control (`trio_replica.runtime.flow`): a payload the node cannot queue for a peer (its link is
congested) is handed back to the core, which announces it to that peer lazily (an IHAVE, so
the peer grafts it when it has room). A subscriber whose feed is full misses the delivery,
counted, and then receives `Lagged`; so does every subscriber of a tag when the core gives
up on a message of that tag it heard of but could not fetch (`Abandoned`, which names every
tag its announcers gave: an announcer that lies about the tag adds a false notice to the
tag it names, and cannot take the notice away from the true one's subscribers).

On a crash the core's state is rebuilt from the membership's active view (every peer
starts eager again, as at NeighborUp) because the tree is cheap to regrow and a core
left half-updated by a failing rule must not be trusted; subscribers' feeds are closed
and they re-subscribe (`trio_replica.runtime.subscription`).
"""

from __future__ import annotations

import collections
import logging
import random
from collections.abc import Callable, Hashable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import trio

from ..core.effects import Effect, Emit, Send, SetTimer
from ..core.events import Abandoned, Delivered, Delivery, PeerDown, PeerUp
from ..core.messages import Gossip, Message, MessageId, Peer
from ..core.plumtree import GraftTimer, Plumtree
from ..core.wire import decode_payload
from ..errors import WireError
from ..transports.base import Refusals
from .component import Component
from .congestion import OriginationLimit, QueueingDelay, WritePacer
from .feeds import Fanout, Feed
from .flow import BoundedCounter, Pressure
from .identity import gossip_signer
from .services import NodeBasics, Sending

if TYPE_CHECKING:
    from .identity import TrustStore
    from .link import Link

log = logging.getLogger("trio_replica.broadcast")

#: How many delivered ids are remembered to keep delivery exactly-once across restarts.
DELIVERED_MEMORY = 65_536
#: Distinct tags counted in `unsubscribed` (peers choose tags; later ones count as "other").
MAX_COUNTED_TAGS = 64
#: Hop counts above this are counted together in the hops histogram.
MAX_COUNTED_HOPS = 64


_NO_VALUE = object()


@attrs.define(eq=False)
class _TagFeeds:
    """The subscribers of one tag: those that want the node's own broadcasts, and the rest."""

    with_own: Fanout[Delivery] = attrs.Factory(Fanout)
    others: Fanout[Delivery] = attrs.Factory(Fanout)

    def __len__(self) -> int:
        return len(self.with_own) + len(self.others)

    def discard(self, feed: Feed[Delivery]) -> None:
        self.with_own.discard(feed)
        self.others.discard(feed)

    def feeds(self) -> list[Feed[Delivery]]:
        return [*self.with_own.feeds, *self.others.feeds]


class BroadcastHost(NodeBasics, Sending, Protocol):
    """What the broadcast component uses of its node."""

    @property
    def pressure(self) -> Pressure: ...
    @property
    def public_key(self) -> bytes: ...
    @property
    def trust(self) -> TrustStore: ...

    def link_to(self, peer: Peer) -> Link | None: ...
    def sign_gossip(self, id: MessageId, tag: str, payload: bytes) -> bytes: ...
    def active_view(self) -> list[Peer]: ...


class Broadcast(Component):
    """Owns the Plumtree core of a node and routes deliveries to subscribers by tag."""

    def __init__(self, node: BroadcastHost, make_core: Callable[[], Plumtree]) -> None:
        # Its backlog slows the node's writers (the membership component's does not: its
        # inputs are few, and writers must not wait on a peer's shuffles).
        super().__init__(
            "broadcast",
            flow=node.config.flow,
            pressure=node.pressure,
            on_taken=node.input_processed,
        )
        self.node = node
        #: Broadcasts refused for their signature: counted each, logged once a period.
        self.refusals = Refusals(log, f"node {node.id} broadcast")
        self._make_core = make_core
        self.core = self._new_core()
        self._subscribers: dict[str, _TagFeeds] = {}
        self._values: dict[MessageId, Any] = {}
        self._delivered: collections.OrderedDict[MessageId, None] = collections.OrderedDict()
        #: Deliveries per tag that found no subscriber (not a drop: nobody asked for them).
        self.unsubscribed = BoundedCounter(MAX_COUNTED_TAGS)
        #: Hops of each delivery (for the Last Delivery Hop figure), bounded histogram.
        self.hops: collections.Counter[int] = collections.Counter()
        flow, seed = node.config.flow, node.config.rng_seed
        #: Queueing delay of deliveries, and the pacing of the node's writes it drives.
        self.delay = QueueingDelay()
        self.pacer = WritePacer(
            target=flow.delay_target,
            max_interval=flow.pace_max_interval,
            # Its own generator: drawing from the node's would shift every seeded sequence.
            rng=random.Random(None if seed is None else f"pacer:{seed}"),
        )
        #: What each peer may originate through this node.
        self.origination = OriginationLimit(
            rate=flow.peer_broadcast_rate, bytes_rate=flow.peer_broadcast_bytes_rate
        )

    # --- component ------------------------------------------------------------------------

    def on_start(self, now: float, first: bool) -> Iterable[Effect]:
        if first:
            return ()
        # After a crash: a fresh core whose eager set is the current active view (the old
        # core's timers are forgotten: their tokens mean nothing to the new one).
        self.clear_timers()
        self.core = self._new_core()
        self._values.clear()
        effects: list[Effect] = []
        for peer in self.node.active_view():
            effects.extend(self.core.neighbor_up(peer, now))
        return effects

    def on_timer(self, timer: Hashable, now: float) -> Iterable[Effect]:
        return self.core.handle_timer(timer, now)

    def timer_delay(self, effect: SetTimer) -> float:
        # timeout2 waits for the answer to a GRAFT; while our loop lags, the answer may
        # already sit unread in our socket, and giving up on it, or grafting the next
        # announcer, answers slowness with one more payload in the same queues (health.py).
        # Measured: 50 nodes in one process, 2,000 broadcasts as fast as flow control
        # allowed, loop lag 0.26-0.5 s: 1,309 give-ups at timeout2, all delivered later.
        # timeout1 is not stretched: it is the latency of repairing a broken tree.
        if isinstance(effect.timer, GraftTimer) and effect.timer.answer:
            return self.node.health.timeout(effect.delay)
        return effect.delay

    def _new_core(self) -> Plumtree:
        core = self._make_core()
        core.queued_from = self._queued_from
        return core

    def _queued_from(self, peer: Peer) -> bool:
        """Whether messages from `peer` wait in this component's inbox (Plumtree asks)."""
        link = self.node.link_to(peer)
        return link is not None and self.queued(link) > 0

    def on_crash(self) -> None:
        for feeds in self._subscribers.values():
            feeds.with_own.close_all()
            feeds.others.close_all()
        self._subscribers.clear()

    def execute(self, effect: Effect) -> None:
        if isinstance(effect, Send):
            message = effect.message
            sent = self.node.send_to(effect.peer, message, repair=effect.repair)
            if not sent and isinstance(message, Gossip):
                # The peer's link is congested: it hears of the message lazily instead.
                self.apply(self.core.push_deferred(effect.peer, message, trio.current_time()))
        elif isinstance(effect, Emit):
            if isinstance(effect.event, Delivered):
                self._deliver(effect.event)
            elif isinstance(effect.event, Abandoned):
                self._abandoned(effect.event.tags)

    # --- inputs (posted by the node) ------------------------------------------------------

    def receive_gossip(
        self, sender: Peer, message: Gossip
    ) -> Callable[[float], list[Effect]] | None:
        """Validate a GOSSIP payload now; return the input to post, or None if rejected."""
        if self.node.config.identity.require_signatures and not self.core.has_seen(message.id):
            refused = self._unsigned(message)
            if refused is not None:
                # Not delivered, not forwarded: a neighbour that relays it learns nothing
                # from us, and the origin it names is not impersonated here.
                self.node.stats_counters.reject(refused)
                self.refusals.refuse(refused, f"{message.id} from {sender}")
                return None
        try:
            value = decode_payload(message.payload, max_size=self.node.config.max_payload)
        except WireError as exc:
            self.node.stats_counters.reject(f"payload_{exc.reason}")
            log.warning("rejected a broadcast payload from %s (%s): %s", sender, exc.reason, exc)
            return None

        def run(now: float) -> list[Effect]:
            effects = self.core.handle_message(sender, message, now)
            if any(isinstance(e, Emit) for e in effects):
                self._values[message.id] = value
            return effects

        return run

    def _unsigned(self, message: Gossip) -> str | None:
        """Why a broadcast's signature is not acceptable (a counter label), or None."""
        if not message.signature:
            return "gossip_unsigned"
        mid = message.id
        key = gossip_signer(
            message.signature, mid.origin, mid.stamp, mid.nonce, message.tag, message.payload
        )
        if key is None:
            return "gossip_bad_signature"
        if mid.origin == self.node.id:
            return None if key == self.node.public_key else "gossip_origin_key"
        return None if self.node.trust.allows(mid.origin, key) else "gossip_origin_key"

    def receive(self, sender: Peer, message: Message) -> Callable[[float], list[Effect]]:
        return lambda now: self.core.handle_message(sender, message, now)

    def originate(
        self, id: MessageId, tag: str, payload: bytes, value: Any
    ) -> Callable[[float], list[Effect]]:
        signature = b""
        if self.node.config.identity.sign_broadcasts:
            signature = self.node.sign_gossip(id, tag, payload)

        def run(now: float) -> list[Effect]:
            self._values[id] = value
            return self.core.broadcast(id, tag, payload, now, signature)

        return run

    def membership_changed(self, event: PeerUp | PeerDown) -> Callable[[float], list[Effect]]:
        if isinstance(event, PeerUp):
            return lambda now: self.core.neighbor_up(event.peer, now)
        return lambda now: self.core.neighbor_down(event.peer, now)

    # --- subscribers ----------------------------------------------------------------------

    def attach(
        self,
        tag: str,
        *,
        include_own: bool,
        max_items: int,
        max_bytes: int,
        pressure: Pressure | None,
    ) -> Feed[Delivery] | None:
        """A new feed for `tag`, or None while the component is restarting."""
        if not self.running.is_set():
            return None
        feed = Feed[Delivery](max_items=max_items, max_bytes=max_bytes, pressure=pressure)
        feeds = self._subscribers.setdefault(tag, _TagFeeds())
        (feeds.with_own if include_own else feeds.others).add(feed)
        return feed

    def detach(self, tag: str, feed: Feed[Delivery]) -> None:
        """Forget `feed` (its subscription ended)."""
        feed.close()
        feeds = self._subscribers.get(tag)
        if feeds is not None:
            feeds.discard(feed)
            if not feeds:
                del self._subscribers[tag]

    def _deliver(self, event: Delivered) -> None:
        value = self._values.pop(event.id, _NO_VALUE)
        if event.id in self._delivered:
            # The core forgot it (after a restart, or beyond its seen window); we did not.
            self.node.stats_counters.drop("duplicate_delivery")
            return
        self._delivered[event.id] = None
        if len(self._delivered) > DELIVERED_MEMORY:
            self._delivered.popitem(last=False)
        if value is _NO_VALUE:
            try:
                value = decode_payload(event.payload, max_size=self.node.config.max_payload)
            except WireError:
                self.node.stats_counters.reject("payload_cbor")
                return
        self.hops[min(event.hops, MAX_COUNTED_HOPS)] += 1
        if event.sender is not None and not event.repaired:
            # A repaired delivery waited for our repair timers: that is not queueing.
            # The id's stamp is the origin's HLC: wall milliseconds above 16 bits.
            ms = self.delay.observe(
                event.id.origin, event.id.stamp >> 16, self.node.clock.read_physical()
            )
            self.pacer.sample(ms / 1000)
            # Repair timers allow for the queueing (twice the recent worst: a payload queued
            # that long is on its way, and grafting it would only duplicate it).
            self.core.set_delay_allowance(2 * self.delay.recent_max_ms / 1000)
        feeds = self._subscribers.get(event.tag)
        if not feeds:
            self.unsubscribed[event.tag] += 1
            return
        delivery = Delivery(event.tag, value, event.id.origin, event.id, event.hops)
        size = len(event.payload)
        missed = feeds.with_own.publish(delivery, size)
        if event.sender is not None:
            missed += feeds.others.publish(delivery, size)
        if missed:
            self.node.stats_counters.drop("subscriber_full", count=missed)

    def _abandoned(self, tags: tuple[str, ...]) -> None:
        """A message announced to us could not be fetched: the subscribers of the tags its
        announcers named lack it."""
        for tag in tags:
            feeds = self._subscribers.get(tag)
            if feeds is not None:
                for feed in feeds.feeds():
                    feed.note_missed(1)

    def new_id(self, rng: random.Random) -> MessageId:
        ts = self.node.clock.now()
        # 48-bit wall and the low 16 bits of the logical counter fit one CBOR integer; the
        # 64-bit random nonce keeps ids unique even if two stamps coincide.
        return MessageId(self.node.id, (ts.wall << 16) | (ts.logical & 0xFFFF), rng.getrandbits(64))
