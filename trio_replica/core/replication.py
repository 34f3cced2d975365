"""The replica driver's bookkeeping for one instance, sans-IO.

Beside the HyParView and Plumtree cores: plain method calls in (a peer came up, a host was
announced, a digest round arrived, a timer fired), a list of effects out. It owns

* **whom to sync with**: the neighbours (`peer_up` / `peer_down`) and the hosts of the
  instance (`host_added` / `host_removed`); an instance hosted everywhere (the host
  directory) or whose hosts are not known yet syncs with neighbours;
* **comparisons** (digest anti-entropy, `core.antientropy`): the sessions this node opens
  (at most `max_sessions` at once for the instance, one per peer; more wait in order,
  coalesced; a session that hears nothing for `session_timeout` is given up), and the
  answers to peers' rounds, bounded per peer: `rounds_per_s` with a burst, at most
  `peer_queue` answers not yet sent, and an allowance of entries (the whole state per
  `serve_window`). A range beyond the allowance is refused and the peer's comparison is
  not answered to its end (a bare round would tell it that it holds everything);
* **scheduling**: anti-entropy every `anti_entropy_interval` (+-25% integer jitter) with
  one random sync peer; a *follow-up* comparison with another peer `follow_up` seconds
  after entries arrived, repeated while comparisons keep bringing entries (at most
  `follow_up_tries` fruitless ones in a row), so that a repair spreads at the speed of
  comparisons; and one pull after notices of lost deliveries, at most once per
  `resync_interval`;
* **removals**: `RemoveNode` once per departure (`node_removed`), and after a lagged
  membership feed for the departures it missed.

Owners without a digest (full-state sync) get the same peers and scheduling; their
comparisons become `RequestFullSync` / `PushFullSync` effects.

The driver carries out the effects: `Serve` streams the entries of its ranges to the
peer and then sends its rounds, on one ordered stream, and reports `served` when done or
dropped; `SetTimer` comes back as `handle_timer`. The runtime (`trio_replica.runtime.replica`)
and the simulator (`trio_replica.sim.replica.ReplicaLayer`) are two such drivers.
"""

from __future__ import annotations

import collections
import math
import random
from collections.abc import Hashable, Iterable
from typing import Any

import attrs

from .antientropy import (
    FANOUT_BITS,
    AntiEntropyConfig,
    DigestRound,
    DigestSource,
    Range,
    answer,
    check_round,
    opening,
    ranges_in,
)
from .effects import SetTimer
from .messages import MAX_DIGEST_PARENTS, Peer
from .tokens import TokenBucket

__all__ = [
    "CancelServes",
    "DigestStats",
    "DigestSyncConfig",
    "PushFullSync",
    "RemoveNode",
    "ReplicationCore",
    "ReplicationStats",
    "RequestFullSync",
    "Serve",
    "SyncCompleted",
    "jitter",
]

#: Nodes remembered as removed (for `membership_lagged`); ids come from peers.
MAX_REMOVED = 4096
#: Per-peer limits kept before unused ones are pruned.
PRUNE_ABOVE = 1024


