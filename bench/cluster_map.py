"""The replicated-map run of the cluster benchmark (issue 7, item 4; SPEC section 13).

A script and a module: ``.venv/bin/python bench/cluster_map.py --nodes 10`` prints one JSON
document (and with ``--write`` stores it and a PNG in ``bench/results/``); `bench/cluster.py`
calls `map_run` and `map_pictures`. This module owns the map figures of an N-node cluster;
the measuring phases it shares with `bench/map_figures.py` (put latency, throughput, full
sync) are imported from there, not copied.

Parts, in the order they run (the result lists them in the order of the issue):

* ``put_latency`` and ``writes``: N nodes over real websockets on 127.0.0.1 in this one
  process (`open_local_cluster`), so all N share one Python thread. After symmetric
  connected views and warm-up rounds (until a round causes no GRAFT and no duplicate and
  the views have not changed for a few seconds: a view change costs Plumtree a repair at
  timeout1 that would be measured as latency), first the paced figure: 200 puts from
  random nodes 20 ms apart, the time from the start of ``put`` to the `Put` event of the
  last node (p50/p90/p99/max). Then the saturated one: all N nodes put distinct keys as
  fast as ``put`` returns; writes per second *applied on every node* (the rate at which
  the slowest node has applied all of them) and the process's CPU (`time.process_time`,
  all N nodes) per fully replicated write. The paced figure runs first because a
  saturated tree needs seconds to become quiet again.
* ``heal``: N nodes on the in-memory network (`MemoryNetwork`, 5 ms one way) on *virtual
  time*: a separate ``trio.run`` with `trio.testing.MockClock` (autojump), in a worker
  thread. Virtual time because the figure is set by protocol timers (idle timeout 4 s,
  shuffles every 10 s, seed rejoin every 60 s, anti-entropy every 30 s +- 25%), which would
  take minutes of real time to play out, and because CPU is not what it measures. The
  cluster first runs for 30 s (three shuffle periods: right after the joins many passive
  views are empty, and a node whose active peers all end up across the cut is then left
  alone until the heal). Then the network is cut into two halves; each half writes 200
  keys of its own and the same 50 shared keys (so last writer wins decides those); we
  wait until both halves noticed the cut and each half agrees internally, then heal. The
  expected final state is the LWW merge of every node's entries. From the heal on, every
  map's `Put` events keep a count of the entries that differ from that state; a sampler
  records it every 10 ms (virtual) as a step series (a point whenever the count or the
  number of converged nodes changed) until every node holds the final state, then a full
  scan checks that it does. Five runs (seeds seed .. seed + 4): Trio's scheduling order
  and the HLC's wall clock differ between runs even on one seed, and one run is one
  sample of a wide distribution; the result gives each run and the median and extremes.
* ``restart``: N nodes over websockets on the real clock (SQLite runs in worker threads,
  which an autojump clock would misread as idleness). One node keeps its map in an SQLite
  store (a temporary directory). Three cycles: it stops (graceful leave), the others write
  300 keys and agree on them, the entries in its store are counted (in the file: a peer's
  sync may land before ``open_map`` returns), then it restarts with the same name, store
  and port and reopens the map at once. Time to the node up, to the map reopened from
  disk, to its first `PeerUp`, and until it holds every entry; the step series of entries
  still missing or stale on it, sampled every 10 ms.
* ``sync_10k``: `map_figures.phase_sync`: a 10,000-key map synced in full to a fresh node
  (``join``) and to a reopened map on a linked node (``open``).

Every wait has a deadline; a deadline that passes is reported in the JSON (``timed_out``,
``converged: false``, ``complete: false``), never hidden. Random choices come from the
seed; node ids on the memory network are seeded too, websocket nodes seed themselves from
the OS, so two runs differ by machine noise and overlay shape.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import random
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio
import trio.testing
from common import run_header
from map_figures import (
    PACE,
    PACED_COUNT,
    MapWatch,
    phase_put_latency,
    phase_sync,
    phase_throughput,
    warm_up,
)

from trio_replica.core.events import PeerUp
from trio_replica.core.ormap import Entry, Key, supersedes
from trio_replica.localcluster import open_local_cluster, overlay_ok, run_node, wait_for_views
from trio_replica.node import Node
from trio_replica.runtime.config import NodeConfig
from trio_replica.stores.maps import Put, Removed, ReplicatedMap
from trio_replica.stores.store import MapStore, StoreError
from trio_replica.transports.base import Transport
from trio_replica.transports.memory import MemoryNetwork

SEED = 20261127
MAP = "bench"
MIN_ACTIVE = 2
FORM_TIMEOUT_S = 60.0
#: Warm-up: stop after a clean round once no active view changed for this long.
WARMUP_STEADY_S = 3.0
WARMUP_MAX_S = 25.0
#: Keys written by all N nodes together in the throughput figure (rounded down to a multiple
#: of N): about ten seconds of saturation on two cores at N = 10.
WRITE_KEYS = 1_000
#: Step of the convergence series (virtual seconds for heal, real ones for restart).
SAMPLE_S = 0.010

#: Virtual seconds the cluster runs before the cut: three shuffle periods (10 s each) fill
#: the passive views beyond what the join walks gave them.
HEAL_SETTLE_S = 30.0
#: One-way latency of the simulated network.
HEAL_LATENCY_S = 0.005
#: Keys only one half writes, per half, and keys both halves write.
HEAL_KEYS = 200
HEAL_SHARED = 50
#: Writes of one half, this far apart (virtual seconds), both halves at once.
HEAL_PACE_S = 0.005
#: Virtual deadlines: both halves drop their links across the cut (idle timeout 4 s); each
#: half agrees internally (a delta lost on a link into the cut is repaired by IHAVE/GRAFT or
#: by anti-entropy); the whole cluster converges after the heal (seed rejoin every 60 s,
#: anti-entropy every 30 s +- 25%: a few periods of both).
CUT_TIMEOUT_S = 30.0
SIDES_TIMEOUT_S = 60.0
HEAL_TIMEOUT_S = 300.0
#: Heal runs (seeds seed, seed + 1, ...): the scheduler's order and the HLC's wall clock
#: differ between runs, and whether the last node waits for an anti-entropy pull changes the
#: figure several-fold: one run is one sample.
HEAL_RUNS = 5
#: Real seconds one virtual-time run may take before it gives up (a guard, not a figure).
HEAL_REAL_BUDGET_S = 120.0

RESTART_MAP = "restart"
RESTART_PRELOAD = 200
RESTART_KEYS = 300
#: Stop-write-restart cycles of one node (the figure is noisy: one cycle is one sample).
RESTART_CYCLES = 3
REPLICATE_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
RESTART_TIMEOUT_S = 30.0

SYNC_KEYS = 10_000
RESULTS = Path(__file__).resolve().parent / "results"

Series = list[list[float]]


def default_progress(message: str) -> None:
    print(f"[cluster_map] {message}", file=sys.stderr, flush=True)


# --- running nodes one by one ---------------------------------------------------------------


@attrs.define
class Hosted:
    """A node running in a task of its own; `stop` ends it with a graceful leave."""

    node: Node
    scope: trio.CancelScope
    stopped: trio.Event

    async def stop(self, timeout: float) -> bool:
        """Leave and wait until every task of the node ended; False if `timeout` passed."""
        self.scope.cancel()
        with trio.move_on_after(timeout):
            await self.stopped.wait()
        return self.stopped.is_set()


async def host(
    nursery: trio.Nursery, config: NodeConfig, transport: Transport | None = None
) -> Hosted:
    """Start a node in `nursery`; it runs until `Hosted.stop` or the nursery ends."""
    scope, stopped = trio.CancelScope(), trio.Event()
    node: Node = await nursery.start(run_node, config, transport, scope, stopped)
    return Hosted(node, scope, stopped)


async def wait_until(
    predicate: Callable[[], bool], timeout: float, *, poll: float = 0.05
) -> float | None:
    """Wait for a condition over several nodes (nothing signals it); the time it held, or
    None when `timeout` passed first."""
    with trio.move_on_after(timeout):
        while not predicate():  # noqa: ASYNC110
            await trio.sleep(poll)
        return trio.current_time()
    return None


# --- convergence --------------------------------------------------------------------------


def lww_merge(maps: Sequence[ReplicatedMap]) -> dict[Key, Entry]:
    """The state every map must reach: per key the greatest entry any map holds."""
    merged: dict[Key, Entry] = {}
    for the_map in maps:
        for key in the_map:
            entry = the_map.entry(key)
            if entry is None:
                continue
            current = merged.get(key)
            if current is None or supersedes(entry, current):
                merged[key] = entry
    return merged


def differing(the_map: ReplicatedMap, expected: dict[Key, Entry]) -> set[Key]:
    """Keys whose entry in `the_map` is not the expected one (missing, stale or extra)."""
    wrong = {key for key, entry in expected.items() if the_map.entry(key) != entry}
    wrong.update(key for key in the_map if key not in expected)
    return wrong


class Convergence:
    """How far each map is from `expected`, kept current from the maps' change events.

    A full scan when the watch starts, then one key per `Put`/`Removed` event: cheap enough
    to sample every 10 ms. `done` is set (and `done_at` stamped) when every map holds
    exactly `expected`. A subscriber that overflowed would miss events: `verify` rescans.
    """

    def __init__(self, maps: Sequence[ReplicatedMap], expected: dict[Key, Entry]) -> None:
        self.maps = list(maps)
        self.expected = expected
        self.wrong: list[set[Key]] = [set() for _ in self.maps]
        self.done = trio.Event()
        self.done_at: float | None = None

    def differing(self) -> int:
        return sum(len(wrong) for wrong in self.wrong)

    def converged_nodes(self) -> int:
        return sum(not wrong for wrong in self.wrong)

    def rescan(self) -> None:
        self.wrong = [differing(the_map, self.expected) for the_map in self.maps]
        self._check_done()

    def verify(self) -> bool:
        """A full scan: does every map hold exactly the expected state now?"""
        return all(not differing(the_map, self.expected) for the_map in self.maps)

    def _check_done(self) -> None:
        if not self.done.is_set() and self.differing() == 0:
            self.done_at = trio.current_time()
            self.done.set()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for index, the_map in enumerate(self.maps):
                await nursery.start(self._watch, index, the_map)
            # After every subscription is attached: what changed before is in the scan.
            self.rescan()
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
                self._on_event(index, the_map, event)
                # Take every queued event before yielding: one event per scheduler pass
                # would let a busy loop delay the count by far more than the change.
                while True:
                    try:
                        event = events.receive_nowait()
                    except trio.WouldBlock:
                        break
                    self._on_event(index, the_map, event)
                self._check_done()

    def _on_event(self, index: int, the_map: ReplicatedMap, event: object) -> None:
        if not isinstance(event, Put | Removed):
            return
        key = event.key
        if key in self.expected and the_map.entry(key) == self.expected[key]:
            self.wrong[index].discard(key)
        else:
            self.wrong[index].add(key)


async def record_convergence(
    conv: Convergence,
    since: float,
    timeout: float,
    *,
    probe: Callable[[], None] | None = None,
    real_deadline: float | None = None,
) -> Series:
    """Sample `conv` every `SAMPLE_S` until it is done or `timeout` passed.

    Returns ``[seconds since `since`, differing entries, converged nodes]`` points, one per
    change (a step series). `probe` runs at every sample (milestones of the caller).
    `real_deadline` (``time.monotonic``) bounds a run on a virtual clock in real time.
    """
    series: Series = []
    last: tuple[int, int] | None = None

    def sample() -> None:
        nonlocal last
        point = (conv.differing(), conv.converged_nodes())
        if point != last:
            series.append([round(trio.current_time() - since, 3), *point])
            last = point

    with trio.move_on_after(timeout):
        while not conv.done.is_set():
            sample()
            if probe is not None:
                probe()
            if real_deadline is not None and time.monotonic() > real_deadline:
                break
            with trio.move_on_after(SAMPLE_S):
                await conv.done.wait()
    sample()
    if conv.done_at is not None:
        series[-1][0] = round(conv.done_at - since, 3)
    return series


def replica_totals(maps: Sequence[ReplicatedMap]) -> dict[str, int]:
    """Replica counters summed over the maps: what carried the state (syncs, pulls)."""
    names = (
        "syncs_sent",
        "chunks_received",
        "sync_requests_sent",
        "anti_entropy_pulls",
        "deltas_received",
    )
    totals = dict.fromkeys(names, 0)
    for the_map in maps:
        # The driver's counters, and the bookkeeping's (pulls and requests are the core's).
        stats, core = the_map.replica.stats, the_map.replica.core.stats
        for name in names:
            totals[name] += getattr(stats, name, None) or getattr(core, name, 0)
    totals["subscriber_drops"] = sum(m.stats.subscriber_drops for m in maps)
    return totals


# --- websocket cluster: put latency and throughput ----------------------------------------


async def websocket_phases(
    n: int, rng: random.Random, write_keys: int, progress: Callable[[str], None]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    t_start = trio.current_time()
    async with open_local_cluster(n, prefix="w") as nodes:
        with trio.move_on_after(FORM_TIMEOUT_S):
            await wait_for_views(nodes, min_active=min(MIN_ACTIVE, n - 1))
        formed_s = round(trio.current_time() - t_start, 2)
        connected = overlay_ok(nodes, min_active=min(MIN_ACTIVE, n - 1))
        progress(f"N={n}: websocket overlay connected {connected} after {formed_s} s")
        maps = [await node.open_map(MAP) for node in nodes]
        async with trio.open_nursery() as nursery:
            watch = MapWatch(maps)
            await nursery.start(watch.serve)
            warm = await warm_up(
                nodes, maps, rng, label="c", steady_views_s=WARMUP_STEADY_S, max_s=WARMUP_MAX_S
            )
            out["overlay"] = {
                "formed_s": formed_s,
                "symmetric_connected": connected,
                "warmup_steady": warm["steady"],
                "warmup_s": warm["seconds"],
                "warmup_rounds": len(warm["rounds"]),
                "active_sizes": sorted(warm["active_sizes"]),
            }
            progress(
                f"N={n}: warm-up steady {warm['steady']} after {warm['seconds']} s; "
                f"active sizes {out['overlay']['active_sizes']}"
            )

            latency = await phase_put_latency(
                nodes, maps, watch, rng, phase="lat", count=PACED_COUNT, pace=PACE
            )
            latency["timed_out"] = latency["complete"] < latency["puts"]
            out["put_latency"] = latency
            lat = latency["to_last_node"]
            progress(
                f"N={n}: put to last node p50 {lat.get('p50_ms')} ms p99 {lat.get('p99_ms')} ms "
                f"max {lat.get('max_ms')} ms ({latency['complete']}/{latency['puts']} complete)"
            )

            writes = await phase_throughput(nodes, maps, watch, n, write_keys)
            writes["timed_out"] = not writes["complete"]
            writes["writes_per_s_applied_on_every_node"] = writes["replicated_writes_per_s"]
            writes["cpu_us_per_replicated_write"] = round(
                writes["cpu_s"] / max(writes["applied_by_slowest_node"], 1) * 1e6, 1
            )
            out["writes"] = writes
            progress(
                f"N={n}: {writes['writes_per_s_applied_on_every_node']} writes/s applied on "
                f"every node, {writes['cpu_us_per_replicated_write']} us CPU each "
                f"(complete {writes['complete']})"
            )
            nursery.cancel_scope.cancel()
    return out


# --- partition and heal, in virtual time --------------------------------------------------


async def heal_runs(
    n: int, seed: int, runs: int, progress: Callable[[str], None]
) -> dict[str, Any]:
    """`runs` partition-and-heal runs (seeds `seed`, `seed` + 1, ...), each a `heal_run`
    in a worker thread, and the spread of their convergence times."""
    results = []
    for run in range(runs):
        results.append(await trio.to_thread.run_sync(heal_run, n, seed + run, progress))
    return {
        "clock": "virtual (MockClock autojump); the network in memory",
        "latency_ms": HEAL_LATENCY_S * 1e3,
        "halves": [n // 2, n - n // 2],
        "keys_per_half": HEAL_KEYS,
        "shared_keys": HEAL_SHARED,
        "write_pace_ms": HEAL_PACE_S * 1e3,
        "settled_before_cut_s": HEAL_SETTLE_S,
        "converged": all(r["converged"] for r in results),
        "timed_out": any(r["timed_out"] for r in results),
        "seconds_to_convergence": spread([r["seconds_to_convergence"] for r in results]),
        "first_link_across": spread([r["first_link_across_s"] for r in results]),
        "series_columns": ["s_since_heal", "differing_entries", "nodes_converged"],
        "runs": results,
    }


def heal_run(n: int, seed: int, progress: Callable[[str], None]) -> dict[str, Any]:
    """One heal run in a `trio.run` of its own on an autojump `MockClock` (blocking: call it
    from a worker thread when a Trio run is already active in this one)."""
    real0 = time.monotonic()
    clock = trio.testing.MockClock(autojump_threshold=0)
    real_deadline = real0 + HEAL_REAL_BUDGET_S
    out = trio.run(_heal, n, seed, progress, real_deadline, clock=clock)
    out["real_s"] = round(time.monotonic() - real0, 2)
    out["real_budget_exceeded"] = time.monotonic() > real_deadline
    return out


def spread(values: Sequence[float | None]) -> dict[str, Any]:
    """Median and extremes of the runs that finished (None: a run that did not)."""
    done = sorted(v for v in values if v is not None)
    return {
        "runs": len(values),
        "finished": len(done),
        "min_s": done[0] if done else None,
        "median_s": round(statistics.median(done), 3) if done else None,
        "max_s": done[-1] if done else None,
        "all_s": list(values),
    }


def _cross_links(nodes: Sequence[Node], left: set[str]) -> int:
    """Active-view entries that join the two halves (each link counted from both ends)."""
    return sum((node.id in left) != (p.id in left) for node in nodes for p in node.active_view())


def _isolation(node: Node, left: set[str]) -> dict[str, Any]:
    """What a node with an empty active view knows and tried (membership counters)."""
    mine = node.id in left
    passive = node.passive_view()
    stats = node.stats()["membership"]
    return {
        "passive_same_half": sum((p.id in left) == mine for p in passive),
        "passive_other_half": sum((p.id in left) != mine for p in passive),
        **{
            name: stats[name]
            for name in (
                "joins",
                "join_timeouts",
                "neighbor_requests",
                "neighbor_refused",
                "neighbor_timeouts",
                "failures",
                "evicted",
                "forgotten",
            )
        },
    }


def _components(nodes: Sequence[Node]) -> int:
    """Connected components of the active views restricted to `nodes`."""
    by_id = {node.id: node for node in nodes}
    seen: set[str] = set()
    count = 0
    for node in nodes:
        if node.id in seen:
            continue
        count += 1
        todo = [node.id]
        seen.add(node.id)
        while todo:
            for peer in by_id[todo.pop()].active_view():
                if peer.id in by_id and peer.id not in seen:
                    seen.add(peer.id)
                    todo.append(peer.id)
    return count


def _agree(maps: Sequence[ReplicatedMap]) -> bool:
    expected = lww_merge(maps)
    return all(not differing(m, expected) for m in maps)


async def _heal(
    n: int, seed: int, progress: Callable[[str], None], real_deadline: float
) -> dict[str, Any]:
    net = MemoryNetwork(seed=seed, latency=HEAL_LATENCY_S)
    rng = random.Random(seed)
    names = [f"h{i}" for i in range(n)]
    left_names = set(names[: n // 2])
    out: dict[str, Any] = {"seed": seed}
    async with trio.open_nursery() as nursery:
        nodes: list[Node] = []
        for name in names:
            config = NodeConfig(
                name=name,
                listen=f"mem://{name}",
                seeds=() if name == names[0] else (f"mem://{names[0]}",),
                rng_seed=zlib.crc32(f"{seed}:{name}".encode()),
            )
            nodes.append((await host(nursery, config, net.transport(name))).node)
        formed = await wait_until(
            lambda: overlay_ok(nodes, min_active=min(MIN_ACTIVE, n - 1)), FORM_TIMEOUT_S
        )
        out["formed"] = formed is not None
        maps = [await node.open_map("heal") for node in nodes]
        # A cluster in service, not one just formed: right after the joins a node's passive
        # view holds only what the join walks gave it (often nothing), and a node whose
        # active peers all end up across the cut then has nobody on its own side to call.
        await trio.sleep(HEAL_SETTLE_S)
        out["passive_sizes_at_cut"] = sorted(len(node.passive_view()) for node in nodes)
        left = [m for m, node in zip(maps, nodes, strict=True) if node.id in left_names]
        right = [m for m, node in zip(maps, nodes, strict=True) if node.id not in left_names]

        net.partition(left_names, set(names) - left_names)
        t_cut = trio.current_time()

        async def write_half(side: str, half: list[ReplicatedMap]) -> None:
            keys = [f"{side}:{i:04d}" for i in range(HEAL_KEYS)]
            keys += [f"shared:{i:04d}" for i in range(HEAL_SHARED)]
            random.Random(f"{seed}:{side}").shuffle(keys)
            start = trio.current_time()
            for i, key in enumerate(keys):
                await trio.sleep_until(start + i * HEAL_PACE_S)
                writer = half[rng.randrange(len(half))]
                # Unique values: a key holds the same data on two nodes only when it holds
                # the same write, so a Put event marks every change of entry.
                await writer.put(key, {"side": side, "i": i, "by": writer.node.id})

        async with trio.open_nursery() as writers:
            writers.start_soon(write_half, "L", left)
            writers.start_soon(write_half, "R", right)
        out["writes_s"] = round(trio.current_time() - t_cut, 3)

        cut = await wait_until(lambda: _cross_links(nodes, left_names) == 0, CUT_TIMEOUT_S)
        out["cut_noticed_s"] = round(cut - t_cut, 2) if cut is not None else None
        sides = await wait_until(lambda: _agree(left) and _agree(right), SIDES_TIMEOUT_S, poll=0.1)
        out["halves_agreed"] = sides is not None
        out["halves_agreed_s"] = round(sides - t_cut, 2) if sides is not None else None
        # Why a half may not agree: a node cut off from its own half too (active view empty,
        # or linked only to nodes that are).
        out["active_sizes_at_heal"] = {node.id: len(node.active_view()) for node in nodes}
        out["components_per_half_at_heal"] = [
            _components([node for node in nodes if (node.id in left_names) == side])
            for side in (True, False)
        ]
        out["isolated_at_heal"] = {
            node.id: _isolation(node, left_names) for node in nodes if not node.active_view()
        }

        expected = lww_merge(maps)
        out["differing_per_node_at_heal"] = {
            node.id: len(differing(m, expected)) for node, m in zip(nodes, maps, strict=True)
        }
        shared = [e for k, e in expected.items() if str(k).startswith("shared:")]
        out["expected_entries"] = len(expected)
        out["shared_won_by_left"] = sum(e.dot.node in left_names for e in shared)
        before = replica_totals(maps)
        async with trio.open_nursery() as watching:
            conv = Convergence(maps, expected)
            await watching.start(conv.serve)
            out["differing_at_heal"] = conv.differing()
            net.heal()
            t_heal = trio.current_time()
            first_link: float | None = None

            def probe() -> None:
                nonlocal first_link
                if first_link is None and _cross_links(nodes, left_names):
                    first_link = trio.current_time() - t_heal

            series = await record_convergence(
                conv, t_heal, HEAL_TIMEOUT_S, probe=probe, real_deadline=real_deadline
            )
            watching.cancel_scope.cancel()
        out["converged"] = conv.done.is_set()
        out["timed_out"] = not conv.done.is_set()
        out["verified_by_full_scan"] = conv.verify()
        out["seconds_to_convergence"] = (
            round(conv.done_at - t_heal, 3) if conv.done_at is not None else None
        )
        out["first_link_across_s"] = round(first_link, 3) if first_link is not None else None
        out["differing_at_end"] = conv.differing()
        after = replica_totals(maps)
        out["replica_after_heal"] = {k: after[k] - before[k] for k in after}
        out["series"] = series
        progress(
            f"heal N={n} seed {seed}: cut noticed after {out['cut_noticed_s']} s, halves agree "
            f"after {out['halves_agreed_s']} s; after the heal first link across "
            f"{out['first_link_across_s']} s, converged {out['converged']} after "
            f"{out['seconds_to_convergence']} s ({out['differing_at_heal']} entries differed; "
            "virtual time)"
        )
        nursery.cancel_scope.cancel()
    return out


# --- restart from the store -----------------------------------------------------------------


async def fill(writers: Sequence[ReplicatedMap], prefix: str, count: int) -> None:
    """Put `count` distinct keys, the writers in parallel, each as fast as `put` returns."""

    async def write(w: int) -> None:
        for i in range(w, count, len(writers)):
            await writers[w].put(f"{prefix}:{i:05d}", {"i": i, "w": w})

    async with trio.open_nursery() as tasks:
        for w in range(len(writers)):
            tasks.start_soon(write, w)


async def _stored_entries(config: NodeConfig, name: str) -> int | None:
    """Entries in the SQLite store of map `name` of a stopped node (None: no such file, or
    the store is still held: the node did not stop in time)."""
    assert config.data_dir is not None
    # Where `Node.open_map(name, persist=True)` keeps it.
    path = config.data_dir / f"{name}.sqlite3"
    if not path.exists():
        return None
    try:
        store = await MapStore.open(path, name=name)
    except StoreError:
        return None
    try:
        return len(await store.load())
    finally:
        await store.aclose()


async def _first_peer_up(
    node: Node,
    seen: list[float],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Append the time `node` first has a peer in its active view to `seen`."""
    async with node.events() as events:
        task_status.started()
        if not node.active_view():
            async for event in events:
                if isinstance(event, PeerUp):
                    break
        seen.append(trio.current_time())


