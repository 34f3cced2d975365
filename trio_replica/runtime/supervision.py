"""Restart limits shared by every supervised task of a node: components and replica drivers.

`Restarts` is an OTP supervisor's intensity with exponential backoff: a crashed task is
restarted after a backoff (50 ms doubling to 2 s, back to 50 ms once it ran for a while),
and past `max_restarts` crashes within `restart_window` seconds it is not restarted again:
`ComponentDead` leaves the task, so the node closes with that error. A bug hit by every
input would otherwise restart the task forever, and a node living on without one of its
tasks would stall (its links' readers behind an inbox nobody drains, its writers behind a
backlog that never clears, a map that never replicates).
"""

from __future__ import annotations

import collections
import logging

from ..errors import ComponentDead

log = logging.getLogger("trio_replica.component")


class Restarts:
    """The restart budget of one supervised task."""

    #: Restart backoff bounds, in seconds.
    backoff_min = 0.05
    backoff_max = 2.0
    #: More than this many crashes within `restart_window` seconds and the task is dead.
    max_restarts = 10
    restart_window = 60.0

    def __init__(self, name: str) -> None:
        self.name = name
        self.crashes = 0
        self.restarts = 0
        #: Why the task stopped being restarted (None while it is supervised).
        self.dead: str | None = None
        self._times: collections.deque[float] = collections.deque()
        self._backoff = self.backoff_min
        self._last_start = 0.0
        #: Whether the task has come up once (set by the replica driver: `restarting`).
        self.started_once = False

    def started(self, now: float) -> None:
        self._last_start = now

    def crashed(self, now: float) -> float:
        """Count a crash at `now`; return the backoff to wait before restarting.

        Raises `ComponentDead` (and sets `dead`) past the intensity.
        """
        self.crashes += 1
        self._times.append(now)
        while self._times and self._times[0] <= now - self.restart_window:
            self._times.popleft()
        if len(self._times) > self.max_restarts:
            self.dead = f"{len(self._times)} crashes in {self.restart_window:.0f} s, not restarted"
            log.critical("%s is dead: %s; the node closes", self.name, self.dead)
            raise ComponentDead(f"{self.name}: {self.dead}")
        # A task that ran long enough since its last start earns the short backoff again.
        if now - self._last_start > 10 * self.backoff_max:
            self._backoff = self.backoff_min
        backoff = self._backoff
        self._backoff = min(self._backoff * 2, self.backoff_max)
        self.restarts += 1
        return backoff
