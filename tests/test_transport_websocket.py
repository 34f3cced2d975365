"""The websocket transport on real loopback sockets (real clock, every wait under a deadline).

Covers the traps of STYLE.md (met with trio-websocket; the connection is on wsproto since
issue 19, tests/test_transport_wsproto.py): a failing handler must not stop the listener,
a peer that never answers the upgrade must not hang the dial, an oversize or text message
closes only its own connection; and TLS with and without client certificates (certificates
made on the fly by trustme).
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio_websocket
import trustme

from trio_replica.errors import MessageTooLarge
from trio_replica.transports import (
    ConnectError,
    Connection,
    Transport,
    TransportClosed,
    WebsocketTransport,
    parse_websocket_address,
)

#: Deadline of every test body: generous, only there so that a bug fails instead of hanging.
DEADLINE = 10.0
DIAL = 5.0


async def echo(conn: Connection) -> None:
    while True:
        try:
            frame = await conn.receive()
        except TransportClosed:
            return
        await conn.send(frame)


@asynccontextmanager
async def serving(
    transport: WebsocketTransport,
    handler: Callable[[Connection], Awaitable[None]] = echo,
    address: str = "ws://127.0.0.1:0",
) -> AsyncIterator[str]:
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(transport.serve, address, handler)
            yield bound
            nursery.cancel_scope.cancel()


async def test_satisfies_the_transport_protocol() -> None:
    transport: Transport = WebsocketTransport()
    assert transport.schemes == ("ws", "wss")


def test_addresses_parse() -> None:
    a = parse_websocket_address("ws://127.0.0.1:8000")
    assert (a.scheme, a.host, a.port, a.path, a.url) == (
        "ws",
        "127.0.0.1",
        8000,
        "/",
        "ws://127.0.0.1:8000",
    )
    b = parse_websocket_address("wss://[::1]/replica")
    assert (b.port, b.netloc, b.url) == (443, "[::1]:443", "wss://[::1]:443/replica")
    for bad in ("http://x:1", "ws://:80", "ws://x:99999", "ws://x:1/?q=1", "mem://x"):
        with pytest.raises(ValueError):
            parse_websocket_address(bad)


async def test_round_trip_and_order() -> None:
    transport = WebsocketTransport()
    async with serving(transport) as address:
        assert address.startswith("ws://127.0.0.1:")
        assert not address.endswith(":0")
        async with transport.open_connection(address, timeout=DIAL) as conn:
            assert conn.remote == address
            await conn.send(b"\x00\xffbinary")
            assert await conn.receive() == b"\x00\xffbinary"
            big = bytes(range(256)) * 1000
            await conn.send(big)
            assert await conn.receive() == big
            frames = [i.to_bytes(4, "big") for i in range(500)]
            async with trio.open_nursery() as nursery:

                async def send_all() -> None:
                    for frame in frames:
                        await conn.send(frame)

                nursery.start_soon(send_all)
                assert [await conn.receive() for _ in frames] == frames
    assert transport.counters.accepted == 1
    assert transport.counters.handler_errors == 0


async def test_server_close_ends_client_receive() -> None:
    async def one_frame_then_close(conn: Connection) -> None:
        await conn.send(b"bye")

    transport = WebsocketTransport()
    async with (
        serving(transport, one_frame_then_close) as address,
        transport.open_connection(address, timeout=DIAL) as conn,
    ):
        assert await conn.receive() == b"bye"
        with pytest.raises(TransportClosed, match="1000"):
            await conn.receive()
        with pytest.raises(TransportClosed):
            await conn.send(b"x")


async def test_client_aclose_is_idempotent_and_ends_server_side() -> None:
    server_saw_close = trio.Event()

    async def wait_close(conn: Connection) -> None:
        with pytest.raises(TransportClosed):
            await conn.receive()
        server_saw_close.set()

    transport = WebsocketTransport()
    async with serving(transport, wait_close) as address:
        async with transport.open_connection(address, timeout=DIAL) as conn:
            await conn.aclose()
            await conn.aclose()
            with pytest.raises(TransportClosed):
                await conn.receive()
            with pytest.raises(TransportClosed):
                await conn.send(b"x")
        await server_saw_close.wait()


async def test_exception_in_block_is_not_wrapped() -> None:
    transport = WebsocketTransport()
    async with serving(transport) as address:
        with pytest.raises(KeyError):
            async with transport.open_connection(address, timeout=DIAL):
                raise KeyError("mine")


async def test_handler_exception_does_not_stop_listener() -> None:
    calls = 0

    async def flaky(conn: Connection) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("handler bug")
        if calls == 2:
            await conn.receive()
            await conn.receive()  # the client is gone: TransportClosed escapes, harmlessly
        await echo(conn)

    transport = WebsocketTransport()
    async with serving(transport, flaky) as address:
        async with transport.open_connection(address, timeout=DIAL) as conn:
            with pytest.raises(TransportClosed):
                await conn.receive()
        async with transport.open_connection(address, timeout=DIAL) as conn:
            await conn.send(b"one")
        async with transport.open_connection(address, timeout=DIAL) as conn:
            await conn.send(b"still serving")
            assert await conn.receive() == b"still serving"
    assert transport.counters.handler_errors == 1


async def test_oversize_frame_closes_only_that_connection() -> None:
    server = WebsocketTransport(max_frame=1000)
    client = WebsocketTransport(max_frame=10_000)
    server_side: list[str] = []

    async def record(conn: Connection) -> None:
        try:
            await echo_strict(conn)
        except TransportClosed as exc:
            server_side.append(str(exc))

    async with serving(server, record) as address:
        async with (
            client.open_connection(address, timeout=DIAL) as bystander,
            client.open_connection(address, timeout=DIAL) as offender,
        ):
            await offender.send(bytes(1000))  # exactly the limit: fine
            assert await offender.receive() == bytes(1000)
            await offender.send(bytes(1001))
            with pytest.raises(TransportClosed):
                await offender.receive()
            await bystander.send(b"unaffected")
            assert await bystander.receive() == b"unaffected"
        async with client.open_connection(address, timeout=DIAL) as conn:
            await conn.send(b"new connection")
            assert await conn.receive() == b"new connection"
    assert any("1009" in reason for reason in server_side)


async def echo_strict(conn: Connection) -> None:
    while True:
        await conn.send(await conn.receive())


async def test_cancelled_send_to_a_stalled_peer_then_bounded_close() -> None:
    """A peer that stops reading blocks `send`; cancelling it breaks the connection for
    sending, and `aclose` still returns (after at most `disconnect_timeout`)."""
    stalled = trio.Event()

    async def never_read(conn: Connection) -> None:
        stalled.set()
        await trio.sleep_forever()

    transport = WebsocketTransport(disconnect_timeout=0.2)
    big = bytes(1_000_000)
    async with (
        serving(transport, never_read) as address,
        transport.open_connection(address, timeout=DIAL) as conn,
    ):
        await stalled.wait()
        for _ in range(200):  # loopback buffers hold a few MB at most
            with trio.move_on_after(0.5) as blocked:
                await conn.send(big)
            if blocked.cancelled_caught:
                break
        assert blocked.cancelled_caught
        with pytest.raises(TransportClosed, match="cancelled mid-frame"):
            await conn.send(b"x")
        await conn.aclose()


async def test_sender_refuses_frames_over_max_frame() -> None:
    transport = WebsocketTransport(max_frame=100)
    async with (
        serving(transport) as address,
        transport.open_connection(address, timeout=DIAL) as conn,
    ):
        with pytest.raises(MessageTooLarge):
            await conn.send(bytes(101))
        await conn.send(bytes(100))
        assert await conn.receive() == bytes(100)


async def test_text_message_from_client_closes_connection() -> None:
    outcome: list[str] = []

    async def record(conn: Connection) -> None:
        try:
            await conn.receive()
        except TransportClosed as exc:
            outcome.append(str(exc))

    transport = WebsocketTransport()
    async with serving(transport, record) as address, trio.open_nursery() as nursery:
        # A raw trio-websocket client over a stream we close ourselves: the library's own
        # client leaves its socket open when the server initiates the close.
        target = parse_websocket_address(address)
        stream = await trio.open_tcp_stream(target.host, target.port)
        async with stream:
            raw = await trio_websocket.wrap_client_stream(nursery, stream, target.netloc, "/")
            await raw.send_message("text is not a frame")
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await raw.get_message()
        nursery.cancel_scope.cancel()
    assert closed.value.reason is not None
    assert closed.value.reason.code == 1003
    assert outcome and "text message" in outcome[0]


async def test_text_message_from_server_closes_connection() -> None:
    async def raw_handler(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        try:
            await ws.send_message("text")
            await ws.get_message()
        except trio_websocket.ConnectionClosed:
            pass  # expected: the client closes it; must not escape into the raw server

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                trio_websocket.serve_websocket, raw_handler, "127.0.0.1", 0, None
            )
            transport = WebsocketTransport()
            address = f"ws://127.0.0.1:{server.port}"
            async with transport.open_connection(address, timeout=DIAL) as conn:
                with pytest.raises(TransportClosed, match="text message"):
                    await conn.receive()
                with pytest.raises(TransportClosed):
                    await conn.send(b"x")
            nursery.cancel_scope.cancel()


async def test_peer_that_never_upgrades_makes_connect_fail_within_timeout() -> None:
    accepted: list[trio.SocketStream] = []

    async def hold(stream: trio.SocketStream) -> None:
        accepted.append(stream)
        await trio.sleep_forever()  # accept TCP, never answer the HTTP upgrade

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            port = listeners[0].socket.getsockname()[1]
            nursery.start_soon(trio.serve_listeners, hold, listeners)
            transport = WebsocketTransport()
            with pytest.raises(ConnectError, match=r"after 0\.5 s"):
                async with transport.open_connection(f"ws://127.0.0.1:{port}", timeout=0.5):
                    pass  # pragma: no cover
            assert accepted  # the TCP connection itself was accepted
            nursery.cancel_scope.cancel()


async def test_connect_to_closed_port_fails() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    await listeners[0].aclose()
    with trio.fail_after(DEADLINE), pytest.raises(ConnectError):
        async with WebsocketTransport().open_connection(f"ws://127.0.0.1:{port}", timeout=DIAL):
            pass  # pragma: no cover


async def test_invalid_address_and_wrong_path_fail_to_connect() -> None:
    transport = WebsocketTransport()
    with pytest.raises(ConnectError, match="ws://"):
        async with transport.open_connection("mem://b", timeout=DIAL):
            pass  # pragma: no cover
    async with serving(transport, address="ws://127.0.0.1:0/replica") as address:
        assert address.endswith("/replica")
        with pytest.raises(ConnectError, match="404"):
            async with transport.open_connection(address.removesuffix("/replica"), timeout=DIAL):
                pass  # pragma: no cover
        async with transport.open_connection(address, timeout=DIAL) as conn:
            await conn.send(b"right path")
            assert await conn.receive() == b"right path"
    assert transport.counters.handshake_failures == 1


# --- TLS -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def server_context(ca: trustme.CA, *, require_client_cert: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    if require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
        ca.configure_trust(context)
    return context


def client_context(ca: trustme.CA | None, *, cert_from: trustme.CA | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if ca is not None:
        ca.configure_trust(context)
    if cert_from is not None:
        cert_from.issue_cert("client.example").configure_cert(context)
    return context


async def test_wss_round_trip(ca: trustme.CA) -> None:
    server = WebsocketTransport(server_ssl=server_context(ca))
    client = WebsocketTransport(client_ssl=client_context(ca))
    async with serving(server, address="wss://127.0.0.1:0") as address:
        assert address.startswith("wss://127.0.0.1:")
        async with client.open_connection(address, timeout=DIAL) as conn:
            await conn.send(b"secret")
            assert await conn.receive() == b"secret"


async def test_ws_to_a_wss_listener_hints_at_tls(ca: trustme.CA) -> None:
    """Issue 21: dialing ws:// where the listener expects TLS said nothing about TLS."""
    server = WebsocketTransport(server_ssl=server_context(ca))
    async with serving(server, address="wss://127.0.0.1:0") as address:
        plain = "ws://" + address.removeprefix("wss://")
        with pytest.raises(ConnectError, match=r"dial wss://127\.0\.0\.1:"):
            async with WebsocketTransport().open_connection(plain, timeout=DIAL):
                pass


