"""`MapStore`: what is written comes back, a batch is all or nothing, and a damaged file is
reported (never emptied) with its path. Real clock and real files; no timing assertions."""

from __future__ import annotations

import os
import random
import sqlite3
import tempfile
import threading
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_replica.core.hlc import Timestamp
from trio_replica.core.ormap import Dot, Entry, Key, Tombstone, Value
from trio_replica.core.ormap_wire import Limits
from trio_replica.stores.store import MapStore, StoreCorrupt, StoreError
from trio_replica.stores.store_schema import SCHEMA_VERSION


def v(value: Any, wall: int = 1, node: str = "a", logical: int = 0) -> Value:
    return Value(value, Dot(node, Timestamp(wall, logical)))


def t(wall: int = 1, node: str = "a") -> Tombstone:
    return Tombstone(Dot(node, Timestamp(wall, 0)))


def as_dict(entries: list[tuple[Key, Entry]]) -> dict[tuple[type, Key], Entry]:
    # Keyed by type too: "1", 1 and b"1" are different keys (and 1 == True in a dict).
    out = {(type(k), k): e for k, e in entries}
    assert len(out) == len(entries), "a key was loaded twice"
    return out


MIXED: list[tuple[Key, Entry]] = [
    ("1", v("text key")),
    (1, v("int key", 2)),
    (b"1", v("bytes key", 3)),
    ("", v(None)),
    (b"", t(4, "b")),
    (0, v(False)),
    (-1, v(-0.0)),
    (2**64 - 1, v({"nested": [1, 2.5, b"\x00", {"deep": None}], "t": True})),
    (-(2**64), t(2**48 - 1, "z" * 128)),
    ("ünïcode ✓", v([], 5, "node-é", 2**32 - 1)),
    ("gone", t(6)),
]


async def test_round_trip_of_values_and_tombstones_with_every_key_type(tmp_path: Path) -> None:
    store = await MapStore.open(tmp_path / "m.sqlite3", name="m")
    async with store:
        await store.write(MIXED)
        assert as_dict(await store.load()) == as_dict(MIXED)
        assert (store.writes, store.entries_written) == (1, len(MIXED))
        assert store.bytes_written > 0
        assert store.path == tmp_path / "m.sqlite3"
        assert store.name == "m"


async def test_reopen_after_close_gives_the_same_entries(tmp_path: Path) -> None:
    path = tmp_path / "m.sqlite3"
    store = await MapStore.open(path, name="m")
    await store.write(MIXED[:5])
    await store.write(MIXED[5:])
    await store.aclose()
    assert sorted(os.listdir(tmp_path)) == ["m.sqlite3", "m.sqlite3.commits"], (
        "no log or temporary file left"
    )
    async with await MapStore.open(path, name="m") as again:
        assert as_dict(await again.load()) == as_dict(MIXED)


async def test_write_replaces_by_key_and_tuples_come_back_as_lists(tmp_path: Path) -> None:
    async with await MapStore.open(tmp_path / "m.sqlite3", name="m") as store:
        await store.write([("k", v((1, 2), 1)), (7, v("x"))])
        await store.write([("k", t(2))])
        await store.write([(7, v("y", 3))])
        assert as_dict(await store.load()) == as_dict([("k", t(2)), (7, v("y", 3))])
        await store.write([("k", v((1, (2,)), 4))])
        assert as_dict(await store.load())[(str, "k")] == v([1, [2]], 4)


async def test_delete_removes_exactly_the_given_keys(tmp_path: Path) -> None:
    async with await MapStore.open(tmp_path / "m.sqlite3", name="m") as store:
        await store.write(MIXED)
        await store.delete(["1", b"", "absent", 42])
        expected = [(k, e) for k, e in MIXED if (type(k), k) not in {(str, "1"), (bytes, b"")}]
        assert as_dict(await store.load()) == as_dict(expected)
        assert store.entries_deleted == 4
        with pytest.raises(StoreError, match="keys must be"):
            await store.delete([1.5])  # type: ignore[list-item]


# --- all or nothing ------------------------------------------------------------------------

