"""Broadcast and map figures of websocket-linked clusters, with the raw websocket beside them.

A script, not a test: ``./dev bench cluster`` or ``.venv/bin/python bench/cluster.py
[--modes inproc,procs] [--sizes 10,25,50] [--count 100] [--pace-ms 20] [--map-nodes 10]``.
This module owns the cluster benchmark of issue 7. The nodes run in one of two modes
(`cluster_nodes`): ``inproc``, every node in this one process over real websockets on
127.0.0.1 (one Python thread, one core), and ``procs``, one OS process per node. One
progress line per step goes to stderr; one JSON document goes to stdout and to
``bench/results/cluster_<date>.json``, a Markdown summary to ``cluster_<date>.md``; with
matplotlib (the ``bench`` extra) PNGs ``cluster_<date>_*.png`` go beside them.

Steps, in the order they run:

* ``websocket_ceiling``: one websocket connection pair on 127.0.0.1; the client sends
  100-byte frames as fast as ``send`` returns for about 2 s. Messages per second and the
  process's CPU (both ends) per message: a delivery costs at least one such send and one
  such receive. ``websocket_paced``: the same, one frame per millisecond, so that every
  frame wakes both ends on its own as the messages of a paced broadcast do.
* ``broadcast`` for each mode and N: start the cluster, wait for symmetric connected views,
  warm up with paced rounds until one causes no GRAFT, no duplicate and no view change
  (view changes cost Plumtree repairs at timeout1 that would be measured as latency),
  measure the idle CPU, then four phases of M broadcasts of S bytes from random nodes:
  Plumtree paced on an absolute schedule, Plumtree as fast as each node's ``broadcast``
  returns, then flooding over the very same links (every core switched with
  `Plumtree.set_prune`), paced and as fast as possible. Per phase: time to the last
  delivery and mean delivery time, lost deliveries, RMR (SRDS 2007 section 4: payloads
  received / (M (N - 1)) - 1), LDH, messages and bytes per broadcast by kind (``Gossip``
  is payload, the rest control), deliveries per second, CPU per delivery and frames per
  delivery. Per cluster: start and formation times, peak RSS per node, and an idle window
  (``--idle-s``, 1 s by default) after the warm-up: idle CPU, links established per
  minute, false failures (`PeerDown(FAILED)`: every node is alive) and whether the overlay
  is still formed; false failures are also counted over the whole run.
* ``map`` (`cluster_map.map_run`): writes per second applied on every node, put latency,
  convergence after a partition heals and after a restart, full sync of 10,000 keys.

CPU is counted from the first broadcast to the last delivery (``cpu_us_per_delivery``), and
also up to the end of a quiet period after it (``..._with_tail``), which adds the lazy IHAVE
batches those broadcasts cause and the idle timers of N nodes for that period;
``..._net_of_idle`` subtracts the idle rate over the window. In ``inproc`` mode it is this
process's CPU (harness included), in ``procs`` mode the sum of the children's.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio
from cluster_nodes import Cluster, open_inproc, open_procs, quiet_logs
from common import payload_of, percentiles_ms, run_header

from trio_replica.core.wire import encode_payload
from trio_replica.localcluster import views_ok
from trio_replica.transports.base import Connection, TransportClosed
from trio_replica.transports.websocket import WebsocketTransport

SEED = 20261126
SIZES = (10, 25, 50)
#: Nodes of the replicated-map run (0 skips it).
MAP_NODES = 10
COUNT = 100
PACE = 0.020
PAYLOAD = 100
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
#: The paced floor: one frame per millisecond, each on its own wakeup.
CEILING_PACE = 0.001
#: The Plumtree message that carries payloads; every other kind counts as control.
PAYLOAD_KIND = "Gossip"
RESULTS = Path(__file__).resolve().parent / "results"


def progress(message: str) -> None:
    print(f"[cluster] {message}", file=sys.stderr, flush=True)


# --- the raw websocket ceiling ------------------------------------------------------------


async def websocket_ceiling(
    seconds: float = CEILING_S, size: int = CEILING_FRAME, pace: float | None = None
) -> dict[str, Any]:
    """Frames per second and CPU per frame over one websocket pair on 127.0.0.1.

    With `pace`, one frame every `pace` seconds instead of back to back: each frame then
    wakes both ends on its own (no batching in the kernel or in Trio), the floor to read
    beside a paced broadcast, whose messages also travel one by one.
    """
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
                if pace is not None:
                    await trio.sleep_until(t0 + sent * pace)
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
        "pace_ms": round(pace * 1e3, 3) if pace is not None else None,
        "messages": sent,
        "received": received,
        "seconds": round(wall, 3),
        "messages_per_s": round(received / wall),
        "cpu_us_per_message": round(cpu / max(received, 1) * 1e6, 2),
        "cpu_utilisation": round(cpu / wall, 3),
    }


async def trio_websocket_reference() -> dict[str, Any] | None:
    """The same two figures through trio-websocket, the library the transport used until
    issue 19 (the reference of the ratios before it; `ws_layers.py` compares the layers).
    None without trio-websocket (it is in the test and bench extras)."""
    try:
        from ws_layers import measure, trio_websocket_pair
    except ImportError:
        return None
    out = {
        "back_to_back": await measure(trio_websocket_pair, CEILING_FRAME, seconds=CEILING_S),
        "paced": await measure(
            trio_websocket_pair, CEILING_FRAME, seconds=CEILING_S, pace=CEILING_PACE
        ),
    }
    progress(
        "trio-websocket for reference: "
        f"{out['back_to_back']['cpu_us_per_message']} us CPU per message back to back, "
        f"{out['paced']['cpu_us_per_message']} us paced"
    )
    return out


# --- broadcast ----------------------------------------------------------------------------


class Watch:
    """When each broadcast (payload ``seq``) started, and when and at what hop count each
    node received it: the `cluster_nodes.Sink` of both modes."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.starts: dict[int, float] = {}
        self.arrivals: dict[int, list[tuple[float, int]]] = collections.defaultdict(list)
        self.expected: set[int] = set()
        #: Deliveries of the expected broadcasts still to come (a counter, not a scan: the
        #: watch runs inside the CPU window being measured).
        self.missing = 0
        self.complete = trio.Event()

    def started(self, seq: int, at: float) -> None:
        if seq >= 0:
            self.starts[seq] = at

    def arrived(self, seq: int, at: float, hops: int) -> None:
        if seq < 0:  # warm-up traffic
            return
        arrivals = self.arrivals[seq]
        arrivals.append((at, hops))
        # The origin does not deliver its own broadcast: N - 1 arrivals complete one.
        if seq in self.expected and len(arrivals) < self.size:
            self.missing -= 1
            if self.missing == 0:
                self.complete.set()

    def expect(self, seqs: Sequence[int]) -> None:
        self.expected = set(seqs)
        self.missing = len(self.expected) * (self.size - 1)
        self.complete = trio.Event()


