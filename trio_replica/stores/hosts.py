"""Who hosts which replica instance: a directory every node keeps, replicated like a map.

This module owns `HostDirectory`: the `_hosts` map (every node opens it, so it syncs with
its neighbours like any map hosted everywhere), the index from instance name to the
nodes that host it, built from that map and kept up to date from its change events, and
the announcements: a node that opens an instance puts ``[instance, node id] ->
[address, incarnation]`` (the incarnation changes at every start, so a restarted host is
noticed even at the same address) and deletes it when it closes the instance.

A replica driver (`trio_replica.runtime.replica`) syncs with the hosts of its instance, not with
whoever is adjacent in the overlay: a node whose neighbours host nothing still gets its
initial sync and anti-entropy. It hears of hosts that come and go (`listen`), and opens a
comparison with a new host when its own id is the smaller (the other side does the same
with the roles swapped, so one comparison runs per pair).

Entries of a node that crashed stay until it starts again (and overwrites them) or the
node is removed as dead; a sync with such a stale host fails to connect and is skipped.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import cbor2
import trio

from ..core.events import Lagged
from ..core.messages import MAX_NODE_ID, MAX_TAG, Peer
from ..core.wire import check_address
from ..errors import WireError
from ..runtime.services import HostListener
from .maps import Put, Removed

if TYPE_CHECKING:
    from .hosting import MapHost
    from .maps import ReplicatedMap

log = logging.getLogger("trio_replica.hosts")

#: The directory's own map name (names starting with ``_`` are reserved for the node).
DIRECTORY = "_hosts"


def directory_key(instance: str, node_id: str) -> bytes:
    return bytes(cbor2.dumps([instance, node_id]))


def parse_entry(key: Any, value: Any) -> tuple[str, Peer] | None:
    """``(instance, host)`` from one directory entry, or None if it is not well formed."""
    try:
        if type(key) is not bytes or len(key) > 2 * (MAX_TAG + MAX_NODE_ID):
            return None
        decoded = cbor2.loads(key)
        if type(decoded) is not list or len(decoded) != 2:
            return None
        instance, node_id = decoded
        if type(instance) is not str or type(node_id) is not str:
            return None
        if not 0 < len(instance) <= MAX_TAG or not 0 < len(node_id) <= MAX_NODE_ID:
            return None
        if type(value) is not list or len(value) != 2 or type(value[1]) is not int:
            return None
        address = check_address(value[0])
    except (cbor2.CBORDecodeError, ValueError, TypeError, EOFError, WireError):
        return None
    return instance, Peer(node_id, address)


def _valid(key: Any, value: Any) -> bool:
    return parse_entry(key, value) is not None


class DirectoryRuntime(Protocol):
    """What the host directory uses of its node's runtime."""

    @property
    def id(self) -> str: ...
    @property
    def me(self) -> Peer: ...

    def child_rng(self) -> random.Random: ...
    async def start_task(self, fn: Callable[..., Awaitable[object]], *args: object) -> Any: ...


