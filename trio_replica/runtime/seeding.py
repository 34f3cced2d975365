"""The task that carries out the seeding policy (`trio_replica.core.seeding`) on a node.

The policy decides (join while isolated, re-join, reach the next seed); this task dials
the seeds it names, in its order, until one answers, and posts the resulting `join` or
`reach` to the membership component. The simulator carries out the same policy.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from ..core.effects import Effect
from ..core.hyparview import HyParView
from ..core.messages import Peer
from ..core.seeding import Join, Reach, SeedingConfig, SeedPolicy

log = logging.getLogger("trio_replica.node")


class SeedingHost(Protocol):
    """What the seeding task uses of its node."""

    @property
    def id(self) -> str: ...
    @property
    def membership_core(self) -> HyParView: ...

    async def connect_seed(self, address: str) -> Peer | None: ...
    def connect_error(self, address: str) -> str | None: ...
    async def post_membership(self, run: Callable[[HyParView, float], list[Effect]]) -> None: ...
    def view_changed(self) -> Awaitable[None]: ...


def policy_config(retry_min: float, retry_max: float, core: HyParView) -> SeedingConfig:
    return SeedingConfig(
        retry_min=retry_min,
        retry_max=retry_max,
        rejoin_interval=core.config.rejoin_interval,
        rejoin_chance=core.config.rejoin_chance,
    )


#: A node that has not joined this long says so at WARNING, and again every
#: `JOIN_WARN_EVERY` while it still cannot (INFO lines say each failed dial).
JOIN_WARN_AFTER = 10.0
JOIN_WARN_EVERY = 60.0


class _JoinReport:
    """Whether the node has been failing to join long enough to say so, and when it did."""

    def __init__(self, node: SeedingHost) -> None:
        self._node = node
        self._since: float | None = None
        self._warned: float | None = None

    def failed(self, seeds: tuple[str, ...], started: float, now: float) -> None:
        """A round of joining that began at `started` found no seed that answered."""
        if self._since is None:
            self._since = started
        if now - self._since < JOIN_WARN_AFTER:
            return
        if self._warned is not None and now - self._warned < JOIN_WARN_EVERY:
            return
        self._warned = now
        reasons = "; ".join(
            f"{address}: {self._node.connect_error(address) or 'no answer'}" for address in seeds
        )
        log.warning(
            "node %s: cannot join the cluster: no seed answered for %.0f s (%s); still trying",
            self._node.id,
            now - self._since,
            reasons,
        )

    def joined(self, address: str, now: float) -> None:
        if self._warned is not None and self._since is not None:
            log.warning(
                "node %s: joined through %s after %.0f s", self._node.id, address, now - self._since
            )
        self._since = self._warned = None


async def run_seeding(node: SeedingHost, policy: SeedPolicy, retry_min: float) -> None:
    """Follow `policy` until cancelled (a task of the node)."""
    report = _JoinReport(node)
    while True:
        core = node.membership_core
        now = trio.current_time()
        step = policy.step(core, now)
        if isinstance(step, Join):
            if step.rejoin:
                log.info("node %s: no seed in view; re-joining to merge a split overlay", node.id)
            through = await _join(node, policy, step)
            if not step.rejoin:
                if through is None and step.seeds:
                    report.failed(step.seeds, now, trio.current_time())
                elif through is not None:
                    report.joined(through, trio.current_time())
                await trio.sleep(policy.retry_delay())
            continue
        if isinstance(step, Reach):
            await _reach(node, policy, step)
            continue
        if node.membership_core.active:
            # In the overlay: nothing to do until the view changes (losing the last peer
            # is a PeerDown) or a re-join is due; no idle polling.
            with trio.move_on_at(min(step.until, now + policy.config.retry_max)):
                await node.view_changed()
        else:
            # A JOIN is pending: its timeout clears it without any view change.
            await trio.sleep(retry_min)


async def _join(node: SeedingHost, policy: SeedPolicy, step: Join) -> str | None:
    """JOIN through the first seed, in the policy's order, that answers a dial; return its
    address, or None if none answered."""
    for address in step.seeds:
        peer = await node.connect_seed(address)
        if peer is not None:
            policy.learned(address, peer.id)
            await node.post_membership(functools.partial(_join_through, peer))
            return address
    return None


async def _reach(node: SeedingHost, policy: SeedPolicy, step: Reach) -> None:
    """Ask the first seed of `step` that answers and is in neither view to be a neighbour."""
    for address in step.seeds:
        policy.tried(address)
        peer = await node.connect_seed(address)
        if peer is None:
            continue  # down or cut off: the next one (the next check tries it again)
        policy.learned(address, peer.id)
        if not policy.may_reach(node.membership_core, peer.id):
            continue
        await node.post_membership(functools.partial(_reach_to, peer))
        return


def _join_through(contact: Peer, core: HyParView, now: float) -> list[Effect]:
    return core.join(contact, now)


def _reach_to(seed: Peer, core: HyParView, now: float) -> list[Effect]:
    return core.reach(seed, now)
