"""Test helpers: run many nodes inside one test's nursery, stop or crash any of them.

Each node runs in its own task with its own cancel scope, so a test can leave one node
gracefully (`stop`), crash it (`crash`: no leave, connections reset), or keep it running
until the test's nursery ends.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable
from typing import Any

import attrs
import trio

from transports.memory import MemoryNetwork
from trio_replica.config import NodeConfig
from trio_replica.link import LinkConfig
from trio_replica.localcluster import overlay_ok, run_node
from trio_replica.node import Node


@attrs.define
class Cluster:
    """Nodes started in `nursery`; on the memory network when `net` is given, else websockets."""

    nursery: trio.Nursery
    net: MemoryNetwork | None = None
    base: NodeConfig = attrs.field(factory=lambda: NodeConfig(name="base"))
    nodes: dict[str, Node] = attrs.field(factory=dict)
    scopes: dict[str, trio.CancelScope] = attrs.field(factory=dict)
    stopped: dict[str, trio.Event] = attrs.field(factory=dict)

    async def start(self, name: str, seeds: Iterable[str] = (), **overrides: Any) -> Node:
        listen = f"mem://{name}" if self.net else "ws://127.0.0.1:0"
        config = attrs.evolve(
            self.base,
            name=name,
            listen=listen,
            seeds=tuple(seeds),
            rng_seed=zlib.crc32(name.encode()),
            **overrides,
        )
        transport = self.net.transport(name) if self.net else None
        scope = trio.CancelScope()
        stopped = self.stopped[name] = trio.Event()
        node: Node = await self.nursery.start(run_node, config, transport, scope, stopped)
        self.nodes[name] = node
        self.scopes[name] = scope
        return node

    async def start_many(self, names: Iterable[str], seed: Node) -> list[Node]:
        return [await self.start(name, [seed.address]) for name in names]

    def stop(self, name: str) -> None:
        """Leave gracefully (the node's block exits and runs its leave)."""
        self.scopes.pop(name).cancel()
        del self.nodes[name]

    def crash(self, name: str) -> None:
        """Crash the node: no graceful leave; on the memory network its connections reset."""
        node = self.nodes.pop(name)
        self.scopes.pop(name)
        if self.net is not None:
            self.net.kill(name)
        node.abort()

    async def wait_stopped(self, name: str) -> None:
        """Wait until a stopped or crashed node's task (and everything it owned) has ended."""
        await self.stopped[name].wait()

    def live(self) -> list[Node]:
        return list(self.nodes.values())


async def wait_until(predicate: Callable[[], bool], *, poll: float = 0.1) -> None:
    """Wait for a condition over several nodes (no event signals it); bound it by a deadline."""
    while not predicate():  # noqa: ASYNC110
        await trio.sleep(poll)


def full_views(nodes: list[Node], size: int) -> float:
    """Share of nodes whose active view is full."""
    return sum(len(n.active_view()) >= size for n in nodes) / len(nodes)


FAST_LINKS = LinkConfig(ping_interval=0.5, idle_timeout=2.0, linger=1.0)

__all__ = ["FAST_LINKS", "Cluster", "full_views", "overlay_ok", "wait_until"]
