"""Issue 22: the wall clock steps (an NTP correction, a VM resumed) and the node copes.

A node trusts its own store for its clock: reopened after a step back, it absorbs the
newest timestamp it wrote, whatever the skew bound says (the bound is for peers), and its
next writes still win over its old ones.

Wall clocks here are the system's, offset per node. Tests with persistent maps run on the
real clock with deadlines: SQLite's calls run in a thread, and the virtual clock jumps
timers while a thread works (STYLE.md, pytest-trio).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from trio_replica.core.hlc import Timestamp, system_ms
from trio_replica.node import Node
from trio_replica.stores.maps import ReplicatedMap
from trio_replica.transports.memory import MemoryNetwork

from .harness import Cluster, overlay_ok, wait_until

MINUTE = 60_000
HOUR = 60 * MINUTE


def set_wall(node: Node, ahead_ms: int) -> None:
    """`node`'s wall clock `ahead_ms` ahead of the system's (behind if negative)."""
    node.clock.physical = lambda: system_ms() + ahead_ms


def newest(node: Node, name: str) -> Timestamp:
    entries = node.maps()[name]._map.entries()
    return max(entry.dot.ts for _, entry in entries)


@pytest.mark.parametrize("ahead", [2 * MINUTE, 120 * MINUTE], ids=["2min", "2h"])
async def test_a_store_written_ahead_of_the_clock_reopens_and_later_writes_win(
    tmp_path: Path, ahead: int
) -> None:
    with trio.fail_after(60):
        await _reopen_after_a_step_back(tmp_path, ahead)


async def _reopen_after_a_step_back(tmp_path: Path, ahead: int) -> None:
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, MemoryNetwork(seed=22))
        a = await c.start("a", data_dir=tmp_path)
        set_wall(a, ahead)  # the wall clock runs ahead while these are written
        m = await a.open_map("m", persist=True)
        for i in range(5):
            await m.put(f"k{i}", i)
        await m.delete("k4")
        written = newest(a, "m")
        assert written.wall >= system_ms() + ahead - 10_000

        a = await c.restart("a")
        set_wall(a, 0)  # corrected: the clock stepped back by `ahead`
        m = await a.open_map("m", persist=True)
        assert sorted(m.items()) == [(f"k{i}", i) for i in range(4)]
        assert "k4" not in m and m.tombstones == 1
        assert a.clock.last > written and a.clock.rejected == 0

        await m.put("k0", "new")
        await m.put("k4", "back")
        for key in ("k0", "k4"):
            entry = m.entry(key)
            assert entry is not None and entry.dot.ts > written
        assert m.get("k0") == "new" and m.get("k4") == "back"

        a = await c.restart("a")
        m = await a.open_map("m", persist=True)  # and again, with the new writes
        assert m.get("k0") == "new" and m.get("k4") == "back"
        nursery.cancel_scope.cancel()


async def test_the_skew_bound_is_the_nodes_setting_and_applies_to_peers(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """A writer whose wall clock runs 2 minutes ahead: a peer with the default bound
    (60 s) refuses its writes, one configured for 3 minutes takes them."""
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, MemoryNetwork(seed=23))
        a = await c.start("a")
        strict = await c.start("strict", [a.address])
        lenient = await c.start("lenient", [a.address], max_clock_offset=180.0)
        assert strict.clock.max_offset_ms == 60_000 and lenient.clock.max_offset_ms == 180_000
        for node in (a, strict, lenient):
            set_wall(node, 0)
        set_wall(a, 2 * MINUTE)
        on_a = await a.open_map("m")
        on_strict, on_lenient = await strict.open_map("m"), await lenient.open_map("m")
        with trio.fail_after(30):
            await wait_until(lambda: overlay_ok(c.live(), min_active=2))
        await on_a.put("k", "ahead")
        with trio.fail_after(30):
            await wait_until(lambda: on_lenient.get("k") == "ahead")
            await wait_until(lambda: on_strict.stats.rejected["skew"] > 0)
        assert "k" not in on_strict and lenient.clock.rejected == 0
        nursery.cancel_scope.cancel()


# --- any schedule of clock steps --------------------------------------------------------------

#: How far a peer's clock may be from certain of what it does with an entry: the time an
#: entry takes to reach it, and to be offered again, stays far below this.
MARGIN_MS = 30_000

jumps = st.one_of(
    st.integers(-3 * HOUR, 3 * HOUR),
    st.sampled_from([-2 * HOUR, -2 * MINUTE, -61_000, 59_000, 2 * MINUTE, 2 * HOUR]),
)
schedules = st.lists(
    st.one_of(
        st.tuples(st.just("jump"), jumps),
        st.tuples(st.sampled_from(["put", "delete"]), st.integers(0, 2)),
        st.tuples(st.just("restart"), st.just(0)),
    ),
    min_size=1,
    max_size=10,
)


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(schedules)
@example([("jump", 2 * HOUR), ("put", 0), ("jump", -2 * HOUR), ("restart", 0), ("put", 0)])
@example([("put", 0), ("jump", -2 * HOUR), ("put", 1), ("restart", 0), ("delete", 0)])
def test_any_schedule_of_clock_steps(schedule: list[tuple[str, int]]) -> None:
    """Node a's wall clock jumps forward and back by up to hours between its writes and
    restarts; node b's stays right. Node a always reopens its store with what it
    acknowledged; its HLC never goes back, so each write supersedes all its earlier ones,
    here and at b; b takes every write stamped within its skew bound, and refuses (and
    counts) those beyond it."""
    with tempfile.TemporaryDirectory() as directory:
        trio.run(_run_schedule, schedule, Path(directory))


async def _run_schedule(schedule: list[tuple[str, int]], data_dir: Path) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            c = Cluster(nursery, MemoryNetwork(seed=22))
            b = await c.start("b")
            await c.start("a", [b.address], data_dir=data_dir)
            run = ScheduleRun(c, b, await b.open_map("m"))
            await run.reopen()
            for step, (kind, arg) in enumerate(schedule):
                if kind == "jump":
                    run.offset += arg
                elif kind == "restart":
                    await c.restart("a")
                    await run.reopen()
                else:
                    await run.write(kind, arg, step)
            nursery.cancel_scope.cancel()


class ScheduleRun:
    """Node a (its map persisted, its wall clock `offset` ms off the system's) and node b
    (its clock right), and what a acknowledged."""

    def __init__(self, c: Cluster, b: Node, on_b: ReplicatedMap) -> None:
        self.c, self.b, self.on_b = c, b, on_b
        self.offset = 0
        self.model: dict[int, Any] = {}  # key -> value, None once deleted
        self.last = Timestamp(0, 0)  # a's newest write

    async def reopen(self) -> None:
        """Open a's map again (the node just started): never a `ClockSkewError`, and the
        clock ahead of everything a wrote."""
        self.a = self.c["a"]
        self.a.clock.physical = lambda: system_ms() + self.offset
        self.on_a = await self.a.open_map("m", persist=True)
        assert self.a.clock.last >= self.last
        for key, value in self.model.items():
            assert self.on_a.get(key) == value and (key in self.on_a) == (value is not None)

    async def write(self, kind: str, key: int, value: int) -> None:
        a, b, on_a, on_b = self.a, self.b, self.on_a, self.on_b
        with trio.fail_after(10):
            await wait_until(lambda: overlay_ok([a, b]))
        refused = on_b.stats.rejected["skew"]
        if kind == "put":
            await on_a.put(key, value)
            self.model[key] = value
        else:
            await on_a.delete(key)
            self.model[key] = None
        entry = on_a.entry(key)
        assert entry is not None and entry.dot.node == "a"
        assert entry.dot.ts > self.last  # the clock never went back: this write wins
        assert on_a.get(key) == self.model[key] and (key in on_a) == (kind == "put")
        self.last = entry.dot.ts
        ahead = self.last.wall - system_ms()  # of b's wall clock
        with trio.fail_after(10):
            if ahead <= b.clock.max_offset_ms:
                await wait_until(lambda: on_b.entry(key) == entry)
            elif ahead > b.clock.max_offset_ms + MARGIN_MS:
                await wait_until(lambda: on_b.stats.rejected["skew"] > refused)
                assert on_b.entry(key) != entry
