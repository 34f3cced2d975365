"""The driver policy around the membership core: when to join, re-join and reach seeds.

Sans-IO, shared by the runtime (`trio_replica.runtime.seeding`, which dials addresses) and
the simulator (`trio_replica.sim.overlay`, which knows every seed's id), so that what the
simulator measures is what nodes do. The core (`core/hyparview.py`) holds the membership
rules; this module holds the rules around it that need the seed list, which the core
does not know:

* **Join while isolated** (`needs_join`): through the seeds in a random order (the driver
  tries them until one answers), then wait `retry_min`, doubling up to `retry_max` while
  still isolated (x0.8-1.2 jitter, so that nodes cut off together do not retry in step).
* **Every `rejoin_interval`** (the first check early, at 0.25-0.5 of it, so that seeds
  that started apart find each other within seconds; then every 0.75-1.25 of it): a seed
  asks the next other seed that is in neither of its views to be its neighbour (`reach`,
  a high-priority NEIGHBOR; the seeds so rotate), so that overlays that formed or healed
  apart through different seeds merge whichever side each seed is on; any other node,
  with `rejoin_chance`, JOINs through a seed if it holds none in its views
  (`should_rejoin`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import attrs

from .hyparview import HyParView


@attrs.frozen
class SeedingConfig:
    """The driver's timing: join backoff while isolated, and the re-join check."""

    retry_min: float = 0.5
    retry_max: float = 10.0
    #: Seconds between two re-join checks; 0 turns them off.
    rejoin_interval: float = 60.0
    #: Chance that a node which is not a seed runs a given check (seeds always do).
    rejoin_chance: float = 0.05


@attrs.frozen
class Join:
    """JOIN through the first of `seeds` (addresses, in this order) that answers."""

    seeds: tuple[str, ...]
    #: A re-join to merge a split overlay, not a join of an isolated node.
    rejoin: bool = False


@attrs.frozen
class Reach:
    """Ask the first of `seeds` that answers and is in neither view to be a neighbour
    (`HyParView.reach`); report each address tried with `SeedPolicy.tried`."""

    seeds: tuple[str, ...]


@attrs.frozen
class Wait:
    """Nothing to do before `until` (or before the active view changes)."""

    until: float


Step = Join | Reach | Wait


class SeedPolicy:
    """One node's driver policy (module docstring). `seeds` are the other seeds' addresses."""

    def __init__(
        self,
        my_id: str,
        seeds: Sequence[str],
        *,
        is_seed: bool,
        config: SeedingConfig,
        rng: random.Random,
        now: float,
    ) -> None:
        self.config = config
        self.is_seed = is_seed
        self._seeds = list(seeds)
        self._rng = rng
        #: The seeds' ids, once known (a dial answered, or the simulator knows them).
        self.seed_at: dict[str, str] = {}
        #: A seed counts itself among the seeds (`HyParView.should_rejoin`).
        self.seed_ids: set[str] = {my_id} if is_seed else set()
        self._my_id = my_id
        #: Seed addresses in the order a seed asks them: each one tried goes to the back.
        self._rotation = rng.sample(self._seeds, len(self._seeds))
        self._backoff = config.retry_min
        interval = config.rejoin_interval
        first = interval * rng.uniform(0.25, 0.5)
        self.next_rejoin = now + first if interval > 0 else float("inf")
        #: Re-joins and reaches started (for the simulator's figures and the node's stats).
        self.rejoins = 0

    @property
    def seeds(self) -> tuple[str, ...]:
        return tuple(self._seeds)

    def learned(self, address: str, node_id: str) -> None:
        """The seed at `address` is `node_id` (its handshake said so)."""
        self.seed_at[address] = node_id
        self.seed_ids.add(node_id)

    def tried(self, address: str) -> None:
        """A `Reach` asked (or failed to dial) `address`: it goes to the back of the turn."""
        if address in self._rotation:
            self._rotation.remove(address)
            self._rotation.append(address)

    def step(self, core: HyParView, now: float) -> Step:
        """What to do now. A `Join` of an isolated node sets the next retry (`Wait` after)."""
        if not self._seeds:
            return Wait(float("inf"))
        if core.needs_join():
            return Join(tuple(self._rng.sample(self._seeds, len(self._seeds))))
        self._backoff = self.config.retry_min
        if now >= self.next_rejoin:
            self.next_rejoin = now + self.config.rejoin_interval * self._rng.uniform(0.75, 1.25)
            if self.is_seed:
                candidates = tuple(
                    address
                    for address in self._rotation
                    if not _in_views(core, self.seed_at.get(address))
                )
                if candidates:
                    self.rejoins += 1
                    return Reach(candidates)
            elif self._rng.random() < self.config.rejoin_chance and core.should_rejoin(
                self.seed_ids
            ):
                self.rejoins += 1
                return Join(tuple(self._rng.sample(self._seeds, len(self._seeds))), rejoin=True)
        return Wait(self.next_rejoin)

    def retry_delay(self) -> float:
        """After a join of an isolated node: how long to wait before the next step."""
        delay = self._backoff * self._rng.uniform(0.8, 1.2)
        self._backoff = min(self._backoff * 2, self.config.retry_max)
        return delay

    def may_reach(self, core: HyParView, node_id: str) -> bool:
        """Whether a dialed seed is worth a `reach`: not us, and in neither view."""
        return node_id != self._my_id and not _in_views(core, node_id)


def _in_views(core: HyParView, node_id: str | None) -> bool:
    return node_id is not None and (core.is_active(node_id) or core.is_passive(node_id))
