"""Flow control inside a node: who is over its high-water mark, fair inboxes, subscriber feeds.

Theory of operation
-------------------
Every buffer in a node is bounded in bytes and in items, and every producer learns when a
buffer is full instead of having its data thrown away. There are three kinds of producer,
and each is slowed the way it can be:

* **Local writers** (``node.broadcast``, ``Replica.broadcast_update``, map writes) wait.
  Before a write is applied, the writer waits on the node's `Pressure` until no link outbox
  and no flow-controlled subscriber of the node is over its high-water mark. The wait is a
  checkpoint (never a spin) and the writer may bound it with its own cancel scope.
* **Peers** are slowed by not being read, the TCP way. Each peer's inputs wait in a
  `FairInbox` of the component that handles them, bounded per peer; a reader whose peer's
  share is full stops reading until the component takes one, so the peer's own writer
  blocks. The component serves the peers round-robin, so a flooding peer gets its share of
  the work and no more. A reader holding a frame of payloads also waits (a bounded time)
  while the links the payloads would be forwarded on are congested, which carries a slow
  consumer's backpressure hop by hop back to the writers; the bound breaks the wait cycles
  a graph of links can form.
* **The node's own components** never block (they run protocol rules synchronously). What
  they cannot queue is reported, not dropped: an eager push that does not fit its link's
  outbox becomes a lazy push (the Plumtree core announces the message with an IHAVE, so the
  peer grafts it when it has room), and a subscriber that does not keep up loses events
  counted in its `Feed`, then receives a `Lagged(missed)` notice where they went missing
  (a replica answers it with a sync pull).

This module holds the three mechanisms; the link, node, broadcast and replica modules use
them. Nothing here does I/O; waits are plain Trio checkpoints.
"""

from __future__ import annotations

import collections
import enum
from collections.abc import Hashable
from typing import Generic, TypeVar

import attrs
import trio
from trio.lowlevel import ParkingLot, cancel_shielded_checkpoint, checkpoint_if_cancelled

from .errors import ConfigError
from .events import Lagged

T = TypeVar("T")

#: Label of counters that overflowed their bound on distinct keys (see `BoundedCounter`).
OTHER = "other"


class BoundedCounter(collections.Counter[str]):
    """A counter of at most `max_keys` distinct keys; later keys are counted under ``other``.

    For counters whose keys come from peers (tags, rounds): a flood of distinct keys must
    not grow memory, `status` replies or the Prometheus label set without bound.
    """

    def __init__(self, max_keys: int = 64) -> None:
        super().__init__()
        self.max_keys = max_keys

    def __setitem__(self, key: str, value: int) -> None:
        if key not in self and key != OTHER and len(self) >= self.max_keys - 1:
            # A new key adds `value` to a missing (zero) count: add it to ``other`` instead.
            key, value = OTHER, self.get(OTHER, 0) + value
        super().__setitem__(key, value)


@attrs.frozen
class FlowConfig:
    """Bounds of a node's inboxes, subscribers and dial queues, and its backpressure waits.

    The link outboxes are bounded by `LinkConfig`, the broadcast payload cache by
    `PlumtreeConfig.cache_max_bytes`; README "Flow control" adds them up to the node's
    memory ceiling.
    """

    #: Inputs one peer may have waiting in a component's inbox. Its reader stops reading
    #: beyond this (the peer is slowed, the TCP way); components serve peers round-robin.
    inbox_items_per_peer: int = 256
    #: Bytes one peer may have waiting in a component's inbox (at least one largest frame
    #: is always admitted when the peer has nothing waiting).
    inbox_bytes_per_peer: int = 2 * 1024 * 1024
    #: Bytes of every peer's waiting inputs together, per component.
    inbox_bytes: int = 16 * 1024 * 1024
    #: Local broadcasts waiting in the broadcast component (the node's own writers' share).
    local_items: int = 256
    #: Longest a reader holds a frame of payloads while the links they go to are congested
    #: (then forwards anyway; what does not fit is announced lazily). Breaks wait cycles.
    forward_wait_max: float = 0.5
    #: Default bytes buffered for one subscription (deliveries or events); beyond it, and
    #: beyond `NodeConfig.subscriber_buffer` items, events are counted as missed.
    subscriber_bytes: int = 4 * 1024 * 1024
    #: Bytes of messages waiting for a link that is being dialed.
    dial_queue_bytes: int = 1024 * 1024

    def __attrs_post_init__(self) -> None:
        for name in (
            "inbox_items_per_peer",
            "inbox_bytes_per_peer",
            "inbox_bytes",
            "local_items",
            "subscriber_bytes",
            "dial_queue_bytes",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"flow.{name} must be at least 1")
        if not self.forward_wait_max >= 0:
            raise ConfigError("flow.forward_wait_max must be >= 0")
        if self.inbox_bytes < self.inbox_bytes_per_peer:
            raise ConfigError("flow.inbox_bytes must be at least flow.inbox_bytes_per_peer")