class HostDirectory:
    """The hosts of every instance, as this node knows them (module docstring)."""

    def __init__(self, node: DirectoryRuntime, maps: MapHost) -> None:
        self.node = node
        self._maps = maps
        self.map: ReplicatedMap | None = None
        self._index: dict[str, dict[str, Peer]] = {}
        self._listeners: dict[str, HostListener] = {}
        #: Nodes gone for the cluster: their entries are left out of the index.
        self._forgotten: set[str] = set()
        self._incarnation = node.child_rng().getrandbits(48)

    async def start(self) -> None:
        """Open the directory map and start following it (`open_node`, before yielding)."""
        self.map = await self._maps.open_reserved(DIRECTORY, validator=_valid, everywhere=True)
        await self.node.start_task(self._follow)

    def hosts(self, instance: str) -> list[Peer]:
        """The other nodes known to host `instance`, by id."""
        me = self.node.id
        return sorted(p for p in self._index.get(instance, {}).values() if p.id != me)

    def listed(self, instance: str) -> bool:
        """Whether the directory map lists another host of `instance` now (a scan: the
        index follows the map's events a scheduling step behind)."""
        if self.map is None:
            return False
        me = self.node.id
        for key, value in self.map.items():
            parsed = parse_entry(key, value)
            if parsed is not None and parsed[0] == instance and parsed[1].id != me:
                return True
        return False

    def listen(self, instance: str, listener: HostListener) -> None:
        self._listeners[instance] = listener

    def unlisten(self, instance: str) -> None:
        self._listeners.pop(instance, None)

    async def announce(self, instance: str) -> None:
        """Say that this node hosts `instance` (a put on the directory)."""
        assert self.map is not None
        me = self.node.me
        await self.map.put(directory_key(instance, me.id), [me.address, self._incarnation])

    async def withdraw(self, instance: str) -> None:
        """Say that this node no longer hosts `instance`."""
        assert self.map is not None
        await self.map.delete(directory_key(instance, self.node.id))

    def address_of(self, node_id: str) -> Peer | None:
        """The node as a host of any instance names it, or None."""
        for hosts in self._index.values():
            peer = hosts.get(node_id)
            if peer is not None:
                return peer
        return None

    def forget_node(self, node_id: str) -> None:
        """`node_id` is gone for the cluster (`departures`): no longer a host of anything
        here until it is heard of again (`remember_node`). Its entries stay in the map."""
        self._forgotten.add(node_id)
        for instance in [i for i, hosts in self._index.items() if node_id in hosts]:
            peer = self._index[instance].pop(node_id)
            if not self._index[instance]:
                del self._index[instance]
            self._tell(instance, peer, added=False)

    def remember_node(self, node_id: str) -> None:
        """A node once forgotten is heard of again (a partition healed, it refuted a
        suspicion, it restarted): its entries count again."""
        if node_id in self._forgotten:
            self._forgotten.discard(node_id)
            self._rebuild()

    # --- following the map --------------------------------------------------------------

    async def _follow(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        assert self.map is not None
        async with self.map.subscribe() as feed:
            self._rebuild()
            task_status.started()
            async for event in feed:
                if isinstance(event, Lagged):
                    self._rebuild()
                elif isinstance(event, Put):
                    self._put(event.key, event.value)
                elif isinstance(event, Removed):
                    self._remove(event.key)

    def _rebuild(self) -> None:
        assert self.map is not None
        old = {name: dict(hosts) for name, hosts in self._index.items()}
        self._index = {}
        for key, value in self.map.items():
            parsed = parse_entry(key, value)
            if parsed is not None and parsed[1].id not in self._forgotten:
                self._index.setdefault(parsed[0], {})[parsed[1].id] = parsed[1]
        for name in set(old) | set(self._index):
            before, after = old.get(name, {}), self._index.get(name, {})
            for node_id, peer in after.items():
                if before.get(node_id) != peer:
                    self._tell(name, peer, added=True)
            for node_id, peer in before.items():
                if node_id not in after:
                    self._tell(name, peer, added=False)

    def _put(self, key: Any, value: Any) -> None:
        parsed = parse_entry(key, value)
        if parsed is None:
            return
        instance, peer = parsed
        # Its own announcement: it is alive (a restart after it was removed).
        self._forgotten.discard(peer.id)
        # A new host, or one that restarted (a put is a visible change: a new address or
        # incarnation): either way it needs a comparison.
        self._index.setdefault(instance, {})[peer.id] = peer
        self._tell(instance, peer, added=True)

    def _remove(self, key: Any) -> None:
        try:
            decoded = cbor2.loads(key) if type(key) is bytes else None
        except (cbor2.CBORDecodeError, ValueError, TypeError, EOFError):
            return
        if type(decoded) is not list or len(decoded) != 2:
            return
        instance, node_id = decoded
        hosts = self._index.get(instance) if type(instance) is str else None
        if hosts is None or node_id not in hosts:
            return
        peer = hosts.pop(node_id)
        if not hosts:
            del self._index[instance]
        self._tell(instance, peer, added=False)

    def _tell(self, instance: str, peer: Peer, *, added: bool) -> None:
        if peer.id == self.node.id:
            return
        listener = self._listeners.get(instance)
        if listener is not None:
            listener(peer, added)
