"""Issue 22: what a map write's outcome is when its store fails or its caller is cancelled.

A write the store refuses is taken back here, and only itself: the undo removes the entry
this write made while it is still the key's entry, never a newer one merged from a peer
meanwhile, and gives the key back the entry it replaced (not a stale read).

On the real clock with deadlines: these maps live in SQLite, whose calls run in a thread,
and the virtual clock jumps its timers while a thread works (STYLE.md, pytest-trio). The
order of events is set by the `Disk` below, never by durations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from trio_replica.core.hlc import system_ms
from trio_replica.core.ormap import Entry, Key
from trio_replica.node import Node
from trio_replica.runtime.config import NodeConfig, ReplicaConfig
from trio_replica.runtime.identity import IdentityConfig, format_key, public_bytes
from trio_replica.stores.maps import ReplicatedMap
from trio_replica.stores.store import MapStore, StoreError
from trio_replica.transports.memory import MemoryNetwork

from .harness import Cluster, overlay_ok, wait_until

ORIGINAL_WRITE = MapStore.write


class Disk:
    """`MapStore.write` with faults: writes holding an entry that `fails` picks raise
    `StoreError` once `release` is set; writes holding one that `holds` picks wait for
    `resume` first (a slow disk, on events: the store's thread must not decide the order
    under the virtual clock). Every write's keys are recorded."""

    def __init__(self) -> None:
        self.fails: Callable[[Key, Entry], bool] = lambda key, entry: False
        self.holds: Callable[[Key, Entry], bool] = lambda key, entry: False
        self.release = trio.Event()
        self.failing = trio.Event()  # a failing write has started
        self.resume = trio.Event()
        self.holding = trio.Event()  # a held write has started
        self.writes: list[list[Key]] = []

    async def write(
        self,
        store: MapStore,
        entries: Sequence[tuple[Key, Entry]],
        signatures: Any = None,
    ) -> None:
        self.writes.append([key for key, _ in entries])
        if any(self.holds(k, e) for k, e in entries):
            self.holding.set()
            await self.resume.wait()
        if any(self.fails(k, e) for k, e in entries):
            self.failing.set()
            await self.release.wait()
            raise StoreError("disk full")
        await ORIGINAL_WRITE(store, entries, signatures=signatures)


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> Disk:
    faulty = Disk()

    async def write(self: MapStore, entries: Any, signatures: Any = None) -> None:
        await faulty.write(self, entries, signatures)

    monkeypatch.setattr(MapStore, "write", write)
    return faulty


def set_wall(node: Node, ahead_ms: int) -> None:
    node.clock.physical = lambda: system_ms() + ahead_ms


def _identities(tmp_path: Path, signed: bool) -> dict[str, IdentityConfig]:
    """Keys for a and b in an allow-list; with `signed`, both sign their entries."""
    if not signed:
        return {"a": IdentityConfig(), "b": IdentityConfig()}
    keys = {name: Ed25519PrivateKey.generate() for name in ("a", "b")}
    allowlist = tmp_path / "allow"
    allowlist.mkdir()
    lines = [f"{name} {format_key(public_bytes(key))}\n" for name, key in keys.items()]
    (allowlist / "cluster.keys").write_text("".join(lines))
    return {
        name: IdentityConfig(trust="allowlist", allowlist=allowlist, key=key, sign_broadcasts=True)
        for name, key in keys.items()
    }


async def _pair(
    nursery: trio.Nursery, tmp_path: Path, *, b_ahead_ms: int, signed: bool
) -> tuple[Cluster, ReplicatedMap, ReplicatedMap]:
    """Node a (map "m" persisted) and node b (map "m" in memory, its wall clock
    `b_ahead_ms` ahead of a's), linked, anti-entropy out of the way; with `signed`, the
    entries carry their writers' signatures."""
    base = NodeConfig(name="x", secret=b"s" * 16, replica=ReplicaConfig(anti_entropy_interval=3600))
    identity = _identities(tmp_path, signed)
    c = Cluster(nursery, MemoryNetwork(seed=22), base=base)
    a = await c.start("a", data_dir=tmp_path / "a", identity=identity["a"])
    b = await c.start("b", [a.address], identity=identity["b"])
    set_wall(a, 0)
    set_wall(b, b_ahead_ms)
    with trio.fail_after(30):
        await wait_until(lambda: overlay_ok([a, b]))
    return c, await a.open_map("m", persist=True), await b.open_map("m")


