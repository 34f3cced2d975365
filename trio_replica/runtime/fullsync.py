"""Full-state sync, the sending side: `FullSyncSender`, owned by a replica driver.

Full sync travels as direct `SyncRequest` / `SyncChunk` messages, not through Plumtree, so
it works while the broadcast component restarts. A snapshot is a list of items; a sender
task per peer encodes it in chunks of at most `sync_chunk_bytes` and queues each only when
the link has room (it never holds the node's pressure), so a large map streams instead of
flooding the outbox. One sync per peer runs at a time; requests that arrive meanwhile are
folded into one more. Each chunk is applied on arrival (by the receiving driver). A chunk
is a snapshot of some keys, so a partial sync never implies a removal.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, Protocol

import trio

from ..core.messages import Peer, SyncChunk
from ..core.wire import Chunker
from ..errors import LinkClosed
from .config import ReplicaConfig
from .replica_api import ReplicaCallbacks, ReplicaStats
from .services import NodeBasics, Sending

log = logging.getLogger("trio_replica.replica")

#: Items per batch when a snapshot list is streamed, and freed per step after.
RELEASE_SLICE = 8192


async def _batches_of(snapshot: list[Any]) -> AsyncGenerator[list[Any], None]:
    """A snapshot list as a stream of batches; emptied a slice at a time once sent
    (freeing a million entries in one go held the loop for 112 ms, bench/bigmap.py)."""
    try:
        for start in range(0, len(snapshot), RELEASE_SLICE):
            yield snapshot[start : start + RELEASE_SLICE]
    finally:
        with trio.CancelScope(shield=True):
            while snapshot:
                del snapshot[-RELEASE_SLICE:]
                await trio.lowlevel.checkpoint()


class FullSyncHost(NodeBasics, Sending, Protocol):
    """What a full-sync sender uses of its node."""


class FullSyncSender:
    """Sends one replica instance's full state to the peers that ask for it (or that the
    core pushes it to), from the driver's task: `send` takes the snapshot, a task of the
    driver's current life streams it.

    `callback` is the driver's deadline wrapper for owner callbacks; `push_again(peer)`
    queues one more push to `peer` on the driver if it is still a neighbour.
    """

    def __init__(
        self,
        node: FullSyncHost,
        name: str,
        callbacks: ReplicaCallbacks,
        config: ReplicaConfig,
        rng: random.Random,
        stats: ReplicaStats,
        callback: Callable[..., Awaitable[Any]],
        push_again: Callable[[Peer], Awaitable[None]],
    ) -> None:
        self._node = node
        self._name = name
        self._callbacks = callbacks
        self._config = config
        self._rng = rng
        self._stats = stats
        self._callback = callback
        self._push_again = push_again
        self._sync_ids = 0
        #: The nursery of the driver's current life (`attach`), None between lives.
        self._nursery: trio.Nursery | None = None
        #: Full syncs being sent, by peer id; True when another was asked for meanwhile.
        self._sending: dict[str, bool] = {}
        #: When the last full sync to each peer ended (`full_sync_again_after`), and the
        #: peers whose next one waits for that window.
        self._full_sync_done: dict[str, float] = {}
        self._deferred: set[str] = set()

    def attach(self, nursery: trio.Nursery) -> None:
        """Run the sending tasks in `nursery`: the driver's life that just started."""
        self._nursery = nursery

    def reset(self) -> None:
        """After a crash of the driver: the dead life's syncs and deferred pushes are gone."""
        self._nursery = None
        self._sending.clear()
        self._deferred.clear()

    def peer_down(self, peer_id: str) -> None:
        """`peer_id` left the neighbours: its next full sync is not held back."""
        self._full_sync_done.pop(peer_id, None)

    async def send(self, peer: Peer) -> None:
        """Take a snapshot now and stream it to `peer` from a task of its own.

        One sync per peer at a time: asked again meanwhile, the running one is followed by
        one more with a fresh snapshot (requests are folded, never queued up).
        """
        if peer.id in self._sending or peer.id in self._deferred:
            if peer.id in self._sending:
                self._sending[peer.id] = True
            self._stats.syncs_coalesced += 1
            return
        done = self._full_sync_done.get(peer.id)
        allowed = -math.inf if done is None else done + self._config.full_sync_again_after
        if trio.current_time() < allowed:
            # Served a moment ago: one more, later, whatever the peer asks meanwhile (a
            # peer asking in a loop gets one full state per window, not one per request).
            assert self._nursery is not None
            self._deferred.add(peer.id)
            self._stats.syncs_deferred += 1
            self._nursery.start_soon(self._push_later, peer, allowed)
            return
        stream = getattr(self._callbacks, "full_sync_stream", None)
        if stream is not None:
            batches = stream(self._name)
        else:
            snapshot = await self._callback(
                "full_sync_snapshot", self._callbacks.full_sync_snapshot
            )
            if not snapshot:
                return
            batches = _batches_of(snapshot)
        assert self._nursery is not None
        self._sending[peer.id] = False
        self._nursery.start_soon(self._stream_sync, peer, batches)

    async def _push_later(self, peer: Peer, when: float) -> None:
        await trio.sleep_until(when)
        self._deferred.discard(peer.id)
        await self._push_again(peer)

    async def _stream_sync(self, peer: Peer, batches: AsyncGenerator[list[Any], None]) -> None:
        try:
            async with contextlib.aclosing(batches):
                await self._stream_chunks(peer, batches)
            self._full_sync_done[peer.id] = trio.current_time()
        except LinkClosed:
            self._stats.syncs_aborted += 1
            log.info("replica %s: full sync to %s cut short: link closed", self._name, peer)
        finally:
            again = self._sending.pop(peer.id, False)
        if again:
            await self._push_again(peer)

    async def _stream_chunks(self, peer: Peer, batches: AsyncGenerator[list[Any], None]) -> None:
        self._sync_ids += 1
        sync_id = (self._rng.getrandbits(32) << 32) | (self._sync_ids & 0xFFFFFFFF)
        chunker = Chunker(self._config.sync_chunk_bytes)
        pending: bytes | None = None  # held back until we know whether it is the last
        seq = 0
        while True:
            try:
                batch = await anext(batches)
            except StopAsyncIteration:
                break
            except Exception:
                # The owner's generator is application code (`ReplicaCallbacks`).
                self._stats.callback_errors += 1
                self._stats.syncs_aborted += 1
                log.exception(
                    "replica %s: full_sync_stream failed; sync to %s cut", self._name, peer
                )
                return
            for item in batch:
                chunk = chunker.add(item)
                if chunk is None:
                    continue
                if pending is not None:
                    await self._send_chunk(peer, sync_id, seq, False, pending)
                    seq += 1
                pending = chunk
        last = chunker.flush()
        if last is not None:
            if pending is not None:
                await self._send_chunk(peer, sync_id, seq, False, pending)
                seq += 1
            pending = last
        if pending is None:
            return
        await self._send_chunk(peer, sync_id, seq, True, pending)
        self._stats.syncs_sent += 1

    async def _send_chunk(
        self, peer: Peer, sync_id: int, seq: int, last: bool, chunk: bytes
    ) -> None:
        if len(chunk) > self._node.config.max_payload:
            self._node.stats_counters.drop("sync_item_too_large")
            return
        # Waits for room on the link: a large snapshot streams, it does not flood.
        await self._node.send_message(peer, SyncChunk(self._name, sync_id, seq, last, chunk))
        self._stats.chunks_sent += 1
