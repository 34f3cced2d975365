"""Pluggable transports: the interface (`base`), websockets, and an in-memory network.

The runtime depends only on the `Transport` / `Connection` protocols and the exceptions;
`WebsocketTransport` is the production transport, `MemoryNetwork` the simulated one.
"""

from typing import TYPE_CHECKING

from .base import (
    ConnectError,
    Connection,
    Handler,
    Transport,
    TransportClosed,
    TransportError,
    run_handler,
)
from .memory import (
    LinkConditions,
    MemoryConnection,
    MemoryNetwork,
    MemoryTransport,
    NetworkCounters,
    parse_memory_address,
)
from .websocket import (
    WebsocketAddress,
    WebsocketConnection,
    WebsocketCounters,
    WebsocketTransport,
    parse_websocket_address,
)

__all__ = [
    "ConnectError",
    "Connection",
    "Handler",
    "LinkConditions",
    "MemoryConnection",
    "MemoryNetwork",
    "MemoryTransport",
    "NetworkCounters",
    "Transport",
    "TransportClosed",
    "TransportError",
    "WebsocketAddress",
    "WebsocketConnection",
    "WebsocketCounters",
    "WebsocketTransport",
    "parse_memory_address",
    "parse_websocket_address",
    "run_handler",
]

if TYPE_CHECKING:  # static check only: both transports satisfy the protocol
    _memory: type[Transport] = MemoryTransport
    _websocket: type[Transport] = WebsocketTransport