async def wait_views(cluster: Cluster, min_active: int, timeout: float) -> dict[str, set[str]]:
    """Poll until the active views are symmetric, large enough and connected."""
    with trio.fail_after(timeout):
        while True:
            views = await cluster.views()
            if views_ok(views, min_active=min_active):
                return views
            await trio.sleep(0.1)


def signature(views: dict[str, set[str]]) -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(sorted(views[k])) for k in sorted(views))


async def send_broadcasts(
    cluster: Cluster, seqs: Sequence[int], rng: random.Random, size: int, pace: float | None
) -> None:
    """`seqs` from random nodes: `pace` apart on an absolute schedule, or (None) all at once,
    each node sending its share as fast as its `broadcast` returns."""
    if pace is not None:
        start = trio.current_time()
        for i, seq in enumerate(seqs):
            await trio.sleep_until(start + i * pace)
            await cluster.broadcast(rng.randrange(cluster.size), [seq], size)
        return
    shares: dict[int, list[int]] = collections.defaultdict(list)
    for seq in seqs:
        shares[rng.randrange(cluster.size)].append(seq)
    async with trio.open_nursery() as nursery:
        for index, share in shares.items():
            nursery.start_soon(cluster.broadcast, index, share, size)


async def warm_up(cluster: Cluster, rng: random.Random, size: int, pace: float) -> dict[str, Any]:
    """Paced rounds until one causes no GRAFT and no duplicate and changes no active view."""
    rounds: list[dict[str, Any]] = []
    start = trio.current_time()
    steady = False
    while trio.current_time() - start < WARMUP_MAX_S:
        before, views = (await cluster.counters()).tree, signature(await cluster.views())
        await send_broadcasts(cluster, [-1] * WARMUP_ROUND, rng, size, pace)
        await trio.sleep(TAIL_S)
        after = (await cluster.counters()).tree
        grafts = after["grafts_sent"] - before["grafts_sent"]
        duplicates = after["duplicates"] - before["duplicates"]
        views_changed = signature(await cluster.views()) != views
        rounds.append({"grafts": grafts, "duplicates": duplicates, "views_changed": views_changed})
        if grafts == 0 and duplicates == 0 and not views_changed:
            steady = True
            break
    final_views = await cluster.views()
    return {
        "steady": steady,
        "seconds": round(trio.current_time() - start, 2),
        "rounds": rounds,
        "active_sizes": sorted(len(v) for v in final_views.values()),
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


async def measure(
    cluster: Cluster,
    watch: Watch,
    seqs: Sequence[int],
    rng: random.Random,
    size: int,
    pace: float | None,
    idle_rate: float,
) -> dict[str, Any]:
    """One phase: broadcast `seqs`, wait for every delivery, and compute its figures."""
    n, count = cluster.size, len(seqs)
    watch.expect(seqs)
    views = signature(await cluster.views())
    c0 = await cluster.counters()
    t0 = time.monotonic()
    await send_broadcasts(cluster, seqs, rng, size, pace)
    sent_s = time.monotonic() - t0
    with trio.move_on_after(DELIVERY_TIMEOUT_S):
        await watch.complete.wait()
    t_done = time.monotonic()
    c1 = await cluster.counters()
    await trio.sleep(TAIL_S)
    c2 = await cluster.counters()
    views_changed = signature(await cluster.views()) != views

    expected = count * (n - 1)
    delivered = sum(len(watch.arrivals[s]) for s in seqs)
    every: list[float] = []
    last: list[float] = []
    mean: list[float] = []
    ldh: list[int] = []
    hops: collections.Counter[int] = collections.Counter()
    for seq in seqs:
        arrivals = watch.arrivals[seq]
        if not arrivals or seq not in watch.starts:
            continue
        delays = [t - watch.starts[seq] for t, _ in arrivals]
        every.extend(delays)
        mean.append(sum(delays) / len(delays))
        if len(arrivals) >= n - 1:
            last.append(max(delays))
        ldh.append(max(h for _, h in arrivals))
        hops.update(h for _, h in arrivals)
    first_send = min((watch.starts[s] for s in seqs if s in watch.starts), default=t0)
    last_arrival = max((t for s in seqs for t, _ in watch.arrivals[s]), default=t_done)
    kinds_msgs = {k: c2.messages[k] - c0.messages[k] for k in c2.messages}
    kinds_bytes = {k: c2.bytes[k] - c0.bytes[k] for k in c2.bytes}
    msg_split, msg_kinds = per_broadcast(kinds_msgs, count)
    byte_split, byte_kinds = per_broadcast(kinds_bytes, count)
    gossip_received = c2.tree["gossip_received"] - c0.tree["gossip_received"]
    frames = c2.frames - c0.frames
    window = max(last_arrival - first_send, 1e-9)
    cpu_window, cpu_tail = c1.cpu - c0.cpu, c2.cpu - c0.cpu
    per = max(delivered, 1)
    return {
        "broadcasts": count,
        "pace_ms": round(pace * 1e3, 3) if pace is not None else None,
        "send_s": round(sent_s, 3),
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
            k: c2.tree[k] - c0.tree[k]
            for k in ("grafts_sent", "duplicates", "prunes_sent", "ihave_sent", "graft_misses")
        },
        "active_views_changed": views_changed,
        "window_s": round(window, 3),
        "deliveries_per_s": round(delivered / window),
        "cpu_us_per_delivery": round(cpu_window / per * 1e6, 2),
        "cpu_us_per_delivery_with_tail": round(cpu_tail / per * 1e6, 2),
        "cpu_us_per_delivery_net_of_idle": round(
            (cpu_window - idle_rate * (t_done - t0)) / per * 1e6, 2
        ),
        "cpu_utilisation": round(cpu_window / max(t_done - t0, 1e-9), 3),
        # Websocket frames of every kind (a link may batch several messages in one frame).
        "frames_sent": frames,
        "frames_per_delivery": round(frames / per, 2),
        # Raw per-delivery delays for the distribution picture, in ms.
        "delays_ms": [round(d * 1e3, 3) for d in sorted(every)],
    }