async def _reopened(c: Cluster) -> ReplicatedMap:
    """Node a restarted (a crash: what it acknowledged is on disk), its map reopened."""
    a = await c.restart("a")
    return await a.open_map("m", persist=True)


def signed_by_b(m: ReplicatedMap, key: Key) -> bool:
    """Whether `m` holds, with the entry of `key`, its writer b's signature."""
    entry = m.entry(key)
    assert entry is not None and entry.dot.node == "b"
    return m._authenticate(key, entry, m._sigs.get(key, b""))


SIGNED = pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])


@SIGNED
async def test_a_failed_write_leaves_a_newer_entry_merged_from_a_peer_meanwhile(
    tmp_path: Path, disk: Disk, signed: bool
) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            c, on_a, on_b = await _pair(nursery, tmp_path, b_ahead_ms=1_000, signed=signed)
            await on_a.put("k", "v1")
            with trio.fail_after(10):
                await wait_until(lambda: on_b.get("k") == "v1")
            disk.fails = lambda key, entry: entry.dot.node == "a"

            async def mine() -> None:
                with pytest.raises(StoreError):
                    await on_a.put("k", "mine")

            async with trio.open_nursery() as writers:
                writers.start_soon(mine)
                await disk.failing.wait()  # a's write is merged here, its fsync under way
                await on_b.put("k", "theirs")  # newer (b's clock is ahead), durable on a
                with trio.fail_after(10):
                    await wait_until(lambda: on_a.get("k") == "theirs")
                disk.release.set()
            assert on_a.get("k") == "theirs" and on_b.get("k") == "theirs"
            assert signed_by_b(on_a, "k") == signed
            reopened = await _reopened(c)
            assert reopened.get("k") == "theirs" and signed_by_b(reopened, "k") == signed
            nursery.cancel_scope.cancel()


@SIGNED
async def test_a_failed_write_gives_back_the_entry_it_replaced_not_a_stale_read(
    tmp_path: Path, disk: Disk, signed: bool
) -> None:
    """The write waits for its group behind a slow one; a peer's entry for its key lands
    meanwhile (older than the write, so the write replaces it), then the store refuses the
    write: the key goes back to the peer's entry, not to what it held when put was called."""
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            c, on_a, on_b = await _pair(nursery, tmp_path, b_ahead_ms=-1_000, signed=signed)
            await on_a.put("k", "v1")
            with trio.fail_after(10):
                await wait_until(lambda: on_b.get("k") == "v1")
            disk.holds = lambda key, entry: key == "slow"
            disk.fails = lambda key, entry: key == "k" and entry.dot.node == "a"
            disk.release.set()

            async def mine() -> None:
                with pytest.raises(StoreError):
                    await on_a.put("k", "mine")

            async with trio.open_nursery() as writers:
                writers.start_soon(on_a.put, "slow", 0)
                await disk.holding.wait()  # "slow" is merging
                writers.start_soon(mine)
                await trio.testing.wait_all_tasks_blocked()  # its dot minted, waiting its group
                await on_b.put("k", "theirs")  # older than "mine": b's clock is behind
                with trio.fail_after(10):
                    await wait_until(lambda: on_a.get("k") == "theirs")
                disk.resume.set()
            theirs = on_b.entry("k")
            assert on_a.get("k") == "theirs" and on_a.entry("k") == theirs
            assert on_b.get("k") == "theirs" and signed_by_b(on_a, "k") == signed
            reopened = await _reopened(c)
            assert reopened.get("k") == "theirs" and reopened.get("slow") == 0
            assert signed_by_b(reopened, "k") == signed
            nursery.cancel_scope.cancel()


