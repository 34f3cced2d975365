"""How long after a heal the overlay is whole again, on the simulator (issue 15).

A script: ``.venv/bin/python bench/sim_partitions.py [--sizes 5 100 1000] [--seeds 3]``. It
writes ``bench/results/sim_partitions.json``. Virtual time, the real HyParView core and the
runtime's seeder rules (`trio_replica.sim.overlay`); the figures depend only on the seeds.

For each size, seed placement (one seed, or a seed in each half), partition length (2 and
20 minutes: longer than `rejoin_interval` and than `reconnect_backoff_max`) and with lost
contacts on and off (`reconnect_interval` 10 s / 0): the nodes split in halves, then heal;
measured is the time from the heal until the active views form one component (checked
every 0.5 s, given up after 600 s), with the probes and reconnects it took.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trio_replica.core.hyparview import HyParViewConfig
from trio_replica.sim.graph import active_graph, is_connected
from trio_replica.sim.overlay import DriverConfig, Simulator

RESULTS = Path(__file__).parent / "results"
GIVE_UP = 600.0


def merge_time(n: int, seeds: list[str], apart: float, reconnect: float, seed: int) -> float:
    hv = HyParViewConfig(reconnect_interval=reconnect)
    sim = Simulator(seed, hyparview=hv, driver=DriverConfig(rejoin="seeds"))
    for i in range(n):
        sim.add_node(f"n{i}", seeds, at=i * 0.01)
    sim.run(60)
    assert is_connected(active_graph(sim)), "the overlay did not form"
    sim.partition([{f"n{i}" for i in range(n // 2)}])
    sim.run_for(apart)
    sim.heal()
    healed = sim.now
    while not is_connected(active_graph(sim)) and sim.now - healed < GIVE_UP:
        sim.run_for(0.5)
    return sim.now - healed


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5, 100, 1000])
    parser.add_argument("--seeds", type=int, default=3, help="simulator seeds per case")
    args = parser.parse_args(argv)
    rows: list[dict[str, Any]] = []
    wall0 = time.monotonic()
    for n in args.sizes:
        for placement, seeds in (
            ("one seed", ["n0"]),
            ("a seed in each half", ["n0", f"n{n // 2}"]),
        ):
            for apart in (120.0, 1200.0):
                for reconnect in (10.0, 0.0):
                    times = [
                        merge_time(n, seeds, apart, reconnect, s) for s in range(1, args.seeds + 1)
                    ]
                    row = {
                        "nodes": n,
                        "seeds": placement,
                        "apart_s": apart,
                        "lost_contacts": bool(reconnect),
                        "merged_after_s": times,
                        "worst_s": max(times),
                        "median_s": statistics.median(times),
                        "never": sum(1 for t in times if t >= GIVE_UP),
                    }
                    print(row, file=sys.stderr, flush=True)
                    rows.append(row)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "sim_partitions.json"
    result = {"give_up_s": GIVE_UP, "wall_s": round(time.monotonic() - wall0, 1), "rows": rows}
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
