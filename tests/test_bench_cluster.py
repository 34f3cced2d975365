"""The cluster benchmark's machinery (bench/cluster.py, bench/cluster_nodes.py), small.

Not its figures (those are measured, never asserted): that both modes start a cluster,
form the overlay, deliver every broadcast of a phase to every node and count it, switch to
flooding on the same links, and that ``procs`` reaps every child it started, also when the
harness fails inside the cluster.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import trio

# The bench scripts import each other as top-level modules (they run as scripts).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from cluster import Watch, measure, wait_views
from cluster_nodes import Cluster, ProcsCluster, open_inproc, open_procs


async def one_phase(cluster: Cluster, watch: Watch, seqs: list[int]) -> dict[str, object]:
    return await measure(cluster, watch, seqs, random.Random(1), 64, None, 0.0)


@pytest.mark.parametrize("mode", ["inproc", "procs"])
async def test_a_phase_reaches_every_node_in_both_modes(mode: str) -> None:
    n = 4
    watch = Watch(n)
    opener = open_inproc if mode == "inproc" else open_procs
    with trio.fail_after(90):
        async with opener(n, watch) as cluster:
            await wait_views(cluster, 1, 60.0)
            tree = await one_phase(cluster, watch, [0, 1, 2])
            await cluster.set_flooding(True)
            flood = await one_phase(cluster, watch, [3, 4, 5])
            children = cluster.children if isinstance(cluster, ProcsCluster) else []
    assert tree["lost_deliveries"] == 0 and tree["deliveries"] == 3 * (n - 1)
    assert flood["lost_deliveries"] == 0
    counters = tree["messages_per_broadcast"]
    assert isinstance(counters, dict) and counters["payload"] >= n - 1
    # Flooding sends a payload over every link in both directions but the first's.
    assert isinstance(flood["rmr"], float) and flood["rmr"] >= 0
    assert all(child.process.returncode is not None for child in children)


async def test_procs_reaps_every_child_when_the_harness_fails() -> None:
    started: list[ProcsCluster] = []
    with trio.fail_after(90), pytest.raises(ExceptionGroup) as failure:
        async with open_procs(3, Watch(3)) as cluster:
            started.append(cluster)
            raise RuntimeError("harness failed")
    assert failure.group_contains(RuntimeError, match="harness failed")
    assert len(started[0].children) == 3
    assert all(child.process.returncode is not None for child in started[0].children)
