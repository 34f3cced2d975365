"""A large map joins: a new node syncs a map of `--keys` entries from a running one.

    python bench/bigmap.py [--keys 1000000] [--procs]

Two nodes over websockets on 127.0.0.1, in this one process (they share the event loop, so
each side's stall is the other's), or with ``--procs`` node a in a child process (its own
loop, its own stall figure, and its own string hash seed: the keys then land in the map's
shards in another order on each side, as they do between two hosts). Node a holds the map
(its entries are loaded straight into memory, not put one by one: the load is not what is
measured); node b joins and opens the same map, which pulls a full sync. Measured: how long
until b holds every key, the event loop's longest stall while syncing (the lag of a 10 ms
sampler, so a step that holds the loop shows whole), links that died on either side, and
b's ingest rate. Beside
them, the raw websocket figure of the same run.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cluster import RESULTS, websocket_ceiling
from cluster_nodes import quiet_logs
from common import json_lines, write_results

from trio_replica import Node, NodeConfig, open_node
from trio_replica.core.ormap import Dot, Value
from trio_replica.runtime.health import HealthConfig, LoopHealth


def progress(message: str) -> None:
    print(f"[bigmap] {message}", file=sys.stderr, flush=True)


class GcPauses:
    """The garbage collector's pauses: a full collection walks every tracked container, and
    a step of ours that it lands in lasts that much longer (map entries are stored so that
    the collector stops tracking them; the dicts holding them it still walks)."""

    def __init__(self) -> None:
        self.started = 0.0
        self.pauses: list[tuple[int, float]] = []

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self.started = time.perf_counter()
        else:
            self.pauses.append((info["generation"], time.perf_counter() - self.started))

    def longest_ms(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for gen, seconds in self.pauses:
            out[f"gen{gen}"] = max(out.get(f"gen{gen}", 0.0), round(seconds * 1000, 1))
        return out


async def load(a: Node, keys: int) -> float:
    """Put `keys` entries straight into a's map (the load is not what is measured)."""
    big = await a.open_map("big")
    progress(f"loading {keys:,} keys into a")
    t0 = time.monotonic()
    for i in range(keys):
        big._map.merge_entry(f"key-{i:07d}", Value(i, Dot("a", a.clock.now())))
        if i % 10_000 == 0:
            await trio.lowlevel.checkpoint()
    return round(time.monotonic() - t0, 2)


def quiet_start(args: argparse.Namespace, sampler: LoopHealth, gc_pauses: GcPauses) -> float:
    """Forget the load's stalls and pauses; apply --no-gc / --freeze. The lag before."""
    lag_before = sampler.max_lag
    sampler.max_lag = 0.0
    sampler.buckets = [0] * len(sampler.buckets)
    gc_pauses.pauses.clear()
    if args.no_gc:
        # To tell our own longest step from the collector's pauses.
        gc.disable()
    if args.freeze:
        # What an embedder holding millions of entries can do: long-lived objects out of
        # the collector's sight, so no full pass walks them again.
        gc.freeze()
    return lag_before


