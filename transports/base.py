"""The transport interface: listen on an address, dial an address, move whole frames.

A transport knows nothing of the protocol: it carries opaque byte frames, in order, over a
reliable connection, and says clearly when the connection is gone. The runtime owns every
task that uses a connection: a transport never spawns tasks that outlive the `serve` call
or the `open_connection` block that started them.

Addresses are URLs: ``ws://host:port[/path]``, ``wss://host:port[/path]`` (websocket
transport) and ``mem://name`` (in-memory transport).

Why dialing is an async context manager (`Transport.open_connection`) and not a coroutine
returning a connection: a connection may need a task of its own (trio-websocket's had a
background reader until issue 19; ours reads in the caller's task, so pings and close
frames are answered while someone calls `receive`, which the runtime always does), and
under structured concurrency such a task must live in a nursery owned by whoever owns the
connection. ``async with transport.open_connection(address, timeout=t) as conn:`` gives the
connection exactly the lifetime of the block, which is also the shape of the runtime: one
task per link dials, then runs the link inside the block until it ends. Leaving the block
closes the connection and ends any task it has; exceptions raised in the block come out
unchanged (never wrapped in an exception group).
"""

from __future__ import annotations

import collections
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager
from typing import Protocol

import trio


class TransportError(Exception):
    """Base class of transport failures."""


class TransportClosed(TransportError):
    """The connection is closed (by either side, or broken); no frame can be sent or received."""


class ConnectError(TransportError):
    """Dialing an address failed: refused, unreachable, timed out, or the upgrade failed."""


class Connection(Protocol):
    """One reliable, ordered, bidirectional stream of frames.

    `send` and `receive` may each be used by one task at a time (the runtime has one writer
    and one reader per connection). A frame larger than the transport's `max_frame` is
    refused by `send` with `trio_replica.errors.MessageTooLarge` (a caller error, not a
    transport failure).

    Cancellation: cancelling `receive` never loses a frame. Cancelling `send` may leave a
    partial frame on the wire (websocket); the connection then refuses further sends with
    `TransportClosed` and the caller must `aclose` it.
    """

    @property
    def remote(self) -> str:
        """A printable description of the other end (for logs)."""
        ...

    @property
    def channel_binding(self) -> bytes:
        """Bytes naming the secure channel under this connection, the same at both ends
        (TLS ``tls-unique``), or empty when there is none; the handshake signs them."""
        ...

    async def send(self, frame: bytes) -> None:
        """Send one frame; may block while the peer does not read. Raises `TransportClosed`."""
        ...

    async def receive(self) -> bytes:
        """Receive the next frame. Raises `TransportClosed` when the connection ends."""
        ...

    async def aclose(self) -> None:
        """Close the connection; idempotent, never raises, bounded in time."""
        ...


Handler = Callable[[Connection], Awaitable[None]]


class Transport(Protocol):
    """A way to listen and to dial, for one or more address schemes."""

    schemes: tuple[str, ...]

    def open_connection(
        self, address: str, *, timeout: float
    ) -> AbstractAsyncContextManager[Connection]:
        """Dial `address`; the context yields the open connection and closes it on exit.

        Entering raises `ConnectError` on failure, or when the whole dial (TCP, TLS, upgrade,
        or the simulated equivalent) has not finished after `timeout` seconds. The connection
        and any task it needs live exactly as long as the ``async with`` block.

        The timeout is a parameter, not the caller's `trio.fail_after`, so that every way a
        dial can fail comes out as `ConnectError` after the transport has cleaned up what it
        half-opened.
        """
        ...

    async def serve(
        self,
        address: str,
        handler: Handler,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on `address` until cancelled, running `handler(conn)` for each connection.

        Start it with ``await nursery.start(transport.serve, address, handler)``; the value
        passed to `task_status.started` is the dialable address actually bound (port 0 is
        replaced by the real port). The connection is closed when the handler returns; an
        exception escaping a handler is logged and never stops the listener. Cancelling
        `serve` stops listening and cancels the running handlers.
        """
        ...


class Refusals:
    """Connections refused before anyone proved who they are, by reason.

    Each refusal is counted; a log line goes out at most once per `period` per reason, with
    how many there were since the last one: a flood of connections must not become a
    flood of log lines (issue 17 measured 72 tracebacks in 10 s from one).
    """

    def __init__(
        self,
        log: logging.Logger,
        what: str,
        period: float = 10.0,
        *,
        quiet: Iterable[str] = (),
    ) -> None:
        self._log = log
        self._what = what
        self._period = period
        #: Reasons that are part of normal operation (a node shutting down refuses
        #: newcomers): logged at INFO, not WARNING.
        self._quiet = frozenset(quiet)
        #: Refusals by reason, since the start (for metrics).
        self.counts: collections.Counter[str] = collections.Counter()
        self._unlogged: collections.Counter[str] = collections.Counter()
        self._logged_at: dict[str, float] = {}

    def refuse(self, reason: str, remote: str, detail: str = "") -> None:
        self.counts[reason] += 1
        self._unlogged[reason] += 1
        now = trio.current_time()
        last = self._logged_at.get(reason)
        if last is not None and now - last < self._period:
            return
        count = self._unlogged.pop(reason)
        self._logged_at[reason] = now
        level = logging.INFO if reason in self._quiet else logging.WARNING
        if last is None:
            self._log.log(
                level, "%s refused a connection from %s (%s)%s", self._what, remote, reason, detail
            )
        else:
            self._log.log(
                level,
                "%s refused %d connections (%s) in the last %.0f s; the latest from %s%s",
                self._what,
                count,
                reason,
                now - last,
                remote,
                detail,
            )


def remote_host(remote: str) -> str:
    """Who is on the other end, for per-address limits: the host of a connection's
    `remote` (``ws://1.2.3.4:5`` -> ``1.2.3.4``); for IPv6 its /64 network, which one
    holder usually has whole (one address each would be no limit at all)."""
    rest = remote.split("://", 1)[-1]
    if rest.startswith("["):
        host = rest[1:].split("]", 1)[0]
    else:
        host = rest.rsplit(":", 1)[0] if rest.count(":") == 1 else rest
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


async def run_handler(handler: Handler, conn: Connection, *, log: logging.Logger) -> bool:
    """Run `handler(conn)` for a listener, then close `conn`; return True if the handler failed.

    This is the one place a listener's handler runs. Nothing but cancellation escapes it: an
    exception leaving a handler must not take the listener (and every other connection)
    down, so it is logged with the peer's description. A handler that lets `TransportClosed`
    escape is only reporting that its peer went away, which is not a failure.
    """
    failed = False
    try:
        await handler(conn)
    except* TransportError as group:
        log.info("connection from %s ended in its handler: %r", conn.remote, group.exceptions)
    except* Exception as group:
        failed = True
        error = group.exceptions[0] if len(group.exceptions) == 1 else group
        log.error("handler for connection from %s failed", conn.remote, exc_info=error)
    finally:
        await conn.aclose()
    return failed
