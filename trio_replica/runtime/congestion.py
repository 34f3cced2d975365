"""Congestion signals and the limits that answer them: queueing delay, pacing, origination.

The node's flow control as a whole is described in `trio_replica.runtime.flow`; this
module measures congestion from deliveries and holds writers or peers to a pace.

Queueing delay. A message id carries its origin's clock, so each delivery gives a one-way
delay; its excess over the smallest delay seen recently from that origin is time spent in
queues, clock offsets cancelling out (LEDBAT's method, RFC 6817). `QueueingDelay` filters
it with minima, per origin and then over origins, so that neither a burst of late messages
from one origin nor a member stamping its messages in the past moves it. It lengthens
Plumtree's repair timers (`Plumtree.set_delay_allowance`: a payload that is only queued
must not be grafted, or it is duplicated), tells a first hop the cluster is congested,
and can pace the node's writers (`WritePacer`, `delay_target`). Pacing is off by default:
with one tree per origin and timers that allow for queueing it is not what keeps the tree
whole (10 writers at full speed: RMR 0.01-0.02 after a warm-up either way), and writers
that yield to delay only leave more room to a member that does not.
"""

from __future__ import annotations

import collections
import math
import random
from collections.abc import Hashable

import attrs
import trio

from ..core.tokens import TokenBucket


@attrs.define
class _Origin:
    """What `QueueingDelay` keeps per origin."""

    #: Smallest delay this history period, and in the one before.
    base_now: float
    base_before: float
    period: int
    #: Its last few queueing samples, their minimum, and when the last came (local ms).
    recent: collections.deque[float]
    last_ms: int
    low: float = 0.0


