"""What a replicated map (`trio_replica.stores.maps`) knows of its syncs with peers.

`SyncState` owns the sync mark (when the last comparison the replica completed began, saved
in its store at most once a minute), the recovery of the writes the store lost (the map is
not `synced` until a peer brought them back or the operator accepted their loss), and the
choice, before a sync, of the entries a replica out of touch for too long must drop.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

import attrs
import trio

from ..core.ormap import Entry, Key, Value
from .store import StoreError

if TYPE_CHECKING:
    from ..core.hlc import HybridClock
    from .store import MapStore

log = logging.getLogger("trio_replica.maps")


class SyncCounts(Protocol):
    """The map's counters (`maps.MapStats`) that this bookkeeping adds to."""

    store_errors: int
    lost_commits: int


@attrs.frozen
class StaleEntries:
    """The entries dropped before a sync (`keys`, of which `values` held values), chosen
    because the replica had been out of touch since `mark` for longer than the TTL."""

    mark: int
    keys: list[Key]
    values: list[Key]


class SyncState:
    """A map's sync mark, recovery state and out-of-touch check."""

    def __init__(self, name: str, store: MapStore | None, stats: SyncCounts) -> None:
        self.name = name
        self._store = store
        self._stats = stats
        #: Wall-clock ms at which the last comparison this replica completed began: every
        #: entry older than that was known to a peer then (`drop_stale`). None: never.
        self.last_synced_ms: int | None = None
        #: True while the writes the store lost are being pulled back from peers: the map
        #: is not `synced` and the node not ready until a comparison with a peer completes.
        self.recovering = False
        self._mark_saved_ms: int | None = None
        self._dropped_at_mark: int | None = None
        #: Set once this replica completed a comparison with a peer (since it opened).
        self.synced = trio.Event()

    async def load(self) -> None:
        """Read the saved sync mark, and whether the store lost acknowledged writes."""
        store = self._store
        if store is None:
            return
        self.last_synced_ms = self._mark_saved_ms = await store.sync_mark()
        if store.lost_commits:
            self.recovering = True
            self._stats.lost_commits = store.lost_commits
            log.error(
                "map %s: its store %s recovered %d transactions fewer than it had "
                "acknowledged (its write-ahead log was damaged or cut short): those writes "
                "are gone from this node; pulling them back from peers before the map "
                "reports itself synced",
                self.name,
                store.path,
                store.lost_commits,
            )

    async def accept_loss(self) -> None:
        """End `recovering` without a peer: the operator knows no peer holds the writes the
        store lost (a node alone, or its peers lost them too), and accepts the loss."""
        if not self.recovering:
            return
        if self._store is not None:
            await self._store.clear_lost()
        self.recovering = False
        log.warning("map %s: the writes its store lost are given up (accept_loss)", self.name)
        self.synced.set()

    async def drop_stale(
        self,
        entries: Iterable[tuple[Key, Entry]],
        clock: HybridClock,
        me: str,
        tombstone_ttl: float,
    ) -> StaleEntries | None:
        """The entries among `entries` to drop before this sync, already off the disk; None
        if the replica was not out of touch for longer than the TTL (or dropped already)."""
        # No resurrection (README "Deletes stay deleted"). Peers forget a tombstone
        # `tombstone_ttl` after the delete. A replica out of touch for longer may hold
        # values whose delete the cluster no longer remembers; sending them would bring
        # the keys back everywhere. Such a value is older than the horizon (a delete is
        # newer than what it deletes) and was known to a peer at our last sync (older than
        # that mark). Those entries are dropped here, before the first exchange: the
        # comparison then brings back the ones that still live elsewhere, and the deleted
        # ones stay deleted. Our writes since the last sync may be ours alone: kept.
        now_ms = clock.read_physical()
        ttl_ms = round(tombstone_ttl * 1000)
        mark = self.last_synced_ms
        if mark is None or now_ms - mark <= ttl_ms or mark == self._dropped_at_mark:
            return None
        # A peer whose clock runs ahead (within the skew bound) collects a little sooner.
        # Our own writes since the mark may be ours alone: kept. Another node's entries
        # came from a peer, whatever the mark says (it is saved at most once a minute, so
        # it can predate what arrived since): the horizon alone decides for them.
        horizon = now_ms - ttl_ms + clock.max_offset_ms
        own_horizon = min(horizon, mark)
        stale: list[Key] = []
        dropped_values: list[Key] = []
        for key, entry in entries:
            dot = entry.dot
            if dot.ts.wall < (own_horizon if dot.node == me else horizon):
                stale.append(key)
                if isinstance(entry, Value):
                    dropped_values.append(key)
        log.warning(
            "map %s: out of touch for %.0f s (tombstones live %.0f s): dropping %d entries "
            "older than that before syncing, so that no forgotten delete is undone",
            self.name,
            (now_ms - mark) / 1000,
            tombstone_ttl,
            len(stale),
        )
        if stale and self._store is not None:
            # Off the disk first: a crash in between leaves them in memory only, and the
            # next start drops them again (the mark has not moved).
            try:
                await self._store.delete(stale)
            except StoreError:
                # Nothing dropped. Syncing now could bring deleted keys back, so this
                # sync does not happen (the error reaches the driver, which counts it);
                # the next one tries again.
                self._stats.store_errors += 1
                raise
        return StaleEntries(mark, stale, dropped_values)

    def dropped(self, stale: StaleEntries) -> None:
        """The map dropped `stale` from memory too."""
        # Once per time out of touch (the sync that follows sets a new mark): entries that
        # come back meanwhile, and ours written since the mark, must not be dropped again.
        self._dropped_at_mark = stale.mark

    async def completed(self, started_ms: int) -> None:
        """A comparison with a peer begun at `started_ms` completed."""
        # Every entry older than `started_ms` is known to that peer. Saved at most once a
        # minute (precision that matters is the tombstone TTL, days), and never moved back.
        if self.recovering and self._store is not None:
            # Everything that peer holds is here now, what the store lost with it (as far
            # as any peer still has it).
            try:
                await self._store.clear_lost()
            except StoreError:
                self._stats.store_errors += 1
                log.exception("map %s: could not record the recovery; next sync", self.name)
                return
            self.recovering = False
            log.warning(
                "map %s: a sync with a peer brought back what its store lost; complete again",
                self.name,
            )
        self.synced.set()
        if self.last_synced_ms is not None and started_ms <= self.last_synced_ms:
            return
        self.last_synced_ms = started_ms
        if self._store is not None and (
            self._mark_saved_ms is None or started_ms - self._mark_saved_ms >= 60_000
        ):
            try:
                await self._store.set_sync_mark(started_ms)
            except StoreError:
                self._stats.store_errors += 1
                log.exception("map %s: could not save the sync mark; next sync", self.name)
            else:
                self._mark_saved_ms = started_ms