# --- pressure ------------------------------------------------------------------------------


class Pressure:
    """The node's buffers that are over their high-water mark right now.

    A buffer `hold`s the pressure when it crosses its mark and `release`s it when it drains
    below; writers `wait_clear` before they produce. `exclude` lets a link's reader ignore
    its own outbox: what it reads is never forwarded back on the link it came from, and
    waiting on it would make two busy peers wait for each other.
    """

    def __init__(self) -> None:
        self._holders: dict[Hashable, str] = {}
        self._changed = ParkingLot()
        #: Waits that found the node congested, by who waited.
        self.waits: collections.Counter[str] = collections.Counter()
        #: Seconds spent waiting, by who waited.
        self.waited: collections.defaultdict[str, float] = collections.defaultdict(float)

    def hold(self, key: Hashable, kind: str) -> None:
        self._holders.setdefault(key, kind)

    def release(self, key: Hashable) -> None:
        if self._holders.pop(key, None) is not None:
            self._changed.unpark_all()

    def is_clear(self, exclude: Hashable | None = None) -> bool:
        holders = self._holders
        return not holders or (len(holders) == 1 and exclude is not None and exclude in holders)

    def holders(self) -> collections.Counter[str]:
        """How many buffers hold the pressure, by kind (for `stats`)."""
        return collections.Counter(self._holders.values())

    async def wait_clear(self, who: str, exclude: Hashable | None = None) -> None:
        """Return once nothing but `exclude` is over its mark; a checkpoint either way."""
        await checkpoint_if_cancelled()
        if self.is_clear(exclude):
            await cancel_shielded_checkpoint()
            return
        self.waits[who] += 1
        start = trio.current_time()
        try:
            while not self.is_clear(exclude):
                await self._changed.park()
        finally:
            self.waited[who] += trio.current_time() - start


# --- fair inbox ----------------------------------------------------------------------------


@attrs.define(eq=False)
class _SourceQueue(Generic[T]):
    items: collections.deque[tuple[T, int]] = attrs.Factory(collections.deque)
    bytes: int = 0
    room: ParkingLot = attrs.Factory(ParkingLot)