async def restart_run(
    n: int, rng: random.Random, cycles: int, progress: Callable[[str], None]
) -> dict[str, Any]:
    """`cycles` times: stop the node with the store, write while it is down, restart it."""
    out: dict[str, Any] = {
        "clock": "real; websockets on 127.0.0.1",
        "preloaded_keys": RESTART_PRELOAD,
        "keys_written_while_down": RESTART_KEYS,
    }
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cluster_map_") as tmp:
        async with trio.open_nursery() as nursery:
            first = await host(nursery, NodeConfig(name="r1"))
            hosted = [first]
            for i in range(2, n + 1):
                data_dir = Path(tmp) / f"r{i}" if i == n else None
                config = NodeConfig(name=f"r{i}", seeds=(first.node.address,), data_dir=data_dir)
                hosted.append(await host(nursery, config))
            nodes = [h.node for h in hosted]
            formed = await wait_until(
                lambda: overlay_ok(nodes, min_active=min(MIN_ACTIVE, n - 1)), FORM_TIMEOUT_S
            )
            out["formed"] = formed is not None
            live = [await node.open_map(RESTART_MAP) for node in nodes[:-1]]
            victim = hosted[-1]
            victim_map = await victim.node.open_map(RESTART_MAP, persist=True)
            writers = [*live, victim_map]
            rng.shuffle(writers)
            await fill(writers, "pre", RESTART_PRELOAD)
            pre = await wait_until(
                lambda: all(len(m) == RESTART_PRELOAD for m in [*live, victim_map]),
                REPLICATE_TIMEOUT_S,
            )
            out["preload_replicated"] = pre is not None
            for cycle in range(cycles):
                victim, result = await _restart_cycle(nursery, victim, live, cycle, progress)
                results.append(result)
            nursery.cancel_scope.cancel()
    out["converged"] = all(r["converged"] for r in results)
    out["timed_out"] = any(r["timed_out"] for r in results)
    out["seconds_to_every_entry"] = spread([r["seconds_to_every_entry"] for r in results])
    out["series_columns"] = ["s_since_restart", "missing_or_stale_entries", "converged"]
    out["cycles"] = results
    return out


