"""Sharded placement: which live node owns which key (issue 16, SPEC section 11).

This module owns `Shard` (``node.shard``), a `LeaseBoard` (`trio_replica.stores.leases`) whose map,
``_shard``, holds only the members' leases, each with the member's ring size. A key falls
in one of `ring_size` partitions (a hash of the key); a partition belongs to the members
ranked first by rendezvous hashing (highest ``hash(partition, member)``), over the members
whose lease is live. Rendezvous hashing moves only the partitions of a member that leaves
(to the others, spread evenly) or that a new member wins (about 1/N of them), and needs
no coordination: every node that sees the same leases computes the same owners.

Members are the nodes that called `open()` (``member=True``, the default). Their live set
comes from leases (heartbeat 2 s, TTL 6 s), never from the partial views, so a lost link
moves nothing, and a dead member's partitions move within a TTL and a heartbeat. While
leases disagree (a member just joined, or just died, and not every node has seen it), two
nodes can both think they own a partition: placement is AP, as the README says.

The ring size must be the same on every member: a node that opens with another size than
the live members' is refused (`RingSizeMismatch`), and a member seen with another size
later is left out of placement and logged (it would place keys elsewhere).

`events()` reports this node's `Acquired(partition)` / `Released(partition)` as ownership
moves (what a member must start or stop serving).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import attrs
import trio

from ..core.events import Event
from ..errors import ConfigError
from ..runtime.config import MAX_RING, ShardConfig
from ..runtime.feeds import Feed
from .leases import BuiltinHost, LeaseBoard

log = logging.getLogger("trio_replica.shard")

SHARD_MAP = "_shard"


class RingSizeMismatch(ConfigError):
    """This node's ring size differs from the live members'."""


@attrs.frozen
class Acquired(Event):
    """This node now owns `partition`."""

    partition: int


@attrs.frozen
class Released(Event):
    """This node no longer owns `partition`."""

    partition: int


@attrs.define
class ShardStats:
    acquired: int = 0
    released: int = 0
    #: Members seen with another ring size (left out of placement).
    ring_mismatches: int = 0


def _key_bytes(key: str | bytes) -> bytes:
    if isinstance(key, bytes):
        return key
    if isinstance(key, str):
        return key.encode()
    raise TypeError(f"a shard key is a str or bytes, not {type(key).__name__}")


def _hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def partition_of(key: str | bytes, ring_size: int) -> int:
    """The partition of `key` in a ring of `ring_size` (the same on every node)."""
    return _hash64(b"k" + _key_bytes(key)) % ring_size


def _weight(partition: int, member: str) -> tuple[int, str]:
    return (_hash64(partition.to_bytes(4, "big") + member.encode()), member)


def _rank(partition: int, members: tuple[str, ...] | list[str], n: int) -> list[str]:
    """The first `n` of `members` by rendezvous weight for `partition`."""
    if n == 1:
        return [max(members, key=lambda m: _weight(partition, m))] if members else []
    ranked = sorted(members, key=lambda m: _weight(partition, m), reverse=True)
    return ranked[:n]


def rank_owner(partition: int, members: tuple[str, ...] | list[str]) -> str | None:
    """The member that owns `partition` by rendezvous hashing (None: no member)."""
    found = _rank(partition, members, 1)
    return found[0] if found else None


class Shard(LeaseBoard):
    """Placement of keys on live members (module docstring)."""

    MAP = SHARD_MAP

    def __init__(self, node: BuiltinHost, config: ShardConfig | None = None) -> None:
        super().__init__(node, config or ShardConfig())
        self.config: ShardConfig
        self.ring_size: int = self.config.ring_size
        self.stats = ShardStats()
        self._member = False
        self._members: tuple[str, ...] = ()
        self._owned: frozenset[int] = frozenset()
        self._feeds: set[Feed[Event]] = set()
        self._mismatched: set[str] = set()
        self._placement_changed = trio.Event()
        self._placing = trio.Lock()

    # --- joining ------------------------------------------------------------------------

    async def open(self, *, member: bool = True) -> None:
        """Host the shard's map; with `member`, take part in placement from now on.

        Waits for a first comparison with a peer (at most a TTL; not when no other node
        hosts the shard) to see the live members, and raises `RingSizeMismatch` if they use
        another ring size.
        """
        the_map = await self._ensure()
        if not member or self._member:
            return
        await self.caught_up.wait()  # set within a TTL
        others = self._ring_sizes()
        if others:
            listed = ", ".join(f"{n} ({size})" for n, size in sorted(others.items())[:5])
            raise RingSizeMismatch(
                f"this node's shard ring size is {self.ring_size}, but live members use "
                f"another: {listed}; every member needs the same ring_size"
            )
        self._member = True
        await self._renew(the_map)
        await self._on_change()  # placement includes this node on return

    def _ring_sizes(self) -> dict[str, Any]:
        """Live members whose ring size is not ours: node id -> their size."""
        live = self.live_nodes()
        return {
            n: lease.get("ring")
            for n, lease in self.leases().items()
            if n in live and n != self.node.id and lease.get("ring") != self.ring_size
        }

    # --- placement ------------------------------------------------------------------------

    def partition(self, key: str | bytes) -> int:
        """The partition of `key` (the same on every node with this ring size)."""
        return partition_of(key, self.ring_size)

    def members(self) -> list[str]:
        """The live members, as this node sees them (a local read)."""
        self._check_open()
        return list(self._members)

    def partition_owners(self, partition: int, n: int = 1) -> list[str]:
        """The first `n` members ranked by rendezvous hashing for `partition`."""
        if not 0 <= partition < self.ring_size:
            raise ValueError(f"partition {partition} is not in 0..{self.ring_size - 1}")
        self._check_open()
        return _rank(partition, self._members, n)

    def owners(self, key: str | bytes, n: int = 1) -> list[str]:
        """The `n` members that own `key`, first the primary (fewer if fewer are live)."""
        return self.partition_owners(self.partition(key), n)

    def place(self, key: str | bytes) -> str | None:
        """The member that owns `key`, or None while no member is live."""
        found = self.owners(key, 1)
        return found[0] if found else None

    def is_owner(self, key: str | bytes) -> bool:
        """Whether this node owns `key` now."""
        return self.partition(key) in self._owned

    def owned(self) -> frozenset[int]:
        """The partitions this node owns now."""
        return self._owned

    @contextlib.asynccontextmanager
    async def events(self) -> AsyncIterator[Feed[Event]]:
        """This node's `Acquired` / `Released` events, from now on."""
        await self._ensure()
        feed = Feed[Event](max_items=2 * MAX_RING, max_bytes=2**62)
        self._feeds.add(feed)
        try:
            yield feed
        finally:
            self._feeds.discard(feed)
            feed.close()

    async def wait_changed(self, timeout: float) -> None:
        """Return once placement changed (the live members), or after `timeout`."""
        changed = self._placement_changed
        with trio.move_on_after(timeout):
            await changed.wait()

    # --- the lease board's hooks -------------------------------------------------------------

    def _active(self) -> bool:
        return self._member

    def _lease_extra(self) -> dict[str, Any]:
        return {"ring": self.ring_size}

    async def _on_change(self) -> None:
        # One at a time (`open` calls it too): a call that found the members unchanged
        # must not return while another still computes what they own.
        async with self._placing:
            await self._place()

    async def _place(self) -> None:
        others = self._ring_sizes()
        for node_id in others.keys() - self._mismatched:
            self.stats.ring_mismatches += 1
            log.error(
                "shard: member %s uses ring size %r, this node %d: left out of placement",
                node_id,
                others[node_id],
                self.ring_size,
            )
        self._mismatched = set(others)
        members = tuple(sorted(self.live_nodes() - others.keys()))
        if members == self._members:
            return
        owned: set[int] = set()
        if self._member:
            me = self.node.id
            for p in range(self.ring_size):
                if rank_owner(p, members) == me:
                    owned.add(p)
                if p % 256 == 255:
                    # A large ring over many members takes a while: let the loop run.
                    await trio.lowlevel.checkpoint()
        # Members and what this node owns change together (a cancelled computation
        # leaves both as they were, and the next call does it again).
        gained, lost = owned - self._owned, self._owned - owned
        self._members = members
        self._owned = frozenset(owned)
        self.stats.acquired += len(gained)
        self.stats.released += len(lost)
        events: list[Event] = [Released(p) for p in sorted(lost)]
        events += [Acquired(p) for p in sorted(gained)]
        for feed in list(self._feeds):
            for event in events:
                feed.offer(event)
        self._placement_changed.set()
        self._placement_changed = trio.Event()
