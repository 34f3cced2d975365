"""Logging: node and peer ids in every record (through Trio tasks), JSON lines, the CLI flags."""

from __future__ import annotations

import io
import json
import logging
import signal
import subprocess
import sys

import trio

from trio_replica.runtime.logs import NODE, JsonFormatter, node_context, setup_logging

PY = [sys.executable, "-m", "trio_replica"]


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


async def test_each_nodes_tasks_log_with_their_node_id() -> None:
    stream = io.StringIO()
    setup_logging("INFO", json_lines=True, stream=stream)
    log = logging.getLogger("trio_replica.test")

    async def child() -> None:
        log.info("from a child task")

    async def node_task(name: str) -> None:
        with node_context(name):
            # Tasks spawned here inherit the context, as a node's tasks do inside open_node.
            async with trio.open_nursery() as nursery:
                nursery.start_soon(child)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(node_task, "a")
        nursery.start_soon(node_task, "b")
    log.info("outside", extra={"peer": "p9"})
    records = _lines(stream)
    assert sorted(r["node"] for r in records if r["message"] == "from a child task") == ["a", "b"]
    outside = next(r for r in records if r["message"] == "outside")
    assert "node" not in outside and outside["peer"] == "p9"
    assert set(outside) == {"time", "level", "logger", "message", "peer"}
    assert outside["level"] == "INFO" and outside["logger"] == "trio_replica.test"
    assert NODE.get() is None


def test_json_formatter_keeps_tracebacks_and_odd_values() -> None:
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "bad %s", (b"\x00",), None)
    try:
        raise ValueError("boom")
    except ValueError:
        record.exc_info = sys.exc_info()
    record.node = object()
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "bad b'\\x00'" and "ValueError: boom" in line["exc"]
    assert isinstance(line["node"], str)


def test_node_process_logs_json_lines_with_its_id() -> None:
    proc = subprocess.Popen(
        [*PY, "node", "--name", "jay", "--log-level", "INFO", "--log-json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert "listening on" in proc.stdout.readline()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0
    records = [json.loads(line) for line in proc.stderr.read().splitlines()]
    assert records, "no log lines"
    assert all(r["node"] == "jay" for r in records), records
    assert any(r["logger"] == "trio_replica.node" for r in records)


def test_text_logs_carry_the_node_id() -> None:
    out = subprocess.run(
        [*PY, "demo", "--nodes", "3", "--log-level", "INFO"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert " [n1]: " in out.stderr and " [n3]: " in out.stderr
