"""The in-memory network: order, latency, loss, partitions, kill, backpressure, close.

Everything runs on the virtual clock (pytest-trio's ``autojump_clock``), so latencies and
timeouts below are simulated seconds and cost no real time.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_replica.errors import MessageTooLarge
from trio_replica.transports import (
    ConnectError,
    Connection,
    MemoryNetwork,
    MemoryTransport,
    Transport,
    TransportClosed,
)

TIMEOUT = 5.0


async def echo(conn: Connection) -> None:
    while True:
        try:
            frame = await conn.receive()
        except TransportClosed:
            return
        await conn.send(frame)


@asynccontextmanager
async def serving(
    transport: MemoryTransport, handler: Callable[[Connection], Awaitable[None]] = echo
) -> AsyncIterator[str]:
    async with trio.open_nursery() as nursery:
        address = await nursery.start(transport.serve, transport.address, handler)
        yield address
        nursery.cancel_scope.cancel()


def frames(n: int) -> list[bytes]:
    return [i.to_bytes(4, "big") for i in range(n)]


async def test_satisfies_the_transport_protocol() -> None:
    transport: Transport = MemoryNetwork().transport("a")
    assert transport.schemes == ("mem",)


async def test_round_trip_in_order(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork(seed=1)
    async with (
        serving(net.transport("b")) as address,
        net.transport("a").open_connection(address, timeout=TIMEOUT) as conn,
    ):
        assert address == "mem://b"
        assert conn.remote == "mem://b"
        for frame in frames(300):
            await conn.send(frame)
            assert await conn.receive() == frame
        # Pipelined: many frames in flight at once still arrive in order.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_all, conn, frames(200))
            assert [await conn.receive() for _ in range(200)] == frames(200)
    assert net.counters.frames_delivered == 2 * 500
    assert net.counters.bytes_delivered == 2 * 500 * 4


async def hold(conn: Connection) -> None:
    await trio.sleep_forever()


async def send_all(conn: Connection, items: list[bytes]) -> None:
    for item in items:
        await conn.send(item)


async def test_latency_is_applied_per_direction(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork(latency=0.25)
    async with (
        serving(net.transport("b")) as address,
        net.transport("a").open_connection(address, timeout=TIMEOUT) as conn,
    ):
        start = trio.current_time()
        await conn.send(b"x")
        assert await conn.receive() == b"x"
        assert trio.current_time() - start == pytest.approx(0.5)  # there and back

        net.set_link("a", "b", latency=1.0)
        start = trio.current_time()
        await conn.send(b"y")
        assert await conn.receive() == b"y"
        assert trio.current_time() - start == pytest.approx(2.0)
        assert net.link("b", "a").latency == 1.0


async def test_dial_takes_a_round_trip(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork(latency=0.5)
    async with serving(net.transport("b")) as address:
        start = trio.current_time()
        async with net.transport("a").open_connection(address, timeout=TIMEOUT):
            assert trio.current_time() - start == pytest.approx(1.0)


async def test_fifo_kept_when_latency_drops(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork(latency=1.0)
    received: list[bytes] = []
    both = trio.Event()

    async def collect(conn: Connection) -> None:
        received.extend([await conn.receive(), await conn.receive()])
        both.set()

    async with (
        serving(net.transport("b"), collect) as address,
        net.transport("a").open_connection(address, timeout=TIMEOUT) as conn,
    ):
        start = trio.current_time()
        await conn.send(b"slow")
        net.set_link("a", "b", latency=0.001)
        await conn.send(b"fast")
        await both.wait()
        assert received == [b"slow", b"fast"]
        assert trio.current_time() - start >= 1.0


async def test_loss_is_seeded_and_near_its_rate(autojump_clock: trio.testing.MockClock) -> None:
    async def run(seed: int) -> list[bytes]:
        net = MemoryNetwork(seed=seed, loss=0.2)
        got: list[bytes] = []
        done = trio.Event()

        async def collect(conn: Connection) -> None:
            while True:
                frame = await conn.receive()
                if frame == b"end":
                    done.set()
                    return
                got.append(frame)

        async with (
            serving(net.transport("b"), collect) as address,
            net.transport("a").open_connection(address, timeout=TIMEOUT) as conn,
        ):
            for frame in frames(2000):
                await conn.send(frame)
            net.loss = 0.0
            await conn.send(b"end")
            await done.wait()
        counters = net.counters
        assert counters.frames_lost + len(got) == 2000
        assert counters.frames_delivered == len(got) + 1
        assert counters.bytes_lost == 4 * counters.frames_lost
        assert got == sorted(got)  # loss never reorders
        return got

    first = await run(seed=7)
    assert 1500 <= len(first) <= 1700  # 1600 expected; ~18 standard deviations of slack
    assert await run(seed=7) == first
    assert await run(seed=8) != first


async def test_per_link_loss_override(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork()
    net.set_link("a", "b", loss=1.0)
    async with (
        serving(net.transport("b"), hold) as address,
        net.transport("a").open_connection(address, timeout=TIMEOUT) as conn,
    ):
        for frame in frames(10):
            await conn.send(frame)
    assert net.counters.frames_lost == 10
    assert net.link("a", "b").latency == net.latency
    net.clear_link("a", "b")
    assert net.link("a", "b").loss == 0.0


async def test_partition_black_holes_then_heals(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork()
    async with (
        serving(net.transport("b")) as address,
        net.transport("a").open_connection(address, timeout=TIMEOUT) as conn,
    ):
        await conn.send(b"before")
        assert await conn.receive() == b"before"

        net.partition(["a"], ["b", "c"])
        assert not net.reachable("a", "b")
        assert net.reachable("b", "c")
        await conn.send(b"lost")  # the connection looks open: no error
        with trio.move_on_after(60) as waited:
            await conn.receive()
        assert waited.cancelled_caught
        assert net.counters.frames_partitioned == 1

        net.heal()
        await conn.send(b"after")
        assert await conn.receive() == b"after"


async def test_frames_in_flight_are_lost_when_a_partition_starts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork(latency=1.0)
    async with (
        serving(net.transport("b")) as address,
        net.transport("a").open_connection(address, timeout=TIMEOUT) as conn,
    ):
        await conn.send(b"in flight")
        net.partition(["a"])  # b is in the implicit group of unnamed hosts
        await trio.sleep(1.5)
        net.heal()
        await conn.send(b"next")
        assert await conn.receive() == b"next"
    assert net.counters.frames_partitioned == 1


async def test_dial_across_partition_times_out(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork()
    async with serving(net.transport("b")) as address:
        net.partition(["a"], ["b"])
        start = trio.current_time()
        with pytest.raises(ConnectError, match="timed out"):
            async with net.transport("a").open_connection(address, timeout=3.0):
                pass  # pragma: no cover
        assert trio.current_time() - start == pytest.approx(3.0)
        net.heal()
        async with net.transport("a").open_connection(address, timeout=3.0) as conn:
            await conn.send(b"ok")
            assert await conn.receive() == b"ok"


async def test_partition_groups_must_not_overlap() -> None:
    with pytest.raises(ValueError, match="more than one"):
        MemoryNetwork().partition(["a", "b"], ["b"])


async def test_kill_resets_connections_and_refuses_dials(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork(latency=0.1)
    server_side_closed = trio.Event()

    async def handler(conn: Connection) -> None:
        with pytest.raises(TransportClosed, match="reset"):
            await conn.receive()
        server_side_closed.set()

    b = net.transport("b")
    async with trio.open_nursery() as nursery:
        address = await nursery.start(b.serve, b.address, handler)
        async with net.transport("a").open_connection(address, timeout=TIMEOUT) as conn:
            await conn.send(b"queued")  # in flight when the crash happens: discarded
            start = trio.current_time()
            net.kill("b")
            with pytest.raises(TransportClosed, match="reset"):
                await conn.receive()
            with pytest.raises(TransportClosed, match="reset"):
                await conn.send(b"x")
            assert trio.current_time() == start  # promptly, not after a timeout
            await server_side_closed.wait()
        assert not net.is_listening("b")
        with pytest.raises(ConnectError, match="refused"):
            async with net.transport("a").open_connection(address, timeout=TIMEOUT):
                pass  # pragma: no cover
        assert net.counters.connects_refused == 1

        # The crashed process restarts: the address can be bound again.
        await nursery.start(b.serve, b.address, echo)
        async with net.transport("a").open_connection(address, timeout=TIMEOUT) as conn:
            await conn.send(b"again")
            assert await conn.receive() == b"again"
        nursery.cancel_scope.cancel()


async def test_kill_is_prompt_across_a_partition(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork()
    async with (
        serving(net.transport("b")) as address,
        net.transport("a").open_connection(address, timeout=TIMEOUT) as conn,
    ):
        net.partition(["a"], ["b"])
        net.kill("a")
        with pytest.raises(TransportClosed):
            await conn.receive()


async def test_backpressure_blocks_the_sender(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork(capacity=8)
    reading = trio.Event()

    async def slow_reader(conn: Connection) -> None:
        await reading.wait()
        await echo(conn)

    async with (
        serving(net.transport("b"), slow_reader) as address,
        net.transport("a").open_connection(address, timeout=TIMEOUT) as conn,
    ):
        sent = 0
        with trio.move_on_after(30) as blocked:
            for frame in frames(100):
                await conn.send(frame)
                sent += 1
        assert blocked.cancelled_caught
        assert sent == 8
        # A cancelled send leaves the memory connection usable.
        reading.set()
        await conn.send(b"more")
        assert [await conn.receive() for _ in range(9)] == [*frames(8), b"more"]


async def test_cancelled_receive_loses_nothing(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork(latency=1.0)
    async with (
        serving(net.transport("b")) as address,
        net.transport("a").open_connection(address, timeout=TIMEOUT) as conn,
    ):
        await conn.send(b"x")
        with trio.move_on_after(1.5):  # cancelled while waiting for the due time
            await conn.receive()
        assert await conn.receive() == b"x"


async def test_graceful_close(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork(latency=0.5)
    got: list[bytes] = []
    ended = trio.Event()

    async def collect(conn: Connection) -> None:
        try:
            while True:
                got.append(await conn.receive())
        except TransportClosed as exc:
            assert "closed by mem://a" in str(exc)
            with pytest.raises(TransportClosed, match="closed by"):
                await conn.send(b"too late")
            ended.set()

    async with serving(net.transport("b"), collect) as address:
        async with net.transport("a").open_connection(address, timeout=TIMEOUT) as conn:
            for frame in frames(3):
                await conn.send(frame)
            await conn.aclose()
            await conn.aclose()  # idempotent
            with pytest.raises(TransportClosed, match="closed locally"):
                await conn.send(b"x")
            with pytest.raises(TransportClosed, match="closed locally"):
                await conn.receive()
        await ended.wait()
    assert got == frames(3)


async def test_handler_exception_keeps_listener(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork()
    calls = 0

    async def flaky(conn: Connection) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        await echo(conn)

    async with serving(net.transport("b"), flaky) as address:
        async with net.transport("a").open_connection(address, timeout=TIMEOUT) as conn:
            with pytest.raises(TransportClosed):
                await conn.receive()
        async with net.transport("a").open_connection(address, timeout=TIMEOUT) as conn:
            await conn.send(b"still serving")
            assert await conn.receive() == b"still serving"
    assert net.counters.handler_errors == 1


async def test_cancelling_serve_unbinds_and_ends_handlers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork()
    async with (
        serving(net.transport("b")) as address,
        net.transport("a").open_connection(address, timeout=TIMEOUT) as conn,
    ):
        assert net.is_listening("b")
    assert not net.is_listening("b")
    # The handler's end of `conn` was closed when serve was cancelled.
    with pytest.raises(TransportClosed):
        await conn.receive()


async def test_addresses_and_limits_are_checked(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork(max_frame=100)
    a = net.transport("a")
    assert net.transport("a") is a
    with pytest.raises(ConnectError, match="mem://"):
        async with a.open_connection("ws://b:1", timeout=TIMEOUT):
            pass  # pragma: no cover
    async with trio.open_nursery() as nursery:
        with pytest.raises(ValueError, match="cannot listen"):
            await nursery.start(a.serve, "mem://b", echo)
        await nursery.start(a.serve, "mem://a", echo)
        with pytest.raises(OSError, match="already bound"):
            await nursery.start(a.serve, "mem://a", echo)
        async with a.open_connection("mem://a", timeout=TIMEOUT) as conn:
            with pytest.raises(MessageTooLarge):
                await conn.send(bytes(101))
            await conn.send(bytes(100))
            assert await conn.receive() == bytes(100)
        nursery.cancel_scope.cancel()
    with pytest.raises(ValueError):
        MemoryNetwork(loss=1.5)
    with pytest.raises(ValueError):
        MemoryNetwork(latency=-1)


async def test_two_hundred_nodes(autojump_clock: trio.testing.MockClock) -> None:
    """200 hosts, 10 dialed connections each, a few frames each way on every connection."""
    net = MemoryNetwork(seed=3, latency=0.01)
    rng = random.Random(3)
    hosts = [f"n{i}" for i in range(200)]
    echoed = 0

    async def dial_and_talk(src: str, dst: str) -> None:
        nonlocal echoed
        async with net.transport(src).open_connection(f"mem://{dst}", timeout=TIMEOUT) as conn:
            for frame in frames(5):
                await conn.send(frame)
            for frame in frames(5):
                assert await conn.receive() == frame
                echoed += 1

    async with trio.open_nursery() as servers:
        for host in hosts:
            await servers.start(net.transport(host).serve, f"mem://{host}", echo)
        async with trio.open_nursery() as clients:
            for src in hosts:
                for dst in rng.sample([h for h in hosts if h != src], 10):
                    clients.start_soon(dial_and_talk, src, dst)
        servers.cancel_scope.cancel()
    assert echoed == 200 * 10 * 5
    assert net.counters.frames_delivered == 2 * echoed


@settings(max_examples=30, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.floats(0.0, 2.0), st.floats(0.0, 0.5), st.binary(max_size=8)),
        min_size=1,
        max_size=40,
    ),
    loss=st.sampled_from([0.0, 0.3]),
    seed=st.integers(0, 1000),
)
def test_delivery_is_an_ordered_subsequence(
    steps: list[tuple[float, float, bytes]], loss: float, seed: int
) -> None:
    """Whatever the latency changes and pauses, frames arrive in order; none without loss."""

    async def main() -> list[bytes]:
        net = MemoryNetwork(seed=seed, loss=loss)
        got: list[bytes] = []

        async def collect(conn: Connection) -> None:
            while True:
                got.append(await conn.receive())

        async with (
            serving(net.transport("b"), collect) as address,
            net.transport("a").open_connection(address, timeout=TIMEOUT) as conn,
        ):
            for latency, pause, payload in steps:
                net.set_link("a", "b", latency=latency)
                await conn.send(payload)
                await trio.sleep(pause)
            await trio.sleep(10)
        return got

    sent = [payload for _, _, payload in steps]
    got = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    if loss == 0.0:
        assert got == sent
    else:
        it = iter(sent)
        assert all(any(frame == s for s in it) for frame in got)