@attrs.frozen
class DigestSyncConfig:
    """Limits of digest anti-entropy (module docstring)."""

    compare: AntiEntropyConfig = attrs.field(factory=AntiEntropyConfig)
    #: Comparisons this node runs at once for one instance.
    max_sessions: int = 1
    #: A session that hears nothing from its peer for this long is given up.
    session_timeout: float = 30.0
    #: Rounds accepted from one peer per second, and the burst above that rate.
    rounds_per_s: float = 20.0
    rounds_burst: int = 40
    #: Answers (streams and rounds) waiting to go to one peer; more are dropped.
    peer_queue: int = 8
    #: Entries streamed to one peer per this many seconds: the whole state, or
    #: `min_allowance` entries if that is more.
    serve_window: float = 10.0
    min_allowance: int = 4096
    #: A replica that received entries in a comparison (it was behind) compares with
    #: another sync peer this many seconds later (+-25%), and again while comparisons
    #: keep bringing it entries: a repair spreads at the speed of comparisons, not one
    #: anti-entropy period per hop (Demers et al.'s rumor mongering with feedback, here
    #: on top of anti-entropy). 0 turns it off.
    follow_up: float = 1.0
    #: Follow-ups in a row that bring nothing before a replica stops following up (it then
    #: waits for anti-entropy): 1 leaves some replicas unrepaired until the next period
    #: (Demers et al.'s residue); a few more reach almost all of them at once.
    follow_up_tries: int = 3
    #: Follow-ups a replica may open per anti-entropy period (a token bucket): while
    #: writes keep coming, comparisons keep finding entries still on their way by
    #: broadcast, and follow-ups must not turn into a comparison a second.
    follow_up_budget: int = 3

    def __attrs_post_init__(self) -> None:
        from ..errors import ConfigError

        if not (math.isfinite(self.follow_up) and self.follow_up >= 0):
            raise ConfigError(f"replica.digest.follow_up must be >= 0, not {self.follow_up}")
        for name in ("session_timeout", "rounds_per_s", "serve_window"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"replica.digest.{name} must be positive, not {value}")
        for name in (
            "max_sessions",
            "rounds_burst",
            "peer_queue",
            "min_allowance",
            "follow_up_tries",
            "follow_up_budget",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"replica.digest.{name} must be at least 1")
        if not 1 <= self.compare.max_parents <= MAX_DIGEST_PARENTS:
            raise ConfigError(
                f"replica.digest.compare.max_parents must be 1 to {MAX_DIGEST_PARENTS}"
            )
        if self.compare.exchange_below < 0:
            raise ConfigError("replica.digest.compare.exchange_below must be >= 0")


@attrs.define
class DigestStats:
    sessions_opened: int = 0
    sessions_completed: int = 0
    sessions_timed_out: int = 0
    #: Comparisons asked for while one with that peer was queued or running.
    sessions_coalesced: int = 0
    rounds_sent: int = 0
    rounds_received: int = 0
    #: Rounds refused: over the rate, the queue full, or malformed.
    rounds_refused: collections.Counter[str] = attrs.Factory(collections.Counter)
    ranges_sent: int = 0
    #: Ranges not sent: more entries than the peer's allowance had left.
    ranges_refused: int = 0
    #: Entries of the ranges sent (as the digest counted them when they were granted).
    items_sent: int = 0
    #: Digests (range summaries) sent in rounds.
    digests_sent: int = 0
    #: Ranges not sent again because they were still on their way to that peer.
    ranges_in_flight: int = 0
    #: Comparisons we stopped answering because a range was refused (allowance).
    sessions_cut: int = 0
    #: Comparisons opened because the one before brought entries (`follow_up`), and
    #: follow-ups skipped because the budget for the period was spent.
    follow_ups: int = 0
    follow_ups_over_budget: int = 0
    #: The owner's digest raised while a comparison was opened or answered (skipped).
    source_errors: int = 0


@attrs.define
class ReplicationStats:
    anti_entropy_pulls: int = 0
    resyncs_after_resubscribe: int = 0
    #: Rounds of sync pulls after `Lagged` notices, and the deliveries they reported lost.
    resyncs_after_lag: int = 0
    deliveries_missed: int = 0
    sync_requests_sent: int = 0
    nodes_removed: int = 0


# --- effects ----------------------------------------------------------------------------------


@attrs.frozen
class Serve:
    """Send `peer`, on one ordered stream, the entries of `ranges` (in order), then
    `rounds`; report `served(peer.id, ticket)` once done or given up."""

    peer: Peer
    session: int
    ranges: tuple[Range, ...]
    rounds: tuple[DigestRound, ...]
    ticket: int


@attrs.frozen
class CancelServes:
    """Drop the `Serve`s queued for `peer_id` and not yet begun (it is gone)."""

    peer_id: str


