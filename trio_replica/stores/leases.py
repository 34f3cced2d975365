"""Leases: the liveness every built-in agrees on (issue 16, SPEC section 11).

This module owns `LeaseBoard`, the base of the registry, the leader election and the shard
placement. Each keeps one replicated map (hosted by the nodes that use the built-in, found
through the host directory) holding

* one lease per node: ``["lease", node id] -> {"until": wall ms, ...}``, renewed every
  `heartbeat` seconds, `ttl` ahead, while the node takes part (`_active`);
* the built-in's own entries, keys ``[kind, ...]`` (CBOR lists of strings), some of which
  belong to a node (`_node_of`) and live only as long as its lease.

A node is *live* while a renewal of its lease has arrived here within `ttl`, on this
node's own clock (trio's monotonic clock): expiry never compares two nodes' wall clocks,
so a node whose clock runs ahead cannot expire the others, and a lease value from the
far future does not keep a silent node alive. The wall time in the lease (``until``) only
keeps out leases that were already stale when they arrived (older than two TTLs and the
HLC's skew bound, 60 s: a map just opened, or synced after a partition, holds the last
renewal of long-dead nodes); only a clock skew beyond that bound can make it matter.
So a node that crashes or is cut off drops out everywhere within ``ttl`` (plus a
heartbeat) of the arrival of its last renewal, whatever the links between the others do:
leases travel by broadcast and anti-entropy, not over one link, so a lost link between
two live nodes changes nothing. A lease not renewed here for two TTLs is deleted, with
the entries of its node, by the nodes that see it so at their next heartbeat (several at
once: the deletes are idempotent tombstones, which the map collects after its TTL).

Entries come from peers and are untrusted: a key must be the canonical CBOR list of
strings of a known kind and length (anything else is ignored), and each subclass checks
the values it reads.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import cbor2
import trio

from ..core.events import Event
from ..core.ormap import Value
from ..errors import MessageTooLarge, NodeClosed
from ..runtime.config import LeaseConfig
from .maps import Put, Removed, ValidationError
from .store import StoreError

if TYPE_CHECKING:
    from ..core.hlc import HybridClock
    from ..core.messages import Peer
    from ..runtime.config import NodeConfig
    from .hosting import MapHost
    from .hosts import HostDirectory
    from .maps import ReplicatedMap


class BuiltinHost(Protocol):
    """What the built-ins use of their node: its runtime's basics, its maps, its hosts."""

    @property
    def id(self) -> str: ...
    @property
    def config(self) -> NodeConfig: ...
    @property
    def clock(self) -> HybridClock: ...
    @property
    def map_host(self) -> MapHost: ...
    @property
    def hosts(self) -> HostDirectory: ...

    def spawn(self, fn: Callable[..., Awaitable[object]], *args: object) -> None: ...
    def active_view(self) -> list[Peer]: ...


log = logging.getLogger("trio_replica.leases")


def entry_key(*parts: str) -> bytes:
    """The map key of an entry: the CBOR list of its parts."""
    return bytes(cbor2.dumps(list(parts)))


@functools.lru_cache(maxsize=65_536)
def _decode(key: bytes) -> tuple[str, ...] | None:
    """The parts of an entry key, if it is the canonical CBOR list of strings (cached:
    the same keys are read on every change of the map)."""
    try:
        parts = cbor2.loads(key)
    except (cbor2.CBORDecodeError, ValueError, RecursionError):
        return None
    if type(parts) is not list or not parts or not all(type(p) is str for p in parts):
        return None
    # One key per entry: trailing bytes or another encoding of the same list would be
    # an alias that collection (by the canonical key) never deletes.
    if entry_key(*parts) != key:
        return None
    return tuple(parts)


