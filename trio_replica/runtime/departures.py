"""When a node is gone for the cluster: departures and confirmed failures, told once to all.

This module owns the decision behind `NodeRemoved`, the event on which replicas call
`remove_node`. A peer leaving one node's active view says little: an eviction, a link
that timed out between two live nodes that a third still reaches, a node that is slow.
Only these count (ideas from SWIM's suspicion and refutation):

* **Left.** A neighbour that saw a peer leave gracefully (`PeerDown(LEFT)`) broadcasts
  ``node/departed``: every node removes it at once.
* **Failed, confirmed.** A neighbour whose link to a peer failed (`PeerDown(FAILED)`)
  broadcasts a suspicion, ``node/suspect``, named by a random nonce. A suspected node that
  is alive hears it (the overlay still reaches it through others) and refutes it with
  ``node/alive`` naming the suspicions it answers, which clears them everywhere, also
  where a copy of a suspicion arrives after its refutation. A node is removed when
  `observers` distinct nodes suspect it and `confirm_delay` passed without a refutation,
  or when one did and nothing refuted it for `lone_timeout`. Two nodes that lose their
  direct link while a third reaches both each suspect the other once, are refuted, and
  nothing is removed.

Every node decides from the same broadcasts, so each one removes a dead node once. A node
removed and then heard of again (it comes back, or refutes late) can be removed again
later. Suspicion reports come as broadcasts, so their cost is a broadcast per failed link.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import attrs
import trio

from ..core.events import Delivery, DownReason, Event, NodeRemoved, PeerDown, PeerUp
from ..core.messages import MAX_NODE_ID
from ..errors import MessageTooLarge, NodeClosed
from .config import DeparturesConfig
from .services import Directory, NodeBasics, Publishing

log = logging.getLogger("trio_replica.departures")

DEPARTED_TAG = "node/departed"
SUSPECT_TAG = "node/suspect"
ALIVE_TAG = "node/alive"
TAGS = (DEPARTED_TAG, SUSPECT_TAG, ALIVE_TAG)
#: Suspected nodes tracked at once, and removed nodes remembered (the oldest forgotten
#: first): the ids come from peers.
MAX_TRACKED = 4096
#: Suspicions answered by one refutation at most.
MAX_REFS = 64


@attrs.define
class _Suspicion:
    since: float
    #: Who suspects the node, with the nonce of that suspicion.
    observers: dict[str, int] = attrs.Factory(dict)


def _parse(payload: Any, *, refs: bool) -> tuple[str, int | list[tuple[str, int]]] | None:
    """``[node, nonce]`` (departed, suspect) or ``[node, [[observer, nonce], ...]]``
    (alive), checked; None if malformed."""
    if type(payload) is not list or len(payload) != 2:
        return None
    target, detail = payload
    if type(target) is not str or not 0 < len(target) <= MAX_NODE_ID:
        return None
    if not refs:
        if type(detail) is not int or not 0 <= detail < 2**63:
            return None
        return target, detail
    if type(detail) is not list or len(detail) > MAX_REFS:
        return None
    out: list[tuple[str, int]] = []
    for ref in detail:
        if type(ref) is not list or len(ref) != 2:
            return None
        observer, nonce = ref
        if type(observer) is not str or not 0 < len(observer) <= MAX_NODE_ID:
            return None
        if type(nonce) is not int or not 0 <= nonce < 2**63:
            return None
        out.append((observer, nonce))
    return target, out


@attrs.define
class DepartureStats:
    suspicions_sent: int = 0
    suspicions_received: int = 0
    refutations_sent: int = 0
    refutations_received: int = 0
    removed_left: int = 0
    removed_failed: int = 0
    malformed: int = 0
    #: Suspicions not tracked: `MAX_TRACKED` suspects at once already.
    suspicions_refused: int = 0


class DeparturesHost(NodeBasics, Publishing, Protocol):
    """What the departures component uses of its node."""

    @property
    def hosts(self) -> Directory: ...

    def publish_membership_event(self, event: Event) -> None: ...


class Departures:
    """Decides which nodes are gone for the cluster (module docstring)."""

    def __init__(self, node: DeparturesHost, config: DeparturesConfig | None = None) -> None:
        self.node = node
        self.config = config or DeparturesConfig()
        self.stats = DepartureStats()
        self._suspects: dict[str, _Suspicion] = {}
        self._removed: dict[str, None] = {}
        self._refute = trio.Event()
        self._changed = trio.Event()
        self._rng = node.child_rng()
        #: Suspicions of this node still to answer, as (observer, nonce).
        self._to_refute: list[tuple[str, int]] = []
        #: Suspicions of other nodes that they answered (bounded, oldest dropped first).
        self._answered: dict[tuple[str, str, int], None] = {}

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for tag in TAGS:
                await nursery.start(self._listen, tag)
            await nursery.start(self._watch_links)
            nursery.start_soon(self._refuter)
            task_status.started()
            await self._confirm_loop()

    async def _refuter(self) -> None:
        """Say we are alive: once we are in the overlay (nodes that removed an earlier
        life of ours count us again), and after every suspicion of us, at most once per
        `refute_interval`; a suspicion that comes meanwhile is answered right after it,
        never dropped (a later one alone would be left unrefuted)."""
        await self.node.wait_ready()
        self._refute.set()
        while True:
            await self._refute.wait()
            self._refute = trio.Event()
            refs = [[observer, nonce] for observer, nonce in self._to_refute[:MAX_REFS]]
            del self._to_refute[:MAX_REFS]
            if self._to_refute:
                self._refute.set()
            self.stats.refutations_sent += 1
            await self._tell(ALIVE_TAG, [self.node.id, refs])
            await trio.sleep(self.config.refute_interval)

    # --- inputs -------------------------------------------------------------------------

    async def _watch_links(self, *, task_status: trio.TaskStatus[None]) -> None:
        async with self.node.events() as events:
            task_status.started()
            async for event in events:
                if isinstance(event, PeerDown):
                    tag = {DownReason.LEFT: DEPARTED_TAG, DownReason.FAILED: SUSPECT_TAG}.get(
                        event.reason
                    )
                    if tag == DEPARTED_TAG:
                        await self._tell(tag, [event.peer.id, 0])
                    elif tag == SUSPECT_TAG:
                        # The nonce names this suspicion: the suspect's refutation names it
                        # back, so a copy that arrives after the refutation counts for
                        # nothing, while a later suspicion (a new nonce) counts again.
                        self.stats.suspicions_sent += 1
                        await self._tell(tag, [event.peer.id, self._rng.getrandbits(63)])
                elif isinstance(event, PeerUp):
                    self._heard_of(event.peer.id)

    async def _listen(self, tag: str, *, task_status: trio.TaskStatus[None]) -> None:
        async with self.node.subscribe(tag, include_own=True) as sub:
            task_status.started()
            async for item in sub:
                if not isinstance(item, Delivery):
                    continue  # a lost report is repaired by the next one (or the timeout)
                parsed = _parse(item.payload, refs=tag == ALIVE_TAG)
                if parsed is None:
                    self.stats.malformed += 1
                    continue
                target, detail = parsed
                if tag == DEPARTED_TAG:
                    self._remove(target, DownReason.LEFT)
                elif tag == SUSPECT_TAG:
                    self.stats.suspicions_received += 1
                    assert isinstance(detail, int)
                    self._suspected(target, item.origin, detail)
                else:
                    self.stats.refutations_received += 1
                    assert isinstance(detail, list)
                    self._refuted(target, detail)

    def _suspected(self, target: str, observer: str, nonce: int) -> None:
        if target == self.node.id:
            if len(self._to_refute) < MAX_TRACKED:
                self._to_refute.append((observer, nonce))
            self._refute.set()
            return
        if target in self._removed or (target, observer, nonce) in self._answered:
            return
        suspicion = self._suspects.get(target)
        if suspicion is None:
            if len(self._suspects) >= MAX_TRACKED:
                # Ids come from peers: a bounded table, the excess counted.
                self.stats.suspicions_refused += 1
                return
            suspicion = self._suspects[target] = _Suspicion(trio.current_time())
        suspicion.observers[observer] = nonce
        self._changed.set()

    def _refuted(self, target: str, refs: list[tuple[str, int]]) -> None:
        """`target` says it is alive, answering the suspicions `refs` (none: it joined)."""
        if not refs:
            self._heard_of(target)
            return
        for observer, nonce in refs:
            self._answered[(target, observer, nonce)] = None
            if len(self._answered) > MAX_TRACKED:
                del self._answered[next(iter(self._answered))]
        suspicion = self._suspects.get(target)
        if suspicion is not None:
            for observer, nonce in refs:
                if suspicion.observers.get(observer) == nonce:
                    del suspicion.observers[observer]
            if not suspicion.observers:
                self._clear(target)
        if target in self._removed:
            del self._removed[target]
            self.node.hosts.remember_node(target)

    async def _tell(self, tag: str, payload: Any) -> None:
        try:
            await self.node.broadcast(tag, payload)
        except (NodeClosed, MessageTooLarge):
            return

    # --- decisions ----------------------------------------------------------------------

    def _heard_of(self, node_id: str) -> None:
        """`node_id` is alive after all: no suspicion; a later death is a new one."""
        self._clear(node_id)
        if node_id in self._removed:
            del self._removed[node_id]
            self.node.hosts.remember_node(node_id)

    def _clear(self, target: str) -> None:
        self._suspects.pop(target, None)

    def _remove(self, target: str, reason: DownReason) -> None:
        self._clear(target)
        if target == self.node.id or target in self._removed:
            return
        self._removed[target] = None
        if len(self._removed) > MAX_TRACKED:
            del self._removed[next(iter(self._removed))]
        if reason is DownReason.LEFT:
            self.stats.removed_left += 1
        else:
            self.stats.removed_failed += 1
        log.info(
            "node %s: node %s is gone for the cluster (%s)", self.node.id, target, reason.value
        )
        self.node.hosts.forget_node(target)
        self.node.publish_membership_event(NodeRemoved(target, reason))

    async def _confirm_loop(self) -> None:
        cfg = self.config
        while True:
            if not self._suspects:
                await self._changed.wait()
                self._changed = trio.Event()
                continue
            now = trio.current_time()
            wake = float("inf")
            for target, suspicion in list(self._suspects.items()):
                enough = len(suspicion.observers) >= cfg.observers
                # One expression for the test and the wake-up: a deadline compared in two
                # forms can disagree by a rounding error, and the loop would spin.
                due = suspicion.since + (cfg.confirm_delay if enough else cfg.lone_timeout)
                if now >= due:
                    self._remove(target, DownReason.FAILED)
                else:
                    wake = min(wake, due)
            if wake < float("inf"):
                with trio.move_on_at(wake):
                    await self._changed.wait()
                self._changed = trio.Event()

    def removed(self) -> list[str]:
        """The nodes removed and not heard of since (oldest first)."""
        return list(self._removed)

    def snapshot(self) -> dict[str, Any]:
        out = attrs.asdict(self.stats)
        out["suspected"] = len(self._suspects)
        return out
