"""A token bucket, sans-IO: the caller gives the time.

Shared by the runtime's flow control (`trio_replica.runtime.congestion`) and the replica
core's limits on what a peer may ask of us (`core.replication`).
"""

from __future__ import annotations

import math

__all__ = ["TokenBucket"]


class TokenBucket:
    """`rate` tokens a second, at most `capacity` saved (full at first). Sans-IO: the caller
    gives the time. A take may run into debt; it returns how long until the debt is paid,
    which is how long the taker should wait."""

    def __init__(self, *, rate: float, capacity: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self._at: float | None = None

    def _refill(self, now: float) -> None:
        if self._at is not None:
            self.tokens = min(self.capacity, self.tokens + (now - self._at) * self.rate)
        self._at = now

    def take(self, amount: float, now: float) -> float:
        self._refill(now)
        self.tokens -= amount
        return max(0.0, -self.tokens / self.rate)

    def try_take(self, amount: float, now: float) -> bool:
        """Take `amount` only if it is there (no debt): a refusal, not a wait."""
        self._refill(now)
        if amount > self.tokens:
            return False
        self.tokens -= amount
        return True

    @property
    def last_used(self) -> float:
        return -math.inf if self._at is None else self._at