class QueueingDelay:
    """Queueing delay of deliveries, from one-way delays (module docstring; LEDBAT's method).

    `observe(origin, sent_ms, now_ms)` takes a delivery's origin, the wall time in its id
    and the local wall time; the delay minus the smallest one from that origin in the last
    one to two `history` periods is that delivery's queueing. As in LEDBAT, samples are
    filtered by taking minima: per origin over its last `window` samples, then over the
    origins heard from in the last `recent` ms. When queues build here every origin's
    deliveries are late; a burst of late messages from one origin (repaired upstream) is
    not, and neither is an origin that stamps its messages in the past to make this node's
    writers slow down: one origin can only raise its own value. Delays beyond `max_skew`
    either way are not samples (a stamp that far off is a clock problem or a lie).
    `current_ms` is the filtered delay, `recent_max_ms` its largest value of the last
    second or so. Sans-IO: times come from the caller; at most `max_origins` origins.
    """

    def __init__(
        self,
        *,
        history: float = 60.0,
        window: int = 4,
        recent: float = 1.0,
        max_skew: float = 60.0,
        max_origins: int = 1024,
    ) -> None:
        self._history_ms = history * 1000
        self._window = window
        self._recent_ms = recent * 1000
        self._max_skew_ms = max_skew * 1000
        self._max_origins = max_origins
        self._origins: collections.OrderedDict[str, _Origin] = collections.OrderedDict()
        #: The filtered queueing delay, in ms.
        self.current_ms = 0.0
        self._computed_ms = -math.inf
        # The origin with the lowest value, and the next lowest value (`excluding`).
        self._lowest_origin = ""
        self._second_ms = 0.0
        # Largest filtered delay in the current and the previous half second.
        self._max_now = self._max_before = 0.0
        self._max_slot = 0
        self.samples = 0
        #: Deliveries whose stamp was too far from our clock to be a sample.
        self.implausible = 0

    @property
    def recent_max_ms(self) -> float:
        """The largest filtered queueing delay of the last half second to second."""
        return max(self._max_now, self._max_before)

    def excluding(self, origin: str) -> float:
        """The filtered delay without `origin`'s deliveries (ms): the congestion the others'
        traffic meets. Near its first hop a flooding origin's own messages are the least
        delayed of all, and would hide the congestion it causes."""
        return self._second_ms if origin == self._lowest_origin else self.current_ms

    def observe(self, origin: str, sent_ms: int, now_ms: int) -> float:
        delay = float(now_ms - sent_ms)
        if abs(delay) > self._max_skew_ms:
            self.implausible += 1
            return self.current_ms
        period = int(now_ms // self._history_ms)
        state = self._origins.get(origin)
        if state is None:
            if len(self._origins) >= self._max_origins:
                self._origins.popitem(last=False)
            state = _Origin(delay, delay, period, collections.deque(maxlen=self._window), now_ms)
            self._origins[origin] = state
        else:
            if period != state.period:
                state.base_before = state.base_now if period == state.period + 1 else delay
                state.base_now, state.period = delay, period
            state.base_now = min(state.base_now, delay)
            self._origins.move_to_end(origin)
        recent = state.recent
        recent.append(delay - min(state.base_now, state.base_before))
        # Kept as samples come (a few at most), so the pass over origins below only compares.
        state.low = min(recent)
        state.last_ms = now_ms
        self.samples += 1
        # The minimum over origins costs one pass over them: at most every 20 ms.
        if now_ms - self._computed_ms >= 20:
            self._computed_ms = now_ms
            horizon = now_ms - self._recent_ms
            lowest, lowest_origin, second = math.inf, "", math.inf
            # Most recently heard first (the dict is kept in that order): stop at the first
            # origin not heard from lately.
            for name, state in reversed(self._origins.items()):
                if state.last_ms < horizon:
                    break
                value = state.low
                if value < lowest:
                    lowest, lowest_origin, second = value, name, lowest
                elif value < second:
                    second = value
            self.current_ms = lowest if lowest != math.inf else 0.0
            self._lowest_origin = lowest_origin
            self._second_ms = second if second != math.inf else self.current_ms
        slot = int(now_ms // 500)
        if slot != self._max_slot:
            self._max_before = self._max_now if slot == self._max_slot + 1 else 0.0
            self._max_now, self._max_slot = 0.0, slot
        self._max_now = max(self._max_now, self.current_ms)
        return self.current_ms


class WritePacer:
    """Spaces the node's writes so that the queueing delay of deliveries stays near `target`.

    Each delivery's filtered queueing delay (`QueueingDelay`) stretches the interval
    between two local writes in proportion to how far it is above the target, and shrinks
    it as far as it is below, a little per sample (LEDBAT adjusts its window the same way);
    the interval is 0 (no pacing) until the delay first passes the target. A write waits
    for its turn in `wait_turn`. Smooth on purpose: the delay shows only once the queue has
    formed, and stop-and-go pauses overshoot both ways.
    """

    #: Per-sample gain: at twice the target, 35 samples double the interval.
    GAIN = 0.02
    MIN_INTERVAL = 0.0001

    def __init__(self, *, target: float, max_interval: float, rng: random.Random) -> None:
        self.target = target
        self.max_interval = max_interval
        self._rng = rng
        self.interval = 0.0
        self._next = -math.inf
        #: Seconds writes waited for their turn, in all.
        self.waited = 0.0

    def sample(self, queueing: float) -> None:
        """One delivery's filtered queueing delay, in seconds."""
        if self.target <= 0:
            return
        ratio = min(max((queueing - self.target) / self.target, -1.0), 4.0)
        if ratio > 0:
            interval = max(self.interval, self.MIN_INTERVAL) * (1 + self.GAIN * ratio)
            self.interval = min(interval, self.max_interval)
        elif self.interval:
            self.interval *= 1 + self.GAIN * ratio
            if self.interval < self.MIN_INTERVAL:
                self.interval = 0.0

    async def wait_turn(self) -> None:
        """Return at this write's turn (a checkpoint either way)."""
        now = trio.current_time()
        turn = max(now, self._next)
        # Jittered +-50%: paced alike, the writers of all nodes would fall into step and
        # broadcast all at once.
        self._next = turn + self.interval * (0.5 + self._rng.random())
        if turn > now:
            self.waited += turn - now
            await trio.sleep_until(turn)
        else:
            await trio.lowlevel.checkpoint()


class OriginationLimit:
    """How fast each peer may originate broadcasts through this node (`flow` docstring).

    Token buckets per peer, one for broadcasts and one for their bytes, each holding one
    second of its rate. `admit(peer, size)` returns at once while the peer is within both,
    and otherwise sleeps until it is (its reader then reads nothing meanwhile). Sans-IO but
    for that sleep; `rate` 0 turns the limit off.
    """

    def __init__(self, *, rate: float, bytes_rate: float) -> None:
        self.rate = rate
        self.bytes_rate = bytes_rate
        #: Per peer: (broadcasts, bytes), each holding one second of its rate.
        self._buckets: dict[Hashable, tuple[TokenBucket, TokenBucket]] = {}
        #: Broadcasts that had to wait, and the seconds they waited, in all.
        self.limited = 0
        self.waited = 0.0

    async def admit(self, peer: Hashable, size: int) -> None:
        if not self.rate:
            return
        now = trio.current_time()
        buckets = self._buckets.get(peer)
        if buckets is None:
            buckets = self._buckets[peer] = (
                TokenBucket(rate=self.rate, capacity=self.rate),
                TokenBucket(rate=self.bytes_rate, capacity=self.bytes_rate),
            )
        messages, octets = buckets
        # A broadcast larger than a second's bytes goes once the bucket is full.
        wait = max(messages.take(1, now), octets.take(min(size, self.bytes_rate), now))
        if wait > 0:
            self.limited += 1
            self.waited += wait
            await trio.sleep(wait)

    def forget(self, peer: Hashable) -> None:
        self._buckets.pop(peer, None)