BEFORE: list[tuple[Key, Entry]] = [("a", v("old a")), ("b", v("old b"))]


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (("bad", v(object())), "not plain data"),
        (("bad", v({1: "int map key"})), "map keys"),
        (("bad", v("x" * 70_000)), "the limit is 65536"),
        (("bad", Value("v", Dot("", Timestamp(1, 0)))), "node id"),
        (("\ud800", v("lone surrogate key")), "UTF-8"),
        ((1.5, v("float key")), "key must be"),
    ],
)
async def test_an_entry_that_cannot_be_stored_fails_the_whole_batch(
    tmp_path: Path, bad: Any, reason: str
) -> None:
    async with await MapStore.open(tmp_path / "m.sqlite3", name="m") as store:
        await store.write(BEFORE)
        batch: list[tuple[Key, Entry]] = [
            ("a", v("new a", 2)),
            ("c", v("new c", 2)),
            bad,
            ("b", t(2)),
        ]
        with pytest.raises(StoreError, match=reason) as info:
            await store.write(batch)
        assert "entry 2" in str(info.value)
        assert "nothing of the batch was written" in str(info.value)
        assert as_dict(await store.load()) == as_dict(BEFORE)
        assert (store.writes, store.entries_written) == (1, 2)


async def test_a_key_beyond_the_limits_is_refused_before_anything_is_stored(
    tmp_path: Path,
) -> None:
    limits = Limits(max_key_bytes=8)
    async with await MapStore.open(tmp_path / "m.sqlite3", name="m", limits=limits) as store:
        with pytest.raises(StoreError, match="key is 9 bytes"):
            await store.write([("short", v(1)), ("123456789", v(2))])
        assert await store.load() == []


async def test_a_failure_inside_the_transaction_rolls_the_batch_back(tmp_path: Path) -> None:
    path = tmp_path / "m.sqlite3"
    async with await MapStore.open(path, name="m") as store:
        await store.write(BEFORE)
    # A trigger makes SQLite itself fail on the third row of the next batch, after the
    # first two rows were inserted inside the transaction.
    conn = sqlite3.connect(path)
    with conn:
        bad_key = cbor2.dumps("bad").hex()
        conn.execute(
            f"CREATE TRIGGER fail BEFORE INSERT ON entries WHEN NEW.key = X'{bad_key}' "
            "BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
        )
    conn.close()
    async with await MapStore.open(path, name="m") as store:
        batch: list[tuple[Key, Entry]] = [
            ("a", v("new a", 2)),
            ("c", v("new c", 2)),
            ("bad", v(3)),
            ("b", t(2)),
        ]
        with pytest.raises(StoreError, match="injected failure"):
            await store.write(batch)
        assert as_dict(await store.load()) == as_dict(BEFORE)
        # The connection is still usable after the rollback.
        await store.write(batch[:2])
        assert len(await store.load()) == 3


# --- damaged and foreign files --------------------------------------------------------------


def _garbage(data: bytes) -> bytes:
    return random.Random(7).randbytes(len(data))


def _overwrite_middle_page(data: bytes) -> bytes:
    page = len(data) // 4096 // 2 * 4096
    return data[:page] + random.Random(8).randbytes(4096) + data[page + 4096 :]


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: d[: len(d) // 2],
        lambda d: d[:4096],
        lambda d: d[:60],
        lambda d: b"",
        _garbage,
        _overwrite_middle_page,
    ],
    ids=["half", "first-page", "partial-header", "empty", "garbage", "middle-page"],
)
async def test_a_damaged_file_is_reported_and_left_untouched(
    tmp_path: Path, damage: Callable[[bytes], bytes]
) -> None:
    path = tmp_path / "m.sqlite3"
    async with await MapStore.open(path, name="m") as store:
        await store.write([(i, v("x" * 100, i)) for i in range(2000)])
    damaged = damage(path.read_bytes())
    path.write_bytes(damaged)
    with pytest.raises(StoreCorrupt) as info:
        await MapStore.open(path, name="m")
    message = str(info.value)
    assert str(path) in message and "corrupt" in message and "left as is" in message
    assert path.read_bytes() == damaged
    assert sorted(os.listdir(tmp_path)) == ["m.sqlite3", "m.sqlite3.commits"]


async def _with_raw_row(path: Path, key: bytes, entry: Any) -> None:
    async with await MapStore.open(path, name="m") as store:
        await store.write(BEFORE)
    conn = sqlite3.connect(path)
    with conn:
        crc = zlib.crc32(entry, zlib.crc32(key)) if isinstance(entry, bytes) else 0
        conn.execute("INSERT INTO entries VALUES (?, ?, ?)", (key, entry, crc))
    conn.close()


