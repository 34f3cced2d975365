"""Direct messages (issue 16): one-way sends and requests between any two nodes, also
nodes that are not neighbours; clear errors for unknown peers, missing handlers, failing
handlers and timeouts; malformed payloads refused and counted."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import trio
import trio.testing

from trio_replica.core.messages import Direct, Peer
from trio_replica.errors import NoHandler, RequestFailed, RequestTimeout, UnknownPeer
from trio_replica.transports.memory import MemoryNetwork

from .harness import Cluster, overlay_ok, wait_until


async def _cluster(nursery: trio.Nursery, n: int, seed: int) -> list[Any]:
    c = Cluster(nursery, MemoryNetwork(seed=seed))
    first = await c.start("d0")
    nodes = [first] + [await c.start(f"d{i}", [first.address]) for i in range(1, n)]
    with trio.fail_after(120):
        await wait_until(lambda: overlay_ok(nodes, min_active=2))
    return nodes


async def test_requests_between_any_two_of_50_nodes_also_when_not_neighbours(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        nodes = await _cluster(nursery, 50, seed=80)
        stack = __import__("contextlib").ExitStack()
        for node in nodes:

            async def echo(sender: Peer, payload: Any, me: str = node.id) -> Any:
                return {"from": sender.id, "at": me, "got": payload}

            stack.enter_context(node.serve("echo", echo))
        with stack:
            pairs = [
                (a, b)
                for a, b in itertools.permutations(nodes, 2)
                if not any(p.id == b.id for p in a.active_view())
            ][:200]
            assert len(pairs) == 200  # all of them between nodes that are not neighbours
            for a, b in pairs:
                # By id: the address comes from what `a` knows, or the peer as given.
                target = b.id if a.known_peer(b.id) is not None else b.me
                answer = await a.request(target, "echo", [1, "x"])
                assert answer == {"from": a.id, "at": b.id, "got": [1, "x"]}
            # To itself: the handler runs directly.
            assert (await nodes[0].request(nodes[0].id, "echo", 7))["at"] == nodes[0].id
        nursery.cancel_scope.cancel()


async def test_one_way_sends_all_arrive(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        a, b = await _cluster(nursery, 2, seed=81)
        got: list[int] = []

        async def collect(sender: Peer, payload: Any) -> None:
            got.append(payload)

        with b.serve("log", collect):
            for i in range(100):
                await a.send(b.id, "log", i)
            with trio.fail_after(10):
                await wait_until(lambda: len(got) == 100)
        # Handlers run concurrently, each in its own task: no order between them.
        assert sorted(got) == list(range(100))
        nursery.cancel_scope.cancel()


async def test_errors_are_clear(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        a, b = await _cluster(nursery, 2, seed=82)

        async def slow(sender: Peer, payload: Any) -> Any:
            await trio.sleep_forever()

        async def broken(sender: Peer, payload: Any) -> Any:
            raise ValueError("bad input")

        async def unsendable(sender: Peer, payload: Any) -> Any:
            return object()

        async def fine(sender: Peer, payload: Any) -> Any:
            return "ok"

        with (
            b.serve("slow", slow),
            b.serve("broken", broken),
            b.serve("odd", unsendable),
            b.serve("fine", fine),
        ):
            with pytest.raises(UnknownPeer, match="no address known"):
                await a.request("nobody", "slow", 1)
            with pytest.raises(NoHandler, match="no handler for 'missing'"):
                await a.request(b.id, "missing", 1)
            with pytest.raises(RequestFailed, match="ValueError: bad input"):
                await a.request(b.id, "broken", 1)
            with pytest.raises(RequestFailed, match="cannot travel"):
                await a.request(b.id, "odd", 1)
            started = trio.current_time()
            with pytest.raises(RequestTimeout):
                await a.request(b.id, "slow", 1, timeout=2.0)
            assert trio.current_time() - started == pytest.approx(2.0, abs=0.1)
            with pytest.raises(TypeError):
                await a.request(b.id, "broken", object())  # not plain data: never sent
            with pytest.raises(ValueError, match="reserved"), a.serve("_registry", broken):
                pass
            with pytest.raises(ValueError, match="already registered"), b.serve("slow", slow):
                pass
            # Still serving after all that.
            assert await a.request(b.id, "fine", 1) == "ok"
        nursery.cancel_scope.cancel()


async def test_a_malformed_payload_is_refused_counted_and_answered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        a, b = await _cluster(nursery, 2, seed=83)

        async def echo(sender: Peer, payload: Any) -> Any:
            return payload

        with b.serve("echo", echo):
            # Raw bytes that are not CBOR plain data, straight onto the link.
            reply_ids: list[int] = []
            send, receive = trio.open_memory_channel[Any](1)
            a.direct._pending[999] = (b.id, send)
            await a.runtime.send_message(b.me, Direct("echo", 999, b"\xff\xff"))
            with trio.fail_after(10):
                reply = await receive.receive()
            reply_ids.append(reply.request_id)
            assert not reply.ok and reply_ids == [999]
            assert any(k.startswith("direct_") for k in b.stats()["rejected"])
            assert await a.request(b.id, "echo", "fine") == "fine"
        nursery.cancel_scope.cancel()


async def test_busy_callbacks_long_errors_and_requests_to_itself(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    import trio_replica.runtime.direct as direct

    monkeypatch.setattr(direct, "MAX_RUNNING", 2)
    async with trio.open_nursery() as nursery:
        a, b = await _cluster(nursery, 2, seed=84)
        b.direct._running = trio.Semaphore(direct.MAX_RUNNING)
        release = trio.Event()

        async def hold(sender: Peer, payload: Any) -> Any:
            await release.wait()
            return "held"

        async def echo_error(sender: Peer, payload: Any) -> Any:
            raise ValueError(payload)

        async def ask_back(sender: Peer, payload: Any) -> Any:
            # A handler that calls back into its sender: no deadlock.
            return await b.request(sender.id, "pong", payload)

        async def pong(sender: Peer, payload: Any) -> Any:
            return ["pong", payload]

        with (
            b.serve("hold", hold),
            b.serve("error", echo_error),
            b.serve("ask", ask_back),
            a.serve("pong", pong),
        ):
            assert await a.request(b.id, "ask", 1) == ["pong", 1]
            # A failing handler whose message echoes a large input: cut, the node lives.
            with pytest.raises(RequestFailed, match=r"ValueError: x+\.\.\.$"):
                await a.request(b.id, "error", "x" * 5000)
            async with trio.open_nursery() as inner:
                for _ in range(2):
                    inner.start_soon(a.request, b.id, "hold", None)
                with trio.fail_after(10):  # both handlers are running
                    await wait_until(lambda: b.direct._running.value == 0)
                # Both slots held: answered "busy" at once, and other traffic goes on.
                with pytest.raises(RequestFailed, match="busy"):
                    await a.request(b.id, "hold", None)
                assert await b.request(a.id, "pong", 2) == ["pong", 2]
                release.set()
            assert b.stats()["drops"].get("direct_busy") == 1

        async def never(sender: Peer, payload: Any) -> Any:
            await trio.sleep_forever()

        with a.serve("never", never), pytest.raises(RequestTimeout):
            await a.request(a.id, "never", None, timeout=1.0)
        with a.serve("bad", echo_error), pytest.raises(RequestFailed, match="ValueError"):
            await a.request(a.id, "bad", "boom")
        nursery.cancel_scope.cancel()
