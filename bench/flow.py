"""Flow control under load: writers slowed instead of their writes lost, floods contained.

    ./dev bench flow                  # all phases, about 6 minutes
    ./dev bench flow --phases writers --writer-runs 5

Phases, all in one run beside the raw websocket figure of the same run:

* ``ceiling``: raw websocket messages per second and CPU per message, back to back
  (`bench/cluster.websocket_ceiling`): the yardstick the other figures are divided by.
* ``updates``: two nodes in this process, 20,000 `Replica.broadcast_update` as fast as they
  return, no anti-entropy: how many the receiver merged, how fast, what was dropped.
* ``writers``: ten nodes in this process, a writer on every node putting as fast as `put`
  returns (``--writer-puts`` each), anti-entropy an hour away: writes per second applied on
  every node, RMR over the write phase, CPU per write, and what the flow control did
  (pacing, deferred pushes). On a cold tree (the first broadcasts of every origin flood it
  until pruned) and after a warm-up of paced writes, ``--writer-runs`` times each.
* ``flood``: ``--flood-nodes`` nodes, one process each (so the victim's memory is its own),
  a paced honest series (10 broadcasts a second from random nodes) before and during each
  flood of ``--flood-seconds`` by one member connected to the victim: tiny gossips within
  its credit, 1 MiB gossips within its credit, tiny gossips ignoring its credit. Per flood:
  the honest deliveries kept (to every node, within 2 s), their latency against the
  baseline, the victim's peak memory, how fast it answers `status` and a metrics scrape.

Results: ``bench/results/flow_<date>.json``, a Markdown summary ``.md`` and a picture
``_flood.png`` beside it; progress on stderr.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import random
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import trio
from cluster import Watch, send_broadcasts, wait_views, warm_up, websocket_ceiling
from cluster_nodes import ProcsCluster, open_procs, quiet_logs
from common import percentiles_ms, run_header, write_results

from trio_replica.core.hlc import Timestamp
from trio_replica.core.messages import Gossip, Message, MessageId, Peer, Role
from trio_replica.core.ormap import Dot, Value
from trio_replica.core.ormap_wire import from_wire, to_wire
from trio_replica.core.wire import encode_frame, encode_payload
from trio_replica.localcluster import open_local_cluster, wait_for_views
from trio_replica.node import Node
from trio_replica.runtime.config import NodeConfig, ReplicaConfig
from trio_replica.runtime.handshake import Credentials, handshake_as_dialer
from trio_replica.runtime.link import Link
from trio_replica.runtime.linkconfig import LinkConfig
from trio_replica.runtime.replica_api import Add
from trio_replica.runtime.stats import NodeStats
from trio_replica.transports.base import TransportClosed
from trio_replica.transports.websocket import WebsocketTransport

RESULTS = Path(__file__).resolve().parent / "results"
#: Honest broadcasts during the floods: one every PACE seconds, from random nodes.
HONEST_PACE = 0.1
HONEST_BYTES = 100
#: A delivery counts as kept if it reached its node within this long of its start.
KEPT_WITHIN = 2.0
BASELINE_S = 10.0
PROBE_EVERY = 2.0
NO_ANTI_ENTROPY = ReplicaConfig(anti_entropy_interval=3600)


def progress(message: str) -> None:
    print(f"[flow] {message}", file=sys.stderr, flush=True)


def cpu_us(seconds: float, count: int) -> float:
    return round(seconds / max(count, 1) * 1e6, 1)


# --- updates: two nodes, one writer ---------------------------------------------------------


class KeySet:
    """A replica owner that keeps the keys it merged (custom callbacks, no anti-entropy)."""

    def __init__(self) -> None:
        self.keys: set[Any] = set()

    async def merge_delta(self, name: str, delta: Any) -> None:
        self.keys.update(key for key, _ in from_wire(delta))

    async def apply_full_sync(self, name: str, snapshot: list[Any]) -> None:
        self.keys.update(key for key, _ in from_wire(snapshot))

    async def full_sync_snapshot(self, name: str) -> list[Any] | None:
        dot = Dot("bench", Timestamp(1, 0))
        return to_wire([(key, Value(True, dot)) for key in sorted(self.keys)]) or None

    async def remove_node(self, name: str, node: str) -> None:
        return None


async def updates_phase(count: int) -> dict[str, Any]:
    async with open_local_cluster(2, prefix="u") as nodes:
        with trio.fail_after(30):
            await wait_for_views(nodes)
        sender, receiver = KeySet(), KeySet()
        replica = await nodes[0].open_replica("r", sender)
        await nodes[1].open_replica("r", receiver)
        cpu0, t0 = time.process_time(), trio.current_time()
        for i in range(count):
            await replica.broadcast_update(Add(i, i))
        returned = trio.current_time() - t0
        with trio.move_on_after(120):
            while len(receiver.keys) < count:  # noqa: ASYNC110
                await trio.sleep(0.01)
        wall, cpu = trio.current_time() - t0, time.process_time() - cpu0
        stats = [node.stats() for node in nodes]
    return {
        "updates": count,
        "merged_by_receiver": len(receiver.keys),
        "calls_returned_s": round(returned, 3),
        "all_merged_s": round(wall, 3),
        "merged_per_s": round(len(receiver.keys) / wall),
        "cpu_us_per_update": cpu_us(cpu, len(receiver.keys)),
        "drops": [s["drops"] for s in stats],
        # (.get: the phase also runs against a version without flow control, for comparison)
        "pushes_deferred": sum(s["broadcast"].get("pushes_deferred", 0) for s in stats),
        "writer_waits": stats[0].get("flow", {}).get("waits"),
        "writer_waited_s": stats[0].get("flow", {}).get("waited_seconds"),
    }


# --- writers: ten nodes, a writer each ----------------------------------------------------


def _tree_totals(nodes: Sequence[Node]) -> dict[str, int]:
    keys = ("gossip_received", "delivered", "broadcasts", "duplicates", "grafts_sent")
    keys += ("regrafts", "pushes_deferred", "copies_after_repair", "reported_lost")
    return {k: sum(n.stats()["broadcast"].get(k, 0) for n in nodes) for k in keys}


async def writers_run(n: int, puts: int, warm: bool, run: int) -> dict[str, Any]:
    base = NodeConfig(replica=NO_ANTI_ENTROPY)
    async with open_local_cluster(n, base=base, prefix=f"w{run}{'w' if warm else 'c'}") as nodes:
        with trio.fail_after(60):
            await wait_for_views(nodes, min_active=2)
        maps = [await node.open_map("kv") for node in nodes]
        await trio.sleep(1.0)
        if warm:

            async def warm_writer(i: int) -> None:
                for k in range(5):
                    await maps[i].put(f"warm{i}-{k}", k)
                    await trio.sleep(0.2)

            async with trio.open_nursery() as nursery:
                for i in range(n):
                    nursery.start_soon(warm_writer, i)
            await trio.sleep(1.0)
        before = _tree_totals(nodes)
        expected = sum(len(m) for m in maps) // n + n * puts
        cpu0, t0 = time.process_time(), trio.current_time()

        async def writer(i: int) -> None:
            for k in range(puts):
                await maps[i].put(f"{i}/{k}", k)

        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(writer, i)
        acked = trio.current_time() - t0
        with trio.move_on_after(120):
            while not all(len(m) >= expected for m in maps):  # noqa: ASYNC110
                await trio.sleep(0.01)
        wall, cpu = trio.current_time() - t0, time.process_time() - cpu0
        after = _tree_totals(nodes)
        d = {k: after[k] - before[k] for k in after}
        remote = d["delivered"] - d["broadcasts"]
        flows = [node.stats().get("flow", {}) for node in nodes]
        return {
            "warm": warm,
            "writes": n * puts,
            "complete": all(len(m) >= expected for m in maps),
            "acked_s": round(acked, 3),
            "applied_everywhere_s": round(wall, 3),
            "writes_per_s_applied_on_every_node": round(n * puts / wall),
            "cpu_us_per_write": cpu_us(cpu, n * puts),
            "rmr": round(d["gossip_received"] / max(remote, 1) - 1, 4),
            "tree": d,
            "paced_s": round(sum(f.get("paced_seconds", 0) for f in flows), 3),
            "writer_waits": sum(sum(f.get("waits", {}).values()) for f in flows),
            "drops": [node.stats()["drops"] for node in nodes],
        }


async def writers_phase(n: int, puts: int, runs: int) -> dict[str, Any]:
    out: dict[str, Any] = {"nodes": n, "puts_per_writer": puts, "runs": []}
    for run in range(runs):
        for warm in (False, True):
            result = await writers_run(n, puts, warm, run)
            out["runs"].append(result)
            progress(
                f"writers {'warm' if warm else 'cold'} run {run}: "
                f"{result['writes_per_s_applied_on_every_node']} writes/s applied everywhere, "
                f"RMR {result['rmr']}, complete {result['complete']}"
            )
    for warm in (False, True):
        runs_ = [r for r in out["runs"] if r["warm"] is warm]
        out["warm" if warm else "cold"] = {
            "writes_per_s": [r["writes_per_s_applied_on_every_node"] for r in runs_],
            "rmr": [r["rmr"] for r in runs_],
            "cpu_us_per_write": [r["cpu_us_per_write"] for r in runs_],
            "all_complete": all(r["complete"] for r in runs_),
        }
    return out


# --- flood: a member against one victim -------------------------------------------------------


def _stamp(counter: int) -> int:
    # As a node's HLC stamps its ids: wall milliseconds above 16 bits.
    return ((time.time_ns() // 1_000_000) << 16) | (counter & 0xFFFF)


def flood_gossip(counter: int, payload: bytes) -> Gossip:
    return Gossip(MessageId("flooder", _stamp(counter), counter), 1, "flood", payload)


async def flood_member(
    address: str, payload_bytes: int, respect_credit: bool, report: dict[str, Any]
) -> None:
    """Connect to `address` as a cluster member and send gossips until cancelled: within its
    credit (the way its own Link sends), or ignoring it (raw frames)."""
    transport = WebsocketTransport()
    creds = Credentials("trio-replica", b"", Peer("flooder", "ws://127.0.0.1:1"))
    payload = encode_payload("x" * max(payload_bytes - 8, 1), max_size=1 << 20)
    counter = itertools.count()
    report.update(sent=0, link_closed_after_s=None)
    start = trio.current_time()
    async with transport.open_connection(address, timeout=5) as conn:
        await handshake_as_dialer(conn, creds, role=Role.NODE, timeout=5)
        try:
            if not respect_credit:
                while True:
                    frame = encode_frame([flood_gossip(next(counter), payload) for _ in range(100)])
                    await conn.send(frame)
                    report["sent"] += 100

            async def processed(link: Link, message: Message, size: int) -> None:
                if message.CREDITED:
                    link.processed(size)

            link = Link(
                conn,
                Peer("victim", address),
                role=Role.NODE,
                outbound=True,
                config=LinkConfig(),
                stats=NodeStats(),
                on_message=processed,
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(link.run)
                while True:
                    await link.send(flood_gossip(next(counter), payload))
                    report["sent"] += 1
        except TransportClosed:
            report["link_closed_after_s"] = round(trio.current_time() - start, 3)


def _kept(watch: Watch, seqs: Sequence[int], receivers: int) -> dict[str, Any]:
    """Of these honest broadcasts: deliveries (broadcast, node) within KEPT_WITHIN, latency."""
    pairs = kept = 0
    latencies: list[float] = []
    for seq in seqs:
        start = watch.starts.get(seq)
        arrivals = watch.arrivals.get(seq, [])
        pairs += receivers
        if start is None:
            continue
        for at, _hops in arrivals:
            latencies.append(at - start)
            kept += at - start <= KEPT_WITHIN
    return {
        "broadcasts": len(seqs),
        "deliveries_expected": pairs,
        "delivered": len(latencies),
        "kept_within_2s": kept,
        "kept_share": round(kept / max(pairs, 1), 4),
        "latency": percentiles_ms(latencies),
    }


async def _honest_series(
    cluster: ProcsCluster, watch: Watch, seqs: list[int], rng: random.Random
) -> None:
    watch.expect(seqs)
    await send_broadcasts(cluster, seqs, rng, HONEST_BYTES, HONEST_PACE)


async def _probe_victim(cluster: ProcsCluster, index: int, probes: list[dict[str, Any]]) -> None:
    while True:
        t0 = time.perf_counter()
        answer = await cluster.children[index].ask({"op": "probe"})
        answer["answered_ms"] = round((time.perf_counter() - t0) * 1e3, 1)
        answer["at"] = time.monotonic()
        probes.append(answer)
        await trio.sleep(PROBE_EVERY)


async def flood_phase(n: int, seconds: float, rng: random.Random) -> dict[str, Any]:
    watch = Watch(n)
    variants = [
        ("tiny_within_credit", 16, True),
        ("1MiB_within_credit", 1024 * 1024 - 64, True),
        ("tiny_ignoring_credit", 16, False),
    ]
    out: dict[str, Any] = {"nodes": n, "flood_s": seconds, "variants": {}}
    seq = itertools.count()
    async with open_procs(n, watch) as cluster:
        await wait_views(cluster, min(2, n - 1), 60)
        await warm_up(cluster, rng, HONEST_BYTES, 0.05)
        victim = n - 1
        probes: list[dict[str, Any]] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_probe_victim, cluster, victim, probes)
            baseline = [next(seq) for _ in range(int(BASELINE_S / HONEST_PACE))]
            await _honest_series(cluster, watch, baseline, rng)
            await trio.sleep(KEPT_WITHIN)
            out["baseline"] = _kept(watch, baseline, n - 1)
            progress(f"flood baseline: {out['baseline']['kept_share']:.1%} kept")
            for name, size, respect in variants:
                report: dict[str, Any] = {}
                honest = [next(seq) for _ in range(int(seconds / HONEST_PACE))]
                first_probe = len(probes)
                t0 = time.monotonic()
                async with trio.open_nursery() as flooding:
                    flooding.start_soon(
                        flood_member, cluster.children[victim].address, size, respect, report
                    )
                    await _honest_series(cluster, watch, honest, rng)
                    flooding.cancel_scope.cancel()
                await trio.sleep(KEPT_WITHIN)
                during = [p for p in probes[first_probe:] if p["at"] >= t0]
                result = {
                    "flooder": report,
                    "honest": _kept(watch, honest, n - 1),
                    "victim_peak_rss_mib": round(max(p["peak_rss_kib"] for p in during) / 1024, 1)
                    if during
                    else None,
                    "victim_rss_mib": [round(p["rss_kib"] / 1024, 1) for p in during],
                    "status_ms": [p["status_ms"] for p in during],
                    "metrics_ms": [p["metrics_ms"] for p in during],
                    "probe_answered_ms": [p["answered_ms"] for p in during],
                    "victim_links_closed": during[-1]["links_closed"] if during else {},
                    "victim_rejected": during[-1]["rejected"] if during else {},
                    "timeline": _timeline(watch, honest),
                }
                result["seqs"] = honest
                out["variants"][name] = result
                progress(
                    f"flood {name}: {report.get('sent')} sent, honest kept "
                    f"{result['honest']['kept_share']:.1%}, victim peak "
                    f"{result['victim_peak_rss_mib']} MiB"
                )
                await trio.sleep(3.0)
            # Late is not lost: what had arrived 10 s after the last flood.
            await trio.sleep(10.0)
            for result in out["variants"].values():
                eventually = _kept(watch, result.pop("seqs"), n - 1)
                result["honest"]["delivered_eventually"] = eventually["delivered"]
            nursery.cancel_scope.cancel()
        out["probes"] = probes
    return out


def _timeline(watch: Watch, seqs: Sequence[int]) -> list[tuple[float, float]]:
    """(start, latency) of every delivery of these broadcasts, for the picture."""
    points = []
    first = min((watch.starts[s] for s in seqs if s in watch.starts), default=0.0)
    for seq in seqs:
        start = watch.starts.get(seq)
        if start is None:
            continue
        for at, _ in watch.arrivals.get(seq, []):
            points.append((round(start - first, 3), round(at - start, 4)))
    return points


# --- results ---------------------------------------------------------------------------------


def summary(result: dict[str, Any]) -> str:
    lines = [f"# Flow control, {result['date']}", "", f"`{result['command']}`", ""]
    ceiling = result.get("ceiling")
    if ceiling:
        lines.append(
            f"Raw websocket (same run): {ceiling['messages_per_s']:,} messages/s, "
            f"{ceiling['cpu_us_per_message']} us CPU per message."
        )
        lines.append("")
    updates = result.get("updates")
    if updates:
        ratio = ""
        if ceiling:
            ratio = f" ({updates['merged_per_s'] / ceiling['messages_per_s']:.2f} x raw)"
        lines += [
            "## 20,000 updates, 2 nodes, as fast as they return",
            "",
            f"- merged by the receiver: {updates['merged_by_receiver']:,} of "
            f"{updates['updates']:,} in {updates['all_merged_s']} s: "
            f"{updates['merged_per_s']:,}/s{ratio}, {updates['cpu_us_per_update']} us CPU each",
            f"- drops: {updates['drops']}; pushes deferred: {updates['pushes_deferred']}",
            "",
        ]
    writers = result.get("writers")
    if writers:
        lines += [
            f"## {writers['nodes']} writers, {writers['puts_per_writer']} puts each, "
            "as fast as put returns",
            "",
            "| tree | writes/s applied on every node | RMR | CPU us per write | complete |",
            "|---|---|---|---|---|",
        ]
        for key in ("cold", "warm"):
            row = writers[key]
            lines.append(
                f"| {key} | {', '.join(map(str, row['writes_per_s']))} | "
                f"{', '.join(map(str, row['rmr']))} | "
                f"{', '.join(map(str, row['cpu_us_per_write']))} | {row['all_complete']} |"
            )
        lines.append("")
    flood = result.get("flood")
    if flood:
        base = flood["baseline"]
        lines += [
            f"## Flooding member, {flood['nodes']} nodes (one process each), "
            f"{flood['flood_s']} s per flood",
            "",
            "| flood | sent | honest kept (2 s) | delivered in the end | honest p50 / p99 | "
            "victim peak RSS | status / metrics ms (max) | victim's links closed |",
            "|---|---|---|---|---|---|---|---|",
            f"| none (baseline) | - | {base['kept_share']:.1%} | {base['delivered']}/"
            f"{base['deliveries_expected']} | "
            f"{base['latency'].get('p50_ms')} / {base['latency'].get('p99_ms')} ms | | | |",
        ]
        for name, v in flood["variants"].items():
            lat = v["honest"]["latency"]
            honest = v["honest"]
            lines.append(
                f"| {name} | {v['flooder'].get('sent'):,} | {honest['kept_share']:.1%} | "
                f"{honest.get('delivered_eventually')}/{honest['deliveries_expected']} | "
                f"{lat.get('p50_ms')} / {lat.get('p99_ms')} ms | {v['victim_peak_rss_mib']} MiB | "
                f"{max(v['status_ms'], default=0)} / {max(v['metrics_ms'], default=0)} | "
                f"{v['victim_links_closed']} |"
            )
        lines.append("")
    return "\n".join(lines)


def pictures(result: dict[str, Any], stem: Path) -> list[str]:
    flood = result.get("flood")
    if not flood:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = flood["variants"]
    fig, axes = plt.subplots(1, len(variants), figsize=(5 * len(variants), 3.8), sharey=True)
    for ax, (name, v) in zip(axes, variants.items(), strict=True):
        if v["timeline"]:
            xs, ys = zip(*v["timeline"], strict=True)
            ax.scatter(xs, [y * 1e3 for y in ys], s=3, alpha=0.5)
        ax.set_yscale("log")
        ax.set_title(f"{name}\nkept {v['honest']['kept_share']:.1%}", fontsize=9)
        ax.set_xlabel("honest broadcast sent at (s into the flood)")
    axes[0].set_ylabel("delivery latency (ms)")
    fig.suptitle("Honest deliveries during a flood by one member", fontsize=10)
    fig.tight_layout()
    path = stem.with_name(stem.name + "_flood.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [str(path)]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    result = run_header("flow", seed=args.seed)
    phases: dict[str, Callable[[], Awaitable[Any]]] = {
        "ceiling": websocket_ceiling,
        "updates": lambda: updates_phase(args.updates),
        "writers": lambda: writers_phase(args.writer_nodes, args.writer_puts, args.writer_runs),
        "flood": lambda: flood_phase(args.flood_nodes, args.flood_seconds, rng),
    }
    for name in args.phases:
        progress(f"phase {name}")
        result[name] = await phases[name]()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--phases",
        nargs="+",
        default=["ceiling", "updates", "writers", "flood"],
        choices=["ceiling", "updates", "writers", "flood"],
    )
    parser.add_argument("--updates", type=int, default=20_000)
    parser.add_argument("--writer-nodes", type=int, default=10)
    parser.add_argument("--writer-puts", type=int, default=300)
    parser.add_argument("--writer-runs", type=int, default=3)
    parser.add_argument("--flood-nodes", type=int, default=6)
    parser.add_argument("--flood-seconds", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=20261129)
    parser.add_argument("--out", type=Path, default=None, help="results stem (default: dated)")
    args = parser.parse_args(argv)
    quiet_logs()
    result = trio.run(run, args)
    stem = args.out or RESULTS / f"flow_{datetime.date.today().isoformat()}"
    for path in [*write_results(stem, result, summary(result)), *pictures(result, stem)]:
        progress(f"wrote {path}")
    print(summary(result))


if __name__ == "__main__":
    main()
