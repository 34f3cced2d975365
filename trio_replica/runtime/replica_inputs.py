"""What feeds a replica driver's inbox on its own: the instance's broadcast subscription
(`pump_broadcast`), the node's membership events (`pump_membership`) and the core's timers
(`TimerQueue`). Each runs as a task of the driver's current life and only queues inputs;
the driver's one task handles them (`trio_replica.runtime.replica`).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Hashable
from typing import Any

import trio

from ..core.events import Delivery
from .inbox import FairInbox
from .services import Publishing

#: Inputs handled (and deliveries moved to the inbox) per wake-up of a driver's tasks: a
#: wake-up per delivery made a busy driver fall behind its own broadcast component.
DRAIN_BATCH = 64

#: A driver's inbox: (kind, data) inputs.
Inbox = FairInbox[tuple[str, Any]]


async def pump_broadcast(
    node: Publishing,
    tag: str,
    buffer: int,
    inbox: Inbox,
    *,
    task_status: trio.TaskStatus[None],
) -> None:
    """Move the deliveries of broadcast `tag` into `inbox`, as ``("delivery", item)``."""
    # Backpressure: a driver that falls behind slows the node before it misses anything.
    async with node.subscribe(tag, buffer=buffer, backpressure=True) as sub:
        task_status.started()
        while True:
            try:
                batch = [await sub.receive()]
            except trio.EndOfChannel:
                return
            # What is already buffered moves in the same wake-up.
            while len(batch) < DRAIN_BATCH:
                try:
                    batch.append(sub.receive_nowait())
                except trio.WouldBlock:
                    break
            for item in batch:
                size = len(item.payload) if isinstance(item, Delivery) else 0
                entry = ("delivery", item)
                if not inbox.put_nowait("delivery", entry, size):
                    await inbox.put("delivery", entry, size)


async def pump_membership(
    node: Publishing, inbox: Inbox, *, task_status: trio.TaskStatus[None]
) -> None:
    """Move the node's membership events into `inbox`, as ``("membership", event)``."""
    async with node.events() as events:
        task_status.started()
        async for event in events:
            await inbox.put("membership", ("membership", event), 0)


class TimerQueue:
    """The core's armed timers (`SetTimer`), handed back to the driver's inbox as
    ``("timer", (generation, timer))`` when they fall due (`run`). `clear` starts a new
    generation: a tick of the old one still waiting in the inbox is not the new core's."""

    def __init__(self, inbox: Inbox) -> None:
        self._inbox = inbox
        self._timers: list[tuple[float, int, Hashable]] = []
        self._timer_seq = itertools.count()
        self._timers_changed = trio.Event()
        self.generation = 0

    def set(self, delay: float, timer: Hashable) -> None:
        """Arm `timer` to fall due `delay` seconds from now."""
        when = trio.current_time() + delay
        heapq.heappush(self._timers, (when, next(self._timer_seq), timer))
        self._timers_changed.set()

    def clear(self) -> None:
        """Forget every armed timer (a fresh core does not know the old one's)."""
        self._timers.clear()
        self._timers_changed = trio.Event()
        self.generation += 1

    async def run(self) -> None:
        """Hand the core's timers back to the driver task when they fall due."""
        while True:
            changed = self._timers_changed
            deadline = self._timers[0][0] if self._timers else math.inf
            with trio.move_on_at(deadline):
                await changed.wait()
            if changed.is_set():
                self._timers_changed = trio.Event()
            now = trio.current_time()
            while self._timers and self._timers[0][0] <= now:
                _, _, timer = heapq.heappop(self._timers)
                await self._inbox.put("tick", ("timer", (self.generation, timer)), 0)
