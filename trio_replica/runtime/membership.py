"""The membership component: the HyParView core driven inside a node.

Turns the core's effects into link operations on the node (send, dial, close) and its
events into notices for the broadcast layer, replicas and subscribers. The core itself
(`trio_replica.core.hyparview`) holds every rule; nothing here decides membership.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import TYPE_CHECKING

from ..core.effects import CloseLink, Effect, Emit, Send, SetTimer
from ..core.hyparview import HyParView, JoinTimeout, NeighborTimeout, ShuffleTimeout
from .component import Component

if TYPE_CHECKING:
    from ..node import Node

#: Timers that end an exchange waiting for a peer's answer.
_TIMEOUTS = (JoinTimeout, NeighborTimeout, ShuffleTimeout)


class Membership(Component):
    """Owns the HyParView core of a node; its task is supervised (see `Component`)."""

    def __init__(self, node: Node, core: HyParView) -> None:
        super().__init__("membership", flow=node.config.flow, on_taken=node.input_processed)
        self.node = node
        self.core = core

    def on_start(self, now: float, first: bool) -> Iterable[Effect]:
        # The core's state (views, pending exchanges, armed timers) survives a crash of the
        # task: it is the node's place in the overlay and cannot be rebuilt from elsewhere.
        return self.core.start(now) if first else ()

    def on_timer(self, timer: Hashable, now: float) -> Iterable[Effect]:
        return self.core.handle_timer(timer, now)

    def on_crash(self) -> None:
        self.node.close_subscriptions("membership")

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
            self.node.publish_membership_event(effect.event)
