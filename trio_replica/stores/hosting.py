"""The maps a node hosts: opening (with its SQLite store), the tombstone collector, closing.

This module owns `MapHost`: one per node, the registry of its open `ReplicatedMap`s by
name. Opening a map checks the name (names of persisted maps become file names), opens
its store in `config.data_dir` when it persists and loads it (`ReplicatedMap.recover`)
before the replica driver starts, so that the first comparison with a peer already
counts what the store held. Names starting with ``_`` are the node's own (the host
directory, the built-ins' maps): only `open_reserved` opens them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from ..core.ormap_wire import DEFAULT_LIMITS, Validator
from ..errors import ConfigError, NodeClosed
from ..runtime.replica import Replica
from ..runtime.replica_api import ReplicaCallbacks
from .maps import DEFAULT_TOMBSTONE_TTL, MapRuntime, ReplicatedMap

log = logging.getLogger("trio_replica.node")

#: Names of persisted maps become file names: keep them to a safe alphabet.
_MAP_NAME = re.compile(r"[A-Za-z0-9_.-]{1,100}")


class HostingRuntime(MapRuntime, Protocol):
    """What hosting maps uses of the node's runtime."""

    @property
    def closing(self) -> bool: ...

    def spawn(self, fn: Callable[..., Awaitable[object]], *args: object) -> None: ...
    async def open_replica(
        self, name: str, callbacks: ReplicaCallbacks, *, everywhere: bool = False
    ) -> Replica: ...


class MapHost:
    """The open maps of one node (module docstring)."""

    def __init__(self, runtime: HostingRuntime) -> None:
        self._runtime = runtime
        self._maps: dict[str, ReplicatedMap] = {}
        self._collectors: dict[str, trio.CancelScope] = {}
        self._lock = trio.Lock()

    def __getitem__(self, name: str) -> ReplicatedMap:
        return self._maps[name]

    def get(self, name: str) -> ReplicatedMap | None:
        return self._maps.get(name)

    def all(self) -> dict[str, ReplicatedMap]:
        """Every open map, the node's own included."""
        return dict(self._maps)

    def user_maps(self) -> dict[str, ReplicatedMap]:
        """The application's maps (not the node's own, whose names start with ``_``)."""
        return {name: m for name, m in self._maps.items() if not name.startswith("_")}

    async def open(
        self,
        name: str,
        *,
        validator: Validator | None = None,
        persist: bool = False,
        tombstone_ttl: float = DEFAULT_TOMBSTONE_TTL,
    ) -> ReplicatedMap:
        """`Node.open_map`: an application's map."""
        if name.startswith("_"):
            raise ValueError("map names starting with '_' are reserved for the node")
        return await self.open_reserved(
            name, validator=validator, persist=persist, tombstone_ttl=tombstone_ttl
        )

    async def open_reserved(
        self,
        name: str,
        *,
        validator: Validator | None = None,
        persist: bool = False,
        tombstone_ttl: float = DEFAULT_TOMBSTONE_TTL,
        everywhere: bool = False,
    ) -> ReplicatedMap:
        """Open any map, the node's own included (`everywhere`: hosted by every node, so it
        syncs with neighbours rather than with its hosts: the host directory)."""
        runtime = self._runtime
        if runtime.closing:
            raise NodeClosed("the node is closing")
        async with self._lock:
            existing = self._maps.get(name)
            if existing is not None:
                if not existing.opened_with(validator, persist, tombstone_ttl):
                    raise ValueError(
                        f"map {name!r} is already open with other options; close it first"
                    )
                return existing
            if not _MAP_NAME.fullmatch(name):
                raise ValueError("map names are 1 to 100 characters of [A-Za-z0-9_.-]")
            if not tombstone_ttl > 0:
                raise ValueError("tombstone_ttl must be positive")
            store = None
            data_dir = runtime.config.data_dir
            if persist:
                if data_dir is None:
                    raise ConfigError("persist=True needs NodeConfig.data_dir (--data-dir)")
                from .store import MapStore

                data_dir.mkdir(parents=True, exist_ok=True)
                store = await MapStore.open(
                    data_dir / f"{name}.sqlite3", name=name, limits=DEFAULT_LIMITS
                )
            the_map = ReplicatedMap(
                runtime,
                name,
                validator=validator,
                tombstone_ttl=tombstone_ttl,
                store=store,
                on_close=self.close,
            )
            try:
                recovered = await the_map.recover()
                if recovered:
                    log.info("node %s: map %s recovered %d entries", runtime.id, name, recovered)
                the_map.replica = await runtime.open_replica(name, the_map, everywhere=everywhere)
            except BaseException:
                await the_map.close_store()
                raise
            collector = trio.CancelScope()
            self._collectors[name] = collector
            runtime.spawn(_run_in, collector, the_map.collect_tombstones)
            self._maps[name] = the_map
            return the_map

    async def close(self, name: str) -> None:
        """Stop replicating map `name` here (`ReplicatedMap.aclose`)."""
        the_map = self._maps.pop(name, None)
        if the_map is None:
            return
        self._collectors.pop(name).cancel()
        the_map.close_subscribers()
        await the_map.replica.aclose()
        await the_map.close_store()

    async def close_stores(self) -> None:
        """Close every map's store: once the node's tasks ended (no write in flight)."""
        for the_map in self._maps.values():
            await the_map.close_store()


async def _run_in(scope: trio.CancelScope, fn: Callable[[], Awaitable[None]]) -> None:
    with scope:
        await fn()
