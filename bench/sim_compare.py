"""The simulator's headline figures over several seeds, one JSON line per seed: to compare
two versions of the code (run it once on each tree, with that tree first on PYTHONPATH).

``PYTHONPATH=. .venv/bin/python bench/sim_compare.py --nodes 500 --seeds 5 > after.jsonl``

Per seed: the stable overlay's clustering coefficient, average shortest path and last
delivery hop (flooding, Plumtree), then massive failures at 50/80/90% (`bench/sim.py`):
the first shuffle period's mean reliability with flooding, when it healed, and the
survivors left isolated. `bench/results/driver_policy_2026-11-30.json` holds the run
that compared the simulator's old driver with the shared seeding policy (issue 18).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sim as experiments  # bench/sim.py, next to this file

RATES = (0.5, 0.8, 0.9)


def figures(nodes: int, seed: int) -> dict[str, object]:
    base = experiments.build(nodes, seed)
    overlay = experiments.overlay(base)
    failures = experiments.failures(base, RATES)
    return {
        "seed": seed,
        "clustering": overlay["clustering_coefficient"],
        "asp": overlay["average_shortest_path"],
        "ldh_flood": overlay["ldh_flood"]["mean"],
        "ldh_plumtree": overlay["ldh_plumtree"]["mean"],
        "fail": {
            str(f["rate"]): {
                "first_cycle_flood": f["flood"]["first_cycle_mean"],
                "healed": f["flood"]["healed_after_s"],
                "isolated_after": f["after"]["isolated"],
            }
            for f in failures
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=500)
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    for seed in range(1, args.seeds + 1):
        print(json.dumps(figures(args.nodes, seed)), flush=True)


if __name__ == "__main__":
    main()
