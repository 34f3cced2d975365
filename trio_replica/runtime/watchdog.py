"""Owner callbacks of a replica driver, and the watchdog that ends a life they hang.

A callback (`merge_delta`, `apply_full_sync`, ...) runs on the driver's task: one that
never returns would stall the instance for good. `CallbackWatch.call` records which
callback runs since when; `CallbackWatch.run`, a task of each life of the driver, ends
that life (`cancel`) once one has run longer than `callback_timeout`, and the driver
restarts (`replica.py`). Hung means past the timeout on Trio's clock *and* on the wall
clock: Trio's may be virtual (an autojump clock races ahead while a store's thread
writes to disk), the wall clock is not; and the timeout stretches while the loop lags
(health.py: a slow loop is not a hung callback).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

from ..errors import CallbackHung
from .health import LoopHealth

T = TypeVar("T")


class CallbackWatch:
    """The owner callbacks of one replica instance (module docstring)."""

    def __init__(self, name: str, timeout: float, health: LoopHealth) -> None:
        self._name = name
        self._timeout = timeout
        self._health = health
        #: The callback running now: (its name, since on Trio's clock, since on the wall).
        self._running: tuple[str, float, float] | None = None
        #: The driver's task of the current life: only its callbacks are watched (a
        #: tool's `compare_with` runs them on its own task, which a hang cannot restart).
        self.watched: trio.lowlevel.Task | None = None

    async def call(self, what: str, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Await ``fn(instance name, *args)``, watched on the driver's own task."""
        if trio.lowlevel.current_task() is not self.watched:
            return await fn(self._name, *args)
        self._running = (what, trio.current_time(), time.monotonic())
        try:
            return await fn(self._name, *args)
        finally:
            self._running = None

    async def run(self, cancel: Callable[[CallbackHung], None]) -> None:
        """Watch until cancelled; call `cancel` (once) with the error when one hangs."""
        base = self._timeout
        while True:
            await trio.sleep(base / 4)
            current = self._running
            if current is None:
                continue
            what, since, wall_since = current
            limit = self._health.timeout(base)
            if trio.current_time() - since >= limit and time.monotonic() - wall_since >= limit:
                cancel(CallbackHung(f"callback {what} did not return within {limit:g} s"))
                return


def hung_error(exc: BaseException) -> CallbackHung | None:
    """`exc` (or the one error of a task group) if it is a `CallbackHung`."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, CallbackHung) else None
