"""Subscriptions that survive the restart of their source.

A source (the membership or the broadcast component) hands each subscriber a bounded
memory channel. When the source crashes it closes every channel it handed out (SPEC
section 9: the subscriber *sees* its source die). A `Subscription` is the subscriber side:
on that close it re-subscribes, retrying with bounded backoff until the source runs again,
and yields a `Resubscribed` notice so the application can recover what it may have missed
(a replica asks its peers for a full sync). The application never has to write the retry.

A subscriber that does not keep up loses events once its buffer is full; each loss is
counted by the source (``drops["subscriber_full"]``), and the source is never stalled.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

import trio

from .events import Event, Resubscribed

T = TypeVar("T", bound=Event)


class Subscription(Generic[T]):
    """An async iterator of events from one source; re-subscribes after a source crash.

    `attach()` returns a fresh receive channel from the running source, or None while the
    source is down; `closed()` tells whether the whole node is closing (then iteration ends).
    """

    backoff_min = 0.01
    backoff_max = 1.0

    def __init__(
        self,
        source: str,
        attach: Callable[[], trio.MemoryReceiveChannel[T] | None],
        closed: Callable[[], bool],
    ) -> None:
        self.source = source
        self._attach = attach
        self._closed = closed
        # None while the source is restarting: the first receive() attaches then.
        self._channel: trio.MemoryReceiveChannel[T] | None = attach()
        self.resubscriptions = 0

    async def receive(self) -> T | Resubscribed:
        """The next event, or a `Resubscribed` notice after the source restarted."""
        if self._channel is not None:
            try:
                return await self._channel.receive()
            except trio.EndOfChannel:
                pass
            if self._closed():
                raise trio.EndOfChannel
        backoff = self.backoff_min
        while True:
            channel = self._attach()
            if channel is not None:
                self._channel = channel
                self.resubscriptions += 1
                return Resubscribed(self.source)
            if self._closed():
                raise trio.EndOfChannel
            await trio.sleep(backoff)
            backoff = min(backoff * 2, self.backoff_max)

    def __aiter__(self) -> Subscription[T]:
        return self

    async def __anext__(self) -> T | Resubscribed:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
