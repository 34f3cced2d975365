"""Helpers shared by the benchmark scripts in this folder (run as ``python bench/NAME.py``)."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import shlex
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import trio

from trio_replica.core.wire import encode_payload
from trio_replica.node import Node

#: The broadcast tag of benchmark payloads.
TAG = "bench"


def percentiles_ms(samples: Sequence[float]) -> dict[str, float]:
    """Count, p50/p90/p99/max and mean of `samples` (seconds) in ms, nearest-rank."""
    if not samples:
        return {"count": 0}
    ordered = sorted(samples)

    def rank(q: float) -> float:
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

    return {
        "count": len(ordered),
        "p50_ms": round(rank(0.50) * 1e3, 2),
        "p90_ms": round(rank(0.90) * 1e3, 2),
        "p99_ms": round(rank(0.99) * 1e3, 2),
        "max_ms": round(ordered[-1] * 1e3, 2),
        "mean_ms": round(sum(ordered) / len(ordered) * 1e3, 2),
    }


def write_results(stem: Path, result: dict[str, Any], summary: str | None = None) -> list[Path]:
    """Write `result` as ``<stem>.json`` (and `summary` as ``<stem>.md``); the paths."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".json")]
    paths[0].write_text(json.dumps(result, indent=1) + "\n")
    if summary is not None:
        paths.append(stem.with_suffix(".md"))
        paths[1].write_text(summary + "\n")
    return paths


def view_signature(nodes: Sequence[Node]) -> tuple[tuple[str, ...], ...]:
    """Every node's active view, as ids: equal signatures mean no membership change."""
    return tuple(tuple(sorted(p.id for p in node.active_view())) for node in nodes)


def payload_of(seq: int, size: int) -> dict[str, Any]:
    """A payload whose CBOR encoding is `size` bytes (or the smallest possible, if larger)."""
    bare = len(encode_payload({"seq": seq, "pad": b""}, max_size=1 << 20))
    pad = max(0, size - bare)
    # A byte string's length header grows at 24 and 256 bytes: trim to land on `size`.
    while pad and len(encode_payload({"seq": seq, "pad": b"x" * pad}, max_size=1 << 20)) > size:
        pad -= 1
    return {"seq": seq, "pad": b"x" * pad}


def run_header(benchmark: str, **extra: Any) -> dict[str, Any]:
    """What every results file starts with: which benchmark, when, on what, by which command."""
    return {
        "benchmark": benchmark,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
        },
        "command": shlex.join(["python", *sys.argv]),
        **extra,
    }


async def json_lines(stream: trio.abc.ReceiveStream) -> AsyncIterator[Any]:
    """Decoded JSON objects, one per line of `stream`, until it ends."""
    buffer = b""
    while chunk := await stream.receive_some(1 << 16):
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            yield json.loads(line)
