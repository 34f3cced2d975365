"""The built-ins from the command line (issue 16): `remind`, `reminders`, `shard place`,
`leader` and the built-ins in `status`, against a running node."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

from .test_cli import PY, _start_node


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PY, *args], capture_output=True, text=True, timeout=60)


def test_reminders_shard_and_leader_commands_against_a_running_node(tmp_path: Path) -> None:
    proc, address = _start_node(tmp_path, "a", "--data-dir", str(tmp_path))
    try:
        node = ["--node", address]
        set_ = _run("remind", *node, "job-1", "--after", "3600", "--payload", '{"a": 1}')
        assert set_.returncode == 0, set_.stderr
        row = json.loads(set_.stdout)
        # No node subscribes to reminders: nobody owns it yet (it waits for a worker).
        assert row["key"] == "job-1" and row["payload"] == {"a": 1} and row["owner"] is None
        listed = _run("reminders", *node)
        assert [json.loads(x) for x in listed.stdout.splitlines()] == [row]
        place = json.loads(_run("shard", *node, "place", "job-1", "-n", "2").stdout)
        # Nobody joined the shard (the node reads it only): no owner.
        assert place["owners"] == [] and 0 <= place["partition"] < place["ring_size"]
        lead = json.loads(_run("leader", *node, "db").stdout)
        assert lead == {"name": "db", "leader": None, "fence": None, "candidates": []}
        status = _run("status", *node)
        assert "reminders: 1 pending" in status.stdout and "shard: members 0" in status.stdout
        assert _run("remind", *node, "job-1", "--cancel").returncode == 0
        again = _run("remind", *node, "job-1", "--cancel")
        assert again.returncode == 1 and "no pending reminder" in again.stderr
        bad = _run("remind", *node, "job-2", "--after", "-5")
        assert bad.returncode == 1 and "delay" in bad.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
