"""Helpers shared by the benchmark scripts in this folder (run as ``python bench/NAME.py``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from trio_replica.node import Node


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


def view_signature(nodes: Sequence[Node]) -> tuple[tuple[str, ...], ...]:
    """Every node's active view, as ids: equal signatures mean no membership change."""
    return tuple(tuple(sorted(p.id for p in node.active_view())) for node in nodes)
