"""The on-disk state of one replicated map: one SQLite file, written durably.

This module owns `MapStore` (the file and the one connection to it) and the store's
errors; the table layout and the building of a new file are in `store_schema`, the commit
count kept beside the file in `store_commits`. The map (`trio_replica.stores.maps`)
decides what to write and when; the store only makes it durable and reads it back. SQLite
comes from the standard library and runs in a worker thread, so the Trio loop never blocks
on the disk.

Durability contract (SPEC section 10, "fsynced acknowledgements"):

* `write` and `delete` apply their whole batch in one transaction, all or nothing, and
  return only after the commit reached the disk: WAL journal with ``synchronous=FULL``
  syncs the log on every commit (and ``fullfsync`` asks macOS for a real flush). The map
  acknowledges a put only after `write` returned, so an acknowledged put survives a crash
  or power loss; a batch that raised left the store exactly as it was.
* Cancellation never splits that answer. A call cancelled while it waits for its turn
  raises `trio.Cancelled` and did nothing. Once its thread runs, a call is not
  cancellable (``trio.to_thread.run_sync`` with ``abandon_on_cancel=False``): it finishes,
  returns or raises its own error, and the pending cancellation is delivered at the
  caller's next checkpoint. So `write` returning means durable, and `write` raising
  `Cancelled` means nothing of the batch was written.
* A store is never emptied or recreated behind its owner's back. A new store is built
  under a temporary name and linked into place only once complete, so a file at the
  store's path is always a whole store or damage. `open` runs ``PRAGMA quick_check``;
  anything wrong (not a database, truncated, malformed pages, a row that does not decode)
  raises `StoreCorrupt` naming the file and the fault, and leaves the file untouched for
  its owner to inspect, restore or move away.
* A store knows when it recovered less than it acknowledged. Every transaction counts
  itself in the ``commits`` row, inside the transaction, and once committed the count is
  written to a small file beside the store (``<store>.commits``, no fsync: it costs a
  write per commit, not a second flush). SQLite replays its write-ahead log only up to
  the first frame whose checksum fails and quietly drops the rest; a store whose log was
  damaged (issue 17: one byte flipped after ``kill -9`` lost 293 of 618 acknowledged
  puts without a word) then opens with a count below the file's. `open` records the
  shortfall durably (`lost_commits`) until the owner has pulled the lost writes back
  from peers (`clear_lost`). A power loss can leave the side file behind the store (it
  is not flushed): then a loss may go unseen, never a loss reported that did not happen.
* One store per file: the connection holds an exclusive lock for its whole life, so a
  second node (or process) opening the same file gets a `StoreError` instead of silently
  interleaving its writes (two in-memory maps over one table would lose updates).

Row format: the primary key is the canonical CBOR encoding of the map key, so ``"1"``,
``1`` and ``b"1"`` are three rows; the entry is its OR-Map wire form
(`ormap_wire.to_wire`, key included) encoded with `wire.encode_payload`; a CRC-32 of both
catches bit rot that SQLite's structural check cannot see (a flipped byte inside a value
would otherwise load, and then replicate, as a different value). Reading back goes through
the checksum, the strict decoder and `ormap_wire.from_wire`, and `write` refuses what
`load` would refuse, so a store never holds a row its next `load` rejects.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import attrs
import cbor2
import trio

from ..core.ormap import Entry, Key
from ..core.ormap_wire import DEFAULT_LIMITS, Limits, from_wire, from_wire_signed, to_wire
from ..core.strict_cbor import strict_loads
from ..core.wire import decode_payload, encode_payload
from ..errors import MessageTooLarge, ReplicaError, WireError
from .store_commits import commits_path, read_commits_file, write_commits_file
from .store_schema import COMMITS_TABLE, NEW_COMMITS, SCHEMA_VERSION, SYNC_MARK_TABLE, create

log = logging.getLogger("trio_replica.store")

_T = TypeVar("_T")


class StoreError(ReplicaError):
    """The store cannot be used: not a store of this map, in use elsewhere, closed on the
    disk's side, an entry that cannot be stored, or a failed write (nothing of it stored)."""


