"""Micro-benchmarks of the clock and the OR-Map: merge, ingest from the wire, now().

A script, not a test: ``.venv/bin/python bench/micro_crdt.py``. It prints one JSON document
to stdout and writes the same to ``bench/results/micro_crdt.json``. Every figure is the
median of several repetitions on fresh copies (setup excluded from the timing); inputs come
from a seeded RNG, so runs differ only by machine noise.

* ``merge``: two 10,000-entry maps sharing half their keys, 10% tombstones, writers and
  HLCs drawn so that either side wins about half the shared keys.
* ``ingest``: a 1,000-entry delta (10% tombstones, small dict values) arriving as payload
  bytes, strictly decoded then validated and merged into a 10,000-entry map.
* ``now``: `HybridClock.now()` calls per second, with the system clock and with a constant
  physical clock (the pure logical path).
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trio_replica.core import wire
from trio_replica.core.hlc import HybridClock, Timestamp
from trio_replica.core.ormap import Dot, ORMap
from trio_replica.core.ormap_wire import ingest, to_wire

SEED = 42
BASE_MS = 1_700_000_000_000
REPEATS = 9
NODES = [f"node-{i}" for i in range(8)]
MAX_PAYLOAD = 16 * 1024 * 1024


def make_map(rng: random.Random, keys: list[str]) -> ORMap:
    m = ORMap()
    for key in keys:
        dot = Dot(rng.choice(NODES), Timestamp(BASE_MS + rng.randrange(10_000), rng.randrange(4)))
        if rng.random() < 0.1:
            m.remove(key, dot)
        else:
            m.add(key, {"n": rng.randrange(1_000_000), "s": "x" * rng.randrange(16)}, dot)
    return m


def median_seconds(run: Callable[[], Callable[[], Any]]) -> tuple[float, float]:
    """`run()` does the untimed setup and returns the timed step; (median, min) seconds."""
    times = []
    for _ in range(REPEATS):
        step = run()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def bench_merge(rng: random.Random) -> dict[str, Any]:
    shared = [f"shared-{i}" for i in range(5_000)]
    a = make_map(rng, shared + [f"a-{i}" for i in range(5_000)])
    b = make_map(rng, shared + [f"b-{i}" for i in range(5_000)])
    changed: list[int] = []

    def run() -> Callable[[], None]:
        target = a.copy()

        def step() -> None:
            changed.append(len(target.merge(b)))

        return step

    med, best = median_seconds(run)
    copy_med, _ = median_seconds(lambda: a.copy)
    return {
        "entries_each": 10_000,
        "shared_keys": len(shared),
        "visible_changes": changed[0],
        "median_ms": round(med * 1e3, 3),
        "min_ms": round(best * 1e3, 3),
        "us_per_incoming_entry": round(med * 1e6 / 10_000, 3),
        "copy_10k_median_ms": round(copy_med * 1e3, 3),
    }


def bench_ingest(rng: random.Random) -> dict[str, Any]:
    local = make_map(rng, [f"k-{i}" for i in range(10_000)])
    # Half the delta updates existing keys, half adds new ones.
    delta_map = make_map(
        rng, [f"k-{i}" for i in range(0, 1_000, 2)] + [f"new-{i}" for i in range(500)]
    )
    payload = wire.encode_payload(to_wire(delta_map.entries()), max_size=MAX_PAYLOAD)

    def clock() -> HybridClock:
        return HybridClock(lambda: BASE_MS + 20_000)

    def run_decode() -> Callable[[], Any]:
        return lambda: wire.decode_payload(payload, max_size=MAX_PAYLOAD)

    def run_ingest() -> Callable[[], Any]:
        target, c = local.copy(), clock()
        raw = wire.decode_payload(payload, max_size=MAX_PAYLOAD)
        return lambda: ingest(target, raw, c)

    def run_both() -> Callable[[], Any]:
        target, c = local.copy(), clock()
        return lambda: ingest(target, wire.decode_payload(payload, max_size=MAX_PAYLOAD), c)

    check = ingest(local.copy(), wire.decode_payload(payload, max_size=MAX_PAYLOAD), clock())
    assert not check.rejected
    decode_med, _ = median_seconds(run_decode)
    ingest_med, _ = median_seconds(run_ingest)
    both_med, both_min = median_seconds(run_both)
    return {
        "delta_entries": 1_000,
        "payload_bytes": len(payload),
        "into_map_entries": 10_000,
        "applied": check.applied,
        "decode_median_ms": round(decode_med * 1e3, 3),
        "validate_and_merge_median_ms": round(ingest_med * 1e3, 3),
        "total_median_ms": round(both_med * 1e3, 3),
        "total_min_ms": round(both_min * 1e3, 3),
        "us_per_entry": round(both_med * 1e6 / 1_000, 3),
        "entries_per_second": round(1_000 / both_med),
    }


def bench_now() -> dict[str, Any]:
    calls = 200_000
    out: dict[str, Any] = {"calls": calls}
    for label, physical in (("system_clock", None), ("constant_physical", lambda: BASE_MS)):
        rates = []
        for _ in range(5):
            clock = HybridClock() if physical is None else HybridClock(physical)
            now = clock.now
            start = time.perf_counter()
            for _ in range(calls):
                now()
            rates.append(calls / (time.perf_counter() - start))
        out[f"{label}_per_second"] = round(statistics.median(rates))
    return out


def main() -> None:
    rng = random.Random(SEED)
    results = {
        "benchmark": "micro_crdt",
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "repeats": REPEATS,
        "merge_10k_into_10k": bench_merge(rng),
        "ingest_1k_delta_from_wire": bench_ingest(rng),
        "hlc_now": bench_now(),
    }
    text = json.dumps(results, indent=2)
    print(text)
    out_dir = Path(__file__).resolve().parent / "results"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "micro_crdt.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
