"""Durable reminders: replicated timers fired by the owner of their key (issue 16).

This module owns `Reminders` (``node.reminders``). A reminder is an entry of the
replicated map ``_reminders``: ``key -> {"at": wall ms, "payload": plain data}``, kept in
SQLite when the node has a ``data_dir``, like any persistent map. Its owner is
``node.shard.place(key)`` (`trio_replica.shard`: rendezvous over the lease-based live set),
and only the owner fires it; its *fence* is the HLC timestamp of the write that set it
(packed to an integer), the same on every node and every fire of that reminder, so that
``(key, fence)`` names one reminder.

Each node keeps a heap of hints (due time, key, fence) for the keys it owns, fed by the
map's change events and rebuilt when ownership moves; a hint is checked against the map
when it comes due (still there, same fence, still ours), so a stale hint costs nothing.

Firing, and what is guaranteed:

* a due reminder is handed to one of this node's subscribers
  (``async with node.reminders.subscribe() as inbox: async for fired in inbox:``) as
  `Fired(key, payload, at, fence)`; without a subscriber it waits;
* it is *acknowledged* when that subscriber asks for the next one or leaves its block
  normally; only then is the reminder deleted (a tombstone, replicated). A subscriber that
  leaves its block with an error hands its unacknowledged reminder back: it fires again;
* steady state (leases agree, no crash): each reminder fires once;
* across crashes it fires **at least once**: an owner that dies before its delete is
  replicated leaves the reminder in the map, and the next owner (within a lease TTL and a
  heartbeat, plus `handoff`) fires it again, with the same fence. Consumers that must not
  act twice deduplicate on ``(key, fence)``. barrel_p2p deletes before it delivers and so
  loses a fire when its node crashes in between; we delete after;
* a newly acquired partition waits `handoff` seconds before firing, so that the deletes of
  the previous owner's fires arrive first (fewer duplicates when ownership moves);
* re-setting a key replaces its reminder (a new fence). Re-setting a key *while* it fires
  on another node can race with the delete of the fire (last writer wins): use a new key
  per occurrence when every occurrence matters.
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import attrs
import trio

from .errors import ConfigError, NodeClosed
from .events import Event, Lagged
from .maps import Put, Removed
from .ormap import Value
from .store import StoreError

if TYPE_CHECKING:
    from .maps import ReplicatedMap
    from .node import Node

log = logging.getLogger("trio_replica.reminders")

REMINDERS_MAP = "_reminders"
#: Latest due time accepted: year 9999 in wall ms.
MAX_AT_MS = 253_402_300_799_000


@attrs.frozen
class ReminderConfig:
    #: Seconds a newly acquired partition waits before firing its due reminders.
    handoff: float = 2.0

    def __attrs_post_init__(self) -> None:
        if not self.handoff >= 0:
            raise ConfigError("reminders: handoff must be >= 0")


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
    #: Fires handed back by a subscriber that left with an error (fired again).
    returned: int = 0
    #: Reminders deleted after a fire that was acknowledged.
    deleted: int = 0
    #: Hints dropped at their due time: the reminder was gone, changed or not ours.
    stale_hints: int = 0


def _check_key(key: Any) -> str:
    if not isinstance(key, str) or not 0 < len(key) <= 256:
        raise ValueError("a reminder key is a string of 1 to 256 characters")
    return key


def _parse(value: Any) -> tuple[int, Any] | None:
    if type(value) is not dict or set(value) != {"at", "payload"}:
        return None
    at = value["at"]
    if type(at) is not int or not 0 <= at <= MAX_AT_MS:
        return None
    return at, value["payload"]


class ReminderInbox:
    """Fires for one subscriber; iterating acknowledges the previous one (module docstring)."""

    def __init__(self, owner: Reminders) -> None:
        self._owner = owner
        self.current: Fired | None = None

    def __aiter__(self) -> ReminderInbox:
        return self

    async def __anext__(self) -> Fired:
        await self._settle(ok=True)
        fired = await self._owner._take()
        self.current = fired
        return fired

    async def _settle(self, *, ok: bool) -> None:
        fired, self.current = self.current, None
        if fired is None:
            return
        if ok:
            await self._owner._acknowledge(fired)
        else:
            self._owner._hand_back(fired)


class Reminders:
    """The durable reminders of one node (module docstring)."""

    def __init__(self, node: Node, config: ReminderConfig | None = None) -> None:
        self.node = node
        self.config = config or ReminderConfig()
        self.stats = ReminderStats()
        self._map: ReplicatedMap | None = None
        self._opening = trio.Lock()
        self._heap: list[tuple[int, str, int]] = []
        self._ready: collections.deque[Fired] = collections.deque()
        #: Reminders handed out and not acknowledged yet: key -> fence.
        self._out: dict[str, int] = {}
        self._inboxes = 0
        self._wakeup = trio.Event()
        self._ready_event = trio.Event()
        self._rebuild = True

    @property
    def is_open(self) -> bool:
        return self._map is not None

    async def open(self) -> None:
        """Host the reminders' map (persistent with a data_dir) and join the shard."""
        await self._ensure()

    async def _ensure(self) -> ReplicatedMap:
        async with self._opening:
            if self._map is None:
                persist = self.node.config.data_dir is not None
                the_map = await self.node._open_map_unchecked(REMINDERS_MAP, persist=persist)
                await self.node.shard.open(member=True)
                self._map = the_map
                self.node.spawn(self._run)
            return self._map

    def _check_open(self) -> ReplicatedMap:
        if self._map is None:
            raise RuntimeError(
                "reminders are not open on this node: await node.reminders.open() first"
            )
        return self._map

    # --- the API ------------------------------------------------------------------------

    async def remind(self, key: str, at: float, payload: Any = None) -> Reminder:
        """Fire `key` at wall time `at` (seconds since the epoch) with `payload`; replaces
        a pending reminder of the same key. Durable on return when the map persists."""
        _check_key(key)
        if not isinstance(at, int | float) or isinstance(at, bool):
            raise TypeError("at is a wall time in seconds (int or float)")
        at_ms = round(at * 1000)
        if not 0 <= at_ms <= MAX_AT_MS:
            raise ValueError("at is out of range (the epoch to year 9999)")
        the_map = await self._ensure()
        await the_map.put(key, {"at": at_ms, "payload": payload})
        found = self.get(key)
        assert found is not None
        return found

    async def remind_after(self, key: str, delay: float, payload: Any = None) -> Reminder:
        """Fire `key` `delay` seconds from now (on this node's wall clock)."""
        if not delay >= 0:
            raise ValueError("delay must be >= 0")
        return await self.remind(key, self._now_ms() / 1000 + delay, payload)

    async def cancel(self, key: str) -> bool:
        """Cancel the pending reminder `key`; False if there was none here."""
        _check_key(key)
        the_map = await self._ensure()
        if key not in the_map:
            return False
        await the_map.delete(key)
        return True

    def get(self, key: str) -> Reminder | None:
        """The pending reminder `key` as this node knows it (a local read)."""
        the_map = self._check_open()
        entry = the_map.entry(key)
        if not isinstance(entry, Value):
            return None
        parsed = _parse(entry.value)
        if parsed is None:
            return None
        return Reminder(key, parsed[0] / 1000, parsed[1], entry.dot.ts.pack())

    def pending(self) -> list[Reminder]:
        """Every pending reminder this node knows of, by due time (a local read)."""
        the_map = self._check_open()
        found = [self.get(k) for k in the_map if isinstance(k, str)]
        return sorted((r for r in found if r is not None), key=lambda r: (r.at, r.key))

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[ReminderInbox]:
        """Receive the reminders that fire on this node (module docstring)."""
        await self._ensure()
        inbox = ReminderInbox(self)
        self._inboxes += 1
        self._wake()
        try:
            yield inbox
        except BaseException:
            await inbox._settle(ok=False)
            raise
        else:
            with trio.CancelScope(shield=True), trio.move_on_after(2.0):
                await inbox._settle(ok=True)
        finally:
            self._inboxes -= 1

    # --- firing ---------------------------------------------------------------------------

    def _now_ms(self) -> int:
        return self.node.clock.read_physical()

    def _wake(self) -> None:
        self._wakeup.set()
        self._wakeup = trio.Event()

    async def _take(self) -> Fired:
        while not self._ready:
            await self._ready_event.wait()
        fired = self._ready.popleft()
        if not self._ready:
            self._ready_event = trio.Event()
        return fired

    def _deliver(self, fired: Fired) -> None:
        self._out[fired.key] = fired.fence
        self._ready.append(fired)
        self._ready_event.set()

    def _hand_back(self, fired: Fired) -> None:
        self.stats.returned += 1
        self._out.pop(fired.key, None)
        at_ms = round(fired.at * 1000)
        heapq.heappush(self._heap, (at_ms, fired.key, fired.fence))
        self._wake()

    async def _acknowledge(self, fired: Fired) -> None:
        self.stats.acknowledged += 1
        if self._out.get(fired.key) == fired.fence:
            del self._out[fired.key]
        the_map = self._map
        current = self.get(fired.key) if the_map is not None else None
        if the_map is None or current is None or current.fence != fired.fence:
            return  # cancelled or replaced meanwhile: nothing of this reminder left
        try:
            await the_map.delete(fired.key)
        except (StoreError, NodeClosed) as exc:
            # Still in the map: it fires again (at least once, same fence).
            log.warning("reminders: could not delete fired %r: %s", fired.key, exc)
        else:
            self.stats.deleted += 1

    def _push(self, key: Any, value: Any, fence: int) -> None:
        if not isinstance(key, str):
            return
        parsed = _parse(value)
        if parsed is not None and self.node.shard.is_owner(key):
            heapq.heappush(self._heap, (parsed[0], key, fence))

    def _rebuild_heap(self) -> None:
        the_map = self._map
        assert the_map is not None
        self._heap = []
        for key in the_map:
            entry = the_map.entry(key)
            if isinstance(entry, Value):
                self._push(key, entry.value, entry.dot.ts.pack())
        heapq.heapify(self._heap)
        self._rebuild = False

    def _fire_due(self) -> float:
        """Hand every due reminder out; return seconds until the next one is due (inf)."""
        if self._rebuild:
            self._rebuild_heap()
        now_ms = self._now_ms()
        now = trio.current_time()
        shard = self.node.shard
        deferred: list[tuple[int, str, int]] = []
        wait = float("inf")
        while self._heap and self._heap[0][0] <= now_ms:
            at_ms, key, fence = heapq.heappop(self._heap)
            current = self.get(key)
            if current is None or current.fence != fence or not shard.is_owner(key):
                self.stats.stale_hints += 1
                continue
            if self._out.get(key) == fence:
                continue  # handed out already, waiting for its acknowledgement
            since = shard.owned_since(shard.partition(key))
            settle_at = (since if since is not None else now) + self.config.handoff
            if settle_at > now or not self._inboxes:
                deferred.append((at_ms, key, fence))
                if settle_at > now:
                    wait = min(wait, settle_at - now)
                continue
            self.stats.fired += 1
            self._deliver(Fired(key, current.payload, current.at, fence))
        for hint in deferred:
            heapq.heappush(self._heap, hint)
        if self._heap and self._heap[0][0] > now_ms:
            wait = min(wait, (self._heap[0][0] - now_ms) / 1000)
        return wait

    async def _run(self) -> None:
        the_map = self._map
        assert the_map is not None
        shard = self.node.shard
        async with the_map.subscribe() as changes, trio.open_nursery() as nursery:

            async def follow_map() -> None:
                async for event in changes:
                    if isinstance(event, Lagged):
                        self._rebuild = True
                    elif isinstance(event, Put):
                        entry = the_map.entry(event.key)
                        if isinstance(entry, Value):
                            self._push(event.key, entry.value, entry.dot.ts.pack())
                    elif not isinstance(event, Removed):
                        continue
                    self._wake()

            async def follow_shard() -> None:
                async with shard.events() as moves:
                    async for _ in moves:
                        self._rebuild = True
                        self._wake()

            nursery.start_soon(follow_map)
            nursery.start_soon(follow_shard)
            while True:
                wakeup = self._wakeup
                wait = self._fire_due()
                with trio.move_on_after(wait):
                    await wakeup.wait()
