"""The service registry: which nodes offer which named service, cluster-wide (issue 16).

This module owns `Registry` (``node.registry``), a `LeaseBoard` (`trio_replica.stores.leases`)
whose map, ``_registry``, holds besides the nodes' leases one entry per registration:
``["svc", name, node id, registration id] -> meta`` (plain data), put by
``async with node.registry.register(name, meta):`` and deleted when the block ends. A node
renews its lease while it has registrations.

A registration is *live* while its node's lease is (renewed within ``ttl``, as each node
sees it): a node that crashes or is cut off drops out of every lookup within ``ttl``
(plus a heartbeat) of its last renewal, everywhere, and its entries are collected with
its lease (see `leases`).

Reads are local (`lookup`); `whereis` waits for a name to appear; `events` reports
`Registered` and `Unregistered` (with ``reason`` "left" or "expired") as the live set
changes, checked on every change of the map and every heartbeat.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import secrets
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import attrs
import trio

from ..core.events import Event
from ..errors import NodeClosed
from ..runtime.config import RegistryConfig
from ..runtime.feeds import Feed
from .leases import BuiltinHost, LeaseBoard, entry_key

if TYPE_CHECKING:
    from .maps import ReplicatedMap

log = logging.getLogger("trio_replica.registry")

#: The registry's map (names starting with ``_`` are the node's own).
REGISTRY_MAP = "_registry"


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


class Registry(LeaseBoard):
    """The service registry of one node (module docstring)."""

    MAP = REGISTRY_MAP
    KINDS = {"svc": 4}

    def __init__(self, node: BuiltinHost, config: RegistryConfig | None = None) -> None:
        super().__init__(node, config or RegistryConfig())
        self._mine: dict[str, Registration] = {}
        self._feeds: set[tuple[Feed[Event], str | None]] = set()
        self._live: dict[tuple[str, str, str], Registration] = {}

    # --- the API ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def register(self, name: str, meta: Any = None) -> AsyncIterator[Registration]:
        """Offer `name` while the block runs (several nodes, or several times, may)."""
        if not isinstance(name, str) or not 0 < len(name) <= 256:
            raise ValueError("a service name is a string of 1 to 256 characters")
        the_map = await self._ensure()
        registration = Registration(name, self.node.id, secrets.token_hex(6), meta)
        await self._renew(the_map)
        await the_map.put(entry_key("svc", name, self.node.id, registration.id), meta)
        self._mine[registration.id] = registration
        try:
            yield registration
        finally:
            self._mine.pop(registration.id, None)
            # Within 2 s (a departure must not hang on a slow cluster); a closed node's
            # registrations go with its lease.
            with trio.move_on_after(2.0, shield=True), contextlib.suppress(NodeClosed):
                await the_map.delete(entry_key("svc", name, self.node.id, registration.id))

    def lookup(self, name: str) -> list[Registration]:
        """The live registrations of `name`, by node id (a local read: `open` first)."""
        self._check_open()
        return sorted(r for r in self._scan().values() if r.name == name)

    def names(self) -> list[str]:
        """The names with live registrations (a local read: `open` first)."""
        self._check_open()
        return sorted({r.name for r in self._scan().values()})

    async def whereis(self, name: str, *, timeout: float = 5.0) -> Registration:
        """The first live registration of `name`, waiting up to `timeout` for one."""
        await self._ensure()
        with trio.fail_after(timeout):
            while True:
                found = self.lookup(name)
                if found:
                    return found[0]
                await self._wait_change(self.config.heartbeat)

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

    # --- the lease board's hooks -------------------------------------------------------------

    def _active(self) -> bool:
        return bool(self._mine)

    def _node_of(self, parts: list[str]) -> str | None:
        return parts[2]

    def _scan(self) -> dict[tuple[str, str, str], Registration]:
        live_nodes = self.live_nodes()
        live: dict[tuple[str, str, str], Registration] = {}
        for (_, name, node_id, reg_id), meta in self.entries("svc"):
            if node_id == self.node.id and reg_id not in self._mine:
                continue  # ours, ended: only its delete is still on its way
            if node_id in live_nodes:
                live[(name, node_id, reg_id)] = Registration(name, node_id, reg_id, meta)
        return live

    async def _on_beat(self, the_map: ReplicatedMap) -> None:
        """Put back our registrations that another node deleted: it took our lease for
        expired (a partition longer than `ttl`); we are here, so they are live."""
        for reg in list(self._mine.values()):
            key = entry_key("svc", reg.name, reg.node, reg.id)
            if key not in the_map and reg.id in self._mine:
                await the_map.put(key, reg.meta)

    async def _on_change(self) -> None:
        live = self._scan()
        old = self._live
        self._live = live
        if not self._feeds:
            return
        events: list[Event] = []
        for key, reg in live.items():
            if key not in old:
                events.append(Registered(reg))
        live_nodes = self.live_nodes()
        for key, reg in old.items():
            if key not in live:
                expired = reg.node not in live_nodes
                events.append(Unregistered(reg, "expired" if expired else "left"))
        for event in events:
            name = event.registration.name  # type: ignore[attr-defined]
            for feed, pattern in list(self._feeds):
                if pattern is None or fnmatch.fnmatchcase(name, pattern):
                    feed.offer(event)  # a subscriber far behind is told `Lagged`
