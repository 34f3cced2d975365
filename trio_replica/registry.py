"""The service registry: which nodes offer which named service, cluster-wide (issue 16).

This module owns `Registry` (``node.registry``). It keeps a replicated map, ``_registry``,
hosted by the nodes that use the registry (they find each other through the host
directory), with two kinds of entries:

* a registration: ``["svc", name, node id, registration id] -> meta`` (plain data), put by
  ``async with node.registry.register(name, meta):`` and deleted when the block ends;
* a lease per node: ``["lease", node id] -> until`` (wall milliseconds), renewed every
  `heartbeat` seconds while the node has registrations, `ttl` ahead.

A registration is *live* while its node's lease has not expired. So a node that crashes
or is cut off drops out of every lookup within ``ttl`` (plus a heartbeat) of its last
renewal, everywhere, whatever the links between the others do (a lost link between two
live nodes removes nothing: leases travel by broadcast and anti-entropy, not over one
link). A lease expired for longer than `ttl` more is deleted, with its registrations, by
the nodes that see it so at their next heartbeat (usually several at once: the deletes
are idempotent tombstones, which the map collects after its TTL; electing one collector
would need the shard placement of the next built-ins).

Reads are local (`lookup`); `whereis` waits for a name to appear; `events` reports
`Registered` and `Unregistered` (with ``reason`` "left" or "expired") as the live set
changes, checked on every change of the map and every heartbeat.

Clocks: lease times are wall milliseconds of the renewing node, compared with the
reader's wall clock; nodes' clocks must agree within a fraction of `ttl` (the HLC refuses
timestamps more than its skew bound ahead).
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import secrets
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import attrs
import cbor2
import trio

from .errors import ConfigError, MessageTooLarge, NodeClosed
from .events import Event, Lagged
from .flow import Feed
from .maps import ValidationError
from .store import StoreError

if TYPE_CHECKING:
    from .maps import ReplicatedMap
    from .node import Node

log = logging.getLogger("trio_replica.registry")

#: The registry's map (names starting with ``_`` are the node's own).
REGISTRY_MAP = "_registry"


@attrs.frozen
class RegistryConfig:
    #: Seconds between two renewals of a node's lease, and how far ahead each reaches.
    heartbeat: float = 2.0
    ttl: float = 6.0

    def __attrs_post_init__(self) -> None:
        if not 0 < self.heartbeat < self.ttl:
            raise ConfigError("registry: 0 < heartbeat < ttl is needed")


@attrs.frozen(order=True)
class Registration:
    """One live registration: `name` offered by `node` with `meta`."""

    name: str
    node: str
    id: str
    meta: Any = attrs.field(eq=False, order=False)


@attrs.frozen
class Registered(Event):
    registration: Registration


@attrs.frozen
class Unregistered(Event):
    """Gone: ``reason`` "left" (its block ended) or "expired" (its node's lease ran out)."""

    registration: Registration
    reason: str


def _key(*parts: str) -> bytes:
    return bytes(cbor2.dumps(list(parts)))


def _parse(key: Any) -> list[Any] | None:
    if type(key) is not bytes:
        return None
    try:
        parts = cbor2.loads(key)
    except (cbor2.CBORDecodeError, ValueError):
        return None
    if type(parts) is not list or not parts or not all(isinstance(p, str) for p in parts):
        return None
    if (parts[0] == "svc" and len(parts) == 4) or (parts[0] == "lease" and len(parts) == 2):
        return parts
    return None


class Registry:
    """The service registry of one node (module docstring)."""

    def __init__(self, node: Node, config: RegistryConfig | None = None) -> None:
        self.node = node
        self.config = config or RegistryConfig()
        self._map: ReplicatedMap | None = None
        self._opening = trio.Lock()
        self._mine: dict[str, Registration] = {}
        self._changed = trio.Event()
        self._feeds: set[tuple[Feed[Event], str | None]] = set()
        self._live: dict[tuple[str, str, str], Registration] = {}

    async def open(self) -> None:
        """Host the registry's map here (and sync it): needed before `lookup`; done by
        `register`, `whereis` and `events` themselves."""
        await self._ensure()

    async def _ensure(self) -> ReplicatedMap:
        async with self._opening:
            if self._map is None:
                self._map = await self.node._open_map_unchecked(REGISTRY_MAP)
                self.node.spawn(self._run)
            return self._map

    # --- the API ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def register(self, name: str, meta: Any = None) -> AsyncIterator[Registration]:
        """Offer `name` while the block runs (several nodes, or several times, may)."""
        if not isinstance(name, str) or not 0 < len(name) <= 256:
            raise ValueError("a service name is a string of 1 to 256 characters")
        the_map = await self._ensure()
        registration = Registration(name, self.node.id, secrets.token_hex(6), meta)
        await self._renew(the_map)
        await the_map.put(_key("svc", name, self.node.id, registration.id), meta)
        self._mine[registration.id] = registration
        try:
            yield registration
        finally:
            self._mine.pop(registration.id, None)
            # Within 2 s (a departure must not hang on a slow cluster); a closed node's
            # registrations go with its lease.
            with trio.move_on_after(2.0, shield=True), contextlib.suppress(NodeClosed):
                await the_map.delete(_key("svc", name, self.node.id, registration.id))

    def lookup(self, name: str) -> list[Registration]:
        """The live registrations of `name`, by node id (a local read: `open` first)."""
        self._check_open()
        return sorted(r for r in self._scan().values() if r.name == name)

    def names(self) -> list[str]:
        """The names with live registrations (a local read: `open` first)."""
        self._check_open()
        return sorted({r.name for r in self._scan().values()})

    def _check_open(self) -> None:
        if self._map is None:
            raise RuntimeError(
                "the registry is not open on this node: await node.registry.open() first"
            )

    async def whereis(self, name: str, *, timeout: float = 5.0) -> Registration:
        """The first live registration of `name`, waiting up to `timeout` for one."""
        await self._ensure()
        with trio.fail_after(timeout):
            while True:
                found = self.lookup(name)
                if found:
                    return found[0]
                changed = self._changed
                with trio.move_on_after(self.config.heartbeat):
                    await changed.wait()

    @contextlib.asynccontextmanager
    async def events(self, pattern: str | None = None) -> AsyncIterator[Feed[Event]]:
        """`Registered` / `Unregistered` events of names matching `pattern` (fnmatch; None:
        all), from now on."""
        await self._ensure()
        feed = Feed[Event](max_items=1024, max_bytes=2**62)
        entry = (feed, pattern)
        self._feeds.add(entry)
        try:
            yield feed
        finally:
            self._feeds.discard(entry)
            feed.close()

    # --- leases and the live set ----------------------------------------------------------

    def _now_ms(self) -> int:
        return self.node.clock.read_physical()

    def _scan(self) -> dict[tuple[str, str, str], Registration]:
        the_map = self._map
        if the_map is None:
            return {}
        now = self._now_ms()
        leases = self._leases()
        services: list[tuple[list[Any], Any]] = []
        for key, value in the_map.items():
            parts = _parse(key)
            if parts is not None and parts[0] == "svc":
                services.append((parts, value))
        live: dict[tuple[str, str, str], Registration] = {}
        for (_, name, node_id, reg_id), meta in services:
            if leases.get(node_id, -1) >= now or (node_id == self.node.id and reg_id in self._mine):
                live[(name, node_id, reg_id)] = Registration(name, node_id, reg_id, meta)
        return live

    async def _renew(self, the_map: ReplicatedMap) -> None:
        until = self._now_ms() + round(self.config.ttl * 1000)
        await the_map.put(_key("lease", self.node.id), until)

    async def _run(self) -> None:
        """Renew our lease, collect expired ones, and report changes of the live set."""
        the_map = self._map
        assert the_map is not None
        async with the_map.subscribe() as changes, trio.open_nursery() as nursery:

            async def follow() -> None:
                async for event in changes:
                    if not isinstance(event, Lagged):
                        self._wake()

            nursery.start_soon(follow)
            self._live = self._scan()
            next_beat = trio.current_time()
            while True:
                # The lease work on the heartbeat's schedule only: a renewal changes the
                # map on every node, and must not wake them all into renewing again.
                if trio.current_time() >= next_beat:
                    next_beat = trio.current_time() + self.config.heartbeat
                    try:
                        if self._mine:
                            await self._renew(the_map)
                            await self._restore(the_map)
                        await self._collect(the_map)
                    except NodeClosed:
                        return
                    except (StoreError, ValidationError, MessageTooLarge) as exc:
                        # Tried again at the next heartbeat; meanwhile the lease runs on.
                        log.warning("registry: heartbeat failed: %s", exc)
                self._report()
                changed = self._changed
                with trio.move_on_at(next_beat):
                    await changed.wait()

    async def _restore(self, the_map: ReplicatedMap) -> None:
        """Put back our registrations that another node deleted: it took our lease for
        expired (a partition longer than `ttl`); we are here, so they are live."""
        for reg in list(self._mine.values()):
            key = _key("svc", reg.name, reg.node, reg.id)
            if key not in the_map and reg.id in self._mine:
                await the_map.put(key, reg.meta)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _collect(self, the_map: ReplicatedMap) -> None:
        """Delete leases expired for longer than `ttl` more, with their registrations."""
        horizon = self._now_ms() - round(self.config.ttl * 1000)
        dead = {
            node_id
            for node_id, until in self._leases().items()
            if until < horizon and node_id != self.node.id
        }
        doomed: list[Any] = [_key("lease", node_id) for node_id in dead]
        if not dead:
            return
        for key in the_map.keys():  # noqa: SIM118 - a list taken now (the map changes)
            parts = _parse(key)
            if parts is not None and parts[0] == "svc" and parts[2] in dead:
                doomed.append(key)
        for key in doomed:
            await the_map.delete(key)
        log.info("registry: collected the expired leases of %s", sorted(dead))

    def _report(self) -> None:
        live = self._scan()
        old = self._live
        self._live = live
        if not self._feeds:
            return
        now = self._now_ms()
        events: list[Event] = []
        for key, reg in live.items():
            if key not in old:
                events.append(Registered(reg))
        leases = self._leases()
        for key, reg in old.items():
            if key not in live:
                expired = leases.get(reg.node, -1) < now
                events.append(Unregistered(reg, "expired" if expired else "left"))
        for event in events:
            name = event.registration.name  # type: ignore[attr-defined]
            for feed, pattern in list(self._feeds):
                if pattern is None or fnmatch.fnmatchcase(name, pattern):
                    feed.offer(event)  # a subscriber far behind is told `Lagged`

    def _leases(self) -> dict[str, int]:
        out: dict[str, int] = {}
        if self._map is None:
            return out
        for key, value in self._map.items():
            parts = _parse(key)
            if parts is not None and parts[0] == "lease" and isinstance(value, int):
                out[parts[1]] = value
        return out
