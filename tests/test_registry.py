"""The service registry (issue 16), on the memory network in virtual time: registrations seen
everywhere, gone everywhere within the lease when their node crashes, kept through a lost
link between live nodes, and whole again after a partition longer than the lease."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import trio
import trio.testing

from trio_replica.runtime.config import RegistryConfig
from trio_replica.stores.registry import Registered, Unregistered
from trio_replica.transports.memory import MemoryNetwork

from .harness import Cluster, wait_until, walled_cluster

CONFIG = RegistryConfig()


async def _cluster(nursery: trio.Nursery, net: MemoryNetwork, n: int) -> tuple[Cluster, list[Any]]:
    """`n` nodes whose wall clocks follow the virtual clock (leases carry wall times)."""
    return await walled_cluster(nursery, net, "r", n)


def _seen(node: Any) -> set[tuple[str, str]]:
    return {(r.name, r.node) for name in node.registry.names() for r in node.registry.lookup(name)}


async def test_200_registrations_on_20_nodes_and_a_crash_removes_its_own_within_the_lease(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork(seed=90)
    async with trio.open_nursery() as nursery:
        c, nodes = await _cluster(nursery, net, 20)
        async with contextlib.AsyncExitStack() as stack:
            expected = set()
            for i in range(200):
                node = nodes[i % 20]
                await stack.enter_async_context(node.registry.register(f"svc-{i % 37}", {"i": i}))
                expected.add((f"svc-{i % 37}", node.id))
            with trio.fail_after(60):
                await wait_until(lambda: all(_seen(n) == expected for n in nodes), poll=0.5)
            # A lookup is a local read with the meta and the node.
            found = nodes[3].registry.lookup("svc-0")
            assert {r.node for r in found} == {n for name, n in expected if name == "svc-0"}
            assert (await nodes[5].registry.whereis("svc-1")).name == "svc-1"
            victim = nodes[7]
            gone = {(s, n) for s, n in expected if n == victim.id}
            assert gone
            async with nodes[0].registry.events("svc-*") as events:
                crashed = trio.current_time()
                c.crash(victim.config.name)
                survivors = [n for n in nodes if n is not victim]
                with trio.fail_after(60):
                    await wait_until(
                        lambda: all(_seen(n) == expected - gone for n in survivors), poll=0.25
                    )
                took = trio.current_time() - crashed
                assert took <= CONFIG.ttl + 2 * CONFIG.heartbeat
                reasons: set[tuple[str, str]] = set()
                while len(reasons) < len(gone):
                    event = await events.receive()
                    if isinstance(event, Unregistered):
                        reasons.add((event.registration.name, event.reason))
                assert {r for _, r in reasons} == {"expired"}
        nursery.cancel_scope.cancel()


async def test_a_lost_link_between_live_nodes_removes_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork(seed=91)
    async with trio.open_nursery() as nursery:
        _, nodes = await _cluster(nursery, net, 8)
        async with contextlib.AsyncExitStack() as stack:
            expected = set()
            for node in nodes:
                await stack.enter_async_context(node.registry.register("worker"))
                expected.add(("worker", node.id))
            with trio.fail_after(60):
                await wait_until(lambda: all(_seen(n) == expected for n in nodes), poll=0.5)
            a, b = (
                nodes[0],
                next(p for p in nodes if any(q.id == p.id for q in nodes[0].active_view())),
            )
            net.set_link(a.config.name, b.config.name, loss=1.0)
            for _ in range(24):  # 6 s, checked every quarter second
                await trio.sleep(0.25)
                assert all(_seen(n) == expected for n in nodes)
            net.set_link(a.config.name, b.config.name, loss=0.0)
        nursery.cancel_scope.cancel()


async def test_a_partition_longer_than_the_lease_heals_without_lost_or_phantom_entries(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork(seed=92)
    async with trio.open_nursery() as nursery:
        c, nodes = await _cluster(nursery, net, 10)
        async with contextlib.AsyncExitStack() as stack:
            for node in nodes:
                await stack.enter_async_context(node.registry.register("api", node.id))
            expected = {("api", n.id) for n in nodes}
            with trio.fail_after(60):
                await wait_until(lambda: all(_seen(n) == expected for n in nodes), poll=0.5)
            left = [n.config.name for n in nodes[:5]]
            net.partition(left, [n.config.name for n in nodes[5:]])
            await trio.sleep(4 * CONFIG.ttl)  # each side expires, then collects, the other
            assert _seen(nodes[0]) == {("api", n.id) for n in nodes[:5]}
            # A node dies during the partition: it must not come back as a phantom.
            dead = nodes[9]
            c.crash(dead.config.name)
            net.heal()
            survivors = nodes[:9]
            want = expected - {("api", dead.id)}
            with trio.fail_after(120):
                await wait_until(lambda: all(_seen(n) == want for n in survivors), poll=0.5)
            await trio.sleep(4 * CONFIG.ttl)
            assert all(_seen(n) == want for n in survivors)
        nursery.cancel_scope.cancel()


async def test_leaving_the_block_unregisters_everywhere_and_events_say_left(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork(seed=93)
    async with trio.open_nursery() as nursery:
        _, (a, b, c3) = await _cluster(nursery, net, 3)
        async with b.registry.events() as events:
            async with a.registry.register("job", {"v": 1}):
                reg = await c3.registry.whereis("job", timeout=10)
                assert reg.node == a.id and reg.meta == {"v": 1}
                first = await events.receive()
                assert isinstance(first, Registered) and first.registration.node == a.id
            with trio.fail_after(10):
                await wait_until(lambda: not c3.registry.lookup("job"))
            second = await events.receive()
            assert isinstance(second, Unregistered) and second.reason == "left"
        with pytest.raises(trio.TooSlowError):
            await c3.registry.whereis("job", timeout=3)
        nursery.cancel_scope.cancel()


async def test_the_registry_over_the_control_path(autojump_clock: trio.testing.MockClock) -> None:
    from trio_replica.runtime.control import open_control

    net = MemoryNetwork(seed=94)
    async with trio.open_nursery() as nursery:
        _, (a, b) = await _cluster(nursery, net, 2)
        with pytest.raises(RuntimeError, match="not open"):
            b.registry.lookup("cache")  # a clear error, not an empty answer
        # b never used the registry: the operation opens it there, then it syncs.
        async with (
            a.registry.register("cache", {"size": 3}),
            open_control("mem://r1", transport=net.transport("cli")) as client,
        ):
            found: dict[str, Any] = {}
            with trio.fail_after(20):
                while not found.get("cache"):
                    found = await client.call("registry.lookup", ["cache"])
                    await trio.sleep(0.5)
            assert [[n, m] for n, _, m in found["cache"]] == [[a.id, {"size": 3}]]
            assert set(await client.call("registry.lookup", [])) == {"cache"}
        nursery.cancel_scope.cancel()