@attrs.frozen
class SyncCompleted:
    """A comparison this node opened at `opened` (the core's clock) completed: every entry
    the peer held then is held here (the owner's sync mark)."""

    opened: float


@attrs.frozen
class RemoveNode:
    """Call the owner's `remove_node` for `node` (gone for the cluster; once per departure)."""

    node: str


@attrs.frozen
class RequestFullSync:
    """Owners without a digest: ask `peer` for its whole state."""

    peer: Peer


@attrs.frozen
class PushFullSync:
    """Owners without a digest: send our whole state to `peer`."""

    peer: Peer


ReplicationEffect = (
    Serve | CancelServes | SyncCompleted | RemoveNode | RequestFullSync | PushFullSync | SetTimer
)


def _covered(range_: Range, by: Iterable[Range]) -> bool:
    """Whether `range_` is one of `by` or inside one of them."""
    level, index = range_
    return any(
        up <= level and index >> (FANOUT_BITS * (level - up)) == up_index for up, up_index in by
    )


def jitter(interval: float, rng: random.Random) -> float:
    """The seed's integer jitter, in milliseconds: interval +- 25%, never zero-width."""
    interval_ms = max(1, round(interval * 1000))
    quarter = interval_ms // 4
    if quarter == 0:
        return interval_ms / 1000
    return (interval_ms - quarter + rng.randint(1, 2 * quarter)) / 1000


@attrs.define
class _Session:
    id: int
    peer: Peer
    opened: float
    heard: float
    #: Opened as a follow-up, and whether entries moved in it, either way (a follow-up
    #: that taught the peer was worth it too: rumor mongering stops when the other side
    #: already knew).
    follow_up: bool = False
    moved: bool = False


_ANTI_ENTROPY = "anti_entropy"
_RESYNC = "resync"
_WATCHDOG = "watchdog"
_FOLLOW_UP = "follow_up"


