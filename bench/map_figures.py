"""End-to-end figures of replicated maps and broadcast over real websockets on 127.0.0.1.

A script, not a test: ``.venv/bin/python bench/map_figures.py``. Every node runs in this one
process on the real clock, so all of them share one Python thread: the figures include the
queueing of ten nodes on one core: slower than ten processes on ten cores would be.
One progress line per phase goes to stderr; one JSON document goes to stdout and to
``bench/results/map_figures.json`` (with the date, the machine and the command).

Phases, in the order they run:

* ``overlay``: a 10-node cluster (`open_local_cluster`) until the active views are symmetric
  and connected (2 peers each at least: with 5-peer views on 10 nodes HyParView may leave a
  node at 2 or 3 for a long while, refusing low-priority NEIGHBORs, so waiting for 3 can
  time out). Then warm-up rounds (40 puts and 40 broadcasts from random nodes, 20 ms apart)
  until a round causes no GRAFT and no duplicate and no active view changed for 6 s: views
  keep filling for 10-20 s after the overlay first connects, and every change costs
  Plumtree repairs at timeout1 (0.5 s) that would be measured as latency.
* ``put_latency``: 200 puts from random nodes, paced 20 ms apart. For each put, the time
  from the start of ``put`` on the writer to the `Put` event of the last of the 10 maps
  (``map.subscribe()`` on every node, `trio.current_time()` at each event).
* ``broadcast``: 200 broadcasts from random nodes, paced 20 ms apart; time to the last of
  the 9 deliveries, and the relative message redundancy from the nodes' Plumtree counters:
  RMR = gossip_received / (broadcasts * (n - 1)) - 1.
* ``sustained``: the same measurement with puts from random nodes at 100, 200 and 300 per
  second (2.5 s each, after clean warm-up rounds): where the knee is.
* ``throughput``: one writer, then all 10 writers at once (N/10 keys each), putting N keys
  (1,000 by default) as fast as ``put`` returns; the rate at which the *last* node has
  applied all N, and the process's CPU time (`time.process_time`) per fully replicated
  write.
* ``sync_10k``: two fresh nodes; A holds a 10,000-key map (values of ~50 bytes). ``join``:
  B starts with A as seed and opens the map at once (A pushes its state on NeighborUp);
  ``open``: B, already linked, reopens the map empty and pulls A's state. Time until B holds
  all 10,000 entries, chunks and bytes of SyncChunk traffic.

Random choices come from a seeded RNG; node ids and message ids do not (the nodes seed
themselves from the OS), so two runs differ by machine noise and overlay shape.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import cbor2
import trio
from common import percentiles_ms, run_header, view_signature

from trio_replica.core.events import Delivery
from trio_replica.localcluster import open_local_cluster, overlay_ok, wait_for_views
from trio_replica.node import Node, open_node
from trio_replica.runtime.config import NodeConfig
from trio_replica.stores.maps import Put, ReplicatedMap

SEED = 20240521
NODES = 10
MIN_ACTIVE = 2
PACE = 0.020
PACED_COUNT = 200
#: Puts (and as many broadcasts) per warm-up round, paced like the latency figure.
WARMUP_ROUND = 40
#: Warm-up ends after a clean round once active views have not changed for this long.
STEADY_VIEWS_S = 6.0
WARMUP_MAX_S = 40.0
#: Between loaded phases: clean rounds until the tree is quiet again, at most this long.
RECOVERY_MAX_S = 10.0
THROUGHPUT_KEYS = 1_000
#: Paced single-writer rates (puts/s) between the latency figure and saturation.
SUSTAINED_RATES = (100, 200, 300)
SUSTAINED_SECONDS = 2.5
SYNC_KEYS = 10_000
MAP = "bench"
TAG = "bench"
#: Plumtree counters summed over nodes for the traffic part of a phase.
TREE_COUNTERS = (
    "broadcasts",
    "gossip_received",
    "gossip_sent",
    "duplicates",
    "ihave_sent",
    "ihave_entries_sent",
    "grafts_sent",
    "graft_misses",
    "prunes_sent",
    "optimisations",
    # Not Plumtree's: websocket frames of every kind, all nodes (the per-frame cost dominates).
    "frames_sent",
)


def progress(message: str) -> None:
    print(f"[map_figures] {message}", file=sys.stderr, flush=True)


def tree_counters(nodes: Sequence[Node]) -> collections.Counter[str]:
    total: collections.Counter[str] = collections.Counter()
    for node in nodes:
        stats = node.stats()
        tree = {**stats["broadcast"], "frames_sent": stats["frames_sent"]}
        for name in TREE_COUNTERS:
            total[name] += tree[name]
    return total


def drops(nodes: Sequence[Node]) -> collections.Counter[str]:
    total: collections.Counter[str] = collections.Counter()
    for node in nodes:
        total.update(node.stats()["drops"])
    return total


def traffic(
    before: collections.Counter[str], after: collections.Counter[str], broadcasts: int, n: int
) -> dict[str, Any]:
    delta: dict[str, Any] = {name: after[name] - before[name] for name in TREE_COUNTERS}
    expected = broadcasts * (n - 1)
    delta["rmr"] = round(delta["gossip_received"] / expected - 1, 4) if expected else 0.0
    return delta


def counter_delta(
    before: collections.Counter[str], after: collections.Counter[str]
) -> dict[str, int]:
    return {k: after[k] - before[k] for k in sorted(after) if after[k] != before[k]}


class MapWatch:
    """Records, per key, when each node's map emitted its `Put` event, and counts per phase.

    A key is ``<phase>:<rest>``. After `expect(phase, n)`, `wait_phase(phase)` returns once
    every node emitted `n` Puts of that phase, with the time the last node did.
    """

    def __init__(self, maps: Sequence[ReplicatedMap]) -> None:
        self.maps = list(maps)
        self.arrivals: dict[str, list[float]] = collections.defaultdict(list)
        self.counts: list[collections.Counter[str]] = [collections.Counter() for _ in maps]
        self._targets: dict[str, int] = {}
        self._done: dict[str, list[float]] = {}
        self._events: dict[str, trio.Event] = {}

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for index, the_map in enumerate(self.maps):
                await nursery.start(self._watch, index, the_map)
            task_status.started()

    async def _watch(
        self,
        index: int,
        the_map: ReplicatedMap,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with the_map.subscribe(buffer=100_000) as events:
            task_status.started()
            async for event in events:
                if not isinstance(event, Put) or not isinstance(event.key, str):
                    continue
                now = trio.current_time()
                self.arrivals[event.key].append(now)
                phase = event.key.partition(":")[0]
                self.counts[index][phase] += 1
                target = self._targets.get(phase)
                if target is not None and self.counts[index][phase] == target:
                    done = self._done[phase]
                    done.append(now)
                    if len(done) == len(self.maps):
                        self._events[phase].set()

    def expect(self, phase: str, n: int) -> None:
        self._targets[phase] = n
        self._done[phase] = []
        self._events[phase] = trio.Event()

    async def wait_phase(self, phase: str) -> float:
        await self._events[phase].wait()
        return max(self._done[phase])

    def applied_by_slowest(self, phase: str) -> int:
        return min(counts[phase] for counts in self.counts)


class BroadcastWatch:
    """Records when each node received each broadcast of `TAG` (payload ``{"seq": i}``)."""

    def __init__(self, nodes: Sequence[Node]) -> None:
        self.nodes = list(nodes)
        self.arrivals: dict[int, list[tuple[float, int]]] = collections.defaultdict(list)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for node in self.nodes:
                await nursery.start(self._watch, node)
            task_status.started()

    async def _watch(
        self, node: Node, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with node.subscribe(TAG, buffer=100_000) as sub:
            task_status.started()
            async for item in sub:
                if isinstance(item, Delivery):
                    self.arrivals[item.payload["seq"]].append((trio.current_time(), item.hops))


async def paced(
    count: int,
    rng: random.Random,
    send: Callable[[int, int], Awaitable[None]],
    pace: float = PACE,
    *,
    nodes: int = NODES,
) -> None:
    """Call `send(i, node_index)` `count` times, `pace` apart on an absolute schedule.

    `node_index` is drawn from ``range(nodes)``.

    When a send takes longer than `pace` the schedule is not caught up in a burst later:
    the achieved rate is what the caller reports.
    """
    start = trio.current_time()
    for i in range(count):
        await trio.sleep_until(start + i * pace)
        await send(i, rng.randrange(nodes))


def value_of(i: int) -> dict[str, Any]:
    """A value of about 50 bytes of CBOR."""
    return {"n": i, "s": f"{i:08d}" + "v" * 32}


async def settle(seconds: float) -> None:
    # A quiet period lets IHAVE batches, grafts and prunes of the last phase finish.
    await trio.sleep(seconds)


# --- phases -----------------------------------------------------------------------------


async def phase_put_latency(
    nodes: Sequence[Node],
    maps: Sequence[ReplicatedMap],
    watch: MapWatch,
    rng: random.Random,
    *,
    phase: str = "lat",
    count: int = PACED_COUNT,
    pace: float = PACE,
) -> dict[str, Any]:
    """`count` puts from random nodes, `pace` apart; time from `put` to the last node's Put."""
    started: dict[str, float] = {}
    put_calls: list[float] = []
    watch.expect(phase, count)
    before = tree_counters(nodes)
    cpu0, t0 = time.process_time(), trio.current_time()

    async def send(i: int, writer: int) -> None:
        key = f"{phase}:{i:05d}"
        started[key] = t0 = trio.current_time()
        await maps[writer].put(key, value_of(i))
        put_calls.append(trio.current_time() - t0)

    await paced(count, rng, send, pace, nodes=len(maps))
    offered_s = trio.current_time() - t0
    with trio.move_on_after(20):
        await watch.wait_phase(phase)
    cpu, wall = time.process_time() - cpu0, trio.current_time() - t0
    await settle(1.5)
    latencies = [
        max(watch.arrivals[key]) - t0
        for key, t0 in started.items()
        if len(watch.arrivals[key]) == len(maps)
    ]
    return {
        "puts": count,
        "pace_ms": round(pace * 1e3, 3),
        "achieved_puts_per_s": round(count / offered_s, 1),
        "complete": len(latencies),
        "to_last_node": percentiles_ms(latencies),
        "over_100ms": sum(1 for x in latencies if x > 0.1),
        "put_call": percentiles_ms(put_calls),
        # The whole process's CPU (ten nodes) per write replicated to all of them.
        "cpu_ms_per_put": round(cpu / count * 1e3, 3),
        "cpu_utilisation": round(cpu / wall, 3),
        "traffic": traffic(before, tree_counters(nodes), count, len(nodes)),
        "eager_sizes_after": [n.stats()["broadcast"]["eager_size"] for n in nodes],
    }


