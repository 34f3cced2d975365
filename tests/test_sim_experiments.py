"""The scale experiments of bench/sim.py (issue 8), small: 200 nodes, a few seconds each.

They check the shape of the papers' figures, so that a regression of the HyParView or
Plumtree core fails CI: reliability after massive failures, healing within a few shuffle
periods, Plumtree's RMR near 0 against flooding's, the overlay's graph properties. All in
virtual time from fixed seeds; no wall-clock assertion.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import bench.sim
from bench.sim import (
    PAPER_DETECTION,
    PAPER_LATENCY,
    RUNTIME_DETECTION,
    build,
    failures,
    iroh_multi,
    overlay,
    plot,
    plumtree,
)
from trio_replica.core.plumtree import PlumtreeConfig
from trio_replica.sim.broadcast import BROADCAST, FLOOD, PlumtreeLayer
from trio_replica.sim.overlay import Simulator


@pytest.fixture(scope="module")
def base() -> Simulator:
    return build(200, seed=7)


def test_overlay_of_200_nodes_has_the_papers_shape(base: Simulator) -> None:
    result = overlay(base, broadcasts=4, path_sources=50)
    assert result["nodes"] == 200
    assert result["components"] == 1
    # A random 5-regular graph on 200 nodes: clustering about 4/200, paths about 3.5.
    assert result["clustering_coefficient"] < 0.1
    assert result["average_shortest_path"] < 5
    in_degree = {int(k): v for k, v in result["in_degree"].items()}
    assert max(in_degree) == 5
    assert in_degree[5] >= 0.9 * 200
    assert result["reliability_flood"]["min"] == 1.0
    assert result["reliability_plumtree"]["min"] == 1.0
    # The tree is not the shortest-path graph: its last hop is no earlier than flooding's.
    assert result["ldh_plumtree"]["mean"] >= result["ldh_flood"]["mean"]
    # overlay() works on a copy.
    assert not any(record.layer == FLOOD for record in base.broadcasts.values())


def test_massive_failures_and_healing(base: Simulator) -> None:
    rows = failures(base, (0.5, 0.9), cycles=4, detection=PAPER_DETECTION)
    half, most = rows
    assert half["survivors"] == 100 and most["survivors"] == 20
    # Section 5.2: almost no loss at 50%. The first broadcast, sent at the crash instant
    # before anyone detected anything, reaches its origin's piece of the overlay as it
    # stands, which is a matter of which origin was drawn; every later one of the first
    # period reaches every survivor.
    assert half["flood"]["first_broadcast"] >= half["origin_component"]
    for label in ("flood", "plumtree"):
        assert min(half["series"][label][1:10]) == 1.0
    # Section 5.3: healed within 1-2 periods at 50%, a few at 90%.
    assert half["flood"]["healing_cycles"] is not None and half["flood"]["healing_cycles"] <= 2
    assert most["flood"]["healing_cycles"] is not None and most["flood"]["healing_cycles"] <= 4
    # The first cycle after 90% crash swings with the overlay's draw (0.66-0.92 over seeds
    # at 200 nodes): its mean over five overlays, not one seed's value.
    firsts = [
        failures(build(200, seed=seed), (0.9,), cycles=1, detection=PAPER_DETECTION)[0]
        for seed in range(7, 12)
    ]
    assert sum(row["flood"]["first_cycle_mean"] for row in firsts) / len(firsts) > 0.8
    assert most["after"]["components"] == 1
    # Nobody was cut off at the crash: healing counted over the reachable survivors is
    # healing counted over all of them.
    assert most["cut_off_at_crash"] == 0
    for label in ("flood", "plumtree"):
        assert most[label]["healed_reachable_after_s"] == most[label]["healed_after_s"]
    with pytest.raises(ValueError, match="healed_cycles"):
        failures(base, (0.5,), healed_cycles=0)
    # The stabilised overlay itself was not touched.
    assert len(base.alive_nodes()) == 200


def test_a_healed_row_ends_early_with_the_full_windows_figures(base: Simulator) -> None:
    (early,) = failures(base, (0.2,), cycles=5, detection=PAPER_DETECTION)
    (full,) = failures(base, (0.2,), cycles=5, detection=PAPER_DETECTION, healed_cycles=None)
    assert len(full["series"]["t"]) == 50
    # Healed at once: it ends when two periods of settled broadcasts reached everyone.
    assert early["flood"]["healed_after_s"] == 0.0
    # The first instant on: 20 broadcasts settled (5 s old) at 100%, the last 4 settling.
    assert len(early["series"]["t"]) == 24
    for label in ("flood", "plumtree"):
        assert early["series"][label] == full["series"][label][: len(early["series"]["t"])]
        assert early[label] == full[label]
    assert early["after"]["outside_largest"] == full["after"]["outside_largest"] == 0


def test_runtime_detection_measures_plumtree_alone(base: Simulator) -> None:
    (row,) = failures(
        base,
        (0.5,),
        cycles=3,
        detection=RUNTIME_DETECTION,
        layers=(BROADCAST,),
        healed_cycles=None,
    )
    assert "flood" not in row and "flood" not in row["series"]
    assert len(row["series"]["plumtree"]) == len(row["series"]["t"]) == 30
    # Detection by timeout included, it heals within two of the three periods.
    assert row["plumtree"]["healing_cycles"] is not None
    assert row["plumtree"]["healing_cycles"] <= 2


def test_plumtree_against_flooding_stable_and_under_churn(base: Simulator) -> None:
    result = plumtree(base, broadcasts=20, warmup=3, churn_cycles=3)
    stable, churn = result["stable"], result["churn"]
    assert stable["plumtree"]["rmr"]["mean"] < 0.1
    assert stable["plumtree"]["reliability"]["min"] == 1.0
    # Flooding: every node forwards to its 4 other neighbours, so m is about 4n and
    # RMR = m / (n - 1) - 1 is about active_size - 2.
    active = base.hyparview_config.active_size
    assert abs(stable["flood"]["rmr"]["mean"] - (active - 2)) < 0.3
    assert stable["flood"]["reliability"]["min"] == 1.0
    assert churn["plumtree"]["rmr"]["mean"] < 0.2
    assert churn["plumtree"]["reliability"]["mean"] > 0.99
    assert churn["flood"]["reliability"]["mean"] > 0.99
    assert stable["plumtree"]["ldh"]["mean"] >= stable["flood"]["ldh"]["mean"]


def test_the_papers_model_joins_one_node_at_a_time_then_runs_its_cycles() -> None:
    sim = build(200, seed=7, model="paper", cycles=5)
    # Every node joined before the first shuffle: the rounds were held until then.
    assert sim.rounds_from == pytest.approx(0.5 + 200 * 12 * PAPER_LATENCY)
    assert sim.now >= sim.rounds_from + 5 * sim.hyparview_config.shuffle_interval
    assert all(node.policy is None for node in sim.nodes.values())  # no seeding policy
    result = overlay(sim, broadcasts=4, path_sources=50)
    assert result["components"] == 1
    # Sequential joins leave a random-like graph: clustering about 4/200.
    assert result["clustering_coefficient"] < 0.04
    in_degree = {int(k): v for k, v in result["in_degree"].items()}
    assert in_degree[5] >= 0.9 * 200
    # Equal latencies: the first copy to arrive took the fewest hops, so flooding's last
    # hop is the origin's eccentricity, no more than the graph's diameter.
    assert result["ldh_flood"]["max"] <= 2 * result["average_shortest_path"] + 2
    with pytest.raises(ValueError):
        build(10, seed=1, model="cycles")


def test_irohs_scenario_runs_rounds_to_completion() -> None:
    result = iroh_multi(5, nodes=100, rounds=6)
    rounds = result["rounds"]
    assert len(rounds) == 6
    # One second after every node joined at once the overlay is still forming: the first
    # round may miss nodes. The first broadcast that spreads floods the eager links (the
    # tree forms); later ones follow the tree.
    assert max(r["rmr"] for r in rounds[:2]) > 1.0
    assert rounds[-1]["rmr"] < 0.5
    assert all(r["missed"] == 0 and 0 < r["duration"] < 5.0 for r in rounds[1:])
    assert result["mean"]["ldh"] == sum(r["ldh"] for r in rounds) / 6


def test_experiments_are_deterministic_per_seed() -> None:
    def run(seed: int) -> str:
        sim = build(60, seed, settle=30.0)
        return json.dumps(
            [failures(sim, (0.6,), cycles=2), plumtree(sim, broadcasts=6, churn_cycles=1)]
        )

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_a_forked_phase_gives_the_figures_of_a_deep_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    # The phases run in a forked child where the OS has fork, else on a deep copy: the
    # same state either way, so the same figures.
    sim = build(60, seed=5, settle=30.0)
    real_fork = bench.sim.os.fork
    forks: list[int] = []

    def counting_fork() -> int:
        forks.append(1)
        return real_fork()

    monkeypatch.setattr(bench.sim.os, "fork", counting_fork)
    # Earlier tests of the suite leave idle worker threads (Trio's thread cache), which
    # make `_on_a_copy` take the deep copy; the child here touches no lock they could hold.
    monkeypatch.setattr(bench.sim.threading, "active_count", lambda: 1)
    forked = [failures(sim, (0.6,), cycles=2), plumtree(sim, broadcasts=6, churn_cycles=1)]
    assert len(forks) == 2  # the fork path ran, once per phase
    monkeypatch.delattr(bench.sim.os, "fork")
    copied = [failures(sim, (0.6,), cycles=2), plumtree(sim, broadcasts=6, churn_cycles=1)]
    assert forked == copied


def test_broadcast_layers_share_the_overlay() -> None:
    sim = build(30, seed=9, settle=20.0)
    origin = "n3"
    tree = sim.broadcast(origin, BROADCAST)
    flood = sim.broadcast(origin, FLOOD)
    sim.run_for(5.0)
    for id in (tree, flood):
        metrics = sim.broadcasts[id].metrics()
        assert metrics.reliability == 1.0
        assert metrics.delivered == 30
    assert sim.broadcasts[flood].hops[origin] == 0
    with pytest.raises(TypeError):
        sim.broadcast(origin, "membership")
    sim.crash([origin])
    with pytest.raises(ValueError):
        sim.broadcast(origin, BROADCAST)


def test_plot_writes_the_figures(base: Simulator, tmp_path: Path) -> None:
    # matplotlib is in the test extra: this runs in CI too (it was skipped there).
    result = {
        "nodes": 200,
        "overlay": overlay(base, broadcasts=1, path_sources=10),
        "failures": failures(base, (0.5,), cycles=1),
        "plumtree": plumtree(base, broadcasts=4, warmup=1, churn_cycles=1),
    }
    paths = plot(result, tmp_path / "sim_200")
    assert sorted(p.name for p in paths) == [
        "sim_200_failures.png",
        "sim_200_overlay.png",
        "sim_200_plumtree.png",
    ]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_a_run_of_some_phases_with_another_streak_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bench.sim, "machine_reference", lambda: 0.0)
    argv = ["--nodes", "60", "--phases", "plumtree", "--optimization-streak", "1"]
    argv += ["--ihave-batch-window", "0"]
    bench.sim.main([*argv, "--out", str(tmp_path), "--no-plots"])
    result = json.loads((tmp_path / "sim_60_streak1_window0_plumtree.json").read_text())
    assert "plumtree" in result and not {"overlay", "failures"} & set(result)
    assert result["plumtree_config"]["optimization_streak"] == 1
    assert result["plumtree_config"]["ihave_batch_window"] == 0
    assert list(result["wall_seconds"]) == ["build", "plumtree", "total"]
    # Every node's core runs the configuration given.
    sim = build(30, seed=9, settle=20.0, plumtree=PlumtreeConfig(optimization_streak=1))
    cores = [node.stack.layers[BROADCAST] for node in sim.nodes.values()]
    assert all(
        isinstance(c, PlumtreeLayer) and c.core.config.optimization_streak == 1 for c in cores
    )
    with pytest.raises(ValueError, match="unknown phases"):
        bench.sim.run_all(10, 1, phases=("healing",))
    for wrong in (
        ["--optimization-streak", "0"],
        ["--ihave-batch-window", "-1"],
        ["--scenario", "iroh", *argv[2:4]],
    ):
        with pytest.raises(SystemExit):
            bench.sim.main(["--out", str(tmp_path), *wrong])
