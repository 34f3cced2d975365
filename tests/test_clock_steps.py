"""Issue 22: the wall clock steps (an NTP correction, a VM resumed) and the node copes.

A node trusts its own store for its clock: reopened after a step back, it absorbs the
newest timestamp it wrote, whatever the skew bound says (the bound is for peers), and its
next writes still win over its old ones.

Wall clocks here are the system's, offset per node. Tests with persistent maps run on the
real clock with deadlines: SQLite's calls run in a thread, and the virtual clock jumps
timers while a thread works (STYLE.md, pytest-trio).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from trio_replica.core.hlc import Timestamp, system_ms
from trio_replica.node import Node
from trio_replica.transports.memory import MemoryNetwork

from .harness import Cluster, overlay_ok, wait_until

MINUTE = 60_000


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
