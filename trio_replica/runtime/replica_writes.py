"""The owner's writes to a replica instance: `ReplicaWriter`, owned by the driver.

`broadcast_update(Add(key, value) | Remove(key))` first waits for the node's outgoing
budget (flow control: a writer faster than the cluster is slowed here, before anything is
applied), then mints one HLC dot for the write, hands the delta to the owner's
`merge_local` or `merge_delta` (so the local state holds exactly the entry the cluster
gets, and a persistent owner acknowledges only once it is durable), then queues its broadcast on the
instance's tag without waiting again. `broadcast_custom(payload)` carries an
owner-specific payload to `merge_custom` on every other node.
"""

from __future__ import annotations

from typing import Any, Protocol

import trio

from ..core.hlc import Timestamp
from ..core.messages import MessageId
from ..core.ormap import Dot, Entry
from ..core.wire import decode_payload, encode_payload
from ..errors import NodeClosed
from .replica_api import Add, Remove, ReplicaCallbacks, ReplicaStats
from .services import NodeBasics, Publishing


class WriterHost(NodeBasics, Publishing, Protocol):
    """What the write path uses of its node."""

    async def writable(self) -> None: ...
    def broadcast_encoded_nowait(self, tag: str, encoded: bytes, payload: Any) -> MessageId: ...
    def sign_entry(self, name: str, key: Any, entry: Entry) -> bytes: ...


class ReplicaWriter:
    """Writes of the owner of one instance, broadcast on its `tag` (module docstring).

    Refused with `NodeClosed` once the driver is closed or `scope` (its run) is cancelled.
    """

    def __init__(
        self,
        node: WriterHost,
        name: str,
        tag: str,
        callbacks: ReplicaCallbacks,
        stats: ReplicaStats,
        closed: trio.Event,
        scope: trio.CancelScope,
    ) -> None:
        self._node = node
        self._name = name
        self._tag = tag
        self._callbacks = callbacks
        self._stats = stats
        self._closed = closed
        self._scope = scope

    def new_dot(self) -> Dot:
        ts: Timestamp = self._node.clock.now()
        return Dot(self._node.id, ts)

    async def broadcast_update(self, update: Add | Remove) -> Dot:
        """Apply `update` locally through the owner, then broadcast it; return its dot.

        Raises what the owner's `merge_local` / `merge_delta` raises for a local write
        (nothing is sent then), `MessageTooLarge` or `TypeError` for a value that cannot travel.
        """
        from ..core.ormap import Tombstone, Value
        from ..core.ormap_wire import to_wire

        self._check_open()
        # Flow control first: once applied here, the write must go out without waiting.
        await self._node.writable()
        self._check_open()
        dot = self.new_dot()
        entry = Value(update.value, dot) if isinstance(update, Add) else Tombstone(dot)
        delta = to_wire([(update.key, entry)])
        if self._node.config.identity.sign_broadcasts:
            # The entry itself is signed, not only the broadcast: it keeps its writer's
            # signature in every later sync and in the stores of the nodes it reaches.
            delta[0].append(self._node.sign_entry(self._name, update.key, entry))
        body = ["d", delta]
        # Encode before the local merge: a write that cannot travel must not be applied here.
        encoded = encode_payload(body, max_size=self._node.config.max_payload)
        # The owner gets the delta as every peer does, decoded from these bytes: a value the
        # caller mutates after the write can change neither the local state nor its digest
        # (an entry's hash is added at merge and subtracted at its replacement).
        local = decode_payload(encoded, max_size=self._node.config.max_payload)[1]
        merge = getattr(self._callbacks, "merge_local", None) or self._callbacks.merge_delta
        await merge(self._name, local)
        self._node.broadcast_encoded_nowait(self._tag, encoded, body)
        self._stats.deltas_sent += 1
        return dot

    async def broadcast_custom(self, payload: Any) -> None:
        """Send an owner-specific payload to `merge_custom` on every other node."""
        self._check_open()
        await self._node.broadcast(self._tag, ["c", payload])
        self._stats.customs_sent += 1

    def _check_open(self) -> None:
        if self._closed.is_set() or self._scope.cancel_called:
            raise NodeClosed(f"replica {self._name!r} is closed")
