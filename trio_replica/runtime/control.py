"""The control path: a command-line client asks a running node to do or tell something.

A client dials the node's own listener and runs the same authenticated handshake as a
node, with role ``client`` (so it needs the cluster secret too), then sends
`ControlRequest(request_id, op, args)` and gets `ControlReply(request_id, ok, result)`.
Arguments and results are CBOR-encoded plain data, decoded strictly on both sides.

The node side (`answer_control`) runs each request in a task of the node's nursery, so a
slow operation never blocks the client's link reader. The client side is `open_control`,
an async context manager yielding a `ControlClient`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import secrets
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..core.messages import ControlReply, ControlRequest, Message, Peer, Role
from ..core.wire import decode_payload, encode_payload
from ..errors import HandshakeError, LinkClosed, ReplicaError, WireError
from ..transports.base import ConnectError, Transport
from .handshake import Credentials, handshake_as_dialer
from .link import Link
from .linkconfig import LinkConfig
from .stats import NodeStats

if TYPE_CHECKING:
    from .config import NodeConfig

log = logging.getLogger("trio_replica.control")

ControlOp = Callable[[Any], Awaitable[Any]]
#: A streaming operation: every item it yields is sent as one reply, until the client leaves.
ControlStream = Callable[[Any], AsyncIterator[Any]]


@contextlib.contextmanager
def _unwrapped() -> Iterator[None]:
    """Let the one error of a nursery's group out as it was raised (a helper's own nursery
    must not change what its caller catches)."""
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


class ControlError(ReplicaError):
    """The node answered a control request with an error, or the request failed."""


class ControlHost(Protocol):
    """What answering control requests uses of the node."""

    @property
    def config(self) -> NodeConfig: ...
    @property
    def stats_counters(self) -> NodeStats: ...

    def spawn(self, fn: Callable[..., Awaitable[object]], *args: object) -> None: ...


def answer_control(
    node: ControlHost,
    link: Link,
    request: ControlRequest,
    ops: dict[str, ControlOp],
    streams: dict[str, ControlStream],
) -> None:
    """Start answering `request` (from a client link) in the node's nursery."""
    node.spawn(_answer, node, link, request, ops, streams)


async def _answer(
    node: ControlHost,
    link: Link,
    request: ControlRequest,
    ops: dict[str, ControlOp],
    streams: dict[str, ControlStream],
) -> None:
    limit = node.config.max_payload
    op = ops.get(request.op)
    try:
        args = decode_payload(request.args, max_size=limit)
        stream = streams.get(request.op)
        if stream is not None:
            await _stream_replies(link, request, stream(args), limit)
            return
        if op is None:
            known = sorted([*ops, *streams])
            raise ControlError(f"unknown operation {request.op!r}; known: {known}")
        result = await op(args)
        reply = ControlReply(request.request_id, True, encode_payload(result, max_size=limit))
    except (ReplicaError, ValueError, TypeError, KeyError) as exc:
        # The error goes back to the client; it is the client's mistake, not the node's.
        log.info("control %s from %s failed: %s", request.op, link.peer.id, exc)
        # Our own refusals read as they are; a library error keeps its type's name.
        text = str(exc) if isinstance(exc, ControlError) else f"{type(exc).__name__}: {exc}"
        reply = ControlReply(request.request_id, False, encode_payload(text, max_size=limit))
    except Exception as exc:
        # A bug behind an operation (an application validator, a store) must not end the
        # node: the client gets the error, the log gets the traceback.
        node.stats_counters.drop(f"control_error:{request.op}")
        log.exception("control %s from %s failed", request.op, link.peer.id)
        text = f"internal error: {type(exc).__name__}: {exc}"
        reply = ControlReply(request.request_id, False, encode_payload(text, max_size=limit))
    if link.is_open:
        link.send_nowait(reply)


async def _stream_replies(
    link: Link, request: ControlRequest, items: AsyncIterator[Any], limit: int
) -> None:
    """Send every item as a reply until the stream ends or the client's link closes.

    What the stream raises comes out as it was raised (not wrapped in this nursery's
    group), so that the caller answers it like any failed operation."""
    with _unwrapped():
        await _stream_replies_in(link, request, items, limit)


async def _stream_replies_in(
    link: Link, request: ControlRequest, items: AsyncIterator[Any], limit: int
) -> None:
    async with trio.open_nursery() as nursery:

        async def stop_when_client_leaves() -> None:
            await link.closed.wait()
            nursery.cancel_scope.cancel()

        nursery.start_soon(stop_when_client_leaves)
        async with contextlib.aclosing(items):  # type: ignore[type-var]
            async for item in items:
                if not link.is_open:
                    break
                reply = ControlReply(request.request_id, True, encode_payload(item, max_size=limit))
                try:
                    # Waits while the client reads slower than the stream: the stream's
                    # source then counts what it cannot keep (a map watch says `lagged`).
                    await link.send(reply)
                except LinkClosed:
                    break
        nursery.cancel_scope.cancel()


