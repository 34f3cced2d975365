"""The simulator's virtual network and its event loop, in virtual time.

This module owns `Network`, the base of `sim.overlay.Simulator`: an event loop in virtual
time (no trio, no sockets, no wall clock) and the links between nodes. The network model is the
runtime's, reduced to what the cores can observe:

* A link joins two nodes; `Send` opens one if needed (a dial) and messages on it arrive in
  order after the pair's latency (drawn once per pair and fixed, so each direction is
  FIFO without further bookkeeping). A dial to a crashed, unknown or
  partitioned node fails: the sender gets `handle_link_down` after `dial_fail_delay`.
* `CloseLink` lets what the closer queued before it drain, then the other side gets
  `handle_link_down` (as it would see the websocket close); what that side had in flight
  towards the closer is lost.
* A crash (or a partition cutting a link) silences the link at once; each live endpoint
  gets `handle_link_down` after `detect_delay`, the ping timeout of the real runtime.
* `loss` drops a fraction of messages silently, to exercise the cores' timeouts (the real
  transport is reliable: there a loss is a link failure).

What a node does with a message or a lost link is the simulator's: `Network` hands them to
`_receive` and `_link_down`.
"""

from __future__ import annotations

import abc
import heapq
import random
from bisect import insort
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Sequence
from operator import itemgetter
from typing import Any, Generic, Protocol, TypeVar

import attrs

from ..core.messages import Message, Peer

__all__ = ["NetNode", "Network", "NetworkConfig"]


@attrs.frozen
class NetworkConfig:
    """The virtual network's behaviour; times in seconds."""

    #: One-way latency of a pair of nodes, drawn uniformly once per pair.
    latency_min: float = 0.005
    latency_max: float = 0.050
    #: Fraction of messages dropped silently (0 = reliable links, as over TCP).
    loss: float = 0.0
    #: Delay before a failed dial is reported (connection refused or timed out).
    dial_fail_delay: float = 1.0
    #: Delay before a link to a crashed or cut-off peer is reported down (ping timeout).
    detect_delay: float = 3.0
    #: Period of the idle-link sweep; 0 turns it off.
    idle_sweep_interval: float = 10.0


class NetNode(Protocol):
    """What the network reads and keeps of a node (`sim.overlay.SimNode` is one)."""

    peer: Peer
    alive: bool
    life: int
    links: set[tuple[str, str]]

    @property
    def id(self) -> str: ...


N = TypeVar("N", bound=NetNode)

#: A timed event: (time, sequence number, action, its arguments). Events run in (time,
#: sequence) order: at equal times, in the order they were scheduled.
_Event = tuple[float, int, Callable[..., None], tuple[Any, ...]]
#: The event calendar's buckets per second of virtual time (a power of two: exact).
_BUCKETS_PER_SECOND = 256.0


#: An event's time: the calendar's sort key.
_when = itemgetter(0)


def _by_name(counts: Counter[type]) -> Counter[str]:
    named: Counter[str] = Counter()
    for kind, count in counts.items():
        named[kind.__name__] += count
    return named


@attrs.define(eq=False)
class _Link:
    key: tuple[str, str]
    #: The pair's, for good: a message never overtakes one sent before it.
    latency: float
    inc: int = 0
    open: bool = False
    #: Silenced by a crash or a partition; detection events are scheduled.
    dead: bool = False
    in_flight: int = 0
    #: Incarnation -> id of the side that closed it, while its queued messages drain.
    closing: dict[int, str] = attrs.field(factory=dict)
    #: The nodes of `key`, in its order, once opened (a delivery reads its destination
    #: here rather than in the table of all nodes).
    ends: tuple[Any, Any] = (None, None)


