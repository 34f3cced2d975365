"""Digest anti-entropy of one replica instance, in the runtime.

This module owns the I/O side of `trio_replica.core.antientropy` for one instance: the
comparisons this node opens (`open`), the answers to rounds peers send (`on_round`), and
what goes to each peer, in order, from one task per peer: the entries of the ranges to
send (streamed as `SyncChunk`s as the link takes them), then the rounds (`SyncDigest`)
that follow them. The order is what tells a node that a comparison is over and complete
(the core's docstring).

Sessions. A comparison this node opened is its *session* with that peer: at most one
per peer at a time, and at most `max_sessions` (one) for the whole instance, so that a new
node is filled by one peer and then compared, cheaply, with the others instead of being
sent the same state by all of them at once. `open` while busy queues the peer (once). A
session ends when a bare round arrives from the peer or goes to it, or after
`session_timeout` without a round from the peer (counted, then the next one runs).
Rounds of comparisons the peer opened are answered without any state kept here.

Limits, against a peer that floods (a stateless receiver must not become an amplifier):
rounds from one peer are rate-limited (`rounds_per_s`, with a burst); at most
`peer_queue` answers wait for one peer (a flood's extra rounds are dropped, counted);
and the entries streamed to one peer come out of an allowance of the whole state (at
least `min_allowance` entries) per `serve_window`, refilled continuously: a new node gets
everything at once, small differences pass at any time, and a peer that asks for
everything again and again gets it once per window (a range beyond what is left is
refused, counted; the peer's next comparison asks again). What a peer can make us send
is bounded by the state's size and by time, not by how much it asks.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, Protocol

import attrs
import trio

from .core.antientropy import (
    AntiEntropyConfig,
    DigestRound,
    DigestSource,
    Range,
    answer,
    check_round,
    opening,
    ranges_in,
)
from .errors import LinkClosed
from .flow import TokenBucket
from .messages import Peer, SyncChunk, SyncDigest

log = logging.getLogger("trio_replica.replica")


class DigestOwner(Protocol):
    """The optional members of `ReplicaCallbacks` that turn digest anti-entropy on."""

    def digest_source(self, name: str) -> DigestSource:
        """The instance's state as a `DigestSource` (reads must not await)."""

    def range_stream(self, name: str, level: int, index: int) -> AsyncGenerator[list[Any], None]:
        """The items (as `apply_full_sync` takes them) of one range, in batches."""


@attrs.frozen
class DigestSyncConfig:
    """Limits of digest anti-entropy (module docstring)."""

    compare: AntiEntropyConfig = attrs.field(factory=AntiEntropyConfig)
    #: Comparisons this node runs at once for one instance.
    max_sessions: int = 1
    #: A session that hears nothing from its peer for this long is given up.
    session_timeout: float = 30.0
    #: Rounds accepted from one peer per second, and the burst above that rate.
    rounds_per_s: float = 20.0
    rounds_burst: int = 40
    #: Answers (streams and rounds) waiting to go to one peer; more are dropped.
    peer_queue: int = 8
    #: Entries streamed to one peer per this many seconds: the whole state, or
    #: `min_allowance` entries if that is more.
    serve_window: float = 10.0
    min_allowance: int = 4096

    def __attrs_post_init__(self) -> None:
        from .errors import ConfigError
        from .messages import MAX_DIGEST_PARENTS

        for name in ("session_timeout", "rounds_per_s", "serve_window"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"replica.digest.{name} must be positive, not {value}")
        for name in ("max_sessions", "rounds_burst", "peer_queue", "min_allowance"):
            if getattr(self, name) < 1:
                raise ConfigError(f"replica.digest.{name} must be at least 1")
        if not 1 <= self.compare.max_parents <= MAX_DIGEST_PARENTS:
            raise ConfigError(
                f"replica.digest.compare.max_parents must be 1 to {MAX_DIGEST_PARENTS}"
            )
        if self.compare.exchange_below < 0:
            raise ConfigError("replica.digest.compare.exchange_below must be >= 0")


@attrs.define
class DigestStats:
    sessions_opened: int = 0
    sessions_completed: int = 0
    sessions_timed_out: int = 0
    #: `open` calls folded into a session already queued or running with that peer.
    sessions_coalesced: int = 0
    rounds_sent: int = 0
    rounds_received: int = 0
    #: Rounds refused: over the rate, the queue full, or malformed.
    rounds_refused: collections.Counter[str] = attrs.Factory(collections.Counter)
    ranges_sent: int = 0
    #: Ranges not streamed: more entries than the peer's allowance had left.
    ranges_refused: int = 0
    items_sent: int = 0
    #: Digests (range summaries) sent in rounds.
    digests_sent: int = 0
    #: Streams cut because the owner's `range_stream` raised.
    stream_errors: int = 0
    #: Comparisons we stopped answering because a range was refused (allowance).
    sessions_cut: int = 0


@attrs.define
class _Session:
    id: int
    peer: Peer
    opened: float
    heard: float


