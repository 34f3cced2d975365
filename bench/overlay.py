"""Overload is not failure: many nodes in one process, formed, broadcast to, left idle.

    python bench/overlay.py [--nodes 100] [--idle 300] [--broadcasts 100]

Every node is `open_node` on 127.0.0.1 in this one process (one core), all joining through
the first, as the README's embedding example does. Phases, in order:

1. formation: how long until every node has joined (`Node.wait_ready`) and the overlay is
   connected and symmetric with at least 2 peers per node; refused handshakes, failed dials,
   links opened.
2. paced series: `--broadcasts` broadcasts of 100 bytes from random nodes, one every
   `--pace-ms`; completeness is deliveries over (broadcasts x (N - 1)).
3. idle: `--idle` seconds with no application traffic: idle CPU (cores), link churn
   (links established per minute), false failures (`PeerDown(FAILED)` for peers that are
   alive: every node is alive here, so every one is false), suspicions raised and cleared,
   the event loop's lag.
4. the paced series again, and whether the overlay is still connected.

`--pace 0` sends the series as fast as `broadcast` returns (flow control paces it); then
`missing_abandoned` (broadcasts given up on) is the figure to watch. `--hogs K` runs K
busy-looping processes beside the cluster for the whole run (on this 2-core machine, one
hog takes a core's share away from the cluster), to count false failures under a CPU
that is not ours.

Beside every figure, the raw websocket ceiling of the same run (`bench/cluster.py`).
Results: ``bench/results/overlay_<date>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cluster import RESULTS, websocket_ceiling
from cluster_nodes import quiet_logs
from common import percentiles_ms, run_header, write_results

from trio_replica import NodeConfig
from trio_replica.core.events import DownReason, PeerDown
from trio_replica.localcluster import open_local_cluster, overlay_ok
from trio_replica.node import Node

TAG = "bench/overlay"


def progress(message: str) -> None:
    print(f"[overlay] {message}", file=sys.stderr, flush=True)


def totals(nodes: list[Node]) -> dict[str, Any]:
    """Counters summed over the nodes."""
    out: Counter[str] = Counter()
    refused: Counter[str] = Counter()
    dials: Counter[str] = Counter()
    closed: Counter[str] = Counter()
    for node in nodes:
        stats = node.stats()
        out["links_established"] += stats["links_established"]
        out["suspicions"] += stats["flow"].get("suspicions", 0)
        out["suspicions_cleared"] += stats["flow"].get("suspicions_cleared", 0)
        out["dials_delayed"] += stats["dials"]["delayed"]
        out["neighbor_requests"] += stats["membership"]["neighbor_requests"]
        out["shuffle_replies_routed"] += stats["membership"]["shuffle_replies_routed"]
        out["missing_abandoned"] += stats["broadcast"].get("missing_abandoned", 0)
        out["reported_lost"] += stats["broadcast"].get("reported_lost", 0)
        for name in (
            "late_after_abandon",
            "graft_waits",
            "abandoned_announcers_left",
            "abandoned_after_patience",
            "grafts_sent",
            "graft_misses",
            "regraft_after_deferral",
            "pushes_deferred",
            "copies_after_repair",
        ):
            out[name] += stats["broadcast"].get(name, 0)
        refused.update(stats["handshakes_refused"])
        dials.update(stats["dial_failures"])
        closed.update(stats["links_closed"])
    return {
        **out,
        "handshakes_refused": dict(refused),
        "dial_failures": dict(dials),
        "links_closed": dict(closed),
    }


def delta(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in after.items():
        if isinstance(value, dict):
            out[key] = {k: v - before[key].get(k, 0) for k, v in value.items()}
        else:
            out[key] = value - before[key]
    return out


class FailureWatch:
    """Counts PeerDown(FAILED) on every node: all are alive, so each one is false."""

    def __init__(self) -> None:
        self.failed = 0

    async def watch(self, node: Node) -> None:
        async with node.events() as events:
            async for event in events:
                if isinstance(event, PeerDown) and event.reason is DownReason.FAILED:
                    self.failed += 1


async def paced_series(
    nodes: list[Node], count: int, pace: float, rng: random.Random
) -> dict[str, Any]:
    received: Counter[int] = Counter()
    latencies: list[float] = []
    sent_at: dict[int, float] = {}

    async def listen(node: Node, task_status: trio.TaskStatus[None]) -> None:
        async with node.subscribe(TAG) as sub:
            task_status.started()
            async for item in sub:
                payload = getattr(item, "payload", None)
                if isinstance(payload, dict) and payload.get("seq") in sent_at:
                    seq = payload["seq"]
                    received[seq] += 1
                    latencies.append(time.monotonic() - sent_at[seq])

    async with trio.open_nursery() as nursery:
        for node in nodes:
            await nursery.start(listen, node)
        for seq in range(count):
            sent_at[seq] = time.monotonic()
            await rng.choice(nodes).broadcast(TAG, {"seq": seq, "pad": "x" * 80})
            if pace:
                await trio.sleep(pace)
        expected = count * (len(nodes) - 1)
        with trio.move_on_after(60):
            while sum(received.values()) < expected:  # noqa: ASYNC110 - a bench's wait
                await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    got = sum(received.values())
    return {
        "broadcasts": count,
        "expected": expected,
        "delivered": got,
        "completeness": round(got / expected, 4) if expected else 1.0,
        "complete_broadcasts": sum(1 for s in range(count) if received[s] == len(nodes) - 1),
        "latency": percentiles_ms(latencies),
    }


def loop_figures(node: Node) -> dict[str, Any]:
    loop = node.stats()["loop"]
    return {k: loop[k] for k in ("lag_ms", "max_lag_ms", "samples", "stretch")}


HOG = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end: pass\n"


async def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    result = run_header(
        "overlay", seed=args.seed, nodes=args.nodes, hogs=args.hogs, pace_s=args.pace
    )
    progress("raw websocket ceiling")
    result["ceiling"] = await websocket_ceiling()
    async with trio.open_nursery() as hogs:
        for _ in range(args.hogs):
            # Bounded by their own clock, and killed with the nursery if we end first.
            script = HOG.format(seconds=args.idle + 600)
            hogs.start_soon(trio.run_process, [sys.executable, "-c", script])
        try:
            return await run_cluster(args, rng, result)
        finally:
            hogs.cancel_scope.cancel()


async def run_cluster(
    args: argparse.Namespace, rng: random.Random, result: dict[str, Any]
) -> dict[str, Any]:
    n = args.nodes
    base = NodeConfig()
    cpu0, wall0 = time.process_time(), time.monotonic()
    progress(f"opening {n} nodes")
    async with open_local_cluster(n, base=base) as nodes:
        opened = time.monotonic() - wall0
        watch = FailureWatch()
        async with trio.open_nursery() as nursery:
            for node in nodes:
                nursery.start_soon(watch.watch, node)
            with trio.move_on_after(args.form_timeout):
                for node in nodes:
                    await node.wait_ready()
                while not overlay_ok(nodes, min_active=2):  # noqa: ASYNC110 - spans nodes
                    await trio.sleep(0.1)
            formed = overlay_ok(nodes, min_active=2)
            formation = {
                "opened_s": round(opened, 2),
                "formed": formed,
                "formed_s": round(time.monotonic() - wall0, 2),
                "cpu_s": round(time.process_time() - cpu0, 2),
                "active_sizes": sorted(len(node.active_view()) for node in nodes),
                "false_failures": watch.failed,
                **totals(nodes),
            }
            progress(f"formation: {formation['formed_s']} s, formed {formed}")
            result["formation"] = formation
            progress("paced series")
            result["series_1"] = await paced_series(nodes, args.broadcasts, args.pace, rng)
            progress(f"series 1: completeness {result['series_1']['completeness']}")
            before, failed0 = totals(nodes), watch.failed
            cpu0, wall0 = time.process_time(), time.monotonic()
            progress(f"idle {args.idle} s")
            await trio.sleep(args.idle)
            wall = time.monotonic() - wall0
            after = totals(nodes)
            changes = delta(after, before)
            result["idle"] = {
                "seconds": round(wall, 1),
                "cpu_cores": round((time.process_time() - cpu0) / wall, 4),
                "cpu_cores_per_node": round((time.process_time() - cpu0) / wall / n, 5),
                "links_per_minute": round(changes["links_established"] / wall * 60, 1),
                "false_failures": watch.failed - failed0,
                "still_formed": overlay_ok(nodes, min_active=2),
                "active_sizes": sorted(len(node.active_view()) for node in nodes),
                "loop": loop_figures(nodes[0]),
                **changes,
            }
            progress(f"idle: {result['idle']['cpu_cores']} cores")
            result["series_2"] = await paced_series(nodes, args.broadcasts, args.pace, rng)
            progress(f"series 2: completeness {result['series_2']['completeness']}")
            result["false_failures_total"] = watch.failed
            result["final"] = totals(nodes)
            nursery.cancel_scope.cancel()
        leave0 = time.monotonic()
    result["leave_s"] = round(time.monotonic() - leave0, 2)
    return result


def _latency(series: dict[str, Any]) -> str:
    lat = series["latency"]
    if not lat.get("count"):
        return "-"
    return f"p50 {lat['p50_ms']} / p99 {lat['p99_ms']} / max {lat['max_ms']} ms"


def summary(r: dict[str, Any]) -> str:
    c, f, i = r["ceiling"], r["formation"], r["idle"]
    s1, s2 = r["series_1"], r["series_2"]
    hogs = f", {r['hogs']} CPU hogs beside it" if r.get("hogs") else ""
    rows = [
        f"# Overlay under load, {r['date']}",
        "",
        f"`{r['command']}`: {r['nodes']} nodes in one process{hogs}.",
        "",
        f"Raw websocket (same run): {c['messages_per_s']:,} messages/s, "
        f"{c['cpu_us_per_message']} us CPU per message.",
        "",
        "| figure | measured |",
        "|---|---|",
        f"| formation (every node joined, overlay connected, >= 2 peers each) | "
        f"{f['formed_s']} s (opening the nodes: {f['opened_s']} s), formed: {f['formed']} |",
        f"| during formation | {f['links_established']} links, handshakes refused "
        f"{f['handshakes_refused']}, dial failures {f['dial_failures']}, dials delayed "
        f"{f['dials_delayed']} |",
        f"| paced broadcasts, first series | completeness {s1['completeness']} "
        f"({s1['complete_broadcasts']}/{s1['broadcasts']} reached all), "
        f"latency {_latency(s1)} |",
        f"| idle {i['seconds']} s: CPU | {i['cpu_cores']} cores "
        f"({i['cpu_cores_per_node'] * 1000:.2f} ms/s per node) |",
        f"| idle: link churn | {i['links_per_minute']} links established per minute |",
        f"| idle: false failures | {i['false_failures']} (suspicions {i['suspicions']}, "
        f"cleared {i['suspicions_cleared']}) |",
        f"| idle: loop | {i['loop']} |",
        f"| after idle: still formed | {i['still_formed']}; active sizes "
        f"{Counter(i['active_sizes'])} |",
        f"| paced broadcasts, second series | completeness {s2['completeness']} "
        f"({s2['complete_broadcasts']}/{s2['broadcasts']}), latency {_latency(s2)} |",
        f"| false failures, whole run | {r['false_failures_total']} |",
        f"| broadcasts given up on (missing_abandoned), whole run | "
        f"{r['final']['missing_abandoned']}; still missing 10 s later (reported lost): "
        f"{r['final'].get('reported_lost', 'n/a')} |",
        f"| leaving all nodes at once | {r['leave_s']} s |",
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--idle", type=float, default=300.0)
    parser.add_argument("--broadcasts", type=int, default=100)
    parser.add_argument("--pace", type=float, default=0.1, help="seconds between broadcasts")
    parser.add_argument("--form-timeout", type=float, default=180.0)
    parser.add_argument("--hogs", type=int, default=0, help="busy processes beside")
    parser.add_argument("--seed", type=int, default=20261129)
    parser.add_argument("--out", type=Path, default=None, help="results stem (default: dated)")
    args = parser.parse_args(argv)
    quiet_logs()
    result = trio.run(run, args)
    stem = args.out or RESULTS / f"overlay_{args.nodes}_{datetime.date.today().isoformat()}"
    write_results(stem, result, summary(result))
    print(summary(result))


if __name__ == "__main__":
    main()
