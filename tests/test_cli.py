"""The command line: a node process that leaves on SIGINT, `status` against it, `cluster`."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

PY = [sys.executable, "-m", "trio_replica"]


def _start_node(tmp_path: Path, name: str, *extra: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [*PY, "node", "--name", name, "--listen", "127.0.0.1:0", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # "node NAME listening on ws://127.0.0.1:PORT": the ready signal
    assert "listening on" in line, proc.stderr.read() if proc.stderr else line
    return proc, line.split()[-1]


def test_node_process_joins_answers_status_and_exits_zero_on_sigint(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("correct horse battery staple\n")
    a, a_addr = _start_node(tmp_path, "a", "--secret-file", str(secret))
    b, _ = _start_node(tmp_path, "b", "--join", a_addr, "--secret-file", str(secret))
    try:
        status: dict[str, object] = {}
        for _ in range(50):
            out = subprocess.run(
                [*PY, "status", "--node", a_addr, "--secret-file", str(secret), "--json"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert out.returncode == 0, out.stderr
            status = json.loads(out.stdout)
            if status["active"]:
                break
        assert status["id"] == "a"
        assert [p[0] for p in status["active"]] == ["b"]  # type: ignore[union-attr]
        text = subprocess.run(
            [*PY, "status", "--node", a_addr, "--secret-file", str(secret)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert "active  (1): b" in text.stdout
        wrong = tmp_path / "wrong"
        wrong.write_text("not the cluster secret at all\n")
        refused = subprocess.run(
            [*PY, "status", "--node", a_addr, "--secret-file", str(wrong)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert refused.returncode == 1 and "secret" in refused.stderr
    finally:
        for proc in (b, a):
            proc.send_signal(signal.SIGINT)
        for proc in (b, a):
            assert proc.wait(timeout=30) == 0


def test_public_listen_without_secret_is_refused_with_a_clear_message() -> None:
    out = subprocess.run(
        [*PY, "node", "--listen", "0.0.0.0:0"], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 2
    assert "without a cluster secret" in out.stderr


@pytest.mark.parametrize("nodes", [4])
def test_cluster_command_forms_an_overlay(nodes: int) -> None:
    out = subprocess.run(
        [*PY, "cluster", "--nodes", str(nodes)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "overlay connected" in out.stdout