async def phase_broadcast(
    nodes: Sequence[Node], watch: BroadcastWatch, rng: random.Random
) -> dict[str, Any]:
    started: dict[int, float] = {}
    before = tree_counters(nodes)
    cpu0 = time.process_time()

    async def send(i: int, origin: int) -> None:
        started[i] = trio.current_time()
        await nodes[origin].broadcast(TAG, {"seq": i})

    await paced(PACED_COUNT, rng, send, nodes=len(nodes))
    with trio.move_on_after(20):
        while not all(len(watch.arrivals[i]) >= len(nodes) - 1 for i in started):  # noqa: ASYNC110
            await trio.sleep(0.01)
    cpu = time.process_time() - cpu0
    await settle(1.5)
    after = tree_counters(nodes)
    complete = {i: arr for i, arr in watch.arrivals.items() if i in started}
    last = [
        max(t for t, _ in arr) - started[i]
        for i, arr in complete.items()
        if len(arr) == len(nodes) - 1
    ]
    hops = collections.Counter(h for arr in complete.values() for _, h in arr)
    ldh = [max(h for _, h in arr) for arr in complete.values() if arr]
    return {
        "broadcasts": PACED_COUNT,
        "pace_ms": PACE * 1e3,
        "complete": len(last),
        "to_last_delivery": percentiles_ms(last),
        "over_100ms": sum(1 for x in last if x > 0.1),
        "cpu_ms_per_broadcast": round(cpu / PACED_COUNT * 1e3, 3),
        "hops_histogram": dict(sorted(hops.items())),
        "last_delivery_hop_max": max(ldh, default=0),
        "last_delivery_hop_mean": round(sum(ldh) / len(ldh), 2) if ldh else 0.0,
        "traffic": traffic(before, after, PACED_COUNT, len(nodes)),
    }


