"""One websocket connection over a Trio stream, on wsproto: the upgrade, frames, closing.

This module owns what happens on one stream once TCP (and TLS) is up: the HTTP upgrade
(`upgrade_client`, `upgrade_server`), then `WebsocketConnection`, which carries frames as
binary websocket messages. Dialing, listening, admission and deadlines are websocket.py's.

Theory of operation
-------------------
wsproto is the protocol: bytes in, events out, and bytes out for each event we send; it
does no I/O. The connection has no task of its own. The runtime has one reader and one
writer per link (runtime/link.py), and they are the connection's I/O:

* `receive` runs in the reader's task: it reads the stream (`receive_buffer_size` at a
  time), feeds wsproto and turns its events into complete messages, kept in a deque until
  asked for (one read may hold many). A ping is answered with a pong and a peer's close
  frame with the close reply; a text message (1003), a message over `max_frame` (1009,
  counted as its fragments arrive, so at most `max_frame` plus one read is ever held) and
  a frame wsproto cannot parse (1002) close the connection from our side.
* `send` runs in the writer's task: it writes wsproto's bytes for the message with one
  `send_all`.

Pongs, close replies and messages share the stream's send side, so they take turns under
one lock. The reader never waits for it: when the writer holds it (possibly blocked on a
peer that does not read), the reply is left for the writer to send after its frame, and
only the latest ping is answered (RFC 6455 section 5.5.3 allows that), so a ping flood
cannot grow anything.

Why not trio-websocket, which this module replaces (issue 19): its connection runs a
background reader task that hands each message to `get_message` through a memory channel,
and `send_message` takes a lock whose acquire always yields. bench/ws_layers.py counted 5
Trio task steps per 100-byte message through it and 1.7 here (6 and 3 paced at one per
millisecond), and measured on 127.0.0.1 back to back 52.6 us of CPU per message through
trio-websocket, 35.3 us through bare wsproto and 38.4 us through this module (19,000,
28,300 and 26,000 messages/s: the 3 us over bare wsproto are the lock and the checks it
skips); paced, at best 119, 103 and 104 us (paced CPU swings by half from run to run on a
shared machine); 60 KiB frames 168, 151 and 155 us (results/ws_layers_2026-11-30*.json).
Its traps (STYLE.md) go with it: no background task that may raise into a nursery, no
reader that stops on an oversize message without closing the stream, no queue that stops
pongs when full.

Cancellation: cancelling `receive` never loses a message (a read's messages are queued
before anything else may wait). Cancelling `send`, or a `receive` while it writes a pong
or close reply, may leave a partial frame on the wire: the connection then refuses every
further send and the owner must `aclose` it (the runtime then ends that link only).
"""

from __future__ import annotations

import collections
import logging
from typing import cast

import attrs
import h11
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection as ProtocolState
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from ..errors import MessageTooLarge
from .base import TransportClosed

#: The websocket transport's logger (websocket.py's): one name for the whole transport.
logger = logging.getLogger("trio_replica.transports.websocket")

Stream = trio.SocketStream | trio.SSLStream[trio.SocketStream]

#: Bytes read and dropped at least, while waiting for the peer's close reply.
_CLOSE_READ_MIN = 8 * 1024 * 1024

#: Messages handed out from one read before `receive` yields to other tasks anyway: a read
#: of small frames holds hundreds, and a peer's burst must not hold the event loop that long.
_BURST = 64


@attrs.frozen
class ConnectionSettings:
    """What a transport sets for each of its connections (see `WebsocketTransport`)."""

    max_frame: int
    receive_buffer_size: int
    disconnect_timeout: float


class UpgradeFailed(Exception):
    """The HTTP upgrade did not give a websocket connection; the message says why.

    `stream_ended`: the peer closed or broke the stream instead of answering (over TLS,
    often a server refusing our client certificate after the handshake).
    """

    def __init__(self, message: str, *, stream_ended: bool = False) -> None:
        super().__init__(message)
        self.stream_ended = stream_ended


def describe_close(code: int, reason: str | None = None) -> str:
    """``closed with code 1000 (NORMAL_CLOSURE): reason``, as trio-websocket said it."""
    try:
        name = CloseReason(code).name
    except ValueError:
        name = "UNKNOWN"
    return f"closed with code {code} ({name}){': ' + reason if reason else ''}"


# --- the upgrade ------------------------------------------------------------------------------


