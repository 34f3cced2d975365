"""One authenticated link to a peer: the reader and the writer over its outbox.

Theory of operation
-------------------
A link starts on a transport connection (dialed or accepted) once the handshake
(handshake.py) has authenticated the peer. Once established, a link runs two tasks, and
they are the connection's only I/O (transports/wsconn.py has no task of its own): a send
may block on a peer that does not read, and reading must go on meanwhile (its frames
prove the peer alive, its pings and close frames are answered), so reading and writing
never share a task:

* the **reader** decodes each frame strictly, counts and drops malformed ones (closing the
  link after too many), and hands each message to the node;
* the **writer** drains a bounded outbox, control messages ahead of payload messages,
  batching as many as fit in one frame; it sends a ping when the link has been quiet for
  `ping_interval`, and fails the link when nothing was received for `idle_timeout` or when
  one send blocks for `send_timeout` (the peer reads nothing: the HyParView paper expels
  slow peers so blocking does not spread).

Liveness is one-way per direction: each side pings only while it has nothing else to send,
and any frame received proves the peer alive. A ping is therefore never answered: a pong
would only repeat what the peer's own pings (or traffic) already tell, and on an idle link
answering doubled the frames (measured with 25 idle nodes: 249 pings and 249 pongs a
second). `Pong` stays a valid message, so a peer that still answers is not refused. Pings
do not count as activity for `last_activity`, so a link that carries nothing but pings is
idle and the node closes it once membership no longer needs it.

The outbox the writer drains, and the credit that paces payload messages both ways, are
outbox.py's.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from ..core.messages import Credit, Message, Peer, Ping, Pong
from ..core.wire import decode_frame_sized, encode_message, frame_from_parts
from ..errors import MessageTooLarge, WireError
from ..transports.base import Connection, TransportClosed
from .flow import Pressure
from .linkconfig import LinkConfig
from .outbox import LinkFailure, Outbox

if TYPE_CHECKING:
    from .health import LoopHealth
    from .stats import NodeStats

log = logging.getLogger("trio_replica.link")

#: Grid of the writers' ping and idle deadlines, in seconds (at most a quarter of the ping
#: interval): a ping goes out up to this much after it is due, and a silent peer is failed up
#: to this much after `idle_timeout`.
PING_TICK = 0.25


def _on_grid(at: float, tick: float) -> float:
    """`at` rounded up to a multiple of `tick`, never earlier than `at` itself."""
    return max(at, math.ceil(at / tick) * tick)


#: Messages that only prove the peer alive (`Pong` from peers that still answer pings).
_LIVENESS = frozenset((Ping, Pong))


MessageHandler = Callable[["Link", Message, int], Awaitable[None]]


class Link(Outbox):
    """An established, authenticated link to `peer`; see the module docstring.

    Owned by the node: it runs `run()` in a task of the node's nursery and gets the reason
    back when the link ends. Cancelling `run()` closes the connection (shielded, bounded).
    `pressure` (the node's) is held while the payload outbox is over its high-water mark.
    """

    def __init__(
        self,
        conn: Connection,
        peer: Peer,
        *,
        role: str,
        outbound: bool,
        config: LinkConfig,
        key: bytes = b"",
        stats: NodeStats,
        on_message: MessageHandler,
        pressure: Pressure | None = None,
        health: LoopHealth | None = None,
    ) -> None:
        super().__init__(peer, config=config, stats=stats, pressure=pressure)
        self.conn = conn
        self.role = role
        self.outbound = outbound
        #: The public key the peer proved in the handshake.
        self.key = key
        self._on_message = on_message
        self._health = health
        #: The peer's loop lag as its last ping said (seconds), and whether its silence
        #: has made it suspect.
        self.peer_lag = 0.0
        self.suspected = False
        now = trio.current_time()
        self.established_at = now
        self.last_received = now
        self.last_sent = now
        self.last_activity = now
        self._ping_nonce = 0
        #: True while the writer is in a send: a deadline firing then is a send timeout.
        self._sending = False
        #: The writer's cancel scope, whose deadline the reader pushes on while a send is
        #: blocked and the peer still talks (`send_timeout`).
        self._write_scope: trio.CancelScope | None = None
        self._bad_frames = 0
        self._handing_over = False
        self.close_reason: str | None = None
        #: Set once `run()` has returned and the connection is closed.
        self.closed = trio.Event()

    def __repr__(self) -> str:
        return f"<Link {'to' if self.outbound else 'from'} {self.peer}>"

    def close_soon(self) -> None:
        """Flush what is queued, then close (used after a Disconnect or for idle links)."""
        self._closing = True
        self._wakeup.set()
        self._room.unpark_all()

    async def run(self) -> str:
        """Run the reader and writer until the link ends; return why it ended."""
        reason = "closed"
        # Our window, granted before anything else goes out.
        self._grant_messages = self._grant_bytes = 0
        self._grant(self.config.window_messages, self.config.window_bytes)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._reader)
                nursery.start_soon(self._writer)
        except* LinkFailure as group:
            first = group.exceptions[0]
            assert isinstance(first, LinkFailure)
            reason = first.reason
        finally:
            self._closed = True
            self._closing = True
            self._room.unpark_all()
            if self._pressure is not None:
                self._pressure.release(self)
            for message, _ in self._payload:
                # Waiting for credit the peer never gave: the link is gone, so are they.
                self._stats.drop("link_closed", message)
            self._payload.clear()
            self._payload_bytes = 0
            with trio.move_on_after(self.config.close_timeout) as cleanup:
                cleanup.shield = True
                await self.conn.aclose()
        if self.close_reason is None:
            self.close_reason = reason
        self.closed.set()
        return self.close_reason

    def retire(self, reason: str) -> None:
        """Stop taking messages, but keep reading (and pinging) until the link is closed.

        Used for the losing one of two links to the same peer: frames the peer sent on it
        before it learned of the other link are still in flight and must be delivered.
        """
        self.retired = True
        self._room.unpark_all()
        if self.close_reason is None:
            self.close_reason = reason

    def fail(self, reason: str) -> None:
        """Record why the link is being torn down by its owner (before cancelling `run`)."""
        if self.close_reason is None:
            self.close_reason = reason
        self._closing = True
        self._wakeup.set()
        self._room.unpark_all()
        if self._sending and self._write_scope is not None:
            # A send blocked on a peer that reads nothing would hold the link open.
            self._write_scope.cancel()

    async def _reader(self) -> None:
        while True:
            try:
                frame = await self.conn.receive()
            except TransportClosed:
                if self._closing:
                    self.close_reason = self.close_reason or "local_close"
                raise LinkFailure(self.close_reason or "peer_closed") from None
            now = trio.current_time()
            self.last_received = now
            if self._sending and self._write_scope is not None and not self._closing:
                # The peer talks while our send is blocked: it is slow, not gone.
                self._write_scope.deadline = max(
                    self._write_scope.deadline, now + self._timeout(self.config.send_timeout, now)
                )
            if self.suspected:
                self.suspected = False
                self._stats.flow["suspicions_cleared"] += 1
                log.info("link to %s: suspicion cleared, the peer spoke", self.peer)
            self._stats.frame_received(len(frame))
            try:
                messages = decode_frame_sized(frame, max_frame=self.config.max_frame)
            except WireError as exc:
                self._bad_frames += 1
                self._stats.reject(exc.reason)
                log.warning("rejected frame from %s (%s): %s", self.peer, exc.reason, exc)
                if self._bad_frames >= self.config.max_bad_frames:
                    raise LinkFailure(
                        "bad_frames", f"{self._bad_frames} malformed frames"
                    ) from None
                continue
            self._handing_over = True
            try:
                for message, size in messages:
                    self._stats.message_received(message, size)
                    kind = type(message)
                    if kind in _LIVENESS:
                        # The frame refreshed last_received; that is all a ping is for,
                        # with the peer's word on its own loop.
                        if kind is Ping:
                            assert isinstance(message, Ping)
                            self.peer_lag = message.lag_ms / 1000
                        continue
                    if kind is Credit:
                        assert isinstance(message, Credit)
                        self._on_credit(message)
                        continue
                    if message.CREDITED:
                        self._spend_grant(size)
                    self.last_activity = now
                    await self._on_message(self, message, size)
            finally:
                self._handing_over = False
                # Waiting for a busy component is our delay, not the peer's silence.
                self.last_received = trio.current_time()

    async def _writer(self) -> None:
        # One cancel scope serves many frames: its deadline is moved (to the next ping or
        # idle check while waiting, to the send timeout while sending) instead of a new scope
        # per wait and per send, which cost more than the send itself on small frames. A
        # deadline that fires ends the scope; a new one is opened unless it was a send's.
        while True:
            with trio.CancelScope() as scope:
                await self._write_frames(scope)
            if self._sending:
                raise LinkFailure(
                    "send_timeout", f"a send blocked for {self.config.send_timeout} s"
                )

    async def _write_frames(self, scope: trio.CancelScope) -> None:
        self._write_scope = scope
        cfg = self.config
        tick = min(PING_TICK, cfg.ping_interval / 4)
        while True:
            if scope.cancel_called:
                # The wait's deadline passed after something had already woken us (a
                # lagging loop runs us late): a cancelled scope stays cancelled even if its
                # deadline moves, so the next send would be cut at once and read as a send
                # timeout. Start a new scope instead.
                return
            now = trio.current_time()
            if self._handing_over:
                self.last_received = now
            silent_until = self._silence_deadline(now)
            if now >= silent_until:
                if not self.suspected:
                    self.suspected = True
                    self._stats.flow["suspicions"] += 1
                    log.info(
                        "link to %s: suspected, silent for %.1f s",
                        self.peer,
                        now - self.last_received,
                    )
                    silent_until = self._silence_deadline(now)
                if now >= silent_until:
                    raise LinkFailure(
                        "idle_timeout", f"nothing received for {now - self.last_received:.1f} s"
                    )
            parts = self._take_batch() if self._control or self._payload else []
            # The wait's deadline is never before this instant (`_on_grid`), so float
            # rounding cannot make the writer wake for a ping it then finds not due (a busy
            # loop on a mock clock).
            if not parts and not self._closing and now >= self.last_sent + cfg.ping_interval:
                self._ping_nonce += 1
                lag = self._health.recent_lag(now) if self._health is not None else 0.0
                ping = Ping(self._ping_nonce, min(round(lag * 1000), 2**32))
                part = encode_message(ping)
                self._stats.message_sent(ping, len(part))
                parts = [part]
            if parts:
                await self._send_frame(scope, frame_from_parts(parts))
                continue
            if self._closing:
                raise LinkFailure(self.close_reason or "local_close")
            # Sleep until there is something to send, a ping is due, or the peer has been
            # silent too long; no periodic wake-ups in between. The deadline is rounded up
            # to a grid shared by every link of the process, so that the pings of idle
            # links go out together: one scheduler wake-up (and one on the receiving side)
            # serves many links instead of one each.
            self._wakeup = trio.Event()
            scope.deadline = _on_grid(min(self.last_sent + cfg.ping_interval, silent_until), tick)
            await self._wakeup.wait()

    def _timeout(self, base: float, now: float) -> float:
        """`base` stretched while our loop or the peer's lags (health.py)."""
        if self._health is None:
            return base
        return self._health.timeout(base, self.peer_lag, now)

    def _silence_deadline(self, now: float) -> float:
        """When the peer's silence makes it suspect, or, once suspected, failed."""
        cfg = self.config
        deadline = self.last_received + self._timeout(cfg.idle_timeout, now)
        if self.suspected:
            deadline += self._timeout(cfg.suspicion_timeout, now)
        return deadline

    async def _send_frame(self, scope: trio.CancelScope, frame: bytes) -> None:
        now = trio.current_time()
        scope.deadline = now + self._timeout(self.config.send_timeout, now)
        self._sending = True
        try:
            await self.conn.send(frame)
        except TransportClosed:
            raise LinkFailure(self.close_reason or "peer_closed") from None
        except MessageTooLarge as exc:
            # The transport's frame limit is below ours: a configuration mismatch.
            raise LinkFailure("frame_too_large", str(exc)) from None
        self._sending = False
        self._stats.frame_sent(len(frame))
        self.last_sent = trio.current_time()