async def _restart_cycle(
    nursery: trio.Nursery,
    victim: Hosted,
    live: Sequence[ReplicatedMap],
    cycle: int,
    progress: Callable[[str], None],
) -> tuple[Hosted, dict[str, Any]]:
    out: dict[str, Any] = {"stopped_cleanly": await victim.stop(STOP_TIMEOUT_S)}
    total = len(live[0]) + RESTART_KEYS
    t_write = trio.current_time()
    await fill(live, f"down{cycle}", RESTART_KEYS)
    written = await wait_until(lambda: all(len(m) >= total for m in live), REPLICATE_TIMEOUT_S)
    out["written_and_replicated_s"] = round(written - t_write, 2) if written is not None else None
    expected = lww_merge(live)
    out["live_nodes_agree"] = all(not differing(m, expected) for m in live)
    # Counted in the file, not in the reopened map: a peer's sync may land before
    # `open_map` returns.
    out["entries_on_disk"] = await _stored_entries(victim.node.config, RESTART_MAP)

    # Same name, store and port: what a supervisor restarting the service does.
    config = attrs.evolve(victim.node.config, listen=victim.node.address)
    t0 = trio.current_time()
    again = await host(nursery, config)
    node_up = trio.current_time()
    first_peer: list[float] = []
    async with trio.open_nursery() as watching:
        # Subscribed before the map opens: the map's first sync follows the first PeerUp.
        await watching.start(_first_peer_up, again.node, first_peer)
        the_map = await again.node.open_map(RESTART_MAP, persist=True)
        map_open = trio.current_time()
        out["entries_at_map_open"] = len(the_map)
        conv = Convergence([the_map], expected)
        await watching.start(conv.serve)
        series = await record_convergence(conv, t0, RESTART_TIMEOUT_S)
        watching.cancel_scope.cancel()
    out["node_up_s"] = round(node_up - t0, 3)
    out["map_open_s"] = round(map_open - t0, 3)
    out["first_peer_s"] = round(first_peer[0] - t0, 3) if first_peer else None
    out["converged"] = conv.done.is_set()
    out["timed_out"] = not conv.done.is_set()
    out["verified_by_full_scan"] = conv.verify()
    out["seconds_to_every_entry"] = (
        round(conv.done_at - t0, 3) if conv.done_at is not None else None
    )
    out["entries_expected"] = len(expected)
    out["replica"] = replica_totals([the_map])
    out["series"] = series
    progress(
        f"restart {cycle + 1}: {RESTART_KEYS} keys written while down (on every live node "
        f"after {out['written_and_replicated_s']} s); {out['entries_on_disk']} entries "
        f"on disk, all {len(expected)} after {out['seconds_to_every_entry']} s "
        f"(first peer {out['first_peer_s']} s)"
    )
    return again, out