@pytest.mark.parametrize(
    ("key", "entry", "detail"),
    [
        (cbor2.dumps("k"), b"\xff\x00", "CBOR"),
        (cbor2.dumps("k"), cbor2.dumps(["k", 1, "a", 1, 0]), "fields"),
        (cbor2.dumps("k"), cbor2.dumps(["other", 1, "a", 1, 0, "v"]), "key 'other'"),
        (cbor2.dumps(1), cbor2.dumps(["1", 0, "a", 1, 0]), "key '1'"),
        (cbor2.dumps("k"), "text, not bytes", "byte strings"),
    ],
)
async def test_a_row_that_does_not_decode_fails_load_by_name(
    tmp_path: Path, key: bytes, entry: Any, detail: str
) -> None:
    path = tmp_path / "m.sqlite3"
    await _with_raw_row(path, key, entry)
    async with await MapStore.open(path, name="m") as store:
        with pytest.raises(StoreCorrupt, match=detail) as info:
            await store.load()
        assert str(path) in str(info.value)
        assert f"CBOR {key.hex()}" in str(info.value)


async def test_a_flipped_byte_inside_a_value_is_caught_by_the_checksum(tmp_path: Path) -> None:
    path = tmp_path / "m.sqlite3"
    async with await MapStore.open(path, name="m") as store:
        await store.write([("k", v("MARKER-0123456789")), *BEFORE])
    data = path.read_bytes()
    assert data.count(b"MARKER-0123456789") == 1
    damaged = data.replace(b"MARKER-0123456789", b"MARKER-0123456788")
    path.write_bytes(damaged)
    # Structurally the file is sound: only the checksum can tell.
    async with await MapStore.open(path, name="m") as store:
        with pytest.raises(StoreCorrupt, match="checksum") as info:
            await store.load()
    assert "'k'" in str(info.value) and str(path) in str(info.value)
    assert path.read_bytes() == damaged


async def test_another_maps_store_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.sqlite3"
    async with await MapStore.open(path, name="users") as store:
        await store.write(BEFORE)
    before = path.read_bytes()
    with pytest.raises(StoreError, match="belongs to map 'users', not 'orders'") as info:
        await MapStore.open(path, name="orders")
    assert type(info.value) is StoreError
    assert path.read_bytes() == before


async def test_an_unknown_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.sqlite3"
    async with await MapStore.open(path, name="m"):
        pass
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("UPDATE meta SET schema_version = ?", (SCHEMA_VERSION + 1,))
    conn.close()
    with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1}"):
        await MapStore.open(path, name="m")


async def test_a_foreign_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("CREATE TABLE things (x)")
    conn.close()
    with pytest.raises(StoreError, match="not a trio_replica map store") as info:
        await MapStore.open(path, name="m")
    assert type(info.value) is StoreError


async def test_one_store_per_file(tmp_path: Path) -> None:
    path = tmp_path / "m.sqlite3"
    async with await MapStore.open(path, name="m"):
        with pytest.raises(StoreError, match="in use"):
            await MapStore.open(path, name="m")
        intruder = sqlite3.connect(path, timeout=0)
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            intruder.execute("SELECT * FROM entries").fetchall()
        intruder.close()
    async with await MapStore.open(path, name="m"):
        pass


async def test_creation_is_whole_or_absent(tmp_path: Path) -> None:
    # What an interrupted creation leaves is replaced; it never held acknowledged data.
    (tmp_path / ".m.sqlite3.creating").write_bytes(b"half-built")
    (tmp_path / ".m.sqlite3.creating-wal").write_bytes(b"its log")
    async with await MapStore.open(tmp_path / "m.sqlite3", name="m") as store:
        assert await store.load() == []
    assert sorted(os.listdir(tmp_path)) == ["m.sqlite3", "m.sqlite3.commits"]
    with pytest.raises(StoreError, match="creating failed"):
        await MapStore.open(tmp_path / "missing-dir" / "m.sqlite3", name="m")
    with pytest.raises(StoreError, match="not a regular file"):
        await MapStore.open(tmp_path, name="m")


# --- concurrency, cancellation, closing --------------------------------------------------------


