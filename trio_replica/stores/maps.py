"""`ReplicatedMap`: a named last-writer-wins map replicated on every node that opens it.

The map is the owner of a replica instance (`trio_replica.runtime.replica`): it holds the OR-Map
(`trio_replica.core.ormap`), validates everything that comes from peers with
`ormap_wire.ingest` before merging, emits change events, collects tombstones, and, with
``persist=True``, keeps its state in SQLite (`trio_replica.stores.store`) so that a put is
acknowledged only once it is durable and a restarted node recovers its writes. What it knows
of its syncs with peers (sync mark, recovery of lost writes, out-of-touch check) is kept by
`trio_replica.stores.map_sync`.

Reads (`get`, `keys`, `items`, `len`, `in`) are local and never wait for the network.
Writes (`put`, `delete`) go through the replica's writer (`runtime.replica_writes`: one dot
each, merged here in groups, then broadcast in batches); they return once applied, durable
and queued for broadcast. Conflicts resolve by the greatest dot: HLC first, then node id;
a delete beats a value only if strictly newer.

A write's outcome (README "What an acknowledgement means"): returned, it is applied,
durable and queued; `StoreError`, it is neither applied (`_undo` takes back its entries,
and only them) nor sent; cancelled while it waits for room or for its group, it is not
written; once its group merges it completes whatever its caller's cancellation does, and
is queued for broadcast in the same step. The merge of a group has one wait, the store's,
shielded: neither a cancellation nor the driver's `callback_timeout` cuts it half way.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import trio

from ..core.events import Event
from ..core.ormap import Entry, Key, ORMap, Value
from ..core.ormap_wire import (
    DEFAULT_LIMITS,
    IngestResult,
    Limits,
    Validator,
    check_delta,
    check_local_entry,
    ingest,
    signed_entry_bytes,
)
from ..runtime.feeds import Fanout, Feed
from ..runtime.identity import verify
from ..runtime.replica import Replica
from ..runtime.replica_api import Add, Remove
from .map_sync import SyncState
from .store import StoreError

if TYPE_CHECKING:
    from ..core.hlc import HybridClock
    from ..runtime.config import NodeConfig
    from ..runtime.identity import TrustStore
    from ..runtime.stats import NodeStats
    from .store import MapStore

log = logging.getLogger("trio_replica.maps")

#: Default tombstone lifetime: a week, far longer than any partition we expect to heal from.
DEFAULT_TOMBSTONE_TTL = 7 * 24 * 3600.0
#: Entries merged, or put into a snapshot, between two checkpoints: each step holds the
#: event loop for a few milliseconds at most, whatever the size of the map or the chunk.
INGEST_SLICE = 512
SNAPSHOT_SLICE = 4096


@attrs.frozen
class Put(Event):
    """`key` now holds `value`; `origin` is the node that wrote it."""

    key: Key
    value: Any
    origin: str


@attrs.frozen
class Removed(Event):
    """`key` was removed; `origin` is the node that removed it."""

    key: Key
    origin: str


class ValidationError(ValueError):
    """A local put was refused by the map's validator."""


@attrs.define
class MapStats:
    puts: int = 0
    deletes: int = 0
    remote_changes: int = 0
    rejected: Counter[str] = attrs.Factory(Counter)
    tombstones_collected: int = 0
    subscriber_drops: int = 0
    store_errors: int = 0
    #: Entries dropped before a sync because this replica had been out of touch for longer
    #: than the tombstone TTL (`before_sync`), so that a forgotten delete stays deleted.
    stale_entries_dropped: int = 0
    #: Acknowledged transactions the store did not recover when the map opened (its log
    #: was damaged): the map pulls from a peer before it reports itself synced.
    lost_commits: int = 0


class MapRuntime(Protocol):
    """What a map uses of its node's runtime."""

    @property
    def id(self) -> str: ...
    @property
    def config(self) -> NodeConfig: ...
    @property
    def clock(self) -> HybridClock: ...
    @property
    def stats_counters(self) -> NodeStats: ...
    @property
    def trust(self) -> TrustStore: ...
    @property
    def public_key(self) -> bytes: ...


