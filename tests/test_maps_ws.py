"""Replicated maps over real websockets on 127.0.0.1, and their command-line client."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import trio

from trio_replica.stores.maps import ReplicatedMap

from .harness import Cluster, overlay_ok, wait_until


def converged(maps: list[ReplicatedMap]) -> bool:
    first = sorted(maps[0].items())
    return all(sorted(m.items()) == first for m in maps[1:])


async def test_five_websocket_nodes_replicate_puts_deletes_and_conflicts() -> None:
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery)
        seed = await c.start("s0")
        for i in range(1, 5):
            await c.start(f"s{i}", [seed.address])
        with trio.fail_after(30):
            await wait_until(lambda: overlay_ok(c.live(), min_active=2), poll=0.02)
        maps = [await n.open_map("m") for n in c.live()]
        await maps[2].put("x", [1, 2, 3])
        with trio.fail_after(5):
            await wait_until(lambda: all(m.get("x") == [1, 2, 3] for m in maps), poll=0.01)
        await maps[4].delete("x")
        with trio.fail_after(5):
            await wait_until(lambda: all("x" not in m for m in maps), poll=0.01)
        async with trio.open_nursery() as writers:
            for i, m in enumerate(maps):
                writers.start_soon(m.put, "race", f"from-{i}")
        with trio.fail_after(5):
            await wait_until(lambda: converged(maps) and "race" in maps[0], poll=0.01)
        nursery.cancel_scope.cancel()


async def test_persisted_map_recovers_after_restart_then_catches_up(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery)
        a = await c.start("a")
        b = await c.start("b", [a.address], data_dir=tmp_path / "b")
        with trio.fail_after(10):
            await wait_until(lambda: len(a.active_view()) == 1, poll=0.02)
        ma = await a.open_map("kv")
        mb = await b.open_map("kv", persist=True)
        for i in range(20):
            await mb.put(f"b{i}", i)  # acknowledged: durable in b's store
        await mb.delete("b0")
        c.crash("b")  # no graceful anything
        await c.wait_stopped("b")
        for i in range(10):
            await ma.put(f"a{i}", i)  # written while b is down
        b2 = await c.start("b", [a.address], data_dir=tmp_path / "b")
        mb2 = await b2.open_map("kv", persist=True)
        assert sorted(mb2.keys()) == sorted(f"b{i}" for i in range(1, 20))  # recovered from disk
        with trio.fail_after(15):
            await wait_until(lambda: len(mb2) == 29 and converged([ma, mb2]), poll=0.02)
        nursery.cancel_scope.cancel()


def test_map_commands_against_a_node_process(tmp_path: Path) -> None:
    py = [sys.executable, "-m", "trio_replica"]
    node = subprocess.Popen(
        [*py, "node", "--name", "solo", "--map", "cfg", "--data-dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert node.stdout is not None
    address = node.stdout.readline().split()[-1]
    watcher = subprocess.Popen(
        [*py, "watch", "--node", address, "cfg"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert watcher.stderr is not None
        assert "watching map cfg" in watcher.stderr.readline()  # subscribed: nothing is missed

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [*py, *args[:1], "--node", address, *args[1:]],
                capture_output=True,
                text=True,
                timeout=30,
            )

        assert run("put", "cfg", "color", '{"name": "blue"}').returncode == 0
        got = run("get", "cfg", "color")
        assert got.returncode == 0 and json.loads(got.stdout) == {"name": "blue"}
        assert run("delete", "cfg", "color").returncode == 0
        missing = run("get", "cfg", "color")
        assert missing.returncode == 1 and "not found" in missing.stderr
        bad = run("put", "cfg", "k", "not json")
        assert bad.returncode == 2 and "JSON" in bad.stderr
        unknown = run("get", "nomap", "k")
        assert unknown.returncode == 1 and "does not host map 'nomap'" in unknown.stderr
        assert watcher.stdout is not None
        assert json.loads(watcher.stdout.readline()) == ["put", "color", {"name": "blue"}, "solo"]
        assert json.loads(watcher.stdout.readline()) == ["removed", "color", "solo"]
    finally:
        watcher.kill()
        watcher.wait(timeout=10)
        node.send_signal(signal.SIGINT)
        assert node.wait(timeout=30) == 0
    assert (tmp_path / "cfg.sqlite3").exists()