class Network(abc.ABC, Generic[N]):
    """Nodes, the links between them and a calendar of timed events, drawing from `rng`.

    The calendar: events in buckets of 1/256 s by time, a heap of the bucket numbers, and
    the bucket being run, sorted, with the index of its next event. A run sorts each
    bucket once instead of sifting every event through one heap of all pending events
    (which, tens of thousands deep at 10,000 nodes, cost a sixth of the run); the order is
    the same, (time, sequence number).
    """

    def __init__(self, network: NetworkConfig, rng: random.Random) -> None:
        self.network = network
        self.rng = rng
        self.now = 0.0
        self.nodes: dict[str, N] = {}
        # Counted by message class, named when read: a class is hashed as cheaply as its
        # name and saves reading the name once per message.
        self._sent: Counter[type] = Counter()
        self._delivered: Counter[type] = Counter()
        self._dropped: Counter[type] = Counter()
        self.events_processed = 0
        self._seq = 0
        self._buckets: dict[int, list[_Event]] = {}
        self._bucket_heap: list[int] = []
        self._today: list[_Event] = []
        self._today_bucket = -1
        self._next = 0
        self._links: dict[tuple[str, str], _Link] = {}
        self._latency: dict[tuple[str, str], float] = {}
        self._failing_dials: set[tuple[str, str]] = set()
        self._groups: dict[str, int] | None = None

    @abc.abstractmethod
    def _receive(self, source: N, dest: N, message: Message) -> None:
        """`message` from `source` reached live `dest`: hand it to the node."""

    @abc.abstractmethod
    def _link_down(self, node: N, peer: Peer) -> None:
        """`node`'s link to `peer` failed or was closed by the other side."""

    # --- scenario API ---------------------------------------------------------------------

    def crash(self, node_ids: Iterable[str]) -> None:
        """Stop nodes at once, without a word to anyone; their peers detect it later."""
        for node_id in node_ids:
            node = self.nodes[node_id]
            if not node.alive:
                continue
            node.alive = False
            for key in sorted(node.links):  # sorted: set order varies with the hash seed
                link = self._links.get(key)
                if link is not None and link.open and not link.dead:
                    link.dead = True
                    other = key[0] if key[1] == node_id else key[1]
                    self._schedule(
                        self.network.detect_delay, self._detect, (link, link.inc, other, node_id)
                    )

    def partition(self, groups: Sequence[Collection[str]]) -> None:
        """Split the network: nodes talk only within their group (unlisted nodes form one
        more group). Links across groups are silenced and detected as failed."""
        self._groups = {}
        for index, group in enumerate(groups):
            for node_id in group:
                self._groups[node_id] = index
        for key, link in list(self._links.items()):
            if link.open and not link.dead and not self._reachable(*key):
                link.dead = True
                self._schedule(
                    self.network.detect_delay, self._detect, (link, link.inc, key[0], key[1])
                )
                self._schedule(
                    self.network.detect_delay, self._detect, (link, link.inc, key[1], key[0])
                )

    def heal(self) -> None:
        """End the partition: dials across former groups succeed again."""
        self._groups = None

    @property
    def sent(self) -> Counter[str]:
        """Messages sent, by message class name."""
        return _by_name(self._sent)

    @property
    def delivered(self) -> Counter[str]:
        """Messages delivered to a live node, by message class name."""
        return _by_name(self._delivered)

    @property
    def dropped(self) -> Counter[str]:
        """Messages lost (dead or cut link, failed dial, loss, no layer), by class name."""
        return _by_name(self._dropped)

    def run(self, until: float) -> None:
        """Process events in time order up to virtual time `until` (inclusive)."""
        last_bucket = until * _BUCKETS_PER_SECOND  # a float: `until` may be infinite
        today, i = self._today, self._next
        processed = 0
        try:
            while True:
                if i == len(today):
                    heap = self._bucket_heap
                    if not heap or heap[0] > last_bucket:
                        break
                    bucket = heapq.heappop(heap)
                    today = self._today = self._buckets.pop(bucket)
                    # By time alone: a bucket's events were appended in sequence order and
                    # the sort is stable, so ties keep it; comparing floats alone is
                    # several times faster than comparing the tuples.
                    today.sort(key=_when)
                    self._today_bucket = bucket
                    i = 0
                when, _, action, args = today[i]
                if when > until:
                    break
                i += 1
                self._next = i
                self.now = when
                processed += 1
                action(*args)
                today, i = self._today, self._next
        finally:
            self._next = i
            self.events_processed += processed
        self.now = max(self.now, until)

    def run_for(self, seconds: float) -> None:
        self.run(self.now + seconds)

    def open_links(self) -> int:
        return sum(1 for link in self._links.values() if link.open)

    # --- internals: links and the event queue ---------------------------------------------

    def _schedule(self, delay: float, action: Callable[..., None], args: tuple[Any, ...]) -> None:
        self._push(self.now + delay, action, args)

    def _push(self, when: float, action: Callable[..., None], args: tuple[Any, ...]) -> None:
        self._seq += 1
        event = (when, self._seq, action, args)
        bucket = int(when * _BUCKETS_PER_SECOND)
        if bucket <= self._today_bucket:
            # The bucket being run (or, for a time already past, which a heap would pop
            # next too): into its sorted rest.
            insort(self._today, event, self._next)
            return
        events = self._buckets.get(bucket)
        if events is None:
            self._buckets[bucket] = [event]
            heapq.heappush(self._bucket_heap, bucket)
        else:
            events.append(event)

    def _reachable(self, a: str, b: str) -> bool:
        groups = self._groups
        return groups is None or groups.get(a, -1) == groups.get(b, -1)

    def _link(self, a: str, b: str) -> _Link:
        key = (a, b) if a < b else (b, a)
        link = self._links.get(key)
        if link is None:
            latency = self._latency.get(key)
            if latency is None:
                net = self.network
                latency = self.rng.uniform(net.latency_min, net.latency_max)
                self._latency[key] = latency
            link = self._links[key] = _Link(key, latency)
        return link

    def _send(self, node: N, peer: Peer, message: Message) -> None:
        # The hot path of every run: one call per message, hence the inlined lookups.
        kind = type(message)
        self._sent[kind] += 1
        node_id = node.peer.id
        peer_id = peer.id
        key = (node_id, peer_id) if node_id < peer_id else (peer_id, node_id)
        link = self._links.get(key)
        if link is None:
            link = self._link(node_id, peer_id)
        if not link.open:
            target = self.nodes.get(peer_id)
            if target is None or not target.alive or not self._reachable(node_id, peer_id):
                self._dropped[kind] += 1
                dial = (node_id, peer_id)
                if dial not in self._failing_dials:
                    self._failing_dials.add(dial)
                    self._schedule(
                        self.network.dial_fail_delay, self._dial_failed, (node, node.life, peer)
                    )
                return
            link.inc += 1
            link.open = True
            link.ends = (node, target) if node_id < peer_id else (target, node)
            node.links.add(key)
            target.links.add(key)
        if link.dead or (self.network.loss and self.rng.random() < self.network.loss):
            self._dropped[kind] += 1
            return
        when = self.now + link.latency
        link.in_flight += 1
        # `_push`, inlined.
        self._seq += 1
        dest = link.ends[1] if node_id < peer_id else link.ends[0]
        event = (when, self._seq, self._deliver, (link, link.inc, node, dest, message))
        bucket = int(when * _BUCKETS_PER_SECOND)
        if bucket <= self._today_bucket:
            insort(self._today, event, self._next)
            return
        events = self._buckets.get(bucket)
        if events is None:
            self._buckets[bucket] = [event]
            heapq.heappush(self._bucket_heap, bucket)
        else:
            events.append(event)

    def _deliver(self, link: _Link, inc: int, source: N, dest: N, message: Message) -> None:
        link.in_flight -= 1
        if inc == link.inc and link.open:
            ok = not link.dead
        else:
            closer = link.closing.get(inc)
            ok = closer is not None and closer != dest.peer.id and not link.dead
        if (
            not ok
            or not dest.alive
            or (self._groups is not None and not self._reachable(source.peer.id, dest.peer.id))
        ):
            self._dropped[type(message)] += 1
            return
        self._delivered[type(message)] += 1
        self._receive(source, dest, message)

    def _dial_failed(self, node: N, life: int, peer: Peer) -> None:
        self._failing_dials.discard((node.id, peer.id))
        if node.alive and life == node.life:
            self._link_down(node, peer)

    def _close(self, node: N, peer: Peer) -> None:
        key = (node.id, peer.id) if node.id < peer.id else (peer.id, node.id)
        link = self._links.get(key)
        if link is None or not link.open or link.dead:
            return
        link.open = False
        link.closing[link.inc] = node.id
        when = self.now + link.latency
        self._push(when, self._close_done, (link, link.inc, node.id, peer.id))

    def _close_done(self, link: _Link, inc: int, closer_id: str, other_id: str) -> None:
        link.closing.pop(inc, None)
        if link.inc != inc or link.open:
            return  # reopened meanwhile: the other side sees a working link
        self._forget_link(link)
        other = self.nodes[other_id]
        if other.alive and not link.dead:
            self._link_down(other, self.nodes[closer_id].peer)

    def _detect(self, link: _Link, inc: int, node_id: str, peer_id: str) -> None:
        if link.inc == inc:
            link.open = False
            link.dead = False
            self._forget_link(link)
        node = self.nodes[node_id]
        if node.alive:
            self._link_down(node, self.nodes[peer_id].peer)

    def _forget_link(self, link: _Link) -> None:
        for node_id in link.key:
            node = self.nodes.get(node_id)
            if node is not None:
                node.links.discard(link.key)
