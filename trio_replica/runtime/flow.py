"""Flow control inside a node: budgets, pressure, fair inboxes, subscriber feeds, admission.

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
  as the receiver processes them (link.py), so a peer never has more than its window
  unprocessed here and the backlog waits in its own outbox, where it slows its own
  writers; a peer that sends beyond its credit is failed. Control messages are bounded by
  the peer's share of a component's `FairInbox`: past it, its reader stops reading. A
  component serves its sources round-robin, so one busy peer delays the others by at most
  one input each. A node that falls behind thus slows the writers upstream of it, hop by
  hop.
* **A member's own broadcasts** are limited where they enter the tree. A node caps what
  each peer *originates* through it (`OriginationLimit`: broadcasts and bytes per second)
  while the cluster is congested as the node sees it: its pressure held now or within
  `congestion_hold`, or the queueing delay of the *other* origins' deliveries over
  `congestion_delay`. Downstream congestion reaches a first hop as credit that comes back
  slowly, so its pressure comes and goes: a cap that followed it instant by instant let a
  flood through between two holds (6 nodes on 2 cores, a member flooding tiny gossips
  within its credit: 83-90% of honest deliveries within 2 s, p99 3-6 s; with the hold:
  100%, p99 37 ms). An uncongested cluster lets a single busy writer run at full speed;
  forwarded traffic is never capped (it was admitted at its own first hop).
* **The node's own components** never block: they run protocol rules synchronously.
  What they cannot queue is reported, not dropped: an eager push that does not fit its
  link's outbox becomes a lazy push (the Plumtree core announces it with an IHAVE and the
  peer grafts it when it has room), and a subscriber that does not keep up loses events
  counted in its `Feed`, then receives `Lagged(missed)` where they went missing (a replica
  answers it with a sync pull).

Queueing delay. A message id carries its origin's clock, so each delivery gives a one-way
delay; its excess over the smallest delay seen recently from that origin is time spent in
queues, clock offsets cancelling out (LEDBAT's method, RFC 6817). `QueueingDelay` filters
it with minima, per origin and then over origins, so that neither a burst of late messages
from one origin nor a member stamping its messages in the past moves it. It lengthens
Plumtree's repair timers (`Plumtree.set_delay_allowance`: a payload that is only queued
must not be grafted, or it is duplicated), tells a first hop the cluster is congested,
and can pace the node's writers (`WritePacer`, `delay_target`). Pacing is off by default:
with one tree per origin and timers that allow for queueing it is not what keeps the tree
whole (10 writers at full speed: RMR 0.01-0.02 after a warm-up either way), and writers
that yield to delay only leave more room to a member that does not.

What was tried and measured, and why it is not here: readers that held frames of payloads
while the links they would be forwarded on were congested (some link is always congested
under load: every reader waited on the others, 36 writes/s, links failing on send
timeouts); admitting a peer's broadcasts at the first hop's own pace (one hop from their
origin, a flooder's messages are the least delayed the victim sees: its pace stayed at
full speed).
"""

from __future__ import annotations

import collections
import enum
import math
import random
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

import attrs
import trio
from trio.lowlevel import ParkingLot, cancel_shielded_checkpoint, checkpoint_if_cancelled

from ..core.events import Lagged
from ..core.tokens import TokenBucket
from ..errors import ConfigError

