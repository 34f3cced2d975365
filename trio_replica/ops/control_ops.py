"""The operations a node answers on its control path (`trio_replica.runtime.control` carries them).

This module owns what each operation does and what it returns, as plain data:

* ``status``: identity, views, counters, readiness (always answered, even while starting);
* ``map.put``, ``map.get``, ``map.delete``: one key of a map the node hosts (``get`` returns
  the value with its writer and HLC timestamp);
* ``map.digest``: a summary two nodes can compare (the map's root digest: the count of
  stored entries, tombstones included, and the sum of their hashes, `ormap.ORMap`): equal
  digests mean equal maps;
* ``map.dump`` (streamed): every key, in batches, with value, writer and HLC (tombstones
  too when asked), walked leaf by leaf as the stream goes: keys written meanwhile may or
  may not appear;
* ``map.watch`` (streamed): the map's changes from now on, after a snapshot if asked;
* ``registry.lookup``: the live registrations of a name, or of every name
  (`trio_replica.stores.registry`);
* ``leader.show``: who leads a name, its fence and the candidates (`trio_replica.stores.leader`);
* ``shard.place``: a key's partition and owners (`trio_replica.stores.shard`);
* ``reminders.set``, ``reminders.cancel``, ``reminders.list``: durable reminders
  (`trio_replica.stores.reminders`).

The built-ins' operations open the built-in's map on the node if it was not open yet
(a node that never used a built-in hosts its map from then on).

Map operations wait for the node to be ready for them (`Node.control_ready`: its maps
are open) for at most `STARTING_WAIT` seconds, then fail with a clear "starting" error
instead of "map not open": a request right after a restart retries rather than fails.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

import cbor2
import trio

from ..core.events import Lagged
from ..core.ormap import Tombstone
from ..runtime.control import ControlError, ControlOp, ControlStream
from ..stores.maps import Put, Removed, ReplicatedMap
from .status import StatusSource

#: Seconds a map operation waits for a starting node to open its maps: shorter than a
#: client's usual deadline (5 s), so that the client hears "starting", not a timeout.
STARTING_WAIT = 3.0
#: Entries per reply of a dump or a watch snapshot, and the bytes a batch holds at most
#: (a row larger than that goes alone).
DUMP_BATCH = 512
DUMP_BATCH_BYTES = 256 * 1024


def _entry_fields(the_map: ReplicatedMap, key: Any) -> dict[str, Any] | None:
    entry = the_map.entry(key)
    if entry is None:
        return None
    ts = entry.dot.ts
    out: dict[str, Any] = {"writer": entry.dot.node, "hlc": [ts.wall, ts.logical]}
    if isinstance(entry, Tombstone):
        out["deleted"] = True
    else:
        out["value"] = entry.value
    return out


class ControlledNode(StatusSource, Protocol):
    """What the control operations use of a node (the `Node` facade)."""

    def status(self) -> dict[str, Any]: ...


class ControlOps:
    """The control operations of one node (module docstring)."""

    def __init__(self, node: ControlledNode) -> None:
        self.node = node

    def ops(self) -> dict[str, ControlOp]:
        return {
            "status": self.status,
            "map.put": self.put,
            "map.get": self.get,
            "map.delete": self.delete,
            "map.digest": self.digest,
            "registry.lookup": self.registry_lookup,
            "leader.show": self.leader_show,
            "shard.place": self.shard_place,
            "reminders.set": self.reminders_set,
            "reminders.cancel": self.reminders_cancel,
            "reminders.list": self.reminders_list,
        }

    def streams(self) -> dict[str, ControlStream]:
        return {"map.watch": self.watch, "map.dump": self.dump}

    async def _map(self, args: Any, arity: int) -> tuple[ReplicatedMap, list[Any]]:
        if type(args) is not list or len(args) != arity or not isinstance(args[0], str):
            raise ValueError(f"expected [map, ...] with {arity} items")
        node = self.node
        if not node.control_ready.is_set():
            with trio.move_on_after(STARTING_WAIT):
                await node.control_ready.wait()
            if not node.control_ready.is_set():
                raise ControlError(
                    f"node {node.id} is starting: its maps are not open yet; try again"
                )
        maps = node.maps()
        the_map = maps.get(args[0])
        if the_map is None:
            hosted = ", ".join(sorted(maps)) or "none"
            raise ControlError(
                f"node {node.id} does not host map {args[0]!r} (it hosts: {hosted}; "
                "open it with --map or open_map)"
            )
        return the_map, args[1:]

    async def registry_lookup(self, args: Any) -> dict[str, list[list[Any]]]:
        """``[name]`` or ``[]`` (every name): ``{name: [[node, id, meta], ...]}``."""
        if type(args) is not list or len(args) > 1 or not all(isinstance(a, str) for a in args):
            raise ValueError("expected [] or [name]")
        registry = self.node.registry
        await registry.open()
        names = args or registry.names()
        return {n: [[r.node, r.id, r.meta] for r in registry.lookup(n)] for n in names}

    async def leader_show(self, args: Any) -> dict[str, Any]:
        """``[name]``: ``{name, leader, fence, candidates: [[node, priority], ...]}``."""
        if type(args) is not list or len(args) != 1 or not isinstance(args[0], str):
            raise ValueError("expected [name]")
        election = self.node.election
        await election.open()
        name = args[0]
        return {
            "name": name,
            "leader": election.leader_of(name),
            "fence": election.fence(name),
            "candidates": [list(c) for c in election.candidates(name)],
        }

    async def shard_place(self, args: Any) -> dict[str, Any]:
        """``[key, n]``: ``{key, partition, owners, members, ring_size}``."""
        if (
            type(args) is not list
            or len(args) != 2
            or not isinstance(args[0], str)
            or type(args[1]) is not int
            or not 0 < args[1] <= 64
        ):
            raise ValueError("expected [key, n] with 1 <= n <= 64")
        shard = self.node.shard
        await shard.open(member=False)
        key, n = args
        return {
            "key": key,
            "partition": shard.partition(key),
            "owners": shard.owners(key, n),
            "members": len(shard.members()),
            "ring_size": shard.ring_size,
        }

    async def reminders_set(self, args: Any) -> list[Any]:
        """``[key, "at" | "after", seconds, payload]``: the reminder as `reminders.list` rows."""
        if (
            type(args) is not list
            or len(args) != 4
            or args[1] not in ("at", "after")
            or type(args[2]) not in (int, float)
        ):
            raise ValueError('expected [key, "at" or "after", seconds, payload]')
        key, how, seconds, payload = args
        reminders = self.node.reminders
        if how == "at":
            reminder = await reminders.remind(key, seconds, payload)
        else:
            reminder = await reminders.remind_after(key, seconds, payload)
        return self._reminder_row(reminder)

    async def reminders_cancel(self, args: Any) -> dict[str, Any]:
        """``[key]``: ``{"cancelled": bool}``."""
        if type(args) is not list or len(args) != 1:
            raise ValueError("expected [key]")
        return {"cancelled": await self.node.reminders.cancel(args[0])}

    async def reminders_list(self, args: Any) -> list[list[Any]]:
        """``[]``: ``[[key, at, payload, fence, owner], ...]`` by due time."""
        if args not in (None, []):
            raise ValueError("expected []")
        reminders = self.node.reminders
        await reminders.open()
        return [self._reminder_row(r) for r in reminders.pending()]

    def _reminder_row(self, reminder: Any) -> list[Any]:
        owner = self.node.reminders.owner_of(reminder.key)
        return [reminder.key, reminder.at, reminder.payload, str(reminder.fence), owner]

    async def status(self, _args: Any) -> dict[str, Any]:
        return self.node.status()

    async def put(self, args: Any) -> dict[str, Any]:
        the_map, (key, value) = await self._map(args, 3)
        await the_map.put(key, value)
        return {"ok": True}

    async def get(self, args: Any) -> dict[str, Any]:
        the_map, (key,) = await self._map(args, 2)
        fields = _entry_fields(the_map, key)
        if fields is None or fields.get("deleted"):
            return {"found": False, "value": None, **(fields or {})}
        return {"found": True, **fields}

    async def delete(self, args: Any) -> dict[str, Any]:
        the_map, (key,) = await self._map(args, 2)
        await the_map.delete(key)
        return {"ok": True}

    async def digest(self, args: Any) -> dict[str, Any]:
        the_map, _ = await self._map(args, 1)
        digest = the_map.digest()
        return {
            "map": the_map.name,
            "digest": digest,
            "entries": int(digest.rsplit("-", 1)[1]),
            "keys": len(the_map),
            "tombstones": the_map.tombstones,
        }

    async def dump(self, args: Any) -> AsyncIterator[list[Any]]:
        """``[map, tombstones]``: batches of ``[key, value, writer, wall, logical, deleted]``."""
        the_map, (tombstones,) = await self._map(args, 2)
        if not isinstance(tombstones, bool):
            raise ValueError("expected [map, tombstones: bool]")
        async for batch in _batches(the_map, tombstones):
            yield batch
        yield []  # the end: an empty batch

    async def watch(self, args: Any) -> AsyncIterator[list[Any]]:
        """``[map]`` or ``[map, snapshot]``: changes from now on, after the map as it stands
        if `snapshot` (``["snapshot", batch]`` items, then ``["snapshot_end"]``)."""
        if type(args) is list and len(args) == 1:
            args = [*args, False]
        the_map, (snapshot,) = await self._map(args, 2)
        async with the_map.subscribe() as events:
            # The first item confirms the subscription: changes from here on are all seen.
            yield ["watching", the_map.name, len(the_map)]
            if snapshot is True:
                # Taken after subscribing: a change made meanwhile shows in the snapshot or
                # comes after it, never in neither.
                async for batch in _batches(the_map, False):
                    yield ["snapshot", batch]
                yield ["snapshot_end"]
            async for event in events:
                if isinstance(event, Put):
                    yield ["put", event.key, event.value, event.origin]
                elif isinstance(event, Removed):
                    yield ["removed", event.key, event.origin]
                elif isinstance(event, Lagged):
                    yield ["lagged", event.missed]


async def _batches(the_map: ReplicatedMap, tombstones: bool) -> AsyncIterator[list[Any]]:
    """The map's entries as ``[key, value, writer, wall, logical, deleted]`` rows, in
    batches of at most `DUMP_BATCH` rows and `DUMP_BATCH_BYTES` (a larger row alone: a
    value is at most `max_payload`, and so is a reply)."""
    batch: list[list[Any]] = []
    size = 0
    for keys in the_map.key_slices(DUMP_BATCH):
        for key in keys:
            entry = the_map.entry(key)
            if entry is None:
                continue  # gone since the slice was taken
            deleted = isinstance(entry, Tombstone)
            if deleted and not tombstones:
                continue
            ts = entry.dot.ts
            value = None if isinstance(entry, Tombstone) else entry.value
            row = [key, value, entry.dot.node, ts.wall, ts.logical, deleted]
            row_size = len(cbor2.dumps(row))
            if batch and (size + row_size > DUMP_BATCH_BYTES or len(batch) >= DUMP_BATCH):
                yield batch
                batch, size = [], 0
            batch.append(row)
            size += row_size
        await trio.lowlevel.checkpoint()
    if batch:
        yield batch
