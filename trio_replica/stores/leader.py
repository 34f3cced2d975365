"""Leader election per name, with fencing tokens (issue 16, SPEC section 11).

This module owns `Election` (``node.election``; ``node.leader(name)`` is its `candidate`),
a `LeaseBoard` (`trio_replica.stores.leases`) whose map, ``_leader``, holds besides the nodes'
leases

* a candidacy: ``["cand", name, node id] -> {"priority": int}``, put by
  ``async with node.leader(name, priority=...)`` and deleted when the block ends;
* a fence high-water mark: ``["fence", name, node id] -> int``, the greatest fence for
  `name` that node has minted or taken over. The mark of `name` is the max over nodes:
  each node writes only its own entry, and only upwards, so the mark merges by max
  whatever the order of delivery (a dead node's entry is folded into a collector's
  before it is deleted).

The leader of a name is the live candidate (lease not expired) with the highest
priority, then the lowest node id: every node that sees the same map computes the same
one. A candidate that finds itself the leader mints a fence greater than the mark and
than any HLC timestamp it has seen, writes it, and its `Leadership` yields
``Elected(fence)``; when another candidate wins, ``Revoked``. A new candidacy waits for a
first comparison with a peer and `settle` seconds (a TTL when no comparison completes)
before it may lead, so that a node that just started does not lead before it has seen
the others. A leader also begins a new term (a new fence, a new ``Elected``) when a
candidate it did not see standing appears: that can be the heal of a partition whose
other side minted fences this node never received (their node may have died since), and a
fresh fence, minted later on the wall clock, is above them.

Guarantees (AP, as barrel_p2p's, written in the README): within a connected partition,
after leases converge, one leader, and every new fence is strictly greater than every
fence minted before it in that partition. Across a partition each side can elect its own
leader, with fences minted independently; after the heal one leader remains, and if its
fence is below the other side's it mints a new, greater one (a new ``Elected``). What
keeps a protected resource safe is the fence, not the election: give every write the
fence and let the resource refuse one older than the newest it has accepted
(`FencedResource`). Fences minted in different partitions can be equal only if minted in
the same millisecond with the same HLC counter by nodes whose ids hash to the same 16
bits.
"""

from __future__ import annotations

import contextlib
import logging
import zlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import attrs
import trio

from ..core.events import Event, Lagged
from ..errors import NodeClosed
from ..runtime.config import LeaderConfig
from ..runtime.feeds import Feed
from .leases import BuiltinHost, LeaseBoard, entry_key

if TYPE_CHECKING:
    from .maps import ReplicatedMap

log = logging.getLogger("trio_replica.leader")

LEADER_MAP = "_leader"


@attrs.frozen
class Elected(Event):
    """This node leads `name`; act with `fence` (greater than every earlier fence seen)."""

    name: str
    fence: int


@attrs.frozen
class Revoked(Event):
    """This node no longer leads `name` (it led with `fence`)."""

    name: str
    fence: int


class StaleFence(Exception):
    """A fenced resource refused a fence older than the newest it accepted."""


class FencedResource:
    """Guards a resource with fencing tokens: refuses a fence below the newest accepted.

    Call `check(fence)` (or `accept`) before each write made on behalf of a leader; a
    deposed leader's writes are refused as soon as its successor wrote once.
    """

    def __init__(self) -> None:
        self.highest: int | None = None
        self.accepted = 0
        self.refused = 0

    def accept(self, fence: int) -> bool:
        if self.highest is not None and fence < self.highest:
            self.refused += 1
            return False
        self.highest = fence
        self.accepted += 1
        return True

    def check(self, fence: int) -> None:
        """Like `accept`, raising `StaleFence` instead of returning False."""
        if not self.accept(fence):
            raise StaleFence(f"fence {fence} is older than {self.highest}")