PHASES = ("plumtree_paced", "plumtree_asap", "flood_paced", "flood_asap")


async def size_run(
    mode: str,
    n: int,
    count: int,
    pace: float,
    size: int,
    rng: random.Random,
    ws_cpu: float,
    ws_paced_cpu: float,
    idle_s: float = IDLE_S,
) -> dict[str, Any]:
    """Every broadcast phase on one N-node cluster: Plumtree, then flooding on its links."""
    watch = Watch(n)
    opener = open_inproc if mode == "inproc" else open_procs
    t_start = time.monotonic()
    async with opener(n, watch) as cluster:
        started_s = time.monotonic() - t_start
        await wait_views(cluster, MIN_ACTIVE, 60.0)
        formed = time.monotonic() - t_start
        at_formation = await cluster.counters()
        progress(f"{mode} N={n}: started in {started_s:.2f} s, overlay formed in {formed:.2f} s")
        warm = await warm_up(cluster, rng, size, pace)
        progress(
            f"{mode} N={n}: warm-up steady {warm['steady']} after {warm['seconds']} s, "
            f"{len(warm['rounds'])} rounds; active sizes {warm['active_sizes']}"
        )
        # The CPU of N idle nodes (timers, keepalives, shuffles), to net out of the windows,
        # and whether the overlay holds while idle: link churn and false failures.
        c0, t0 = await cluster.counters(), time.monotonic()
        await trio.sleep(idle_s)
        c1 = await cluster.counters()
        wall = time.monotonic() - t0
        idle_rate = (c1.cpu - c0.cpu) / wall
        idle = {
            "seconds": round(wall, 1),
            "cpu_cores": round(idle_rate, 4),
            "links_per_minute": round((c1.links_established - c0.links_established) / wall * 60, 1),
            "false_failures": c1.false_failures - c0.false_failures,
            "suspicions": c1.suspicions - c0.suspicions,
            "still_formed": views_ok(await cluster.views(), min_active=MIN_ACTIVE),
        }
        progress(
            f"{mode} N={n}: idle {idle['seconds']} s: {idle['cpu_cores']} cores, "
            f"{idle['links_per_minute']} links/min, {idle['false_failures']} false failures, "
            f"still formed {idle['still_formed']}"
        )
        phases: dict[str, Any] = {}
        for k, phase in enumerate(PHASES):
            if phase == "flood_paced":
                # Same links, every one eager: flooding over the overlay Plumtree just used.
                await cluster.set_flooding(True)
                await trio.sleep(TAIL_S)
            seqs = list(range(k * count, (k + 1) * count))
            phase_pace = pace if phase.endswith("paced") else None
            figure = await measure(cluster, watch, seqs, rng, size, phase_pace, idle_rate)
            for key in ("cpu_us_per_delivery", "cpu_us_per_delivery_net_of_idle"):
                ratio = key.replace("cpu_us_per_delivery", "cpu_per_delivery") + "_over_ws"
                figure[ratio] = round(figure[key] / ws_cpu, 2)
            if phase_pace is not None:
                figure["cpu_per_delivery_over_ws_paced"] = round(
                    figure["cpu_us_per_delivery"] / ws_paced_cpu, 2
                )
            if not phase.endswith("paced"):
                figure.pop("delays_ms")
            phases[phase] = figure
            lat = figure["to_last_delivery"]
            progress(
                f"{mode} N={n} {phase}: last delivery p50 {lat.get('p50_ms')} ms "
                f"p99 {lat.get('p99_ms')} ms, lost {figure['lost_deliveries']}, "
                f"rmr {figure['rmr']}, ldh {figure['ldh_mean']}, "
                f"{figure['deliveries_per_s']} deliveries/s, "
                f"{figure['cpu_us_per_delivery']} us CPU/delivery "
                f"({figure['cpu_per_delivery_over_ws']}x ws; net of idle "
                f"{figure['cpu_per_delivery_net_of_idle_over_ws']}x), "
                f"{figure['frames_per_delivery']} frames/delivery"
            )
        final = await cluster.counters()
    rss = final.peak_rss_kib
    return {
        "mode": mode,
        "nodes": n,
        "payload_bytes": len(encode_payload(payload_of(0, size), max_size=1 << 20)),
        "started_s": round(started_s, 2),
        "formed_s": round(formed, 2),
        "warmup": warm,
        "idle_cpu_utilisation": round(idle_rate, 4),
        "idle_cpu_utilisation_per_node": round(idle_rate / n, 5),
        "links_at_formation": at_formation.links_established,
        "false_failures_at_formation": at_formation.false_failures,
        "idle": idle,
        "false_failures_total": final.false_failures,
        "suspicions_total": final.suspicions,
        # procs: each node's own process; inproc: the one process holding every node
        # (and every earlier cluster of the sweep: ru_maxrss never goes down).
        "peak_rss_kib": {
            "per_process": "node" if mode == "procs" else "all nodes",
            "mean": round(sum(rss) / len(rss)),
            "max": max(rss),
        },
        "phases": phases,
    }


