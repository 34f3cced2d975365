"""Digest anti-entropy's I/O for one instance: carrying out the core's `Serve` effects.

The bookkeeping (sessions, limits, whom to compare with) is the sans-IO
`trio_replica.core.replication.ReplicationCore`; this module only moves what it decided:
for each `Serve`, the entries of its ranges (streamed from the owner's `range_stream` as
`SyncChunk`s, as the link takes them), then its rounds (`SyncDigest`), in order, from one
task per peer. The order is what tells a node that a comparison is over and complete
(`core.antientropy`). Each `Serve` is reported back (`on_served(peer_id, ticket,
sent=...)`) once sent or given up, so the core's count of answers waiting per peer stays
true and what was not sent goes back to the peer's allowance.
"""

from __future__ import annotations

import collections
import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, Protocol

import attrs
import trio

from ..core.antientropy import DigestSource
from ..core.messages import Peer, SyncChunk, SyncDigest
from ..core.replication import DigestSyncConfig, Serve
from ..errors import LinkClosed

__all__ = ["DigestOwner", "DigestSyncConfig", "ServeQueue"]

log = logging.getLogger("trio_replica.replica")


class DigestOwner(Protocol):
    """The optional members of `ReplicaCallbacks` that turn digest anti-entropy on."""

    def digest_source(self, name: str) -> DigestSource:
        """The instance's state as a `DigestSource` (reads must not await)."""

    def range_stream(self, name: str, level: int, index: int) -> AsyncGenerator[list[Any], None]:
        """The items (as `apply_full_sync` takes them) of one range, in batches."""


@attrs.define
class _Outbox:
    """What waits to go to one peer, in order, and whether its task runs."""

    items: collections.deque[Serve] = attrs.Factory(collections.deque)
    running: bool = False


class ServeQueue:
    """Carries out `Serve` effects: one ordered stream per peer (module docstring)."""

    def __init__(
        self,
        name: str,
        owner: DigestOwner,
        send: Callable[[Peer, Any], Awaitable[None]],
        chunker: Callable[[], Any],
        nursery: trio.Nursery,
        on_served: Callable[..., None],
    ) -> None:
        self.name = name
        self.owner = owner
        self._send = send
        self._chunker = chunker
        self._nursery = nursery
        self._on_served = on_served
        self._outboxes: dict[str, _Outbox] = {}
        #: Entries streamed, and streams cut because the owner's `range_stream` raised.
        self.items_streamed = 0
        self.stream_errors = 0

    def push(self, serve: Serve) -> None:
        outbox = self._outboxes.setdefault(serve.peer.id, _Outbox())
        outbox.items.append(serve)
        if not outbox.running:
            outbox.running = True
            self._nursery.start_soon(self._serve, serve.peer, outbox)

    def drop(self, peer_id: str) -> None:
        """Forget what waits for `peer_id` (a stream already begun finishes or fails)."""
        outbox = self._outboxes.get(peer_id)
        if outbox is not None:
            outbox.items.clear()

    def _give_up(self, peer: Peer, outbox: _Outbox) -> None:
        while outbox.items:
            self._on_served(peer.id, outbox.items.popleft().ticket, sent=False)

    async def _serve(self, peer: Peer, outbox: _Outbox) -> None:
        try:
            while outbox.items:
                serve = outbox.items.popleft()
                sent = False
                try:
                    for level, index in serve.ranges:
                        await self._stream_range(peer, serve.session, level, index)
                    for round_ in serve.rounds:
                        await self._send(
                            peer,
                            SyncDigest(
                                self.name,
                                serve.session,
                                round_.level,
                                round_.parents,
                                round_.digests,
                                round_.want,
                            ),
                        )
                    sent = True
                finally:
                    self._on_served(peer.id, serve.ticket, sent=sent)
        except LinkClosed:
            log.info("replica %s: digest sync with %s cut: link closed", self.name, peer)
            self._give_up(peer, outbox)
        except Exception:
            # The owner's range_stream is application code: its failure ends what was
            # queued for this peer (the peer's next comparison asks again), not the driver.
            self.stream_errors += 1
            log.exception("replica %s: range_stream failed; sync to %s cut", self.name, peer)
            self._give_up(peer, outbox)
        finally:
            outbox.running = False
            if self._outboxes.get(peer.id) is outbox and not outbox.items:
                del self._outboxes[peer.id]

    async def _stream_range(self, peer: Peer, session: int, level: int, index: int) -> None:
        chunker = self._chunker()
        seq = 0
        stream = self.owner.range_stream(self.name, level, index)
        async with contextlib.aclosing(stream) as batches:
            async for batch in batches:
                self.items_streamed += len(batch)
                for item in batch:
                    chunk = chunker.add(item)
                    if chunk is not None:
                        await self._send(peer, SyncChunk(self.name, session, seq, False, chunk))
                        seq += 1
        last = chunker.flush()
        if last is not None:
            await self._send(peer, SyncChunk(self.name, session, seq, True, last))
