"""Websocket transport: frames as binary websocket messages, over streams we own.

This module owns the listener (`WebsocketTransport.serve`) and the dialer
(`WebsocketTransport.open_connection`) for ``ws://`` and ``wss://`` addresses: TCP, TLS,
the deadlines of both, admission before the upgrade, and the counters. One connection
once the streams are up (the HTTP upgrade, frames, closing) is wsconn.py's, on wsproto.

The hardening, each part against something that went wrong (STYLE.md, issues 7 and 17):

- Every accepted stream runs in a guard (`_serve_stream` + `base.run_handler`) that logs
  with the peer's address, counts, and lets nothing but cancellation out: one bad
  connection must not stop the listener.
- The whole dial (TCP, TLS, upgrade) runs under one `trio.fail_after(timeout)`, and a
  failure of any step is a `ConnectError`, never an exception group: a peer that accepts
  TCP and never answers the upgrade must not hang a dial. On the server, a client gets
  `handshake_timeout` to finish TLS and the upgrade.
- Connections that have not finished the upgrade are bounded in all and per remote host
  (`max_pending`, `max_pending_per_host`); more are closed at once and counted.
- Closing is bounded by `disconnect_timeout`, after which the stream is cut.

Until issue 19 the connection was trio-websocket's, with a background reader task per
connection (hence a nursery per dial and accept, and a guard around that task); wsconn.py
says what it cost and why reading in the caller's task replaced it.
"""

from __future__ import annotations

import collections
import logging
import ssl
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from ..core.wire import DEFAULT_MAX_FRAME
from .base import ConnectError, Handler, Refusals, remote_host, run_handler
from .wsconn import (
    ConnectionSettings,
    Stream,
    UpgradeFailed,
    WebsocketConnection,
    upgrade_client,
    upgrade_server,
)

__all__ = [
    "SCHEMES",
    "WebsocketAddress",
    "WebsocketConnection",
    "WebsocketCounters",
    "WebsocketTransport",
    "parse_websocket_address",
]

logger = logging.getLogger(__name__)

SCHEMES = ("ws", "wss")


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


