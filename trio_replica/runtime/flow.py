"""Flow control inside a node: its budgets (`FlowConfig`), its `Pressure`, and the theory.

Theory of operation
-------------------
Every buffer of a node is bounded in bytes and in items, and every producer learns when a
buffer is full instead of having its data thrown away. Producers are slowed the way each
can be:

* **Local writers** (``node.broadcast``, ``Replica.broadcast_update``, map writes) wait,
  before anything is applied, on the node's `Pressure`: until nothing of the node is over
  its high-water mark (no link outbox, no flow-controlled subscriber such as a replica's
  deliveries, not the broadcast component's backlog). The wait is a checkpoint, never a
  spin, and the writer may bound it with its own cancel scope.
* **Peers** are slowed by credit and by not being read. Payloads travel on credit granted
  as the receiver processes them (outbox.py), so a peer never has more than its window
  unprocessed here and the backlog waits in its own outbox, where it slows its own
  writers; a peer that sends beyond its credit is failed. Control messages are bounded by
  the peer's share of a component's `FairInbox`: past it, its reader stops reading. A
  component serves its sources round-robin, so one busy peer delays the others by at most
  one input each. A node that falls behind thus slows the writers upstream of it, hop by
  hop.
* **A member's own broadcasts** are limited where they enter the tree. A node caps what
  each peer *originates* through it (`OriginationLimit`: broadcasts and bytes per
  second) while the cluster is congested as the node sees it: its pressure held now or
  within `congestion_hold`, a neighbour's credit saying the same of that neighbour
  within `congestion_hold` (`Credit.congested`; never counted against the peer that said
  it: a writer whose own outbox is full would otherwise be capped for its own backlog),
  or the queueing delay of the *other* origins' deliveries over `congestion_delay`.
  Downstream congestion reaches a first hop as credit that comes back slowly, so its
  pressure comes and goes: a cap that followed it instant by instant let a flood through
  between two holds (6 nodes on 2 cores, a member flooding tiny gossips within its
  credit: 83-90% of honest deliveries within 2 s, p99 3-6 s; with the hold: 100%, p99 37
  ms). Slow credit is not enough when the next hop processes fast and congests further
  on: a neighbour grants credit as soon as it has processed a payload, whatever its own
  outboxes hold, so a first hop forwarding a member's megabyte broadcasts to a node
  whose outbox to a third is full never saw congestion, and that node's writers waited
  20-200 s (3 nodes, 96 MiB/s of flood admitted); with the flag in the credit the first
  hop holds the flood to its limit and the honest writes go through in about 1 s. The
  flag reaches one hop: congestion two hops past the first hop reaches it only as slow
  credit. An uncongested cluster lets a single busy writer run at full speed; forwarded
  traffic is never capped (it was admitted at its own first hop).
* **The node's own components** never block: they run protocol rules synchronously.
  What they cannot queue is reported, not dropped: an eager push that does not fit its
  link's outbox becomes a lazy push (the Plumtree core announces it with an IHAVE and the
  peer grafts it when it has room), and a subscriber that does not keep up loses events
  counted in its `Feed`, then receives `Lagged(missed)` where they went missing (a replica
  answers it with a sync pull).

The pieces live beside this module: `inbox` (the `FairInbox` of each component), `feeds`
(subscribers' `Feed` and `Fanout`), and `congestion` (the queueing delay of deliveries,
the `WritePacer` and the `OriginationLimit`).

What was tried and measured, and why it is not here: readers that held frames of payloads
while the links they would be forwarded on were congested (some link is always congested
under load: every reader waited on the others, 36 writes/s, links failing on send
timeouts); admitting a peer's broadcasts at the first hop's own pace (one hop from their
origin, a flooder's messages are the least delayed the victim sees: its pace stayed at
full speed).
"""

from __future__ import annotations

import collections
import math
from collections.abc import Hashable

import attrs
import trio
from trio.lowlevel import ParkingLot, cancel_shielded_checkpoint, checkpoint_if_cancelled