class ReplicatedMap:
    """A replicated map; obtain it with ``await node.open_map(name)``."""

    anti_entropy = True

    def __init__(
        self,
        node: MapRuntime,
        name: str,
        *,
        validator: Validator | None,
        tombstone_ttl: float,
        on_close: Callable[[str], Awaitable[None]],
        limits: Limits = DEFAULT_LIMITS,
        store: MapStore | None = None,
    ) -> None:
        self.node = node
        self._on_close = on_close
        self.name = name
        self._map = ORMap()
        self._validator = validator
        self.tombstone_ttl = tombstone_ttl
        self.limits = limits
        self._store = store
        self._subscribers = Fanout[Event]()
        self.stats = MapStats()
        self.replica: Replica
        self._sync = SyncState(name, store, self.stats)
        #: Set once this replica completed a comparison with a peer (since it opened).
        self.synced = self._sync.synced
        identity = node.config.identity
        #: Writer signatures of the stored entries, by key, kept when this node signs or
        #: requires them (README "Security"): they travel with the entries in every sync
        #: and are stored with them, so that a node can check who wrote what it receives.
        self._signed = identity.sign_broadcasts or identity.require_signatures
        self._require = identity.require_signatures
        self._sigs: dict[Key, bytes] = {}

    @property
    def recovering(self) -> bool:
        """True while the writes the store lost are being pulled back from peers: the map
        is not `synced` and the node not ready until a comparison with a peer completes."""
        return self._sync.recovering

    @property
    def last_synced_ms(self) -> int | None:
        """Wall-clock ms at which the last comparison this replica completed began: every
        entry older than that was known to a peer then (`before_sync`). None: never."""
        return self._sync.last_synced_ms

    # --- reads (local, never blocking) ----------------------------------------------------

    def get(self, key: Key, default: Any = None) -> Any:
        return self._map.get(key, default)

    def __getitem__(self, key: Key) -> Any:
        return self._map[key]

    def __contains__(self, key: object) -> bool:
        return key in self._map

    def __len__(self) -> int:
        return len(self._map)

    def keys(self) -> list[Key]:
        return list(self._map.keys())

    def key_slices(self, size: int) -> Iterator[list[Key]]:
        """Every key with a stored entry (live or deleted), in lists of at most `size`,
        taken as the walk reaches them (`ORMap.key_slices`): a dump can checkpoint between
        two slices."""
        return self._map.key_slices(size)

    def items(self) -> list[tuple[Key, Any]]:
        return list(self._map.items())

    def __iter__(self) -> Iterator[Key]:
        return iter(self.keys())

    @property
    def tombstones(self) -> int:
        return self._map.tombstones

    def entry(self, key: Key) -> Entry | None:
        """The stored entry of `key` (value or tombstone with its dot), for inspection."""
        return self._map.entry(key)

    # --- writes -----------------------------------------------------------------------------

    async def put(self, key: Key, value: Any) -> None:
        """Set `key` to `value` on every node. Durable on return when the map persists.

        Raises `ValidationError` if the validator refuses (or re-raises what it raised),
        `TypeError` for a key or value that is not plain data, `MessageTooLarge` beyond the
        limits, `NodeClosed` after the map or node closed, `StoreError` if the store
        refused it (nothing applied, nothing sent). Waits while the outgoing batch is full
        and for the group ahead; cancelled then, nothing is written; cancelled later, the
        write stands and is sent (module docstring).
        """
        check_local_entry(key, value, self.limits)
        if self._validator is not None:
            try:
                accepted = self._validator(key, value)
            except Exception as exc:
                raise ValidationError(
                    f"the validator of map {self.name!r} failed on key {key!r}: {exc!r}"
                ) from exc
            if not accepted:
                raise ValidationError(f"the validator of map {self.name!r} refused key {key!r}")
        await self.replica.broadcast_update(Add(key, value))
        self.stats.puts += 1

    async def delete(self, key: Key) -> None:
        """Remove `key` on every node (a tombstone newer than any value it has seen)."""
        check_local_entry(key, None, self.limits)
        await self.replica.broadcast_update(Remove(key))
        self.stats.deletes += 1

    def _undo(
        self,
        made: list[tuple[Key, Entry]],
        replaced: dict[Key, Entry | None],
        sigs: dict[Key, bytes | None],
    ) -> None:
        """Take back local writes the store refused: each key gets back the entry they
        replaced, only while it still holds the entry they made. A newer entry merged from
        a peer meanwhile (during the store's await) stays; one older than this write, which
        lost to it then, is not brought back here (anti-entropy does, from its writer)."""
        for key, entry in made:
            current = self._map.entry(key)
            if current is not None and current.dot == entry.dot:
                self._map.restore(key, replaced.get(key))
                self._set_sig(key, sigs.get(key))

    def _set_sig(self, key: Key, sig: bytes | None) -> None:
        if sig:
            self._sigs[key] = sig
        else:
            self._sigs.pop(key, None)

    def _wire(self, keys: Iterable[Key]) -> list[Any]:
        """The wire form of the entries of `keys`, each with its writer's signature."""
        entries = self._map.wire_entries(keys)
        sigs = self._sigs
        if not sigs:
            return entries
        return [(*e, sig) if (sig := sigs.get(e[0])) else e for e in entries]

    def _authenticate(self, key: Key, entry: Entry, signature: bytes) -> bool:
        """Whether `signature` is the entry's writer's, by a key the allow-list lists for it.

        Any listed key, even one whose rotation window has ended: an entry lives as long as
        the data, and a key retired from handshakes still vouches for what it signed while
        listed (README "Security": removing a key's line disowns its entries)."""
        if not signature:
            return False
        writer = entry.dot.node
        data = signed_entry_bytes(self.node.config.cluster, self.name, key, entry)
        keys = self.node.trust.keys_for(writer, history=True)
        if writer == self.node.id:
            keys = [self.node.public_key, *keys]
        return any(verify(public, signature, data) for public in keys)

    # --- events -----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def subscribe(self, *, buffer: int = 1024) -> AsyncIterator[Feed[Event]]:
        """`Put` and `Removed` events for local and remote changes of the visible value.

        Yields a feed: iterate it or call ``await feed.receive()``. A subscriber more than
        `buffer` events behind misses the excess (counted in ``stats.subscriber_drops``)
        and then receives a `Lagged(missed)` notice where they went missing (read the map
        again: reads are local); the map never waits for it. The feed ends when the map
        closes.
        """
        feed = Feed[Event](max_items=buffer, max_bytes=2**62)
        self._subscribers.add(feed)
        try:
            yield feed
        finally:
            self._subscribers.discard(feed)
            feed.close()

    def close_subscribers(self) -> None:
        self._subscribers.close_all()

    def _emit(self, keys: tuple[Key, ...]) -> None:
        for key in keys:
            entry = self._map.entry(key)
            if entry is None:
                continue
            event: Event = (
                Put(key, entry.value, entry.dot.node)
                if isinstance(entry, Value)
                else Removed(key, entry.dot.node)
            )
            missed = self._subscribers.publish(event)
            if missed:
                self.stats.subscriber_drops += missed
                self.node.stats_counters.drop("map_subscriber_full", count=missed)

    # --- replica callbacks ------------------------------------------------------------------

    async def accept_loss(self) -> None:
        """End `recovering` without a peer: the operator knows no peer holds the writes the
        store lost (a node alone, or its peers lost them too), and accepts the loss."""
        await self._sync.accept_loss()

    def digest(self) -> str:
        """A summary of every entry (values and tombstones): two replicas with the same
        digest hold the same entries (unless 64-bit hashes collide)."""
        total, count = self._map.range_digest(0, 0)
        return f"{total:016x}-{count}"

    async def merge_delta(self, name: str, delta: Any) -> None:
        await self._ingest(delta, remote=True)

    async def merge_local(self, name: str, delta: Any) -> None:
        """This node's own write (`Replica.broadcast_update`): not a peer's change."""
        await self._ingest(delta, remote=False)

    async def apply_full_sync(self, name: str, snapshot: list[Any]) -> None:
        await self._ingest(snapshot, remote=True)

    async def full_sync_snapshot(self, name: str) -> list[Any] | None:
        # The replica streams (`full_sync_stream`); this whole-state form is the protocol's
        # required member, built from the same walk.
        snapshot: list[Any] = []
        async with contextlib.aclosing(self.full_sync_stream(name)) as batches:
            async for batch in batches:
                snapshot += batch
        return snapshot or None

    async def full_sync_stream(self, name: str) -> AsyncGenerator[list[Any], None]:
        # The map walked slice by slice as the sync streams: a snapshot of a million
        # entries held whole was a million objects for every full garbage collection to
        # walk, 15-20 ms each time, on top of building and freeing it (issue 13).
        for keys in self._map.key_slices(SNAPSHOT_SLICE):
            yield self._wire(keys)
            await trio.lowlevel.checkpoint()

    def digest_source(self, name: str) -> ORMap:
        # The map keeps its digest up to date on every change (ormap.ORMap): anti-entropy
        # compares digests and moves only the entries of the ranges that differ.
        return self._map

    async def range_stream(
        self, name: str, level: int, index: int
    ) -> AsyncGenerator[list[Any], None]:
        for keys in self._map.range_keys(level, index, SNAPSHOT_SLICE):
            yield self._wire(keys)
            await trio.lowlevel.checkpoint()

    async def before_sync(self, name: str) -> None:
        # No resurrection (README "Deletes stay deleted"): a replica out of touch for longer
        # than the tombstone TTL drops, before the first exchange, the entries whose delete
        # peers may have forgotten (`SyncState.drop_stale` picks them and deletes them from
        # the store, first).
        stale = await self._sync.drop_stale(
            self._map.entries(), self.node.clock, self.node.id, self.tombstone_ttl
        )
        if stale is None:
            return
        for start in range(0, len(stale.keys), INGEST_SLICE):
            for key in stale.keys[start : start + INGEST_SLICE]:
                self._map.restore(key, None)
                self._sigs.pop(key, None)
            await trio.lowlevel.checkpoint()
        self.stats.stale_entries_dropped += len(stale.keys)
        # Readers see the values go (those still alive elsewhere come back as puts).
        for key in stale.values:
            missed = self._subscribers.publish(Removed(key, self.node.id))
            if missed:
                self.stats.subscriber_drops += missed
        self._sync.dropped(stale)

    async def sync_completed(self, name: str, started_ms: int) -> None:
        await self._sync.completed(started_ms)

    async def remove_node(self, name: str, node: str) -> None:
        # Last-writer-wins data belongs to the map, not to the node that wrote it: a node
        # that fails or leaves takes nothing with it. (Registries and leases differ.)
        return None

    async def _ingest(self, raw: Any, *, remote: bool) -> None:
        """Merge a delta or a sync chunk from a peer, `INGEST_SLICE` entries at a time with
        a checkpoint between (merges commute, so other tasks may run in between)."""
        entries = check_delta(raw, self.limits)
        # This node's own writes (a group, `replica_writes`) merge in one step, one
        # transaction: the group is stored or fails as a whole. It is one batch at most.
        step = INGEST_SLICE if remote else max(len(entries), 1)
        for start in range(0, len(entries), step):
            if start:
                await trio.lowlevel.checkpoint()
            await self._ingest_slice(entries[start : start + step], remote=remote)

    async def _ingest_slice(self, raw: Any, *, remote: bool) -> IngestResult:
        result = ingest(
            self._map,
            raw,
            self.node.clock,
            validator=self._validator,
            limits=self.limits,
            authenticate=self._authenticate if self._signed else None,
            required=self._require,
            own=not remote,
        )
        # The signatures a local write replaces, for its undo if the store refuses it.
        old_sigs = (
            {k: self._sigs.get(k) for k in result.applied_keys}
            if self._signed and not remote
            else {}
        )
        if self._signed:
            for key in result.applied_keys:
                self._set_sig(key, result.signatures.get(key))
        for rejection in result.rejected:
            self.stats.rejected[rejection.reason] += 1
            self.node.stats_counters.reject(f"map_{rejection.reason}")
        if result.rejected:
            log.warning(
                "map %s: rejected %d entries (%s)",
                self.name,
                len(result.rejected),
                ", ".join(sorted({r.reason for r in result.rejected})),
            )
        if self._store is not None and result.applied_keys:
            entries = [(k, e) for k in result.applied_keys if (e := self._map.entry(k)) is not None]
            # A copy of the signatures of these keys: the write waits its turn for the store
            # thread, and other writes may change `_sigs` meanwhile.
            sigs = {k: s for k, _ in entries if (s := self._sigs.get(k))}
            # Shielded: these entries are merged in memory already. A cancelled write (the
            # driver restarting after a hung callback, say) would leave them here but not
            # on disk, and digests that match the peers' would never bring them back.
            with trio.CancelScope(shield=True):
                try:
                    await self._store.write(entries, signatures=sigs)
                except StoreError:
                    if not remote:
                        # Not durable, so neither acknowledged nor sent: undone here too.
                        self._undo(entries, result.replaced, old_sigs)
                    raise
        if remote:
            self.stats.remote_changes += len(result.changed_keys)
        self._emit(result.changed_keys)
        return result

    # --- lifecycle --------------------------------------------------------------------------

    async def recover(self) -> int:
        """Load the persisted state (trusted: it is ours) before the replica starts."""
        if self._store is None:
            return 0
        entries = await self._store.load(signatures=self._sigs if self._signed else None)
        await self._sync.load()
        for key, entry in entries:
            self._map.merge_entry(key, entry)
        if entries:
            # Ours, however far ahead of a wall clock stepped back since: the clock moves
            # past them without the skew bound, so the next writes here supersede them.
            self._map.absorb_clock(self.node.clock)
        return len(entries)

    async def collect_tombstones(self) -> None:
        """Drop tombstones older than the TTL, periodically (and from the store)."""
        period = min(self.tombstone_ttl / 4, 3600.0)
        while True:
            await trio.sleep(period)
            now_ms = self.node.clock.read_physical()
            ttl_ms = round(self.tombstone_ttl * 1000)
            expired = self._map.expired_tombstones(now_ms, ttl_ms)
            if not expired:
                continue
            # Off the disk first: a crash in between leaves tombstones in memory only,
            # which the next collection removes; the reverse could resurrect nothing either.
            if self._store is not None:
                try:
                    await self._store.delete(expired)
                except StoreError:
                    self.stats.store_errors += 1
                    log.exception("map %s: could not collect tombstones; next period", self.name)
                    continue
            self.stats.tombstones_collected += self._map.gc_tombstones(now_ms, ttl_ms)
            for key in expired:
                if self._map.entry(key) is None:
                    self._sigs.pop(key, None)

    @property
    def persistent(self) -> bool:
        """Whether the map lives in an SQLite store (``open_map(persist=True)``)."""
        return self._store is not None

    def opened_with(self, validator: Validator | None, persist: bool, tombstone_ttl: float) -> bool:
        """Whether the map was opened with these options (a second ``open_map`` must match)."""
        return (
            self._validator is validator
            and self.persistent == persist
            and self.tombstone_ttl == tombstone_ttl
        )

    async def close_store(self) -> None:
        """Close the SQLite store, if any (shielded: called once the map's tasks ended)."""
        if self._store is not None:
            with trio.CancelScope(shield=True):
                await self._store.aclose()

    async def aclose(self) -> None:
        """Stop replicating this map on this node (its state stays in memory and on disk)."""
        await self._on_close(self.name)


__all__ = ["Put", "Removed", "ReplicatedMap", "ValidationError"]
