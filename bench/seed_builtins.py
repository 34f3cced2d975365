"""The built-ins' figures on websocket-linked nodes, with the raw websocket beside them.

A script, not a test: ``.venv/bin/python bench/seed_builtins.py [--nodes 10]``. This module owns
the measurements of issue 16, all on N nodes in this one process over real websockets on
127.0.0.1, with the default lease timing (heartbeat 2 s, TTL 6 s):

* ``websocket``: one websocket pair, one 100-byte frame every 10 ms: one-way latency
  p50/p99 (the floor every figure below is compared with, as a ratio);
* ``registry``: 50 registrations, one every 200 ms from node i mod N: time until every node
  reports it (`Registered` on each node's event feed), p50/p99 (after an unmeasured one
  that opens the map everywhere);
* ``leader``: N candidates; the leader is killed (no goodbye) three times in a row: time
  from the kill to the next ``Elected`` and the fences (each greater);
* ``shard``: 10,000 keys: the share of keys and partitions that move when an (N+1)th
  member joins and when one dies, and the time until every member agrees;
* ``reminders``: every node a worker (a subscriber); 1,000 reminders due 5 to 35 s ahead:
  fire lateness (wall clock at the subscriber minus due time) p50/p99/max, fires and
  duplicates; then 200 due 15 to 25 s ahead whose owners (3 nodes) are killed 10 s in:
  every one fires, the late ones within the lease, duplicates counted.

Results: one JSON document on stdout and in ``bench/results/seed_builtins_<date>.json``, a
Markdown summary beside it.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any

import attrs
import trio
from common import percentiles_ms, run_header, write_results

from trio_replica import NodeConfig
from trio_replica.localcluster import run_node, wait_for_views
from trio_replica.node import Node
from trio_replica.stores.leader import Elected
from trio_replica.stores.registry import Registered
from trio_replica.stores.reminders import Fired
from trio_replica.transports.base import Connection, TransportClosed
from trio_replica.transports.websocket import WebsocketTransport

RESULTS = Path(__file__).resolve().parent / "results"


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def websocket_latency(count: int = 500, pace: float = 0.01) -> dict[str, Any]:
    """One-way latency of paced 100-byte frames over one websocket pair on 127.0.0.1."""
    transport = WebsocketTransport()
    lat: list[float] = []
    done = trio.Event()

    async def handler(conn: Connection) -> None:
        try:
            while True:
                frame = await conn.receive()
                lat.append(time.perf_counter() - float(frame[:20].decode()))
                if len(lat) == count:
                    done.set()
        except TransportClosed:
            return

    async with trio.open_nursery() as nursery:
        address = await nursery.start(transport.serve, "ws://127.0.0.1:0", handler)
        async with transport.open_connection(address, timeout=5.0) as conn:
            for _ in range(count):
                await conn.send(f"{time.perf_counter():20.9f}".encode() + b"x" * 80)
                await trio.sleep(pace)
            with trio.move_on_after(10):
                await done.wait()
        nursery.cancel_scope.cancel()
    return {"frames": len(lat), "pace_ms": pace * 1e3, "one_way": percentiles_ms(lat)}


@attrs.define
class Nodes:
    """Nodes each in a task of its own, so that one can be killed alone."""

    nursery: trio.Nursery
    nodes: dict[str, Node] = attrs.Factory(dict)
    seed: str = ""

    async def start(self, name: str) -> Node:
        seeds = (self.seed,) if self.seed else ()
        config = NodeConfig(name=name, seeds=seeds)
        node: Node = await self.nursery.start(
            run_node, config, None, trio.CancelScope(), trio.Event()
        )
        self.nodes[node.id] = node
        self.seed = self.seed or node.address
        return node

    def kill(self, node_id: str) -> None:
        self.nodes.pop(node_id).abort()

    def live(self) -> list[Node]:
        return list(self.nodes.values())


async def _until(predicate: Any, timeout: float, poll: float = 0.02) -> float:
    t0 = trio.current_time()
    with trio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110 - a bench polls what it measures
            await trio.sleep(poll)
    return trio.current_time() - t0


async def registry_run(nodes: list[Node], count: int = 50) -> dict[str, Any]:
    seen: dict[str, list[float]] = {}
    started: dict[str, float] = {}

    async def follow(node: Node, task_status: trio.TaskStatus[None]) -> None:
        async with node.registry.events("bench-*") as events:
            task_status.started()
            async for event in events:
                if isinstance(event, Registered):
                    seen.setdefault(event.registration.name, []).append(trio.current_time())

    async with trio.open_nursery() as nursery:
        for node in nodes:
            await nursery.start(follow, node)
        # Unmeasured: every node opens the registry's map (and syncs it) first, so that the
        # figures are of registrations, not of opening the map.
        for node in nodes:
            await node.registry.open()
        async with nodes[0].registry.register("warm-up"):
            await _until(lambda: all(n.registry.lookup("warm-up") for n in nodes), 30)
        async with trio.open_nursery() as holders:
            stop = trio.Event()

            async def hold(node: Node, name: str) -> None:
                async with node.registry.register(name, {"n": name}):
                    await stop.wait()

            for i in range(count):
                name = f"bench-{i}"
                started[name] = trio.current_time()
                holders.start_soon(hold, nodes[i % len(nodes)], name)
                await trio.sleep(0.2)
            await _until(lambda: all(len(seen.get(n, ())) == len(nodes) for n in started), 30)
            stop.set()
        nursery.cancel_scope.cancel()
    visible = [max(seen[n]) - started[n] for n in started]
    return {
        "registrations": count,
        "nodes": len(nodes),
        "visible_everywhere": percentiles_ms(visible),
        "samples_ms": [round(v * 1e3, 2) for v in visible],
    }


async def leader_run(cluster: Nodes, kills: int = 3) -> dict[str, Any]:
    elected: list[tuple[float, str, int]] = []

    async def stand(node: Node) -> None:
        async with node.leader("bench-db") as lead:
            async for change in lead:
                if isinstance(change, Elected):
                    elected.append((trio.current_time(), node.id, change.fence))

    failovers = []
    async with trio.open_nursery() as nursery:
        for node in cluster.live():
            nursery.start_soon(stand, node)
        await _until(lambda: elected, 30)
        await trio.sleep(8)  # settled: one leader
        for _ in range(kills):
            leader = next(n for n in cluster.live() if n.leader_of("bench-db") == n.id)
            before = len(elected)
            fence = max(f for _, n, f in elected if n == leader.id)
            killed = trio.current_time()
            cluster.kill(leader.id)
            gone = leader.id

            def replaced(gone: str = gone, since: int = before) -> bool:
                return any(n != gone for _, n, _ in elected[since:])

            await _until(replaced, 60)
            at, who, new_fence = next((t, n, f) for t, n, f in elected[before:] if n != gone)
            failovers.append(
                {
                    "killed": leader.id,
                    "new_leader": who,
                    "seconds": round(at - killed, 3),
                    "fence_greater": new_fence > fence,
                }
            )
            log(f"leader: {leader.id} killed, {who} leads after {at - killed:.2f} s")
            await trio.sleep(3)
        nursery.cancel_scope.cancel()
    return {"candidates": len(cluster.live()) + kills, "failovers": failovers}


def _owners(node: Node, keys: list[str]) -> dict[str, str | None]:
    return {k: node.shard.place(k) for k in keys}


async def shard_run(cluster: Nodes, keys: int = 10_000) -> dict[str, Any]:
    names = [f"key-{i}" for i in range(keys)]
    for node in cluster.live():
        await node.shard.open()

    def agree() -> bool:
        ids = sorted(n.id for n in cluster.live())
        return all(n.shard.members() == ids for n in cluster.live())

    await _until(agree, 60)
    first = cluster.live()[0]
    ring = first.shard.ring_size
    before = _owners(first, names)
    parts_before = {p: first.shard.partition_owners(p)[0] for p in range(ring)}
    out: dict[str, Any] = {"keys": keys, "ring_size": ring}
    n = len(cluster.live())
    newcomer = await cluster.start(f"shard-new-{n + 1}")
    await newcomer.shard.open()
    took = await _until(agree, 60)
    after = _owners(first, names)
    parts_after = {p: first.shard.partition_owners(p)[0] for p in range(ring)}
    out["join"] = {
        "members_after": n + 1,
        "keys_moved_share": round(sum(before[k] != after[k] for k in names) / keys, 4),
        "partitions_moved": sum(parts_before[p] != parts_after[p] for p in range(ring)),
        "ideal_share": round(1 / (n + 1), 4),
        "agree_after_s": round(took, 3),
    }
    victim = cluster.live()[1]
    killed = trio.current_time()
    cluster.kill(victim.id)
    await _until(agree, 60)
    took = trio.current_time() - killed
    final = _owners(first, names)
    out["death"] = {
        "members_after": n,
        "keys_moved_share": round(sum(after[k] != final[k] for k in names) / keys, 4),
        "keys_of_the_dead_share": round(sum(after[k] == victim.id for k in names) / keys, 4),
        "only_the_dead_moved": all(after[k] == final[k] or after[k] == victim.id for k in names),
        "agree_after_kill_s": round(took, 3),
    }
    return out


async def reminders_run(cluster: Nodes, count: int = 1000, killed: int = 3) -> dict[str, Any]:
    fires: list[tuple[float, str, Fired]] = []

    async def consume(node: Node) -> None:
        async with node.reminders.subscribe() as inbox:
            async for fired in inbox:
                fires.append((time.time(), node.id, fired))

    rng = random.Random(16)
    out: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        for node in cluster.live():
            await node.reminders.open()
            nursery.start_soon(consume, node)
        everyone = len(cluster.live())
        await _until(
            lambda: all(len(n.reminders.workers()) == everyone for n in cluster.live()), 30
        )
        nodes = cluster.live()
        now = time.time()
        for i in range(count):
            await nodes[i % len(nodes)].reminders.remind(f"r{i}", now + 5 + rng.uniform(0, 30), i)
        await _until(lambda: len({f.key for _, _, f in fires}) >= count, 120, poll=0.2)
        await trio.sleep(10)
        late = [wall - f.at for wall, _, f in fires]
        out["steady"] = {
            "reminders": count,
            "fires": len(fires),
            "duplicates": len(fires) - len({f.key for _, _, f in fires}),
            "lateness": percentiles_ms(late),
        }
        log(f"reminders: {len(fires)} fires of {count}")

        fires.clear()
        nodes = cluster.live()
        now = time.time()
        for i in range(200):
            await nodes[i % len(nodes)].reminders.remind(f"k{i}", now + 15 + rng.uniform(0, 10), i)
        victims = nodes[1 : 1 + killed]
        victim_ids = {v.id for v in victims}
        theirs = {f"k{i}" for i in range(200) if nodes[0].reminders.owner_of(f"k{i}") in victim_ids}
        await trio.sleep(10)
        for victim in victims:
            cluster.kill(victim.id)
        await _until(lambda: len({f.key for _, _, f in fires}) >= 200, 120, poll=0.2)
        await trio.sleep(10)
        keys = [f.key for _, _, f in fires]
        late_theirs = [wall - f.at for wall, _, f in fires if f.key in theirs]
        out["owners_killed"] = {
            "reminders": 200,
            "owned_by_the_killed": len(theirs),
            "fired": len(set(keys)),
            "duplicates": len(keys) - len(set(keys)),
            "lateness_of_the_killed_owners": percentiles_ms(late_theirs),
        }
        nursery.cancel_scope.cancel()
    return out


def summary(result: dict[str, Any]) -> str:
    raw = result["websocket"]["one_way"]
    reg = result["registry"]["visible_everywhere"]
    lines = [
        f"# Built-ins on {result['nodes']} websocket nodes ({result['date']})",
        "",
        f"- raw websocket one-way latency: p50 {raw['p50_ms']} ms, p99 {raw['p99_ms']} ms",
        f"- registry visible on every node: p50 {reg['p50_ms']} ms "
        f"({reg['p50_ms'] / raw['p50_ms']:.0f}x raw), p99 {reg['p99_ms']} ms "
        f"({reg['p99_ms'] / raw['p99_ms']:.0f}x raw)",
    ]
    for f in result["leader"]["failovers"]:
        lines.append(f"- leader failover: {f['seconds']} s (fence greater: {f['fence_greater']})")
    shard = result["shard"]
    lines.append(
        f"- shard join: {shard['join']['keys_moved_share']:.1%} of keys moved "
        f"(ideal {shard['join']['ideal_share']:.1%}); death: "
        f"{shard['death']['keys_moved_share']:.1%} moved, only the dead member's: "
        f"{shard['death']['only_the_dead_moved']}, agreed {shard['death']['agree_after_kill_s']} s "
        "after the kill"
    )
    steady = result["reminders"]["steady"]
    killed = result["reminders"]["owners_killed"]
    lines.append(
        f"- reminders: {steady['fires']} fires of {steady['reminders']}, "
        f"{steady['duplicates']} duplicates, lateness p50 {steady['lateness']['p50_ms']} ms, "
        f"p99 {steady['lateness']['p99_ms']} ms, max {steady['lateness']['max_ms']} ms"
    )
    lines.append(
        f"- owners killed: {killed['fired']} of {killed['reminders']} fired, "
        f"{killed['duplicates']} duplicates; the killed owners' {killed['owned_by_the_killed']}"
        f" late by p50 {killed['lateness_of_the_killed_owners'].get('p50_ms')} ms, max "
        f"{killed['lateness_of_the_killed_owners'].get('max_ms')} ms"
    )
    return "\n".join(lines)


async def main(n: int) -> dict[str, Any]:
    result: dict[str, Any] = run_header("seed_builtins", nodes=n)
    result["websocket"] = await websocket_latency()
    log(f"websocket: {result['websocket']['one_way']}")
    async with trio.open_nursery() as nursery:
        cluster = Nodes(nursery)
        for i in range(n):
            await cluster.start(f"b{i + 1:02d}")
        with trio.fail_after(60):
            await wait_for_views(cluster.live(), min_active=2)
        result["registry"] = await registry_run(cluster.live())
        log(f"registry: {result['registry']['visible_everywhere']}")
        result["shard"] = await shard_run(cluster)
        log(f"shard: {result['shard']}")
        result["reminders"] = await reminders_run(cluster)
        result["leader"] = await leader_run(cluster)
        nursery.cancel_scope.cancel()
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10)
    args = parser.parse_args()
    from trio_replica.runtime.logs import setup_logging

    setup_logging("ERROR")
    outcome = trio.run(main, args.nodes)
    stem = RESULTS / f"seed_builtins_{outcome['date'][:10]}"
    text = summary(outcome)
    write_results(stem, outcome, text)
    print(text)