from ..errors import ConfigError

#: Label of counters that overflowed their bound on distinct keys (see `BoundedCounter`).
OTHER = "other"


class BoundedCounter(collections.Counter[str]):
    """A counter of at most `max_keys` distinct keys; later keys are counted under ``other``.

    For counters whose keys come from peers (tags, rounds): a flood of distinct keys must
    not grow memory, `status` replies or the Prometheus label set without bound.
    """

    def __init__(self, max_keys: int = 64) -> None:
        super().__init__()
        self.max_keys = max_keys

    def __setitem__(self, key: str, value: int) -> None:
        if key not in self and key != OTHER and len(self) >= self.max_keys - 1:
            # A new key adds `value` to a missing (zero) count: add it to ``other`` instead.
            key, value = OTHER, self.get(OTHER, 0) + value
        super().__setitem__(key, value)


@attrs.frozen
class FlowConfig:
    """Bounds of a node's inboxes, subscribers and dial queues, and its backpressure waits.

    The link outboxes are bounded by `LinkConfig`, the broadcast payload cache by
    `PlumtreeConfig.cache_max_bytes`; README "Flow control" adds them up to the node's
    memory ceiling.
    """

    #: Inputs one peer may have waiting in a component's inbox. Its reader stops reading
    #: beyond this (the peer is slowed, the TCP way); components serve peers round-robin.
    inbox_items_per_peer: int = 256
    #: Bytes one peer may have waiting in a component's inbox (at least one largest frame
    #: is always admitted when the peer has nothing waiting).
    inbox_bytes_per_peer: int = 2 * 1024 * 1024
    #: Bytes of every peer's waiting inputs together, per component.
    inbox_bytes: int = 16 * 1024 * 1024
    #: Inputs waiting in the broadcast component (all sources) at which the node's writers
    #: wait: the node is behind on forwarding, and new broadcasts would only queue.
    inbox_high_items: int = 256
    #: Queueing delay of deliveries (seconds) the node's writers are paced to; 0 (the
    #: default) turns pacing off. It yields to members that do not pace (`congestion`),
    #: and with one tree per origin and repair timers that allow for queueing it is not
    #: what keeps the tree whole (10 writers at full speed: RMR 0.01-0.02 either way). For
    #: clusters of trusted members that prefer latency to throughput; keep it well under
    #: Plumtree's timeout1 (0.5 s).
    delay_target: float = 0.0
    #: Longest interval the pacing puts between two writes of the node.
    pace_max_interval: float = 1.0
    #: Queueing delay (seconds) of the other origins' deliveries past which the node counts
    #: as congested and holds each peer to `peer_broadcast_rate` (module docstring).
    congestion_delay: float = 0.05
    #: A node whose pressure was held counts as congested for this long after (seconds):
    #: downstream congestion reaches a first hop as credit that comes back slowly, so its
    #: pressure comes and goes, and a cap that followed it instant by instant let a flood
    #: through between two holds.
    congestion_hold: float = 1.0
    #: Broadcasts per second, and their bytes, that one peer may originate through this
    #: node while the node is congested (module docstring; 0 turns the limit off). A
    #: member flooding its own broadcasts is held to it at its first hop.
    peer_broadcast_rate: float = 1000.0
    peer_broadcast_bytes_rate: float = 8 * 1024 * 1024
    #: Default bytes buffered for one subscription (deliveries or events); beyond it, and
    #: beyond `NodeConfig.subscriber_buffer` items, events are counted as missed.
    subscriber_bytes: int = 4 * 1024 * 1024
    #: Bytes of messages waiting for a link that is being dialed.
    dial_queue_bytes: int = 1024 * 1024

    def __attrs_post_init__(self) -> None:
        for name in (
            "inbox_items_per_peer",
            "inbox_bytes_per_peer",
            "inbox_bytes",
            "inbox_high_items",
            "subscriber_bytes",
            "dial_queue_bytes",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"flow.{name} must be at least 1")
        if self.peer_broadcast_rate < 0 or self.peer_broadcast_bytes_rate < 0:
            raise ConfigError("flow.peer_broadcast_rate and its bytes rate must be >= 0")
        if bool(self.peer_broadcast_rate) != bool(self.peer_broadcast_bytes_rate):
            raise ConfigError("flow.peer_broadcast_rate and its bytes rate are off together")
        if not (0 < self.congestion_delay < 10 and 0 <= self.congestion_hold <= 60):
            raise ConfigError("flow.congestion_delay must be in (0, 10) s, hold in [0, 60] s")
        if not (0 <= self.delay_target < 10 and 0 < self.pace_max_interval <= 60):
            raise ConfigError("flow.delay_target must be in [0, 10) s, pace_max_interval (0, 60] s")
        if self.inbox_bytes < self.inbox_bytes_per_peer:
            raise ConfigError("flow.inbox_bytes must be at least flow.inbox_bytes_per_peer")


