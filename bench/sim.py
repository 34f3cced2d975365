"""Experiments at scale on the simulator: the HyParView (DSN 2007) and Plumtree (SRDS 2007)
papers' figures, reproduced with the very cores the nodes run (issue 8).

A script: ``.venv/bin/python bench/sim.py --nodes 1000 --seed 1`` (``--phases`` runs
some of the phases below, ``--optimization-streak`` and ``--ihave-batch-window`` set
Plumtree's on every node; the file's name then says so). It writes one JSON
document to ``bench/results/sim_<nodes>.json`` and, when matplotlib is installed (the
``bench`` extra), PNGs ``bench/results/sim_<nodes>_*.png``. Everything runs in virtual time
(`trio_replica.sim.overlay.Simulator`), so the figures depend only on the seed; the wall-clock time
of each phase is reported beside them. The functions are importable: the CI test
``tests/test_sim_experiments.py`` runs them on 200 nodes.

Phases, in the order they run, all from one stabilised overlay (`build`):

* ``overlay``: clustering coefficient, average shortest path, in- and out-degree
  distributions of the active views, and the last delivery hop of flooding and Plumtree.
* ``failures`` (HyParView paper section 5.2) and ``healing`` (section 5.3): for each
  failure rate, a copy of the overlay loses that fraction of its nodes at once (any node,
  the seed included). Then one broadcast per `interval` from a random survivor, flooding
  over the active views (as the paper) and Plumtree, for `cycles` shuffle periods.
  Reliability counts survivors. Reported: the first broadcast (sent at the crash instant:
  the overlay as it stands, nobody has detected anything), the mean over the first shuffle
  period (reactive repair only: shuffles refresh passive views, never active ones), and
  the healing time: from which broadcast on every broadcast reached every survivor. A
  row ends early once two periods of broadcasts reached every survivor (nothing crashes
  after the first instant: what healed stays healed). Failures are detected as in the
  paper (a send to a crashed peer fails at once).
* ``failures_runtime_detection``: the same with the runtime's failure detection (ping
  timeout 3 s, failed dial 1 s), Plumtree alone: the runtime's broadcast.
* ``plumtree`` (SRDS 2007 section 4): broadcasts from random nodes, one every
  `interval`, alternating Plumtree and flooding on the same overlay; RMR, LDH and
  reliability per message, stable and then under churn (every shuffle period, `churn` of
  the nodes crash and as many new ones join through the seed).
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import heapq
import json
import math
import os
import pickle
import platform
import random
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import attrs

from trio_replica.core.hyparview import HyParViewConfig
from trio_replica.core.messages import MessageId
from trio_replica.core.plumtree import PlumtreeConfig
from trio_replica.sim.broadcast import (
    BROADCAST,
    FLOOD,
    BroadcastMetrics,
    PlumtreeLayer,
    broadcast_stack,
)
from trio_replica.sim.graph import (
    active_graph,
    average_shortest_path,
    clustering_coefficient,
    components,
    in_degree_distribution,
    triangles,
)
from trio_replica.sim.network import NetworkConfig
from trio_replica.sim.overlay import DriverConfig, Simulator

RESULTS = Path(__file__).resolve().parent / "results"
FAILURE_RATES = (0.10, 0.20, 0.40, 0.60, 0.70, 0.80, 0.90, 0.95)
SEED_NODE = "seed"

#: The papers' figures we compare with (../shared/papers.md: HyParView TR-07-13 section 5,
#: Plumtree TR-07-14 section 4; 10,000 nodes, read from the plots' data).
PAPER: dict[str, Any] = {
    "source": "HyParView DI-FCUL TR-07-13 section 5; Epidemic Broadcast Trees TR-07-14"
    " section 4; 10,000 nodes, PeerSim",
    # Fig. 3: mean reliability (%) of the first 10 messages after the crash.
    "first_10_messages": {"0.4": 99.87, "0.6": 95.45, "0.7": 90.94, "0.8": 88.08, "0.95": 56.25},
    # Fig. 2: mean reliability (%) of 1,000 messages sent before the next membership cycle.
    "mean_1000_messages": {
        "0.1": 100.0,
        "0.2": 100.0,
        "0.4": 100.0,
        "0.6": 99.94,
        "0.7": 99.91,
        "0.8": 99.88,
        "0.9": 99.65,
        "0.95": 90.86,
    },
    # Fig. 4: membership cycles until reliability is back to its value before the crash.
    "healing_cycles": {"0.1": 1, "0.2": 1, "0.4": 1, "0.6": 1, "0.7": 2, "0.8": 2, "0.9": 4},
    # Table 1: the overlay after 50 cycles.
    "clustering_coefficient": 0.00092,
    "average_shortest_path": 6.38542,
    "ldh_flooding": 9.0,
    # Fig. 5: in-degree of the active views.
    "in_degree": {"5": 9980, "4": 11, "3": 7, "2": 2},
    # TR-07-14 Fig. 2a, 2c and 3: RMR and LDH, stable and under 0.5% failures per cycle.
    "plumtree": {
        "rmr_stable": {"eager": 3.00, "plumtree": 0.0},
        "ldh_stable": {"eager": 8.8, "ss": 10.0, "opt_ss": 8.3, "ms": 59.4, "opt_ms": 17.2},
        "rmr_churn": {"eager": 2.955, "ss": 0.058, "ms": 0.066, "opt_ss": 0.024, "opt_ms": 0.026},
        "ldh_churn": {"eager": 8.4, "ss": 19.7, "ms": 54.8, "opt_ss": 10.5, "opt_ms": 19.6},
    },
}


# --- building blocks ------------------------------------------------------------------------------


#: The two ways `build` forms the overlay (`--model`).
MODELS = ("ours", "paper")
#: One-way latency of every link in the paper's model: the papers' engine is cycle-based
#: (unit delay), so every hop costs the same and the first copy to arrive took the fewest.
PAPER_LATENCY = 0.01


def build(
    n: int,
    seed: int,
    *,
    model: str = "ours",
    join_spread: float | None = None,
    settle: float = 60.0,
    cycles: int = 50,
    plumtree: PlumtreeConfig | None = None,
) -> Simulator:
    """N nodes joining through one contact, then a stabilisation period, then five Plumtree
    broadcasts (the first floods: the tree forms, as in a running system).

    `model` "ours": every node runs the runtime's seeding policy and joins at a random time
    within `join_spread` seconds (default n / 50: 50 joins a second through the seed),
    links have 5-50 ms latency drawn per pair, then `settle` seconds.
    `model` "paper" (HyParView TR-07-13 section 5.1): nodes join one at a time, each after
    the previous join's walks have ended, with no membership round until all have joined;
    every link has the same latency; then `cycles` shuffle periods. No seeding policy: a
    node joins once, as in the paper (which has no re-join path).
    `plumtree`: every node's Plumtree configuration (default: the runtime's).
    """
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, not {model!r}")
    config = HyParViewConfig()
    paper = model == "paper"
    network = (
        NetworkConfig(latency_min=PAPER_LATENCY, latency_max=PAPER_LATENCY)
        if paper
        else NetworkConfig()
    )
    sim = Simulator(
        seed,
        network=network,
        hyparview=config,
        driver=DriverConfig(rejoin="off" if paper else "seeds"),
        stack_factory=broadcast_stack(config, plumtree),
    )
    sim.add_node(SEED_NODE)
    if paper:
        # A join's messages: JOIN and its answer, the walks (arwl hops), the NEIGHBOR
        # handshake at their ends; the next node starts after all of them.
        gap = (config.arwl + 6) * PAPER_LATENCY
        sim.hold_rounds(0.5 + n * gap)
        sim.run(0.5)
        for i in range(n - 1):
            sim.add_node(f"n{i}")
            sim.run_for(0.0)  # boot
            sim.join(f"n{i}", SEED_NODE)
            sim.run_for(gap)
        sim.run(sim.rounds_from + cycles * config.shuffle_interval)
    else:
        spread = join_spread if join_spread is not None else max(2.0, n / 50)
        for i in range(n - 1):
            sim.add_node(f"n{i}", [SEED_NODE], at=0.5 + sim.rng.uniform(0, spread))
        sim.run(0.5 + spread + settle)
    # A few Plumtree broadcasts build the tree (the first floods), as a running system has.
    alive = _alive_ids(sim)
    for _ in range(5):
        sim.broadcast(sim.rng.choice(alive), BROADCAST)
        sim.run_for(1.0)
    return sim


def _summary(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    return {
        "mean": statistics.fmean(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        "p50": ordered[len(ordered) // 2],
    }


def _metrics_dict(m: BroadcastMetrics) -> dict[str, Any]:
    return {
        "reliability": m.reliability,
        "rmr": m.rmr,
        "ldh": m.ldh,
        "delivered": m.delivered,
        "eligible": m.eligible,
    }


def _alive_ids(sim: Simulator) -> list[str]:
    return sorted(node.id for node in sim.alive_nodes())


T = TypeVar("T")


def _on_a_copy(base: Simulator, phase: Callable[[Simulator], T]) -> T:
    """`phase` run on a copy of `base`, which is left as it was; its result must pickle.

    Where the OS forks (and no other thread could hold a lock the child needs), the copy
    is a forked child's copy-on-write image of this process: nothing is copied up front,
    the child runs without the cyclic garbage collector (it exits soon; the collector's
    passes over a 10,000-node heap cost more than they free) and sends the result back.
    Elsewhere, a deep copy. Either way the phase sees the same state, hence the same run.
    """
    if not hasattr(os, "fork") or threading.active_count() > 1:
        sim = copy.deepcopy(base)
        try:
            return phase(sim)
        finally:
            del sim
            if not gc.isenabled():
                gc.collect()  # the copy is a cycle (its pending events hold its methods)
    sys.stdout.flush()
    sys.stderr.flush()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        try:
            os.close(read)
            gc.disable()
            try:
                reply = pickle.dumps((True, phase(base)))
            except BaseException:
                reply = pickle.dumps((False, traceback.format_exc()))
            with os.fdopen(write, "wb") as out:
                out.write(reply)
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        reply = pipe.read()
    _, status = os.waitpid(pid, 0)
    if not reply:
        raise RuntimeError(f"the phase's child process died (wait status {status})")
    ok, value = pickle.loads(reply)
    if not ok:
        raise RuntimeError(f"the phase failed in its child process:\n{value}")
    return value  # type: ignore[no-any-return]


# --- overlay --------------------------------------------------------------------------------------


def overlay(sim: Simulator, *, broadcasts: int = 10, path_sources: int = 200) -> dict[str, Any]:
    """Graph properties of the active views (HyParView section 5.2) and LDH of both
    broadcasts, on a copy of `sim` (the original is not advanced)."""
    return _on_a_copy(
        sim, functools.partial(_overlay, broadcasts=broadcasts, path_sources=path_sources)
    )


def _overlay(sim: Simulator, *, broadcasts: int, path_sources: int) -> dict[str, Any]:
    graph = active_graph(sim)
    out_degrees: dict[int, int] = {}
    for peers in graph.values():
        out_degrees[len(peers)] = out_degrees.get(len(peers), 0) + 1
    result: dict[str, Any] = {
        "nodes": len(graph),
        "components": len(components(graph)),
        "clustering_coefficient": clustering_coefficient(graph),
        "triangles": triangles(graph),
        "average_shortest_path": average_shortest_path(
            graph, sources=path_sources, rng=random.Random(sim.seed)
        ),
        "path_sources": min(path_sources, len(graph)),
        "in_degree": {str(k): v for k, v in in_degree_distribution(graph).items()},
        "out_degree": {str(k): v for k, v in sorted(out_degrees.items())},
    }
    ids: dict[str, list[MessageId]] = {FLOOD: [], BROADCAST: []}
    alive = _alive_ids(sim)
    for _ in range(broadcasts):
        origin = sim.rng.choice(alive)
        for layer in (FLOOD, BROADCAST):
            ids[layer].append(sim.broadcast(origin, layer))
            sim.run_for(1.0)
    sim.run_for(5.0)
    for layer, label in ((FLOOD, "flood"), (BROADCAST, "plumtree")):
        metrics = [sim.broadcasts[i].metrics() for i in ids[layer]]
        result[f"ldh_{label}"] = _summary([m.ldh for m in metrics])
        result[f"reliability_{label}"] = _summary([m.reliability for m in metrics])
    return result


# --- massive failures and healing -----------------------------------------------------------------


#: Failure detection as the paper's simulations assume it: TCP tells a sender at once that
#: its peer's process is gone (a reset), so a send or a dial fails within a round trip.
PAPER_DETECTION = {"detect_delay": 0.1, "dial_fail_delay": 0.1}
#: Our runtime's defaults (SPEC section 3): a silent peer is declared dead after the ping
#: timeout, and a dial to a dead host fails after a connect timeout.
RUNTIME_DETECTION = {"detect_delay": 3.0, "dial_fail_delay": 1.0}


def failures(
    base: Simulator,
    rates: Sequence[float] = FAILURE_RATES,
    *,
    interval: float = 1.0,
    cycles: int = 5,
    detection: dict[str, float] = PAPER_DETECTION,
    layers: Sequence[str] = (FLOOD, BROADCAST),
    healed_cycles: int | None = 2,
) -> list[dict[str, Any]]:
    """HyParView sections 5.2 and 5.3: crash `rate` of the nodes at once, then broadcast
    (on each of `layers`, flooding and Plumtree by default, same origin) every `interval`
    for `cycles` shuffle periods, or until the broadcasts of the last `healed_cycles`
    periods (None: never) reached every survivor. `detection` sets the network's
    failure-detection delays for the run."""
    if healed_cycles is not None and healed_cycles < 1:
        raise ValueError(f"healed_cycles must be 1 or more (or None), not {healed_cycles}")
    return [
        _on_a_copy(
            base,
            functools.partial(
                _failure_row,
                rate=rate,
                interval=interval,
                cycles=cycles,
                detection=detection,
                layers=tuple(layers),
                healed_cycles=healed_cycles,
            ),
        )
        for rate in rates
    ]


#: The labels of the layers in the JSON.
LABELS = {FLOOD: "flood", BROADCAST: "plumtree"}


def _failure_row(
    sim: Simulator,
    *,
    rate: float,
    interval: float,
    cycles: int,
    detection: dict[str, float],
    layers: tuple[str, ...] = (FLOOD, BROADCAST),
    healed_cycles: int | None = 2,
) -> dict[str, Any]:
    """One failure rate of `failures`, on `sim` (a copy of the base).

    The row ends early once it has healed for good: when the last `healed_cycles` shuffle
    periods of broadcasts at least `SETTLE` seconds old all reached every survivor, on
    every layer. Nothing crashes after the first instant, so a healed overlay stays
    healed; the rows that heal at once (10-40% crashed, which hold most of the survivors
    hence most of the events) then take half the time. The reliability and healing
    figures are those of the full `cycles` (checked against full windows of both models
    at 10,000 nodes: README, "Scale"); `after` describes the overlay when the row ended.
    """
    period = sim.hyparview_config.shuffle_interval
    sim.network = attrs.evolve(sim.network, **detection)
    everyone = _alive_ids(sim)
    victims = sim.rng.sample(everyone, round(rate * len(everyone)))
    sim.crash(victims)
    crashed_at = sim.now
    survivors = _alive_ids(sim)
    # The overlay at the crash instant, before anyone detected anything: the first
    # flood can reach at most its origin's component of it (see `origin_component`).
    at_crash = components(active_graph(sim))
    cut_off = _cut_off(sim, survivors)
    sent: list[tuple[float, list[MessageId]]] = []
    steps = round(cycles * period / interval)
    first_origin: str | None = None
    healed_run = None if healed_cycles is None else round(healed_cycles * period / interval)
    settle_steps = math.ceil(SETTLE / interval)
    complete: set[MessageId] = set()
    for step in range(steps):
        origin = sim.rng.choice(survivors)
        first_origin = first_origin or origin
        ids = [sim.broadcast(origin, layer) for layer in layers]
        sent.append((sim.now - crashed_at, ids))
        sim.run_for(interval)
        settled = step + 1 - settle_steps + 1  # broadcasts sent at least SETTLE ago
        if healed_run is not None and settled >= healed_run:
            recent = sent[settled - healed_run : settled]
            if all(_reached_all(sim, id, complete) for _, ids in recent for id in ids):
                break
    sim.run_for(SETTLE)
    labels = [LABELS[layer] for layer in layers]
    series: dict[str, list[float]] = {"t": [], **{label: [] for label in labels}}
    # Reliability over the survivors that were not cut off at the crash (nobody can
    # reach those): the paper's healing question for the others.
    reachable_ids = set(survivors) - cut_off
    reachable: dict[str, list[float]] = {label: [] for label in labels}
    for t, ids in sent:
        series["t"].append(round(t, 6))
        for label, id in zip(labels, ids, strict=True):
            record = sim.broadcasts[id]
            series[label].append(record.metrics().reliability)
            reachable[label].append(record.metrics(reachable_ids).reliability)
    row: dict[str, Any] = {
        "rate": rate,
        "survivors": len(survivors),
        # Fraction of survivors in the first origin's component of the overlay at the
        # crash: the most the first flood can reach. Plumtree can beat it: its lazy
        # repair (IHAVE, then GRAFT after timeout1) runs after membership has replaced
        # dead active entries, and the grafted node forwards over its new links.
        "origin_component": next(
            (len(c) / len(survivors) for c in at_crash if first_origin in c), 0.0
        ),
        "components_at_crash": len(at_crash),
        "largest_component_at_crash": len(at_crash[0]) / len(survivors) if at_crash else 0.0,
    }
    first_cycle = [i for i, t in enumerate(series["t"]) if t < period]
    for label in labels:
        values = series[label]
        healed = _healed_at(series["t"], values)
        row[label] = {
            "first_broadcast": values[0],
            "first_cycle_mean": statistics.fmean(values[i] for i in first_cycle),
            "healed_after_s": healed,
            "healing_cycles": None if healed is None else math.ceil(healed / period),
        }
        healed = _healed_at(series["t"], reachable[label])
        row[label]["healed_reachable_after_s"] = healed
        row[label]["healing_cycles_reachable"] = (
            None if healed is None else math.ceil(healed / period)
        )
    graph = active_graph(sim)
    pieces = components(graph)
    outside = set().union(*pieces[1:]) if pieces else set()
    row["after"] = {
        "components": len(pieces),
        "largest_component": len(pieces[0]) if pieces else 0,
        "isolated": sum(1 for peers in graph.values() if not peers),
        # Survivors outside the largest component, and how many of them were cut off
        # at the crash (no live id in their views, in no survivor's views): no
        # protocol can find those without a live seed.
        "outside_largest": len(outside),
        "outside_cut_off_at_crash": len(outside & cut_off),
    }
    row["cut_off_at_crash"] = len(cut_off)
    row["series"] = series
    return row


#: Seconds a broadcast is given to reach everyone before it is judged.
SETTLE = 5.0


def _reached_all(sim: Simulator, id: MessageId, complete: set[MessageId]) -> bool:
    """Whether broadcast `id` reached every node alive when it was sent (`complete`: those
    found so; a count stops at 100%, nobody crashing after the first instant)."""
    if id in complete:
        return True
    record = sim.broadcasts[id]
    if len(record.hops) < len(record.alive_at_send) or record.metrics().reliability < 1.0:
        return False
    complete.add(id)
    return True


def _cut_off(sim: Simulator, survivors: Sequence[str]) -> set[str]:
    """Survivors with no live id in their active and passive views that no survivor's
    views hold either: nobody can reach them, and they know nobody to reach."""
    alive = set(survivors)
    known: set[str] = set()
    knows_someone: set[str] = set()
    for node_id in survivors:
        core = sim.nodes[node_id].hyparview
        ids = {p.id for p in core.active} | {p.id for p in core.passive}
        known |= ids
        if ids & alive:
            knows_someone.add(node_id)
    return alive - known - knows_someone


def _healed_at(times: Sequence[float], reliability: Sequence[float]) -> float | None:
    """Time of the broadcast from which every later one reached every survivor."""
    healed: float | None = None
    for t, value in zip(times, reliability, strict=True):
        if value < 1.0:
            healed = None
        elif healed is None:
            healed = t
    return healed


# --- Plumtree against flooding --------------------------------------------------------------------


def plumtree(
    base: Simulator,
    *,
    broadcasts: int = 60,
    warmup: int = 5,
    interval: float = 1.0,
    churn: float = 0.005,
    churn_cycles: int = 10,
) -> dict[str, Any]:
    """SRDS 2007 section 4: RMR, LDH, reliability of Plumtree and flooding, stable and under
    churn. Figures are over the messages after the first `warmup` (the first Plumtree
    broadcast floods to build the tree)."""
    return _on_a_copy(
        base,
        functools.partial(
            _plumtree,
            broadcasts=broadcasts,
            warmup=warmup,
            interval=interval,
            churn=churn,
            churn_cycles=churn_cycles,
        ),
    )


def _plumtree(
    sim: Simulator,
    *,
    broadcasts: int,
    warmup: int,
    interval: float,
    churn: float,
    churn_cycles: int,
) -> dict[str, Any]:
    period = sim.hyparview_config.shuffle_interval
    sent: dict[str, list[MessageId]] = {FLOOD: [], BROADCAST: []}
    alive = _alive_ids(sim)
    for _ in range(broadcasts):
        origin = sim.rng.choice(alive)
        sent[BROADCAST].append(sim.broadcast(origin, BROADCAST))
        sim.run_for(interval / 2)
        sent[FLOOD].append(sim.broadcast(origin, FLOOD))
        sim.run_for(interval / 2)
    sim.run_for(5.0)
    stable = {
        label: _layer_figures([sim.broadcasts[i].metrics() for i in sent[layer]], warmup)
        for layer, label in ((BROADCAST, "plumtree"), (FLOOD, "flood"))
    }

    # Churn: at the start of every shuffle period, `churn` of the live nodes crash (the
    # seed excepted: newcomers join through it) and as many new nodes join.
    crashed_at: dict[str, float] = {}
    churned: dict[str, list[MessageId]] = {FLOOD: [], BROADCAST: []}
    joined = 0
    per_cycle = max(1, round(churn * len(alive)))
    for _ in range(churn_cycles):
        candidates = [i for i in _alive_ids(sim) if i != SEED_NODE]
        victims = sim.rng.sample(candidates, per_cycle)
        sim.crash(victims)
        crashed_at.update(dict.fromkeys(victims, sim.now))
        for _ in range(per_cycle):
            sim.add_node(f"j{joined}", [SEED_NODE], at=sim.now + sim.rng.uniform(0, 1))
            joined += 1
        for _ in range(round(period / interval)):
            origin = sim.rng.choice(_alive_ids(sim))
            churned[BROADCAST].append(sim.broadcast(origin, BROADCAST))
            sim.run_for(interval / 2)
            churned[FLOOD].append(sim.broadcast(origin, FLOOD))
            sim.run_for(interval / 2)
    sim.run_for(5.0)
    under_churn: dict[str, Any] = {}
    for layer, label in ((BROADCAST, "plumtree"), (FLOOD, "flood")):
        metrics = []
        for id in churned[layer]:
            record = sim.broadcasts[id]
            # Nodes that crash within 5 s of the send cannot be blamed on the protocol.
            eligible = [
                n for n in record.alive_at_send if crashed_at.get(n, math.inf) > record.sent_at + 5
            ]
            metrics.append(record.metrics(eligible))
        under_churn[label] = _layer_figures(metrics, 0)
    layers = [node.stack.layers[BROADCAST] for node in sim.nodes.values()]
    grafts = sum(
        layer.core.stats.grafts_sent for layer in layers if isinstance(layer, PlumtreeLayer)
    )
    return {
        "stable": stable,
        "churn": under_churn,
        "churn_per_cycle": per_cycle,
        "churn_cycles": churn_cycles,
        "plumtree_grafts_total": grafts,
    }


def _layer_figures(metrics: list[BroadcastMetrics], warmup: int) -> dict[str, Any]:
    kept = metrics[warmup:]
    return {
        "first": _metrics_dict(metrics[0]) if metrics else None,
        "messages": len(kept),
        "rmr": _summary([m.rmr for m in kept]),
        "ldh": _summary([float(m.ldh) for m in kept]),
        "reliability": _summary([m.reliability for m in kept]),
        "series": [_metrics_dict(m) for m in metrics],
    }


# --- iroh-gossip's scenario -----------------------------------------------------------------------

#: iroh-gossip's `GossipMulti` scenario (its simulations/all.toml, src/bin/sim.rs): the
#: seeds it runs, its latency range, its round timeout.
IROH_SEEDS = (0, 1, 212312388123, 123)
IROH_LATENCY = (0.010, 0.050)
IROH_ROUND_TIMEOUT = 5.0


def iroh_multi(seed: int, *, nodes: int = 1000, rounds: int = 30) -> dict[str, Any]:
    """iroh-gossip's `GossipMulti` on our cores: every node joins one node at the same
    instant, 10-50 ms latency per pair, 20 trips of the largest latency to settle, then
    `rounds` rounds, each one Plumtree broadcast from a random node, run until every node
    has it or 5 s pass. Per round: RMR, LDH, nodes missed, time to the last delivery.
    The nodes run the runtime's seeding policy, re-join check included (`rejoin_chance`):
    a storm of joins can leave a few newcomers linked only among themselves, and that
    check is what merges them, as it does in a running cluster."""
    config = HyParViewConfig()
    sim = Simulator(
        seed,
        network=NetworkConfig(latency_min=IROH_LATENCY[0], latency_max=IROH_LATENCY[1]),
        hyparview=config,
        driver=DriverConfig(rejoin="runtime"),
        stack_factory=broadcast_stack(config),
    )
    sim.add_node("n0")
    for i in range(1, nodes):
        sim.add_node(f"n{i}", ["n0"])
    sim.run(20 * IROH_LATENCY[1])
    alive = _alive_ids(sim)
    per_round = []
    for _ in range(rounds):
        record = sim.broadcasts[sim.broadcast(sim.rng.choice(alive), BROADCAST)]
        deadline = sim.now + IROH_ROUND_TIMEOUT
        while len(record.hops) < len(alive) and sim.now < deadline:
            sim.run_for(0.01)
        m = record.metrics()
        complete = len(record.hops) >= len(alive)
        per_round.append(
            {
                "rmr": m.rmr,
                "ldh": m.ldh,
                "missed": m.eligible - m.delivered,
                "duration": (record.last_delivery_at - record.sent_at)
                if complete
                else IROH_ROUND_TIMEOUT,
            }
        )
    return {
        "seed": seed,
        "nodes": nodes,
        "rounds": per_round,
        "mean": {key: statistics.fmean(r[key] for r in per_round) for key in per_round[0]},
    }


def iroh(nodes: int = 1000, rounds: int = 30) -> dict[str, Any]:
    """`iroh_multi` over iroh-gossip's seeds, and the mean, min and max of their means."""
    runs = [iroh_multi(seed, nodes=nodes, rounds=rounds) for seed in IROH_SEEDS]
    keys = runs[0]["mean"].keys()
    return {
        "scenario": f"GossipMulti-n{nodes}-r{rounds}",
        "latency": IROH_LATENCY,
        "runs": runs,
        "average": {
            key: {
                "mean": statistics.fmean(run["mean"][key] for run in runs),
                "min": min(run["mean"][key] for run in runs),
                "max": max(run["mean"][key] for run in runs),
            }
            for key in keys
        },
    }


