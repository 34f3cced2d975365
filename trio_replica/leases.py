"""Leases: the liveness every built-in agrees on (issue 16, SPEC section 11).

This module owns `LeaseBoard`, the base of the registry, the leader election and the shard
placement. Each keeps one replicated map (hosted by the nodes that use the built-in, found
through the host directory) holding

* one lease per node: ``["lease", node id] -> {"until": wall ms, ...}``, renewed every
  `heartbeat` seconds, `ttl` ahead, while the node takes part (`_active`);
* the built-in's own entries, keys ``[kind, ...]`` (CBOR lists of strings), some of which
  belong to a node (`_node_of`) and live only as long as its lease.

A node is *live* while its lease has not expired on the reader's wall clock. So a node
that crashes or is cut off drops out everywhere within ``ttl`` (plus a heartbeat) of its
last renewal, whatever the links between the others do: leases travel by broadcast and
anti-entropy, not over one link, so a lost link between two live nodes changes nothing.
A lease expired for longer than `ttl` more is deleted, with the entries of its node, by
the nodes that see it so at their next heartbeat (several at once: the deletes are
idempotent tombstones, which the map collects after its TTL).

Clocks: lease times are wall milliseconds of the renewing node, compared with the reader's
wall clock; nodes' clocks must agree within a fraction of `ttl` (the HLC refuses
timestamps more than its skew bound ahead).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, ClassVar

import attrs
import cbor2
import trio

from .errors import ConfigError, MessageTooLarge, NodeClosed
from .events import Lagged
from .maps import ValidationError
from .store import StoreError

if TYPE_CHECKING:
    from .maps import ReplicatedMap
    from .node import Node

log = logging.getLogger("trio_replica.leases")


@attrs.frozen
class LeaseConfig:
    #: Seconds between two renewals of a node's lease, and how far ahead each reaches
    #: (barrel_p2p's shard: 2 s and 6 s).
    heartbeat: float = 2.0
    ttl: float = 6.0

    def __attrs_post_init__(self) -> None:
        if not 0 < self.heartbeat < self.ttl:
            raise ConfigError(f"{type(self).__name__}: 0 < heartbeat < ttl is needed")


def entry_key(*parts: str) -> bytes:
    """The map key of an entry: the CBOR list of its parts."""
    return bytes(cbor2.dumps(list(parts)))


class LeaseBoard:
    """A built-in's replicated map with one lease per node (module docstring).

    Subclasses name their map (`MAP`) and entry kinds (`KINDS`: kind -> key length), say
    when this node takes part (`_active`), and react in `_on_beat` (each heartbeat) and
    `_on_change` (after every change of the map, and every heartbeat).
    """

    MAP: ClassVar[str]
    KINDS: ClassVar[dict[str, int]] = {}

    def __init__(self, node: Node, config: LeaseConfig, *, persist: bool = False) -> None:
        self.node = node
        self.config = config
        self._persist = persist
        self._map: ReplicatedMap | None = None
        self._opening = trio.Lock()
        self._changed = trio.Event()
        self._kinds = {"lease": 2, **self.KINDS}

    @property
    def is_open(self) -> bool:
        return self._map is not None

    async def open(self) -> None:
        """Host this built-in's map here (and sync it); idempotent."""
        await self._ensure()

    async def _ensure(self) -> ReplicatedMap:
        async with self._opening:
            if self._map is None:
                self._map = await self.node._open_map_unchecked(self.MAP, persist=self._persist)
                self.node.spawn(self._run)
            return self._map

    async def _catch_up(self, the_map: ReplicatedMap) -> None:
        """Wait (a TTL at most) until this node has compared the map with a peer, if any
        other node hosts it: first the host directory (when the node has neighbours or
        seeds), to know whether one does."""
        node = self.node
        with trio.move_on_after(self.config.ttl):
            directory = node.hosts.map
            if (node.active_view() or node.config.seeds) and directory is not None:
                await directory.synced.wait()
            if node.hosts.knows(self.MAP):
                await the_map.synced.wait()

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

    # --- reading the map ----------------------------------------------------------------------

    def _now_ms(self) -> int:
        return self.node.clock.read_physical()

    def _parse(self, key: Any) -> list[str] | None:
        if type(key) is not bytes:
            return None
        try:
            parts = cbor2.loads(key)
        except (cbor2.CBORDecodeError, ValueError):
            return None
        if type(parts) is not list or not parts or not all(type(p) is str for p in parts):
            return None
        if self._kinds.get(parts[0]) != len(parts):
            return None
        return parts

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
        out: dict[str, dict[str, Any]] = {}
        for (_, node_id), value in self.entries("lease"):
            if type(value) is dict and type(value.get("until")) is int:
                out[node_id] = value
        return out

    def live_nodes(self) -> set[str]:
        """Nodes whose lease has not expired here (this node while it takes part)."""
        now = self._now_ms()
        live = {n for n, lease in self.leases().items() if lease["until"] >= now}
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
                async for event in changes:
                    if not isinstance(event, Lagged):
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
                with trio.move_on_at(next_beat):
                    await changed.wait()

    async def _collect(self, the_map: ReplicatedMap) -> None:
        """Delete leases expired for longer than `ttl` more, with their nodes' entries."""
        horizon = self._now_ms() - round(self.config.ttl * 1000)
        dead = {
            node_id
            for node_id, lease in self.leases().items()
            if lease["until"] < horizon and node_id != self.node.id
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
