"""The table layout of a map store, and the building of a new store file.

A new store is built whole under a temporary name and linked into place only once complete,
so that a file at a store's path is always a whole store or damage (the durability contract
in `trio_replica.stores.store`, which opens, checks and writes the file).
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

#: Version of the table layout below; a file with another version is refused.
SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE meta (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    schema_version INTEGER NOT NULL,
    map_name TEXT NOT NULL
);
CREATE TABLE entries (
    key BLOB PRIMARY KEY NOT NULL,
    entry BLOB NOT NULL,
    crc INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE sync_mark (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    last_synced_ms INTEGER NOT NULL
);
CREATE TABLE commits (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    seq INTEGER NOT NULL,
    lost INTEGER NOT NULL,
    store_id BLOB NOT NULL
);
"""
#: Added after schema version 1 shipped; created at open in a store that lacks it (an
#: extra table does not bother an older reader, so the version stays).
SYNC_MARK_TABLE = (
    SCHEMA[SCHEMA.index("CREATE TABLE sync_mark") : SCHEMA.index("CREATE TABLE commits")]
    .strip()
    .rstrip(";")
)
COMMITS_TABLE = SCHEMA[SCHEMA.index("CREATE TABLE commits") :].strip().rstrip(";")
#: A fresh store's commit row: a random id names the store, so that a side file written
#: for another store (a store copied or restored over this one) is not read as ours.
NEW_COMMITS = "INSERT INTO commits VALUES (0, 0, 0, randomblob(16))"


def fsync_directory(directory: Path) -> None:
    # A rename is durable only once its directory is; POSIX only (Windows cannot open
    # a directory, and its renames are journaled by NTFS).
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create(path: Path, name: str) -> None:
    """Build an empty store beside `path`, then link it into place (module doc).

    Raises `sqlite3.Error` or `OSError`; the opener turns them into the store's errors.
    """
    temp = path.with_name(f".{path.name}.creating")
    # Left by a creation that was interrupted: it never held an acknowledged write. Its
    # log goes too, or SQLite would replay it into the new file.
    for leftover in ("", "-wal", "-shm", "-journal"):
        Path(f"{temp}{leftover}").unlink(missing_ok=True)
    conn = sqlite3.connect(temp, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA fullfsync=ON")
        conn.execute("BEGIN IMMEDIATE")
        for statement in SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute("INSERT INTO meta VALUES (0, ?, ?)", (SCHEMA_VERSION, name))
        conn.execute(NEW_COMMITS)
        conn.execute("COMMIT")
    finally:
        # The last connection's close checkpoints the log into the file and syncs it.
        conn.close()
    try:
        # A link fails where a rename would replace a store another opener created (and
        # may be writing to) in the meantime.
        os.link(temp, path)
    except FileExistsError:
        pass  # that store is the one `store._connect` checks and locks
    except OSError:
        os.replace(temp, path)  # a filesystem without hard links
    finally:
        temp.unlink(missing_ok=True)
    fsync_directory(path.parent)
