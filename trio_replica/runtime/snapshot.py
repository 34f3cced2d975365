"""The node's counters as plain data: `Node.stats()`, which metrics, `status` and the
benchmarks read. Gathered from each piece of the runtime, which keeps its own."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

from ..transports.base import Refusals, Transport

if TYPE_CHECKING:
    from .broadcast import Broadcast
    from .connections import Connections
    from .departures import Departures
    from .dialing import DialBudget
    from .flow import Pressure
    from .health import LoopHealth
    from .membership import Membership
    from .stats import NodeStats


def runtime_stats(
    *,
    counters: NodeStats,
    transport: Transport,
    http_refusals: Refusals,
    membership: Membership,
    broadcaster: Broadcast,
    connections: Connections,
    pressure: Pressure,
    health: LoopHealth,
    departures: Departures,
    dial_budget: DialBudget,
) -> dict[str, Any]:
    """Every counter of the node (module docstring)."""
    out = counters.snapshot()
    # Connections the transport closed before their upgrade (websocket listener bounds).
    transport_refusals = getattr(transport, "refusals", None)
    refused = http_refusals.counts.copy()
    if isinstance(transport_refusals, Refusals):
        refused.update(transport_refusals.counts)
    out["connections_refused"] = dict(refused)
    core = membership.core
    out["membership"] = {
        "active_size": len(core.active),
        "passive_size": len(core.passive),
        **attrs.asdict(core.stats),
        "inbox": membership.inbox_depth(),
        "crashes": membership.crashes,
    }
    bcore = broadcaster.core
    out["broadcast"] = {
        **attrs.asdict(bcore.stats),
        "eager_size": len(bcore.eager),
        "lazy_size": len(bcore.lazy),
        "inbox": broadcaster.inbox_depth(),
        "crashes": broadcaster.crashes,
        "hops": {str(h): n for h, n in sorted(broadcaster.hops.items())},
        "unsubscribed": dict(broadcaster.unsubscribed),
    }
    out["links"] = connections.snapshot()
    pressure = pressure
    out["flow"] = {
        "pressure": dict(pressure.holders()),
        "waits": dict(pressure.waits),
        "waited_seconds": {who: round(t, 3) for who, t in pressure.waited.items()},
        "inbox_bytes": {
            "membership": membership.inbox_bytes(),
            "broadcast": broadcaster.inbox_bytes(),
        },
        "throttled": {
            "membership": membership.throttled,
            "broadcast": broadcaster.throttled,
        },
        "queueing_delay_ms": round(broadcaster.delay.current_ms, 1),
        "write_interval_ms": round(broadcaster.pacer.interval * 1000, 3),
        "paced_seconds": round(broadcaster.pacer.waited, 3),
        "origination_limited": broadcaster.origination.limited,
        "origination_waited_seconds": round(broadcaster.origination.waited, 3),
        **counters.flow,
    }
    out["loop"] = health.snapshot()
    out["departures"] = departures.snapshot()
    out["dials"] = {
        "delayed": dial_budget.delayed,
        "waited_seconds": round(dial_budget.waited, 3),
    }
    return out
