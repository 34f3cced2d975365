"""Websocket transport: frames as binary websocket messages, on trio-websocket 0.12.2.

This module owns the listener (`WebsocketTransport.serve`), the dialer
(`WebsocketTransport.open_connection`) and the connection wrapper (`WebsocketConnection`)
for ``ws://`` and ``wss://`` addresses. Frames are binary messages; a text message from the
peer is a protocol error that closes the connection (code 1003).

We use trio-websocket's low-level pieces (`wrap_client_stream`, `wrap_server_stream`) over
streams we open, listen on and close ourselves, rather than `serve_websocket` and
`open_websocket_url`, because of the traps listed in STYLE.md:

- An exception escaping a `serve_websocket` handler takes the whole server down. Here every
  accepted stream runs in a guard (`_serve_stream` + `base.run_handler`) that logs with
  the peer's address, counts, and never lets anything but cancellation out.
- `connect_timeout` does not bound a peer that accepts TCP and never answers the upgrade.
  Here the whole dial (TCP, TLS, upgrade) runs under one `trio.fail_after(timeout)`, and a
  failure of any step is a `ConnectError`. On the server, a client gets `handshake_timeout`
  to finish TLS and the upgrade.
- The 60 s `disconnect_timeout` default: closing here is bounded by `disconnect_timeout`
  (2 s by default), after which the stream is closed forcefully.
- trio-websocket's background reader runs in a nursery the caller supplies and may raise
  (a rejected upgrade, a protocol error racing a broken stream); after an oversize message
  it stops reading without closing the TCP stream, so the peer would wait forever. We hand
  it `_GuardedReader`, an object with the one nursery method trio-websocket calls
  (``start_soon``), which runs the reader in our nursery so that it never raises, closes
  the stream when the reader stops, and wakes a handshake still waiting for it.

Cancelling `WebsocketConnection.send` mid-message leaves a partial frame on the wire (the
library has no send buffer); the connection then refuses every further send and the caller
must `aclose` it. The runtime has one writer task per link, so this ends that link only.
"""

from __future__ import annotations

import collections
import logging
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, NoReturn, cast

import attrs
import trio
import trio_websocket
from wsproto.utilities import LocalProtocolError

from trio_replica.core.wire import DEFAULT_MAX_FRAME
from trio_replica.errors import MessageTooLarge

from .base import ConnectError, Handler, Refusals, TransportClosed, remote_host, run_handler

logger = logging.getLogger(__name__)

SCHEMES = ("ws", "wss")
#: Close code for "received a data type it cannot accept" (RFC 6455 section 7.4.1).
_CLOSE_UNSUPPORTED_DATA = 1003
#: Close code for "message too big to process" (RFC 6455 section 7.4.1).
_CLOSE_TOO_BIG = 1009

_Stream = trio.SocketStream | trio.SSLStream[trio.SocketStream]


@attrs.frozen
class WebsocketAddress:
    """A parsed ``ws://host:port/path`` or ``wss://host:port/path`` address."""

    scheme: str
    host: str
    port: int
    path: str = "/"

    @property
    def secure(self) -> bool:
        return self.scheme == "wss"

    @property
    def netloc(self) -> str:
        """``host:port``, with an IPv6 literal in brackets (also the HTTP Host header)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.netloc}{'' if self.path == '/' else self.path}"


def parse_websocket_address(address: str) -> WebsocketAddress:
    """Parse a websocket address; raise `ValueError` if it is not one.

    The port defaults to 80 (ws) or 443 (wss) and the path to ``/``; a query or fragment is
    refused (the path is the only resource selector).
    """
    try:
        parts = urllib.parse.urlsplit(address)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"invalid websocket address {address!r}: {exc}") from None
    if parts.scheme not in SCHEMES:
        raise ValueError(f"not a ws:// or wss:// address: {address!r}")
    if not parts.hostname:
        raise ValueError(f"websocket address without a host: {address!r}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"websocket address with query, fragment or user: {address!r}")
    if port is None:
        port = 443 if parts.scheme == "wss" else 80
    return WebsocketAddress(
        scheme=parts.scheme, host=parts.hostname, port=port, path=parts.path or "/"
    )


@attrs.define
class WebsocketCounters:
    """What a transport's listener saw; the runtime reads them for its metrics."""

    accepted: int = 0
    handshake_failures: int = 0
    handler_errors: int = 0


