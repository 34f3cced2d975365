"""Limits before authentication, on real sockets: a stranger's connection flood does not
keep honest nodes, control clients or scrapers out.

The flood comes from other loopback addresses (127.0.0.2 and .3: Linux routes all of
127/8 to lo), as it would from another host; the honest parties use 127.0.0.1.
"""

from __future__ import annotations

import functools
import resource
import urllib.parse

import pytest
import trio
import trio_websocket

from trio_replica.ops.metrics import metrics_registry, serve_metrics
from trio_replica.runtime.control import open_control
from trio_replica.transports.base import Refusals, remote_host

from .harness import Cluster, wait_until

PRE_UPGRADE = 2000
SILENT = 400


def _enough_descriptors(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"needs {needed} file descriptors, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


async def _get(host: str, port: int, path: str) -> bytes:
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    return data


async def test_a_connection_flood_does_not_keep_honest_parties_out() -> None:
    _enough_descriptors(2 * (PRE_UPGRADE + SILENT) + 1024)
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery)
        a = await c.start("a")
        mhost, mport = await nursery.start(
            functools.partial(serve_metrics, node=a), metrics_registry(a), "127.0.0.1", 0
        )
        url = urllib.parse.urlsplit(a.address)
        host, port = url.hostname, url.port
        assert host is not None and port is not None
        held: list[trio.abc.Stream] = []
        websockets: list[trio_websocket.WebSocketConnection] = []

        async def idle_tcp(n: int) -> None:
            for _ in range(n):
                held.append(await trio.open_tcp_stream(host, port, local_address="127.0.0.2"))

        async def silent_websocket(flood: trio.Nursery) -> None:
            stream = await trio.open_tcp_stream(host, port, local_address="127.0.0.3")
            held.append(stream)
            try:
                ws = await trio_websocket.wrap_client_stream(flood, stream, f"{host}:{port}", "/")
            except trio_websocket.HandshakeError:
                return  # refused before the upgrade: fine, the node is protecting itself
            websockets.append(ws)

        async with trio.open_nursery() as flood:
            # Idle TCP connections that never upgrade, then upgraded ones that never speak.
            with trio.fail_after(60):
                async with trio.open_nursery() as openers:
                    for _ in range(20):
                        openers.start_soon(idle_tcp, PRE_UPGRADE // 20)
                async with trio.open_nursery() as openers:
                    for _ in range(SILENT):
                        openers.start_soon(silent_websocket, flood)
            assert len(held) == PRE_UPGRADE + SILENT
            # While all of that is held: an honest node joins on its first try...
            b = await c.start("b", [a.address])
            with trio.fail_after(20):
                await wait_until(lambda: [p.id for p in a.active_view()] == ["b"])
            assert b.stats()["dial_failures"] == {}
            # ...a control session opens, and /metrics answers.
            with trio.fail_after(10):
                async with open_control(a.address) as client:
                    assert (await client.call("status"))["id"] == "a"
                reply = await _get(mhost, mport, "/metrics")
            assert (
                reply.startswith(b"HTTP/1.1 200") and b"trio_replica_connections_refused" in reply
            )
            refused = a.stats()["connections_refused"]
            assert refused.get("pending_per_host", 0) >= PRE_UPGRADE - 64 * 2
            flood.cancel_scope.cancel()
        for stream in held:
            await trio.aclose_forcefully(stream)
        nursery.cancel_scope.cancel()


async def test_slow_metrics_clients_get_a_few_slots_and_a_short_deadline() -> None:
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery)
        a = await c.start("a")
        mhost, mport = await nursery.start(
            functools.partial(serve_metrics, node=a), metrics_registry(a), "127.0.0.1", 0
        )
        drippers = []
        for _ in range(20):
            stream = await trio.open_tcp_stream(mhost, mport, local_address="127.0.0.4")
            await stream.send_all(b"G")
            drippers.append(stream)
        with trio.fail_after(10):
            reply = await _get(mhost, mport, "/metrics")
        assert reply.startswith(b"HTTP/1.1 200")
        # A request whose lines end with a bare LF is answered (not held until the header
        # deadline and closed unanswered, which is what an unrecognised head gets).
        stream = await trio.open_tcp_stream(mhost, mport)
        with trio.fail_after(10):
            await stream.send_all(b"GET /healthz HTTP/1.0\n\n")
            data = await stream.receive_some(65536)
        assert data.startswith(b"HTTP/1.1 200")
        await stream.aclose()
        with trio.fail_after(5):
            await wait_until(
                lambda: a.stats()["connections_refused"].get("metrics_slow_request", 0) >= 4
            )
        assert a.stats()["connections_refused"].get("metrics_per_client", 0) >= 16
        for stream in drippers:
            await stream.aclose()
        nursery.cancel_scope.cancel()


def test_remote_hosts_are_read_from_connection_names() -> None:
    assert remote_host("ws://10.0.0.1:4000") == "10.0.0.1"
    # One IPv6 holder usually has a whole /64: its addresses count as one.
    assert remote_host("ws://[2001:db8::1]:4000") == remote_host("ws://[2001:db8::2]:1")
    assert remote_host("ws://[::ffff:10.0.0.1]:4000") == "10.0.0.1"
    assert remote_host("mem://b") == "b"


async def test_refusals_are_counted_each_and_logged_once_a_period(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import logging

    refusals = Refusals(logging.getLogger("test.refusals"), "listener", period=10.0)
    with caplog.at_level(logging.WARNING, logger="test.refusals"):
        for _ in range(500):
            refusals.refuse("busy", "ws://1.2.3.4:5")
    assert refusals.counts["busy"] == 500
    assert len(caplog.records) == 1


async def test_handshake_slots_are_shared_per_address_and_clients_move_to_their_own() -> None:
    import logging

    from trio_replica.core.messages import Hello
    from trio_replica.runtime.admission import Admission
    from trio_replica.runtime.linkconfig import LinkConfig
    from trio_replica.runtime.stats import NodeStats

    def hello(role: str) -> Hello:
        return Hello(4, "c", "x", "", role, b"n" * 32, b"k" * 32, b"", b"", b"")

    stats = NodeStats()
    config = LinkConfig(max_handshakes=3, max_handshakes_per_host=2, max_client_handshakes=1)
    admission = Admission(config, stats, Refusals(logging.getLogger("test.slots"), "node"))
    a1, a2 = admission.enter("ws://10.0.0.1:1"), admission.enter("ws://10.0.0.1:2")
    assert a1 is not None and a2 is not None
    assert admission.enter("ws://10.0.0.1:3") is None  # the address's two are taken
    b1 = admission.enter("ws://10.0.0.2:1")
    assert b1 is not None
    assert admission.enter("ws://10.0.0.3:1") is None  # all three shared slots taken
    # A client's hello moves it to the client slot, which frees a shared one...
    assert a1.admit(hello("client")) is None and admission.shared == 2
    c1 = admission.enter("ws://10.0.0.3:1")
    assert c1 is not None
    # ...and the one client slot is then taken: the next client is refused.
    assert a2.admit(hello("client")) == "client_slots"
    assert a2.admit(hello("node")) is None
    for slot in (a1, a2, b1, c1, a1):  # releasing twice is harmless
        slot.release()
    assert (admission.shared, admission.clients, dict(admission.by_host)) == (0, 0, {})
    assert stats.handshakes_refused == {"host_slots": 1, "too_many": 1}
