"""The membership component: the HyParView core driven inside a node.

Turns the core's effects into link operations on the node (send, dial, close) and its
events into notices for the broadcast layer, replicas and subscribers. The core itself
(`trio_replica.core.hyparview`) holds every rule; nothing here decides membership.

After a crash the component starts a fresh core (`HyParView.restore`) from what the
crashed one leaves as plain peers and from the links that are open: a rule that raised
may have stopped halfway, and a core whose invariants may be broken is not reused. The
fresh core publishes what differs from the events already published (a peer added but
never announced comes up, an announced one whose link is gone goes down), so event
subscribers keep their subscription across the crash and see one consistent stream.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from typing import Protocol

from ..core.effects import CloseLink, Effect, Emit, Send, SetTimer
from ..core.events import Event, Left, PeerDown, PeerUp
from ..core.hyparview import HyParView, JoinTimeout, NeighborTimeout, ShuffleTimeout
from ..core.messages import Peer
from .component import Component
from .services import NodeBasics, Sending

#: Timers that end an exchange waiting for a peer's answer.
_TIMEOUTS = (JoinTimeout, NeighborTimeout, ShuffleTimeout)


class MembershipHost(NodeBasics, Sending, Protocol):
    """What the membership component uses of its node."""

    def close_link(self, peer: Peer) -> None: ...
    def publish_membership_event(self, event: Event) -> None: ...
    def linked_ids(self) -> set[str]: ...


class Membership(Component):
    """Owns the HyParView core of a node; its task is supervised (see `Component`)."""

    def __init__(self, node: MembershipHost, make_core: Callable[[], HyParView]) -> None:
        super().__init__("membership", flow=node.config.flow, on_taken=node.input_processed)
        self.node = node
        self._make_core = make_core
        self.core = make_core()
        #: The peers the node was told are up (PeerUp, not yet PeerDown): what a fresh
        #: core must agree with after a crash (`HyParView.restore`).
        self._up: dict[str, Peer] = {}

    def on_start(self, now: float, first: bool) -> Iterable[Effect]:
        if first:
            return self.core.start(now)
        # Inputs queued before the crash run against the new core (they look it up when
        # they run); the old core's timers are ignored (`Component` drops them).
        old = self.core.survivors()
        self.clear_timers()
        self.core = self._make_core()
        return self.core.restore(old, self.node.linked_ids(), list(self._up.values()), now)

    def on_timer(self, timer: Hashable, now: float) -> Iterable[Effect]:
        return self.core.handle_timer(timer, now)

    def timer_delay(self, effect: SetTimer) -> float:
        # An answer that does not come while our own loop lags may be sitting unread in
        # our socket: the exchange's deadline stretches with the lag (health.py).
        if isinstance(effect.timer, _TIMEOUTS):
            return self.node.health.timeout(effect.delay)
        return effect.delay

    def execute(self, effect: Effect) -> None:
        if isinstance(effect, Send):
            self.node.send_to(effect.peer, effect.message)
        elif isinstance(effect, CloseLink):
            self.node.close_link(effect.peer)
        elif isinstance(effect, Emit):
            event = effect.event
            if isinstance(event, PeerUp):
                self._up[event.peer.id] = event.peer
            elif isinstance(event, PeerDown):
                self._up.pop(event.peer.id, None)
            elif isinstance(event, Left):
                self._up.clear()
            self.node.publish_membership_event(event)