def _describe_close(exc: trio_websocket.ConnectionClosed) -> str:
    reason = exc.reason
    if reason is None:
        return "closed"
    detail = f": {reason.reason}" if reason.reason else ""
    return f"closed with code {reason.code} ({reason.name}){detail}"


def _peer_of(stream: _Stream) -> str:
    sock = stream.transport_stream.socket if isinstance(stream, trio.SSLStream) else stream.socket
    try:
        host, port, *_ = sock.getpeername()
    except OSError:
        return "<disconnected peer>"
    return f"{'[' + host + ']' if ':' in host else host}:{port}"


@attrs.define(eq=False)
class _GuardedReader:
    """The nursery stand-in given to trio-websocket for its reader task (see module doc).

    `handshake_scope` wraps the wait for the opening handshake: it is cancelled when the
    reader stops, so a rejected or broken upgrade fails at once instead of at the timeout;
    `failure` then says why.
    """

    nursery: trio.Nursery
    stream: _Stream
    peer: str
    handshake_scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    failure: str = "the connection closed during the websocket handshake"

    def start_soon(
        self, fn: Callable[..., Awaitable[object]], *args: object, name: object = None
    ) -> None:
        self.nursery.start_soon(self._run, fn, *args, name=name)

    async def _run(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        try:
            await fn(*args)
        except trio_websocket.ConnectionRejected as exc:
            self.failure = f"the websocket upgrade was rejected with HTTP {exc.status_code}"
        except (trio_websocket.ConnectionClosed, LocalProtocolError) as exc:
            # A protocol error from the peer while the stream broke: the connection is gone.
            logger.debug("websocket reader for %s stopped: %r", self.peer, exc)
        except Exception:
            # A bug in the library must end this connection, not the caller's task tree:
            # the connection's receive() reports it closed once the stream is closed below.
            self.failure = "the websocket reader failed"
            logger.exception("websocket reader for %s failed", self.peer)
        finally:
            self.handshake_scope.cancel()
            await trio.aclose_forcefully(self.stream)

    def as_nursery(self) -> trio.Nursery:
        # trio-websocket only calls start_soon on the nursery it is given.
        return cast(trio.Nursery, self)


@attrs.define(eq=False)
class WebsocketConnection:
    """One websocket connection carrying frames as binary messages.

    `send` may block while the peer does not read (trio-websocket has no send buffer);
    cancelling it leaves the connection unusable for sending (see module doc). `receive`
    raises `TransportClosed` once the connection is closed by either side, broken, or the
    peer broke the protocol (text message, message over `max_frame`: code 1003 / 1009).
    `aclose` is idempotent, never raises, and takes at most `disconnect_timeout` seconds,
    even inside a cancelled scope.
    """

    _ws: trio_websocket.WebSocketConnection
    _stream: _Stream
    _remote: str
    _max_frame: int
    _disconnect_timeout: float
    _closed: bool = attrs.field(default=False, init=False)
    _send_broken: bool = attrs.field(default=False, init=False)

    @property
    def remote(self) -> str:
        return self._remote

    @property
    def channel_binding(self) -> bytes:
        """``tls-unique`` of the TLS session (the same on both ends), empty over ws://."""
        if isinstance(self._stream, trio.SSLStream):
            return self._stream.get_channel_binding("tls-unique") or b""
        return b""

    async def send(self, frame: bytes) -> None:
        if len(frame) > self._max_frame:
            raise MessageTooLarge(
                f"frame of {len(frame)} bytes exceeds max_frame {self._max_frame}"
            )
        if self._send_broken:
            raise TransportClosed(f"an earlier send to {self._remote} was cancelled mid-frame")
        try:
            await self._ws.send_message(bytes(frame))
        except trio_websocket.ConnectionClosed as exc:
            raise TransportClosed(f"connection to {self._remote} {_describe_close(exc)}") from None
        except LocalProtocolError as exc:
            raise TransportClosed(f"connection to {self._remote} is closing: {exc}") from None
        except trio.Cancelled:
            self._send_broken = True
            raise

    async def receive(self) -> bytes:
        try:
            message = await self._ws.get_message()
        except trio_websocket.ConnectionClosed as exc:
            if exc.reason is not None and exc.reason.code == _CLOSE_TOO_BIG:
                logger.warning("connection to %s %s", self._remote, _describe_close(exc))
            raise TransportClosed(f"connection to {self._remote} {_describe_close(exc)}") from None
        if isinstance(message, str):
            logger.warning("%s sent a text message; closing (frames are binary)", self._remote)
            await self._close(_CLOSE_UNSUPPORTED_DATA, "binary frames only")
            raise TransportClosed(f"{self._remote} sent a text message (protocol error)")
        return message

    async def aclose(self) -> None:
        await self._close(1000, None)

    async def _close(self, code: int, reason: str | None) -> None:
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            with trio.move_on_after(self._disconnect_timeout):
                try:
                    await self._ws.aclose(code, reason)
                except (trio_websocket.ConnectionClosed, trio.BrokenResourceError) as exc:
                    logger.debug("closing the connection to %s: %r", self._remote, exc)
            await trio.aclose_forcefully(self._stream)


@attrs.define(eq=False, kw_only=True)
class WebsocketTransport:
    """Listen and dial over websockets (``ws://``; ``wss://`` with TLS).

    - `server_ssl`: context for ``wss://`` listeners (certificate chain loaded; set
      ``verify_mode = CERT_REQUIRED`` and load a CA to require client certificates).
    - `client_ssl`: context for dialing ``wss://`` (trusted CAs; a client certificate if
      the servers require one); the system default context when None.
    - `max_frame`: largest frame sent or received; a bigger incoming message closes that
      connection with code 1009.
    - `disconnect_timeout`: bound on a graceful close before the stream is cut.
    - `handshake_timeout`: how long an accepted client has to finish TLS and the upgrade.
    - `max_pending`, `max_pending_per_host`: accepted connections that have not finished
      the upgrade yet, in all and from one remote address; more are closed at once
      (counted in `refusals`, logged once per period). Without them, idle TCP connections
      held file descriptors until the process could accept nothing (issue 17: 1,100 idle
      connections, EMFILE, every new session failed).
    - `message_queue_size`: messages trio-websocket buffers ahead of `receive`.
    - `receive_buffer_size`: bytes read from the socket at a time.
    """

    server_ssl: ssl.SSLContext | None = None
    client_ssl: ssl.SSLContext | None = None
    max_frame: int = attrs.field(default=DEFAULT_MAX_FRAME, validator=attrs.validators.gt(0))
    #: trio-websocket waits 60 s by default; a peer that will not close is cut after this.
    disconnect_timeout: float = attrs.field(default=2.0, validator=attrs.validators.gt(0))
    handshake_timeout: float = attrs.field(default=5.0, validator=attrs.validators.gt(0))
    max_pending: int = attrs.field(default=512, validator=attrs.validators.gt(0))
    max_pending_per_host: int = attrs.field(default=64, validator=attrs.validators.gt(0))
    message_queue_size: int = attrs.field(default=1, validator=attrs.validators.ge(0))
    #: trio-websocket reads 4 KiB at a time by default: slow for frames of up to a megabyte.
    receive_buffer_size: int = attrs.field(default=64 * 1024, validator=attrs.validators.gt(0))
    schemes: tuple[str, ...] = attrs.field(default=SCHEMES, init=False)
    counters: WebsocketCounters = attrs.field(factory=WebsocketCounters, init=False)
    #: Connections closed before the upgrade because of the bounds above, by reason.
    refusals: Refusals = attrs.field(
        factory=lambda: Refusals(logger, "websocket listener"), init=False
    )
    _pending: collections.Counter[str] = attrs.field(factory=collections.Counter, init=False)
    _default_client_ssl: ssl.SSLContext | None = attrs.field(default=None, init=False)

    # --- dialing -----------------------------------------------------------------------------

    @asynccontextmanager
    async def open_connection(
        self,
        address: str,
        *,
        timeout: float,
    ) -> AsyncIterator[WebsocketConnection]:
        """Dial `address`; the block owns the connection and its reader task (see base.py).

        Raises `ConnectError` when the address is invalid, the peer refuses or is
        unreachable, TLS fails, the upgrade is rejected, or all that takes over `timeout`.
        """
        try:
            target = parse_websocket_address(address)
        except ValueError as exc:
            raise ConnectError(str(exc)) from None
        body_error: BaseException | None = None
        try:
            async with trio.open_nursery() as nursery:
                conn = await self._dial(nursery, target, timeout)
                try:
                    yield conn
                except BaseException as exc:
                    body_error = exc
                    raise
                finally:
                    await conn.aclose()
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The reader task never raises (`_GuardedReader`), so a group holds the one
            # exception of the dial or of the caller's block: give it back unwrapped.
            if len(group.exceptions) == 1:
                _reraise(group.exceptions[0])
            if body_error is not None:
                # Cancellation reaching both the block and the reader is how a connection
                # ends when its owner is cancelled: only anything else is worth a log line.
                _, rest = group.split(trio.Cancelled)
                if rest is not None:
                    logger.error("unexpected errors closing %s", address, exc_info=rest)
                _reraise(body_error)
            # The dial failed as its owner was cancelled (a node closing while dials time
            # out): the ConnectError is the outcome; the cancellation is re-delivered at
            # the owner's next checkpoint anyway. Anything else stays a group.
            failed, rest = group.split(ConnectError)
            if failed is not None and (rest is None or rest.split(trio.Cancelled)[1] is None):
                _reraise(_first_leaf(failed))
            raise

    async def _dial(
        self, nursery: trio.Nursery, target: WebsocketAddress, time_limit: float
    ) -> WebsocketConnection:
        stream: _Stream | None = None
        try:
            with trio.fail_after(time_limit):
                tcp = await trio.open_tcp_stream(target.host, target.port)
                stream = tcp
                if target.secure:
                    stream = trio.SSLStream(
                        tcp,
                        self._client_context(),
                        server_hostname=target.host,
                        https_compatible=True,
                    )
                    await stream.do_handshake()
                reader = _GuardedReader(nursery=nursery, stream=stream, peer=target.url)
                with reader.handshake_scope:
                    ws = await trio_websocket.wrap_client_stream(
                        reader.as_nursery(),
                        stream,
                        target.netloc,
                        target.path,
                        message_queue_size=self.message_queue_size,
                        max_message_size=self.max_frame,
                        receive_buffer_size=self.receive_buffer_size,
                    )
                if reader.handshake_scope.cancelled_caught:
                    hint = " (did the server refuse our TLS client certificate?)"
                    raise ConnectError(
                        f"{target.url}: {reader.failure}{hint if target.secure else ''}"
                    )
        except trio.TooSlowError:
            await _discard(stream)
            raise ConnectError(
                f"{target.url}: no websocket connection after {time_limit} s"
            ) from None
        except trio.BrokenResourceError as exc:
            await _discard(stream)
            raise ConnectError(f"{target.url}: TLS handshake failed: {exc.__cause__!r}") from exc
        except OSError as exc:
            await _discard(stream)
            raise ConnectError(f"{target.url}: {exc}") from exc
        except (UnicodeError, ValueError) as exc:
            # An address a peer handed us may hold a host name the resolver refuses (a label
            # over 63 characters, say): that is an unreachable peer, not a crash.
            await _discard(stream)
            raise ConnectError(f"{target.url}: invalid host: {exc}") from exc
        except ConnectError:
            await _discard(stream)
            raise
        return WebsocketConnection(
            ws=ws,
            stream=stream,
            remote=target.url,
            max_frame=self.max_frame,
            disconnect_timeout=self.disconnect_timeout,
        )

    def _client_context(self) -> ssl.SSLContext:
        if self.client_ssl is not None:
            return self.client_ssl
        if self._default_client_ssl is None:
            self._default_client_ssl = ssl.create_default_context()
        return self._default_client_ssl

    # --- listening ---------------------------------------------------------------------------

    async def serve(
        self,
        address: str,
        handler: Handler,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on `address` until cancelled; see `Transport.serve`.

        Port 0 binds a free port; when the host resolves to several addresses only the
        first is bound then, so that the reported address is the one that is listening.
        Upgrades for another path than the address's are rejected with HTTP 404.
        """
        target = parse_websocket_address(address)
        if target.secure and self.server_ssl is None:
            raise ValueError(f"cannot listen on {address}: no server_ssl context")
        try:
            listeners = await trio.open_tcp_listeners(target.port, host=target.host)
        except OSError as exc:
            # "Address already in use" alone does not say which address.
            raise OSError(exc.errno, f"cannot listen on {address}: {exc.strerror}") from None
        if target.port == 0 and len(listeners) > 1:
            for extra in listeners[1:]:
                await extra.aclose()
            listeners = listeners[:1]
        port = listeners[0].socket.getsockname()[1]
        bound = attrs.evolve(target, port=port)
        wrapped: list[trio.abc.Listener[Any]] = list(listeners)
        if bound.secure:
            assert self.server_ssl is not None
            wrapped = [
                trio.SSLListener(listener, self.server_ssl, https_compatible=True)
                for listener in listeners
            ]

        async def on_stream(stream: _Stream) -> None:
            await self._serve_stream(stream, handler, bound)

        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, on_stream, wrapped)
            logger.info("listening on %s", bound.url)
            task_status.started(bound.url)

    def _admit(self, host: str) -> str | None:
        """Why a new connection from `host` is refused before its upgrade, or None."""
        if self._pending.total() >= self.max_pending:
            return "pending_full"
        if self._pending[host] >= self.max_pending_per_host:
            return "pending_per_host"
        return None

    async def _serve_stream(
        self, stream: _Stream, handler: Handler, bound: WebsocketAddress
    ) -> None:
        peer = _peer_of(stream)
        host = remote_host(peer)
        refused = self._admit(host)
        if refused is not None:
            self.refusals.refuse(refused, peer)
            await trio.aclose_forcefully(stream)
            return
        try:
            async with trio.open_nursery() as nursery:
                try:
                    conn = await self._accept(nursery, stream, peer, bound)
                    if conn is not None:
                        self.counters.accepted += 1
                        if await run_handler(handler, conn, log=logger):
                            self.counters.handler_errors += 1
                finally:
                    nursery.cancel_scope.cancel()
        except* Exception as group:
            # Nothing may reach trio.serve_listeners: it would stop the whole listener.
            self.counters.handler_errors += 1
            logger.error("websocket connection from %s failed", peer, exc_info=group)
        finally:
            await trio.aclose_forcefully(stream)

    async def _accept(
        self, nursery: trio.Nursery, stream: _Stream, peer: str, bound: WebsocketAddress
    ) -> WebsocketConnection | None:
        """TLS and the upgrade for one accepted stream, under `handshake_timeout`."""
        reader = _GuardedReader(nursery=nursery, stream=stream, peer=peer)
        host = remote_host(peer)
        self._pending[host] += 1
        try:
            with trio.fail_after(self.handshake_timeout):
                if isinstance(stream, trio.SSLStream):
                    await stream.do_handshake()
                with reader.handshake_scope:
                    request = await trio_websocket.wrap_server_stream(
                        reader.as_nursery(),
                        stream,
                        message_queue_size=self.message_queue_size,
                        max_message_size=self.max_frame,
                        receive_buffer_size=self.receive_buffer_size,
                    )
                    if request.path != bound.path:
                        logger.info("%s asked for path %r: rejected", peer, request.path)
                        await request.reject(404)
                        self.counters.handshake_failures += 1
                        return None
                    ws = await request.accept()
        except trio.TooSlowError:
            self.counters.handshake_failures += 1
            logger.info("%s did not finish the handshake within %s s", peer, self.handshake_timeout)
            return None
        except (trio.BrokenResourceError, trio_websocket.ConnectionClosed) as exc:
            self.counters.handshake_failures += 1
            logger.info("handshake with %s failed: %r", peer, exc.__cause__ or exc)
            return None
        finally:
            self._pending[host] -= 1
            if not self._pending[host]:
                del self._pending[host]
        if reader.handshake_scope.cancelled_caught:
            self.counters.handshake_failures += 1
            logger.info("handshake with %s failed: %s", peer, reader.failure)
            return None
        return WebsocketConnection(
            ws=ws,
            stream=stream,
            remote=f"{bound.scheme}://{peer}",
            max_frame=self.max_frame,
            disconnect_timeout=self.disconnect_timeout,
        )


async def _discard(stream: _Stream | None) -> None:
    if stream is not None:
        await trio.aclose_forcefully(stream)


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


def _reraise(exc: BaseException) -> NoReturn:
    """Raise `exc` out of an ``except`` block without chaining the group to it."""
    context = exc.__context__
    try:
        raise exc
    finally:
        exc.__context__ = context
        del exc, context
