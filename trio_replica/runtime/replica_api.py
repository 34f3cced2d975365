"""What the owner of a replica instance implements and sees.

An *instance* is a named piece of replicated state whose owner (a `ReplicatedMap`, or any
store with its own merge rules) implements `ReplicaCallbacks`. The driver
(`trio_replica.runtime.replica`) moves the state between nodes; the owner decides what it
means. Every callback receives the instance name first, so one owner object can back many
instances. This module owns that contract: the callbacks, the updates an owner writes
through (`Add`, `Remove`), the driver's counters it can read (`ReplicaStats`) and the tag
prefix of instance broadcasts.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Protocol, runtime_checkable

import attrs

#: Broadcast tags of replica instances start with this; applications should not use it.
TAG_PREFIX = "replica/"


@runtime_checkable
class ReplicaCallbacks(Protocol):
    """What the owner of a replica instance implements (the seed's behaviour callbacks).

    All callbacks are awaited by the instance's driver task, one at a time. Deltas and
    snapshots come straight off the network: the owner must validate them (the
    `ReplicatedMap` does so with `ormap_wire.ingest`). A callback that raises is logged
    and counted in the driver's `callback_errors`; the driver keeps running.

    Optional members: ``async def merge_custom(name, payload)`` for `broadcast_custom`
    payloads; ``async def merge_local(name, delta)``, used instead of `merge_delta` for
    this node's own writes (`broadcast_update`), for an owner that counts them apart; a
    boolean attribute ``anti_entropy`` that turns periodic anti-entropy on (for
    value-carrying stores with a full-state snapshot and tombstones);
    ``full_sync_stream(name)``, an async generator of lists of items, used instead of
    `full_sync_snapshot` when present: it walks the state as the sync streams (a batch is
    built when the link has room for the one before), so a large state is never copied
    whole; state that changes meanwhile travels as deltas anyway.

    Digest anti-entropy (`trio_replica.runtime.digestsync`), when the owner has both
    ``digest_source(name)`` (a `core.antientropy.DigestSource`) and
    ``range_stream(name, level, index)`` (an async generator of item batches): the state
    is compared with peers by range digests and only differing ranges move; full-state
    sync is then not used. With it, ``async def before_sync(name)`` runs before every
    comparison (the map drops stale entries there) and ``async def sync_completed(name,
    started_ms)`` after each comparison this node opened completes.
    """

    async def merge_delta(self, name: str, delta: Any) -> None:
        """Merge a delta (OR-Map wire entries) into the owner's state and run side effects."""

    async def apply_full_sync(self, name: str, snapshot: list[Any]) -> None:
        """Apply one chunk of a peer's full snapshot (never implies removal of other keys)."""

    async def full_sync_snapshot(self, name: str) -> list[Any] | None:
        """The owner's whole state as a new list of items, or None when there is nothing to
        send. The replica owns the list: it empties it once the snapshot has been sent."""

    async def remove_node(self, name: str, node: str) -> None:
        """Drop what `node` owned: it failed or left the cluster."""


@attrs.frozen
class Add:
    """Set `key` to `value` (one dot per write)."""

    key: Any
    value: Any


@attrs.frozen
class Remove:
    """Remove `key` (a tombstone with its own dot)."""

    key: Any


@attrs.define
class ReplicaStats:
    """What the driver moved; the bookkeeping's counters are the core's
    (`Replica.core.stats`, `core.digest_stats`)."""

    #: Deltas broadcast (each a batch of writes), and the writes they carried.
    deltas_sent: int = 0
    updates_sent: int = 0
    #: Writes merged here but not broadcast because the node closed first (anti-entropy
    #: carries them once it is back).
    updates_unsent: int = 0
    deltas_received: int = 0
    customs_sent: int = 0
    customs_received: int = 0
    sync_requests_received: int = 0
    syncs_sent: int = 0
    chunks_sent: int = 0
    chunks_received: int = 0
    #: Sync requests folded into a sync already running or waiting for the same peer.
    syncs_coalesced: int = 0
    #: Full syncs put off because the peer had one within `full_sync_again_after`.
    syncs_deferred: int = 0
    #: Full syncs cut short because the peer's link closed.
    syncs_aborted: int = 0
    callback_errors: int = 0
    #: Callbacks cancelled for taking longer than `callback_timeout` (the driver restarted).
    callbacks_hung: int = 0
    #: Digest answers not sent because the owner's `before_sync` had failed.
    serves_withheld: int = 0
    rejected: Counter[str] = attrs.Factory(Counter)