@attrs.define
class _Outbox:
    """What waits to go to one peer, in order, and whether its task runs."""

    items: collections.deque[tuple[int, list[Range], list[DigestRound]]] = attrs.Factory(
        collections.deque
    )
    running: bool = False


class DigestSync:
    """Digest anti-entropy of instance `name` (module docstring)."""

    def __init__(
        self,
        name: str,
        owner: DigestOwner,
        send: Callable[[Peer, Any], Awaitable[None]],
        chunker: Callable[[], Any],
        nursery: trio.Nursery,
        rng: Any,
        config: DigestSyncConfig | None = None,
        on_synced: Callable[[float], None] | None = None,
    ) -> None:
        self.name = name
        self.owner = owner
        self.source = owner.digest_source(name)
        self.config = config or DigestSyncConfig()
        self.stats = DigestStats()
        self._send = send
        self._chunker = chunker
        #: Told, for each comparison this node opened that completed, how many seconds ago
        #: it was opened (the map's sync mark, `maps.ReplicatedMap.sync_completed`).
        self._on_synced = on_synced
        self._nursery = nursery
        self._rng = rng
        self._sessions: dict[str, _Session] = {}
        self._waiting: dict[str, Peer] = {}  # peers to compare with next, in order
        self._outboxes: dict[str, _Outbox] = {}
        self._buckets: dict[str, TokenBucket] = {}
        #: Per peer, the entries it may still be sent (`serve_window`).
        self._allowances: dict[str, TokenBucket] = {}
        self._watchdog_running = False

    # --- sessions this node opens ---------------------------------------------------------

    def open(self, peer: Peer) -> None:
        """Compare with `peer` now, or once the sessions running end."""
        if peer.id in self._sessions or peer.id in self._waiting:
            self.stats.sessions_coalesced += 1
            return
        if len(self._sessions) >= self.config.max_sessions:
            self._waiting[peer.id] = peer
            return
        now = trio.current_time()
        session = _Session(self._rng.getrandbits(63), peer, now, now)
        self._sessions[peer.id] = session
        self.stats.sessions_opened += 1
        self._queue(peer, session.id, [], [opening(self.source)])
        if not self._watchdog_running:
            self._watchdog_running = True
            self._nursery.start_soon(self._watchdog)

    def busy(self) -> bool:
        """Whether a session runs or waits."""
        return bool(self._sessions or self._waiting)

    def _end(self, peer_id: str, *, completed: bool) -> None:
        session = self._sessions.pop(peer_id, None)
        if session is None:
            return
        if completed:
            self.stats.sessions_completed += 1
            if self._on_synced is not None:
                self._on_synced(trio.current_time() - session.opened)
        else:
            self.stats.sessions_timed_out += 1
        while self._waiting and len(self._sessions) < self.config.max_sessions:
            self.open(self._waiting.pop(next(iter(self._waiting))))

    async def _watchdog(self) -> None:
        """End sessions whose peer went silent; runs while any session does."""
        timeout = self.config.session_timeout
        try:
            while self._sessions:
                await trio.sleep(timeout / 4)
                now = trio.current_time()
                for peer_id, session in list(self._sessions.items()):
                    if now - session.heard > timeout:
                        log.info(
                            "replica %s: digest comparison with %s timed out",
                            self.name,
                            session.peer,
                        )
                        self._end(peer_id, completed=False)
        finally:
            self._watchdog_running = False

    def peer_gone(self, peer_id: str) -> None:
        """The peer is out of reach or no longer a host: end our session with it and drop
        what waits for it. Its limits stay (a peer whose link flaps gets no fresh
        allowance); they expire when unused (`_prune`)."""
        self._waiting.pop(peer_id, None)
        outbox = self._outboxes.get(peer_id)
        if outbox is not None:
            outbox.items.clear()
        self._end(peer_id, completed=False)

    def chunk_from(self, peer_id: str, session: int) -> None:
        """A chunk of entries for `session` arrived: a long transfer is progress too."""
        mine = self._sessions.get(peer_id)
        if mine is not None and mine.id == session:
            mine.heard = trio.current_time()

    # --- rounds from peers ----------------------------------------------------------------

    def on_round(self, peer: Peer, message: SyncDigest) -> None:
        """A round arrived from `peer` (after the chunks it sent before it)."""
        self.stats.rounds_received += 1
        round_ = DigestRound(message.level, message.parents, message.digests, message.want)
        problem = check_round(round_, self.config.compare)
        if problem is not None:
            self.stats.rounds_refused["malformed"] += 1
            log.warning("replica %s: malformed digest round from %s: %s", self.name, peer, problem)
            return
        session = self._sessions.get(peer.id)
        mine = session is not None and session.id == message.session
        if mine:
            assert session is not None
            session.heard = trio.current_time()
            if round_.bare:
                self._end(peer.id, completed=True)
                return
        elif round_.bare:
            return
        if not self._take_token(peer.id):
            self.stats.rounds_refused["rate"] += 1
            return
        outbox = self._outboxes.get(peer.id)
        if outbox is not None and len(outbox.items) >= self.config.peer_queue:
            self.stats.rounds_refused["queue_full"] += 1
            return
        replies, ranges = answer(self.source, round_, self.config.compare)
        self._queue(peer, message.session, ranges, replies)

    def _prune(self, table: dict[str, TokenBucket], idle: float) -> None:
        """Forget limits unused for `idle` seconds once there are many (they would be
        full again by then anyway)."""
        if len(table) < 1024:
            return
        horizon = trio.current_time() - idle
        for key in [k for k, b in table.items() if b.last_used < horizon]:
            del table[key]

    def _take_token(self, peer_id: str) -> bool:
        cfg = self.config
        self._prune(self._buckets, cfg.rounds_burst / cfg.rounds_per_s)
        bucket = self._buckets.get(peer_id)
        if bucket is None:
            bucket = self._buckets[peer_id] = TokenBucket(
                rate=cfg.rounds_per_s, capacity=cfg.rounds_burst
            )
        return bucket.try_take(1, trio.current_time())

    # --- what goes to each peer -----------------------------------------------------------

    def _queue(
        self, peer: Peer, session: int, ranges: list[Range], rounds: list[DigestRound]
    ) -> None:
        outbox = self._outboxes.setdefault(peer.id, _Outbox())
        outbox.items.append((session, ranges, rounds))
        if not outbox.running:
            outbox.running = True
            self._nursery.start_soon(self._serve, peer, outbox)

    async def _serve(self, peer: Peer, outbox: _Outbox) -> None:
        try:
            while outbox.items:
                session, ranges, rounds = outbox.items.popleft()
                refused = False
                for level, index in ranges_in(ranges):
                    if not self._allow(peer.id, self.source.range_digest(level, index)[1]):
                        self.stats.ranges_refused += 1
                        refused = True
                        continue
                    await self._stream_range(peer, session, level, index)
                if refused:
                    # The comparison must not look complete (the peer's sync mark would
                    # move past entries it never got): no more rounds, it times out.
                    self.stats.sessions_cut += 1
                    continue
                for round_ in rounds:
                    await self._send_round(peer, session, round_)
        except LinkClosed:
            log.info("replica %s: digest sync with %s cut: link closed", self.name, peer)
            outbox.items.clear()
        except Exception:
            # The owner's range_stream is application code: its failure ends what was
            # queued for this peer (the peer's next comparison asks again), not the driver.
            self.stats.stream_errors += 1
            log.exception("replica %s: range_stream failed; sync to %s cut", self.name, peer)
            outbox.items.clear()
        finally:
            outbox.running = False
            if self._outboxes.get(peer.id) is outbox and not outbox.items:
                del self._outboxes[peer.id]

    def _allow(self, peer_id: str, entries: int) -> bool:
        """Take `entries` from the peer's allowance if it has them (module docstring)."""
        cfg = self.config
        capacity = max(cfg.min_allowance, self.source.range_digest(0, 0)[1])
        self._prune(self._allowances, cfg.serve_window)
        allowance = self._allowances.get(peer_id)
        if allowance is None:
            allowance = self._allowances[peer_id] = TokenBucket(rate=1.0, capacity=capacity)
        # The whole state per window: both follow the state's size as it changes.
        allowance.capacity, allowance.rate = capacity, capacity / cfg.serve_window
        return allowance.try_take(entries, trio.current_time())

    async def _stream_range(self, peer: Peer, session: int, level: int, index: int) -> None:
        chunker = self._chunker()
        seq = 0
        items = 0
        stream = self.owner.range_stream(self.name, level, index)
        async with contextlib.aclosing(stream) as batches:
            async for batch in batches:
                items += len(batch)
                for item in batch:
                    chunk = chunker.add(item)
                    if chunk is not None:
                        await self._send(peer, SyncChunk(self.name, session, seq, False, chunk))
                        seq += 1
        last = chunker.flush()
        if last is not None:
            await self._send(peer, SyncChunk(self.name, session, seq, True, last))
        self.stats.ranges_sent += 1
        self.stats.items_sent += items

    async def _send_round(self, peer: Peer, session: int, round_: DigestRound) -> None:
        message = SyncDigest(
            self.name, session, round_.level, round_.parents, round_.digests, round_.want
        )
        await self._send(peer, message)
        self.stats.rounds_sent += 1
        self.stats.digests_sent += len(round_.digests)
        mine = self._sessions.get(peer.id)
        if round_.bare and mine is not None and mine.id == session:
            self._end(peer.id, completed=True)

    def snapshot(self) -> dict[str, Any]:
        out = attrs.asdict(self.stats)
        out["rounds_refused"] = dict(self.stats.rounds_refused)
        out["sessions_running"] = len(self._sessions)
        out["sessions_waiting"] = len(self._waiting)
        return out
