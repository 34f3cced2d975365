"""Flow control over real websockets on 127.0.0.1: writers slowed, members that flood bounded.

Figures (rates, RMR, memory, the share of honest deliveries kept during a flood) are measured
by ``bench/flow.py``, not asserted here; these tests check what must hold whatever the
machine's speed: nothing lost, a peer that ignores its credit failed, honest traffic served.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from trio_replica.core.events import Delivery
from trio_replica.core.messages import Gossip, Message, MessageId, Peer, Role
from trio_replica.core.wire import encode_frame, encode_payload
from trio_replica.node import Node
from trio_replica.runtime.config import NodeConfig, ReplicaConfig
from trio_replica.runtime.handshake import Credentials, handshake_as_dialer
from trio_replica.runtime.link import Link
from trio_replica.runtime.linkconfig import LinkConfig
from trio_replica.runtime.replica_api import Add
from trio_replica.runtime.stats import NodeStats
from trio_replica.transports.base import TransportClosed
from trio_replica.transports.websocket import WebsocketTransport

from .harness import Cluster, overlay_ok, wait_until
from .test_flow_memory import KeySet

NO_ANTI_ENTROPY = ReplicaConfig(anti_entropy_interval=3600)


async def _cluster(c: Cluster, n: int, prefix: str) -> list[Node]:
    seed = await c.start(f"{prefix}0")
    for i in range(1, n):
        await c.start(f"{prefix}{i}", [seed.address])
    with trio.fail_after(60):
        await wait_until(lambda: overlay_ok(c.live(), min_active=min(2, n - 1)), poll=0.02)
    return c.live()


async def test_20000_updates_over_websockets_are_all_merged() -> None:
    async with trio.open_nursery() as nursery:
        a, b = await _cluster(Cluster(nursery), 2, "u")
        sender, receiver = KeySet(), KeySet()
        replica = await a.open_replica("r", sender)
        await b.open_replica("r", receiver)
        for i in range(20_000):
            await replica.broadcast_update(Add(i, i))
        with trio.fail_after(120):
            await wait_until(lambda: len(receiver.keys) == 20_000, poll=0.05)
        assert a.stats()["drops"] == {} and b.stats()["drops"] == {}
        nursery.cancel_scope.cancel()


async def test_ten_writers_as_fast_as_put_returns_reach_every_node() -> None:
    base = NodeConfig(name="x", replica=NO_ANTI_ENTROPY)
    async with trio.open_nursery() as nursery:
        nodes = await _cluster(Cluster(nursery, base=base), 10, "w")
        maps = [await node.open_map("kv") for node in nodes]

        async def write(i: int) -> None:
            for k in range(100):
                await maps[i].put(f"{i}/{k}", k)

        async with trio.open_nursery() as writers:
            for i in range(len(maps)):
                writers.start_soon(write, i)
        # Without anti-entropy (an hour away): only the broadcasts can have brought them.
        with trio.fail_after(60):
            await wait_until(lambda: all(len(m) == 1000 for m in maps), poll=0.05)
        for node in nodes:
            assert node.stats()["broadcast"]["reported_lost"] == 0
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def member_link(node: Node, name: str) -> AsyncIterator[Any]:
    """An authenticated connection to `node` as a cluster member called `name` (it knows
    the secret): yields the raw connection after the handshake."""
    transport = WebsocketTransport()
    creds = Credentials(node.config.cluster, node.config.secret or b"", Peer(name, "ws://x:1"))
    async with transport.open_connection(node.address, timeout=5) as conn:
        await handshake_as_dialer(conn, creds, role=Role.NODE, timeout=5)
        yield conn


def flood_gossip(n: int, size: int = 8) -> Gossip:
    payload = encode_payload("x" * size, max_size=1 << 20)
    return Gossip(MessageId("flooder", n, n), 1, "flood", payload)


async def _paced_deliveries(
    sender: Node, receiver: Node, count: int, flood: Any, flood_done: trio.Event | None = None
) -> list[int]:
    """`sender` broadcasts `count` messages 20 ms apart while `flood()` runs; what
    `receiver` delivered of them. With `flood_done`, the flood is not cut before it is set."""
    got: list[int] = []
    async with receiver.subscribe("honest") as sub, trio.open_nursery() as nursery:

        async def follow() -> None:
            async for item in sub:
                if isinstance(item, Delivery):
                    got.append(item.payload)

        nursery.start_soon(follow)
        nursery.start_soon(flood)
        # The honest writer must not be starved either: its sends are under the guard too
        # (a flood held to its limit only downstream of its first hop kept it waiting for
        # 20-200 s).
        with trio.fail_after(30):
            for i in range(count):
                await sender.broadcast("honest", i)
                await trio.sleep(0.02)
            await wait_until(lambda: len(got) == count, poll=0.05)
            if flood_done is not None:
                await flood_done.wait()
        nursery.cancel_scope.cancel()
    return got


async def test_a_member_that_ignores_its_credit_is_failed_and_honest_peers_are_served() -> None:
    async with trio.open_nursery() as nursery:
        a, b, _c = await _cluster(Cluster(nursery), 3, "f")

        flooded = trio.Event()

        async def flood() -> None:
            async with member_link(b, "flooder") as conn:
                counter = itertools.count()
                with contextlib.suppress(TransportClosed):  # b fails the link: done
                    while True:
                        frame = encode_frame([flood_gossip(next(counter)) for _ in range(200)])
                        await conn.send(frame)
            flooded.set()

        # On a loaded machine the honest deliveries may all land before b has read the
        # flooder's first frame: the flood runs until b fails its link.
        got = await _paced_deliveries(a, b, 50, flood, flooded)
        assert sorted(got) == list(range(50))
        assert b.stats()["links_closed"].get("flow_violation", 0) >= 1
        assert b.stats()["rejected"]["flow_violation"] >= 1
        nursery.cancel_scope.cancel()


async def _flood_within_credit(node: Node, size: int, count: list[int]) -> None:
    """A member sending `size`-byte gossips to `node` as fast as its credit allows."""
    async with member_link(node, "flooder") as conn:

        async def processed(link: Link, message: Message, size: int) -> None:
            if message.CREDITED:
                link.processed(size)

        link = Link(
            conn,
            Peer(node.id, node.address),
            role=Role.NODE,
            outbound=True,
            config=LinkConfig(),
            stats=NodeStats(),
            on_message=processed,
        )
        async with trio.open_nursery() as inner:
            inner.start_soon(link.run)
            for n in itertools.count():
                await link.send(flood_gossip(n, size))
                count[0] += 1


async def test_a_member_flooding_within_its_credit_does_not_starve_honest_peers() -> None:
    async with trio.open_nursery() as nursery:
        a, b, _c = await _cluster(Cluster(nursery), 3, "g")
        count = [0]

        async def flood() -> None:
            await _flood_within_credit(b, 8, count)

        got = await _paced_deliveries(a, b, 50, flood)
        assert sorted(got) == list(range(50))
        assert count[0] > 50, "the flood did not run"
        closed = b.stats()["links_closed"]
        assert "flow_violation" not in closed and "send_timeout" not in closed
        assert b.stats()["broadcast"]["unsubscribed"]["flood"] >= 1
        nursery.cancel_scope.cancel()


async def test_a_member_flooding_megabyte_payloads_does_not_starve_honest_peers() -> None:
    async with trio.open_nursery() as nursery:
        a, b, _c = await _cluster(Cluster(nursery), 3, "h")
        count = [0]

        async def flood() -> None:
            await _flood_within_credit(b, 1024 * 1024 - 64, count)

        got = await _paced_deliveries(a, b, 50, flood)
        assert sorted(got) == list(range(50))
        assert count[0] >= 5, "the flood did not run"
        # The victim still answers (status encodes within the frame limit) and holds a
        # bounded cache of those payloads.
        encode_payload(b.status(), max_size=b.config.max_payload)
        assert b.stats()["broadcast"]["cache_bytes"] <= b.config.broadcast.cache_max_bytes + (
            1 << 20
        )
        nursery.cancel_scope.cancel()
