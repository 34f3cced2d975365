"""The demo as a user runs it: a subprocess, plain output (not a terminal), exit status 0."""

from __future__ import annotations

import subprocess
import sys

import pytest

from trio_replica import demo
from trio_replica.cli import main

PY = [sys.executable, "-m", "trio_replica"]


def test_demo_replicates_crashes_restarts_and_exits_zero() -> None:
    out = subprocess.run([*PY, "demo", "--nodes", "4"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    for expected in (
        "started 4 nodes on 127.0.0.1",
        "overlay connected",
        "all 4 nodes hold the same 20 keys",
        "crashed n4",
        "saw PeerDown(n4, failed)",
        "views repaired: n4 gone from every active view",
        "the survivors hold the same 29 keys",
        "restarted n4: recovered ",  # how many depends on the store writes the crash cut short
        "n4 caught up: all 4 nodes hold the same 29 keys",
        "demo succeeded",
    ):
        assert expected in text, text
    assert "\x1b[" not in text  # plain mode: no cursor movement when stdout is a pipe
    assert "  n4    down" in text  # the table shows the crashed node
    # The table after the crash: the survivors' frame rates are not 0 (they were, when the
    # rate was taken over the moment since the previous table).
    after_crash = text[text.index("views repaired") :].splitlines()[2:5]
    assert [line.split()[0] for line in after_crash] == ["n1", "n2", "n3"]
    assert all(float(line.split()[-1]) > 0 for line in after_crash), after_crash
    assert out.stderr == ""  # a random cluster secret: no loopback-only warnings


def test_demo_step_deadline_fails_with_the_step_named(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # An overlay that never looks connected: the first step misses its deadline, the demo
    # names it and exits 1 (after stopping the nodes it started).
    monkeypatch.setattr(demo, "overlay_ok", lambda nodes, min_active=1: False)
    assert main(["demo", "--nodes", "3", "--step-timeout", "0.5"]) == 1
    captured = capsys.readouterr()
    assert "demo FAILED: step 'start' failed" in captured.out
    assert "error: demo step 'start' failed" in captured.err


def test_demo_refuses_too_few_nodes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--nodes", "2"]) == 2
    assert "at least 3 nodes" in capsys.readouterr().out
