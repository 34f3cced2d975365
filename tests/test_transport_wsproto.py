"""The websocket connection on wsproto (issue 19), against peers it does not control.

Plain trio-websocket ends check interop both ways; a peer driven by hand with wsproto sends
what libraries never do (fragments, pings between them, oversize fragmented messages,
garbage after the upgrade, pings while our send is blocked). Real loopback sockets, real
clock, every wait under a deadline.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio_websocket
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    Request,
)

from trio_replica.transports import (
    Connection,
    TransportClosed,
    WebsocketTransport,
    parse_websocket_address,
)

# The same deadlines and echo listener as the transport's own tests.
from .test_transport_websocket import DEADLINE, DIAL, echo, serving


class RawPeer:
    """One websocket end driven by hand: events in, events out, nothing checked for us."""

    def __init__(self, stream: trio.SocketStream, ws: WSConnection) -> None:
        self.stream = stream
        self.ws = ws

    async def send(self, *events: Event) -> None:
        await self.stream.send_all(b"".join(self.ws.send(event) for event in events))

    async def next_event(self) -> Event | None:
        """The next event from the peer; None when the stream ends first."""
        while True:
            for event in self.ws.events():
                return event
            data = await self.stream.receive_some(65536)
            if not data:
                return None
            self.ws.receive_data(data)


@asynccontextmanager
async def raw_client(address: str) -> AsyncIterator[RawPeer]:
    target = parse_websocket_address(address)
    stream = await trio.open_tcp_stream(target.host, target.port)
    async with stream:
        peer = RawPeer(stream, WSConnection(ConnectionType.CLIENT))
        await peer.send(Request(host=target.netloc, target=target.path))
        assert isinstance(await peer.next_event(), AcceptConnection)
        yield peer


@asynccontextmanager
async def raw_server(on_peer: Callable[[RawPeer], Awaitable[None]]) -> AsyncIterator[str]:
    async def on_stream(stream: trio.SocketStream) -> None:
        peer = RawPeer(stream, WSConnection(ConnectionType.SERVER))
        assert isinstance(await peer.next_event(), Request)
        await peer.send(AcceptConnection())
        await on_peer(peer)

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(trio.serve_tcp, on_stream, 0)
            yield f"ws://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
            nursery.cancel_scope.cancel()


# --- interop with trio-websocket --------------------------------------------------------------


async def test_a_trio_websocket_client_talks_to_our_server_and_gets_pongs() -> None:
    server_saw: list[str] = []

    async def record(conn: Connection) -> None:
        try:
            await echo(conn)
        finally:
            with pytest.raises(TransportClosed) as closed:
                await conn.receive()
            server_saw.append(str(closed.value))

    transport = WebsocketTransport()
    async with serving(transport, record) as address:
        target = parse_websocket_address(address)
        stream = await trio.open_tcp_stream(target.host, target.port)
        async with stream, trio.open_nursery() as nursery:
            ws = await trio_websocket.wrap_client_stream(nursery, stream, target.netloc, "/")
            await ws.ping(b"are you there")  # returns once our pong arrives
            for frame in (b"one", bytes(100_000), b"three"):
                await ws.send_message(frame)
                assert await ws.get_message() == frame
            await ws.ping()
            await ws.aclose()
            nursery.cancel_scope.cancel()
    assert server_saw and "1000" in server_saw[0]


async def test_our_client_talks_to_a_trio_websocket_server() -> None:
    closed_with: list[int | None] = []
    server_saw_close = trio.Event()

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        try:
            while True:
                message = await ws.get_message()
                if message == b"close please":
                    await ws.aclose(4000, "as you asked")
                    return
                await ws.send_message(message)
        except trio_websocket.ConnectionClosed as exc:
            closed_with.append(exc.reason.code if exc.reason else None)
            server_saw_close.set()

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                trio_websocket.serve_websocket, handler, "127.0.0.1", 0, None
            )
            address = f"ws://127.0.0.1:{server.port}"
            transport = WebsocketTransport()
            async with transport.open_connection(address, timeout=DIAL) as conn:
                for frame in (b"one", bytes(200_000), b"three"):
                    await conn.send(frame)
                    assert await conn.receive() == frame
            async with transport.open_connection(address, timeout=DIAL) as conn:
                await conn.send(b"close please")
                with pytest.raises(TransportClosed, match="4000"):
                    await conn.receive()
                with pytest.raises(TransportClosed):
                    await conn.send(b"x")
            with trio.fail_after(DIAL):
                await server_saw_close.wait()
            nursery.cancel_scope.cancel()
    assert closed_with == [1000]


# --- what libraries never send ----------------------------------------------------------------


async def test_a_message_in_the_same_packet_as_the_upgrade_response_is_received() -> None:
    async def accept_and_speak(stream: trio.SocketStream) -> None:
        peer = RawPeer(stream, WSConnection(ConnectionType.SERVER))
        assert isinstance(await peer.next_event(), Request)
        await peer.send(AcceptConnection(), BytesMessage(data=b"already here"))
        await trio.sleep_forever()

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(trio.serve_tcp, accept_and_speak, 0)
            address = f"ws://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
            transport = WebsocketTransport(disconnect_timeout=0.2)
            async with transport.open_connection(address, timeout=DIAL) as conn:
                with trio.fail_after(2):
                    assert await conn.receive() == b"already here"
            nursery.cancel_scope.cancel()


async def test_a_fragmented_message_is_reassembled_across_pings() -> None:
    transport = WebsocketTransport()
    async with serving(transport) as address, raw_client(address) as peer:
        await peer.send(
            BytesMessage(data=b"frag", message_finished=False),
            Ping(payload=b"between"),
            BytesMessage(data=b"men", message_finished=False),
        )
        pong = await peer.next_event()
        assert isinstance(pong, Pong) and pong.payload == b"between"
        await peer.send(BytesMessage(data=b"ted", message_finished=True))
        echoed = await peer.next_event()
        assert isinstance(echoed, BytesMessage) and echoed.data == b"fragmented"


async def test_hundreds_of_messages_in_one_read_arrive_in_order() -> None:
    got: list[bytes] = []
    all_in = trio.Event()

    async def collect(conn: Connection) -> None:
        while len(got) < 300:
            got.append(await conn.receive())
        all_in.set()
        await echo(conn)

    transport = WebsocketTransport()
    async with serving(transport, collect) as address, raw_client(address) as peer:
        await peer.send(*(BytesMessage(data=i.to_bytes(2, "big")) for i in range(300)))
        with trio.fail_after(DIAL):
            await all_in.wait()
    assert got == [i.to_bytes(2, "big") for i in range(300)]


async def test_a_message_growing_over_max_frame_across_fragments_closes_with_1009() -> None:
    outcome: list[str] = []
    record = recording(outcome)

    transport = WebsocketTransport(max_frame=1000)
    async with serving(transport, record) as address, raw_client(address) as peer:
        await peer.send(BytesMessage(data=bytes(1000), message_finished=True))
        assert isinstance(await peer.next_event(), BytesMessage)  # exactly the limit: fine
        for _ in range(3):  # each fragment fits; the message does not
            await peer.send(BytesMessage(data=bytes(400), message_finished=False))
        closed = await peer.next_event()
        assert isinstance(closed, CloseConnection) and closed.code == 1009
        await peer.send(closed.response())
        assert await peer.next_event() is None  # and the server closes the stream
    assert outcome and "1009" in outcome[0]


async def echo_strict(conn: Connection) -> None:
    while True:
        await conn.send(await conn.receive())


def recording(outcome: list[str]) -> Callable[[Connection], Awaitable[None]]:
    """A handler that echoes until the connection closes, then records why."""

    async def record(conn: Connection) -> None:
        try:
            await echo_strict(conn)
        except TransportClosed as exc:
            outcome.append(str(exc))

    return record


async def test_garbage_after_the_upgrade_closes_with_1002_and_the_listener_goes_on() -> None:
    outcome: list[str] = []
    record = recording(outcome)

    transport = WebsocketTransport()
    async with serving(transport, record) as address:
        async with raw_client(address) as peer:
            await peer.stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            closed = await peer.next_event()
            assert isinstance(closed, CloseConnection) and closed.code == 1002
            assert await peer.next_event() is None  # no reply awaited: the stream is cut
        async with transport.open_connection(address, timeout=DIAL) as conn:
            await conn.send(b"still serving")
            assert await conn.receive() == b"still serving"
    assert outcome and "1002" in outcome[0]
    assert transport.counters.handler_errors == 0


async def test_a_ping_is_answered_and_messages_received_while_our_send_is_blocked() -> None:
    """The reader never waits for the send side: a pong owed while the writer is stuck
    on a peer that does not read goes out after the writer's frame."""
    peer_spoke = trio.Event()
    let_read = trio.Event()
    pongs: list[bytes] = []

    async def stall_then_speak(peer: RawPeer) -> None:
        await peer.send(Ping(payload=b"p1"), BytesMessage(data=b"hello"))
        peer_spoke.set()
        await let_read.wait()
        while (event := await peer.next_event()) is not None:
            if isinstance(event, Pong):
                pongs.append(event.payload)
            if isinstance(event, CloseConnection):
                await peer.send(event.response())

    async with raw_server(stall_then_speak) as address:
        transport = WebsocketTransport()
        async with transport.open_connection(address, timeout=DIAL) as conn:
            await peer_spoke.wait()
            completed = 0
            stop = False

            async def writer() -> None:
                nonlocal completed
                big = bytes(1_000_000)
                while not stop:  # loopback buffers hold a few MB: a send soon blocks
                    await conn.send(big)
                    completed += 1

            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer)
                while True:
                    before = completed
                    await trio.sleep(0.3)
                    if completed == before:
                        break  # the writer is stuck in a send, holding the send side
                with trio.fail_after(2):
                    assert await conn.receive() == b"hello"
                stop = True
                let_read.set()
    assert pongs == [b"p1"]


