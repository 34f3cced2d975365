"""What a node reports about itself: readiness (for `/readyz`) and `status` (control op).

Read from the node's public face only (`StatusSource`), so that the `status` operation,
the metrics endpoint and the CLI all see the same thing.
"""

from __future__ import annotations

from typing import Any, Protocol

import trio

from ..core.messages import Peer
from ..runtime.component import Component
from ..runtime.config import NodeConfig
from ..runtime.node_runtime import NodeRuntime
from ..stores.hosting import MapHost
from ..stores.leader import Election
from ..stores.maps import ReplicatedMap
from ..stores.registry import Registry
from ..stores.reminders import Reminders
from ..stores.shard import Shard


class NodeFace(Protocol):
    """A node's public face, as the ops room reads it: who it is and what it counts."""

    @property
    def id(self) -> str: ...
    @property
    def address(self) -> str: ...
    @property
    def config(self) -> NodeConfig: ...

    def stats(self) -> dict[str, Any]: ...
    def maps(self) -> dict[str, ReplicatedMap]: ...


class StatusSource(NodeFace, Protocol):
    """What `status` and readiness read of a node (the `Node` facade)."""

    @property
    def closing(self) -> bool: ...
    @property
    def control_ready(self) -> trio.Event: ...
    @property
    def registry(self) -> Registry: ...
    @property
    def shard(self) -> Shard: ...
    @property
    def election(self) -> Election: ...
    @property
    def reminders(self) -> Reminders: ...
    @property
    def map_host(self) -> MapHost: ...
    @property
    def runtime(self) -> NodeRuntime: ...

    def active_view(self) -> list[Peer]: ...
    def passive_view(self) -> list[Peer]: ...
    def components(self) -> dict[str, Component]: ...


def node_readiness(node: StatusSource) -> tuple[bool, str]:
    """`Node.readiness`: joined (a neighbour, or no seed but itself) and its maps open."""
    if node.closing:
        return False, "closing"
    if not node.control_ready.is_set():
        return False, "starting: maps not open yet"
    # Every map, the built-ins' too: a persisted one may have lost acknowledged writes.
    for name, the_map in sorted(node.map_host.all().items()):
        if the_map.recovering:
            return False, f"map {name} is pulling back from peers the writes its store lost"
    alone = not [s for s in node.config.seeds if s != node.address]
    if not node.active_view() and not alone:
        return False, "not joined: no neighbour yet"
    return True, "ready"


def node_status(node: StatusSource) -> dict[str, Any]:
    """`Node.status`: identity, views, counters, maps, built-ins and components."""
    ready, why = node_readiness(node)
    return {
        "id": node.id,
        "address": node.address,
        "cluster": node.config.cluster,
        "ready": ready,
        "readiness": why,
        "active": [[p.id, p.address] for p in node.active_view()],
        "passive": [[p.id, p.address] for p in node.passive_view()],
        "stats": node.stats(),
        "maps": {
            name: {"size": len(m), "tombstones": m.tombstones, "recovering": m.recovering}
            for name, m in sorted(node.maps().items())
        },
        "builtins": _builtins_status(node),
        "components": {
            c.name: (
                f"dead: {c.dead}"
                if c.dead is not None
                else "running"
                if c.running.is_set()
                else "restarting"
            )
            for c in node.components().values()
        },
        "replicas": {
            name: {
                "crashes": r.supervision.crashes,
                "hung_callbacks": r.stats.callbacks_hung,
                "restarting": r.restarting,
            }
            for name, r in sorted(node.runtime.replicas.items())
        },
    }


def _builtins_status(node: StatusSource) -> dict[str, Any]:
    """The built-ins this node uses (those whose map it hosts)."""
    out: dict[str, Any] = {}
    if node.registry.is_open:
        out["registry"] = {"names": len(node.registry.names())}
    if node.shard.is_open:
        out["shard"] = {
            "ring_size": node.shard.ring_size,
            "members": node.shard.members(),
            "owned": len(node.shard.owned()),
        }
    election = node.election
    if election.is_open:
        out["leaders"] = {
            name: {"leader": election.leader_of(name), "fence": election.fence(name)}
            for name in election.names()
        }
    if node.reminders.is_open:
        stats = node.reminders.stats
        out["reminders"] = {
            "pending": len(node.reminders.pending()),
            "workers": len(node.reminders.workers()),
            "fired": stats.fired,
            "acknowledged": stats.acknowledged,
        }
    return out
