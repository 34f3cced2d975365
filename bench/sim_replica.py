"""Replication at scale on the simulator: the replica core's digest anti-entropy at 1,000 nodes
(issue 14).

A script: ``.venv/bin/python bench/sim_replica.py --nodes 1000 --seed 1``. It writes
``bench/results/sim_replica_<nodes>.json`` and, with matplotlib (the ``bench`` extra), a PNG
of the convergence curves. Virtual time only (`trio_replica.sim.replica`: the real
`ReplicationCore`, real `ORMap`s, real `SyncDigest`/`SyncChunk` messages whose encoded bytes
are counted); the figures depend only on the seed.

Every node hosts one map of `keys` keys (the same at start) and runs membership, Plumtree
(writes travel as the runtime's deltas) and the replica layer. Phases:

* ``steady``: an idle window of several anti-entropy periods on the formed cluster: the
  comparisons completed and the bytes they cost (all replicas equal: each is an opening
  of 16 digests and a bare answer), per comparison and per node per period, beside the
  bytes of one full-state copy.
* ``writing``: `rate` writes a second from random nodes for `seconds`, with follow-ups
  and without: comparisons per node per minute and sync bytes per node per second. While
  writes keep coming, comparisons find entries still on their way by broadcast, and
  follow-ups (which that counts as news) cost more than periodic anti-entropy alone;
  `follow_up_budget` bounds it.
* ``partition`` (one per scenario): the nodes split in two halves (a seed on each side, so
  the overlay merges back: issue 15 covers the seeds-on-one-side case), `writes` new keys
  written on each side while apart (spread there by Plumtree), then the heal. Measured
  each second after it: whether the overlay is one component, and the fraction of replicas
  holding the union of both sides; the convergence time; the bytes of sync traffic from
  the heal to convergence beside the bytes a full-state anti-entropy would have moved to
  repair the same replicas (each replica sent one full copy).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trio_replica.core.hlc import Timestamp
from trio_replica.core.hyparview import HyParViewConfig
from trio_replica.core.ormap import Dot, ORMap, Value
from trio_replica.core.ormap_wire import to_wire
from trio_replica.core.replication import DigestSyncConfig
from trio_replica.core.wire import encode_payload
from trio_replica.sim.graph import active_graph, is_connected
from trio_replica.sim.overlay import DriverConfig, Simulator
from trio_replica.sim.replica import (
    REPLICA,
    ReplicaLayer,
    bytes_sent,
    converged,
    digests,
    replica_stack,
    write,
)

RESULTS = Path(__file__).parent / "results"


def base_state(keys: int) -> ORMap:
    state = ORMap()
    for i in range(keys):
        state.merge_entry(f"key-{i}", Value(i, Dot("origin", Timestamp(1_600_000_000_000 + i, 0))))
    return state


def full_copy_bytes(state: ORMap) -> int:
    """Bytes of one full-state copy as sync chunks carry it (CBOR of the wire entries)."""
    return len(encode_payload(to_wire(state.entries()), max_size=1 << 30))


def build(
    n: int, seed: int, keys: int, interval: float, follow_up: float = 1.0
) -> tuple[Simulator, ORMap]:
    state = base_state(keys)
    hv = HyParViewConfig()
    sim = Simulator(
        seed,
        hyparview=hv,
        driver=DriverConfig(rejoin="seeds"),
        stack_factory=replica_stack(
            hv,
            initial=lambda _: state.copy(),
            anti_entropy_interval=interval,
            digest=DigestSyncConfig(follow_up=follow_up),
        ),
    )
    seeds = ["n0", f"n{n // 2}"]
    for i in range(n):
        sim.add_node(f"n{i}", seeds, at=i * 0.01)
    sim.run(60)
    return sim, state


def _layers(sim: Simulator) -> list[ReplicaLayer]:
    return [
        layer
        for node in sim.alive_nodes()
        if isinstance(layer := node.stack.layers.get(REPLICA), ReplicaLayer)
    ]


def _sessions(sim: Simulator) -> int:
    return sum(layer.core.digest_stats.sessions_completed for layer in _layers(sim))


def steady(sim: Simulator, state: ORMap, periods: int, interval: float) -> dict[str, Any]:
    b0, s0, t0 = sum(bytes_sent(sim).values()), _sessions(sim), sim.now
    sim.run_for(periods * interval)
    spent = sum(bytes_sent(sim).values()) - b0
    sessions = _sessions(sim) - s0
    n = len(sim.alive_nodes())
    return {
        "virtual_s": sim.now - t0,
        "comparisons": sessions,
        "bytes": spent,
        "bytes_per_comparison": round(spent / max(sessions, 1), 1),
        "bytes_per_node_per_period": round(spent / n / periods, 1),
        "full_copy_bytes": full_copy_bytes(state),
        "converged": converged(sim),
    }


def writing(
    n: int, seed: int, keys: int, interval: float, follow_up: float, rate: float, seconds: float
) -> dict[str, Any]:
    wall0 = time.monotonic()
    sim, _ = build(n, seed, keys, interval, follow_up)
    layers = _layers(sim)
    opened0 = sum(layer.core.digest_stats.sessions_opened for layer in layers)
    bytes0 = sum(bytes_sent(sim).values())
    rng = random.Random(seed)
    ids = sorted(sim.nodes)
    written = 0
    step = 0.1
    for _ in range(round(seconds / step)):
        # Poisson-ish: each step writes `rate * step` on average.
        for _ in range(rng.randint(0, max(1, round(2 * rate * step)))):
            write(sim, rng.choice(ids), f"w-{written}", written)
            written += 1
        sim.run_for(step)
    opened = sum(layer.core.digest_stats.sessions_opened for layer in layers) - opened0
    spent = sum(bytes_sent(sim).values()) - bytes0
    return {
        "follow_up_s": follow_up,
        "writes": written,
        "seconds": seconds,
        "comparisons_per_node_per_min": round(opened / n / (seconds / 60), 2),
        "sync_bytes_per_node_per_s": round(spent / n / seconds, 1),
        "follow_ups": sum(layer.core.digest_stats.follow_ups for layer in layers),
        "wall_s": round(time.monotonic() - wall0, 1),
    }


def partition(
    n: int, seed: int, keys: int, interval: float, writes: int, apart: float, follow_up: float
) -> dict[str, Any]:
    wall0 = time.monotonic()
    sim, _ = build(n, seed, keys, interval, follow_up)
    ids = [f"n{i}" for i in range(n)]
    left, right = ids[: n // 2], ids[n // 2 :]
    sim.partition([set(left)])
    sim.run_for(10)
    for j in range(writes):
        write(sim, left[(j * 7) % len(left)], f"left-{j}", j)
        write(sim, right[(j * 7) % len(right)], f"right-{j}", j)
    sim.run_for(apart)
    sides = len(digests(sim))
    # The union of both sides: what every replica holds once repaired.
    target = sim.nodes[left[0]].stack.layers[REPLICA].map.copy()  # type: ignore[attr-defined]
    target.merge(sim.nodes[right[0]].stack.layers[REPLICA].map)  # type: ignore[attr-defined]
    goal = target.range_digest(0, 0)
    needing = sum(1 for layer in _layers(sim) if layer.map.range_digest(0, 0) != goal)
    before = bytes_sent(sim)
    healed_at = sim.now
    sim.heal()
    curve: list[tuple[float, float, bool]] = []
    connected_at = None
    done_at = None
    while sim.now < healed_at + 20 * interval:
        sim.run_for(1.0)
        layers = _layers(sim)
        holding = sum(1 for layer in layers if layer.map.range_digest(0, 0) == goal) / len(layers)
        connected = is_connected(active_graph(sim))
        if connected and connected_at is None:
            connected_at = sim.now - healed_at
        curve.append((round(sim.now - healed_at, 1), round(holding, 4), connected))
        if holding == 1.0:
            done_at = sim.now - healed_at
            break
    after = bytes_sent(sim)
    moved = {k: after[k] - before[k] for k in after}
    full = full_copy_bytes(target)
    return {
        "writes_per_side": writes,
        "interval_s": interval,
        "follow_up_s": follow_up,
        "apart_s": apart,
        "digests_before_heal": sides,
        "replicas_needing_repair": needing,
        "overlay_connected_after_s": connected_at,
        "converged_after_s": done_at,
        "converged_after_periods": None if done_at is None else round(done_at / interval, 2),
        "half_after_s": next((t for t, f, _ in curve if f >= 0.5), None),
        "p99_after_s": next((t for t, f, _ in curve if f >= 0.99), None),
        "sync_bytes": moved,
        "sync_bytes_total": sum(moved.values()),
        "full_copy_bytes": full,
        "full_state_repair_bytes": full * needing,
        "ratio_to_full_state": round(sum(moved.values()) / (full * needing), 5),
        "curve": curve,
        "wall_s": round(time.monotonic() - wall0, 1),
    }


def plot(result: dict[str, Any], prefix: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for run in result["partition"]:
        xs = [p[0] for p in run["curve"]]
        ys = [100 * p[1] for p in run["curve"]]
        label = f"{run['writes_per_side']} writes/side, period {run['interval_s']:.0f} s"
        if not run["follow_up_s"]:
            label += ", no follow-ups"
        ax.plot(xs, ys, label=label)
    ax.set_xlabel("seconds after the heal")
    ax.set_ylabel("% of replicas holding both sides' writes")
    ax.set_title(f"{result['nodes']} nodes, {result['keys']} keys: repair after a partition")
    ax.legend()
    ax.grid(alpha=0.3)
    path = prefix.parent / (prefix.name + "_heal.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=30.0)
    parser.add_argument("--periods", type=int, default=10)
    parser.add_argument("--apart", type=float, default=120.0)
    parser.add_argument("--rate", type=float, default=10.0, help="writes per second (writing)")
    args = parser.parse_args(argv)
    wall0 = time.monotonic()
    sim, state = build(args.nodes, args.seed, args.keys, args.interval)
    result: dict[str, Any] = {
        "nodes": args.nodes,
        "seed": args.seed,
        "keys": args.keys,
        "interval_s": args.interval,
        "python": platform.python_version(),
        "formed_converged": converged(sim),
        "steady": steady(sim, state, args.periods, args.interval),
    }
    print(f"steady: {result['steady']}", file=sys.stderr)
    del sim
    result["writing"] = [
        writing(args.nodes, args.seed, args.keys, args.interval, follow_up, args.rate, 60.0)
        for follow_up in (1.0, 0.0)
    ]
    print(f"writing: {result['writing']}", file=sys.stderr)
    runs = []
    scenarios = (
        (1, args.interval, 1.0),
        (100, args.interval, 1.0),
        (100, args.interval / 3, 1.0),
        (1, args.interval, 0.0),  # without follow-ups: one anti-entropy period per hop
    )
    for writes, interval, follow_up in scenarios:
        run = partition(args.nodes, args.seed, args.keys, interval, writes, args.apart, follow_up)
        print({k: v for k, v in run.items() if k != "curve"}, file=sys.stderr)
        runs.append(run)
    result["partition"] = runs
    result["wall_s"] = round(time.monotonic() - wall0, 1)
    RESULTS.mkdir(exist_ok=True)
    prefix = RESULTS / f"sim_replica_{args.nodes}"
    prefix.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {prefix.with_suffix('.json')}", file=sys.stderr)
    try:
        for path in plot(result, prefix):
            print(f"wrote {path}", file=sys.stderr)
    except ImportError:
        print("matplotlib not installed: no pictures (pip install -e '.[bench]')", file=sys.stderr)


if __name__ == "__main__":
    main()
