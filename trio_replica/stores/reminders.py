"""Durable reminders: replicated timers, each fired by one worker node (issue 16).

This module owns `Reminders` (``node.reminders``), a `LeaseBoard` (`trio_replica.stores.leases`)
whose map, ``_reminders`` (in SQLite when the node has a ``data_dir``, like any persistent
map), holds besides the leases one entry per reminder: ``["r", key] -> {"at": wall ms,
"payload": plain data}``. Any node may set, cancel and list reminders (`remind`,
`cancel`, `pending`); only *workers* fire them: the nodes that have a subscriber
(``async with node.reminders.subscribe()``), each holding a lease while it does. The
owner of a key is chosen like the shard's (`trio_replica.stores.shard`): the key's partition
(``shard.ring_size`` of them), then rendezvous hashing over the live workers. A node that
joined the shard for its own purposes, or only sets reminders, owns none: they would
never fire there.

The *fence* of a reminder is the HLC timestamp of the write that set it (packed to an
integer), the same on every node and every fire of that reminder, so that ``(key,
fence)`` names one reminder.

Each worker keeps an index of the reminders (from the map's change events) and a heap of
hints (due time, key, fence) for the keys it owns, rebuilt from the index when the
workers change; a hint is checked when it comes due (still there, same fence, still
ours), and checked again when a subscriber takes it, so a stale hint costs nothing.

Firing, and what is guaranteed:

* a due reminder is handed to one of the owner's subscribers as `Fired(key, payload, at,
  fence)`;
* it is *acknowledged* when that subscriber calls ``await inbox.acknowledge()``, asks for
  the next one, or leaves its block normally; only then is the reminder deleted (a
  tombstone, replicated). A subscriber that leaves its block with an error (or is
  cancelled) hands its unacknowledged reminder back: it fires again, as does one whose
  delete failed;
* steady state (leases agree, no crash): each reminder fires once;
* across crashes it fires **at least once**: an owner that dies before its delete is
  replicated leaves the reminder in the map, and the next owner (within a lease TTL and a
  heartbeat, plus `handoff`) fires it again, with the same fence. Consumers that must not
  act twice deduplicate on ``(key, fence)``. barrel_p2p deletes before it delivers and so
  loses a fire when its node crashes in between; we delete after;
* after the workers change, a worker waits `handoff` seconds before firing what it did
  not own before, so that the deletes of the previous owner's fires arrive first (fewer
  duplicates when ownership moves); a worker whose last subscriber leaves retires its
  lease at once, handing its keys over;
* re-setting a key replaces its reminder (a new fence). Re-setting a key *while* it fires
  on another node can race with the delete of the fire (last writer wins): use a new key
  per occurrence when every occurrence matters.
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import logging
import math
from collections.abc import AsyncIterator
from typing import Any

import attrs
import trio

from ..core.events import Event, Lagged
from ..core.ormap import Value
from ..errors import MessageTooLarge, NodeClosed
from ..runtime.config import ReminderConfig
from .leases import BuiltinHost, LeaseBoard, entry_key
from .maps import Put, Removed, ValidationError
from .shard import partition_of, rank_owner
from .store import StoreError

log = logging.getLogger("trio_replica.reminders")

REMINDERS_MAP = "_reminders"
#: Latest due time accepted: year 9999 in wall ms.
MAX_AT_MS = 253_402_300_799_000


@attrs.frozen
class Reminder:
    """A pending reminder: due at `at` (wall seconds), named by ``(key, fence)``."""

    key: str
    at: float
    payload: Any
    fence: int


@attrs.frozen
class Fired(Event):
    """A reminder came due on its owner, this node."""

    key: str
    payload: Any
    #: When it was due (wall seconds).
    at: float
    fence: int


@attrs.define
class ReminderStats:
    fired: int = 0
    acknowledged: int = 0
    #: Fires handed back (a subscriber left with an error, or the delete failed): fired
    #: again.
    returned: int = 0
    #: Reminders deleted after a fire that was acknowledged.
    deleted: int = 0
    #: Hints dropped at their due time or when taken: the reminder was gone, changed or
    #: not ours any more.
    stale_hints: int = 0


def _check_key(key: Any) -> str:
    if not isinstance(key, str) or not 0 < len(key) <= 256:
        raise ValueError("a reminder key is a string of 1 to 256 characters")
    return key


def _parse(value: Any) -> tuple[int, Any] | None:
    """A reminder's value, from a peer: untrusted."""
    if type(value) is not dict or set(value) != {"at", "payload"}:
        return None
    at = value["at"]
    if type(at) is not int or not 0 <= at <= MAX_AT_MS:
        return None
    return at, value["payload"]


