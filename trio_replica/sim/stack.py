"""The per-node stack of the simulator: the protocol cores one simulated node runs.

This module owns `Layer` (one protocol core as the simulator, and the runtime, drives it),
the membership layer (`HyParViewLayer`), and `Stack`, which holds a node's layers by name
and routes each message class to the one layer that handles it. The broadcast layers are
in `sim.broadcast`; the simulator that runs stacks is `sim.overlay.Simulator`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable, Mapping
from typing import Protocol

from ..core.effects import Effect
from ..core.events import Event
from ..core.hyparview import HyParView, HyParViewConfig
from ..core.messages import HYPARVIEW_KINDS, Message, Peer

__all__ = ["MEMBERSHIP", "HyParViewLayer", "Layer", "Stack", "StackFactory", "hyparview_stack"]

MEMBERSHIP = "membership"


class Layer(Protocol):
    """One protocol core as the simulator (and the runtime) drives it.

    `kinds` are the message classes routed to this layer. `handle_event` receives the
    events the *other* layers of the same node emit (e.g. HyParView's PeerUp/PeerDown for
    Plumtree's eager set).
    """

    kinds: tuple[type[Message], ...]

    def handle_message(self, sender: Peer, message: Message, now: float) -> list[Effect]: ...

    def handle_timer(self, timer: Hashable, now: float) -> list[Effect]: ...

    def handle_link_down(self, peer: Peer, now: float) -> list[Effect]: ...

    def handle_event(self, event: Event, now: float) -> list[Effect]: ...

    def wants_link(self, peer_id: str) -> bool: ...


class HyParViewLayer:
    """Adapts the HyParView core to `Layer` (it consumes no other layer's events)."""

    kinds: tuple[type[Message], ...] = HYPARVIEW_KINDS
    __slots__ = ("core", "handle_message", "handle_timer")

    def __init__(self, core: HyParView) -> None:
        self.core = core
        # The core's own methods: a method forwarding to them would add a call to every
        # message of every run.
        self.handle_message = core.handle_message
        self.handle_timer = core.handle_timer

    def handle_link_down(self, peer: Peer, now: float) -> list[Effect]:
        return self.core.handle_link_down(peer, now)

    def handle_event(self, event: Event, now: float) -> list[Effect]:
        return []

    def wants_link(self, peer_id: str) -> bool:
        return self.core.wants_link(peer_id)


#: The routing tables of the stacks made so far, by content (`Stack.routes`).
_ROUTES: dict[tuple[tuple[type[Message], str], ...], dict[type[Message], str]] = {}


class Stack:
    """The protocol layers of one node, by name, and the message routing between them.

    The layer named ``"membership"`` must be a `HyParViewLayer`: the driver and the graph
    helpers read its core. `routes` is shared by the stacks of the same layers (read once
    per message, one table stays in the processor's cache where thousands would not): it
    is not to be changed.
    """

    __slots__ = ("hyparview", "layers", "routes")

    def __init__(self, layers: Mapping[str, Layer]) -> None:
        self.layers = dict(layers)
        routes: dict[type[Message], str] = {}
        for name, layer in self.layers.items():
            for kind in layer.kinds:
                if kind in routes:
                    raise ValueError(f"{kind.__name__} routed to {routes[kind]} and {name}")
                routes[kind] = name
        self.routes = _ROUTES.setdefault(tuple(routes.items()), routes)
        membership = self.layers.get(MEMBERSHIP)
        if not isinstance(membership, HyParViewLayer):
            raise ValueError(f"a stack needs a HyParViewLayer named {MEMBERSHIP!r}")
        self.hyparview: HyParView = membership.core

    def wants_link(self, peer_id: str) -> bool:
        return any(layer.wants_link(peer_id) for layer in self.layers.values())


StackFactory = Callable[[Peer, random.Random], Stack]


def hyparview_stack(config: HyParViewConfig) -> StackFactory:
    """A factory of stacks holding only the membership layer."""

    def make(peer: Peer, rng: random.Random) -> Stack:
        return Stack({MEMBERSHIP: HyParViewLayer(HyParView(peer, config, rng))})

    return make