class StoreCorrupt(StoreError):
    """The store's file is damaged (not a database, truncated, malformed pages or rows).

    The file is left exactly as found: nothing is emptied, repaired or recreated.
    """


def _key_blob(key: Key) -> bytes:
    """The primary key of `key`: its canonical CBOR, distinct for str, bytes and int."""
    if type(key) is not str and type(key) is not bytes and type(key) is not int:
        raise StoreError(f"keys must be str, bytes or int, not {type(key).__name__}")
    return bytes(cbor2.dumps(key, canonical=True))


def _crc(key_blob: bytes, entry_blob: bytes) -> int:
    return zlib.crc32(entry_blob, zlib.crc32(key_blob))


def _entry_bound(limits: Limits) -> int:
    """Largest encoded entry: key and value at their limits, a 4-byte-per-character node
    id, the array, kind and HLC headers (under 64 bytes together), and a writer's signature
    with its header (66 bytes)."""
    return limits.max_value_bytes + limits.max_key_bytes + 4 * limits.max_node_id + 64 + 66


def _corrupt(path: Path, detail: str) -> StoreCorrupt:
    return StoreCorrupt(f"store {path} is corrupt: {detail}; the file was left as is")


def _describe_failure(path: Path, doing: str, exc: sqlite3.Error) -> StoreError:
    """Map an sqlite3 error to ours: damage is `StoreCorrupt`, the rest `StoreError`."""
    code = getattr(exc, "sqlite_errorname", "")
    if code.startswith("SQLITE_CORRUPT") or code == "SQLITE_NOTADB":
        return _corrupt(path, f"{exc} ({doing})")
    if code.startswith("SQLITE_BUSY"):
        return StoreError(f"store {path} is in use by another connection or process")
    return StoreError(f"store {path}: {doing} failed: {exc} ({code or type(exc).__name__})")


def _connect(path: Path, name: str) -> sqlite3.Connection:
    """Open, check and lock an existing store; raise `StoreError`/`StoreCorrupt`."""
    if not path.is_file():
        raise StoreError(f"store {path} is not a regular file")
    # mode=rw: never let SQLite create an empty file in place of one that vanished.
    uri = path.absolute().as_uri() + "?mode=rw"
    try:
        conn = sqlite3.connect(
            uri, uri=True, timeout=0, isolation_level=None, check_same_thread=False
        )
    except sqlite3.Error as exc:
        raise _describe_failure(path, "opening", exc) from exc
    try:
        # Before the first read, so that WAL runs without shared memory and the lock
        # taken below is held until close (module doc: one store per file).
        conn.execute("PRAGMA locking_mode=EXCLUSIVE")
        problems = [row[0] for row in conn.execute("PRAGMA quick_check(10)")]
        if problems != ["ok"]:
            raise _corrupt(path, f"quick_check found {'; '.join(map(str, problems))}")
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        if not tables:
            # A store always holds its schema (it is created whole): this was emptied.
            raise _corrupt(path, "it holds no tables (emptied or truncated)")
        if not {"meta", "entries"} <= tables:
            raise StoreError(f"{path} is an SQLite database but not a trio_replica map store")
        meta = conn.execute("SELECT schema_version, map_name FROM meta").fetchall()
        if len(meta) != 1:
            raise _corrupt(path, f"it has {len(meta)} meta rows instead of 1")
        version, stored_name = meta[0]
        if version != SCHEMA_VERSION:
            raise StoreError(
                f"store {path} has schema version {version!r}; this version reads "
                f"{SCHEMA_VERSION} only"
            )
        if stored_name != name:
            raise StoreError(f"store {path} belongs to map {stored_name!r}, not {name!r}")
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise StoreError(f"store {path} cannot use write-ahead logging (mode {mode!r})")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA fullfsync=ON")
        # Take the exclusive lock now, not at the first write.
        conn.execute("BEGIN IMMEDIATE")
        if "sync_mark" not in tables:
            conn.execute(SYNC_MARK_TABLE)
        if "commits" not in tables:
            conn.execute(COMMITS_TABLE)
            conn.execute(NEW_COMMITS)
        elif "store_id" not in {row[1] for row in conn.execute("PRAGMA table_info(commits)")}:
            # A commit row from before stores had ids (never in a release): give it one.
            conn.execute("ALTER TABLE commits ADD COLUMN store_id BLOB NOT NULL DEFAULT x''")
            conn.execute("UPDATE commits SET store_id = randomblob(16) WHERE id = 0")
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        conn.close()
        raise _describe_failure(path, "opening", exc) from exc
    except BaseException:
        conn.close()
        raise
    return conn


