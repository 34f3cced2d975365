"""The broadcast component: the Plumtree core driven inside a node, and its subscribers.

Incoming GOSSIP payloads are decoded strictly *before* they reach the core, so a
malformed payload is rejected (and counted) at the first hop instead of being forwarded
through the tree. Each delivery is handed to the subscribers of its tag only, exactly
once per message id: the set of delivered ids belongs to the component, not to the core,
so it survives a crash of the task.

On a crash the core's state is rebuilt from the membership's active view (every peer
starts eager again, as at NeighborUp) because the tree is cheap to regrow and a core
left half-updated by a failing rule must not be trusted; subscribers' channels are closed
and they re-subscribe (`trio_replica.subscription`).
"""

from __future__ import annotations

import collections
import logging
import random
from collections.abc import Callable, Hashable, Iterable
from typing import TYPE_CHECKING, Any

import attrs
import trio

from .component import Component
from .core.effects import Effect, Emit, Send
from .core.plumtree import Plumtree
from .errors import WireError
from .events import Delivered, Delivery, PeerDown, PeerUp
from .messages import Gossip, Message, MessageId, Peer
from .wire import decode_payload

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("trio_replica.broadcast")

#: How many delivered ids are remembered to keep delivery exactly-once across restarts.
DELIVERED_MEMORY = 65_536


_NO_VALUE = object()


@attrs.define(eq=False)
class _Subscriber:
    send: trio.MemorySendChannel[Delivery]
    receive: trio.MemoryReceiveChannel[Delivery]
    include_own: bool


class Broadcast(Component):
    """Owns the Plumtree core of a node and routes deliveries to subscribers by tag."""

    def __init__(self, node: Node, make_core: Callable[[], Plumtree]) -> None:
        super().__init__("broadcast")
        self.node = node
        self._make_core = make_core
        self.core = make_core()
        self._subscribers: dict[str, list[_Subscriber]] = collections.defaultdict(list)
        self._values: dict[MessageId, Any] = {}
        self._delivered: collections.OrderedDict[MessageId, None] = collections.OrderedDict()
        #: Deliveries per tag that found no subscriber (not a drop: nobody asked for them).
        self.unsubscribed: collections.Counter[str] = collections.Counter()
        #: Hops of each delivery (for the Last Delivery Hop figure), bounded histogram.
        self.hops: collections.Counter[int] = collections.Counter()

    # --- component ------------------------------------------------------------------------

    def on_start(self, now: float, first: bool) -> Iterable[Effect]:
        if first:
            return ()
        # After a crash: a fresh core whose eager set is the current active view.
        self.core = self._make_core()
        self._values.clear()
        effects: list[Effect] = []
        for peer in self.node.membership.core.active:
            effects.extend(self.core.neighbor_up(peer, now))
        return effects

    def on_timer(self, timer: Hashable, now: float) -> Iterable[Effect]:
        return self.core.handle_timer(timer, now)

    def on_crash(self) -> None:
        for subscribers in self._subscribers.values():
            for sub in subscribers:
                sub.send.close()
        self._subscribers.clear()

    def execute(self, effect: Effect) -> None:
        if isinstance(effect, Send):
            self.node.send_to(effect.peer, effect.message)
        elif isinstance(effect, Emit) and isinstance(effect.event, Delivered):
            self._deliver(effect.event)

    # --- inputs (posted by the node) ------------------------------------------------------

    def receive_gossip(
        self, sender: Peer, message: Gossip
    ) -> Callable[[float], list[Effect]] | None:
        """Validate a GOSSIP payload now; return the input to post, or None if rejected."""
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

    def receive(self, sender: Peer, message: Message) -> Callable[[float], list[Effect]]:
        return lambda now: self.core.handle_message(sender, message, now)

    def originate(
        self, id: MessageId, tag: str, payload: bytes, value: Any
    ) -> Callable[[float], list[Effect]]:
        def run(now: float) -> list[Effect]:
            self._values[id] = value
            return self.core.broadcast(id, tag, payload, now)

        return run

    def membership_changed(self, event: PeerUp | PeerDown) -> Callable[[float], list[Effect]]:
        if isinstance(event, PeerUp):
            return lambda now: self.core.neighbor_up(event.peer, now)
        return lambda now: self.core.neighbor_down(event.peer, now)

    # --- subscribers ----------------------------------------------------------------------

    def attach(
        self, tag: str, include_own: bool, buffer: int
    ) -> trio.MemoryReceiveChannel[Delivery] | None:
        if not self.running.is_set():
            return None
        send, receive = trio.open_memory_channel[Delivery](buffer)
        self._subscribers[tag].append(_Subscriber(send, receive, include_own))
        return receive

    def detach(self, tag: str, receive: trio.MemoryReceiveChannel[Delivery]) -> None:
        """Forget the subscriber whose channel is `receive` (the subscription ended)."""
        receive.close()
        subscribers = self._subscribers.get(tag)
        if subscribers:
            subscribers[:] = [s for s in subscribers if s.receive is not receive]
            if not subscribers:
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
        self.hops[event.hops] += 1
        own = event.sender is None
        delivery = Delivery(event.tag, value, event.id.origin, event.id, event.hops)
        subscribers = self._subscribers.get(event.tag)
        if not subscribers:
            self.unsubscribed[event.tag] += 1
            return
        for sub in list(subscribers):
            if own and not sub.include_own:
                continue
            try:
                sub.send.send_nowait(delivery)
            except trio.WouldBlock:
                self.node.stats_counters.drop("subscriber_full")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                subscribers.remove(sub)

    def new_id(self, rng: random.Random) -> MessageId:
        ts = self.node.clock.now()
        # 48-bit wall and the low 16 bits of the logical counter fit one CBOR integer; the
        # 64-bit random nonce keeps ids unique even if two stamps coincide.
        return MessageId(self.node.id, (ts.wall << 16) | (ts.logical & 0xFFFF), rng.getrandbits(64))