async def upgrade_client(
    stream: Stream, *, netloc: str, path: str, remote: str, settings: ConnectionSettings
) -> WebsocketConnection:
    """Ask for the upgrade and wait for the answer; no deadline of its own (the dial's)."""
    ws = WSConnection(ConnectionType.CLIENT)
    try:
        request = ws.send(Request(host=netloc, target=path))
    except (LocalProtocolError, h11.LocalProtocolError) as exc:
        # A path or host that HTTP cannot carry (from a locally configured address).
        raise UpgradeFailed(f"cannot ask for the upgrade: {exc}") from None
    try:
        await stream.send_all(request)
        while True:
            data = _bytes(await stream.receive_some(settings.receive_buffer_size))
            if not data:
                raise UpgradeFailed(
                    "the connection closed during the websocket handshake", stream_ended=True
                )
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, AcceptConnection):
                    assert ws.connection is not None
                    return WebsocketConnection(stream, ws.connection, remote, settings)
                if isinstance(event, RejectConnection):
                    raise UpgradeFailed(
                        f"the websocket upgrade was rejected with HTTP {event.status_code}"
                    )
    except trio.BrokenResourceError as exc:
        raise UpgradeFailed(
            f"the connection broke during the websocket handshake ({exc.__cause__ or exc!r})",
            stream_ended=True,
        ) from None
    except RemoteProtocolError as exc:
        raise UpgradeFailed(f"invalid websocket upgrade response: {exc}") from None


async def upgrade_server(
    stream: Stream, *, path: str, remote: str, settings: ConnectionSettings
) -> WebsocketConnection:
    """Read the upgrade request and accept it, or reject it (HTTP 404 for another path than
    `path`, wsproto's hint for a request that is no websocket upgrade) and raise
    `UpgradeFailed`. No deadline of its own (the listener's handshake timeout)."""
    ws = WSConnection(ConnectionType.SERVER)
    try:
        while True:
            data = _bytes(await stream.receive_some(settings.receive_buffer_size))
            if not data:
                raise UpgradeFailed("the connection closed before the upgrade", stream_ended=True)
            try:
                ws.receive_data(data)
            except RemoteProtocolError as exc:
                if exc.event_hint is not None:
                    await _answer(stream, ws, exc.event_hint)
                raise UpgradeFailed(f"not a websocket upgrade: {exc}") from None
            except ValueError as exc:
                # wsproto decodes the Host header as IDNA, which refuses some names.
                await _answer(stream, ws, RejectConnection(status_code=400))
                raise UpgradeFailed(f"not a websocket upgrade: {exc!r}") from None
            for event in ws.events():
                if not isinstance(event, Request):
                    continue
                if event.target != path:
                    await _answer(stream, ws, RejectConnection(status_code=404))
                    raise UpgradeFailed(f"asked for path {event.target!r}: rejected with 404")
                await stream.send_all(ws.send(AcceptConnection()))
                assert ws.connection is not None
                return WebsocketConnection(stream, ws.connection, remote, settings)
    except trio.BrokenResourceError as exc:
        raise UpgradeFailed(
            f"the connection broke during the upgrade ({exc.__cause__ or exc!r})",
            stream_ended=True,
        ) from None


def _bytes(data: bytes | bytearray) -> bytes:
    # Trio types any stream's reads so; a socket's and an SSL object's are bytes, and wsproto
    # would take a bytearray as well: no copy to please the type checker.
    return cast(bytes, data)


async def _answer(stream: Stream, ws: WSConnection, event: Event) -> None:
    try:
        await stream.send_all(ws.send(event))
    except LocalProtocolError as exc:  # h11 in a state where it cannot answer
        logger.debug("could not refuse an upgrade: %r", exc)


# --- the connection ---------------------------------------------------------------------------


