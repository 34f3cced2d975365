"""Subscriber feeds: one bounded buffer per subscriber (`Feed`), and the fan-out to them all.

A source offers without ever waiting; a subscriber that does not keep up loses events,
counted, then receives `Lagged(missed)` where they went missing (`trio_replica.runtime.flow`).
"""

from __future__ import annotations

import collections
import enum
from typing import Generic, TypeVar

import trio
from trio.lowlevel import ParkingLot, cancel_shielded_checkpoint, checkpoint_if_cancelled

from ..core.events import Lagged
from .flow import Pressure

T = TypeVar("T")


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