async def test_a_group_of_local_writes_is_stored_in_one_transaction(
    tmp_path: Path, disk: Disk
) -> None:
    """A group larger than a remote ingest's slice (512) still goes in one write: it is
    stored, or refused and taken back, as a whole."""
    config = ReplicaConfig(anti_entropy_interval=3600, batch_entries=1024, batch_bytes=2**19)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            c = Cluster(nursery, MemoryNetwork(seed=22), base=NodeConfig(name="x", replica=config))
            a = await c.start("a", data_dir=tmp_path)
            m = await a.open_map("m", persist=True)
            disk.holds = lambda key, entry: isinstance(key, str) and key.startswith("slow")
            outcomes: list[str] = []

            async def put(key: Key, value: Any) -> None:
                try:
                    await m.put(key, value)
                    outcomes.append("ok")
                except StoreError:
                    outcomes.append("failed")

            async def group(first: str, keys: list[Key], value: Callable[[Key], Any]) -> None:
                disk.holding, disk.resume = trio.Event(), trio.Event()
                async with trio.open_nursery() as writers:
                    writers.start_soon(m.put, first, 0)
                    await disk.holding.wait()  # merging alone
                    for key in keys:  # these wait, and then merge as one group
                        writers.start_soon(put, key, value(key))
                    await trio.testing.wait_all_tasks_blocked()
                    disk.resume.set()

            await group("slow1", list(range(600)), lambda key: key)
            assert [len(keys) for keys in disk.writes] == [1, 600]
            assert outcomes == ["ok"] * 600

            disk.fails = lambda key, entry: key == "bad"
            disk.release.set()
            outcomes.clear()
            await group("slow2", [*range(599), "bad"], lambda key: "new")
            assert [len(keys) for keys in disk.writes] == [1, 600, 1, 600]
            assert outcomes == ["failed"] * 600
            assert [m.get(i) for i in range(599)] == list(range(599)) and "bad" not in m
            nursery.cancel_scope.cancel()


# --- cancelled writes ---------------------------------------------------------------------


async def test_a_put_cancelled_while_waiting_for_its_group_is_not_written(
    tmp_path: Path, disk: Disk
) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            c, on_a, on_b = await _pair(nursery, tmp_path, b_ahead_ms=0, signed=False)
            disk.holds = lambda key, entry: key == "first"
            outcome: list[str] = []

            async def cancellable() -> None:
                with trio.CancelScope() as scope:
                    scopes.append(scope)
                    await on_a.put("gone", 1)
                    outcome.append("returned")
                if scope.cancelled_caught:
                    outcome.append("cancelled")

            scopes: list[trio.CancelScope] = []
            async with trio.open_nursery() as writers:
                writers.start_soon(on_a.put, "first", 1)
                await disk.holding.wait()  # "first" is being stored
                writers.start_soon(cancellable)
                await trio.testing.wait_all_tasks_blocked()  # "gone" waits for its group
                scopes[0].cancel()
                await trio.testing.wait_all_tasks_blocked()
                disk.resume.set()
            assert outcome == ["cancelled"] and "gone" not in on_a and on_a.get("first") == 1
            await on_a.put("after", 1)  # sent after anything queued before it
            with trio.fail_after(10):
                await wait_until(lambda: on_b.get("after") == 1)
            assert "gone" not in on_b and on_b.get("first") == 1
            assert not any("gone" in keys for keys in disk.writes)
            reopened = await _reopened(c)
            assert "gone" not in reopened and reopened.get("after") == 1
            nursery.cancel_scope.cancel()


async def test_a_put_cancelled_while_its_group_is_stored_is_durable_and_sent(
    tmp_path: Path, disk: Disk
) -> None:
    """Once its group merges, the write completes (its store write shielded) and is
    queued for broadcast in the same step: its caller may see `Cancelled`, but the write
    stands, here, on disk and at the peer (broadcast: anti-entropy is an hour away)."""
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            c, on_a, on_b = await _pair(nursery, tmp_path, b_ahead_ms=0, signed=False)
            disk.holds = lambda key, entry: key == "first"
            scopes: list[trio.CancelScope] = []

            async def cancellable() -> None:
                with trio.CancelScope() as scope:
                    scopes.append(scope)
                    await on_a.put("c", 1)

            async with trio.open_nursery() as writers:
                writers.start_soon(on_a.put, "first", 1)
                await disk.holding.wait()
                writers.start_soon(on_a.put, "x", 1)
                writers.start_soon(cancellable)
                await trio.testing.wait_all_tasks_blocked()  # "x" and "c": the next group
                first_done = disk.resume
                disk.holds = lambda key, entry: key == "x"
                disk.holding, disk.resume = trio.Event(), trio.Event()
                first_done.set()
                await disk.holding.wait()  # the group of "x" and "c" is being stored
                assert ["x", "c"] in disk.writes or ["c", "x"] in disk.writes
                scopes[0].cancel()
                await trio.testing.wait_all_tasks_blocked()
                disk.resume.set()
            assert on_a.get("c") == 1
            with trio.fail_after(10):
                await wait_until(lambda: on_b.get("c") == 1 and on_b.get("x") == 1)
            assert on_a.replica.stats.updates_sent == 3
            reopened = await _reopened(c)
            assert reopened.get("c") == 1 and reopened.get("x") == 1
            nursery.cancel_scope.cancel()
