"""The fair inbox: a component's inputs from many sources, bounded per source, served in turn.

How it slows peers and local producers: `trio_replica.runtime.flow`.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

import attrs
import trio
from trio.lowlevel import ParkingLot, cancel_shielded_checkpoint, checkpoint_if_cancelled

from .flow import Pressure

T = TypeVar("T")


#: Told when an input that carried link credit leaves a `FairInbox` (source, credit).
OnTaken = Callable[[Hashable, int], None]


@attrs.define(eq=False)
class _SourceQueue(Generic[T]):
    #: (input, size, credit) in arrival order.
    items: collections.deque[tuple[T, int, int]] = attrs.Factory(collections.deque)
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
    than one input each. An input may carry `credit` (the bytes of a payload message whose
    link grants credit back once it is processed): `on_taken(source, credit)` is called
    when it leaves the inbox.
    """

    def __init__(
        self,
        *,
        source_items: int,
        source_bytes: int,
        total_bytes: int,
        pressure: Pressure | None = None,
        high_items: int = 0,
        on_taken: OnTaken | None = None,
    ) -> None:
        self._on_taken = on_taken
        self.source_items = source_items
        self.source_bytes = source_bytes
        self.total_bytes = total_bytes
        #: With `pressure`: held while `high_items` or more inputs wait (the consumer is
        #: behind: producers that can wait should).
        self._pressure = pressure
        self._high_items = high_items
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
        #: Set by `close`: inputs are dropped on arrival, their credit returned.
        self.closed = False

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
        if self.closed or queue is None or not queue.items:
            return True
        return (
            len(queue.items) < self.source_items
            and queue.bytes + size <= self.source_bytes
            and self._bytes + size <= self.total_bytes
        )

    def put_nowait(self, source: Hashable, item: T, size: int, credit: int = 0) -> bool:
        if not self.has_room(source, size):
            self.throttled += 1
            return False
        self.put_forced(source, item, size, credit)
        return True

    async def put(self, source: Hashable, item: T, size: int, credit: int = 0) -> None:
        """Queue `item`, waiting while `source` is over its share or the inbox is full."""
        await self.wait_room(source, size)
        self.put_forced(source, item, size, credit)

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

    def put_forced(self, source: Hashable, item: T, size: int, credit: int = 0) -> None:
        if self.closed:
            if credit and self._on_taken is not None:
                self._on_taken(source, credit)
            return
        queue = self._queues.get(source)
        if queue is None:
            queue = self._queues[source] = _SourceQueue()
        if not queue.items:
            self._turns.append(source)
        queue.items.append((item, size, credit))
        queue.bytes += size
        self._items += 1
        self._bytes += size
        self._readable.unpark()
        if self._pressure is not None and self._items >= self._high_items:
            self._pressure.hold(self, "inbox")

    def get_nowait(self) -> T:
        if not self._turns:
            raise trio.WouldBlock
        source = self._turns.popleft()
        queue = self._queues[source]
        item, size, credit = queue.items.popleft()
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
        if self._pressure is not None and self._items < self._high_items:
            self._pressure.release(self)
        if credit and self._on_taken is not None:
            self._on_taken(source, credit)
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

    def close(self) -> int:
        """The consumer is gone for good: drop what waits and what comes from now on,
        returning their link credit (a payload dropped unprocessed must still be granted
        back, or its link's sender runs out of credit and stops sending anything), and
        wake every producer waiting for room. Returns how many inputs were dropped."""
        self.closed = True
        dropped = 0
        while self._turns:
            self.get_nowait()  # returns the credit
            dropped += 1
        for queue in self._queues.values():
            queue.room.unpark_all()
        self._room.unpark_all()
        return dropped

    def wake(self) -> None:
        """End a consumer's `wait` without an input (it has other work: notices, timers)."""
        self._readable.unpark_all()
