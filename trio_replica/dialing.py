"""How fast a node opens connections: the budget every dial draws on.

This module owns `DialBudget`, a token bucket with jitter. Dials and handshakes are the
dearest thing a node does (a TCP connection, a websocket upgrade and an HMAC handshake on
both ends, hundreds of microseconds of CPU each); membership asks for them in bursts (a
node whose neighbours failed asks several passive peers at once, and every shuffle reply
needs a link). Unbounded, those bursts saturated the loop of a 100-node process, the
timeouts of live links then fired, each failure asked for more dials: the overlay
collapsed (issue 13). With a budget, a burst waits its turn instead; the wait is jittered
so that nodes started together do not dial in lock-step.
"""

from __future__ import annotations

import random

import trio

__all__ = ["DialBudget"]


class DialBudget:
    """At most `rate` dials a second, bursts of `burst`; `rate` 0 is no limit."""

    def __init__(self, *, rate: float, burst: int, rng: random.Random) -> None:
        self.rate = rate
        self.burst = burst
        self._rng = rng
        self._tokens = float(burst)
        self._at: float | None = None
        #: Dials that had to wait for the budget, and the seconds they waited in all.
        self.delayed = 0
        self.waited = 0.0

    async def acquire(self) -> None:
        """Take one dial from the budget, waiting (jittered) until there is one."""
        if not self.rate:
            await trio.lowlevel.checkpoint()
            return
        now = trio.current_time()
        if self._at is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        self._tokens -= 1
        if self._tokens >= 0:
            await trio.lowlevel.checkpoint()
            return
        # Our turn comes when the debt is repaid; up to one more interval of jitter.
        wait = (-self._tokens + self._rng.random()) / self.rate
        self.delayed += 1
        self.waited += wait
        await trio.sleep(wait)