class FairInbox(Generic[T]):
    """Inputs of one consumer from many sources, bounded per source, served round-robin.

    A source (a link, or a local producer) may have `source_items` inputs and
    `source_bytes` bytes waiting; all sources together `total_bytes`. An input that would
    pass a bound is refused by `put_nowait` and waited for by `put`, except that a source
    with nothing waiting is always admitted one input (so one large frame always fits).
    `put_forced` admits regardless, for producers that already waited elsewhere. `get`
    takes from the sources in turn, so one busy source cannot delay the others by more
    than one input each.
    """

    def __init__(self, *, source_items: int, source_bytes: int, total_bytes: int) -> None:
        self.source_items = source_items
        self.source_bytes = source_bytes
        self.total_bytes = total_bytes
        self._queues: dict[Hashable, _SourceQueue[T]] = {}
        #: Sources with inputs waiting, in serving order.
        self._turns: collections.deque[Hashable] = collections.deque()
        self._items = 0
        self._bytes = 0
        self._readable = ParkingLot()
        #: Producers waiting for the total bound (not their own share).
        self._room = ParkingLot()
        #: Inputs refused or waited for, because of the source's share or the total.
        self.throttled = 0

    def __len__(self) -> int:
        return self._items

    @property
    def bytes(self) -> int:
        return self._bytes

    def sources(self) -> int:
        return len(self._turns)

    def depth(self, source: Hashable) -> int:
        queue = self._queues.get(source)
        return len(queue.items) if queue is not None else 0

    def has_room(self, source: Hashable, size: int) -> bool:
        queue = self._queues.get(source)
        if queue is None or not queue.items:
            return True
        return (
            len(queue.items) < self.source_items
            and queue.bytes + size <= self.source_bytes
            and self._bytes + size <= self.total_bytes
        )

    def put_nowait(self, source: Hashable, item: T, size: int) -> bool:
        if not self.has_room(source, size):
            self.throttled += 1
            return False
        self.put_forced(source, item, size)
        return True

    async def put(self, source: Hashable, item: T, size: int) -> None:
        """Queue `item`, waiting while `source` is over its share or the inbox is full."""
        await self.wait_room(source, size)
        self.put_forced(source, item, size)

    async def wait_room(self, source: Hashable, size: int = 0) -> None:
        """Return once `source` may queue an input of `size` bytes; a checkpoint either way.

        Producers of one source are expected to take turns (a link has one reader); several
        waking at once may pass the bounds by one input each.
        """
        await checkpoint_if_cancelled()
        if self.has_room(source, size):
            await cancel_shielded_checkpoint()
            return
        self.throttled += 1
        while not self.has_room(source, size):
            queue = self._queues.get(source)
            if queue is not None and (
                len(queue.items) >= self.source_items or queue.bytes + size > self.source_bytes
            ):
                await queue.room.park()
            else:
                await self._room.park()

    def put_forced(self, source: Hashable, item: T, size: int) -> None:
        queue = self._queues.get(source)
        if queue is None:
            queue = self._queues[source] = _SourceQueue()
        if not queue.items:
            self._turns.append(source)
        queue.items.append((item, size))
        queue.bytes += size
        self._items += 1
        self._bytes += size
        self._readable.unpark()

    def get_nowait(self) -> T:
        if not self._turns:
            raise trio.WouldBlock
        source = self._turns.popleft()
        queue = self._queues[source]
        item, size = queue.items.popleft()
        queue.bytes -= size
        self._items -= 1
        was_full = self._bytes > self.total_bytes - self.source_bytes
        self._bytes -= size
        if queue.items:
            self._turns.append(source)
        elif not queue.room:
            # Nobody waits on it: forget the source (links come and go).
            del self._queues[source]
        if queue.room:
            queue.room.unpark()
        if was_full and self._room:
            self._room.unpark_all()
        return item

    async def get(self) -> T:
        await checkpoint_if_cancelled()
        while not self._turns:
            await self._readable.park()
        item = self.get_nowait()
        await cancel_shielded_checkpoint()
        return item

    async def wait(self) -> None:
        """Return once an input is waiting, or `wake` was called; a checkpoint either way."""
        if self._turns:
            await trio.lowlevel.checkpoint()
        else:
            await self._readable.park()

    def wake(self) -> None:
        """End a consumer's `wait` without an input (it has other work: notices, timers)."""
        self._readable.unpark_all()


# --- subscriber feeds ----------------------------------------------------------------------


class Offer(enum.Enum):
    """What became of an event offered to a `Feed`."""

    KEPT = "kept"
    MISSED = "missed"
    GONE = "gone"