async def phase_throughput(
    nodes: Sequence[Node],
    maps: Sequence[ReplicatedMap],
    watch: MapWatch,
    writers: int,
    keys: int,
) -> dict[str, Any]:
    phase = f"tp{writers}"
    # Every writer writes as many keys: `keys` rounded down to a multiple of `writers`.
    per_writer = keys // writers
    keys = per_writer * writers
    watch.expect(phase, keys)
    before_tree, before_drops = tree_counters(nodes), drops(nodes)
    writes_done: list[float] = []

    async def write(w: int) -> None:
        the_map = maps[w]
        for i in range(per_writer):
            await the_map.put(f"{phase}:{w}:{i:06d}", value_of(i))
        writes_done.append(trio.current_time())

    cpu0, t0 = time.process_time(), trio.current_time()
    last: float | None = None
    with trio.move_on_after(60):
        async with trio.open_nursery() as nursery:
            for w in range(writers):
                nursery.start_soon(write, w)
        last = await watch.wait_phase(phase)
    cpu = time.process_time() - cpu0
    wall = (last if last is not None else trio.current_time()) - t0
    await settle(1.5)
    replicated = keys if last is not None else watch.applied_by_slowest(phase)
    return {
        "writers": writers,
        "keys": keys,
        "complete": last is not None,
        "applied_by_slowest_node": replicated,
        "puts_returned_after_s": round(max(writes_done) - t0, 3) if writes_done else None,
        "local_puts_per_s": round(keys / (max(writes_done) - t0)) if writes_done else None,
        "fully_replicated_after_s": round(wall, 3),
        "replicated_writes_per_s": round(replicated / wall, 1),
        "cpu_s": round(cpu, 3),
        "cpu_ms_per_replicated_write": round(cpu / max(replicated, 1) * 1e3, 3),
        "cpu_utilisation": round(cpu / wall, 3),
        "traffic": traffic(before_tree, tree_counters(nodes), keys, len(nodes)),
        "drops": counter_delta(before_drops, drops(nodes)),
    }


