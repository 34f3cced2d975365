"""The owner's writes to a replica instance: `ReplicaWriter`, owned by the driver.

`broadcast_update(Add(key, value) | Remove(key))` mints one HLC dot for the write, hands
the delta to the owner's `merge_local` or `merge_delta` (so the local state holds exactly
the entry the cluster gets, and a persistent owner acknowledges only once it is durable),
and queues the entry for broadcast. `broadcast_custom(payload)` carries an owner-specific
payload to `merge_custom` on every other node.

Batching (issue 19: one broadcast, one ingest and one fsync per write capped a 10-node
cluster at about 500 map writes a second):

* **Group commit.** Writes made while the owner is still merging an earlier one wait and
  are then merged together, in one `merge_local` call (for a persistent map: one SQLite
  transaction, one fsync). Each returns once its group is merged (durable). A lone write
  waits for nothing.
* **One broadcast per batch.** Merged entries wait in the instance's outgoing batch; the
  driver's flusher (`run_flusher`) broadcasts everything waiting as one delta whenever the
  node may send (`writable`: flow control's pressure, the broadcast component's room, the
  write pacer's turn). A write on an idle node goes out at once; while the node is slowed,
  the writes of that time wait and travel together, so batches grow with load instead of
  the number of broadcasts. A batch holds at most `ReplicaConfig.batch_entries` entries and
  `batch_bytes` bytes (a single larger entry travels alone, up to `max_payload`).
* **Flow control** moves to the batch: a write waits (before anything is applied) while
  the outgoing batch is full, that is while the node cannot send as fast as it writes.

What a write's outcome is: it fails (`StoreError`, or what the owner raised, for its whole
group) with nothing applied or sent, or it is merged and then certain to be broadcast while
the node runs: the step from merged to queued has no checkpoint, the group's merge runs
shielded from its callers' cancellation, a group merged after its instance closed is sent
at once, and a graceful leave sends what waits before its goodbye. A write cancelled while
it waits for its group is not written. The one exception: a merge that takes longer than
`callback_timeout` is abandoned and its writes fail with `CallbackHung`, possibly partly
applied here and not sent (anti-entropy reconciles the replicas).
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Protocol

import trio

from ..core.hlc import Timestamp
from ..core.messages import MessageId
from ..core.ormap import Dot, Entry, Tombstone, Value
from ..core.ormap_wire import to_wire
from ..core.wire import decode_payload, encode_payload
from ..errors import CallbackHung, NodeClosed
from .config import ReplicaConfig
from .replica_api import Add, Remove, ReplicaCallbacks, ReplicaStats
from .services import NodeBasics, Publishing

log = logging.getLogger("trio_replica.replica")

#: A delta's envelope around its entries: ``["d", [...]]`` is 0x82, "d" (0x61 0x64), then
#: the entries' array header (at most 5 bytes for up to 2**32 entries).
_ENVELOPE = b"\x82\x61d"
_ENVELOPE_MAX = len(_ENVELOPE) + 5


def _array_header(n: int) -> bytes:
    """The CBOR header of an array of `n` items (major type 4), as cbor2 writes it."""
    if n < 24:
        return bytes((0x80 | n,))
    if n < 0x100:
        return bytes((0x98, n))
    if n < 0x10000:
        return b"\x99" + n.to_bytes(2, "big")
    return b"\x9a" + n.to_bytes(4, "big")


def delta_bytes(parts: list[bytes]) -> bytes:
    """The encoding of ``["d", entries]`` from the entries' own encodings (CBOR arrays are
    their items one after another: nothing is encoded twice)."""
    return b"".join((_ENVELOPE, _array_header(len(parts)), *parts))


class WriterHost(NodeBasics, Publishing, Protocol):
    """What the write path uses of its node."""

    @property
    def closing(self) -> bool: ...

    async def writable(self) -> None: ...
    def broadcast_encoded_nowait(self, tag: str, encoded: bytes, payload: Any) -> MessageId: ...
    def sign_entry(self, name: str, key: Any, entry: Entry) -> bytes: ...


class _Group:
    """Writes merged together (group commit): their entries, and how the merge ended."""

    __slots__ = ("done", "error", "items", "merged", "started")

    def __init__(self) -> None:
        #: (encoded entry, decoded entry) per write, in arrival order.
        self.items: list[tuple[bytes, Any]] = []
        self.started = False
        self.merged = False
        self.done = trio.Event()
        self.error: Exception | None = None


class ReplicaWriter:
    """Writes of the owner of one instance, broadcast on its `tag` (module docstring).

    Refused with `NodeClosed` once the driver is closed or `scope` (its run) is cancelled.
    """

    def __init__(
        self,
        node: WriterHost,
        name: str,
        tag: str,
        callbacks: ReplicaCallbacks,
        stats: ReplicaStats,
        closed: trio.Event,
        scope: trio.CancelScope,
        config: ReplicaConfig,
    ) -> None:
        self._node = node
        self._name = name
        self._tag = tag
        self._callbacks = callbacks
        self._stats = stats
        self._closed = closed
        self._scope = scope
        self._batch_entries = config.batch_entries
        # A batch must fit one payload, envelope included.
        self._batch_bytes = min(config.batch_bytes, node.config.max_payload - _ENVELOPE_MAX)
        self._merge_timeout = config.callback_timeout
        #: The group taking new writes, and the one being merged.
        self._forming: _Group | None = None
        self._merging: _Group | None = None
        #: Merged entries not broadcast yet: encoded, decoded, and their encoded bytes.
        self._pending: list[bytes] = []
        self._pending_local: list[Any] = []
        self._pending_bytes = 0
        self._pending_set = trio.Event()
        #: Writers waiting for room in the outgoing batch.
        self._room = trio.lowlevel.ParkingLot()

    def new_dot(self) -> Dot:
        ts: Timestamp = self._node.clock.now()
        return Dot(self._node.id, ts)

    @property
    def pending(self) -> int:
        """Entries merged here and waiting for their broadcast."""
        return len(self._pending)

    async def broadcast_update(self, update: Add | Remove) -> Dot:
        """Apply `update` locally through the owner, then queue its broadcast; return its dot.

        Raises what the owner's `merge_local` / `merge_delta` raises for a local write
        (nothing is sent then), `MessageTooLarge` or `TypeError` for a value that cannot travel.
        """
        self._check_open()
        # Flow control first: once merged here, the write must go out without waiting.
        await self._wait_room()
        self._check_open()
        dot = self.new_dot()
        entry = Value(update.value, dot) if isinstance(update, Add) else Tombstone(dot)
        wire = to_wire([(update.key, entry)])[0]
        if self._node.config.identity.sign_broadcasts:
            # The entry itself is signed, not only the broadcast: it keeps its writer's
            # signature in every later sync and in the stores of the nodes it reaches.
            wire.append(self._node.sign_entry(self._name, update.key, entry))
        # Encoded before the local merge: a write that cannot travel must not be applied
        # here. Encoded as the delta of one entry, so that its size and nesting are checked
        # as peers will see them (a delta nests the entry two levels deeper); the entry's
        # own bytes follow the 4-byte envelope ``["d", [`` of one entry.
        max_payload = self._node.config.max_payload
        alone = encode_payload(["d", [wire]], max_size=max_payload - _ENVELOPE_MAX + 4)
        part = alone[4:]
        # The owner gets the entry as every peer does, decoded from these bytes: a value the
        # caller mutates after the write can change neither the local state nor its digest
        # (an entry's hash is added at merge and subtracted at its replacement).
        local = decode_payload(alone, max_size=max_payload)[1][0]
        await self._commit(part, local)
        return dot

    async def _wait_room(self) -> None:
        """Wait while the outgoing batch, with the group still forming, is full: a group
        holds at most one batch (`batch_entries`; `batch_bytes` plus the last write's own
        size, which is known only once it is encoded, after this wait)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while self._full():
            await self._room.park()
            self._check_open()

    def _full(self) -> bool:
        forming = self._forming.items if self._forming is not None else ()
        entries = len(self._pending) + len(forming)
        size = self._pending_bytes + sum(len(part) for part, _ in forming)
        return entries >= self._batch_entries or size >= self._batch_bytes

    async def _commit(self, part: bytes, local: Any) -> None:
        """Merge one write with the others of its group (module docstring); the group's
        entries join the outgoing batch as soon as it is merged."""
        group = self._forming
        if group is None:
            group = self._forming = _Group()
        item = (part, local)
        group.items.append(item)
        try:
            while self._merging is not None and not group.started:
                await self._merging.done.wait()
            if not group.started:
                # The instance may have closed meanwhile: its flusher is gone.
                self._check_open()
        except BaseException:
            if not group.started:
                # Not merged, so not written.
                group.items[:] = [i for i in group.items if i is not item]
            raise
        if not group.started:
            await self._merge_group(group)
        else:
            await group.done.wait()
        if group.merged:
            return
        error = group.error
        if error is None:  # the merge ended by an exception that is not an `Exception`
            raise NodeClosed(f"replica {self._name!r}: the merge of this write was interrupted")
        if group.items[0] is not item:
            # The other writers of the group get a copy each: one exception object raised
            # in several tasks would carry all their tracebacks.
            try:
                mine = copy.copy(error).with_traceback(None)
            except Exception:  # an exception type that cannot be rebuilt from its args
                mine = None
            if mine is not None:
                raise mine from error
        raise error

    async def _merge_group(self, group: _Group) -> None:
        group.started = True
        self._forming = None
        self._merging = group
        self._room.unpark_all()  # the next group may form while this one merges
        merge = getattr(self._callbacks, "merge_local", None) or self._callbacks.merge_delta
        try:
            # Shielded: the group's other writers wait on this merge, and a merge cut half
            # way would leave entries merged here but never sent. Bounded all the same.
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + self._merge_timeout
                await merge(self._name, [local for _, local in group.items])
            if scope.cancelled_caught:
                self._stats.callbacks_hung += 1
                raise CallbackHung(
                    f"replica {self._name!r}: merging {len(group.items)} local writes took "
                    f"over {self._merge_timeout} s; they may be partly applied here, and are "
                    "not sent"
                )
        except Exception as exc:
            if isinstance(exc, CallbackHung):
                log.error("%s", exc)
            group.error = exc
        else:
            group.merged = True
            self._queue(group.items)
            if self._closed.is_set() or self._scope.cancel_called:
                # Merged after the instance closed (the merge is shielded): no flusher will
                # take them, so they go now.
                self.close()
        finally:
            self._merging = None
            group.done.set()

    def _queue(self, items: list[tuple[bytes, Any]]) -> None:
        """Merged entries join the outgoing batch (no checkpoint: see the module docstring)."""
        for part, local in items:
            self._pending.append(part)
            self._pending_local.append(local)
            self._pending_bytes += len(part)
        self._pending_set.set()

    async def run_flusher(self) -> None:
        """Broadcast the outgoing batch whenever the node may send; a task of the driver's
        life. What waits when it stops (a crash, a close) goes with the next life, or at
        once on a close."""
        try:
            while True:
                if not self._pending:
                    self._pending_set = trio.Event()
                    await self._pending_set.wait()
                try:
                    await self._node.writable()
                except NodeClosed:
                    return
                self.flush()
        finally:
            if self._node.closing or self._scope.cancel_called:
                self.close()

    def close(self) -> None:
        """The instance or the node is closing: send what waits (if the node still can)
        and wake the writers waiting for room (they get `NodeClosed`)."""
        self.flush(final=True)
        self._room.unpark_all()

    def flush(self, *, final: bool = False) -> int:
        """Broadcast what waits, as one delta per `batch_entries` / `batch_bytes` (with
        `final`, everything: the instance or the node is closing, or a custom broadcast
        must not overtake them); return how many writes went."""
        sent = 0
        while self._pending:
            count, size = 0, 0
            for part in self._pending:
                if count and (count >= self._batch_entries or size + len(part) > self._batch_bytes):
                    break
                count += 1
                size += len(part)
            parts, self._pending = self._pending[:count], self._pending[count:]
            local, self._pending_local = self._pending_local[:count], self._pending_local[count:]
            self._pending_bytes -= size
            if self._node.closing:
                # Merged here, never sent: anti-entropy carries them once the node is back.
                self._stats.updates_unsent += count
                continue
            self._node.broadcast_encoded_nowait(self._tag, delta_bytes(parts), ["d", local])
            self._stats.deltas_sent += 1
            self._stats.updates_sent += count
            sent += count
            if not final:
                break
        self._room.unpark_all()
        return sent

    async def broadcast_custom(self, payload: Any) -> None:
        """Send an owner-specific payload to `merge_custom` on every other node."""
        self._check_open()
        # The writes merged before it go first (deltas and customs keep the owner's order).
        self.flush(final=True)
        await self._node.broadcast(self._tag, ["c", payload])
        self._stats.customs_sent += 1

    def _check_open(self) -> None:
        if self._closed.is_set() or self._scope.cancel_called:
            raise NodeClosed(f"replica {self._name!r} is closed")
        if self._node.closing:
            raise NodeClosed("the node is closing")


__all__ = ["ReplicaWriter", "WriterHost", "delta_bytes"]
