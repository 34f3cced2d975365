"""Test helpers beyond the users' kit (`trio_replica.testing`, whose `Cluster` and
`wait_until` the suite uses too): link pairs, views, wall clocks on the virtual clock."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

from trio_replica.core.messages import Message, Peer, Role
from trio_replica.localcluster import overlay_ok
from trio_replica.node import Node
from trio_replica.runtime.flow import Pressure
from trio_replica.runtime.health import LoopHealth
from trio_replica.runtime.link import Link
from trio_replica.runtime.linkconfig import LinkConfig
from trio_replica.runtime.stats import NodeStats
from trio_replica.testing import Cluster, wait_until
from trio_replica.transports.memory import MemoryNetwork


def full_views(nodes: list[Node], size: int) -> float:
    """Share of nodes whose active view is full."""
    return sum(len(n.active_view()) >= size for n in nodes) / len(nodes)


FAST_LINKS = LinkConfig(ping_interval=0.5, idle_timeout=2.0, linger=1.0)


@attrs.define
class LinkPair:
    a: Link
    b: Link
    a_stats: NodeStats
    b_stats: NodeStats
    #: What b received (a's messages), unless another handler was given.
    got: list[Message]


MessageHandler = Callable[[Link, Message, int], Awaitable[None]]


async def link_pair(
    nursery: trio.Nursery,
    net: MemoryNetwork,
    config: LinkConfig,
    *,
    b_starts: float = 0.0,
    stats: type[NodeStats] = NodeStats,
    on_message: MessageHandler | None = None,
    health_a: LoopHealth | None = None,
    health_b: LoopHealth | None = None,
    pressure_a: Pressure | None = None,
    pressure_b: Pressure | None = None,
) -> LinkPair:
    """Two links over one memory connection, each run in `nursery`; b's may start later.

    By default each side records what it receives in `got` and processes payloads at once
    (grants their credit back); `on_message` replaces that on both sides.
    """
    got: list[Message] = []

    async def record(link: Link, message: Message, size: int) -> None:
        got.append(message)
        if message.CREDITED:
            link.processed(size)

    def new_link(conn: Any, peer: str, *, outbound: bool, stats: NodeStats) -> Link:
        return Link(
            conn,
            Peer(peer, f"mem://{peer}"),
            role=Role.NODE,
            outbound=outbound,
            config=config,
            stats=stats,
            on_message=on_message or record,
            health=health_a if outbound else health_b,
            pressure=pressure_a if outbound else pressure_b,
        )

    ready: list[Link] = []
    served = trio.Event()
    b_stats = stats()

    async def serve(conn: Any) -> None:
        await trio.sleep(b_starts)
        link = new_link(conn, "a", outbound=False, stats=b_stats)
        ready.append(link)
        served.set()
        await link.run()

    await nursery.start(net.transport("b").serve, "mem://b", serve)
    a_stats = stats()

    async def dial(task_status: trio.TaskStatus[Link]) -> None:
        async with net.transport("a").open_connection("mem://b", timeout=5) as conn:
            link = new_link(conn, "b", outbound=True, stats=a_stats)
            task_status.started(link)
            await link.run()

    a = await nursery.start(dial)
    await served.wait()
    return LinkPair(a, ready[0], a_stats, b_stats, got)


__all__ = [
    "FAST_LINKS",
    "Cluster",
    "LinkPair",
    "full_views",
    "link_pair",
    "overlay_ok",
    "wait_until",
]


# --- wall clocks that follow the virtual clock ------------------------------------------------

EPOCH_MS = time.time_ns() // 1_000_000


def virtual_wall() -> int:
    """Wall milliseconds that follow trio's (mock) clock: for code that reads wall time
    (leases, tombstone ages) under `autojump_clock`."""
    return EPOCH_MS + int(trio.current_time() * 1000)


async def start_walled(c: Cluster, name: str, seeds: list[str]) -> Node:
    """`c.start`, with the node's wall clock on `virtual_wall`."""
    node = await c.start(name, seeds)
    node.clock.physical = virtual_wall
    return node


async def walled_cluster(
    nursery: trio.Nursery, net: MemoryNetwork, prefix: str, n: int
) -> tuple[Cluster, list[Node]]:
    """`n` nodes on `net` joined through the first, wall clocks on `virtual_wall`, once
    their overlay is formed (at least two neighbours each)."""
    c = Cluster(nursery, net)
    first = await start_walled(c, f"{prefix}0", [])
    nodes = [first] + [await start_walled(c, f"{prefix}{i}", [first.address]) for i in range(1, n)]
    with trio.fail_after(120):
        await wait_until(lambda: overlay_ok(nodes, min_active=2))
    return c, nodes