class ReminderInbox:
    """Fires for one subscriber (module docstring)."""

    def __init__(self, owner: Reminders) -> None:
        self._owner = owner
        #: The fire handed to this subscriber and not acknowledged yet.
        self.current: Fired | None = None

    def __aiter__(self) -> ReminderInbox:
        return self

    async def __anext__(self) -> Fired:
        await self.acknowledge()
        fired = await self._owner._take()
        self.current = fired
        return fired

    async def acknowledge(self) -> None:
        """Done with the current fire: delete the reminder (no-op without one)."""
        fired, self.current = self.current, None
        if fired is not None:
            await self._owner._acknowledge(fired)

    def _hand_back(self) -> None:
        fired, self.current = self.current, None
        if fired is not None:
            self._owner._hand_back(fired)


class Reminders(LeaseBoard):
    """The durable reminders of one node (module docstring)."""

    MAP = REMINDERS_MAP
    KINDS = {"r": 2}

    def __init__(self, node: BuiltinHost, config: ReminderConfig | None = None) -> None:
        super().__init__(node, config or ReminderConfig(), persist=node.config.data_dir is not None)
        self.config: ReminderConfig
        self.ring_size: int = node.config.shard.ring_size
        self.stats = ReminderStats()
        #: Every valid reminder in the map: key -> (due wall ms, fence).
        self._index: dict[str, tuple[int, int]] = {}
        self._indexed = False
        self._heap: list[tuple[int, str, int]] = []
        self._ready: collections.deque[Fired] = collections.deque()
        self._ready_event = trio.Event()
        #: Reminders handed out and not acknowledged yet: key -> fence.
        self._out: dict[str, int] = {}
        self._inboxes = 0
        self._workers: tuple[str, ...] = ()
        self._previous: tuple[str, ...] = ()
        self._changed_at = -math.inf
        self._owners: dict[int, str | None] = {}

    # --- the API ------------------------------------------------------------------------

    async def remind(self, key: str, at: float, payload: Any = None) -> Reminder:
        """Fire `key` at wall time `at` (seconds since the epoch) with `payload`; replaces
        a pending reminder of the same key. Durable on return when the map persists."""
        _check_key(key)
        if not isinstance(at, int | float) or isinstance(at, bool):
            raise TypeError("at is a wall time in seconds (int or float)")
        if not math.isfinite(at) or not 0 <= round(at * 1000) <= MAX_AT_MS:
            raise ValueError("at is out of range (the epoch to year 9999)")
        the_map = await self._ensure()
        await the_map.put(entry_key("r", key), {"at": round(at * 1000), "payload": payload})
        found = self.get(key)
        assert found is not None
        return found

    async def remind_after(self, key: str, delay: float, payload: Any = None) -> Reminder:
        """Fire `key` `delay` seconds from now (on this node's wall clock)."""
        if not isinstance(delay, int | float) or not 0 <= delay < math.inf:
            raise ValueError("delay must be a finite number of seconds >= 0")
        return await self.remind(key, self._now_ms() / 1000 + delay, payload)

    async def cancel(self, key: str) -> bool:
        """Cancel the pending reminder `key`; False if there was none here."""
        _check_key(key)
        the_map = await self._ensure()
        if self.get(key) is None:
            return False
        await the_map.delete(entry_key("r", key))
        return True

    def get(self, key: str) -> Reminder | None:
        """The pending reminder `key` as this node knows it (a local read)."""
        the_map = self._check_open()
        entry = the_map.entry(entry_key("r", key))
        if not isinstance(entry, Value):
            return None
        parsed = _parse(entry.value)
        if parsed is None:
            return None
        return Reminder(key, parsed[0] / 1000, parsed[1], entry.dot.ts.pack())

    def pending(self) -> list[Reminder]:
        """Every pending reminder this node knows of, by due time (a local read)."""
        self._check_open()
        found = [self.get(key) for (_, key), _ in self.entries("r")]
        return sorted((r for r in found if r is not None), key=lambda r: (r.at, r.key))

    def workers(self) -> list[str]:
        """The live workers (nodes with a subscriber), as this node sees them."""
        self._check_open()
        return list(self._workers)

    def owner_of(self, key: str) -> str | None:
        """The worker that fires `key` (None while there is none)."""
        partition = partition_of(key, self.ring_size)
        if partition not in self._owners:
            self._owners[partition] = rank_owner(partition, self._workers)
        return self._owners[partition]

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[ReminderInbox]:
        """Fire reminders on this node while the block runs (module docstring)."""
        the_map = await self._ensure()
        inbox = ReminderInbox(self)
        self._inboxes += 1
        try:
            if self._inboxes == 1:
                await self._renew(the_map)  # a worker from now on, for everyone
                await self._on_change()
                self._wake()  # the heartbeat loop's next wake-up moved
            yield inbox
        except BaseException:
            inbox._hand_back()
            raise
        else:
            with trio.CancelScope(shield=True), trio.move_on_after(2.0):
                await inbox.acknowledge()
            inbox._hand_back()  # if the acknowledgement did not finish
        finally:
            self._inboxes -= 1
            if not self._inboxes:
                await self._stop_working()

    # --- firing ---------------------------------------------------------------------------

    async def _stop_working(self) -> None:
        """The last subscriber left: what waits for one goes back, and the lease goes, so
        that the other workers take these keys over now."""
        while self._ready:
            fired = self._ready.popleft()
            self._out.pop(fired.key, None)
            heapq.heappush(self._heap, (round(fired.at * 1000), fired.key, fired.fence))
        self._ready_event = trio.Event()
        with trio.CancelScope(shield=True):
            with trio.move_on_after(2.0) as waited:
                try:
                    await self._retire()
                except NodeClosed:
                    pass  # the lease goes with the node
                except (StoreError, MessageTooLarge, ValidationError) as exc:
                    log.warning("reminders: could not retire this worker's lease: %s", exc)
            if waited.cancelled_caught:
                log.warning("reminders: retiring this worker's lease took over 2 s; it expires")
            await self._on_change()
            self._wake()

    def _current(self, key: str, fence: int) -> bool:
        return self._index.get(key, (0, -1))[1] == fence and self.owner_of(key) == self.node.id

    async def _take(self) -> Fired:
        while True:
            while not self._ready:
                await self._ready_event.wait()
            fired = self._ready.popleft()
            if not self._ready:
                self._ready_event = trio.Event()
            if self._current(fired.key, fired.fence):
                return fired
            # Cancelled, replaced or moved since it came due.
            self.stats.stale_hints += 1
            if self._out.get(fired.key) == fired.fence:
                del self._out[fired.key]

    def _hand_back(self, fired: Fired) -> None:
        self.stats.returned += 1
        if self._out.get(fired.key) == fired.fence:
            del self._out[fired.key]
        heapq.heappush(self._heap, (round(fired.at * 1000), fired.key, fired.fence))
        self._wake()

    async def _acknowledge(self, fired: Fired) -> None:
        self.stats.acknowledged += 1
        the_map = self._map
        current = self.get(fired.key) if the_map is not None else None
        if the_map is None or current is None or current.fence != fired.fence:
            if self._out.get(fired.key) == fired.fence:
                del self._out[fired.key]
            return  # cancelled or replaced meanwhile: nothing of this reminder left
        deleted = False
        try:
            await the_map.delete(entry_key("r", fired.key))
            deleted = True
            self.stats.deleted += 1
        except (StoreError, NodeClosed) as exc:
            log.warning("reminders: could not delete fired %r: %s", fired.key, exc)
        finally:
            if not deleted:
                # Still in the map (or cancelled before the delete): it fires again.
                self._hand_back(fired)
            elif self._out.get(fired.key) == fired.fence:
                del self._out[fired.key]

    def _on_event(self, event: Event) -> None:
        if isinstance(event, Lagged):
            self._indexed = False
            return
        if not isinstance(event, Put | Removed):
            return
        parts = self._parse(event.key)
        if parts is None or parts[0] != "r":
            return
        key = parts[1]
        entry = self._map.entry(event.key) if self._map is not None else None
        parsed = _parse(entry.value) if isinstance(entry, Value) else None
        if parsed is None or entry is None:
            self._index.pop(key, None)
            return
        fence = entry.dot.ts.pack()
        self._index[key] = (parsed[0], fence)
        if self.owner_of(key) == self.node.id:
            heapq.heappush(self._heap, (parsed[0], key, fence))

    def _rebuild(self) -> None:
        """The index from the map (at open, after a lagged feed), the heap from the index
        (and when it holds more stale hints than live ones)."""
        the_map = self._map
        assert the_map is not None
        if not self._indexed:
            self._index = {}
            for (_, key), value in self.entries("r"):
                entry = the_map.entry(entry_key("r", key))
                parsed = _parse(value)
                if parsed is not None and entry is not None:
                    self._index[key] = (parsed[0], entry.dot.ts.pack())
            self._indexed = True
        me = self.node.id
        self._heap = [
            (at, key, fence) for key, (at, fence) in self._index.items() if self.owner_of(key) == me
        ]
        heapq.heapify(self._heap)

    def _active(self) -> bool:
        return self._inboxes > 0

    async def _on_change(self) -> None:
        workers = tuple(sorted(self.live_nodes()))
        rebuild = not self._indexed or len(self._heap) > 2 * len(self._index) + 64
        if workers != self._workers:
            self._previous, self._workers = self._workers, workers
            self._changed_at = trio.current_time()
            self._owners = {}
            rebuild = True
        if rebuild:
            self._rebuild()
        self._fire_due()

    def _next_wake(self) -> float | None:
        now = trio.current_time()
        wakes = []
        settle = self._changed_at + self.config.handoff
        if settle > now:
            wakes.append(settle)
        if self._heap and self._inboxes:
            due = (self._heap[0][0] - self._now_ms()) / 1000
            if due > 0:
                wakes.append(now + due)
            # Due already: it was deferred (hand-off), and the settle wakes us for it.
        return min(wakes, default=None)

    def _fire_due(self) -> None:
        """Hand every due reminder this node owns to its subscribers."""
        if not self._inboxes:
            return  # not a worker: the heap waits (rebuilt when this node works again)
        now_ms = self._now_ms()
        now = trio.current_time()
        settled = now >= self._changed_at + self.config.handoff
        me = self.node.id
        deferred: list[tuple[int, str, int]] = []
        while self._heap and self._heap[0][0] <= now_ms:
            hint = heapq.heappop(self._heap)
            _, key, fence = hint
            if not self._current(key, fence):
                self.stats.stale_hints += 1
                continue
            if self._out.get(key) == fence:
                continue  # handed out already, waiting for its acknowledgement
            partition = partition_of(key, self.ring_size)
            if not settled and rank_owner(partition, self._previous) != me:
                deferred.append(hint)  # new to us: the last owner's delete may be coming
                continue
            reminder = self.get(key)
            if reminder is None or reminder.fence != fence:
                # The map moved ahead of the index (its change event is on its way, and
                # brings the new hint): not this reminder any more.
                self.stats.stale_hints += 1
                continue
            self.stats.fired += 1
            fired = Fired(key, reminder.payload, reminder.at, fence)
            self._out[key] = fence
            self._ready.append(fired)
            self._ready_event.set()
        for hint in deferred:
            heapq.heappush(self._heap, hint)