def _peer_of(stream: Stream) -> str:
    sock = stream.transport_stream.socket if isinstance(stream, trio.SSLStream) else stream.socket
    try:
        host, port, *_ = sock.getpeername()
    except OSError:
        return "<disconnected peer>"
    return f"{'[' + host + ']' if ':' in host else host}:{port}"


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
    - `receive_buffer_size`: bytes read from the socket at a time.
    """

    server_ssl: ssl.SSLContext | None = None
    client_ssl: ssl.SSLContext | None = None
    max_frame: int = attrs.field(default=DEFAULT_MAX_FRAME, validator=attrs.validators.gt(0))
    #: A peer that will not finish the close handshake is cut after this.
    disconnect_timeout: float = attrs.field(default=2.0, validator=attrs.validators.gt(0))
    handshake_timeout: float = attrs.field(default=5.0, validator=attrs.validators.gt(0))
    max_pending: int = attrs.field(default=512, validator=attrs.validators.gt(0))
    max_pending_per_host: int = attrs.field(default=64, validator=attrs.validators.gt(0))
    #: Frames are up to a megabyte: reading 4 KiB at a time (trio-websocket's default) was
    #: slow, and one read may carry many small frames.
    receive_buffer_size: int = attrs.field(default=64 * 1024, validator=attrs.validators.gt(0))
    schemes: tuple[str, ...] = attrs.field(default=SCHEMES, init=False)
    counters: WebsocketCounters = attrs.field(factory=WebsocketCounters, init=False)
    #: Connections closed before the upgrade because of the bounds above, by reason.
    refusals: Refusals = attrs.field(
        factory=lambda: Refusals(logger, "websocket listener"), init=False
    )
    _pending: collections.Counter[str] = attrs.field(factory=collections.Counter, init=False)
    _default_client_ssl: ssl.SSLContext | None = attrs.field(default=None, init=False)

    @property
    def _settings(self) -> ConnectionSettings:
        return ConnectionSettings(
            max_frame=self.max_frame,
            receive_buffer_size=self.receive_buffer_size,
            disconnect_timeout=self.disconnect_timeout,
        )

    # --- dialing -----------------------------------------------------------------------------

    @asynccontextmanager
    async def open_connection(
        self,
        address: str,
        *,
        timeout: float,
    ) -> AsyncIterator[WebsocketConnection]:
        """Dial `address`; the block owns the connection, closed when it ends (see base.py).

        Raises `ConnectError` when the address is invalid, the peer refuses or is
        unreachable, TLS fails, the upgrade is rejected, or all that takes over `timeout`.
        The connection has no task of its own, so exceptions of the block come out as
        they are.
        """
        try:
            target = parse_websocket_address(address)
        except ValueError as exc:
            raise ConnectError(str(exc)) from None
        conn = await self._dial(target, timeout)
        try:
            yield conn
        finally:
            await conn.aclose()

    async def _dial(self, target: WebsocketAddress, time_limit: float) -> WebsocketConnection:
        stream: Stream | None = None
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
                return await upgrade_client(
                    stream,
                    netloc=target.netloc,
                    path=target.path,
                    remote=target.url,
                    settings=self._settings,
                )
        except trio.TooSlowError:
            await _discard(stream)
            raise ConnectError(
                f"{target.url}: no websocket connection after {time_limit} s"
            ) from None
        except UpgradeFailed as exc:
            await _discard(stream)
            # TLS 1.3 ends the client's handshake before the server has checked its
            # certificate: a refusal shows as a stream that ends during the upgrade.
            hint = ""
            if exc.stream_ended:
                hint = (
                    " (did the server refuse our TLS client certificate?)"
                    if target.secure
                    # A TLS listener drops a plain HTTP upgrade without answering it.
                    else f" (if it listens with TLS, dial wss://{target.netloc})"
                )
            raise ConnectError(f"{target.url}: {exc}{hint}") from None
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
        except BaseException:
            await _discard(stream)
            raise

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

        async def on_stream(stream: Stream) -> None:
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
        self, stream: Stream, handler: Handler, bound: WebsocketAddress
    ) -> None:
        peer = _peer_of(stream)
        host = remote_host(peer)
        refused = self._admit(host)
        if refused is not None:
            self.refusals.refuse(refused, peer)
            await trio.aclose_forcefully(stream)
            return
        try:
            conn = await self._accept(stream, peer, bound)
            if conn is not None:
                self.counters.accepted += 1
                if await run_handler(handler, conn, log=logger):
                    self.counters.handler_errors += 1
        except Exception:
            # Nothing may reach trio.serve_listeners: it would stop the whole listener.
            self.counters.handler_errors += 1
            logger.exception("websocket connection from %s failed", peer)
        finally:
            await trio.aclose_forcefully(stream)

    async def _accept(
        self, stream: Stream, peer: str, bound: WebsocketAddress
    ) -> WebsocketConnection | None:
        """TLS and the upgrade for one accepted stream, under `handshake_timeout`."""
        host = remote_host(peer)
        self._pending[host] += 1
        try:
            with trio.fail_after(self.handshake_timeout):
                if isinstance(stream, trio.SSLStream):
                    await stream.do_handshake()
                return await upgrade_server(
                    stream,
                    path=bound.path,
                    remote=f"{bound.scheme}://{peer}",
                    settings=self._settings,
                )
        except trio.TooSlowError:
            self.counters.handshake_failures += 1
            logger.info("%s did not finish the handshake within %s s", peer, self.handshake_timeout)
        except UpgradeFailed as exc:
            self.counters.handshake_failures += 1
            logger.info("handshake with %s failed: %s", peer, exc)
        except trio.BrokenResourceError as exc:
            self.counters.handshake_failures += 1
            logger.info("handshake with %s failed: %r", peer, exc.__cause__ or exc)
        finally:
            self._pending[host] -= 1
            if not self._pending[host]:
                del self._pending[host]
        return None


async def _discard(stream: Stream | None) -> None:
    if stream is not None:
        await trio.aclose_forcefully(stream)
