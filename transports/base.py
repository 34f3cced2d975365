"""The transport interface: listen on an address, dial an address, move whole frames.

A transport knows nothing of the protocol: it carries opaque byte frames, in order, over a
reliable connection, and says clearly when the connection is gone. The runtime owns every
task that uses a connection: a transport never spawns tasks that outlive the `serve` call
or the connection that started them.

Addresses are URLs: ``ws://host:port``, ``wss://host:port`` (websocket transport) and
``mem://name`` (in-memory transport).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol


class TransportError(Exception):
    """Base class of transport failures."""


class TransportClosed(TransportError):
    """The connection is closed (by either side, or broken); no frame can be sent or received."""


class ConnectError(TransportError):
    """Dialing an address failed: refused, unreachable, timed out, or the upgrade failed."""


class Connection(Protocol):
    """One reliable, ordered, bidirectional stream of frames.

    `send` and `receive` may each be used by one task at a time (the runtime has one writer
    and one reader per connection). Cancelling `send` may leave the connection unusable;
    the runtime closes the connection in that case.
    """

    @property
    def remote(self) -> str:
        """A printable description of the other end (for logs)."""
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

    async def connect(self, address: str, *, timeout: float) -> Connection:
        """Dial `address`; raise `ConnectError` on failure or after `timeout` seconds."""
        ...

    async def serve(self, address: str, handler: Handler, *, task_status: Any) -> None:
        """Listen on `address` until cancelled, running `handler(conn)` for each connection.

        Start it with ``await nursery.start(transport.serve, address, handler)``; the value
        passed to `task_status.started` is the dialable address actually bound (port 0 is
        replaced by the real port). The connection is closed when the handler returns; an
        exception escaping a handler is logged and never stops the listener.
        """
        ...