async def join_and_sync(
    args: argparse.Namespace, address: str, sampler: LoopHealth, gc_pauses: GcPauses
) -> dict[str, Any]:
    """Node b joins through `address`, opens the map and waits until it holds every key."""
    progress("b joins and opens the map")
    start = time.monotonic()
    cpu0 = time.process_time()
    async with open_node(NodeConfig(name="b", seeds=(address,))) as b:
        with trio.fail_after(60):
            await b.wait_ready()
        copy = await b.open_map("big")
        timeline = []
        with trio.move_on_after(args.timeout):
            while len(copy) < args.keys:
                timeline.append((round(time.monotonic() - start, 2), len(copy)))
                await trio.sleep(0.5)
        took = time.monotonic() - start
        cpu = time.process_time() - cpu0
        return {
            "complete": len(copy) == args.keys,
            "held": len(copy),
            "seconds": round(took, 2),
            "keys_per_s": round(len(copy) / took),
            "cpu_s": round(cpu, 2),
            "cpu_us_per_key": round(cpu / max(len(copy), 1) * 1e6, 2),
            "max_loop_stall_ms": round(sampler.max_lag * 1000, 1),
            "longest_gc_pause_ms": gc_pauses.longest_ms(),
            "stall_buckets": sampler.buckets,
            "links_closed_b": dict(b.stats()["links_closed"]),
            "chunks_received_b": copy.replica.stats.chunks_received,
            "timeline": timeline[:: max(1, len(timeline) // 40)],
        }


def a_side(a: Node, sampler: LoopHealth, gc_pauses: GcPauses) -> dict[str, Any]:
    return {
        "max_loop_stall_ms": round(sampler.max_lag * 1000, 1),
        "longest_gc_pause_ms": gc_pauses.longest_ms(),
        "links_closed_a": dict(a.stats()["links_closed"]),
        "syncs_sent_a": a.runtime.replicas["big"].stats.syncs_sent,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {
        "keys": args.keys,
        "procs": args.procs,
        "freeze": args.freeze,
        "no_gc": args.no_gc,
        "date": datetime.datetime.now().isoformat(),
    }
    gc_pauses = GcPauses()
    gc.callbacks.append(gc_pauses)
    result["ceiling"] = await websocket_ceiling()
    sampler = LoopHealth(HealthConfig(sample_interval=0.01, quiet_interval=0.01))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sampler.serve)
        if args.procs:
            await run_procs(args, result, sampler, gc_pauses)
        else:
            async with open_node(NodeConfig(name="a")) as a:
                result["load_s"] = await load(a, args.keys)
                await trio.sleep(0.5)
                result["max_loop_stall_before_ms"] = round(
                    quiet_start(args, sampler, gc_pauses) * 1000, 1
                )
                result["sync"] = await join_and_sync(args, a.address, sampler, gc_pauses)
                # One loop: the stall figure is both sides'.
                result["a"] = a_side(a, sampler, gc_pauses)
        nursery.cancel_scope.cancel()
    return result


async def run_procs(
    args: argparse.Namespace, result: dict[str, Any], sampler: LoopHealth, gc_pauses: GcPauses
) -> None:
    """Node a in a child (`serve_main`): it prints its address once loaded, and its own
    figures when told to stop."""
    argv = [sys.executable, __file__, "--serve", "--keys", str(args.keys)]
    argv += ["--freeze"] if args.freeze else []
    argv += ["--no-gc"] if args.no_gc else []
    child = await trio.lowlevel.open_process(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert child.stdin is not None and child.stdout is not None
    try:
        lines = json_lines(child.stdout).__aiter__()
        with trio.fail_after(600):
            ready = await lines.__anext__()
        result["load_s"] = ready["load_s"]
        quiet_start(args, sampler, gc_pauses)
        result["sync"] = await join_and_sync(args, ready["address"], sampler, gc_pauses)
        await child.stdin.send_all(b"stop\n")
        with trio.fail_after(60):
            result["a"] = await lines.__anext__()
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            await child.wait()
        if child.returncode is None:
            child.kill()


async def serve_main(args: argparse.Namespace) -> None:
    """The child of ``--procs``: node a, loaded, until the parent writes a line."""
    gc_pauses = GcPauses()
    gc.callbacks.append(gc_pauses)
    sampler = LoopHealth(HealthConfig(sample_interval=0.01, quiet_interval=0.01))
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sampler.serve)
        async with open_node(NodeConfig(name="a")) as a:
            load_s = await load(a, args.keys)
            await trio.sleep(0.5)
            quiet_start(args, sampler, gc_pauses)
            print(json.dumps({"address": a.address, "load_s": load_s}), flush=True)
            await stdin.receive_some()
            print(json.dumps(a_side(a, sampler, gc_pauses)), flush=True)
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--freeze", action="store_true", help="gc.freeze() after loading")
    parser.add_argument("--no-gc", action="store_true", help="no garbage collection meanwhile")
    parser.add_argument("--procs", action="store_true", help="node a in a child process")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    quiet_logs()
    if args.serve:
        trio.run(serve_main, args)
        return
    result = trio.run(run, args)
    frozen = ("_procs" if args.procs else "") + ("_freeze" if args.freeze else "")
    frozen += "_nogc" if args.no_gc else ""
    stem = args.out or RESULTS / f"bigmap_{args.keys}{frozen}_{datetime.date.today().isoformat()}"
    write_results(stem, result)
    sync, ceiling = result["sync"], result["ceiling"]
    print(
        f"{args.keys:,} keys: complete {sync['complete']} ({sync['held']:,}) in "
        f"{sync['seconds']} s, {sync['keys_per_s']:,} keys/s, {sync['cpu_us_per_key']} us CPU "
        f"per key; longest loop stall {sync['max_loop_stall_ms']} ms (longest GC pauses "
        f"{sync['longest_gc_pause_ms']}); node a: {result['a']}; links closed "
        f"b {sync['links_closed_b']}; raw websocket "
        f"{ceiling['messages_per_s']:,} msg/s, {ceiling['cpu_us_per_message']} us"
    )


if __name__ == "__main__":
    main()