class ControlClient:
    """A client connection to one node; `call` sends a request and waits for its reply."""

    def __init__(self, link: Link, timeout: float) -> None:
        self._link = link
        self._timeout = timeout
        self._ids = itertools.count(1)
        self._waiting: dict[int, trio.MemorySendChannel[ControlReply]] = {}
        self._streams: dict[int, trio.MemorySendChannel[ControlReply]] = {}
        self.node = link.peer

    async def on_message(self, _link: Link, message: Message, _size: int) -> None:
        if not isinstance(message, ControlReply):
            return
        stream = self._streams.get(message.request_id)
        if stream is not None:
            # Waits while the caller reads slower than the stream comes: the link's
            # reader stops, the node's sends wait for credit (a watch then counts what it
            # cannot keep, `lagged`), and nothing is dropped here. Replies to other
            # requests on this connection wait behind it meanwhile.
            with contextlib.suppress(trio.BrokenResourceError):
                await stream.send(message)
            return
        send = self._waiting.pop(message.request_id, None)
        if send is not None:
            send.send_nowait(message)

    def link_ended(self) -> None:
        """The node went away: every pending call and stream ends now."""
        for send in [*self._streams.values(), *self._waiting.values()]:
            send.close()
        self._streams.clear()
        self._waiting.clear()

    def _send(self, request: ControlRequest) -> None:
        try:
            self._link.send_nowait(request)
        except LinkClosed:
            # Never sent: the operation did not happen (unlike a request left unanswered).
            raise ControlError(f"not sent: the connection to {self.node} is closed") from None

    async def stream(self, op: str, args: Any = None) -> AsyncIterator[Any]:
        """Run a streaming operation and yield its items until the node or the caller stops."""
        request_id = next(self._ids)
        send, receive = trio.open_memory_channel[ControlReply](1024)
        self._streams[request_id] = send
        try:
            self._send(ControlRequest(request_id, op, encode_payload(args, max_size=1 << 20)))
            async for reply in receive:
                result = decode_payload(reply.result, max_size=1 << 22)
                if not reply.ok:
                    raise ControlError(str(result))
                yield result
            raise ControlError(f"{self.node} closed the connection")
        finally:
            self._streams.pop(request_id, None)

    async def call(self, op: str, args: Any = None) -> Any:
        """Run `op` on the node and return its result; raise `ControlError` on failure."""
        request_id = next(self._ids)
        send, receive = trio.open_memory_channel[ControlReply](1)
        self._waiting[request_id] = send
        try:
            self._send(ControlRequest(request_id, op, encode_payload(args, max_size=1 << 20)))
        except ControlError:
            self._waiting.pop(request_id, None)
            raise
        with trio.move_on_after(self._timeout):
            try:
                reply = await receive.receive()
            except trio.EndOfChannel:
                raise ControlError(f"{self.node} closed the connection") from None
            result = decode_payload(reply.result, max_size=1 << 22)
            if not reply.ok:
                raise ControlError(str(result))
            return result
        self._waiting.pop(request_id, None)
        raise ControlError(f"no answer from {self.node} within {self._timeout} s")


@contextlib.asynccontextmanager
async def open_control(
    address: str,
    *,
    transport: Transport | None = None,
    cluster: str = "trio-replica",
    secret: bytes | None = None,
    client_ssl: ssl.SSLContext | None = None,
    timeout: float = 5.0,
    key: Ed25519PrivateKey | None = None,
    accepted_secrets: tuple[bytes, ...] = (),
) -> AsyncIterator[ControlClient]:
    """Connect to the node at `address` as a control client.

    `key` is the client's Ed25519 key (a fresh one if None); a node whose trust mode is
    ``allowlist`` accepts only clients whose key its allow-list holds. The client proves
    `secret` and accepts a node that proves it or one of `accepted_secrets` (a keyring,
    while the cluster secret is rotated).
    """
    if transport is None:
        from ..transports.websocket import WebsocketTransport

        transport = WebsocketTransport(client_ssl=client_ssl)
    me = Peer(f"client-{secrets.token_hex(4)}", "")
    creds = Credentials(
        cluster,
        secret or b"",
        me,
        key=key or Ed25519PrivateKey.generate(),
        accepted=accepted_secrets,
    )
    try:
        async with transport.open_connection(address, timeout=timeout) as conn:
            try:
                auth = await handshake_as_dialer(conn, creds, role=Role.CLIENT, timeout=timeout)
            except HandshakeError as exc:
                raise ControlError(
                    f"could not open a control session with {address}: {exc}"
                ) from None
            client: ControlClient | None = None

            async def route(link: Link, message: Message, size: int) -> None:
                assert client is not None
                await client.on_message(link, message, size)

            link = Link(
                conn,
                auth.peer,
                role=Role.NODE,
                outbound=True,
                config=LinkConfig(),
                stats=NodeStats(),
                on_message=route,
            )
            client = ControlClient(link, timeout)

            async def run_link() -> None:
                try:
                    await link.run()
                finally:
                    client.link_ended()

            # What the caller's block raises comes out as it was raised.
            with _unwrapped():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(run_link)
                    try:
                        yield client
                    finally:
                        nursery.cancel_scope.cancel()
    except ConnectError as exc:
        # The transport's error names the address already.
        text = str(exc) if address in str(exc) else f"{address}: {exc}"
        raise ControlError(f"could not connect to {text}") from None
    except WireError as exc:
        raise ControlError(f"bad answer from {address}: {exc}") from None