async def test_receive_after_close_raises_and_close_is_bounded_by_a_silent_peer() -> None:
    async def never_answer(peer: RawPeer) -> None:
        await trio.sleep_forever()  # reads nothing, answers no close frame

    async with raw_server(never_answer) as address:
        transport = WebsocketTransport(disconnect_timeout=0.3)
        async with transport.open_connection(address, timeout=DIAL) as conn:
            cancelled = trio.CancelScope()
            with cancelled:
                cancelled.cancel()
                start = trio.current_time()
                await conn.aclose()  # shielded: still sends its close, then gives up
                elapsed = trio.current_time() - start
            assert 0.25 <= elapsed < 2
            with pytest.raises(TransportClosed):
                await conn.receive()
            with pytest.raises(TransportClosed):
                await conn.send(b"x")


async def test_closing_on_a_peer_that_floods_without_reading_does_not_read_it_for_long() -> None:
    """Waiting for the close reply of a peer that never reads (a flood the node is failing)
    read and dropped everything it sent for the whole disconnect timeout."""
    closed = trio.Event()

    async def close_at_once(conn: Connection) -> None:
        await conn.receive()
        await conn.aclose()
        closed.set()

    # A disconnect timeout far past the test's deadline: only the bound on what is read
    # while waiting for the reply can end the close while the flood still runs.
    transport = WebsocketTransport(disconnect_timeout=3 * DEADLINE)
    async with serving(transport, close_at_once) as address, raw_client(address) as peer:
        # The flood: never read, so our close frame is never answered.
        with trio.move_on_after(DEADLINE) as flood:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                while not closed.is_set():
                    await peer.send(BytesMessage(data=b"x" * 1000))
    assert closed.is_set() and not flood.cancelled_caught