async def wait_len(the_map: ReplicatedMap, n: int, timeout: float) -> float | None:
    """Poll every 2 ms until `the_map` has `n` entries; the time it did, or None."""
    with trio.move_on_after(timeout):
        while len(the_map) < n:  # noqa: ASYNC110
            await trio.sleep(0.002)
        return trio.current_time()
    return None


def sync_traffic(a: Node, b: Node, before: tuple[dict[str, Any], dict[str, Any]]) -> dict[str, Any]:
    a_before, b_before = before
    a_now, b_now = a.stats(), b.stats()
    return {
        # Totals since the map opened: how many full syncs A sent, B asked for.
        "a_full_syncs_sent": a.maps()["big"].replica.stats.syncs_sent,
        "b_sync_requests_sent": b.maps()["big"].replica.core.stats.sync_requests_sent,
        "chunks_sent_by_a": a_now["messages_sent"].get("SyncChunk", 0)
        - a_before["messages_sent"].get("SyncChunk", 0),
        "chunk_bytes_sent_by_a": a_now["bytes_sent"].get("SyncChunk", 0)
        - a_before["bytes_sent"].get("SyncChunk", 0),
        "chunks_received_by_b": b_now["messages_received"].get("SyncChunk", 0)
        - b_before["messages_received"].get("SyncChunk", 0),
        "frame_bytes_a_to_b": b_now["frame_bytes_received"] - b_before["frame_bytes_received"],
        "drops_at_b": counter_delta(
            collections.Counter(b_before["drops"]), collections.Counter(b_now["drops"])
        ),
    }


