"""Broadcast over real websockets on 127.0.0.1: every node's broadcasts reach every node once."""

from __future__ import annotations

import collections

import trio

from trio_replica.core.events import Delivery

from .harness import Cluster, overlay_ok, wait_until


async def test_broadcasts_from_every_node_reach_every_node_exactly_once() -> None:
    n = 10
    got: dict[str, collections.Counter[tuple[str, int]]] = collections.defaultdict(
        collections.Counter
    )
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery)
        seed = await c.start("t0")
        for i in range(1, n):
            await c.start(f"t{i}", [seed.address])
        with trio.fail_after(30):
            await wait_until(lambda: overlay_ok(c.live(), min_active=2), poll=0.02)
        nodes = c.live()

        async def follow(node_id: str, task_status: trio.TaskStatus[None]) -> None:
            async with c.nodes[node_id].subscribe("ws-test", include_own=True) as sub:
                task_status.started()
                async for item in sub:
                    assert isinstance(item, Delivery)
                    got[node_id][(item.origin, item.payload)] += 1

        async with trio.open_nursery() as followers:
            for node in nodes:
                await followers.start(follow, node.id)
            for round_ in range(5):
                for node in nodes:
                    await node.broadcast("ws-test", round_)
            expected = {(node.id, r) for node in nodes for r in range(5)}
            with trio.fail_after(15):
                await wait_until(
                    lambda: all(set(got[node.id]) == expected for node in nodes), poll=0.02
                )
            await trio.sleep(1)  # late duplicates, if any, would show up now
            followers.cancel_scope.cancel()
        for node in nodes:
            assert set(got[node.id]) == expected
            assert max(got[node.id].values()) == 1, node.id
        received = sum(node.stats()["broadcast"]["gossip_received"] for node in nodes)
        rmr = received / (len(expected) * (n - 1)) - 1
        print(f"\n{n} websocket nodes, {len(expected)} broadcasts: delivered once, RMR {rmr:.3f}")
        nursery.cancel_scope.cancel()
