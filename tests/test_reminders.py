"""Durable reminders (issue 16), on the memory network in virtual time: 1,000 reminders over
10 nodes fire exactly once in steady state, on their key's owner, on time; owners killed
before (or while) their reminders fire: every reminder still fires, duplicates carry the
same fence; a node restarted from disk still has its reminders."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from transports.memory import MemoryNetwork
from trio_replica.config import NodeConfig
from trio_replica.errors import NodeClosed
from trio_replica.reminders import Fired

from .harness import Cluster, overlay_ok, wait_until
from .test_no_resurrection import start, virtual_wall


@attrs.define
class Log:
    fires: list[tuple[float, str, Fired]] = attrs.Factory(list)

    def keys(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for _, _, f in self.fires:
            out[f.key] = out.get(f.key, 0) + 1
        return out


async def _consume(node: Any, log: Log, *, crash_after: int | None = None) -> None:
    """Record every fire on `node` (its wall time, its node id)."""
    try:
        async with node.reminders.subscribe() as inbox:
            async for fired in inbox:
                log.fires.append((node.clock.read_physical() / 1000, node.id, fired))
    except NodeClosed:
        pass


async def _cluster(nursery: trio.Nursery, net: MemoryNetwork, n: int) -> tuple[Cluster, list[Any]]:
    c = Cluster(nursery, net)
    first = await start(c, "m0", [])
    nodes = [first] + [await start(c, f"m{i}", [first.address]) for i in range(1, n)]
    with trio.fail_after(120):
        await wait_until(lambda: overlay_ok(nodes, min_active=2))
    for node in nodes:
        await node.reminders.open()
    ids = sorted(n.id for n in nodes)
    with trio.fail_after(60):
        await wait_until(lambda: all(n.shard.members() == ids for n in nodes), poll=0.25)
    return c, nodes


async def test_1000_reminders_on_10_nodes_fire_once_each_on_their_owner_on_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork(seed=140)
    log = Log()
    rng = random.Random(140)
    async with trio.open_nursery() as nursery:
        _, nodes = await _cluster(nursery, net, 10)
        for node in nodes:
            nursery.start_soon(_consume, node, log)
        now = virtual_wall() / 1000
        due: dict[str, float] = {}
        for i in range(1000):
            key = f"r{i}"
            at = round(now + 5 + rng.uniform(0, 60), 3)
            due[key] = at
            await nodes[i % 10].reminders.remind(key, at, {"i": i})
        with trio.fail_after(200):
            await wait_until(lambda: len(log.keys()) == 1000, poll=0.5)
        await trio.sleep(20)  # any duplicate would have fired by now
        assert log.keys() == dict.fromkeys(due, 1)
        owners = {n.id: n for n in nodes}
        late = []
        for wall, node_id, fired in log.fires:
            assert owners[node_id].shard.place(fired.key) == node_id
            assert fired.payload == {"i": int(fired.key[1:])} and fired.at == due[fired.key]
            late.append(wall - fired.at)
        assert min(late) >= 0 and max(late) < 0.1
        # Fired and acknowledged: gone everywhere.
        with trio.fail_after(30):
            await wait_until(lambda: all(not n.reminders.pending() for n in nodes), poll=0.5)
        assert sum(n.reminders.stats.fired for n in nodes) == 1000
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("when", ["before", "while"])
async def test_killed_owners_reminders_still_fire_and_duplicates_share_the_fence(
    autojump_clock: trio.testing.MockClock, when: str
) -> None:
    net = MemoryNetwork(seed=141 if when == "before" else 142)
    log = Log()
    async with trio.open_nursery() as nursery:
        c, nodes = await _cluster(nursery, net, 10)
        # The victims' consumers stop acknowledging (as if the process hung) when killed.
        for node in nodes:
            nursery.start_soon(_consume, node, log)
        now = virtual_wall() / 1000
        fences = {}
        for i in range(300):
            reminder = await nodes[i % 10].reminders.remind(f"k{i}", now + 20 + i * 0.01, i)
            fences[reminder.key] = reminder.fence
        victims = nodes[1:4]
        owned = {k for k in fences if nodes[0].shard.place(k) in {v.id for v in victims}}
        assert len(owned) > 30
        if when == "before":
            await trio.sleep(10)
        else:
            # Mid-way through the fires: some handed out, not yet acknowledged.
            await trio.sleep(21.5)
        for victim in victims:
            c.crash(victim.config.name)
        with trio.fail_after(200):
            await wait_until(lambda: set(log.keys()) == set(fences), poll=0.5)
        await trio.sleep(30)
        counts = log.keys()
        assert set(counts) == set(fences)
        for _, _, fired in log.fires:
            assert fired.fence == fences[fired.key]
        duplicates = sum(n - 1 for n in counts.values())
        # Only the victims' reminders may fire twice (at least once, same fence).
        assert {k for k, n in counts.items() if n > 1} <= owned
        if when == "before":
            assert duplicates == 0
        nursery.cancel_scope.cancel()


async def test_a_node_restarted_from_disk_still_has_its_reminders(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    net = MemoryNetwork(seed=143)
    log = Log()
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, net, base=NodeConfig(name="x", data_dir=tmp_path / "a"))
        a = await start(c, "a", [])
        now = virtual_wall() / 1000
        first = await a.reminders.remind("later", now + 60, "payload")
        await a.reminders.remind_after("sooner", 30)
        assert await a.reminders.cancel("sooner")
        assert not await a.reminders.cancel("never")
        c.crash("a")
        await c.wait_stopped("a")
        a = await start(c, "a", [])
        await a.reminders.open()
        back = virtual_wall() / 1000
        pending = a.reminders.pending()
        assert [(r.key, r.payload, r.fence) for r in pending] == [("later", "payload", first.fence)]
        nursery.start_soon(_consume, a, log)
        with trio.fail_after(120):
            await wait_until(lambda: bool(log.fires))
        assert [f.key for _, _, f in log.fires] == ["later"]
        # On time, or at once if it came due while the node was down (the SQLite thread
        # lets the virtual clock run ahead).
        assert log.fires[0][0] - max(first.at, back) < a.reminders.config.handoff + 0.1
        nursery.cancel_scope.cancel()


async def test_arguments_are_checked(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork(seed=144)
    async with trio.open_nursery() as nursery:
        a = await start(Cluster(nursery, net), "a", [])
        with pytest.raises(RuntimeError, match="not open"):
            a.reminders.pending()
        with pytest.raises(ValueError, match="key"):
            await a.reminders.remind("", 1.0)
        with pytest.raises(ValueError, match="out of range"):
            await a.reminders.remind("k", -1.0)
        with pytest.raises(TypeError, match="wall time"):
            await a.reminders.remind("k", "soon")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="delay"):
            await a.reminders.remind_after("k", -1)
        nursery.cancel_scope.cancel()