T = TypeVar("T")

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
    #: default) turns pacing off. It yields to members that do not pace (module docstring),
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
    below; writers `wait_clear` before they produce.
    """

    def __init__(self) -> None:
        self._holders: dict[Hashable, str] = {}
        self._changed = ParkingLot()
        self._released_at = -math.inf

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


@attrs.define
class _Origin:
    """What `QueueingDelay` keeps per origin."""

    #: Smallest delay this history period, and in the one before.
    base_now: float
    base_before: float
    period: int
    #: Its last few queueing samples, and when the last came (local ms).
    recent: collections.deque[float]
    last_ms: int


class QueueingDelay:
    """Queueing delay of deliveries, from one-way delays (module docstring; LEDBAT's method).

    `observe(origin, sent_ms, now_ms)` takes a delivery's origin, the wall time in its id
    and the local wall time; the delay minus the smallest one from that origin in the last
    one to two `history` periods is that delivery's queueing. As in LEDBAT, samples are
    filtered by taking minima: per origin over its last `window` samples, then over the
    origins heard from in the last `recent` ms. When queues build here every origin's
    deliveries are late; a burst of late messages from one origin (repaired upstream) is
    not, and neither is an origin that stamps its messages in the past to make this node's
    writers slow down: one origin can only raise its own value. Delays beyond `max_skew`
    either way are not samples (a stamp that far off is a clock problem or a lie).
    `current_ms` is the filtered delay, `recent_max_ms` its largest value of the last
    second or so. Sans-IO: times come from the caller; at most `max_origins` origins.
    """

    def __init__(
        self,
        *,
        history: float = 60.0,
        window: int = 4,
        recent: float = 1.0,
        max_skew: float = 60.0,
        max_origins: int = 1024,
    ) -> None:
        self._history_ms = history * 1000
        self._window = window
        self._recent_ms = recent * 1000
        self._max_skew_ms = max_skew * 1000
        self._max_origins = max_origins
        self._origins: collections.OrderedDict[str, _Origin] = collections.OrderedDict()
        #: The filtered queueing delay, in ms.
        self.current_ms = 0.0
        self._computed_ms = -math.inf
        # The origin with the lowest value, and the next lowest value (`excluding`).
        self._lowest_origin = ""
        self._second_ms = 0.0
        # Largest filtered delay in the current and the previous half second.
        self._max_now = self._max_before = 0.0
        self._max_slot = 0
        self.samples = 0
        #: Deliveries whose stamp was too far from our clock to be a sample.
        self.implausible = 0

    @property
    def recent_max_ms(self) -> float:
        """The largest filtered queueing delay of the last half second to second."""
        return max(self._max_now, self._max_before)

    def excluding(self, origin: str) -> float:
        """The filtered delay without `origin`'s deliveries (ms): the congestion the others'
        traffic meets. Near its first hop a flooding origin's own messages are the least
        delayed of all, and would hide the congestion it causes."""
        return self._second_ms if origin == self._lowest_origin else self.current_ms

    def observe(self, origin: str, sent_ms: int, now_ms: int) -> float:
        delay = float(now_ms - sent_ms)
        if abs(delay) > self._max_skew_ms:
            self.implausible += 1
            return self.current_ms
        period = int(now_ms // self._history_ms)
        state = self._origins.get(origin)
        if state is None:
            if len(self._origins) >= self._max_origins:
                self._origins.popitem(last=False)
            state = _Origin(delay, delay, period, collections.deque(maxlen=self._window), now_ms)
            self._origins[origin] = state
        else:
            if period != state.period:
                state.base_before = state.base_now if period == state.period + 1 else delay
                state.base_now, state.period = delay, period
            state.base_now = min(state.base_now, delay)
            self._origins.move_to_end(origin)
        state.recent.append(delay - min(state.base_now, state.base_before))
        state.last_ms = now_ms
        self.samples += 1
        # The minimum over origins costs one pass over them: at most every 20 ms.
        if now_ms - self._computed_ms >= 20:
            self._computed_ms = now_ms
            horizon = now_ms - self._recent_ms
            lowest, lowest_origin, second = math.inf, "", math.inf
            # Most recently heard first (the dict is kept in that order): stop at the first
            # origin not heard from lately.
            for name, state in reversed(self._origins.items()):
                if state.last_ms < horizon:
                    break
                value = min(state.recent)
                if value < lowest:
                    lowest, lowest_origin, second = value, name, lowest
                elif value < second:
                    second = value
            self.current_ms = lowest if lowest != math.inf else 0.0
            self._lowest_origin = lowest_origin
            self._second_ms = second if second != math.inf else self.current_ms
        slot = int(now_ms // 500)
        if slot != self._max_slot:
            self._max_before = self._max_now if slot == self._max_slot + 1 else 0.0
            self._max_now, self._max_slot = 0.0, slot
        self._max_now = max(self._max_now, self.current_ms)
        return self.current_ms


class WritePacer:
    """Spaces the node's writes so that the queueing delay of deliveries stays near `target`.

    Each delivery's filtered queueing delay (`QueueingDelay`) stretches the interval
    between two local writes in proportion to how far it is above the target, and shrinks
    it as far as it is below, a little per sample (LEDBAT adjusts its window the same way);
    the interval is 0 (no pacing) until the delay first passes the target. A write waits
    for its turn in `wait_turn`. Smooth on purpose: the delay shows only once the queue has
    formed, and stop-and-go pauses overshoot both ways.
    """

    #: Per-sample gain: at twice the target, 35 samples double the interval.
    GAIN = 0.02
    MIN_INTERVAL = 0.0001

    def __init__(self, *, target: float, max_interval: float, rng: random.Random) -> None:
        self.target = target
        self.max_interval = max_interval
        self._rng = rng
        self.interval = 0.0
        self._next = -math.inf
        #: Seconds writes waited for their turn, in all.
        self.waited = 0.0

    def sample(self, queueing: float) -> None:
        """One delivery's filtered queueing delay, in seconds."""
        if self.target <= 0:
            return
        ratio = min(max((queueing - self.target) / self.target, -1.0), 4.0)
        if ratio > 0:
            interval = max(self.interval, self.MIN_INTERVAL) * (1 + self.GAIN * ratio)
            self.interval = min(interval, self.max_interval)
        elif self.interval:
            self.interval *= 1 + self.GAIN * ratio
            if self.interval < self.MIN_INTERVAL:
                self.interval = 0.0

    async def wait_turn(self) -> None:
        """Return at this write's turn (a checkpoint either way)."""
        now = trio.current_time()
        turn = max(now, self._next)
        # Jittered +-50%: paced alike, the writers of all nodes would fall into step and
        # broadcast all at once.
        self._next = turn + self.interval * (0.5 + self._rng.random())
        if turn > now:
            self.waited += turn - now
            await trio.sleep_until(turn)
        else:
            await trio.lowlevel.checkpoint()


class OriginationLimit:
    """How fast each peer may originate broadcasts through this node (module docstring).

    Token buckets per peer, one for broadcasts and one for their bytes, each holding one
    second of its rate. `admit(peer, size)` returns at once while the peer is within both,
    and otherwise sleeps until it is (its reader then reads nothing meanwhile). Sans-IO but
    for that sleep; `rate` 0 turns the limit off.
    """

    def __init__(self, *, rate: float, bytes_rate: float) -> None:
        self.rate = rate
        self.bytes_rate = bytes_rate
        #: Per peer: (broadcasts, bytes), each holding one second of its rate.
        self._buckets: dict[Hashable, tuple[TokenBucket, TokenBucket]] = {}
        #: Broadcasts that had to wait, and the seconds they waited, in all.
        self.limited = 0
        self.waited = 0.0

    async def admit(self, peer: Hashable, size: int) -> None:
        if not self.rate:
            return
        now = trio.current_time()
        buckets = self._buckets.get(peer)
        if buckets is None:
            buckets = self._buckets[peer] = (
                TokenBucket(rate=self.rate, capacity=self.rate),
                TokenBucket(rate=self.bytes_rate, capacity=self.bytes_rate),
            )
        messages, octets = buckets
        # A broadcast larger than a second's bytes goes once the bucket is full.
        wait = max(messages.take(1, now), octets.take(min(size, self.bytes_rate), now))
        if wait > 0:
            self.limited += 1
            self.waited += wait
            await trio.sleep(wait)

    def forget(self, peer: Hashable) -> None:
        self._buckets.pop(peer, None)


# --- fair inbox ----------------------------------------------------------------------------


#: Told when an input that carried link credit leaves a `FairInbox` (source, credit).
OnTaken = Callable[[Hashable, int], None]


@attrs.define(eq=False)
class _SourceQueue(Generic[T]):
    #: (input, size, credit) in arrival order.
    items: collections.deque[tuple[T, int, int]] = attrs.Factory(collections.deque)
    bytes: int = 0
    room: ParkingLot = attrs.Factory(ParkingLot)


class FairInbox(Generic[T]):
    """Inputs of one consumer from many sources, bounded per source, served round-robin.

    A source (a link, or a local producer) may have `source_items` inputs and
    `source_bytes` bytes waiting; all sources together `total_bytes`. An input that would
    pass a bound is refused by `put_nowait` and waited for by `put`, except that a source
    with nothing waiting is always admitted one input (so one large frame always fits).
    `put_forced` admits regardless, for producers that already waited elsewhere. `get`
    takes from the sources in turn, so one busy source cannot delay the others by more
    than one input each. An input may carry `credit` (the bytes of a payload message whose
    link grants credit back once it is processed): `on_taken(source, credit)` is called
    when it leaves the inbox.
    """

    def __init__(
        self,
        *,
        source_items: int,
        source_bytes: int,
        total_bytes: int,
        pressure: Pressure | None = None,
        high_items: int = 0,
        on_taken: OnTaken | None = None,
    ) -> None:
        self._on_taken = on_taken
        self.source_items = source_items
        self.source_bytes = source_bytes
        self.total_bytes = total_bytes
        #: With `pressure`: held while `high_items` or more inputs wait (the consumer is
        #: behind: producers that can wait should).
        self._pressure = pressure
        self._high_items = high_items
        self._queues: dict[Hashable, _SourceQueue[T]] = {}
        #: Sources with inputs waiting, in serving order.
        self._turns: collections.deque[Hashable] = collections.deque()
        self._items = 0
        self._bytes = 0
        self._readable = ParkingLot()
        #: Producers waiting for the total bound (not their own share).
        self._room = ParkingLot()
        #: Inputs refused or waited for, because of the source's share or the total.
        self.throttled = 0

    def __len__(self) -> int:
        return self._items

    @property
    def bytes(self) -> int:
        return self._bytes

    def sources(self) -> int:
        return len(self._turns)

    def depth(self, source: Hashable) -> int:
        queue = self._queues.get(source)
        return len(queue.items) if queue is not None else 0

    def has_room(self, source: Hashable, size: int) -> bool:
        queue = self._queues.get(source)
        if queue is None or not queue.items:
            return True
        return (
            len(queue.items) < self.source_items
            and queue.bytes + size <= self.source_bytes
            and self._bytes + size <= self.total_bytes
        )

    def put_nowait(self, source: Hashable, item: T, size: int, credit: int = 0) -> bool:
        if not self.has_room(source, size):
            self.throttled += 1
            return False
        self.put_forced(source, item, size, credit)
        return True

    async def put(self, source: Hashable, item: T, size: int, credit: int = 0) -> None:
        """Queue `item`, waiting while `source` is over its share or the inbox is full."""
        await self.wait_room(source, size)
        self.put_forced(source, item, size, credit)

    async def wait_room(self, source: Hashable, size: int = 0) -> None:
        """Return once `source` may queue an input of `size` bytes; a checkpoint either way.

        Producers of one source are expected to take turns (a link has one reader); several
        waking at once may pass the bounds by one input each.
        """
        await checkpoint_if_cancelled()
        if self.has_room(source, size):
            await cancel_shielded_checkpoint()
            return
        self.throttled += 1
        while not self.has_room(source, size):
            queue = self._queues.get(source)
            if queue is not None and (
                len(queue.items) >= self.source_items or queue.bytes + size > self.source_bytes
            ):
                await queue.room.park()
            else:
                await self._room.park()

    def put_forced(self, source: Hashable, item: T, size: int, credit: int = 0) -> None:
        queue = self._queues.get(source)
        if queue is None:
            queue = self._queues[source] = _SourceQueue()
        if not queue.items:
            self._turns.append(source)
        queue.items.append((item, size, credit))
        queue.bytes += size
        self._items += 1
        self._bytes += size
        self._readable.unpark()
        if self._pressure is not None and self._items >= self._high_items:
            self._pressure.hold(self, "inbox")

    def get_nowait(self) -> T:
        if not self._turns:
            raise trio.WouldBlock
        source = self._turns.popleft()
        queue = self._queues[source]
        item, size, credit = queue.items.popleft()
        queue.bytes -= size
        self._items -= 1
        was_full = self._bytes > self.total_bytes - self.source_bytes
        self._bytes -= size
        if queue.items:
            self._turns.append(source)
        elif not queue.room:
            # Nobody waits on it: forget the source (links come and go).
            del self._queues[source]
        if queue.room:
            queue.room.unpark()
        if was_full and self._room:
            self._room.unpark_all()
        if self._pressure is not None and self._items < self._high_items:
            self._pressure.release(self)
        if credit and self._on_taken is not None:
            self._on_taken(source, credit)
        return item

    async def get(self) -> T:
        await checkpoint_if_cancelled()
        while not self._turns:
            await self._readable.park()
        item = self.get_nowait()
        await cancel_shielded_checkpoint()
        return item

    async def wait(self) -> None:
        """Return once an input is waiting, or `wake` was called; a checkpoint either way."""
        if self._turns:
            await trio.lowlevel.checkpoint()
        else:
            await self._readable.park()

    def wake(self) -> None:
        """End a consumer's `wait` without an input (it has other work: notices, timers)."""
        self._readable.unpark_all()


# --- subscriber feeds ----------------------------------------------------------------------


class Offer(enum.Enum):
    """What became of an event offered to a `Feed`."""

    KEPT = "kept"
    MISSED = "missed"
    GONE = "gone"


class Feed(Generic[T]):
    """One subscriber's buffer: the source offers without ever waiting, the subscriber receives.

    Bounded by `max_items` and `max_bytes` (an event larger than `max_bytes` is kept when
    the buffer is empty). An event that does not fit is counted as missed, and the
    subscriber then receives a `Lagged(missed)` exactly where the events went missing.
    With `pressure`, the feed holds it while it is at least half full, so that the node's
    writers and readers slow down before this subscriber loses anything (replicas use
    this; an application's subscription does not, so a subscriber that stops reading never
    stalls the node).
    """

    def __init__(self, *, max_items: int, max_bytes: int, pressure: Pressure | None = None) -> None:
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._pressure = pressure
        self._items: collections.deque[tuple[T | Lagged, int]] = collections.deque()
        self._bytes = 0
        self._missed = 0
        self._lot = ParkingLot()
        self._source_closed = False
        self._receiver_closed = False
        #: Events missed in all (never reset; `Lagged` carries each run of misses).
        self.missed_total = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        return self._receiver_closed

    def offer(self, event: T, size: int = 0) -> Offer:
        """Keep `event` for the subscriber if it fits; never blocks."""
        if self._receiver_closed:
            return Offer.GONE
        if self._source_closed:
            raise trio.ClosedResourceError("the source closed this feed")
        items = self._items
        if items and (len(items) >= self.max_items or self._bytes + size > self.max_bytes):
            self._missed += 1
            self.missed_total += 1
            return Offer.MISSED
        if self._missed:
            items.append((Lagged(self._missed), 0))
            self._missed = 0
        items.append((event, size))
        self._bytes += size
        self._lot.unpark()
        self._check_pressure()
        return Offer.KEPT

    def note_missed(self, count: int) -> None:
        """Events this subscriber should have had were lost before reaching the source."""
        if self._receiver_closed or count <= 0:
            return
        self._missed += count
        self.missed_total += count
        self._lot.unpark()

    def close_source(self) -> None:
        """The source is gone (crashed or closing): the subscriber drains, then sees the end."""
        self._source_closed = True
        self._lot.unpark_all()
        self._release()

    def close(self) -> None:
        """The subscriber is done: drop what is buffered; the source forgets the feed."""
        self._receiver_closed = True
        self._items.clear()
        self._bytes = 0
        self._lot.unpark_all()
        self._release()

    def receive_nowait(self) -> T | Lagged:
        if self._receiver_closed:
            raise trio.ClosedResourceError("this feed was closed")
        if self._items:
            event, size = self._items.popleft()
            self._bytes -= size
            self._check_pressure()
            return event
        if self._missed:
            # The losses came after everything delivered: say so before waiting for more.
            missed, self._missed = self._missed, 0
            return Lagged(missed)
        if self._source_closed:
            raise trio.EndOfChannel
        raise trio.WouldBlock

    async def receive(self) -> T | Lagged:
        """The next event, a `Lagged` notice, or `trio.EndOfChannel` once the source closed."""
        await checkpoint_if_cancelled()
        while True:
            try:
                event = self.receive_nowait()
            except trio.WouldBlock:
                await self._lot.park()
                continue
            await cancel_shielded_checkpoint()
            return event

    def __aiter__(self) -> Feed[T]:
        return self

    async def __anext__(self) -> T | Lagged:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    def _check_pressure(self) -> None:
        if self._pressure is None:
            return
        if 2 * len(self._items) >= self.max_items or 2 * self._bytes >= self.max_bytes:
            self._pressure.hold(self, "subscriber")
        else:
            self._pressure.release(self)

    def _release(self) -> None:
        if self._pressure is not None:
            self._pressure.release(self)


class Fanout(Generic[T]):
    """The feeds of one source's subscribers: offer each event to all, forget the gone ones.

    One loop for the membership events, the broadcast deliveries of a tag and a map's
    change events; every event a subscriber misses is counted by `on_missed`.
    """

    def __init__(self) -> None:
        self.feeds: list[Feed[T]] = []

    def __len__(self) -> int:
        return len(self.feeds)

    def add(self, feed: Feed[T]) -> None:
        self.feeds.append(feed)

    def discard(self, feed: Feed[T]) -> None:
        if feed in self.feeds:
            self.feeds.remove(feed)

    def publish(self, event: T, size: int = 0) -> int:
        """Offer `event` to every feed; return how many missed it."""
        missed = 0
        gone = False
        for feed in self.feeds:
            outcome = feed.offer(event, size)
            if outcome is Offer.MISSED:
                missed += 1
            elif outcome is Offer.GONE:
                gone = True
        if gone:
            self.feeds = [feed for feed in self.feeds if not feed.closed]
        return missed

    def close_all(self) -> None:
        """The source died: every subscriber sees its feed end (then re-subscribes)."""
        for feed in self.feeds:
            feed.close_source()
        self.feeds = []