# --- pressure ------------------------------------------------------------------------------


class Pressure:
    """The node's buffers that are over their high-water mark right now.

    A buffer `hold`s the pressure when it crosses its mark and `release`s it when it drains
    below; writers `wait_clear` before they produce. The node counts as `congested` while
    held and for `hold` seconds after; a neighbour's credit says whether that neighbour
    is (`peer_congested`), which is what a first hop cannot otherwise see (module
    docstring). What one neighbour says never counts against that neighbour itself: a
    writer whose own outbox is full says it is congested, and must not be capped for it.
    """

    #: Neighbours' reports kept at most (the oldest go first).
    MAX_REPORTS = 64

    def __init__(self, hold: float = 1.0) -> None:
        self.hold_seconds = hold
        self._holders: dict[Hashable, str] = {}
        self._changed = ParkingLot()
        self._released_at = -math.inf
        #: When each neighbour last said it was congested.
        self._reports: dict[Hashable, float] = {}

        #: Waits that found the node congested, by who waited.
        self.waits: collections.Counter[str] = collections.Counter()
        #: Seconds spent waiting, by who waited.
        self.waited: collections.defaultdict[str, float] = collections.defaultdict(float)

    def hold(self, key: Hashable, kind: str) -> None:
        self._holders.setdefault(key, kind)

    def release(self, key: Hashable) -> None:
        if self._holders.pop(key, None) is not None:
            if not self._holders:
                self._released_at = trio.current_time()
            self._changed.unpark_all()

    def is_clear(self) -> bool:
        return not self._holders

    def held_within(self, seconds: float) -> bool:
        """Held now, or released less than `seconds` ago."""
        return bool(self._holders) or trio.current_time() - self._released_at < seconds

    def congested(self) -> bool:
        """This node's own buffers were over their mark within `hold` seconds."""
        return self.held_within(self.hold_seconds)

    def peer_congested(self, peer: Hashable) -> None:
        """Neighbour `peer`'s credit said it is congested (`Credit.congested`)."""
        self._reports.pop(peer, None)
        self._reports[peer] = trio.current_time()
        if len(self._reports) > self.MAX_REPORTS:
            del self._reports[next(iter(self._reports))]

    def downstream_congested(self, excluding: Hashable = None) -> bool:
        """A neighbour other than `excluding` said it was congested within `hold` seconds
        (`hold` 0: never, the neighbour flag is off with the hold)."""
        since = trio.current_time() - self.hold_seconds
        return any(at > since and peer != excluding for peer, at in self._reports.items())

    def holders(self) -> collections.Counter[str]:
        """How many buffers hold the pressure, by kind (for `stats`)."""
        return collections.Counter(self._holders.values())

    async def wait_clear(self, who: str) -> None:
        """Return once nothing is over its mark; a checkpoint either way."""
        await checkpoint_if_cancelled()
        if self.is_clear():
            await cancel_shielded_checkpoint()
            return
        self.waits[who] += 1
        start = trio.current_time()
        try:
            while self._holders:
                await self._changed.park()
        finally:
            self.waited[who] += trio.current_time() - start
