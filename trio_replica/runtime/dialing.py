"""How fast a node opens connections: the budget every dial draws on.

This module owns `DialBudget`, a token bucket (`flow.TokenBucket`) with jitter. Dials and
handshakes are the dearest thing a node does (a TCP connection, a websocket upgrade and an
HMAC handshake on both ends, hundreds of microseconds of CPU each); membership asks for
them in bursts (a node whose neighbours failed asks several passive peers at once).
Unbounded, those bursts saturated the loop of a 100-node process, the timeouts of live
links then fired, each failure asked for more dials: the overlay collapsed (issue 13).
With a budget, a burst waits its turn instead; the wait is jittered so that nodes started
together do not dial in lock-step.
"""

from __future__ import annotations

import random

import trio

from ..core.tokens import TokenBucket

__all__ = ["DialBudget"]


class DialBudget:
    """At most `rate` dials a second, bursts of `burst`; `rate` 0 is no limit."""

    def __init__(self, *, rate: float, burst: int, rng: random.Random) -> None:
        self._bucket = TokenBucket(rate=rate, capacity=burst) if rate else None
        self._rng = rng
        #: Dials that had to wait for the budget, and the seconds they waited in all.
        self.delayed = 0
        self.waited = 0.0

    async def acquire(self) -> None:
        """Take one dial from the budget, waiting (jittered) until there is one."""
        bucket = self._bucket
        wait = 0.0 if bucket is None else bucket.take(1, trio.current_time())
        if not wait:
            await trio.lowlevel.checkpoint()
            return
        # Our turn comes when the debt is repaid; up to one more interval of jitter.
        assert bucket is not None
        wait += self._rng.random() / bucket.rate
        self.delayed += 1
        self.waited += wait
        await trio.sleep(wait)