class Feed(Generic[T]):
    """One subscriber's buffer: the source offers without ever waiting, the subscriber receives.

    Bounded by `max_items` and `max_bytes` (an event larger than `max_bytes` is kept when
    the buffer is empty). An event that does not fit is counted as missed, and the
    subscriber then receives a `Lagged(missed)` exactly where the events went missing.
    With `pressure`, the feed holds it while it is at least half full, so that the node's
    writers and readers slow down before this subscriber loses anything (replicas use
    this; an application's subscription does not, so a subscriber that stops reading never
    stalls the node).
    """

    def __init__(self, *, max_items: int, max_bytes: int, pressure: Pressure | None = None) -> None:
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._pressure = pressure
        self._items: collections.deque[tuple[T | Lagged, int]] = collections.deque()
        self._bytes = 0
        self._missed = 0
        self._lot = ParkingLot()
        self._source_closed = False
        self._receiver_closed = False
        #: Events missed in all (never reset; `Lagged` carries each run of misses).
        self.missed_total = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        return self._receiver_closed

    def offer(self, event: T, size: int = 0) -> Offer:
        """Keep `event` for the subscriber if it fits; never blocks."""
        if self._receiver_closed:
            return Offer.GONE
        if self._source_closed:
            raise trio.ClosedResourceError("the source closed this feed")
        items = self._items
        if items and (len(items) >= self.max_items or self._bytes + size > self.max_bytes):
            self._missed += 1
            self.missed_total += 1
            return Offer.MISSED
        if self._missed:
            items.append((Lagged(self._missed), 0))
            self._missed = 0
        items.append((event, size))
        self._bytes += size
        self._lot.unpark()
        self._check_pressure()
        return Offer.KEPT

    def note_missed(self, count: int) -> None:
        """Events this subscriber should have had were lost before reaching the source."""
        if self._receiver_closed or count <= 0:
            return
        self._missed += count
        self.missed_total += count
        self._lot.unpark()

    def close_source(self) -> None:
        """The source is gone (crashed or closing): the subscriber drains, then sees the end."""
        self._source_closed = True
        self._lot.unpark_all()
        self._release()

    def close(self) -> None:
        """The subscriber is done: drop what is buffered; the source forgets the feed."""
        self._receiver_closed = True
        self._items.clear()
        self._bytes = 0
        self._lot.unpark_all()
        self._release()

    def receive_nowait(self) -> T | Lagged:
        if self._receiver_closed:
            raise trio.ClosedResourceError("this feed was closed")
        if self._items:
            event, size = self._items.popleft()
            self._bytes -= size
            self._check_pressure()
            return event
        if self._missed:
            # The losses came after everything delivered: say so before waiting for more.
            missed, self._missed = self._missed, 0
            return Lagged(missed)
        if self._source_closed:
            raise trio.EndOfChannel
        raise trio.WouldBlock

    async def receive(self) -> T | Lagged:
        """The next event, a `Lagged` notice, or `trio.EndOfChannel` once the source closed."""
        await checkpoint_if_cancelled()
        while True:
            try:
                event = self.receive_nowait()
            except trio.WouldBlock:
                await self._lot.park()
                continue
            await cancel_shielded_checkpoint()
            return event

    def __aiter__(self) -> Feed[T]:
        return self

    async def __anext__(self) -> T | Lagged:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    def _check_pressure(self) -> None:
        if self._pressure is None:
            return
        if 2 * len(self._items) >= self.max_items or 2 * self._bytes >= self.max_bytes:
            self._pressure.hold(self, "subscriber")
        else:
            self._pressure.release(self)

    def _release(self) -> None:
        if self._pressure is not None:
            self._pressure.release(self)


class Fanout(Generic[T]):
    """The feeds of one source's subscribers: offer each event to all, forget the gone ones.

    One loop for the membership events, the broadcast deliveries of a tag and a map's
    change events; every event a subscriber misses is counted by `on_missed`.
    """

    def __init__(self) -> None:
        self.feeds: list[Feed[T]] = []

    def __len__(self) -> int:
        return len(self.feeds)

    def add(self, feed: Feed[T]) -> None:
        self.feeds.append(feed)

    def discard(self, feed: Feed[T]) -> None:
        if feed in self.feeds:
            self.feeds.remove(feed)

    def publish(self, event: T, size: int = 0) -> int:
        """Offer `event` to every feed; return how many missed it."""
        missed = 0
        gone = False
        for feed in self.feeds:
            outcome = feed.offer(event, size)
            if outcome is Offer.MISSED:
                missed += 1
            elif outcome is Offer.GONE:
                gone = True
        if gone:
            self.feeds = [feed for feed in self.feeds if not feed.closed]
        return missed

    def close_all(self) -> None:
        """The source died: every subscriber sees its feed end (then re-subscribes)."""
        for feed in self.feeds:
            feed.close_source()
        self.feeds = []