class WebsocketConnection:
    """One websocket connection carrying frames as binary messages (see the module doc).

    `receive` is for one task at a time and `send` for one task at a time; the two may run
    concurrently. `send` may block while the peer does not read. `receive` raises
    `TransportClosed` once the connection is closed by either side or broken, after the
    messages that arrived before; at once after `aclose`. `aclose` is idempotent, never
    raises, and takes at most `disconnect_timeout` seconds, even inside a cancelled scope.
    """

    def __init__(
        self, stream: Stream, ws: ProtocolState, remote: str, settings: ConnectionSettings
    ) -> None:
        self._stream = stream
        self._ws = ws
        self._remote = remote
        self._max_frame = settings.max_frame
        self._read_size = settings.receive_buffer_size
        self._disconnect_timeout = settings.disconnect_timeout
        self._send_lock = trio.StrictFIFOLock()
        #: Complete messages parsed and not yet received; the message being reassembled.
        self._ready: collections.deque[bytes] = collections.deque()
        self._parts: list[bytes] = []
        self._size = 0
        self._burst = 0
        #: Replies waiting for the send side: the latest ping's payload, the close reply.
        self._pong: bytes | None = None
        self._close_reply = b""
        #: The close we owe the peer for what it sent: code, reason, what receive raises,
        #: whether its close reply is worth waiting for (not after a parse failure).
        self._failure: tuple[int, str, str, bool] | None = None
        #: Why nothing more can be sent or read, once that is so.
        self._why: str | None = None
        #: The peer's close frame arrived or its stream ended: no close reply to wait for.
        self._peer_done = False
        self._closed = False
        self._send_broken = False
        self._receiving = False
        # Bytes that came with the upgrade response may already hold messages.
        self._absorb()

    @property
    def remote(self) -> str:
        return self._remote

    @property
    def channel_binding(self) -> bytes:
        """``tls-unique`` of the TLS session (the same on both ends), empty over ws://."""
        if isinstance(self._stream, trio.SSLStream):
            return self._stream.get_channel_binding("tls-unique") or b""
        return b""

    # --- sending ----------------------------------------------------------------------------

    async def send(self, frame: bytes) -> None:
        if len(frame) > self._max_frame:
            raise MessageTooLarge(
                f"frame of {len(frame)} bytes exceeds max_frame {self._max_frame}"
            )
        lock = self._send_lock
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            # Only when a reply or aclose holds it: uncontended, the send's own write is the
            # one checkpoint (a lock's acquire would add a task step to every frame).
            await lock.acquire()
        try:
            if self._send_broken:
                raise TransportClosed(f"an earlier send to {self._remote} was cancelled mid-frame")
            if self._why is not None:
                raise TransportClosed(self._why)
            try:
                data = self._ws.send(BytesMessage(data=frame))
            except LocalProtocolError as exc:
                raise TransportClosed(f"connection to {self._remote} is closing: {exc}") from None
            await self._write(data)
            while self._pong is not None or self._close_reply:
                await self._write(self._take_replies())
        finally:
            lock.release()

    async def _write(self, data: bytes) -> None:
        """Write under the send lock; a write cut short leaves a partial frame behind."""
        try:
            await self._stream.send_all(data)
        except trio.Cancelled:
            self._send_broken = True
            raise
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._why = self._why or self._broken(exc)
            raise TransportClosed(self._why) from None

    def _take_replies(self) -> bytes:
        data = b""
        if self._pong is not None and self._ws.state is ConnectionState.OPEN:
            data = self._ws.send(Pong(payload=self._pong))
        self._pong = None
        data, self._close_reply = data + self._close_reply, b""
        return data

    async def _send_replies(self) -> None:
        """Send the pending replies now, unless a send holds the stream: then it sends them."""
        if self._send_broken:
            self._pong, self._close_reply = None, b""
            return
        try:
            self._send_lock.acquire_nowait()
        except trio.WouldBlock:
            return
        try:
            await self._write(self._take_replies())
        except TransportClosed:
            pass  # the next read reports the broken stream
        finally:
            self._send_lock.release()

    # --- receiving --------------------------------------------------------------------------

    async def receive(self) -> bytes:
        while True:
            if self._closed:
                assert self._why is not None
                raise TransportClosed(self._why)
            if self._ready:
                self._burst += 1
                if self._burst < _BURST:
                    await trio.lowlevel.checkpoint_if_cancelled()
                    return self._ready.popleft()
                self._burst = 0
                await trio.lowlevel.checkpoint()
                continue  # aclose may have run meanwhile
            if self._failure is not None:
                code, reason, why, wait_reply = self._failure
                await self._close(code, reason, why, wait_reply=wait_reply)
                raise TransportClosed(why)
            if self._why is not None:
                raise TransportClosed(self._why)
            await self._read()

    async def _read(self) -> None:
        if self._receiving:
            raise trio.BusyResourceError(f"another task is receiving from {self._remote}")
        self._receiving = True
        try:
            data = _bytes(await self._stream.receive_some(self._read_size))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._peer_done = True
            self._why = self._why or self._broken(exc)
            return
        finally:
            self._receiving = False
        self._burst = 0
        if not data:
            self._peer_done = True
            self._why = self._why or f"connection to {self._remote} {describe_close(1006)}"
            return
        self._ws.receive_data(data)
        self._absorb()
        if self._pong is not None or self._close_reply:
            await self._send_replies()

    def _absorb(self) -> None:
        """Take wsproto's events for what was read, without waiting for anything: messages
        to the deque, replies to the send side, violations to `_failure`."""
        for event in self._ws.events():
            if isinstance(event, BytesMessage):
                self._size += len(event.data)
                if self._size > self._max_frame:
                    self._parts = []
                    self._fail(
                        1009, f"message over {self._max_frame} bytes", wait_reply=True, why=None
                    )
                    return
                data = event.data if isinstance(event.data, bytes) else bytes(event.data)
                if not event.message_finished:
                    self._parts.append(data)
                    continue
                if self._parts:
                    self._parts.append(data)
                    data = b"".join(self._parts)
                    self._parts = []
                self._size = 0
                self._ready.append(data)
            elif isinstance(event, Ping):
                self._pong = event.payload
            elif isinstance(event, TextMessage):
                logger.warning("%s sent a text message; closing (frames are binary)", self._remote)
                self._fail(
                    1003,
                    "binary frames only",
                    wait_reply=True,
                    why=f"{self._remote} sent a text message (protocol error)",
                )
                return
            elif isinstance(event, CloseConnection):
                self._on_close(event)
                return

    def _on_close(self, event: CloseConnection) -> None:
        state = self._ws.state
        if state is ConnectionState.REMOTE_CLOSING:
            self._close_reply = self._ws.send(event.response())
        elif state is not ConnectionState.CLOSED:
            # No close frame but wsproto's parse failure (state unchanged): the bytes after
            # it mean nothing, so the close goes out without waiting for a reply.
            logger.info("protocol error from %s: %s", self._remote, event.reason)
            self._fail(event.code, event.reason or "protocol error", wait_reply=False, why=None)
            return
        self._peer_done = True
        self._why = f"connection to {self._remote} {describe_close(event.code, event.reason)}"
        if event.code == CloseReason.MESSAGE_TOO_BIG:
            logger.warning("%s", self._why)

    def _fail(self, code: int, reason: str, *, wait_reply: bool, why: str | None) -> None:
        if why is None:
            why = f"connection to {self._remote} {describe_close(code, reason)}"
            if code == CloseReason.MESSAGE_TOO_BIG:
                logger.warning("%s", why)
        self._failure = (code, reason, why, wait_reply)

    def _broken(self, exc: BaseException) -> str:
        cause = exc.__cause__ or exc
        return f"connection to {self._remote} {describe_close(1006, repr(cause))}"

    # --- closing ----------------------------------------------------------------------------

    async def aclose(self) -> None:
        await self._close(1000, None, f"connection to {self._remote} is closed", wait_reply=True)

    async def _close(self, code: int, reason: str | None, why: str, *, wait_reply: bool) -> None:
        if self._closed:
            return
        self._closed = True
        self._why = self._why or why
        with trio.CancelScope(shield=True):
            with trio.move_on_after(self._disconnect_timeout):
                try:
                    await self._close_handshake(code, reason, wait_reply=wait_reply)
                except (trio.BrokenResourceError, trio.ClosedResourceError, TransportClosed) as exc:
                    logger.debug("closing the connection to %s: %r", self._remote, exc)
            await trio.aclose_forcefully(self._stream)

    async def _close_handshake(self, code: int, reason: str | None, *, wait_reply: bool) -> None:
        """Our close frame (with a reply still owed, if any), then the peer's (RFC 6455
        section 7.1.2), unless a partial frame makes ours unreadable or another task is
        reading (closing the stream wakes it)."""
        async with self._send_lock:
            if self._send_broken:
                return
            data = self._take_replies()
            if self._ws.state is ConnectionState.OPEN:
                data += self._ws.send(CloseConnection(code=code, reason=reason))
            if data:
                await self._write(data)
        if not wait_reply or self._receiving or self._peer_done:
            return
        # What the peer sends before its reply is read and dropped, up to a bound: a peer
        # that keeps sending without reading (a flood we are closing on) would otherwise
        # be read for the whole disconnect timeout (2 s of a loopback flood was 800,000
        # messages read for nothing). The bound leaves a healthy peer room for two full
        # frames and what loopback socket buffers hold before its reply.
        budget = max(2 * self._max_frame, _CLOSE_READ_MIN)
        while self._ws.state is ConnectionState.LOCAL_CLOSING and budget > 0:
            received = _bytes(await self._stream.receive_some(self._read_size))
            if not received:
                return
            budget -= len(received)
            self._ws.receive_data(received)
            # Messages that cross our close are dropped; a parse failure ends the wait too.
            if any(isinstance(event, CloseConnection) for event in self._ws.events()):
                return
