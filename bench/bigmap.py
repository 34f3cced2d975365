"""A large map joins: a new node syncs a map of `--keys` entries from a running one.

    python bench/bigmap.py [--keys 1000000]

Two nodes over websockets on 127.0.0.1, in this one process (they share the event loop, so
each side's stall is the other's). Node a holds the map (its entries are loaded straight
into memory, not put one by one: the load is not what is measured); node b joins and
opens the same map, which pulls a full sync. Measured: how long until b holds every key,
the event loop's longest stall while syncing (the lag of a 10 ms sampler, so a step that
holds the loop shows whole), links that died on either side, and b's ingest rate. Beside
them, the raw websocket figure of the same run.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import sys
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cluster import RESULTS, websocket_ceiling
from cluster_nodes import quiet_logs
from common import write_results

from trio_replica import NodeConfig, open_node
from trio_replica.health import HealthConfig, LoopHealth
from trio_replica.ormap import Dot, Value


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


async def run(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {
        "keys": args.keys,
        "freeze": args.freeze,
        "no_gc": args.no_gc,
        "date": datetime.datetime.now().isoformat(),
    }
    gc_pauses = GcPauses()
    gc.callbacks.append(gc_pauses)
    result["ceiling"] = await websocket_ceiling()
    sampler = LoopHealth(HealthConfig(sample_interval=0.01))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sampler.serve)
        async with open_node(NodeConfig(name="a")) as a:
            big = await a.open_map("big")
            progress(f"loading {args.keys:,} keys into a")
            t0 = time.monotonic()
            for i in range(args.keys):
                big._map.merge_entry(f"key-{i:07d}", Value(i, Dot("a", a.clock.now())))
                if i % 10_000 == 0:
                    await trio.lowlevel.checkpoint()
            result["load_s"] = round(time.monotonic() - t0, 2)
            await trio.sleep(0.5)
            lag_before = sampler.max_lag
            sampler.max_lag = 0.0
            gc_pauses.pauses.clear()
            if args.no_gc:
                # To tell our own longest step from the collector's pauses.
                gc.disable()
            if args.freeze:
                # What an embedder holding millions of entries can do: long-lived objects
                # out of the collector's sight, so no full pass walks them again.
                gc.freeze()
            progress("b joins and opens the map")
            start = time.monotonic()
            cpu0 = time.process_time()
            async with open_node(NodeConfig(name="b", seeds=(a.address,))) as b:
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
                result["sync"] = {
                    "complete": len(copy) == args.keys,
                    "held": len(copy),
                    "seconds": round(took, 2),
                    "keys_per_s": round(len(copy) / took),
                    "cpu_s": round(cpu, 2),
                    "cpu_us_per_key": round(cpu / max(len(copy), 1) * 1e6, 2),
                    "max_loop_stall_ms": round(sampler.max_lag * 1000, 1),
                    "longest_gc_pause_ms": gc_pauses.longest_ms(),
                    "stall_buckets": sampler.buckets,
                    "links_closed_a": dict(a.stats()["links_closed"]),
                    "links_closed_b": dict(b.stats()["links_closed"]),
                    "syncs_sent_a": big.replica.stats.syncs_sent,
                    "chunks_received_b": copy.replica.stats.chunks_received,
                    "timeline": timeline[:: max(1, len(timeline) // 40)],
                }
                result["max_loop_stall_before_ms"] = round(lag_before * 1000, 1)
        nursery.cancel_scope.cancel()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--freeze", action="store_true", help="gc.freeze() after loading")
    parser.add_argument("--no-gc", action="store_true", help="no garbage collection meanwhile")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    quiet_logs()
    result = trio.run(run, args)
    frozen = ("_freeze" if args.freeze else "") + ("_nogc" if args.no_gc else "")
    stem = args.out or RESULTS / f"bigmap_{args.keys}{frozen}_{datetime.date.today().isoformat()}"
    write_results(stem, result)
    sync, ceiling = result["sync"], result["ceiling"]
    print(
        f"{args.keys:,} keys: complete {sync['complete']} ({sync['held']:,}) in "
        f"{sync['seconds']} s, {sync['keys_per_s']:,} keys/s, {sync['cpu_us_per_key']} us CPU "
        f"per key; longest loop stall {sync['max_loop_stall_ms']} ms (longest GC pauses "
        f"{sync['longest_gc_pause_ms']}); links closed "
        f"a {sync['links_closed_a']} b {sync['links_closed_b']}; raw websocket "
        f"{ceiling['messages_per_s']:,} msg/s, {ceiling['cpu_us_per_message']} us"
    )


if __name__ == "__main__":
    main()