class Leadership:
    """One candidacy of this node (yielded by ``node.leader(name)``).

    Iterate it (or ``await lead.receive()``) for `Elected` / `Revoked` transitions; read
    `is_leader` and `fence` at any time; ``await lead.wait_elected()`` for the next fence.
    """

    def __init__(self, name: str, priority: int, started: float) -> None:
        self.name = name
        self.priority = priority
        self.is_leader = False
        #: The fence of the current (or last) term; None before the first.
        self.fence: int | None = None
        self.started = started
        #: Candidates this one has seen standing (a new one may be a partition's heal).
        self.seen: set[str] = set()
        self._feed = Feed[Event](max_items=256, max_bytes=2**62)
        self._elected = trio.Event()
        self._election: Election | None = None

    def _elect(self, fence: int) -> None:
        self.is_leader = True
        self.fence = fence
        self._feed.offer(Elected(self.name, fence))
        self._elected.set()

    def _revoke(self) -> None:
        assert self.fence is not None
        self.is_leader = False
        self._feed.offer(Revoked(self.name, self.fence))
        self._elected = trio.Event()

    async def new_term(self, above: int = 0) -> int:
        """Begin a new term now: a fresh fence above every fence seen and above `above`
        (say, the newest a `FencedResource` accepted when it refused ours: a leader of
        another partition, since healed or dead, wrote after this term began). Returns
        the fence; raises RuntimeError if this node does not lead."""
        if self._election is None or not self.is_leader:
            raise RuntimeError(f"this node does not lead {self.name!r}")
        fence = await self._election._begin_term(self, above, renewal=True)
        if fence is None:
            raise RuntimeError(f"this node no longer leads {self.name!r}")
        return fence

    async def wait_elected(self) -> int:
        """Wait until this node leads; return its fence."""
        while not self.is_leader:
            await self._elected.wait()
        assert self.fence is not None
        return self.fence

    async def receive(self) -> Event:
        """The next transition (a `Lagged` notice if more than 256 went unread)."""
        event = await self._feed.receive()
        return event

    def __aiter__(self) -> AsyncIterator[Event | Lagged]:
        return self._feed.__aiter__()


#: A fence read from the map above this is ignored, so that a fence minted above any
#: accepted one still fits the signed 64-bit integers the wire and most databases carry.
#: Minted fences stay below until the year 2248 (43 bits of wall milliseconds, 4 of HLC
#: counter, 16 of tie-break).
MAX_FENCE = 2**63 - 2**17


def _priority(value: Any) -> int | None:
    if type(value) is dict and type(value.get("priority")) is int:
        priority = int(value["priority"])
        if -(2**31) <= priority < 2**31:
            return priority
    return None


def _fence_value(value: Any) -> int | None:
    return value if type(value) is int and 0 < value <= MAX_FENCE else None


