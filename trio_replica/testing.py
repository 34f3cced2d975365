"""A cluster kit for your own tests: many nodes in one process, on the in-memory network.

Run under Trio's virtual clock (pytest-trio's ``autojump_clock`` fixture) and a test of
minutes of protocol time takes a fraction of a second, the same on every machine::

    from trio_replica import testing

    async def test_my_app(autojump_clock):
        async with testing.cluster(5) as c:
            c.partition(["n1", "n2"], ["n3", "n4", "n5"])
            ...
            c.heal()
            await c.converged("orders")

Every node runs in a task of its own with its own cancel scope, so a test stops one
(a graceful leave), crashes one (no leave; its connections reset), restarts one (same
name, same configuration, same data directory), cuts the network between groups or
sets latency and loss between two hosts. `overlay_ready` and `converged` wait (on the
virtual clock) for what a test usually needs first and last; bound them with
``trio.fail_after``. Nothing here is for production: the memory network is not a
transport between processes.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import attrs
import trio

from .localcluster import overlay_ok, run_node
from .node import Node
from .runtime.config import NodeConfig
from .transports.memory import MemoryNetwork

__all__ = ["Cluster", "cluster", "crash_component", "crash_replica", "wait_until"]


def crash_component(node: Node, name: str) -> None:
    """Make one of `node`'s components (``membership``, ``broadcast``) fail as a crash
    would: its supervisor restarts it, its subscribers are told (`Resubscribed`)."""
    components = node.components()
    try:
        component = components[name]
    except KeyError:
        raise ValueError(f"no component named {name!r}; have {sorted(components)}") from None
    component.crash()


def crash_replica(node: Node, instance: str) -> None:
    """Make the replica driver of `instance` (a map's name) on `node` fail as a crash
    would: its supervisor restarts it with a fresh core, which syncs with its peers."""
    replicas = node.runtime.replicas
    try:
        replica = replicas[instance]
    except KeyError:
        raise ValueError(f"no replica instance {instance!r}; have {sorted(replicas)}") from None
    replica.crash()


async def wait_until(predicate: Callable[[], bool], *, poll: float = 0.1) -> None:
    """Wait until `predicate()` holds, looking every `poll` seconds (of the test's clock).

    For conditions over several nodes that no single event signals; bound the wait with
    ``trio.fail_after``."""
    while not predicate():  # noqa: ASYNC110
        await trio.sleep(poll)


@attrs.define
class Cluster:
    """Nodes started in `nursery`: on the memory network `net` when given, else over
    websockets on 127.0.0.1. `base` is the configuration every node starts from."""

    nursery: trio.Nursery
    net: MemoryNetwork | None = None
    base: NodeConfig = attrs.field(factory=lambda: NodeConfig(name="base"))
    nodes: dict[str, Node] = attrs.field(factory=dict)
    scopes: dict[str, trio.CancelScope] = attrs.field(factory=dict)
    stopped: dict[str, trio.Event] = attrs.field(factory=dict)
    #: The configuration each node was last started with (`restart` starts it again).
    configs: dict[str, NodeConfig] = attrs.field(factory=dict)

    async def start(self, name: str, seeds: Iterable[str] = (), **overrides: Any) -> Node:
        """Start node `name`, joining through `seeds`; `overrides` are `NodeConfig` fields."""
        listen = f"mem://{name}" if self.net else "ws://127.0.0.1:0"
        config = attrs.evolve(
            self.base,
            name=name,
            listen=listen,
            seeds=tuple(seeds),
            rng_seed=zlib.crc32(name.encode()),
            **overrides,
        )
        return await self._run(config)

    async def _run(self, config: NodeConfig) -> Node:
        name = config.name
        if name in self.nodes:
            raise ValueError(f"node {name!r} is running already")
        transport = self.net.transport(name) if self.net else None
        scope = trio.CancelScope()
        stopped = self.stopped[name] = trio.Event()
        node: Node = await self.nursery.start(run_node, config, transport, scope, stopped)
        self.nodes[name] = node
        self.scopes[name] = scope
        self.configs[name] = config
        return node

    async def start_many(self, names: Iterable[str], seed: Node) -> list[Node]:
        return [await self.start(name, [seed.address]) for name in names]

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]

    def live(self) -> list[Node]:
        """The nodes running now, in start order."""
        return list(self.nodes.values())

    def stop(self, name: str) -> None:
        """Leave gracefully (the node's block exits and runs its leave)."""
        self.scopes.pop(name).cancel()
        del self.nodes[name]

    def crash_component(self, name: str, component: str) -> None:
        """`crash_component` of node `name`."""
        crash_component(self.nodes[name], component)

    def crash_replica(self, name: str, instance: str) -> None:
        """`crash_replica` of node `name`."""
        crash_replica(self.nodes[name], instance)

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

    async def restart(self, name: str, **overrides: Any) -> Node:
        """Start `name` again with its last configuration (its data directory too, so its
        persistent maps come back from disk), once the previous run has ended. A running
        node is crashed first. `overrides` change that configuration from now on. Maps are
        not reopened: open them again on the returned node. On the memory network the node
        keeps its address; over websockets it listens on a new port."""
        if name not in self.configs:
            raise LookupError(f"node {name!r} was never started here")
        if name in self.nodes:
            self.crash(name)
        await self.wait_stopped(name)
        return await self._run(attrs.evolve(self.configs[name], **overrides))

    # --- the network ---------------------------------------------------------------------

    def partition(self, *groups: Iterable[str | Node]) -> None:
        """Cut the network between `groups` (node names or nodes); nodes named in no group
        form one more. Replaces any earlier partition."""
        self._network().partition(*([_name(n) for n in group] for group in groups))

    def heal(self) -> None:
        """End the partition."""
        self._network().heal()

    def set_link(
        self,
        a: str | Node,
        b: str | Node,
        *,
        latency: float | None = None,
        loss: float | None = None,
    ) -> None:
        """Latency (seconds, one way) and loss probability between two nodes."""
        self._network().set_link(_name(a), _name(b), latency=latency, loss=loss)

    def _network(self) -> MemoryNetwork:
        if self.net is None:
            raise RuntimeError("partitions, latency and loss need the memory network")
        return self.net

    # --- waiting for the cluster -----------------------------------------------------------

    async def overlay_ready(self, *, min_active: int = 1, poll: float = 0.1) -> None:
        """Wait until the running nodes' active views are symmetric, each holds at least
        `min_active` peers, and the overlay is connected."""
        await wait_until(lambda: overlay_ok(self.live(), min_active=min_active), poll=poll)

    async def converged(
        self, map_name: str, *, nodes: Iterable[str | Node] | None = None, poll: float = 0.1
    ) -> None:
        """Wait until `nodes` (default: every running node) hold the same entries of
        `map_name` (values and tombstones, compared by the map's digest). Each must have
        the map open: one that does not (a node restarted and not reopened) raises
        `LookupError` rather than pass unchecked."""
        names = [_name(n) for n in nodes] if nodes is not None else list(self.nodes)
        missing = [n for n in names if n not in self.nodes or map_name not in self[n].maps()]
        if missing:
            raise LookupError(f"map {map_name!r} is not open on {', '.join(missing)}")

        def same() -> bool:
            return len({self[n].maps()[map_name].digest() for n in names}) == 1

        await wait_until(same, poll=poll)


def _name(node: str | Node) -> str:
    return node if isinstance(node, str) else node.id


@contextlib.asynccontextmanager
async def cluster(
    n: int,
    *,
    prefix: str = "n",
    seed: int = 0,
    latency: float = 0.001,
    loss: float = 0.0,
    base: NodeConfig | None = None,
    ready: bool = True,
    ready_timeout: float = 120.0,
) -> AsyncIterator[Cluster]:
    """`n` nodes named ``n1`` .. ``nN`` on a fresh memory network, joined through ``n1``.

    `seed` fixes the network's random choices (loss); `latency` and `loss` are every
    link's defaults. With `ready`, the block starts once the overlay is formed (every node
    has a neighbour and the overlay is connected), within `ready_timeout` seconds (of the
    test's clock) or `trio.TooSlowError`. Leaving the block cancels every node. An error
    raised in the block comes out as itself, not inside an exception group.
    """
    net = MemoryNetwork(seed=seed, latency=latency, loss=loss)
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            c = Cluster(nursery, net, base or NodeConfig(name="base"))
            if n > 0:
                first = await c.start(f"{prefix}1")
                for i in range(2, n + 1):
                    await c.start(f"{prefix}{i}", [first.address])
            if ready and n > 1:
                with trio.fail_after(ready_timeout):
                    await c.overlay_ready()
            try:
                yield c
            except BaseException as exc:
                body_error = exc
                raise
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The nodes end by cancellation when the block leaves: if the block raised, that
        # is the error to see (what else the group holds is the nodes' cancellation).
        if body_error is not None:
            rest = group.split(trio.Cancelled)[1]
            if rest is not None and rest.exceptions == (body_error,):
                raise body_error from None
        raise