async def test_a_path_http_cannot_carry_is_a_connect_error() -> None:
    async with serving(WebsocketTransport()) as address:
        with pytest.raises(ConnectError, match="cannot ask for the upgrade"):
            async with WebsocketTransport().open_connection(address + "/a b", timeout=DIAL):
                pass


async def test_wss_refuses_an_untrusted_server(ca: trustme.CA) -> None:
    server = WebsocketTransport(server_ssl=server_context(ca))
    client = WebsocketTransport(client_ssl=client_context(trustme.CA()))
    async with serving(server, address="wss://127.0.0.1:0") as address:
        with pytest.raises(ConnectError, match="TLS"):
            async with client.open_connection(address, timeout=DIAL):
                pass  # pragma: no cover
        assert server.counters.accepted == 0


async def test_wss_client_certificate_required(ca: trustme.CA) -> None:
    server = WebsocketTransport(server_ssl=server_context(ca, require_client_cert=True))
    anonymous = WebsocketTransport(client_ssl=client_context(ca))
    stranger = WebsocketTransport(client_ssl=client_context(ca, cert_from=trustme.CA()))
    member = WebsocketTransport(client_ssl=client_context(ca, cert_from=ca))
    async with serving(server, address="wss://127.0.0.1:0") as address:
        for refused in (anonymous, stranger):
            with pytest.raises(ConnectError):
                async with refused.open_connection(address, timeout=DIAL):
                    pass  # pragma: no cover
        async with member.open_connection(address, timeout=DIAL) as conn:
            await conn.send(b"member")
            assert await conn.receive() == b"member"
    assert server.counters.accepted == 1
    assert server.counters.handshake_failures == 2


async def test_wss_listener_needs_a_context() -> None:
    with pytest.raises(ValueError, match="server_ssl"):
        await WebsocketTransport().serve("wss://127.0.0.1:0", echo)


async def test_a_dial_failing_as_its_owner_is_cancelled_raises_connect_error_not_a_group(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A node closing while its dials time out: the dial's ConnectError and the owner's
    # cancellation land together. The owner must see a ConnectError it can catch (it used
    # to see an ExceptionGroup, which escaped `open_node`, when a reader task ran beside
    # the dial).
    transport = WebsocketTransport()
    owner = trio.CancelScope()

    async def failing_dial(self: WebsocketTransport, target: object, time_limit: float) -> None:
        await trio.lowlevel.checkpoint()
        owner.cancel()
        raise ConnectError("no websocket connection after 5.0 s")

    monkeypatch.setattr(WebsocketTransport, "_dial", failing_dial)
    caught = False
    with owner:
        with pytest.raises(ConnectError):
            async with transport.open_connection("ws://127.0.0.1:9", timeout=5):
                pass
        caught = True
    assert caught