class LeaseBoard:
    """A built-in's replicated map with one lease per node (module docstring).

    Subclasses name their map (`MAP`) and entry kinds (`KINDS`: kind -> key length), say
    when this node takes part (`_active`), and react in `_on_beat` (each heartbeat) and
    `_on_change` (after every change of the map, and every heartbeat).
    """

    MAP: ClassVar[str]
    KINDS: ClassVar[dict[str, int]] = {}

    def __init__(self, node: BuiltinHost, config: LeaseConfig, *, persist: bool = False) -> None:
        self.node = node
        self.config = config
        self._persist = persist
        self._map: ReplicatedMap | None = None
        self._opening = trio.Lock()
        self._changed = trio.Event()
        self._kinds = {"lease": 2, **self.KINDS}
        #: The node ids with a lease key in the map (from the change events; None: scan
        #: the map again), so that reading the leases costs the leases, not the map.
        self._lease_ids: set[str] | None = None
        self._lease_keys: dict[str, bytes] = {}
        #: Each node's lease as last seen: (its dot, the trio time it arrived here).
        self._arrivals: dict[str, tuple[Any, float]] = {}
        #: Set once this node has compared the map with a peer (or nobody else hosts it,
        #: or a TTL passed): `_catch_up`.
        self.caught_up = trio.Event()

    @property
    def is_open(self) -> bool:
        return self._map is not None

    async def open(self) -> None:
        """Host this built-in's map here (and sync it); idempotent."""
        await self._ensure()

    async def _ensure(self) -> ReplicatedMap:
        async with self._opening:
            if self._map is None:
                self._map = await self.node.map_host.open_reserved(self.MAP, persist=self._persist)
                self.node.spawn(self._run)
                self.node.spawn(self._catch_up, self._map)
            return self._map

    async def _catch_up(self, the_map: ReplicatedMap) -> None:
        """Set `caught_up` once this node has compared the map with a peer, if any other
        node hosts it (first the host directory, when the node has neighbours or seeds, to
        know whether one does), or after a TTL at most."""
        node = self.node
        with trio.move_on_after(self.config.ttl):
            directory = node.hosts.map
            if (node.active_view() or node.config.seeds) and directory is not None:
                await directory.synced.wait()
            if node.hosts.listed(self.MAP):
                await the_map.synced.wait()
        # What the comparison brought may not have gone through the change events yet.
        self._lease_ids = None
        self.caught_up.set()
        self._wake()

    def _check_open(self) -> ReplicatedMap:
        if self._map is None:
            raise RuntimeError(
                f"the {self.MAP.strip('_')} is not open on this node: await its open() first"
            )
        return self._map

    # --- what subclasses say and do ---------------------------------------------------------

    def _active(self) -> bool:
        """Whether this node renews its lease now."""
        return False

    def _lease_extra(self) -> dict[str, Any]:
        """More fields of this node's lease (checked by readers of the subclass)."""
        return {}

    def _node_of(self, parts: list[str]) -> str | None:
        """The node an entry belongs to (deleted with its expired lease), or None."""
        return None

    async def _on_beat(self, the_map: ReplicatedMap) -> None:
        """Work on the heartbeat's schedule, after the renewal."""

    async def _on_collect(self, the_map: ReplicatedMap, dead: set[str]) -> None:
        """Called before the leases of `dead` and their entries are deleted."""

    async def _on_change(self) -> None:
        """Called after every change of the map (coalesced) and every heartbeat."""

    def _on_event(self, event: Event) -> None:
        """Each change event of the map (`Put`, `Removed`, `Lagged`), as it comes."""

    async def _retire(self) -> None:
        """This node stops taking part now: delete its lease (others need not wait for
        it to expire)."""
        the_map = self._map
        if the_map is not None:
            await the_map.delete(entry_key("lease", self.node.id))

    def _next_wake(self) -> float | None:
        """A trio time at which `_on_change` must run again (besides changes and beats)."""
        return None

    # --- reading the map ----------------------------------------------------------------------

    def _now_ms(self) -> int:
        return self.node.clock.read_physical()

    def _parse(self, key: Any) -> list[str] | None:
        if type(key) is not bytes:
            return None
        parts = _decode(key)
        if parts is None or self._kinds.get(parts[0]) != len(parts):
            return None
        return list(parts)

    def entries(self, kind: str) -> list[tuple[list[str], Any]]:
        """The well-formed entries of `kind`: (key parts, value)."""
        the_map = self._map
        if the_map is None:
            return []
        out = []
        for key, value in the_map.items():
            parts = self._parse(key)
            if parts is not None and parts[0] == kind:
                out.append((parts, value))
        return out

    def leases(self) -> dict[str, dict[str, Any]]:
        """Every node's lease as the map holds it (live or not): node id -> fields."""
        the_map = self._map
        out: dict[str, dict[str, Any]] = {}
        if the_map is None:
            return out
        if self._lease_ids is None:
            self._lease_ids = {node_id for (_, node_id), _ in self.entries("lease")}
        for node_id in self._lease_ids:
            value = the_map.get(self._lease_key(node_id))
            if type(value) is dict and type(value.get("until")) is int:
                out[node_id] = value
        return out

    def _lease_key(self, node_id: str) -> bytes:
        key = self._lease_keys.get(node_id)
        if key is None:
            if len(self._lease_keys) > 65_536:
                self._lease_keys.clear()
            key = self._lease_keys[node_id] = entry_key("lease", node_id)
        return key

    def _note_event(self, event: Event) -> None:
        """Keep `_lease_ids` current from the map's change events."""
        if isinstance(event, Put | Removed):
            parts = self._parse(event.key)
            if parts is not None and parts[0] == "lease" and self._lease_ids is not None:
                if isinstance(event, Put):
                    self._lease_ids.add(parts[1])
                else:
                    self._lease_ids.discard(parts[1])
        else:
            self._lease_ids = None  # a `Lagged`: what changed is read from the map

    def _refresh(self) -> dict[str, dict[str, Any]]:
        """The leases, noting the local arrival time of every renewal not seen before."""
        leases = self.leases()
        the_map = self._map
        if the_map is None:
            return leases
        now = trio.current_time()
        arrivals = self._arrivals
        current = {}
        for node_id in self._lease_ids or ():
            entry = the_map.entry(self._lease_key(node_id))
            if isinstance(entry, Value):  # malformed values too: collected all the same
                current[node_id] = entry.dot
        for node_id, dot in current.items():
            seen = arrivals.get(node_id)
            if seen is None or seen[0] != dot:
                arrivals[node_id] = (dot, now)
        for node_id in arrivals.keys() - current.keys():
            del arrivals[node_id]
        return leases

    def live_nodes(self) -> set[str]:
        """Nodes whose lease was renewed here within `ttl` (this node while it takes
        part); module docstring."""
        leases = self._refresh()
        now = trio.current_time()
        ttl = self.config.ttl
        # Wall times of two nodes: allow the clock skew the HLC allows on top.
        stale_ms = self._now_ms() - round(2 * ttl * 1000) - self.node.clock.max_offset_ms
        live = {
            n
            for n, lease in leases.items()
            if self._arrivals[n][1] + ttl >= now and lease["until"] >= stale_ms
        }
        live.discard(self.node.id)
        if self._active():
            live.add(self.node.id)
        return live

    # --- the heartbeat ------------------------------------------------------------------------

    async def _renew(self, the_map: ReplicatedMap) -> None:
        until = self._now_ms() + round(self.config.ttl * 1000)
        await the_map.put(entry_key("lease", self.node.id), {"until": until, **self._lease_extra()})

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _wait_change(self, timeout: float) -> None:
        changed = self._changed
        with trio.move_on_after(timeout):
            await changed.wait()

    async def _run(self) -> None:
        """Renew our lease, collect expired ones, and react to changes."""
        the_map = self._map
        assert the_map is not None
        async with the_map.subscribe() as changes, trio.open_nursery() as nursery:

            async def follow() -> None:
                async for event in changes:  # a `Lagged` too: the map is read again
                    self._note_event(event)
                    self._on_event(event)
                    self._wake()

            nursery.start_soon(follow)
            next_beat = trio.current_time()
            while True:
                # The lease work on the heartbeat's schedule only: a renewal changes the
                # map on every node, and must not wake them all into renewing again.
                if trio.current_time() >= next_beat:
                    next_beat = trio.current_time() + self.config.heartbeat
                    try:
                        if self._active():
                            await self._renew(the_map)
                        await self._on_beat(the_map)
                        await self._collect(the_map)
                    except NodeClosed:
                        return
                    except (StoreError, ValidationError, MessageTooLarge) as exc:
                        # Tried again at the next heartbeat; meanwhile the lease runs on.
                        log.warning("%s: heartbeat failed: %s", self.MAP, exc)
                changed = self._changed
                try:
                    await self._on_change()
                except NodeClosed:
                    return
                except (StoreError, ValidationError, MessageTooLarge) as exc:
                    log.warning("%s: could not act on a change: %s", self.MAP, exc)
                wake = self._next_wake()
                with trio.move_on_at(next_beat if wake is None else min(next_beat, wake)):
                    await changed.wait()

    async def _collect(self, the_map: ReplicatedMap) -> None:
        """Delete leases not renewed here for two TTLs, with their nodes' entries."""
        self._refresh()
        horizon = trio.current_time() - 2 * self.config.ttl
        dead = {
            node_id
            for node_id, (_, arrived) in self._arrivals.items()
            if arrived < horizon and node_id != self.node.id
        }
        if not dead:
            return
        await self._on_collect(the_map, dead)
        doomed: list[Any] = [entry_key("lease", node_id) for node_id in dead]
        for key in the_map.keys():  # noqa: SIM118 - a list taken now (the map changes)
            parts = self._parse(key)
            if parts is not None and parts[0] != "lease" and self._node_of(parts) in dead:
                doomed.append(key)
        for key in doomed:
            await the_map.delete(key)
        log.info("%s: collected the expired leases of %s", self.MAP, sorted(dead))