async def run(
    modes: Sequence[str],
    sizes: Sequence[int],
    count: int,
    pace: float,
    size: int,
    seed: int,
    map_nodes: int,
    idle_s: float = IDLE_S,
) -> dict[str, Any]:
    rng = random.Random(seed)
    t_start = time.monotonic()
    ceiling = await websocket_ceiling()
    ws_cpu = ceiling["cpu_us_per_message"]
    progress(f"websocket ceiling: {ceiling['messages_per_s']} msg/s, {ws_cpu} us CPU per message")
    paced_ceiling = await websocket_ceiling(pace=CEILING_PACE)
    progress(
        f"websocket, one frame every {CEILING_PACE * 1e3:g} ms: "
        f"{paced_ceiling['cpu_us_per_message']} us CPU per message"
    )
    reference = await trio_websocket_reference()
    runs = [
        await size_run(
            mode, n, count, pace, size, rng, ws_cpu, paced_ceiling["cpu_us_per_message"], idle_s
        )
        for mode in modes
        for n in sizes
    ]
    maps: dict[str, Any] | None = None
    if map_nodes:
        from cluster_map import map_run

        maps = await map_run(map_nodes, seed=seed, progress=progress)
    return {
        "websocket_ceiling": ceiling,
        "websocket_paced": paced_ceiling,
        "trio_websocket_reference": reference,
        "broadcast": runs,
        "map": maps,
        "total_s": round(time.monotonic() - t_start, 1),
    }