async def test_concurrent_writes_are_serialized_and_all_land(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    in_flight = 0
    most = 0
    lock = threading.Lock()
    original = MapStore._transaction

    def counting(self: MapStore, *args: Any) -> None:
        nonlocal in_flight, most
        with lock:
            in_flight += 1
            most = max(most, in_flight)
        try:
            original(self, *args)
        finally:
            with lock:
                in_flight -= 1

    monkeypatch.setattr(MapStore, "_transaction", counting)
    async with await MapStore.open(tmp_path / "m.sqlite3", name="m") as store:

        async def writer(w: int) -> None:
            for i in range(5):
                await store.write([(f"w{w}-{i}-{j}", v([w, i, j], i + 1)) for j in range(10)])

        async with trio.open_nursery() as nursery:
            for w in range(8):
                nursery.start_soon(writer, w)
        loaded = await store.load()
    assert len(loaded) == 8 * 5 * 10
    assert (store.writes, store.entries_written) == (40, 400)
    assert most == 1


class _Gate:
    """Holds `MapStore._write_sync` in its worker thread until released."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.started = trio.Event()
        self.release = threading.Event()
        original = MapStore._write_sync

        def gated(store: MapStore, entries: Any, signatures: Any) -> int:
            trio.from_thread.run_sync(self.started.set)
            self.release.wait()
            return original(store, entries, signatures)

        monkeypatch.setattr(MapStore, "_write_sync", gated)


async def test_a_write_cancelled_mid_thread_completes_and_then_sees_cancelled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = _Gate(monkeypatch)
    async with await MapStore.open(tmp_path / "m.sqlite3", name="m") as store:
        returned = trio.Event()
        scope = trio.CancelScope()

        async def writer() -> None:
            with scope:
                await store.write(BEFORE)
                returned.set()
                await trio.lowlevel.checkpoint()
                pytest.fail("the cancellation was not delivered at the next checkpoint")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            await gate.started.wait()
            scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert not returned.is_set(), "the write was abandoned mid-thread"
            gate.release.set()
        assert returned.is_set() and scope.cancelled_caught
        assert as_dict(await store.load()) == as_dict(BEFORE)


async def test_a_write_cancelled_while_waiting_its_turn_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = _Gate(monkeypatch)
    async with await MapStore.open(tmp_path / "m.sqlite3", name="m") as store:
        scope = trio.CancelScope()
        outcome: list[str] = []

        async def second() -> None:
            with scope:
                await store.write([("second", v(2))])
                outcome.append("returned")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.write, BEFORE)
            await gate.started.wait()
            nursery.start_soon(second)
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert scope.cancelled_caught and outcome == []
            gate.release.set()
        assert as_dict(await store.load()) == as_dict(BEFORE)
        assert store.writes == 1


async def test_close_is_idempotent_waits_for_a_running_write_and_ends_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = _Gate(monkeypatch)
    path = tmp_path / "m.sqlite3"
    store = await MapStore.open(path, name="m")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.write, BEFORE)
        await gate.started.wait()
        nursery.start_soon(store.aclose)
        nursery.start_soon(store.aclose)
        await trio.testing.wait_all_tasks_blocked()
        gate.release.set()
    await store.aclose()
    for call in (store.load(), store.write(BEFORE), store.delete(["a"])):
        with pytest.raises(trio.ClosedResourceError):
            await call
    async with await MapStore.open(path, name="m") as again:
        assert as_dict(await again.load()) == as_dict(BEFORE)


# --- property ------------------------------------------------------------------------------

keys: st.SearchStrategy[Key] = st.one_of(
    st.sampled_from(["k", "1", b"1", 1, 0, -1, b"", ""]),
    st.text(max_size=4),
    st.binary(max_size=4),
    st.integers(-(2**64), 2**64 - 1),
)
values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64 - 1)
    | st.floats()
    | st.text()
    | st.binary(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=6,
)
dots = st.builds(
    Dot, st.sampled_from(["a", "b"]), st.builds(Timestamp, st.integers(0, 2**48 - 1), st.just(0))
)
entries = st.one_of(st.builds(Value, values, dots), st.builds(Tombstone, dots))
batches = st.lists(st.lists(st.tuples(keys, entries), max_size=6), max_size=5)


def _canonical(entries: list[tuple[Key, Entry]]) -> dict[bytes, bytes]:
    # NaN != NaN, so compare entries by their encoding.
    return {
        cbor2.dumps(k, canonical=True): cbor2.dumps(
            [
                e.value if isinstance(e, Value) else None,
                isinstance(e, Value),
                e.dot.node,
                e.dot.ts.wall,
            ],
            canonical=True,
        )
        for k, e in entries
    }


@settings(max_examples=40, deadline=None)
@given(batches, st.data())
def test_load_gives_the_last_write_of_every_key(
    batches: list[list[tuple[Key, Entry]]], data: st.DataObject
) -> None:
    deleted = data.draw(st.lists(keys, max_size=3))
    expected: dict[bytes, tuple[Key, Entry]] = {}
    for batch in batches:
        for key, entry in batch:
            expected[cbor2.dumps(key, canonical=True)] = (key, entry)
    for key in deleted:
        expected.pop(cbor2.dumps(key, canonical=True), None)

    async def scenario(path: Path) -> list[tuple[Key, Entry]]:
        async with await MapStore.open(path, name="m") as store:
            for batch in batches:
                await store.write(batch)
            await store.delete(deleted)
        async with await MapStore.open(path, name="m") as store:
            return await store.load()

    with tempfile.TemporaryDirectory() as directory:
        loaded = trio.run(scenario, Path(directory) / "m.sqlite3")
    assert _canonical(loaded) == _canonical(list(expected.values()))


def _flip_a_byte_midway(path: Path) -> int:
    """Damage `path` in its middle; return its size."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return len(data)


def _crash_copy(path: Path, into: Path) -> Path:
    """The store's files as a crash would leave them (the log not folded into the file)."""
    into.mkdir()
    for suffix in ("", "-wal", ".commits"):
        source = Path(f"{path}{suffix}")
        if source.exists():
            Path(f"{into / path.name}{suffix}").write_bytes(source.read_bytes())
    return into / path.name


async def test_a_damaged_log_is_reported_as_lost_commits_until_cleared(tmp_path: Path) -> None:
    # Issue 17: one byte flipped in the log after kill -9 lost acknowledged puts silently.
    path = tmp_path / "m.db"
    store = await MapStore.open(path, name="m")
    for i in range(300):
        await store.write([(f"k{i}", v(i, wall=i + 1))])
    crashed = _crash_copy(path, tmp_path / "crash")
    await store.aclose()
    assert _flip_a_byte_midway(Path(f"{crashed}-wal")) > 4096, "needs writes still in the log"
    reopened = await MapStore.open(crashed, name="m")
    try:
        kept = len(await reopened.load())
        assert kept < 300
        # At least one transaction per lost put (each put was its own transaction).
        assert reopened.lost_commits >= 300 - kept
    finally:
        await reopened.aclose()
    # The loss is remembered across restarts until the owner has pulled the writes back.
    again = await MapStore.open(crashed, name="m")
    try:
        assert again.lost_commits >= 300 - kept
        await again.clear_lost()
        assert again.lost_commits == 0
    finally:
        await again.aclose()
    clean = await MapStore.open(crashed, name="m")
    assert clean.lost_commits == 0
    await clean.aclose()


async def test_an_intact_store_reports_no_loss_across_crashes(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    store = await MapStore.open(path, name="m")
    for i in range(50):
        await store.write([(f"k{i}", v(i, wall=i + 1))])
    crashed = _crash_copy(path, tmp_path / "crash")
    await store.aclose()
    for where in (path, crashed):
        reopened = await MapStore.open(where, name="m")
        assert reopened.lost_commits == 0 and len(await reopened.load()) == 50
        await reopened.aclose()


async def test_a_store_made_anew_does_not_inherit_an_old_count(tmp_path: Path) -> None:
    # The store was moved away (say, after StoreCorrupt): the new one lost nothing.
    path = tmp_path / "m.sqlite3"
    async with await MapStore.open(path, name="m") as store:
        await store.write([("k", v(1))])
    path.rename(tmp_path / "moved.sqlite3")
    async with await MapStore.open(path, name="m") as store:
        assert store.lost_commits == 0 and await store.load() == []


async def test_a_store_copied_over_another_is_not_reported_as_a_loss(tmp_path: Path) -> None:
    # A restore over the top: the side file left there counted another store's commits.
    first, second = tmp_path / "m.sqlite3", tmp_path / "other" / "m.sqlite3"
    second.parent.mkdir()
    async with await MapStore.open(first, name="m") as store:
        for i in range(5):
            await store.write([(f"k{i}", v(i))])
    async with await MapStore.open(second, name="m") as store:
        await store.write([("x", v(1))])
    first.write_bytes(second.read_bytes())
    async with await MapStore.open(first, name="m") as store:
        assert store.lost_commits == 0 and [k for k, _ in await store.load()] == ["x"]