# --- the run ------------------------------------------------------------------------------


async def map_run(
    n: int,
    *,
    seed: int,
    keys_10k: int = SYNC_KEYS,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """Every map figure of an `n`-node cluster (module docstring); JSON-able.

    Takes about a minute at n = 10 on two cores. Runs nodes in this Trio run, and the heal
    part in a worker thread with virtual-time runs of its own (so `progress` is also called
    from that thread). Every wait is bounded; a missed deadline is reported in the result,
    not raised.
    """
    rng = random.Random(seed)
    t_start = trio.current_time()
    cluster = await websocket_phases(n, rng, WRITE_KEYS, progress)
    heal = await heal_runs(n, seed, HEAL_RUNS, progress)
    restart = await restart_run(n, rng, RESTART_CYCLES, progress)
    sync = await phase_sync(keys_10k, report=progress)
    return {
        "nodes": n,
        "seed": seed,
        "overlay": cluster["overlay"],
        "writes": cluster["writes"],
        "put_latency": cluster["put_latency"],
        "heal": heal,
        "restart": restart,
        "sync_10k": sync,
        "total_s": round(trio.current_time() - t_start, 1),
    }


# --- pictures -------------------------------------------------------------------------------


def _steps(series: Series, column: int, scale: float = 1.0) -> tuple[list[float], list[float]]:
    return [p[0] for p in series], [p[column] * scale for p in series]


def _verdict(seconds: float | None, done: str, failed: str) -> str:
    return f"{done} {seconds:g} s" if seconds is not None else failed


def map_pictures(result: dict[str, Any], results_dir: Path, stem: str) -> list[str]:
    """A PNG of convergence over time after the heals and after the restarts; the paths.

    `result` is what `map_run` returned. matplotlib is imported here only (the `bench`
    extra); `ImportError` when it is missing.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = result["nodes"]
    heal, restart = result.get("heal", {}), result.get("restart", {})
    fig, (nodes_ax, entries_ax, restart_ax) = plt.subplots(1, 3, figsize=(16, 4.8))
    for i, run in enumerate(heal.get("runs", [])):
        series = run["series"]
        seed = run["seed"]
        label = _verdict(
            run["seconds_to_convergence"], f"seed {seed}:", f"seed {seed}: NOT converged"
        )
        xs, fraction = _steps(series, 2, 1 / n)
        nodes_ax.plot(xs, fraction, drawstyle="steps-post", color=f"C{i}", label=label)
        xs, entries = _steps(series, 1)
        entries_ax.plot(xs, entries, drawstyle="steps-post", color=f"C{i}", label=label)
    if heal.get("runs"):
        median = heal["seconds_to_convergence"]["median_s"]
        title = (
            f"after a partition heals: N = {n} in memory, {heal['latency_ms']:g} ms links\n"
            f"{heal['seconds_to_convergence']['finished']} of {len(heal['runs'])} runs "
            + _verdict(median, "converged, median", "converged")
        )
        nodes_ax.set_title(title)
        nodes_ax.set_ylabel("fraction of nodes holding the final state")
        nodes_ax.set_ylim(-0.02, 1.02)
        entries_ax.set_title(
            f"entries differing from the final state, all nodes\n"
            f"({heal['keys_per_half']} keys per half, {heal['shared_keys']} written by both)"
        )
        entries_ax.set_ylabel("differing entries")
        entries_ax.set_ylim(bottom=0)
        for ax in (nodes_ax, entries_ax):
            ax.set_xlabel("seconds since the heal (virtual time)")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
    for i, cycle in enumerate(restart.get("cycles", [])):
        series = cycle["series"]
        xs, missing = _steps(series, 1)
        label = _verdict(
            cycle["seconds_to_every_entry"],
            f"restart {i + 1}: all after",
            f"restart {i + 1}: NOT caught up",
        )
        restart_ax.plot(xs, missing, drawstyle="steps-post", color=f"C{i}", label=label)
        if cycle["map_open_s"] is not None:
            restart_ax.axvline(cycle["map_open_s"], color=f"C{i}", linestyle=":", alpha=0.6)
    if restart.get("cycles"):
        restart_ax.set_title(
            f"restart from SQLite, N = {n}, websockets\n"
            f"{restart['keys_written_while_down']} keys written while down; "
            "dotted: map reopened"
        )
        restart_ax.set_xlabel("seconds since the restart began (real time)")
        restart_ax.set_ylabel("entries missing or stale on the restarted node")
        restart_ax.set_xlim(left=0)
        restart_ax.set_ylim(bottom=0)
        restart_ax.grid(True, alpha=0.3)
        restart_ax.legend(fontsize=8)
    fig.tight_layout()
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{stem}_map_convergence.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [str(path)]


def _seconds(spread_: dict[str, Any]) -> str:
    if not spread_["finished"]:
        return f"none of {spread_['runs']} runs finished"
    text = (
        f"median {spread_['median_s']} s (min {spread_['min_s']}, max {spread_['max_s']}; "
        f"{spread_['runs']} runs"
    )
    missed = spread_["runs"] - spread_["finished"]
    return text + (f", {missed} did NOT finish)" if missed else ")")


def map_summary(result: dict[str, Any]) -> list[str]:
    """Markdown lines of the map figures: a heading and one table (`result` from `map_run`)."""
    n = result["nodes"]
    writes, latency = result["writes"], result["put_latency"]
    heal, restart, sync = result["heal"], result["restart"], result["sync_10k"]
    lat = latency["to_last_node"]
    halves = " and ".join(str(h) for h in sorted(set(heal["halves"])))
    lat_text = (
        f"p50 {lat.get('p50_ms')}, p90 {lat.get('p90_ms')}, p99 {lat.get('p99_ms')}, "
        f"max {lat.get('max_ms')} ms ({latency['complete']}/{latency['puts']} complete)"
    )
    write_text = (
        f"{writes['writes_per_s_applied_on_every_node']} writes/s, "
        f"{round(writes['cpu_us_per_replicated_write']):,} us CPU each (all nodes); RMR "
        f"{writes['traffic']['rmr']}, {writes['traffic']['grafts_sent']} GRAFTs"
        + ("" if writes["complete"] else "; TIMED OUT")
    )
    sync_text = " / ".join(
        f"{sync[kind]['seconds']} s" + ("" if sync[kind]["complete"] else " (INCOMPLETE)")
        for kind in ("join", "open")
    )
    return [
        f"## Replicated map, N = {n}",
        "",
        "| figure | measured |",
        "|---|---|",
        f"| writes applied on every node: {n} writers, {writes['keys']} keys as fast as "
        f"`put` returns (websockets, one process) | {write_text} |",
        f"| one put to the last node: {latency['puts']} puts {latency['pace_ms']:g} ms apart "
        f"| {lat_text} |",
        f"| convergence after a partition heals: halves of {halves} nodes, "
        f"{heal['keys_per_half']} keys each + {heal['shared_keys']} on both (in memory, "
        f"{heal['latency_ms']:g} ms links, virtual time) | "
        f"{_seconds(heal['seconds_to_convergence'])}; first link across "
        f"{_seconds(heal['first_link_across'])} |",
        f"| a restarted node holds every entry: SQLite store, "
        f"{restart['keys_written_while_down']} keys written while down (websockets) | "
        f"{_seconds(restart['seconds_to_every_entry'])} after the restart began |",
        f"| full sync of {sync['keys']:,} keys: fresh node joins / map reopened | {sync_text} |",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--keys-10k", type=int, default=SYNC_KEYS, help="keys of the sync map")
    parser.add_argument(
        "--write", action="store_true", help="also write JSON and PNG into bench/results/"
    )
    args = parser.parse_args(argv)
    if args.nodes < 2:
        parser.error("--nodes must be at least 2")
    # Every in-process node warns that it listens on loopback only: expected here, noise.
    logging.getLogger("trio_replica").setLevel(logging.ERROR)
    figures = trio.run(
        functools.partial(
            map_run, args.nodes, seed=args.seed, keys_10k=args.keys_10k, progress=default_progress
        )
    )
    result = {**run_header("cluster_map"), **figures}
    text = json.dumps(result, indent=2)
    print(text)
    if not args.write:
        return
    RESULTS.mkdir(exist_ok=True)
    stem = f"cluster_map_{result['date'][:10]}"
    (RESULTS / f"{stem}.json").write_text(text + "\n")
    try:
        written = map_pictures(result, RESULTS, stem)
    except ImportError:
        default_progress("matplotlib is not installed (the bench extra): no pictures")
    else:
        default_progress("wrote " + ", ".join(written))


if __name__ == "__main__":
    main()