async def phase_sync(keys: int, *, report: Callable[[str], None] = progress) -> dict[str, Any]:
    """Full sync of a `keys`-entry map to a fresh node (``join``) and to a reopened map
    (``open``); `report` gets the progress lines."""
    out: dict[str, Any] = {"keys": keys, "value_bytes": len(cbor2.dumps(value_of(0)))}
    async with open_node(NodeConfig(name="sync-a")) as a:
        ma = await a.open_map("big")
        t0, cpu0 = trio.current_time(), time.process_time()
        for i in range(keys):
            await ma.put(f"k{i:06d}", value_of(i))
        out["fill_a_alone_s"] = round(trio.current_time() - t0, 3)
        out["fill_a_cpu_s"] = round(time.process_time() - cpu0, 3)
        report(f"sync: A filled with {keys} keys in {out['fill_a_alone_s']} s")

        # join: B starts with A as seed and opens the map at once.
        b_config = NodeConfig(name="sync-b", seeds=(a.address,))
        before = (a.stats(), {"messages_received": {}, "drops": {}, "frame_bytes_received": 0})
        t0, cpu0 = trio.current_time(), time.process_time()
        async with open_node(b_config) as b:
            mb = await b.open_map("big")
            done = await wait_len(mb, keys, 30)
            out["join"] = {
                "complete": done is not None,
                "entries": len(mb),
                "seconds": round((done or trio.current_time()) - t0, 3),
                "cpu_s": round(time.process_time() - cpu0, 3),
                **sync_traffic(a, b, before),
            }
            report(f"sync: join took {out['join']['seconds']} s")
            await settle(0.5)

            # open: B, linked to A, reopens the map empty and pulls A's state.
            await mb.aclose()
            before = (a.stats(), b.stats())
            t0, cpu0 = trio.current_time(), time.process_time()
            mb = await b.open_map("big")
            done = await wait_len(mb, keys, 30)
            out["open"] = {
                "complete": done is not None,
                "entries": len(mb),
                "seconds": round((done or trio.current_time()) - t0, 3),
                "cpu_s": round(time.process_time() - cpu0, 3),
                "b_active_view": [p.id for p in b.active_view()],
                **sync_traffic(a, b, before),
            }
            report(f"sync: open took {out['open']['seconds']} s")
    return out


async def warm_up(
    nodes: Sequence[Node],
    maps: Sequence[ReplicatedMap],
    rng: random.Random,
    *,
    label: str,
    steady_views_s: float,
    max_s: float,
) -> dict[str, Any]:
    """Rounds of paced puts and broadcasts until the tree and the views are quiet.

    A round counts as clean when it caused no GRAFT and no duplicate. We stop after a clean
    round once no active view has changed for `steady_views_s` (HyParView keeps filling
    views for seconds after the overlay is first connected, and every change of an active
    view costs Plumtree a repair through IHAVE/GRAFT, i.e. half-second latencies).
    """
    rounds: list[dict[str, Any]] = []
    start = trio.current_time()
    signature, changed_at = view_signature(nodes), start
    steady = False

    async def warm(i: int, writer: int) -> None:
        await maps[writer].put(f"warm{label}:{len(rounds)}:{i}", value_of(i))
        await nodes[rng.randrange(len(nodes))].broadcast(TAG, {"seq": -1})

    while trio.current_time() - start < max_s:
        before = tree_counters(nodes)
        await paced(WARMUP_ROUND, rng, warm, nodes=len(maps))
        await settle(1.0)
        delta = traffic(before, tree_counters(nodes), 2 * WARMUP_ROUND, len(nodes))
        now = trio.current_time()
        if view_signature(nodes) != signature:
            signature, changed_at = view_signature(nodes), now
        rounds.append(
            {
                "grafts": delta["grafts_sent"],
                "duplicates": delta["duplicates"],
                "views_changed": changed_at == now,
            }
        )
        if (
            delta["grafts_sent"] == 0
            and delta["duplicates"] == 0
            and now - changed_at >= steady_views_s
        ):
            steady = True
            break
    return {
        "steady": steady,
        "seconds": round(trio.current_time() - start, 2),
        "rounds": rounds,
        "active_sizes": [len(n.active_view()) for n in nodes],
        "eager_sizes": [n.stats()["broadcast"]["eager_size"] for n in nodes],
    }


