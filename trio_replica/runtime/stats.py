"""Counters of one node: traffic by message kind, rejections, refusals, failures and drops.

Plain integers updated synchronously on the hot path (no locks: Trio runs one task at a
time); `snapshot()` copies them into a JSON-friendly dict for `node.stats()`, the control
path and the metrics exporter.
"""

from __future__ import annotations

import collections
import logging
from typing import Any

import attrs

from ..core.messages import Message

log = logging.getLogger("trio_replica.stats")


def _counter() -> collections.Counter[str]:
    return collections.Counter()


@attrs.define
class NodeStats:
    """Every counter of a node. Message counters are keyed by message class name."""

    messages_sent: collections.Counter[str] = attrs.field(factory=_counter)
    bytes_sent: collections.Counter[str] = attrs.field(factory=_counter)
    messages_received: collections.Counter[str] = attrs.field(factory=_counter)
    bytes_received: collections.Counter[str] = attrs.field(factory=_counter)
    frames_sent: int = 0
    frame_bytes_sent: int = 0
    frames_received: int = 0
    frame_bytes_received: int = 0
    #: Frames or messages refused by the decoder or a validator, by reason.
    rejected: collections.Counter[str] = attrs.field(factory=_counter)
    #: Handshakes refused (either side), by reason.
    handshakes_refused: collections.Counter[str] = attrs.field(factory=_counter)
    #: Links that ended, by reason (idle_timeout, peer_closed, send_timeout, ...).
    links_closed: collections.Counter[str] = attrs.field(factory=_counter)
    #: Dials that failed, by reason.
    dial_failures: collections.Counter[str] = attrs.field(factory=_counter)
    #: Messages not sent or not delivered, by reason; nothing is dropped without a count here.
    drops: collections.Counter[str] = attrs.field(factory=_counter)
    #: Flow-control events of the runtime (waits that expired, ...), by kind.
    flow: collections.Counter[str] = attrs.field(factory=_counter)
    links_established: int = 0

    def message_sent(self, message: Message, size: int) -> None:
        kind = type(message).__name__
        self.messages_sent[kind] += 1
        self.bytes_sent[kind] += size

    def message_received(self, message: Message, size: int) -> None:
        kind = type(message).__name__
        self.messages_received[kind] += 1
        self.bytes_received[kind] += size

    def frame_sent(self, size: int) -> None:
        self.frames_sent += 1
        self.frame_bytes_sent += size

    def frame_received(self, size: int) -> None:
        self.frames_received += 1
        self.frame_bytes_received += size

    def reject(self, reason: str) -> None:
        self.rejected[reason] += 1

    def drop(self, reason: str, message: Message | None = None, *, count: int = 1) -> None:
        key = reason if message is None else f"{reason}:{type(message).__name__}"
        self.drops[key] += count

    def snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for field in attrs.fields(NodeStats):
            value = getattr(self, field.name)
            out[field.name] = dict(value) if isinstance(value, collections.Counter) else value
        return out