class Election(LeaseBoard):
    """The leader elections of one node (module docstring)."""

    MAP = LEADER_MAP
    KINDS = {"cand": 3, "fence": 3}

    def __init__(self, node: BuiltinHost, config: LeaderConfig | None = None) -> None:
        super().__init__(node, config or LeaderConfig())
        self.config: LeaderConfig
        self._mine: dict[str, Leadership] = {}
        self._tie = zlib.crc32(node.id.encode()) & 0xFFFF
        #: One term begins at a time per name (`_begin_term`; the fold of `_on_collect`).
        self._locks: dict[str, trio.Lock] = {}
        #: Terms this node began (each `Elected`), and ended by another's win.
        self.elections = 0
        self.revocations = 0

    @contextlib.asynccontextmanager
    async def candidate(self, name: str, priority: int = 0) -> AsyncIterator[Leadership]:
        """Stand for leader of `name` while the block runs (module docstring)."""
        if not isinstance(name, str) or not 0 < len(name) <= 256:
            raise ValueError("a leader name is a string of 1 to 256 characters")
        if type(priority) is not int or not -(2**31) <= priority < 2**31:
            raise ValueError("priority is an integer in the 32-bit range")
        if name in self._mine:
            raise RuntimeError(f"this node already stands for leader of {name!r}")
        the_map = await self._ensure()
        lead = Leadership(name, priority, trio.current_time())
        lead._election = self
        self._mine[name] = lead
        key = entry_key("cand", name, self.node.id)
        try:
            await self._renew(the_map)
            await the_map.put(key, {"priority": priority})
            self._wake()
            yield lead
        finally:
            self._mine.pop(name, None)
            lead.is_leader = False
            lead._feed.close()
            with trio.move_on_after(2.0, shield=True), contextlib.suppress(NodeClosed):
                await the_map.delete(key)

    def candidates(self, name: str) -> list[tuple[str, int]]:
        """The live candidates for `name` as (node id, priority), the leader first."""
        self._check_open()
        live = self.live_nodes()
        found: list[tuple[str, int]] = []
        for (_, cand_name, node_id), value in self.entries("cand"):
            priority = _priority(value)
            if cand_name != name or priority is None or node_id not in live:
                continue
            if node_id == self.node.id and name not in self._mine:
                continue  # ours, ended: only its delete is still on its way
            found.append((node_id, priority))
        return sorted(found, key=lambda c: (-c[1], c[0]))

    def leader_of(self, name: str) -> str | None:
        """Who leads `name` by this node's view of the candidates (None: nobody stands)."""
        found = self.candidates(name)
        return found[0][0] if found else None

    def fence(self, name: str) -> int | None:
        """The greatest fence of `name` this node has seen (None: never elected)."""
        self._check_open()
        fences = [_fence_value(v) for (_, n, _), v in self.entries("fence") if n == name]
        return max((f for f in fences if f is not None), default=None)

    def names(self) -> list[str]:
        """Names with at least one live candidate."""
        self._check_open()
        live = self.live_nodes()
        return sorted({n for (_, n, node_id), _ in self.entries("cand") if node_id in live})

    # --- the lease board's hooks -------------------------------------------------------------

    def _active(self) -> bool:
        return bool(self._mine)

    def _node_of(self, parts: list[str]) -> str | None:
        return parts[2]

    async def _on_beat(self, the_map: ReplicatedMap) -> None:
        """Put back our candidacies that another node deleted: it took our lease for
        expired (a partition longer than `ttl`); we are here, so they stand."""
        for name, lead in list(self._mine.items()):
            key = entry_key("cand", name, self.node.id)
            if key not in the_map and self._mine.get(name) is lead:
                await the_map.put(key, {"priority": lead.priority})

    def _settled(self, lead: Leadership) -> bool:
        """Whether `lead` may lead: `settle` seconds in (candidacies put at the same time
        have arrived) and caught up (`LeaseBoard.caught_up`: compared with a peer, if any
        other node hosts the election; a TTL at most)."""
        elapsed = trio.current_time() - lead.started
        return self.caught_up.is_set() and elapsed >= self.config.settle

    def _next_wake(self) -> float | None:
        waiting = [
            lead.started + self.config.settle
            for lead in self._mine.values()
            if not lead.is_leader and trio.current_time() < lead.started + self.config.settle
        ]
        return min(waiting, default=None)

    def _mint(self, high: int) -> int:
        """A fence above `high` and above every HLC timestamp this node has seen (wall
        milliseconds, then the counter, capped at 15 within one millisecond); the low 16
        bits, a hash of the node id, tell nodes apart, so that independent partitions
        almost never mint the same."""
        now = self.node.clock.now()
        base = max((high >> 16) + 1, (now.wall << 4) | min(now.logical, 15))
        return (base << 16) | self._tie

    async def _on_change(self) -> None:
        the_map = self._map
        assert the_map is not None
        for name, lead in list(self._mine.items()):
            standing = self.candidates(name)
            leader = standing[0][0] if standing else None
            current = {node_id for node_id, _ in standing}
            others = current - lead.seen
            lead.seen = current
            if leader == self.node.id and self._settled(lead):
                high = self.fence(name) or 0
                if lead.is_leader and lead.fence is not None and lead.fence >= high and not others:
                    continue
                await self._begin_term(lead, high)
            elif lead.is_leader and leader != self.node.id:
                self.revocations += 1
                log.info("leader: %s no longer leads %r (%s does)", self.node.id, name, leader)
                lead._revoke()

    async def _begin_term(
        self, lead: Leadership, above: int, *, renewal: bool = False
    ) -> int | None:
        """Mint a fence above `above` and every fence seen, write it, and elect `lead`
        with it if it still leads (`renewal`: and was not revoked meanwhile); one term at
        a time per name, so fences and `Elected` only go up. The fence, or None if not
        elected."""
        the_map = self._map
        assert the_map is not None
        async with self._lock(lead.name):
            if renewal and not lead.is_leader:
                return None
            fence = self._mint(max(above, self.fence(lead.name) or 0))
            # Durable (when the map persists) and on its way before anyone acts on it.
            await the_map.put(entry_key("fence", lead.name, self.node.id), fence)
            if (
                self._mine.get(lead.name) is not lead
                or self.leader_of(lead.name) != self.node.id
                or (renewal and not lead.is_leader)
                or (lead.fence is not None and fence <= lead.fence)
            ):
                return None  # the mark went up all the same: harmless
            self.elections += 1
            log.info("leader: %s leads %r with fence %d", self.node.id, lead.name, fence)
            lead._elect(fence)
            return fence

    def _lock(self, name: str) -> trio.Lock:
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = trio.Lock()
        return lock

    async def _on_collect(self, the_map: ReplicatedMap, dead: set[str]) -> None:
        """Keep the dead nodes' fences in the mark: fold each into our own entry."""
        taken: dict[str, int] = {}
        for (_, name, node_id), value in self.entries("fence"):
            fence = _fence_value(value)
            if node_id in dead and fence is not None:
                taken[name] = max(taken.get(name, 0), fence)
        for name, value in taken.items():
            async with self._lock(name):
                key = entry_key("fence", name, self.node.id)
                mine = _fence_value(the_map.get(key)) or 0
                if mine < value:
                    await the_map.put(key, value)
