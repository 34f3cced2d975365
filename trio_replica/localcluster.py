"""A small cluster of nodes in one process, over real websockets on 127.0.0.1.

Used by ``python -m trio_replica cluster`` (the first-run check of membership) and by
tests and benchmarks that need a ready cluster: `open_local_cluster` starts the nodes, all
joining through the first one, and `wait_for_views` waits until every active view is
symmetric and the overlay is connected.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Collection, Mapping, Sequence

import trio

from .node import Node, open_node
from .runtime.config import NodeConfig
from .transports.base import Transport


@contextlib.asynccontextmanager
async def open_local_cluster(
    n: int, *, base: NodeConfig | None = None, prefix: str = "n"
) -> AsyncIterator[list[Node]]:
    """Start `n` nodes on 127.0.0.1 (free ports), the first one the seed of the others."""
    import attrs

    base = base or NodeConfig()
    nodes: list[Node] = []
    async with contextlib.AsyncExitStack() as stack:
        try:
            first = await stack.enter_async_context(
                open_node(attrs.evolve(base, name=f"{prefix}1", seeds=()))
            )
            nodes.append(first)
            for i in range(2, n + 1):
                config = attrs.evolve(base, name=f"{prefix}{i}", seeds=(first.address,))
                nodes.append(await stack.enter_async_context(open_node(config)))
            yield nodes
        finally:
            # Every node leaves at once (each leave is shielded and bounded): closing them
            # one after another cost up to 2 s each.
            async with trio.open_nursery() as nursery:
                for node in nodes:
                    nursery.start_soon(node.leave)


async def run_node(
    config: NodeConfig,
    transport: Transport | None,
    scope: trio.CancelScope,
    stopped: trio.Event,
    *,
    task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run one node in a task until `scope` is cancelled; `stopped` is set once it is gone.

    For harnesses that stop and restart nodes one by one (``nursery.start`` returns the
    node): cancelling `scope` is a crash-like stop of that node only.
    """
    try:
        with scope:
            async with open_node(config, transport=transport) as node:
                task_status.started(node)
                await trio.sleep_forever()
    finally:
        stopped.set()


def overlay_ok(nodes: Sequence[Node], *, min_active: int = 1) -> bool:
    """True when active views are symmetric, each has `min_active` peers, and all connect."""
    return views_ok(
        {node.id: {p.id for p in node.active_view()} for node in nodes}, min_active=min_active
    )


def views_ok(views: Mapping[str, Collection[str]], *, min_active: int = 1) -> bool:
    """`overlay_ok` over active views given as ids (node id to its active peers' ids)."""
    for node_id, active in views.items():
        if len(active) < min(min_active, len(views) - 1):
            return False
        for peer_id in active:
            other = views.get(peer_id)
            if other is None or node_id not in other:
                return False
    if not views:
        return True
    first = next(iter(views))
    seen = {first}
    todo = [first]
    while todo:
        for peer_id in views[todo.pop()]:
            if peer_id not in seen and peer_id in views:
                seen.add(peer_id)
                todo.append(peer_id)
    return len(seen) == len(views)


async def wait_for_views(nodes: Sequence[Node], *, min_active: int = 1, poll: float = 0.05) -> None:
    """Wait until `overlay_ok(nodes)`; the caller bounds the wait with a deadline."""
    # Polling is right here: the condition spans many nodes' views and nothing signals it.
    while not overlay_ok(nodes, min_active=min_active):  # noqa: ASYNC110
        await trio.sleep(poll)


async def run_local_cluster(n: int, *, timeout: float) -> int:
    """Start `n` nodes, wait for their views, print them; 0 on success, 1 on timeout."""
    if n < 2:
        print("a cluster needs at least 2 nodes")
        return 2
    async with open_local_cluster(n) as nodes:
        print(f"started {n} nodes; seed {nodes[0].id} at {nodes[0].address}")
        start = trio.current_time()
        with trio.move_on_after(timeout):
            await wait_for_views(nodes, min_active=min(2, n - 1))
        took = trio.current_time() - start
        ok = overlay_ok(nodes, min_active=min(2, n - 1))
        for node in nodes:
            active = ", ".join(p.id for p in node.active_view())
            passive = ", ".join(p.id for p in node.passive_view())
            print(f"  {node.id:>4} {node.address:<24} active: [{active}]  passive: [{passive}]")
        if ok:
            print(f"overlay connected with symmetric active views after {took:.2f} s")
            return 0
        print(f"overlay not connected after {timeout} s")
        return 1
