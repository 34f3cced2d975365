"""Broadcast figures of websocket-linked clusters, with the raw websocket ceiling beside them.

A script, not a test: ``.venv/bin/python bench/cluster.py [--sizes 10,25,50]``. This module
owns the cluster benchmark of issue 7 (first slice: the ``inproc`` mode only, every node in
this one process over real websockets on 127.0.0.1, so all nodes share one Python thread and
one core). One progress line per step goes to stderr; one JSON document goes to stdout and
to ``bench/results/cluster_<date>.json``; with matplotlib (the ``bench`` extra) two PNGs
``cluster_<date>_delivery.png`` and ``cluster_<date>_rmr_cpu.png`` go beside it.

Steps, in the order they run:

* ``websocket_ceiling``: one websocket connection pair on 127.0.0.1
  (`WebsocketTransport.serve` and `open_connection`); the client sends 100-byte frames as
  fast as ``send`` returns for about 2 s, the server task receives them. Messages per second
  and the process's CPU (`time.process_time`, both ends) per message. A Plumtree delivery
  costs at least one such send and one such receive, so this is the floor of CPU per
  delivery on this machine.
* ``broadcast`` for each N of the sweep: `open_local_cluster`, wait for symmetric connected
  views, then warm-up rounds of paced broadcasts until one round causes no GRAFT and no
  duplicate (views that change cost Plumtree repairs at timeout1 that would be measured as
  latency). Then M broadcasts of S-byte payloads from random nodes, paced on an absolute
  schedule; per broadcast the time to its last delivery and its mean delivery time, lost
  deliveries, RMR (Plumtree paper, section 4: gossip received / (M (N - 1)) - 1), LDH (the
  largest `Delivery.hops` of each broadcast), messages and bytes sent per broadcast from
  ``node.stats()`` deltas (``Gossip`` is payload, every other kind is control), CPU per
  delivery and deliveries per second.

CPU is counted from the first broadcast to the last delivery (``cpu_us_per_delivery``), and
also up to the end of a quiet period after it (``..._with_tail``), which adds the lazy IHAVE
batches those broadcasts cause and the idle timers of N nodes for that period. Before each
measurement the nodes idle for a second; ``..._net_of_idle`` subtracts that idle rate over
the window. ``frames_per_delivery`` counts websocket frames of every kind per delivery: the
ratio to read beside the ceiling's CPU per frame.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import logging
import os
import platform
import random
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio
from common import percentiles_ms, view_signature

from transports.base import Connection, TransportClosed
from transports.websocket import WebsocketTransport
from trio_replica.events import Delivery
from trio_replica.localcluster import open_local_cluster, wait_for_views
from trio_replica.node import Node
from trio_replica.wire import encode_payload

SEED = 20261126
SIZES = (10, 25)
COUNT = 100
PACE = 0.020
PAYLOAD = 100
TAG = "bench"
MIN_ACTIVE = 2
WARMUP_ROUND = 20
WARMUP_MAX_S = 30.0
#: Time after the last send for stragglers (repairs take timeout1 = 0.5 s and more).
DELIVERY_TIMEOUT_S = 10.0
#: Quiet period after a phase: IHAVE batches, grafts and prunes of the phase finish in it.
TAIL_S = 1.0
IDLE_S = 1.0
CEILING_S = 2.0
CEILING_FRAME = 100
#: The Plumtree message that carries payloads; every other kind counts as control.
PAYLOAD_KIND = "Gossip"
RESULTS = Path(__file__).resolve().parent / "results"


def progress(message: str) -> None:
    print(f"[cluster] {message}", file=sys.stderr, flush=True)


# --- the raw websocket ceiling ------------------------------------------------------------


async def websocket_ceiling(
    seconds: float = CEILING_S, size: int = CEILING_FRAME
) -> dict[str, Any]:
    """Frames per second and CPU per frame over one websocket pair on 127.0.0.1."""
    transport = WebsocketTransport()
    frame = b"x" * size
    received = 0
    sent = 0
    sender_done = False
    all_received = trio.Event()

    async def handler(conn: Connection) -> None:
        nonlocal received
        try:
            while True:
                await conn.receive()
                received += 1
                if sender_done and received == sent:
                    all_received.set()
        except TransportClosed:
            return

    async with trio.open_nursery() as nursery:
        address = await nursery.start(transport.serve, "ws://127.0.0.1:0", handler)
        async with transport.open_connection(address, timeout=5.0) as conn:
            # A short unmeasured burst: the first frames pay for imports and buffer growth.
            for _ in range(200):
                await conn.send(frame)
            sent = 200
            while received < sent:  # noqa: ASYNC110
                await trio.sleep(0.01)
            received = sent = 0
            cpu0, t0 = time.process_time(), trio.current_time()
            deadline = t0 + seconds
            while trio.current_time() < deadline:
                await conn.send(frame)
                sent += 1
            sender_done = True
            if received < sent:
                with trio.move_on_after(10):
                    await all_received.wait()
            wall, cpu = trio.current_time() - t0, time.process_time() - cpu0
        nursery.cancel_scope.cancel()
    return {
        "frame_bytes": size,
        "messages": sent,
        "received": received,
        "seconds": round(wall, 3),
        "messages_per_s": round(received / wall),
        "cpu_us_per_message": round(cpu / max(received, 1) * 1e6, 2),
        "cpu_utilisation": round(cpu / wall, 3),
    }


# --- broadcast ----------------------------------------------------------------------------


class Watch:
    """When and at what hop count each node received each broadcast (payload ``seq``)."""

    def __init__(self, nodes: Sequence[Node]) -> None:
        self.nodes = list(nodes)
        self.arrivals: dict[int, list[tuple[float, int]]] = collections.defaultdict(list)
        self.expected: set[int] = set()
        #: Deliveries of the expected broadcasts still to come (a counter, not a scan: the
        #: watch runs inside the CPU window being measured).
        self.missing = 0
        self.complete = trio.Event()

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
                if not isinstance(item, Delivery):
                    continue
                seq = item.payload["seq"]
                arrivals = self.arrivals[seq]
                arrivals.append((trio.current_time(), item.hops))
                if seq in self.expected and len(arrivals) < len(self.nodes):
                    self.missing -= 1
                    if self.missing == 0:
                        self.complete.set()

    def expect(self, seqs: Sequence[int]) -> None:
        self.expected = set(seqs)
        self.missing = len(self.expected) * (len(self.nodes) - 1)
        self.complete = trio.Event()


def payload_of(seq: int, size: int) -> dict[str, Any]:
    """A payload whose CBOR encoding is `size` bytes (or the smallest possible, if larger)."""
    bare = len(encode_payload({"seq": seq, "pad": b""}, max_size=1 << 20))
    pad = max(0, size - bare)
    # A byte string's length header grows at 24 and 256 bytes: trim to land on `size`.
    while pad and len(encode_payload({"seq": seq, "pad": b"x" * pad}, max_size=1 << 20)) > size:
        pad -= 1
    return {"seq": seq, "pad": b"x" * pad}


def sent_by_kind(
    nodes: Sequence[Node],
) -> tuple[collections.Counter[str], collections.Counter[str]]:
    messages: collections.Counter[str] = collections.Counter()
    size: collections.Counter[str] = collections.Counter()
    for node in nodes:
        stats = node.stats()
        messages.update(stats["messages_sent"])
        size.update(stats["bytes_sent"])
    return messages, size


def tree_totals(nodes: Sequence[Node]) -> collections.Counter[str]:
    total: collections.Counter[str] = collections.Counter()
    for node in nodes:
        for name, value in node.stats()["broadcast"].items():
            if isinstance(value, int):
                total[name] += value
    return total


async def paced_broadcasts(
    nodes: Sequence[Node], seqs: Sequence[int], rng: random.Random, size: int, pace: float
) -> dict[int, float]:
    """Broadcast `seqs` from random nodes `pace` apart on an absolute schedule; start times."""
    payloads = [payload_of(seq, size) for seq in seqs]
    started: dict[int, float] = {}
    start = trio.current_time()
    for i, (seq, payload) in enumerate(zip(seqs, payloads, strict=True)):
        await trio.sleep_until(start + i * pace)
        started[seq] = trio.current_time()
        await nodes[rng.randrange(len(nodes))].broadcast(TAG, payload)
    return started


async def warm_up(
    nodes: Sequence[Node], rng: random.Random, size: int, pace: float
) -> dict[str, Any]:
    """Paced rounds until one causes no GRAFT and no duplicate and changes no active view."""
    rounds: list[dict[str, int]] = []
    start = trio.current_time()
    steady = False
    while trio.current_time() - start < WARMUP_MAX_S:
        before, views = tree_totals(nodes), view_signature(nodes)
        await paced_broadcasts(nodes, [-1] * WARMUP_ROUND, rng, size, pace)
        await trio.sleep(TAIL_S)
        after = tree_totals(nodes)
        grafts = after["grafts_sent"] - before["grafts_sent"]
        duplicates = after["duplicates"] - before["duplicates"]
        views_changed = view_signature(nodes) != views
        rounds.append({"grafts": grafts, "duplicates": duplicates, "views_changed": views_changed})
        if grafts == 0 and duplicates == 0 and not views_changed:
            steady = True
            break
    return {
        "steady": steady,
        "seconds": round(trio.current_time() - start, 2),
        "rounds": rounds,
        "active_sizes": sorted(len(n.active_view()) for n in nodes),
        "eager_sizes": sorted(n.stats()["broadcast"]["eager_size"] for n in nodes),
    }


def per_broadcast(
    kinds: dict[str, int], broadcasts: int
) -> tuple[dict[str, float], dict[str, float]]:
    payload = kinds.get(PAYLOAD_KIND, 0)
    control = sum(v for k, v in kinds.items() if k != PAYLOAD_KIND)
    return (
        {"payload": round(payload / broadcasts, 2), "control": round(control / broadcasts, 2)},
        {k: round(v / broadcasts, 2) for k, v in sorted(kinds.items()) if v},
    )


async def broadcast_run(
    n: int, count: int, pace: float, size: int, rng: random.Random
) -> dict[str, Any]:
    t_start = trio.current_time()
    async with open_local_cluster(n) as nodes:
        with trio.fail_after(60):
            await wait_for_views(nodes, min_active=MIN_ACTIVE)
        formed = trio.current_time() - t_start
        progress(f"N={n}: overlay formed in {formed:.2f} s")
        async with trio.open_nursery() as nursery:
            watch = Watch(nodes)
            await nursery.start(watch.serve)
            warm = await warm_up(nodes, rng, size, pace)
            progress(
                f"N={n}: warm-up steady {warm['steady']} after {warm['seconds']} s, "
                f"{len(warm['rounds'])} rounds; active sizes {warm['active_sizes']}"
            )

            # The CPU of N idle nodes (timers, keepalives, shuffles), to net out of the window.
            idle_cpu0, idle_t0 = time.process_time(), trio.current_time()
            await trio.sleep(IDLE_S)
            idle_rate = (time.process_time() - idle_cpu0) / (trio.current_time() - idle_t0)

            seqs = list(range(count))
            watch.expect(seqs)
            frames0 = sum(node.stats()["frames_sent"] for node in nodes)
            views = view_signature(nodes)
            msgs0, bytes0 = sent_by_kind(nodes)
            tree0 = tree_totals(nodes)
            cpu0, t0 = time.process_time(), trio.current_time()
            started = await paced_broadcasts(nodes, seqs, rng, size, pace)
            with trio.move_on_after(DELIVERY_TIMEOUT_S):
                await watch.complete.wait()
            cpu_window, t_last = time.process_time() - cpu0, trio.current_time()
            await trio.sleep(TAIL_S)
            cpu_tail = time.process_time() - cpu0
            msgs1, bytes1 = sent_by_kind(nodes)
            frames = sum(node.stats()["frames_sent"] for node in nodes) - frames0
            tree1 = tree_totals(nodes)
            views_changed = view_signature(nodes) != views
            nursery.cancel_scope.cancel()

    expected = count * (n - 1)
    delivered = sum(len(watch.arrivals[s]) for s in seqs)
    every: list[float] = []
    last: list[float] = []
    mean: list[float] = []
    ldh: list[int] = []
    hops: collections.Counter[int] = collections.Counter()
    for seq in seqs:
        arrivals = watch.arrivals[seq]
        if not arrivals:
            continue
        delays = [t - started[seq] for t, _ in arrivals]
        every.extend(delays)
        mean.append(sum(delays) / len(delays))
        if len(arrivals) >= n - 1:
            last.append(max(delays))
        ldh.append(max(h for _, h in arrivals))
        hops.update(h for _, h in arrivals)
    first_send = min(started.values())
    last_arrival = max((t for s in seqs for t, _ in watch.arrivals[s]), default=t_last)
    kinds_msgs = {k: msgs1[k] - msgs0[k] for k in msgs1}
    kinds_bytes = {k: bytes1[k] - bytes0[k] for k in bytes1}
    msg_split, msg_kinds = per_broadcast(kinds_msgs, count)
    byte_split, byte_kinds = per_broadcast(kinds_bytes, count)
    gossip_received = tree1["gossip_received"] - tree0["gossip_received"]
    window = max(last_arrival - first_send, 1e-9)
    return {
        "nodes": n,
        "formed_s": round(formed, 2),
        "warmup": warm,
        "broadcasts": count,
        "pace_ms": round(pace * 1e3, 3),
        "payload_bytes": len(encode_payload(payload_of(0, size), max_size=1 << 20)),
        "expected_deliveries": expected,
        "deliveries": delivered,
        "lost_deliveries": expected - delivered,
        "complete_broadcasts": len(last),
        "to_last_delivery": percentiles_ms(last),
        "mean_delivery": percentiles_ms(mean),
        "every_delivery": percentiles_ms(every),
        "rmr": round(gossip_received / expected - 1, 4) if expected else 0.0,
        "ldh_mean": round(sum(ldh) / len(ldh), 2) if ldh else 0.0,
        "ldh_max": max(ldh, default=0),
        "hops_histogram": {str(h): c for h, c in sorted(hops.items())},
        "messages_per_broadcast": msg_split,
        "bytes_per_broadcast": byte_split,
        "messages_per_broadcast_by_kind": msg_kinds,
        "bytes_per_broadcast_by_kind": byte_kinds,
        "tree": {
            k: tree1[k] - tree0[k]
            for k in ("grafts_sent", "duplicates", "prunes_sent", "ihave_sent", "graft_misses")
        },
        "active_views_changed": views_changed,
        "window_s": round(window, 3),
        "deliveries_per_s": round(delivered / window),
        "cpu_us_per_delivery": round(cpu_window / max(delivered, 1) * 1e6, 2),
        "cpu_us_per_delivery_with_tail": round(cpu_tail / max(delivered, 1) * 1e6, 2),
        "cpu_us_per_delivery_net_of_idle": round(
            (cpu_window - idle_rate * (t_last - t0)) / max(delivered, 1) * 1e6, 2
        ),
        "idle_cpu_utilisation": round(idle_rate, 4),
        "cpu_utilisation": round(cpu_window / max(t_last - t0, 1e-9), 3),
        # Websocket frames of every kind (a link may batch several messages in one frame).
        "frames_sent": frames,
        "frames_per_delivery": round(frames / max(delivered, 1), 2),
        "cpu_us_per_frame_with_tail": round(cpu_tail / max(frames, 1) * 1e6, 2),
        # Raw per-delivery delays for the distribution picture, in ms.
        "delays_ms": [round(d * 1e3, 3) for d in sorted(every)],
    }


async def run(
    sizes: Sequence[int], count: int, pace: float, size: int, seed: int
) -> dict[str, Any]:
    rng = random.Random(seed)
    t_start = trio.current_time()
    ceiling = await websocket_ceiling()
    progress(
        f"websocket ceiling: {ceiling['messages_per_s']} msg/s, "
        f"{ceiling['cpu_us_per_message']} us CPU per message"
    )
    runs = []
    for n in sizes:
        figure = await broadcast_run(n, count, pace, size, rng)
        ws = ceiling["cpu_us_per_message"]
        figure["cpu_per_delivery_over_ws_message"] = round(figure["cpu_us_per_delivery"] / ws, 2)
        figure["cpu_net_of_idle_over_ws_message"] = round(
            figure["cpu_us_per_delivery_net_of_idle"] / ws, 2
        )
        runs.append(figure)
        lat = figure["to_last_delivery"]
        progress(
            f"N={n}: last delivery p50 {lat.get('p50_ms')} ms p99 {lat.get('p99_ms')} ms, "
            f"lost {figure['lost_deliveries']}, rmr {figure['rmr']}, ldh {figure['ldh_mean']}, "
            f"{figure['cpu_us_per_delivery']} us CPU/delivery "
            f"({figure['cpu_per_delivery_over_ws_message']}x ws; net of idle "
            f"{figure['cpu_net_of_idle_over_ws_message']}x), "
            f"{figure['frames_per_delivery']} frames/delivery"
        )
    return {
        "mode": "inproc",
        "websocket_ceiling": ceiling,
        "broadcast": runs,
        "total_s": round(trio.current_time() - t_start, 1),
    }


# --- pictures -----------------------------------------------------------------------------


def pictures(result: dict[str, Any], stem: str) -> list[str]:
    """PNGs of the result; matplotlib is imported here only (the `bench` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["broadcast"]
    written = []

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for figure in runs:
        delays = figure["delays_ms"]
        if not delays:
            continue
        ys = [(i + 1) / len(delays) for i in range(len(delays))]
        ax.plot(delays, ys, label=f"N = {figure['nodes']}")
    ax.set_xscale("log")
    ax.set_xlabel("delivery time after broadcast (ms, log)")
    ax.set_ylabel("fraction of deliveries")
    ax.set_title(
        f"Plumtree delivery times, inproc, {runs[0]['broadcasts']} broadcasts "
        f"{runs[0]['pace_ms']:g} ms apart, {runs[0]['payload_bytes']} B"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = RESULTS / f"{stem}_delivery.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(str(path))

    ns = [f["nodes"] for f in runs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    left.plot(ns, [f["rmr"] for f in runs], "o-", label="Plumtree")
    left.axhline(0.1, color="grey", linestyle=":", label="target 0.1")
    left.set_xlabel("nodes")
    left.set_ylabel("RMR")
    left.set_title("relative message redundancy")
    left.legend()
    left.grid(True, alpha=0.3)
    ws = result["websocket_ceiling"]["cpu_us_per_message"]
    right.plot(ns, [f["cpu_us_per_delivery"] for f in runs], "o-", label="Plumtree delivery")
    right.plot(
        ns,
        [f["cpu_us_per_delivery_net_of_idle"] for f in runs],
        "s--",
        label="net of idle nodes' CPU",
    )
    right.axhline(ws, color="black", linestyle="-", label="raw websocket message")
    right.axhline(2 * ws, color="grey", linestyle=":", label="2x raw (target)")
    right.set_xlabel("nodes")
    right.set_ylabel("CPU us")
    right.set_ylim(bottom=0)
    right.set_title("CPU per delivery (whole process)")
    right.legend()
    right.grid(True, alpha=0.3)
    fig.tight_layout()
    path = RESULTS / f"{stem}_rmr_cpu.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(str(path))
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--sizes",
        type=lambda s: tuple(int(x) for x in s.split(",")),
        default=SIZES,
        help="cluster sizes, comma-separated (default 10,25)",
    )
    parser.add_argument("--count", type=int, default=COUNT, help="broadcasts per size")
    parser.add_argument("--pace-ms", type=float, default=PACE * 1e3)
    parser.add_argument("--payload", type=int, default=PAYLOAD, help="payload bytes")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--no-write", action="store_true", help="write no files")
    args = parser.parse_args(argv)
    # Every in-process node warns that it listens on loopback only: expected here, noise.
    logging.getLogger("trio_replica").setLevel(logging.ERROR)
    figures = trio.run(run, args.sizes, args.count, args.pace_ms / 1e3, args.payload, args.seed)
    now = datetime.datetime.now(datetime.UTC)
    result = {
        "benchmark": "cluster",
        "date": now.isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
        },
        "command": shlex.join(["python", *sys.argv]),
        "seed": args.seed,
        **figures,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.no_write:
        return
    RESULTS.mkdir(exist_ok=True)
    stem = f"cluster_{now.date().isoformat()}"
    (RESULTS / f"{stem}.json").write_text(text + "\n")
    try:
        written = pictures(result, stem)
    except ImportError:
        progress("matplotlib is not installed (the bench extra): no pictures")
    else:
        progress("wrote " + ", ".join(written))


if __name__ == "__main__":
    main()