async def run(throughput_keys: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    results: dict[str, Any] = {}
    t_start = trio.current_time()
    async with open_local_cluster(NODES) as nodes:
        with trio.fail_after(30):
            await wait_for_views(nodes, min_active=MIN_ACTIVE)
        formed = trio.current_time() - t_start
        progress(f"overlay of {NODES} nodes formed in {formed:.2f} s")
        maps = [await node.open_map(MAP) for node in nodes]
        async with trio.open_nursery() as nursery:
            watch = MapWatch(maps)
            await nursery.start(watch.serve)
            bwatch = BroadcastWatch(nodes)
            await nursery.start(bwatch.serve)

            warm = await warm_up(
                nodes, maps, rng, label="0", steady_views_s=STEADY_VIEWS_S, max_s=WARMUP_MAX_S
            )
            results["overlay"] = {
                "nodes": NODES,
                "formed_s": round(formed, 2),
                "symmetric_connected": overlay_ok(nodes, min_active=MIN_ACTIVE),
                "warmup": warm,
            }
            progress(
                f"warm-up: steady {warm['steady']} after {warm['seconds']} s, "
                f"{len(warm['rounds'])} rounds; active {warm['active_sizes']}"
            )

            async def measure(phase: Awaitable[dict[str, Any]]) -> dict[str, Any]:
                signature = view_signature(nodes)
                figure = await phase
                figure["active_views_changed"] = view_signature(nodes) != signature
                return figure

            results["put_latency"] = await measure(phase_put_latency(nodes, maps, watch, rng))
            lat = results["put_latency"]["to_last_node"]
            progress(
                f"put latency p50 {lat.get('p50_ms')} ms p99 {lat.get('p99_ms')} ms "
                f"grafts {results['put_latency']['traffic']['grafts_sent']}"
            )

            results["broadcast"] = await measure(phase_broadcast(nodes, bwatch, rng))
            b = results["broadcast"]
            progress(
                f"broadcast p50 {b['to_last_delivery'].get('p50_ms')} ms rmr {b['traffic']['rmr']}"
            )

            results["sustained"] = []
            for rate in SUSTAINED_RATES:
                recovery = await warm_up(
                    nodes, maps, rng, label=f"r{rate}", steady_views_s=0.0, max_s=RECOVERY_MAX_S
                )
                figure = await measure(
                    phase_put_latency(
                        nodes,
                        maps,
                        watch,
                        rng,
                        phase=f"r{rate}",
                        count=round(rate * SUSTAINED_SECONDS),
                        pace=1 / rate,
                    ),
                )
                figure["tree_quiet_before"] = recovery["steady"]
                results["sustained"].append(figure)
                lat = figure["to_last_node"]
                progress(
                    f"sustained {rate} puts/s: p50 {lat.get('p50_ms')} ms p99 "
                    f"{lat.get('p99_ms')} ms rmr {figure['traffic']['rmr']} "
                    f"grafts {figure['traffic']['grafts_sent']}"
                )

            results["throughput"] = []
            for writers in (1, NODES):
                recovery = await warm_up(
                    nodes, maps, rng, label=f"t{writers}", steady_views_s=0.0, max_s=RECOVERY_MAX_S
                )
                figure = await measure(
                    phase_throughput(nodes, maps, watch, writers, throughput_keys)
                )
                figure["tree_quiet_before"] = recovery["steady"]
                figure["recovery_before_s"] = recovery["seconds"]
                results["throughput"].append(figure)
                progress(
                    f"throughput with {writers} writer(s): "
                    f"{figure['replicated_writes_per_s']} replicated writes/s, "
                    f"{figure['cpu_ms_per_replicated_write']} ms CPU each, "
                    f"rmr {figure['traffic']['rmr']}"
                )
            results["cluster_drops"] = dict(drops(nodes))
            results["links_closed"] = dict(
                sum(
                    (collections.Counter(n.stats()["links_closed"]) for n in nodes),
                    start=collections.Counter(),
                )
            )
            nursery.cancel_scope.cancel()
    results["sync_10k"] = await phase_sync(SYNC_KEYS)
    results["total_s"] = round(trio.current_time() - t_start, 1)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--throughput-keys", type=int, default=THROUGHPUT_KEYS)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--no-write", action="store_true", help="do not write the results file")
    args = parser.parse_args(argv)
    figures = trio.run(run, args.throughput_keys, args.seed)
    results = {**run_header("map_figures", seed=args.seed), **figures}
    text = json.dumps(results, indent=2)
    print(text)
    if not args.no_write:
        out_dir = Path(__file__).resolve().parent / "results"
        out_dir.mkdir(exist_ok=True)
        (out_dir / "map_figures.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