class ReplicationCore:
    """The bookkeeping of one replica instance (module docstring).

    `source` is the instance's digest (None: a full-state owner). `everywhere`: every
    node hosts the instance (sync with neighbours only). `anti_entropy_interval` None:
    no periodic anti-entropy.
    """

    def __init__(
        self,
        me: str,
        *,
        source: DigestSource | None,
        rng: random.Random,
        config: DigestSyncConfig | None = None,
        anti_entropy_interval: float | None = None,
        resync_interval: float = 1.0,
        everywhere: bool = False,
    ) -> None:
        self.me = me
        self.source = source
        self.config = config or DigestSyncConfig()
        self.anti_entropy_interval = anti_entropy_interval
        self.resync_interval = resync_interval
        self.everywhere = everywhere
        self.stats = ReplicationStats()
        self.digest_stats = DigestStats()
        self._rng = rng
        self.neighbors: dict[str, Peer] = {}
        self.hosts: dict[str, Peer] = {}
        self._sessions: dict[str, _Session] = {}
        self._waiting: dict[str, Peer] = {}  # peers to compare with next, in order
        #: Per peer, the `Serve` effects not yet reported `served`: ticket -> (ranges,
        #: entries charged to the peer's allowance, refunded if it is not sent).
        self._outstanding: dict[str, dict[int, tuple[tuple[Range, ...], int]]] = {}
        self._tickets = 0
        self._buckets: dict[str, TokenBucket] = {}
        #: Per peer, the entries it may still be sent (`serve_window`).
        self._allowances: dict[str, TokenBucket] = {}
        #: Nodes removed, until they are heard of again (insertion order: oldest first).
        self._removed: dict[str, None] = {}
        self._resync_pending = False
        self._resync_after = -math.inf
        self._follow_up_pending = False
        #: The peer that last brought entries, follow-ups in a row that brought none, and
        #: the peers whose next session is a follow-up (it may wait in `_waiting`).
        self._learned_from: str | None = None
        self._fruitless = 0
        #: Whether a comparison this instance opened has completed (`SyncCompleted`): until
        #: then it opens one itself with its first peer, whatever the ids, so that it learns
        #: when it has caught up (the other side's sessions complete on the other side).
        self._caught_up = False
        #: When each peer last sent a round of a comparison it opened with us: while one
        #: runs, ours with that peer would only repeat it (a comparison moves both ways).
        self._answering: dict[str, float] = {}
        self._follow_up_peers: set[str] = set()
        period = anti_entropy_interval or 30.0
        budget = self.config.follow_up_budget
        self._follow_up_tokens = TokenBucket(rate=budget / period, capacity=budget)

    # --- inputs: lifecycle and membership -------------------------------------------------

    def start(
        self, neighbors: Iterable[Peer], hosts: Iterable[Peer], now: float
    ) -> list[ReplicationEffect]:
        """The instance opens: sync with whom it can reach (PeerUp fires only for future
        peers, so an instance opened late would otherwise never sync)."""
        self.neighbors = {p.id: p for p in neighbors}
        if not self.everywhere:
            self.hosts = {p.id: p for p in hosts if p.id != self.me}
        effects: list[ReplicationEffect] = []
        if self.anti_entropy_interval is not None:
            effects.append(SetTimer(jitter(self.anti_entropy_interval, self._rng), _ANTI_ENTROPY))
        if self.source is None:
            # Pull from every neighbour, and offer what we start with (recovered from
            # disk, perhaps never broadcast).
            for peer in self.sync_peers():
                self.stats.sync_requests_sent += 1
                effects.append(RequestFullSync(peer))
            effects.extend(PushFullSync(peer) for peer in self.sync_peers())
            return effects
        # Known hosts with a greater id (the others hear of us and open the comparison),
        # or, while no host is known, every neighbour. One comparison moves both ways.
        # With only smaller ids about, one of them too (`_caught_up`).
        hosts = self._sorted(self.hosts)
        peers = [p for p in hosts if p.id > self.me] or hosts[-1:] or self._sorted(self.neighbors)
        for peer in peers:
            effects += self.compare(peer, now)
        return effects

    def peer_up(self, peer: Peer, now: float) -> list[ReplicationEffect]:
        self._removed.pop(peer.id, None)  # heard of again
        # Whole peers compared: a node restarted under the same id at another address is a
        # new incarnation that needs our state even if its old one was still listed.
        if self.neighbors.get(peer.id) == peer:
            return []
        self.neighbors[peer.id] = peer
        if self.source is None:
            # Push only: the peer sees us come up too and pushes its state to us.
            return [PushFullSync(peer)]
        # The smaller id opens (the other side sees the same PeerUp). Only with a host once
        # hosts are known: a neighbour that does not host the instance has nothing.
        is_host = not self.hosts or peer.id in self.hosts
        if is_host and self._should_open(peer.id, now):
            return self.compare(peer, now)
        return []

    def _should_open(self, peer_id: str, now: float) -> bool:
        """The smaller id opens, unless the peer's own comparison with us runs already;
        an instance that never caught up opens one itself."""
        if self._opens_first():
            return True
        answering = self._answering.get(peer_id)
        if answering is not None and now - answering < self.config.session_timeout:
            return False
        return self.me < peer_id

    def _opens_first(self) -> bool:
        """Not caught up and no comparison under way: this node opens one itself."""
        return not self._caught_up and not self._sessions and not self._waiting

    def peer_down(self, peer_id: str, now: float) -> list[ReplicationEffect]:
        self.neighbors.pop(peer_id, None)
        return self.peer_gone(peer_id, now)

    def host_added(self, peer: Peer, now: float) -> list[ReplicationEffect]:
        if self.everywhere or peer.id == self.me:
            return []
        self.hosts[peer.id] = peer
        if self.source is None:
            return []
        # Also for a host we knew: an announcement is a new incarnation (restarted, maybe
        # at the same address), which needs our state. One comparison per pair: the node
        # with the smaller id opens it.
        return self.compare(peer, now) if self._should_open(peer.id, now) else []

    def set_hosts(self, hosts: Iterable[Peer], now: float) -> list[ReplicationEffect]:
        """The directory's hosts of the instance as they stand (after a lost notice): add
        those we did not know, remove those that are gone."""
        if self.everywhere:
            return []
        current = {p.id: p for p in hosts if p.id != self.me}
        effects: list[ReplicationEffect] = []
        for peer_id in [i for i in self.hosts if i not in current]:
            effects += self.host_removed(peer_id, now)
        for peer_id, peer in current.items():
            if self.hosts.get(peer_id) != peer:
                effects += self.host_added(peer, now)
        return effects

    def host_removed(self, peer_id: str, now: float) -> list[ReplicationEffect]:
        """No longer a host (withdrawn, or gone for the cluster): a session with it would
        only wait for its timeout."""
        if self.hosts.pop(peer_id, None) is None:
            return []
        return self.peer_gone(peer_id, now)

    def node_removed(self, node_id: str, now: float) -> list[ReplicationEffect]:
        """`node_id` is gone for the cluster (left, or its failure confirmed), told once
        per departure: its data goes. A peer that only left the active view keeps it."""
        self._removed.pop(node_id, None)
        self._removed[node_id] = None
        while len(self._removed) > MAX_REMOVED:
            del self._removed[next(iter(self._removed))]
        self.stats.nodes_removed += 1
        return [*self.peer_gone(node_id, now), RemoveNode(node_id)]

    def membership_lagged(
        self, active: Iterable[Peer], removed: Iterable[str], now: float
    ) -> list[ReplicationEffect]:
        """Membership events were lost: rebuild the neighbours from the active view, and
        remove the departed nodes this instance has not removed (still once each)."""
        self.neighbors = {p.id: p for p in active}
        effects: list[ReplicationEffect] = []
        for node_id in removed:
            if node_id not in self._removed:
                effects += self.node_removed(node_id, now)
        return effects

    def resubscribed(self, active: Iterable[Peer], now: float) -> list[ReplicationEffect]:
        """A feed's source restarted: what it carried meanwhile may be lost. Recover it
        from every sync peer."""
        self.stats.resyncs_after_resubscribe += 1
        self.neighbors.update((p.id, p) for p in active)
        effects: list[ReplicationEffect] = []
        for peer in self.sync_peers():
            if self.source is None:
                self.stats.sync_requests_sent += 1
                effects.append(RequestFullSync(peer))
            else:
                effects += self.compare(peer, now)
        return effects

    def deliveries_lost(self, missed: int, now: float) -> list[ReplicationEffect]:
        """Deliveries were lost on the way here: pull from one peer, which holds what the
        cluster broadcast; notices within `resync_interval` cost one pull."""
        self.stats.deliveries_missed += missed
        self.stats.resyncs_after_lag += 1
        if self._resync_pending:
            return []
        if now >= self._resync_after:
            self._resync_after = now + self.resync_interval
            return self._pull_from_one(now)
        self._resync_pending = True
        return [SetTimer(self._resync_after - now, _RESYNC)]

    def handle_timer(self, timer: Hashable, now: float) -> list[ReplicationEffect]:
        if timer == _ANTI_ENTROPY:
            assert self.anti_entropy_interval is not None
            # Re-armed first: nothing in the pull may end anti-entropy.
            effects: list[ReplicationEffect] = [
                SetTimer(jitter(self.anti_entropy_interval, self._rng), _ANTI_ENTROPY)
            ]
            pull = self._pull_from_one(now)
            if pull:
                self.stats.anti_entropy_pulls += 1
            return effects + pull
        if timer == _RESYNC:
            self._resync_pending = False
            self._resync_after = now + self.resync_interval
            return self._pull_from_one(now)
        if timer == _FOLLOW_UP:
            self._follow_up_pending = False
            # Another peer than the one that just brought entries (it has nothing more;
            # with no other, nothing to follow up).
            # An idle one: a follow-up folded into a running comparison would be lost.
            busy = {*self._sessions, *self._waiting, self._learned_from}
            peers = [p for p in self.sync_peers() if p.id not in busy]
            if not peers:
                return []
            if not self._follow_up_tokens.try_take(1, now):
                self.digest_stats.follow_ups_over_budget += 1
                return []
            peer = self._rng.choice(peers)
            self.digest_stats.follow_ups += 1
            self._follow_up_peers.add(peer.id)
            return self.compare(peer, now)
        if isinstance(timer, tuple) and timer[0] == _WATCHDOG:
            return self._watchdog(timer[1], timer[2], now)
        return []

    # --- whom to sync with ----------------------------------------------------------------

    def sync_peers(self) -> list[Peer]:
        """The instance's hosts, or the neighbours while no host is known (and always for
        an instance hosted everywhere)."""
        return self._sorted(self.hosts) or self._sorted(self.neighbors)

    @staticmethod
    def _sorted(peers: dict[str, Peer]) -> list[Peer]:
        # Sorted: the choice must not depend on arrival order (or the hash seed).
        return sorted(peers.values())

    def _pull_from_one(self, now: float) -> list[ReplicationEffect]:
        peers = self.sync_peers()
        if not peers:
            return []
        peer = self._rng.choice(peers)
        if self.source is None:
            self.stats.sync_requests_sent += 1
            return [RequestFullSync(peer)]
        return self.compare(peer, now)

    # --- comparisons this node opens ------------------------------------------------------

    def compare(self, peer: Peer, now: float) -> list[ReplicationEffect]:
        """Compare with `peer` now, or once the sessions running end (queued once)."""
        if self.source is None:
            self.stats.sync_requests_sent += 1
            return [RequestFullSync(peer)]
        stats = self.digest_stats
        if peer.id in self._sessions or peer.id in self._waiting:
            stats.sessions_coalesced += 1
            return []
        if len(self._sessions) >= self.config.max_sessions:
            self._waiting[peer.id] = peer
            return []
        follow_up = peer.id in self._follow_up_peers
        self._follow_up_peers.discard(peer.id)
        try:
            first = opening(self.source)
        except Exception:
            # The owner's digest is application code (a store of its own): a failure skips
            # this comparison, counted; nothing is left half-registered.
            stats.source_errors += 1
            return []
        session = _Session(self._rng.getrandbits(63), peer, now, now, follow_up)
        self._sessions[peer.id] = session
        stats.sessions_opened += 1
        return [
            self._serve(peer, session.id, (), (first,)),
            SetTimer(self.config.session_timeout, (_WATCHDOG, peer.id, session.id)),
        ]

    def busy(self) -> bool:
        """Whether a session runs or waits."""
        return bool(self._sessions or self._waiting)

    def session_with(self, peer_id: str) -> int | None:
        session = self._sessions.get(peer_id)
        return None if session is None else session.id

    def _end(self, peer_id: str, now: float, *, completed: bool) -> list[ReplicationEffect]:
        session = self._sessions.pop(peer_id, None)
        if session is None:
            return []
        effects: list[ReplicationEffect] = []
        if completed:
            self._caught_up = True
            self.digest_stats.sessions_completed += 1
            effects.append(SyncCompleted(session.opened))
        else:
            self.digest_stats.sessions_timed_out += 1
        if session.follow_up:
            # Keep going while follow-ups move entries (either way); stop after
            # `follow_up_tries` in a row that move nothing.
            self._fruitless = 0 if session.moved else self._fruitless + 1
            if self._fruitless < self.config.follow_up_tries:
                effects += self._schedule_follow_up()
            else:
                self._fruitless = 0
        while self._waiting and len(self._sessions) < self.config.max_sessions:
            effects += self.compare(self._waiting.pop(next(iter(self._waiting))), now)
        return effects

    def _watchdog(self, peer_id: str, session_id: int, now: float) -> list[ReplicationEffect]:
        session = self._sessions.get(peer_id)
        if session is None or session.id != session_id:
            return []
        due = session.heard + self.config.session_timeout
        if now < due:
            return [SetTimer(due - now, (_WATCHDOG, peer_id, session_id))]
        return self._end(peer_id, now, completed=False)

    def peer_gone(self, peer_id: str, now: float) -> list[ReplicationEffect]:
        """`peer_id` is out of reach or no longer a host: end our session with it and
        forget what waits for it (the driver drops its queued `Serve`s). Its limits stay
        (a peer whose link flaps gets no fresh allowance); unused, they expire."""
        self._waiting.pop(peer_id, None)
        self._answering.pop(peer_id, None)
        self._follow_up_peers.discard(peer_id)
        effects: list[ReplicationEffect] = []
        outstanding = self._outstanding.pop(peer_id, None)
        if outstanding:
            # Dropped unsent (but for one stream already begun): given back.
            for _, entries in outstanding.values():
                self._refund(peer_id, entries)
            effects.append(CancelServes(peer_id))
        return effects + self._end(peer_id, now, completed=False)

    # --- what arrives from peers ----------------------------------------------------------

    def chunk_received(
        self, peer_id: str, session: int, now: float, *, changed: bool = True
    ) -> list[ReplicationEffect]:
        """A chunk of entries for `session` arrived: a long transfer is progress too. If it
        `changed` the state, this replica was behind: it follows up with another peer
        (`follow_up`)."""
        mine = self._sessions.get(peer_id)
        if mine is not None and mine.id == session:
            mine.heard = now
            if changed:
                mine.moved = True
        if not changed:
            return []
        self._learned_from = peer_id
        self._fruitless = 0
        return self._schedule_follow_up()

    def _schedule_follow_up(self) -> list[ReplicationEffect]:
        if self._follow_up_pending or not self.config.follow_up or self.source is None:
            return []
        self._follow_up_pending = True
        return [SetTimer(jitter(self.config.follow_up, self._rng), _FOLLOW_UP)]

    def served(self, peer_id: str, ticket: int, *, sent: bool = True) -> None:
        """The driver sent the `Serve` with this ticket, or (`sent` false) gave it up: its
        entries go back to the peer's allowance."""
        outstanding = self._outstanding.get(peer_id)
        if outstanding is None:
            return
        found = outstanding.pop(ticket, None)
        if not outstanding:
            del self._outstanding[peer_id]
        if found is not None and not sent:
            self._refund(peer_id, found[1])

    def round_received(
        self, peer: Peer, session: int, round_: DigestRound, now: float
    ) -> list[ReplicationEffect]:
        """A round arrived from `peer` (after the entries it sent before it)."""
        stats = self.digest_stats
        if self.source is None:
            if round_.bare:
                return []
            # No digest here: a bare answer ends the peer's comparison instead of letting
            # it wait for its timeout.
            stats.rounds_refused["no_digest"] += 1
            return [Serve(peer, session, (), (DigestRound(1, (), ()),), 0)]
        stats.rounds_received += 1
        problem = check_round(round_, self.config.compare)
        if problem is not None:
            stats.rounds_refused["malformed"] += 1
            return []
        effects: list[ReplicationEffect] = []
        mine = self._sessions.get(peer.id)
        if mine is not None and mine.id == session:
            mine.heard = now
            if round_.bare:
                return self._end(peer.id, now, completed=True)
        elif round_.bare:
            self._answering.pop(peer.id, None)  # its comparison is over
            return []
        else:
            self._answering[peer.id] = now
        if not self._take_token(peer.id, now):
            stats.rounds_refused["rate"] += 1
            return []
        if len(self._outstanding.get(peer.id, ())) >= self.config.peer_queue:
            stats.rounds_refused["queue_full"] += 1
            return []
        try:
            replies, ranges = answer(self.source, round_, self.config.compare)
        except Exception:
            stats.source_errors += 1  # the owner's digest (see `compare`)
            return []
        granted: list[Range] = []
        charged = 0
        refused = False
        in_flight = [r for rs, _ in self._outstanding.get(peer.id, {}).values() for r in rs]
        for level, index in ranges_in(ranges):
            if _covered((level, index), in_flight):
                # Already on its way to this peer, ahead of this answer on the same stream
                # (a comparison that began while a long stream was still going).
                stats.ranges_in_flight += 1
                continue
            entries = self.source.range_digest(level, index)[1]
            if not self._allow(peer.id, entries, now):
                stats.ranges_refused += 1
                refused = True
                continue
            granted.append((level, index))
            charged += entries
            stats.ranges_sent += 1
            stats.items_sent += entries
        if refused:
            # The comparison must not look complete (the peer's sync mark would move past
            # entries it never got): no more rounds; it times out and asks again.
            stats.sessions_cut += 1
            replies = []
        if granted and mine is not None and mine.id == session:
            mine.moved = True
        if granted or replies:
            effects.append(self._serve(peer, session, tuple(granted), tuple(replies), charged))
        if mine is not None and mine.id == session and any(r.bare for r in replies):
            # We send the bare round: everything we asked for has arrived (the peer's
            # entries come before its rounds): complete.
            effects += self._end(peer.id, now, completed=True)
        return effects

    def _serve(
        self,
        peer: Peer,
        session: int,
        ranges: tuple[Range, ...],
        rounds: tuple[DigestRound, ...],
        charged: int = 0,
    ) -> Serve:
        self._tickets += 1
        self._outstanding.setdefault(peer.id, {})[self._tickets] = (ranges, charged)
        self.digest_stats.rounds_sent += len(rounds)
        self.digest_stats.digests_sent += sum(len(r.digests) for r in rounds)
        return Serve(peer, session, ranges, rounds, self._tickets)

    # --- limits ---------------------------------------------------------------------------

    @staticmethod
    def _prune(table: dict[str, TokenBucket], idle: float, now: float) -> None:
        """Forget limits unused for `idle` seconds once there are many (they would be full
        again by then anyway)."""
        if len(table) < PRUNE_ABOVE:
            return
        horizon = now - idle
        for key in [k for k, b in table.items() if b.last_used < horizon]:
            del table[key]

    def _take_token(self, peer_id: str, now: float) -> bool:
        cfg = self.config
        self._prune(self._buckets, cfg.rounds_burst / cfg.rounds_per_s, now)
        bucket = self._buckets.get(peer_id)
        if bucket is None:
            bucket = self._buckets[peer_id] = TokenBucket(
                rate=cfg.rounds_per_s, capacity=cfg.rounds_burst
            )
        return bucket.try_take(1, now)

    def _allow(self, peer_id: str, entries: int, now: float) -> bool:
        """Take `entries` from the peer's allowance if it has them (module docstring)."""
        assert self.source is not None
        cfg = self.config
        capacity = max(cfg.min_allowance, self.source.range_digest(0, 0)[1])
        self._prune(self._allowances, cfg.serve_window, now)
        allowance = self._allowances.get(peer_id)
        if allowance is None:
            allowance = self._allowances[peer_id] = TokenBucket(rate=1.0, capacity=capacity)
        # The whole state per window: both follow the state's size as it changes.
        allowance.capacity, allowance.rate = capacity, capacity / cfg.serve_window
        return allowance.try_take(entries, now)

    def _refund(self, peer_id: str, entries: int) -> None:
        allowance = self._allowances.get(peer_id)
        if allowance is not None and entries:
            allowance.tokens = min(allowance.capacity, allowance.tokens + entries)

    def snapshot(self) -> dict[str, Any]:
        out = attrs.asdict(self.digest_stats)
        out["rounds_refused"] = dict(self.digest_stats.rounds_refused)
        out["sessions_running"] = len(self._sessions)
        out["sessions_waiting"] = len(self._waiting)
        return out
