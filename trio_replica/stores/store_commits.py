"""The commit count kept beside a store: ``<store>.commits``, rewritten after every commit.

It lets a store notice, when it opens, that SQLite recovered fewer transactions than it
acknowledged (the durability contract in `trio_replica.stores.store`). The file holds the
count, the store's id and a CRC-32 of both; it is written without fsync.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

#: Beside the store: the commit count as last committed (module doc), with a CRC-32.
COMMITS_SUFFIX = ".commits"
COMMITS_FORMAT = struct.Struct(">Q16sI")


def commits_path(path: Path) -> Path:
    return path.with_name(path.name + COMMITS_SUFFIX)


def read_commits_file(path: Path) -> tuple[int, bytes] | None:
    """The count and store id in the side file, or None if there is none or it is damaged.

    Raises `OSError` if the file is there but cannot be read (the store reports it).
    """
    try:
        data = commits_path(path).read_bytes()
    except FileNotFoundError:
        return None
    if len(data) != COMMITS_FORMAT.size:
        return None
    seq, store_id, crc = COMMITS_FORMAT.unpack(data)
    return (seq, store_id) if zlib.crc32(data[:24]) == crc else None


def write_commits_file(fd: int, seq: int, store_id: bytes) -> None:
    head = seq.to_bytes(8, "big") + store_id
    os.pwrite(fd, COMMITS_FORMAT.pack(seq, store_id, zlib.crc32(head)), 0)
