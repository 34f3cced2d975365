"""Where each message a link reads goes: the component, driver or handler of its kind.

Inputs are queued without a checkpoint while the target's inbox has room (the reader
checkpoints once per frame anyway); a full inbox makes the reader wait, which is the
backpressure on a peer that floods us. A client link (a control session) carries only
control requests.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..core.effects import Effect
from ..core.messages import (
    DIRECT_KINDS,
    HYPARVIEW_KINDS,
    PLUMTREE_KINDS,
    REPLICA_KINDS,
    ControlRequest,
    Direct,
    DirectReply,
    Gossip,
    Message,
    Peer,
    Role,
    SyncChunk,
    SyncDigest,
    SyncRequest,
)
from .link import Link

if TYPE_CHECKING:
    from .broadcast import Broadcast
    from .config import NodeConfig
    from .direct import DirectMessaging
    from .flow import Pressure
    from .membership import Membership
    from .replica import Replica
    from .stats import NodeStats

log = logging.getLogger("trio_replica.node")

_MEMBERSHIP_KINDS = frozenset(HYPARVIEW_KINDS)
_BROADCAST_KINDS = frozenset(PLUMTREE_KINDS)
_REPLICA_KINDS = frozenset(REPLICA_KINDS)
_DIRECT_KINDS = frozenset(DIRECT_KINDS)

#: Answers a control request read from a client link.
ClientHandler = Callable[[Link, ControlRequest], None]


class Router:
    """Hands each message read from a link to whoever handles its kind."""

    def __init__(
        self,
        *,
        node_id: str,
        config: NodeConfig,
        stats: NodeStats,
        pressure: Pressure,
        membership: Membership,
        broadcast: Broadcast,
        direct: DirectMessaging,
        replicas: dict[str, Replica],
        send_to: Callable[[Peer, Message], bool],
        client_handler: ClientHandler | None = None,
    ) -> None:
        self._id = node_id
        self._config = config
        self._stats = stats
        self._pressure = pressure
        self._membership = membership
        self._broadcast = broadcast
        self._direct = direct
        self._replicas = replicas
        self._send_to = send_to
        self._congestion_ms = config.flow.congestion_delay * 1000
        #: Control requests from client links (refused without one).
        self._client_handler = client_handler

    async def route(self, link: Link, message: Message, size: int) -> None:
        if link.role == Role.CLIENT:
            if isinstance(message, ControlRequest) and self._client_handler is not None:
                self._client_handler(link, message)
            else:
                self._stats.reject("client_kind")
            return
        kind = type(message)
        peer = link.peer
        if kind in _BROADCAST_KINDS:
            await self._to_broadcast(link, message, size)
        elif kind in _MEMBERSHIP_KINDS:
            membership = self._membership

            def handle(now: float) -> list[Effect]:
                # The core is looked up when the input runs: a crash meanwhile replaced it.
                return membership.core.handle_message(peer, message, now)

            if not membership.post_nowait(handle, source=link, size=size):
                await membership.post(handle, source=link, size=size)
        elif kind in _DIRECT_KINDS:
            assert isinstance(message, Direct | DirectReply)
            await self._direct.deliver(link, message, size)
        elif kind in _REPLICA_KINDS:
            assert isinstance(message, SyncRequest | SyncChunk | SyncDigest)
            await self._to_replica(link, message, size)
        else:
            self._stats.reject("unexpected_kind")
            log.warning("node %s: unexpected %s from %s", self._id, kind.__name__, peer)

    async def _to_broadcast(self, link: Link, message: Message, size: int) -> None:
        broadcaster = self._broadcast
        peer = link.peer
        credit = 0
        if isinstance(message, Gossip):
            if message.id.origin == peer.id and (
                self._pressure.congested()
                or self._pressure.downstream_congested(excluding=peer.id)
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

    async def _to_replica(
        self, link: Link, message: SyncRequest | SyncChunk | SyncDigest, size: int
    ) -> None:
        replica = self._replicas.get(message.name)
        if replica is not None:
            await replica.deliver_direct(link, link.peer, message, size)
            return
        # Not an error of the peer: it hosts a map this node does not (yet) open.
        self._stats.drop(f"no_such_replica:{type(message).__name__}")
        if message.CREDITED:
            link.processed(size)
        if isinstance(message, SyncDigest) and (message.parents or message.want):
            # A bare answer ends the peer's comparison: nothing here to compare.
            bare = SyncDigest(message.name, message.session, 1, (), (), ())
            self._send_to(link.peer, bare)