# --- figures --------------------------------------------------------------------------------------


def plot(result: dict[str, Any], prefix: Path) -> list[Path]:
    """PNGs of the result; matplotlib is imported here only (the `bench` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = result["nodes"]
    written = []
    rows = result.get("failures", [])
    if rows:
        fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
        rates = [100 * r["rate"] for r in rows]
        ax = axes[0]
        for label, style in (("flood", "o-"), ("plumtree", "s--")):
            ax.plot(
                rates,
                [100 * r[label]["first_cycle_mean"] for r in rows],
                style,
                label=f"{label}: mean of first shuffle period",
            )
            ax.plot(
                rates,
                [100 * r[label]["first_broadcast"] for r in rows],
                style,
                alpha=0.4,
                label=f"{label}: first broadcast (t=0)",
            )
        slow = result.get("failures_runtime_detection", [])
        if slow:
            ax.plot(
                [100 * r["rate"] for r in slow],
                [100 * r["plumtree"]["first_cycle_mean"] for r in slow],
                "^:",
                label="plumtree, runtime detection (3 s): mean of first period",
            )
        first_10 = PAPER["first_10_messages"]
        ax.plot(
            [100 * float(rate) for rate in first_10],
            list(first_10.values()),
            "k*",
            markersize=10,
            label="paper: mean of the first 10 messages (10k nodes, flooding)",
        )
        ax.set(
            xlabel="nodes crashed at once (%)",
            ylabel="survivors reached (%)",
            title=f"Reliability after massive failures, N={n}",
            ylim=(0, 102),
        )
        ax.legend(fontsize=7)
        ax = axes[1]
        for row in rows:
            ax.plot(
                row["series"]["t"],
                [100 * v for v in row["series"]["flood"]],
                label=f"{100 * row['rate']:.0f}%",
            )
        ax.set(
            xlabel="seconds after the crash (shuffle period 10 s), paper detection",
            ylabel="survivors reached (%)",
            title="Flooding reliability per broadcast",
        )
        ax.legend(fontsize=7, ncol=2)
        ax = axes[2]
        cycles = [r["flood"]["healing_cycles"] for r in rows]
        ax.bar(rates, [c if c is not None else 0 for c in cycles], width=3, label="ours (flooding)")
        for x, c in zip(rates, cycles, strict=True):
            if c is None:
                ax.text(x, 0.1, "not\nhealed", ha="center", fontsize=7)
        if slow:
            ax.plot(
                [100 * r["rate"] for r in slow],
                [r["plumtree"]["healing_cycles"] or 0 for r in slow],
                "v",
                label="ours, Plumtree, runtime detection (3 s)",
            )
        healing = PAPER["healing_cycles"]
        ax.plot(
            [100 * float(rate) for rate in healing],
            list(healing.values()),
            "k*",
            markersize=10,
            label="paper (Fig. 4)",
        )
        ax.set(
            xlabel="nodes crashed at once (%)", ylabel="shuffle periods to 100%", title="Healing"
        )
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = prefix.with_name(prefix.name + "_failures.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    if "overlay" in result:
        ov = result["overlay"]
        fig, ax = plt.subplots(figsize=(6, 4))
        degrees = sorted(int(k) for k in ov["in_degree"])
        ax.bar(degrees, [ov["in_degree"][str(k)] for k in degrees])
        ax.set(
            xlabel="in-degree (active views holding the node)",
            ylabel="nodes",
            title=f"In-degree, N={n}: CC {ov['clustering_coefficient']:.4f}, "
            f"ASP {ov['average_shortest_path']:.2f}",
        )
        fig.tight_layout()
        path = prefix.with_name(prefix.name + "_overlay.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    if "plumtree" in result:
        pt = result["plumtree"]
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
        for phase, offset in (("stable", 0), ("churn", len(pt["stable"]["plumtree"]["series"]))):
            for label, style in (("plumtree", "-"), ("flood", "--")):
                series = pt[phase][label]["series"]
                xs = range(offset, offset + len(series))
                for ax, key in zip(axes, ("rmr", "ldh", "reliability"), strict=True):
                    ax.plot(
                        xs, [s[key] for s in series], style, label=f"{label} ({phase})", linewidth=1
                    )
        for ax, key in zip(axes, ("RMR", "LDH", "reliability"), strict=True):
            ax.axvline(len(pt["stable"]["plumtree"]["series"]), color="grey", linewidth=0.5)
            ax.set(xlabel="broadcast (stable, then churn 0.5%/period)", title=f"{key}, N={n}")
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = prefix.with_name(prefix.name + "_plumtree.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# --- command line ---------------------------------------------------------------------------------


def machine_reference(rounds: int = 5) -> float:
    """Seconds for a fixed pure-Python workload (tuples through a heap, a dict keyed by
    tuples), best of `rounds`: how fast this machine runs Python on the day,
    independent of this package's code. The machine's speed varies from day to day (a
    factor of three has been seen), so a run's wall time is reported beside it: two runs'
    wall times compare as their ratios to it."""
    best = math.inf
    for _ in range(rounds):
        started = time.perf_counter()
        rng = random.Random(0)
        heap: list[tuple[float, int]] = []
        table: dict[tuple[int, int], int] = {}
        for i in range(200_000):
            key = (i % 5003, i % 7919)
            table[key] = table.get(key, 0) + 1
            heapq.heappush(heap, (rng.random(), i))
            if len(heap) > 4096:
                heapq.heappop(heap)
        best = min(best, time.perf_counter() - started)
    return best


#: The phases `run_all` runs, in order (`--phases`).
PHASES = ("overlay", "failures", "failures_runtime_detection", "plumtree")


def run_all(
    n: int,
    seed: int,
    *,
    model: str = "ours",
    rates: Sequence[float] = FAILURE_RATES,
    phases: Sequence[str] = PHASES,
    plumtree_config: PlumtreeConfig | None = None,
) -> dict[str, Any]:
    # Without the cyclic collector: the simulation allocates millions of objects that
    # refcounting frees, and each of the collector's passes over the heap costs more as the
    # overlay grows (a fifth of the run at 1,000 nodes). The phases run on copies that
    # `_on_a_copy` discards itself.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _run_all(n, seed, model, rates, phases, plumtree_config)
    finally:
        if collecting:
            gc.enable()


def _run_all(
    n: int,
    seed: int,
    model: str,
    rates: Sequence[float],
    phases: Sequence[str],
    plumtree_config: PlumtreeConfig | None,
) -> dict[str, Any]:
    unknown = set(phases) - set(PHASES)
    if unknown:
        raise ValueError(f"unknown phases {sorted(unknown)}; the phases are {PHASES}")
    timings: dict[str, float] = {}
    started = time.perf_counter()
    base = build(n, seed, model=model, plumtree=plumtree_config)
    timings["build"] = time.perf_counter() - started
    print(f"build ({model}): {timings['build']:.1f} s", file=sys.stderr)
    result: dict[str, Any] = {"nodes": n, "seed": seed, "model": model, "paper": PAPER}
    if plumtree_config is not None:
        result["plumtree_config"] = attrs.asdict(plumtree_config)
    for name, phase in (
        ("overlay", lambda: overlay(base)),
        ("failures", lambda: failures(base, rates)),
        # Under the runtime's detection, the runtime's broadcast alone: flooding is the
        # papers' baseline, compared under their detection (above); leaving it out here
        # takes two fifths of this phase's events.
        (
            "failures_runtime_detection",
            lambda: failures(base, rates, detection=RUNTIME_DETECTION, layers=(BROADCAST,)),
        ),
        ("plumtree", lambda: plumtree(base)),
    ):
        if name not in phases:
            continue
        t = time.perf_counter()
        result[name] = phase()
        timings[name] = time.perf_counter() - t
        print(f"{name}: {timings[name]:.1f} s", file=sys.stderr)
    timings["total"] = time.perf_counter() - started
    result["wall_seconds"] = timings
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--model",
        choices=MODELS,
        default="ours",
        help="how the overlay forms: 'ours' (concurrent joins through the seed, 5-50 ms"
        " links, the runtime's seeding policy) or 'paper' (sequential joins, equal"
        " latencies, 50 shuffle periods; the papers' setup)",
    )
    parser.add_argument(
        "--scenario",
        choices=("papers", "iroh"),
        default="papers",
        help="'papers': the papers' experiments; 'iroh': iroh-gossip's GossipMulti"
        " (its seeds; --seed is ignored)",
    )
    parser.add_argument(
        "--phases",
        nargs="+",
        choices=PHASES,
        default=list(PHASES),
        help="the phases to run (default: all); a partial run's file is named after them",
    )
    parser.add_argument(
        "--optimization-streak",
        type=int,
        default=None,
        help="Plumtree's optimization_streak on every node (default: the runtime's, "
        f"{PlumtreeConfig().optimization_streak}; 1 is Algorithm 2 as published); "
        "the file's name says it",
    )
    parser.add_argument(
        "--ihave-batch-window",
        type=float,
        default=None,
        help="Plumtree's ihave_batch_window on every node, in seconds (default: the "
        f"runtime's, {PlumtreeConfig().ihave_batch_window}; 0 sends each IHAVE at once, as "
        "the papers' simulations); the file's name says it",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    tuned = {
        field: value
        for field, value in (
            ("optimization_streak", args.optimization_streak),
            ("ihave_batch_window", args.ihave_batch_window),
        )
        if value is not None
    }
    if args.scenario == "iroh" and (set(args.phases) != set(PHASES) or tuned):
        parser.error("--phases and the Plumtree options apply to the papers' scenario only")
    try:
        plumtree_config = PlumtreeConfig(**tuned) if tuned else None
    except ValueError as e:  # ConfigError: the core's own check of its fields
        parser.error(str(e))
    reference = machine_reference()
    started = time.perf_counter()
    if args.scenario == "iroh":
        result = iroh(args.nodes)
        result["wall_seconds"] = {"total": time.perf_counter() - started}
        name = f"sim_iroh_{args.nodes}"
    else:
        result = run_all(
            args.nodes,
            args.seed,
            model=args.model,
            phases=args.phases,
            plumtree_config=plumtree_config,
        )
        name = f"sim_{args.nodes}" + ("_paper" if args.model == "paper" else "")
        if args.optimization_streak is not None:
            name += f"_streak{args.optimization_streak}"
        if args.ihave_batch_window is not None:
            name += f"_window{args.ihave_batch_window:g}"
        if set(args.phases) != set(PHASES):
            name += "_" + "_".join(p for p in PHASES if p in args.phases)
    result["command"] = " ".join(["bench/sim.py", *(argv if argv is not None else sys.argv[1:])])
    result["machine"] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        # The day's speed (`machine_reference`), timed before and after the run.
        "reference_seconds": reference,
        "reference_seconds_after": machine_reference(),
    }
    result["date"] = time.strftime("%Y-%m-%d")
    args.out.mkdir(parents=True, exist_ok=True)
    prefix = args.out / name
    prefix.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {prefix.with_suffix('.json')}", file=sys.stderr)
    if not args.no_plots and args.scenario == "papers":
        for path in plot(result, prefix):
            print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
