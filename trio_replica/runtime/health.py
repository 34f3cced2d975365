"""The event loop's own health: how late it runs, and how much slack that earns timeouts.

This module owns `LoopHealth`, the measure every failure detector of a node consults
before it blames a peer (learned from Lifeguard, memberlist's extension to SWIM: a member
whose own process is slow must not read its slowness as its peers' death).

Measure. One task per Trio run (nodes in one process share the loop, so they share one
`LoopHealth`) sleeps `sample_interval` and records how much later than asked it woke: the
loop's lag, which is how long every other task waited for its turn, a frame's reader
included. While the samples stay under `tolerance` it samples every `quiet_interval`
instead: an idle process wakes 4 times a second for this, not 10 (with 200 nodes in 200
processes on 2 cores every idle wake-up counts), and the first late sample brings the
short period back. A stall (a long synchronous step) shows as one large sample; an overloaded loop
as many moderate ones. `recent_lag` is the largest sample, decayed with a half-life of
`half_life` seconds, so a 6 s stall keeps timeouts long for a while after it and a steady
lag keeps them stretched as long as it lasts. Samples go to a histogram and a maximum
(exported in `/metrics` as ``trio_replica_loop_lag_seconds``).

Use. `timeout(base)` is a deadline stretched by local health: ``base + slack * lag``, where
`lag` is the larger of our recent lag and what the peer says of its own (pings carry it),
capped at ``max_stretch * base``. While the loop is healthy (lag under `tolerance`) it is
`base` exactly, so a dead peer is still found in a few seconds. Links (idle and send
timeouts), handshakes, dials and membership's exchange timeouts go through it.

Sharing the task. Every node runs `serve`; the first one to arrive samples, the others
wait on an event and one of them takes over when the sampling node closes. No task lives
outside a node's nursery.
"""

from __future__ import annotations

import math

import attrs
import trio
from trio.lowlevel import RunVar

from ..errors import ConfigError

__all__ = ["LAG_BUCKETS", "HealthConfig", "LoopHealth", "loop_health"]

#: Upper bounds (seconds) of the lag histogram's buckets.
LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@attrs.frozen
class HealthConfig:
    """How the loop is sampled and how far its lag stretches timeouts."""

    #: Period of the lag sample while the loop lags. A stall shows as a lag of at least its
    #: length minus one period; a shorter period costs wake-ups.
    sample_interval: float = 0.1
    #: Period while the last sample was under `tolerance` (a healthy loop): fewer idle
    #: wake-ups; a stall that starts then is still seen, as a lag of its length minus this.
    quiet_interval: float = 0.25
    #: Lag under this is scheduling noise: timeouts are not stretched at all.
    tolerance: float = 0.05
    #: Seconds of extra deadline per second of lag: a reader that waited `lag` for its turn
    #: may have missed a few turns (a peer's ping, then our read of it).
    slack: float = 4.0
    #: A stretched timeout is at most this many times its base (Lifeguard caps its local
    #: health multiplier at 8).
    max_stretch: float = 8.0
    #: Half-life of `recent_lag`: how long a stall keeps timeouts long after it ended.
    half_life: float = 5.0

    def __attrs_post_init__(self) -> None:
        for name in ("sample_interval", "quiet_interval", "tolerance", "half_life"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"health.{name} must be positive, not {value}")
        if not (math.isfinite(self.slack) and self.slack >= 0):
            raise ConfigError(f"health.slack must be >= 0, not {self.slack}")
        if not (math.isfinite(self.max_stretch) and self.max_stretch >= 1):
            raise ConfigError(f"health.max_stretch must be >= 1, not {self.max_stretch}")


class LoopHealth:
    """The lag of one Trio run's event loop (module docstring)."""

    def __init__(self, config: HealthConfig | None = None) -> None:
        self.config = config or HealthConfig()
        self._peak = 0.0  # largest recent sample, as of `_peak_at`
        self._peak_at = 0.0
        self.max_lag = 0.0
        self.samples = 0
        self.lag_sum = 0.0
        #: Sample counts per bucket of `LAG_BUCKETS` (the last one: above every bound).
        self.buckets = [0] * (len(LAG_BUCKETS) + 1)
        self._sampling = False
        self._vacancy = trio.Event()

    # --- reading ------------------------------------------------------------------------

    def recent_lag(self, now: float | None = None) -> float:
        """The largest recent lag, halved every `half_life` seconds since it was seen."""
        if self._peak <= 0:
            return 0.0
        if now is None:
            now = trio.current_time()
        age = max(0.0, now - self._peak_at)
        return float(self._peak * 0.5 ** (age / self.config.half_life))

    def timeout(self, base: float, peer_lag: float = 0.0, now: float | None = None) -> float:
        """`base` stretched by the recent lag of our loop or the peer's (module docstring)."""
        lag = max(self.recent_lag(now), peer_lag)
        cfg = self.config
        if lag <= cfg.tolerance:
            return base
        return min(base + cfg.slack * lag, base * cfg.max_stretch)

    def stretch(self, now: float | None = None) -> float:
        """How many times a base timeout of one second is stretched now (>= 1)."""
        return self.timeout(1.0, now=now)

    def snapshot(self) -> dict[str, object]:
        return {
            "lag_ms": round(self.recent_lag() * 1000, 1),
            "max_lag_ms": round(self.max_lag * 1000, 1),
            "samples": self.samples,
            "lag_sum_s": round(self.lag_sum, 3),
            "stretch": round(self.stretch(), 2),
            "buckets": list(self.buckets),
        }

    # --- measuring ----------------------------------------------------------------------

    def record(self, lag: float, now: float) -> None:
        """Take one sample of the loop's lag (`serve` does; tests may too)."""
        lag = max(0.0, lag)
        self.samples += 1
        self.lag_sum += lag
        self.max_lag = max(self.max_lag, lag)
        for i, bound in enumerate(LAG_BUCKETS):
            if lag <= bound:
                self.buckets[i] += 1
                break
        else:
            self.buckets[-1] += 1
        if lag >= self.recent_lag(now):
            self._peak, self._peak_at = lag, now

    async def serve(self) -> None:
        """Sample the loop while no other node of this run does (module docstring)."""
        while True:
            if self._sampling:
                await self._vacancy.wait()
                continue
            self._sampling = True
            try:
                await self._sample_forever()
            finally:
                self._sampling = False
                self._vacancy.set()
                self._vacancy = trio.Event()

    async def _sample_forever(self) -> None:
        cfg = self.config
        interval = cfg.sample_interval
        while True:
            asked = trio.current_time() + interval
            await trio.sleep_until(asked)
            now = trio.current_time()
            lag = now - asked
            self.record(lag, now)
            interval = cfg.sample_interval if lag > cfg.tolerance else cfg.quiet_interval


_HEALTH: RunVar[LoopHealth] = RunVar("trio_replica_loop_health")


def loop_health(config: HealthConfig | None = None) -> LoopHealth:
    """The `LoopHealth` of the current Trio run, created by its first caller (whose
    `config` it keeps)."""
    try:
        return _HEALTH.get()
    except LookupError:
        health = LoopHealth(config)
        _HEALTH.set(health)
        return health
