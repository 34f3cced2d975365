"""The multi-host fault test (bench/chaos.py), short: three nodes in three network
namespaces, writers on each, the first faults of the cycle for 30 s (kill -9 and restart,
then two kills with the first seed; the full ten-minute run adds partitions, isolation and
flapping links), then the checks: no acknowledged write lost, no delete undone, identical
maps. Runs where ``ip netns`` works (root); skipped elsewhere."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

from chaos import netns_available  # noqa: E402

WHY = netns_available()


@pytest.mark.skipif(WHY is not None, reason=f"bench/chaos.py: {WHY}")
def test_three_namespaces_under_faults_lose_nothing(tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    run = subprocess.run(
        [
            sys.executable,
            str(BENCH / "chaos.py"),
            "--hosts",
            "3",
            "--minutes",
            "0.5",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    result = json.loads(out.read_text())
    checks = result["checks"]
    assert checks["lost_count"] == 0 and checks["resurrected_count"] == 0
    assert checks["identical_on_every_node"] and checks["acknowledged_puts"] > 100
    assert result["faults"] and all(f["converged_after_s"] is not None for f in result["faults"])
