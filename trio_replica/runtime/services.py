"""What the runtime's pieces may use of their node: small `Protocol`s, not the whole node.

A component (membership, broadcast, the replica driver, ...) is handed the node's runtime
but typed by the protocol of what it uses, declared next to it (`MembershipHost` in
`membership.py`, ...) from the building blocks here: who the node is and its settings
(`NodeBasics`), sending to a peer (`Sending`), broadcasting and subscribing (`Publishing`),
and who hosts which instance (`Directory`, provided by the stores room's host directory).
A piece therefore imports nothing above itself, and a reader sees in one place what
it can touch.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from ..core.events import Delivery, Event
from ..core.messages import Message, MessageId, Peer

if TYPE_CHECKING:
    from ..core.hlc import HybridClock
    from .config import NodeConfig
    from .health import LoopHealth
    from .stats import NodeStats
    from .subscription import Subscription

#: Told ``(peer, added)`` when a node starts or stops hosting an instance.
HostListener = Callable[[Peer, bool], None]


class NodeBasics(Protocol):
    """Who the node is, its settings, its counters, its loop's health and its clock."""

    @property
    def id(self) -> str: ...
    @property
    def config(self) -> NodeConfig: ...
    @property
    def stats_counters(self) -> NodeStats: ...
    @property
    def health(self) -> LoopHealth: ...
    @property
    def clock(self) -> HybridClock: ...

    def child_rng(self) -> random.Random:
        """A generator of its own, seeded from the node's (seeded runs stay repeatable)."""
        ...

    def spawn(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        """Run `fn(*args)` as a task of the node; it ends when the node closes."""
        ...


class Sending(Protocol):
    """Messages to one peer, over its link (dialed if needed)."""

    def send_to(self, peer: Peer, message: Message, *, repair: bool = False) -> bool: ...
    async def send_message(self, peer: Peer, message: Message) -> None: ...
    def input_processed(self, source: object, credit: int) -> None: ...


class Publishing(Protocol):
    """Broadcasts and membership events, as an application sees them."""

    def events(self) -> contextlib.AbstractAsyncContextManager[Subscription[Event]]: ...
    def subscribe(
        self,
        tag: str,
        *,
        include_own: bool = False,
        buffer: int | None = None,
        buffer_bytes: int | None = None,
        backpressure: bool = False,
    ) -> contextlib.AbstractAsyncContextManager[Subscription[Delivery]]: ...
    async def broadcast(self, tag: str, payload: Any) -> MessageId: ...
    async def wait_ready(self, min_active: int = 1) -> None: ...
    def active_view(self) -> list[Peer]: ...


class Directory(Protocol):
    """Who hosts which replica instance (`trio_replica.stores.hosts.HostDirectory`)."""

    def hosts(self, instance: str) -> list[Peer]: ...
    def listen(self, instance: str, listener: HostListener) -> None: ...
    def unlisten(self, instance: str) -> None: ...
    async def announce(self, instance: str) -> None: ...
    async def withdraw(self, instance: str) -> None: ...
    def address_of(self, node_id: str) -> Peer | None: ...
    def remember_node(self, node_id: str) -> None: ...
    def forget_node(self, node_id: str) -> None: ...