# --- pictures and summary -----------------------------------------------------------------

#: How each broadcast phase is drawn.
STYLES = {"plumtree": "o-", "flood": "s--"}


def pictures(result: dict[str, Any], stem: str) -> list[str]:
    """PNGs of the result; matplotlib is imported here only (the `bench` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["broadcast"]
    modes = sorted({r["mode"] for r in runs})
    written = []

    fig, axes = plt.subplots(1, len(modes), figsize=(7 * len(modes), 4.6), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        for figure in (r for r in runs if r["mode"] == mode):
            phase = figure["phases"]["plumtree_paced"]
            delays = phase["delays_ms"]
            if delays:
                ys = [(i + 1) / len(delays) for i in range(len(delays))]
                ax.plot(delays, ys, label=f"N = {figure['nodes']}")
        ax.set_xscale("log")
        ax.set_xlabel("delivery time after broadcast (ms, log)")
        ax.set_ylabel("fraction of deliveries")
        ax.set_title(f"Plumtree delivery times, {mode}, paced")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = RESULTS / f"{stem}_delivery.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(str(path))

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    ws = result["websocket_ceiling"]["cpu_us_per_message"]
    for mode in modes:
        mine = [r for r in runs if r["mode"] == mode]
        ns = [r["nodes"] for r in mine]
        for protocol, style in STYLES.items():
            phase = f"{protocol}_paced"
            label = f"{protocol} ({mode})"
            left.plot(ns, [r["phases"][phase]["rmr"] for r in mine], style, label=label)
            right.plot(
                ns, [r["phases"][phase]["cpu_us_per_delivery"] for r in mine], style, label=label
            )
    left.axhline(0.1, color="grey", linestyle=":", label="target 0.1")
    left.set_xlabel("nodes")
    left.set_ylabel("RMR")
    left.set_title("relative message redundancy, paced broadcasts")
    left.legend()
    left.grid(True, alpha=0.3)
    right.axhline(ws, color="black", linestyle="-", label="raw websocket message")
    right.axhline(2 * ws, color="grey", linestyle=":", label="2x raw (target)")
    right.set_xlabel("nodes")
    right.set_ylabel("CPU us")
    right.set_ylim(bottom=0)
    right.set_title("CPU per delivery, paced broadcasts")
    right.legend(fontsize="small")
    right.grid(True, alpha=0.3)
    fig.tight_layout()
    path = RESULTS / f"{stem}_rmr_cpu.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(str(path))

    if result.get("map"):
        from cluster_map import map_pictures

        written += map_pictures(result["map"], RESULTS, stem)
    return written


def summary(result: dict[str, Any]) -> str:
    """The Markdown summary: one table of broadcast figures, then the map figures."""
    ceiling, paced = result["websocket_ceiling"], result["websocket_paced"]
    lines = [
        f"# Cluster benchmark, {result['date']}",
        "",
        f"`{result['command']}` on {result['machine']['cpus']} CPUs, "
        f"Python {result['machine']['python']}, {result['machine']['platform']}.",
        "",
        f"Raw websocket ceiling (one connection, {ceiling['frame_bytes']}-byte frames): "
        f"{ceiling['messages_per_s']:,} messages/s, {ceiling['cpu_us_per_message']} us CPU "
        'per message (both ends), the "x raw" below; one frame every '
        f"{paced['pace_ms']:g} ms: {paced['cpu_us_per_message']} us per message, the "
        '"x paced raw" of the paced phases (each message wakes both ends on its own).',
        "",
        "| mode | N | phase | last delivery p50 / p99 (ms) | lost | RMR | LDH | "
        "deliveries/s | CPU us/delivery (x raw) | net of idle (x raw) | frames/delivery | "
        "peak RSS/node (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in result["broadcast"]:
        rss = run["peak_rss_kib"]
        rss_text = f"{rss['mean'] / 1024:.1f}" if rss["per_process"] == "node" else "-"
        for phase, f in run["phases"].items():
            lat = f["to_last_delivery"]
            paced_ratio = ""
            if "cpu_per_delivery_over_ws_paced" in f:
                paced_ratio = f", {f['cpu_per_delivery_over_ws_paced']}x paced raw"
            lines.append(
                f"| {run['mode']} | {run['nodes']} | {phase.replace('_', ' ')} | "
                f"{lat.get('p50_ms', '-')} / {lat.get('p99_ms', '-')} | "
                f"{f['lost_deliveries']} | {f['rmr']} | {f['ldh_mean']} | "
                f"{f['deliveries_per_s']:,} | {f['cpu_us_per_delivery']} "
                f"({f['cpu_per_delivery_over_ws']}x{paced_ratio}) | "
                f"{f['cpu_us_per_delivery_net_of_idle']} "
                f"({f['cpu_per_delivery_net_of_idle_over_ws']}x) | {f['frames_per_delivery']} | "
                f"{rss_text} |"
            )
    lines += [
        "",
        "| mode | N | started (s) | overlay formed (s) | warm-up (s) | idle CPU (cores) | "
        "idle: links/min, false failures, still formed | false failures, whole run | "
        "peak RSS (MiB): per node mean / max, or the whole process |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in result["broadcast"]:
        rss, idle = run["peak_rss_kib"], run["idle"]
        rss_text = (
            f"{rss['mean'] / 1024:.1f} / {rss['max'] / 1024:.1f}"
            if rss["per_process"] == "node"
            else f"{rss['max'] / 1024:.0f} (process)"
        )
        lines.append(
            f"| {run['mode']} | {run['nodes']} | {run['started_s']} | {run['formed_s']} | "
            f"{run['warmup']['seconds']} | {run['idle_cpu_utilisation']} | "
            f"{idle['links_per_minute']}, {idle['false_failures']}, {idle['still_formed']} "
            f"({idle['seconds']} s) | {run['false_failures_total']} | {rss_text} |"
        )
    maps = result.get("map")
    if maps:
        from cluster_map import map_summary

        lines += ["", *map_summary(maps)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)

    def ints(text: str) -> tuple[int, ...]:
        return tuple(int(x) for x in text.split(","))

    parser.add_argument("--modes", default="inproc,procs", help="inproc, procs or both")
    parser.add_argument("--sizes", type=ints, default=SIZES, help="cluster sizes (10,25,50)")
    parser.add_argument("--count", type=int, default=COUNT, help="broadcasts per phase")
    parser.add_argument("--pace-ms", type=float, default=PACE * 1e3)
    parser.add_argument("--payload", type=int, default=PAYLOAD, help="payload bytes")
    parser.add_argument("--map-nodes", type=int, default=MAP_NODES, help="0: no map run")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument(
        "--idle-s", type=float, default=IDLE_S, help="idle window after the warm-up (1 s)"
    )
    parser.add_argument("--stem", default="cluster", help="result file names start with this")
    parser.add_argument("--no-write", action="store_true", help="write no files")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if not modes or set(modes) - {"inproc", "procs"}:
        parser.error("--modes takes inproc, procs or both, comma-separated")
    quiet_logs()
    figures = trio.run(
        run,
        modes,
        args.sizes,
        args.count,
        args.pace_ms / 1e3,
        args.payload,
        args.seed,
        args.map_nodes,
        args.idle_s,
    )
    result = {**run_header("cluster", seed=args.seed), **figures}
    text = json.dumps(result, indent=2)
    print(text)
    if args.no_write:
        print(summary(result), file=sys.stderr)
        return
    RESULTS.mkdir(exist_ok=True)
    stem = f"{args.stem}_{result['date'][:10]}"
    (RESULTS / f"{stem}.json").write_text(text + "\n")
    (RESULTS / f"{stem}.md").write_text(summary(result))
    try:
        written = pictures(result, stem)
    except ImportError:
        progress("matplotlib is not installed (the bench extra): no pictures")
    else:
        progress("wrote " + ", ".join([f"{stem}.json", f"{stem}.md", *written]))


if __name__ == "__main__":
    main()