@attrs.define(eq=False)
class MapStore(trio.abc.AsyncResource):
    """The persisted entries (values and tombstones) of one map; open with `MapStore.open`.

    Every call runs in a worker thread, one at a time per store (a `CapacityLimiter` of 1
    over one connection), in call order as the limiter grants it. The owner closes it
    with `aclose` (or ``async with``); calls after that raise `trio.ClosedResourceError`.
    """

    _path: Path
    _name: str
    _limits: Limits
    _conn: sqlite3.Connection | None
    _limiter: trio.CapacityLimiter = attrs.field(factory=lambda: trio.CapacityLimiter(1))
    #: The side file's descriptor and the count of committed transactions (module doc).
    _commits_fd: int = -1
    _seq: int = 0
    _store_id: bytes = b""
    #: Transactions this store acknowledged once and did not recover (module doc); stays
    #: until `clear_lost`, across restarts.
    lost_commits: int = 0
    _closing: bool = False
    _closed: trio.Event = attrs.field(factory=trio.Event)
    #: Committed `write` calls, the entries they stored, and their encoded bytes.
    writes: int = 0
    entries_written: int = 0
    bytes_written: int = 0
    #: Keys removed by committed `delete` calls (present or not).
    entries_deleted: int = 0

    @classmethod
    async def open(cls, path: Path, *, name: str, limits: Limits = DEFAULT_LIMITS) -> MapStore:
        """Open the store of map `name` at `path`, creating it if no file is there.

        Raises `StoreCorrupt` for a damaged file and `StoreError` for a file that is not
        this map's store (another map's name, an unknown schema version, a foreign
        database) or that another connection holds. `limits` must be the map's: `write`
        refuses, and `load` reports as corrupt, entries beyond them.

        Cancelled before its thread starts, it raises `Cancelled` and did nothing; once the
        thread runs it completes and returns the open store, which the caller then owns
        (and closes) even if the cancellation arrives at its next checkpoint.
        """
        path = Path(path)
        limiter = trio.CapacityLimiter(1)

        def open_sync() -> sqlite3.Connection:
            try:
                if not path.exists():
                    # A count left by a store that is gone (deleted, moved away) is not
                    # this new store's: it would read as writes lost.
                    commits_path(path).unlink(missing_ok=True)
                    create(path, name)
            except sqlite3.Error as exc:
                raise _describe_failure(path, "creating", exc) from exc
            except OSError as exc:
                raise StoreError(f"store {path}: creating failed: {exc}") from exc
            return _connect(path, name)

        conn = await trio.to_thread.run_sync(open_sync, limiter=limiter)
        store = cls(path, name, limits, conn, limiter)
        try:
            await trio.to_thread.run_sync(store._check_commits_sync, limiter=limiter)
        except BaseException:
            with trio.CancelScope(shield=True):
                await store.aclose()
            raise
        return store

    @property
    def path(self) -> Path:
        return self._path

    @property
    def name(self) -> str:
        return self._name

    async def load(self, signatures: dict[Key, bytes] | None = None) -> list[tuple[Key, Entry]]:
        """Every stored entry, tombstones included, decoded strictly.

        A row that does not decode, or whose entry is for another key than its primary
        key, raises `StoreCorrupt` naming that row; nothing is skipped. The writers'
        signatures stored with entries are put in `signatures` when it is given.
        """
        return await self._run(lambda: self._load_sync(signatures))

    async def write(
        self,
        entries: Sequence[tuple[Key, Entry]],
        signatures: Mapping[Key, bytes] | None = None,
    ) -> None:
        """Store `entries` (insert or replace by key) in one transaction; durable on return.

        An entry whose key has a writer signature in `signatures` is stored with it.

        Raises `StoreError` if an entry cannot be stored (not plain data, beyond the
        limits) or the write fails; in both cases nothing of the batch was stored.
        Tuples inside values come back as lists, as they do over the wire.
        """
        size = await self._run(lambda: self._write_sync(entries, signatures))
        self.writes += 1
        self.entries_written += len(entries)
        self.bytes_written += size

    async def delete(self, keys: Sequence[Key]) -> None:
        """Remove the entries of `keys` (absent ones are ignored), in one transaction."""
        rows = [(_key_blob(key),) for key in keys]
        await self._run(
            lambda: self._transaction("deleting", "DELETE FROM entries WHERE key = ?", rows)
        )
        self.entries_deleted += len(rows)

    async def sync_mark(self) -> int | None:
        """The wall-clock time (ms) saved by `set_sync_mark`, or None if never saved."""

        def read() -> int | None:
            try:
                row = self._live().execute("SELECT last_synced_ms FROM sync_mark").fetchone()
            except sqlite3.Error as exc:
                raise _describe_failure(self._path, "loading", exc) from exc
            if row is None:
                return None
            if type(row[0]) is not int:
                raise _corrupt(self._path, f"its sync mark is {row[0]!r:.40}, not an integer")
            return int(row[0])

        return await self._run(read)

    async def set_sync_mark(self, ms: int) -> None:
        """Durably remember when this map last completed a sync with a peer (`maps`)."""
        await self._run(
            lambda: self._transaction(
                "writing", "INSERT OR REPLACE INTO sync_mark VALUES (0, ?)", [(int(ms),)]
            )
        )

    async def clear_lost(self) -> None:
        """The lost transactions have been pulled back from peers: forget the loss."""
        await self._run(
            lambda: self._transaction("writing", "UPDATE commits SET lost = 0 WHERE id = ?", [(0,)])
        )
        self.lost_commits = 0

    async def aclose(self) -> None:
        """Close the connection (after any call in progress); idempotent.

        Shielded from cancellation: a store is never left half-closed. The file stays
        complete on disk (SQLite folds its log into it on close).
        """
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        try:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._close_sync, limiter=self._limiter)
        finally:
            self._closed.set()

    # --- in the worker thread -------------------------------------------------------------

    async def _run(self, fn: Callable[[], _T]) -> _T:
        # One worker at a time (the limiter); see the module doc for cancellation.
        return await trio.to_thread.run_sync(fn, limiter=self._limiter)

    def _live(self) -> sqlite3.Connection:
        # Checked in the thread too: a call may have waited its turn behind `aclose`.
        if self._conn is None:
            raise trio.ClosedResourceError(f"store {self._path} is closed")
        return self._conn

    def _write_sync(
        self, entries: Sequence[tuple[Key, Entry]], signatures: Mapping[Key, bytes] | None
    ) -> int:
        """Check and encode every entry, then store them all; return the bytes stored."""
        self._live()
        rows = []
        bound = _entry_bound(self._limits)
        for index, item in enumerate(to_wire(entries, signatures)):
            try:
                # The checks `load` applies, so that no stored row is refused later.
                from_wire([item], limits=self._limits)
                blob = encode_payload(item, max_size=bound)
            except (WireError, TypeError, MessageTooLarge) as exc:
                raise StoreError(
                    f"store {self._path}: entry {index} (key {item[0]!r:.60}) cannot be "
                    f"stored: {exc}; nothing of the batch was written"
                ) from None
            key = _key_blob(item[0])
            rows.append((key, blob, _crc(key, blob)))
        self._transaction(
            "writing", "INSERT OR REPLACE INTO entries (key, entry, crc) VALUES (?, ?, ?)", rows
        )
        return sum(len(key) + len(blob) for key, blob, _ in rows)

    def _transaction(
        self, doing: str, statement: str, rows: Sequence[tuple[bytes | int, ...]]
    ) -> None:
        conn = self._live()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(statement, rows)
                conn.execute("UPDATE commits SET seq = seq + 1 WHERE id = 0")
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.rollback()
                raise
        except sqlite3.Error as exc:
            raise _describe_failure(self._path, doing, exc) from exc
        self._seq += 1
        try:
            write_commits_file(self._commits_fd, self._seq, self._store_id)
        except OSError as exc:
            # The commit stands; only the check at the next open is weaker for it.
            log.error("store %s: cannot record commit %d beside it: %s", self._path, self._seq, exc)

    def _check_commits_sync(self) -> None:
        """Compare the store's commit count with the side file's; record a shortfall."""
        conn = self._live()
        try:
            row = conn.execute("SELECT seq, lost, store_id FROM commits WHERE id = 0").fetchone()
        except sqlite3.Error as exc:
            raise _describe_failure(self._path, "opening", exc) from exc
        if (
            row is None
            or type(row[0]) is not int
            or type(row[1]) is not int
            or type(row[2]) is not bytes
            or len(row[2]) != 16
        ):
            raise _corrupt(self._path, f"its commit count is {row!r:.60}")
        self._seq, self.lost_commits, self._store_id = row
        try:
            acknowledged = read_commits_file(self._path)
        except OSError as exc:
            raise StoreError(f"store {self._path}: cannot read its commit count: {exc}") from exc
        try:
            self._commits_fd = os.open(commits_path(self._path), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StoreError(f"store {self._path}: cannot open its commit count: {exc}") from exc
        if acknowledged is not None and acknowledged[1] != self._store_id:
            log.warning(
                "store %s: the commit count beside it belongs to another store (this one was "
                "copied or restored over it): not compared",
                self._path,
            )
        elif acknowledged is not None and acknowledged[0] > self._seq:
            missing = acknowledged[0] - self._seq
            self._transaction(
                "opening", "UPDATE commits SET lost = lost + ? WHERE id = 0", [(missing,)]
            )
            self.lost_commits += missing
            return
        try:
            write_commits_file(self._commits_fd, self._seq, self._store_id)
        except OSError as exc:
            raise StoreError(f"store {self._path}: cannot write its commit count: {exc}") from exc

    def _load_sync(self, signatures: dict[Key, bytes] | None) -> list[tuple[Key, Entry]]:
        conn = self._live()
        try:
            rows = conn.execute("SELECT key, entry, crc FROM entries").fetchall()
        except sqlite3.Error as exc:
            raise _describe_failure(self._path, "loading", exc) from exc
        bound = _entry_bound(self._limits)
        out: list[tuple[Key, Entry]] = []
        for key_blob, blob, crc in rows:
            try:
                if type(key_blob) is not bytes or type(blob) is not bytes:
                    raise WireError("key and entry must be byte strings")
                if crc != _crc(key_blob, blob):
                    raise WireError("its checksum does not match")
                [(key, entry, signature)] = from_wire_signed(
                    [decode_payload(blob, max_size=bound)], limits=self._limits
                )
                if _key_blob(key) != key_blob:
                    raise WireError(f"it holds the entry of key {key!r:.60}")
            except WireError as exc:
                raise _corrupt(
                    self._path, f"the row with key {_show(key_blob)} does not decode ({exc})"
                ) from None
            out.append((key, entry))
            if signatures is not None and signature:
                signatures[key] = signature
        return out

    def _close_sync(self) -> None:
        conn, self._conn = self._conn, None
        if self._commits_fd >= 0:
            os.close(self._commits_fd)
            self._commits_fd = -1
        if conn is None:
            return
        try:
            conn.close()
        except sqlite3.Error as exc:
            raise _describe_failure(self._path, "closing", exc) from exc


def _show(key_blob: Any) -> str:
    """Name a row by its primary key, readable when it is a CBOR key, hex otherwise."""
    if type(key_blob) is not bytes:
        return f"of type {type(key_blob).__name__}"
    try:
        return f"{strict_loads(key_blob, max_depth=1)!r:.60} (CBOR {key_blob[:32].hex()})"
    except WireError:
        return f"CBOR {key_blob[:32].hex()}"


__all__ = ["MapStore", "StoreCorrupt", "StoreError"]
