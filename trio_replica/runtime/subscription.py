"""Subscriptions that survive the restart of their source and say what they missed.

A source (the membership or the broadcast component, a map) hands each subscriber a
bounded `Feed` (`trio_replica.runtime.feeds`). The source never waits for a subscriber: an
event that does not fit is counted, and the subscriber receives a `Lagged(missed)` notice
exactly where events went missing. When the source crashes it closes every feed it handed out
(SPEC section 9: the subscriber *sees* its source die). A `Subscription` is the subscriber
side: on that close it re-subscribes, retrying with bounded backoff until the source runs
again, and yields a `Resubscribed` notice so the application can recover what it may have
missed (a replica asks its peers for a sync on either notice). The application never has
to write the retry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

import trio

from ..core.events import Event, Lagged, Resubscribed
from .feeds import Feed

T = TypeVar("T", bound=Event)


class Subscription(Generic[T]):
    """An async iterator of events from one source; re-subscribes after a source crash.

    `attach()` returns a fresh feed from the running source, or None while the source is
    down; `closed()` tells whether the whole node is closing (then iteration ends). Besides
    the source's events it yields `Lagged` (this subscriber fell behind and lost events)
    and `Resubscribed` (the source restarted) notices.
    """

    backoff_min = 0.01
    backoff_max = 1.0

    def __init__(
        self,
        source: str,
        attach: Callable[[], Feed[T] | None],
        closed: Callable[[], bool],
    ) -> None:
        self.source = source
        self._attach = attach
        self._closed = closed
        # None while the source is restarting: the first receive() attaches then.
        self._feed: Feed[T] | None = attach()
        self.resubscriptions = 0

    async def receive(self) -> T | Lagged | Resubscribed:
        """The next event, a `Lagged` notice, or a `Resubscribed` notice after a restart."""
        if self._feed is not None:
            try:
                return await self._feed.receive()
            except trio.EndOfChannel:
                pass
            if self._closed():
                raise trio.EndOfChannel
        backoff = self.backoff_min
        while True:
            feed = self._attach()
            if feed is not None:
                self._feed = feed
                self.resubscriptions += 1
                return Resubscribed(self.source)
            if self._closed():
                raise trio.EndOfChannel
            await trio.sleep(backoff)
            backoff = min(backoff * 2, self.backoff_max)

    def receive_nowait(self) -> T | Lagged:
        """An event already buffered, or `trio.WouldBlock` (also while re-attaching: the
        async `receive` does that)."""
        if self._feed is None:
            raise trio.WouldBlock
        try:
            return self._feed.receive_nowait()
        except trio.EndOfChannel:
            raise trio.WouldBlock from None

    def __aiter__(self) -> Subscription[T]:
        return self

    async def __anext__(self) -> T | Lagged | Resubscribed:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    def close(self) -> None:
        if self._feed is not None:
            self._feed.close()
