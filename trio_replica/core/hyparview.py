"""HyParView membership as a sans-IO state machine (Leitão, Pereira, Rodrigues, DSN 2007).

This module owns one node's partial views of the cluster and every rule that changes them.
It never does I/O: the runtime (or `trio_replica.sim.overlay`) feeds it messages, link failures and
timers, and carries out the effects it returns (`Send`, `CloseLink`, `SetTimer`, `Emit`).

Theory of operation
-------------------

A node keeps two views of other nodes, keyed by node id:

* the **active view** (small, `active_size`): peers with an open link, used by broadcast.
  It is *symmetric*: whenever we add a peer we tell it and it adds us; whenever we drop a
  peer we send it `Disconnect`. `PeerUp` / `PeerDown(reason)` are emitted exactly when a
  peer enters / leaves it, so a subscriber replaying them sees the active view.
* the **passive view** (larger, `passive_size`): known node ids, kept fresh by shuffles, from
  which the active view is refilled when a slot frees up. Each entry carries a failure count
  and a "not before" time (exponential backoff), so a dead or refusing peer is not tried
  again at once, and a peer that failed `max_failures` times is forgotten.

A node is never in its own views, never in both views, and the views never exceed their
sizes (checked after every step in the property tests).

Pending states, each with its handler and its timeout (timers are never cancelled, so every
timer carries a token and a stale one is ignored):

======================  ==========================  ==========================================
pending state           ends with                   on timeout / link down
======================  ==========================  ==========================================
join to a contact       NeighborReply from contact  forget it; `needs_join()` is true again
neighbor request        NeighborReply(accepted)     candidate failed: backoff, try another
unconfirmed neighbor    NeighborReply(True)         the peer is taken as failed (see below)
shuffle (per nonce)     ShuffleReply(nonce)         forget the ids we sent
walk forwarded          ShuffleReply passed back    forget the way back (`shuffle_timeout`)
refill backoff          RefillTimer                 retry the passive peers whose backoff ended
======================  ==========================  ==========================================

Handshakes (who adds whom, and what the other side answers):

* ``Join`` -> the contact adds the newcomer, answers ``NeighborReply(True)``; the newcomer
  adds the contact on that answer (SPEC section 4: symmetric views).
* ``ForwardJoin`` ending at P -> P adds the newcomer at once and sends ``Neighbor(high)``;
  the newcomer always accepts and answers ``NeighborReply(True)``, which *confirms* it at P.
  Until then the newcomer is "unconfirmed": if the answer does not come in time P drops it
  and closes the link, so a lost message cannot leave a one-sided neighbor behind.
* ``Neighbor(high|low)`` from a node with a free slot -> answered with
  ``NeighborReply(accepted)``; the requester adds the peer only on ``accepted``.

Deviations from the paper, each because the paper's environment (reliable TCP, no restarts,
one node at a time) is narrower than ours:

1. The contact answers a JOIN (the paper's contact adds the newcomer silently).
2. A failed passive peer is backed off, not dropped at its first failure (SPEC section 4).
   An active peer whose link failed goes to the passive view with that failure, but in a
   full view it only replaces an entry that failed too, and entries that failed are the
   first to make room for anyone: after a mass crash, each detected failure evicted a
   random entry, often one of the few live ones left, and survivors whose last live
   entry went that way stayed isolated for good (issue 20).
3. A FORWARD_JOIN that cannot be forwarded (no active peer but the sender) ends here.
4. A node with several free slots has several neighbor requests out at once (faster healing
   after mass failures); each request reserves its slot, so acceptances cannot overfill.
5. Repair of one-sided links: FORWARD_JOIN and SHUFFLE only travel between active
   neighbors, so one of them from a peer outside our active view means the sender holds a
   link we do not; we answer ``Disconnect(alive=True)`` so both sides agree again. Likewise
   an unexpected ``NeighborReply(True)`` (its request was withdrawn) gets a ``Disconnect``.
6. A shuffle reply leaves out the origin and the ids it just received.
7. A shuffle reply travels back along the walk (each forwarder remembers, for
   `shuffle_timeout`, the hop a walk came from), not over a new connection to the origin:
   in a 100-node process, a link and a handshake per shuffle and per NEIGHBOR attempt
   saturated the CPU, and live links then timed out (issue 13). A reply whose way back is
   gone is dropped (counted); the origin's shuffle timeout covers it.
8. A node missing one neighbour backs its refill off as a whole after
   `refusals_before_backoff` refusals in a row (`backoff_base` doubled per further
   refusal, at most `refill_backoff_max`), on top of each refuser's `refusal_backoff`;
   and a node whose active view stays under `min_active` for `low_view_grace` asks with
   high priority, which is never refused (the paper: only with an empty view).
9. Lost contacts: a peer lost to a failure (an active peer whose link failed, a passive
   peer forgotten after `max_failures`) is remembered for `reconnect_timeout`, and every
   `reconnect_interval` each of them whose wait has ended is asked with a high-priority
   NEIGHBOR, taken in even into a full view. Each try doubles its wait (up to
   `reconnect_backoff_max`). For `reconnect_backoff_max` after one answered, the others
   are asked with low priority (no eviction): the overlays have most likely merged.
   The paper's overlay never splits for good: its failures are crashes. Ours are also
   partitions, after which each side has rebuilt its views from its own members and
   nothing ever points across the healed cut again; the first probe that gets through
   merges the two overlays (one link is enough, the shuffles then mix them). A
   restarted peer answers too (it is alive): one NEIGHBOR, one eviction on each side.
10. Walks no longer than ours: a FORWARD_JOIN or SHUFFLE that arrives with a time to live
   above this node's `arwl` or `shuffle_ttl` is treated as one of that length (counted in
   ``ttl_clamped``). The paper's nodes all send the configured length; the wire allows 255,
   and a member sending such walks would multiply its messages through the cluster.
11. One neighbour cannot empty our view: a FORWARD_JOIN that would take its newcomer into
   a full active view (evicting a member) does so at most `replacement_limit` times per
   `replacement_period` per sender, an eviction by the sender's own JOIN included; past
   that the newcomer goes to the passive view (``replacements_refused``). The paper
   trusts every node; a member sending 300 FORWARD_JOINs with time to live 0 for made-up
   nodes replaced the whole active view of its neighbour and made it dial 319 addresses
   of the member's choosing.
12. Addresses learned from peers are weighed: an id whose address another known id
   already uses is not taken (``address_conflicts``: many ids pointing at one host would
   make us dial it for each; addresses are compared in one spelling, so ``ws://h:7000``
   and ``ws://H.:07000/`` are one) unless that id is a passive entry that failed its last
   try (a node restarted under another name), and each passive entry remembers who taught
   it: the peer that handed it to us and, for a SHUFFLE, the origin it names (it chose
   the ids; it is only named, so both answer for them: neither a relay nor a made-up
   origin escapes). A teacher
   whose entries fail `bad_address_limit` times within `bad_address_period`, with more
   than three failures for each entry of its that did answer and more than twice the
   failures of all other teachers together (a mass crash fails everyone's entries: no
   one stands out, and nothing is dropped that the healing needs), is penalised for that
   period: the entries it taught are dropped and the ids it sends are ignored
   (``teachers_penalised``, ``addresses_ignored``). Nothing is counted against a teacher
   while the links of two or more standing neighbours (in the active view for a shuffle
   period or more) failed within the period: a mass crash fails them, and its first few
   failed tries can fall on one teacher's entries by chance (at 90% crashed, a penalty
   then dropped the last live id a survivor's only live contact held of it, which stayed
   alone for good). A newcomer pushed on us that never answers, or a link opened and
   dropped, does not count: turning the penalty off takes two links that stood a period
   each and then failed, every period.
13. A contact busy with joins hands newcomers to the walks alone: a JOIN that would take
   its newcomer into a full active view less than `join_eviction_interval` after another
   JOIN did so is answered ``NeighborReply(False)`` (the link closed), and the walks go
   out as usual, one to every active peer. The paper's joins come one at a time. When
   many come at once through one contact (a cluster started together), its view fills
   with the newest newcomers, who know only the contact: each walk ends at its first hop
   (rule i above) and the newcomers link among themselves. In the simulator, 1,000 nodes
   joining one node at once formed an overlay with an average shortest path of 28.6 hops
   and a clustering coefficient of 0.30 a minute later (4.8 and 0.027 with this rule);
   50 joins a second, 0.029 (0.0034; a random graph: about 0.004). The newcomer is
   linked by the walks' ends; if none takes it, it joins again after its driver's backoff
   (``joins_walked``).

Links are ordered (FIFO), which the handshakes above rely on: a peer's ``NeighborReply``
always arrives before any message it sends us as a neighbor.
"""

from __future__ import annotations

import collections
import math
import operator
import random
from collections.abc import Collection, Hashable, Iterable

import attrs

from ..errors import ConfigError
from .effects import CloseLink, Effect, Emit, Send, SetTimer
from .events import DownReason, Left, PeerDown, PeerUp
from .messages import (
    MAX_SHUFFLE_PEERS,
    MAX_TTL,
    U64,
    Disconnect,
    ForwardJoin,
    Join,
    Message,
    Neighbor,
    NeighborReply,
    Peer,
    Shuffle,
    ShuffleReply,
    canonical_address,
)

__all__ = [
    "HyParView",
    "HyParViewConfig",
    "HyParViewStats",
    "JoinTimeout",
    "NeighborTimeout",
    "RefillTimer",
    "ShuffleTimeout",
    "ShuffleTimer",
]


@attrs.frozen
class HyParViewConfig:
    """Sizes and timers of the membership protocol; defaults are the paper's (section 5)."""

    #: log10(10,000) + 1: the paper sizes the active view as the broadcast fanout (4) + 1, so
    #: that flooding over it stays reliable up to high failure rates.
    active_size: int = 5
    #: k * (log n + c) in the paper's analysis; 30 in its experiments with 10,000 nodes.
    passive_size: int = 30
    #: Active random walk length: hops a FORWARD_JOIN travels before the newcomer is taken
    #: into an active view (paper: 6, about log n, so the newcomer lands far from its contact).
    arwl: int = 6
    #: Passive random walk length: the hop at which the walk also drops the newcomer into a
    #: passive view (paper: 3, half-way, so the id spreads beyond the contact's neighbourhood).
    prwl: int = 3
    #: ka: active ids carried by a SHUFFLE (paper: 3).
    shuffle_active: int = 3
    #: kp: passive ids carried by a SHUFFLE (paper: 4).
    shuffle_passive: int = 4
    #: Hops of the shuffle's random walk (like ARWL: the exchange partner is a random node).
    shuffle_ttl: int = 6
    #: Seconds between two shuffles of one node (SPEC default; the paper counts in cycles).
    shuffle_interval: float = 10.0
    #: Each shuffle delay is drawn in interval * [1 - jitter, 1 + jitter], so that nodes
    #: started together do not shuffle in lock-step.
    shuffle_jitter: float = 0.25
    #: How long the origin remembers the ids it sent in a shuffle, waiting for the reply: a
    #: walk of a few hops plus a dial, well within one period.
    shuffle_timeout: float = 10.0
    #: How long a JOIN may stay unanswered before the driver may try another seed.
    join_timeout: float = 5.0
    #: How long a NEIGHBOR may stay unanswered (covers a dial on a slow network); the
    #: candidate is then taken as failed. Also bounds the unconfirmed state.
    neighbor_timeout: float = 5.0
    #: First backoff after a failure (doubled per further failure); also how long a peer that
    #: evicted us is left alone before we ask it again.
    backoff_base: float = 2.0
    #: Longest backoff.
    backoff_max: float = 60.0
    #: How long a peer that refused a low-priority NEIGHBOR (its active view was full) is left
    #: alone: a full view rarely frees up sooner than a shuffle period, and asking again at
    #: once would flood full nodes with requests from the few that still have a free slot.
    refusal_backoff: float = 10.0
    #: Failures (in a row) after which a passive peer is forgotten. The paper forgets at the
    #: first failure; a few tries survive a restart or a short partition (SPEC section 4).
    max_failures: int = 3
    #: Seconds between two partition-merge checks by the driver (`should_rejoin`); 0 is off.
    rejoin_interval: float = 60.0
    #: Chance that a node which is not a seed runs that check in a given interval (seeds
    #: always do). Most nodes of a large overlay know no seed, so with 1 every one of them
    #: re-joined each minute: 100 nodes in one process opened ~1,500 links a minute for it
    #: (JOIN, forward walks, evictions, refused refills). With 0.05, a partition of P
    #: nodes that holds no seed still merges in about 20/P intervals.
    rejoin_chance: float = 0.05
    #: A node whose active view stays under `min_active` for `low_view_grace` seconds asks
    #: with high priority, which is never refused (the paper does so only for an empty
    #: view: a node with one neighbour among full views stayed at one forever). At most
    #: `active_size` counts.
    min_active: int = 2
    low_view_grace: float = 10.0
    #: After more than `refusals_before_backoff` refusals in a row, a node missing one
    #: neighbour waits before it asks again: `backoff_base`, doubled per further refusal,
    #: at most `refill_backoff_max`. Without it, such a node asked each of its 30 passive
    #: peers every `refusal_backoff`: up to 3 new links and handshakes a second, per node,
    #: for as long as the overlay lasts; now at most one every 10 s. The price, in the
    #: simulator (200 nodes, 150 s after half of them crashed): 94-98% of views full
    #: instead of 100% (the others hold 4 of 5; with a 30 s cap, 93-96%). Nodes missing
    #: more than one neighbour do not wait.
    refusals_before_backoff: int = 3
    refill_backoff_max: float = 10.0
    #: Walks we forwarded whose reply may come back through us (module docstring): how
    #: many are remembered, each for `shuffle_timeout`.
    shuffle_routes: int = 256
    #: Lost contacts (deviation 9): every `reconnect_interval` seconds (+-25%) a node
    #: probes the peers it lost to a failure whose wait has ended, with a high-priority
    #: NEIGHBOR (low priority for `reconnect_backoff_max` after one answered); each try
    #: doubles that peer's wait, from `reconnect_interval` to at most
    #: `reconnect_backoff_max`. A peer is remembered for `reconnect_timeout` seconds, at
    #: most `max_lost` of them. `reconnect_interval` 0 turns it off.
    reconnect_interval: float = 10.0
    reconnect_backoff_max: float = 30.0
    reconnect_timeout: float = 3600.0
    max_lost: int = 32
    #: Deviation 11: evictions one sender's FORWARD_JOINs may cause per period.
    replacement_limit: int = 1
    replacement_period: float = 10.0
    #: Deviation 13: a full contact takes at most one newcomer per interval into its active
    #: view (evicting a member); JOINs in between are served by the walks alone. 0: every
    #: JOIN is taken in (the paper).
    join_eviction_interval: float = 1.0
    #: Deviation 12: failed entries that get their teacher penalised, within the period.
    bad_address_limit: int = 6
    bad_address_period: float = 60.0

    def __attrs_post_init__(self) -> None:
        if self.active_size < 1:
            raise ConfigError(f"active_size must be >= 1, not {self.active_size}")
        if self.passive_size < 1:
            raise ConfigError(f"passive_size must be >= 1, not {self.passive_size}")
        if not 0 <= self.arwl <= MAX_TTL:
            raise ConfigError(f"arwl must be in [0, {MAX_TTL}], not {self.arwl}")
        if not 0 <= self.prwl <= self.arwl:
            raise ConfigError(f"prwl must be in [0, arwl={self.arwl}], not {self.prwl}")
        if not 0 <= self.shuffle_ttl <= MAX_TTL:
            raise ConfigError(f"shuffle_ttl must be in [0, {MAX_TTL}], not {self.shuffle_ttl}")
        if self.shuffle_active < 0 or self.shuffle_passive < 0:
            raise ConfigError("shuffle_active and shuffle_passive must be >= 0")
        if self.shuffle_active + self.shuffle_passive + 1 > MAX_SHUFFLE_PEERS:
            raise ConfigError(
                f"a shuffle carries shuffle_active + shuffle_passive + 1 ids, at most "
                f"{MAX_SHUFFLE_PEERS} on the wire"
            )
        for name in (
            "shuffle_interval",
            "shuffle_timeout",
            "join_timeout",
            "neighbor_timeout",
            "backoff_base",
            "refusal_backoff",
            "low_view_grace",
            "refill_backoff_max",
        ):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, not {getattr(self, name)}")
        if not 0 <= self.shuffle_jitter < 1:
            raise ConfigError(f"shuffle_jitter must be in [0, 1), not {self.shuffle_jitter}")
        if self.backoff_max < self.backoff_base:
            raise ConfigError("backoff_max must be >= backoff_base")
        if self.max_failures < 1:
            raise ConfigError(f"max_failures must be >= 1, not {self.max_failures}")
        if self.rejoin_interval < 0:
            raise ConfigError(f"rejoin_interval must be >= 0, not {self.rejoin_interval}")
        if not 0 <= self.rejoin_chance <= 1:
            raise ConfigError(f"rejoin_chance must be in [0, 1], not {self.rejoin_chance}")
        if self.min_active < 1:
            raise ConfigError(f"min_active must be >= 1, not {self.min_active}")
        if self.refusals_before_backoff < 0:
            raise ConfigError("refusals_before_backoff must be >= 0")
        if self.shuffle_routes < 0:
            raise ConfigError(f"shuffle_routes must be >= 0, not {self.shuffle_routes}")
        if not self.reconnect_interval >= 0:
            raise ConfigError(f"reconnect_interval must be >= 0, not {self.reconnect_interval}")
        if self.reconnect_interval and not (
            self.reconnect_backoff_max >= self.reconnect_interval and self.reconnect_timeout > 0
        ):
            raise ConfigError(
                "reconnect_backoff_max must be >= reconnect_interval, reconnect_timeout > 0"
            )
        if self.max_lost < 0:
            raise ConfigError(f"max_lost must be >= 0, not {self.max_lost}")
        if self.replacement_limit < 0 or self.bad_address_limit < 1:
            raise ConfigError("need replacement_limit >= 0 and bad_address_limit >= 1")
        if not (self.replacement_period > 0 and self.bad_address_period > 0):
            raise ConfigError("replacement_period and bad_address_period must be > 0")
        if not 0 <= self.join_eviction_interval < math.inf:
            raise ConfigError(
                f"join_eviction_interval must be finite and >= 0, not {self.join_eviction_interval}"
            )


@attrs.define
class HyParViewStats:
    """Counters of one node's membership activity (monotonic, for metrics and tests)."""

    joins: int = 0  # JOINs we sent
    joins_accepted: int = 0  # JOINs we took in as a contact
    joins_walked: int = 0  # JOINs we served by the walks alone (deviation 13)
    join_timeouts: int = 0
    forward_joins: int = 0  # FORWARD_JOINs received
    forward_joins_forwarded: int = 0
    neighbor_requests: int = 0  # NEIGHBOR requests we sent (high or low)
    neighbor_accepted: int = 0  # NEIGHBOR requests we accepted
    neighbor_rejected: int = 0  # NEIGHBOR requests we refused
    neighbor_refused: int = 0  # our requests the peer refused
    neighbor_timeouts: int = 0
    shuffles_sent: int = 0
    shuffles_forwarded: int = 0
    shuffles_received: int = 0  # walks that ended here (we replied)
    shuffle_replies: int = 0  # replies received for our own shuffles
    shuffle_timeouts: int = 0
    failures: int = 0  # active peers lost to a link failure or an unconfirmed timeout
    evictions: int = 0  # active peers we dropped to make room
    evicted: int = 0  # times a peer dropped us (Disconnect alive=True)
    left: int = 0  # active peers that left gracefully
    forgotten: int = 0  # passive peers forgotten after max_failures
    repairs: int = 0  # Disconnects sent to undo a one-sided link
    shuffle_replies_routed: int = 0  # replies we passed back along a walk
    shuffle_replies_unroutable: int = 0  # replies whose way back was gone (dropped)
    refills_backed_off: int = 0  # refills postponed after refusals in a row
    low_view_escalations: int = 0  # high-priority requests sent from a view under min_active
    reconnect_probes: int = 0  # high NEIGHBORs sent to lost contacts (deviation 9)
    reconnects: int = 0  # lost contacts that answered: links across a healed cut
    #: Walks (FORWARD_JOIN, SHUFFLE) that arrived with a longer time to live than this
    #: node's configured walk: cut down to it (deviation 10).
    ttl_clamped: int = 0
    #: Newcomers sent to the passive view because their sender had used up its evictions
    #: for the period (deviation 11).
    replacements_refused: int = 0
    #: Learned ids refused because another known id has their address (deviation 12).
    address_conflicts: int = 0
    #: Teachers penalised for feeding dead or foreign addresses, and ids ignored from them.
    teachers_penalised: int = 0
    addresses_ignored: int = 0


# --- timers (payloads of SetTimer) ----------------------------------------------------------------


@attrs.frozen
class ShuffleTimer:
    """Periodic shuffle; `token` identifies the chain started by `start`."""

    token: int


@attrs.frozen
class JoinTimeout:
    token: int


@attrs.frozen
class NeighborTimeout:
    peer_id: str
    token: int


@attrs.frozen
class ShuffleTimeout:
    nonce: int


@attrs.frozen
class RefillTimer:
    token: int


@attrs.frozen
class ReconnectTimer:
    """Periodic probe of one lost contact; `token` identifies the chain."""

    token: int


# --- internal state -------------------------------------------------------------------------------


@attrs.define
class _PassiveEntry:
    peer: Peer
    failures: int = 0
    retry_at: float = 0.0
    #: Who taught us this id (deviation 12): the peer that handed it over and, for a
    #: SHUFFLE, the origin it names; empty when we met the peer ourselves.
    sources: tuple[str, ...] = ()
    #: `peer`'s canonical address, looked up once: every id learned compares it.
    address: str = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.address = canonical_address(self.peer.address)


_address_of = operator.attrgetter("address")


@attrs.define
class _Teacher:
    """What the entries one peer taught us did, in the current period (deviation 12)."""

    since: float
    failed: int = 0
    answered: int = 0
    penalised_until: float = -math.inf


@attrs.define
class _PendingNeighbor:
    """A NEIGHBOR we sent and whose answer we wait for.

    `added` is true when the peer is already in our active view (we took it in from a
    FORWARD_JOIN and wait for its confirmation), false for a request to a passive peer.
    `reconnect`: a probe of a lost contact (deviation 9), taken in even into a full view.
    """

    peer: Peer
    token: int
    high: bool
    added: bool
    reconnect: bool = False


@attrs.define
class _Lost:
    """A peer lost to a failure, probed until it answers or `reconnect_timeout` passes."""

    peer: Peer
    since: float
    retry_at: float
    failures: int = 0


@attrs.define
class _PendingJoin:
    contact: Peer
    token: int


@attrs.frozen
class Survivors:
    """What a crashed core leaves that a fresh one can trust (`HyParView.restore`).

    A rule that raised may have stopped halfway (a peer in both views, a view over its
    size, a pending exchange for a peer it no longer has): the survivors are read from it
    without trusting any invariant, as plain lists of peers.
    """

    active: tuple[Peer, ...]
    passive: tuple[Peer, ...]
    lost: tuple[Peer, ...]
    left: bool
    stats: HyParViewStats


class HyParView:
    """One node's HyParView state. Not thread-safe; every method returns at once.

    Every input method takes the current time `now` (seconds, any monotonic origin) and
    returns the effects to carry out, in order. After `leave` every input is ignored.
    """

    def __init__(self, me: Peer, config: HyParViewConfig, rng: random.Random) -> None:
        self.me = me
        self.config = config
        self.stats = HyParViewStats()
        self._rng = rng
        self._active: dict[str, Peer] = {}
        self._passive: dict[str, _PassiveEntry] = {}
        self._pending: dict[str, _PendingNeighbor] = {}
        self._join: _PendingJoin | None = None
        self._shuffles: dict[int, frozenset[str]] = {}
        self._tokens = 0
        self._shuffle_token: int | None = None
        self._refill_token: int | None = None
        self._refill_at: float | None = None
        self._left = False
        #: (origin id, nonce) of walks we forwarded -> (the hop it came from, expiry).
        self._routes: dict[tuple[str, int], tuple[Peer, float]] = {}
        #: Refusals in a row, and the refill's own backoff they set.
        self._refusals = 0
        self._refill_not_before = 0.0
        #: Since when the active view has been under `min_active` (None: not seen so).
        self._low_since: float | None = None
        #: Lost contacts (deviation 9), oldest first, and when one last answered.
        self._lost: dict[str, _Lost] = {}
        self._reconnect_token: int | None = None
        self._reconnected_at = -math.inf
        #: Deviation 13: when a JOIN last took its newcomer into a full view.
        self._join_evicted_at = -math.inf
        #: Deviation 11: when each sender's FORWARD_JOINs last evicted a member.
        self._replacements: dict[str, list[float]] = {}
        #: Deviation 12: how the ids each peer taught us fared, and when taught entries
        #: failed (each once), over the last `bad_address_period`.
        self._teachers: dict[str, _Teacher] = {}
        self._failed_entries: collections.deque[float] = collections.deque()
        #: Standing neighbours (in the active view for a shuffle period or more) whose link
        #: failed, by id, oldest first, over the last `bad_address_period`: two or more
        #: mean a mass failure, which fails every teacher's entries alike (deviation 12).
        self._standing_failed: dict[str, float] = {}
        #: When each active peer entered the active view (ids that left are pruned lazily).
        self._active_since: dict[str, float] = {}

    # --- after a crash --------------------------------------------------------------------

    def survivors(self) -> Survivors:
        """This core's views as plain peers, for a fresh core (`restore`) after a crash."""

        def peers(candidates: Iterable[object]) -> tuple[Peer, ...]:
            seen: dict[str, Peer] = {}
            for peer in candidates:
                if isinstance(peer, Peer) and peer.id != self.me.id:
                    seen.setdefault(peer.id, peer)
            return tuple(seen.values())

        return Survivors(
            active=peers(self._active.values()),
            passive=peers(getattr(e, "peer", None) for e in self._passive.values()),
            lost=peers(getattr(e, "peer", None) for e in self._lost.values()),
            left=self._left,
            stats=self.stats,
        )

    def restore(
        self, old: Survivors, linked: Collection[str], announced: Collection[Peer], now: float
    ) -> list[Effect]:
        """Start this fresh core from what a crashed one left, instead of `start`.

        `linked`: the peers with an open link; `announced`: the peers the rest of the node
        was told are up (by `PeerUp`, not yet `PeerDown`), which a rule that crashed
        between changing a view and returning its events may disagree with. The old
        active peers whose link is still open stay active (`PeerUp` for those never
        announced); an announced peer that is not kept goes down (`PeerDown(FAILED)`
        without a link, `EVICTED` with one, over the view's size). Pending exchanges are
        forgotten (their answers are ignored, and the refill asks again); passive and
        lost peers carry over as contacts.
        """
        self.stats = old.stats
        if old.left:
            self._left = True
            return []
        out: list[Effect] = []
        told = {p.id: p for p in announced}
        # Linked peers only; the announced ones first, should the view be over its size.
        candidates = [p for p in old.active if p.id in linked]
        candidates.sort(key=lambda p: p.id not in told)
        kept = candidates[: self.config.active_size]
        for peer in kept:
            self._active[peer.id] = peer
            if peer.id not in told:
                out.append(Emit(PeerUp(peer)))
        for peer in old.passive:
            self._add_passive(peer)
        for peer in old.lost:
            if peer.id not in self._active:
                self._remember_lost(peer, now)
        for peer in old.active:
            if peer.id not in self._active and peer.id not in told:
                if peer.id in linked:
                    # Never announced here, but the peer may count us as its neighbour.
                    out.append(Send(peer, Disconnect(alive=True)))
                    out.append(CloseLink(peer))
                self._add_passive(peer)
        for peer in told.values():
            if peer.id in self._active:
                continue
            if peer.id in linked:
                # Over the view's size, or dropped by a rule that stopped before saying so.
                self._evict_unknown(peer, out, now)
            else:
                self._remember_lost(peer, now)
                out.append(Emit(PeerDown(peer, DownReason.FAILED)))
                entry = self._add_passive(peer)
                if entry is not None:
                    self._record_failure(entry, now)
        out.extend(self.start(now))
        self._refill(out, now)
        return out

    def _evict_unknown(self, victim: Peer, out: list[Effect], now: float) -> None:
        """`_evict` for a peer the view no longer holds (`restore`)."""
        self._active[victim.id] = victim
        self._evict(victim, out, now)

    # --- read-only views ------------------------------------------------------------------

    @property
    def active(self) -> tuple[Peer, ...]:
        """The active view (peers with a symmetric link), in insertion order."""
        return tuple(self._active.values())

    @property
    def passive(self) -> tuple[Peer, ...]:
        """The passive view (known, not linked), in insertion order."""
        return tuple(entry.peer for entry in self._passive.values())

    @property
    def has_left(self) -> bool:
        return self._left

    def is_active(self, peer_id: str) -> bool:
        return peer_id in self._active

    def is_passive(self, peer_id: str) -> bool:
        return peer_id in self._passive

    def needs_join(self) -> bool:
        """True while the node is isolated: empty active view and no JOIN pending.

        The driver then retries its seeds with backoff (SPEC section 4, bootstrap).
        """
        return not self._left and not self._active and self._join is None

    def should_rejoin(self, seed_ids: Collection[str]) -> bool:
        """Whether the driver should JOIN again through a seed to merge split overlays.

        The core does not know the seeds' addresses, so the driver, every
        `rejoin_interval`, passes their ids and, on true, calls `join` through one of them.

        * On a seed (its own id is in `seed_ids`): true when no other seed is in the active
          view. Seeds so keep a link to one another, and two healed partitions that each
          hold a seed merge within one interval. Cost: at most one JOIN per seed per
          interval, only after a seed lost its seed neighbor.
        * On any other node: true when no seed is in the active view, nor in the passive
          view with no failure on record. This is the only way a partition that holds
          *no* seed merges back. Trade-off: the check is local and cannot tell "my
          partition holds no seed" from "I happen not to know one"; a view holds ~35 of n
          ids, so on a large overlay most nodes answer true, and every JOIN costs the seed
          an eviction and ARWL-long walks (measured in the simulator: 0.3 re-joins per node
          per minute at 100 nodes, 0.76 at 500). A driver on a large cluster should run it
          on seeds only, or with a low probability per interval on other nodes.

        False while a JOIN is pending, after `leave`, and when no other seed is named.
        """
        if self._left or self._join is not None:
            return False
        others = [seed for seed in seed_ids if seed != self.me.id]
        if not others:
            return False
        if any(seed in self._active for seed in others):
            return False
        if self.me.id in seed_ids:
            return True
        for seed in others:
            entry = self._passive.get(seed)
            if entry is not None and entry.failures == 0:
                return False
        return True

    def wants_link(self, peer_id: str) -> bool:
        """True if the link to `peer_id` carries an active neighbor or a pending exchange.

        Other links (e.g. the temporary one a shuffle reply came on) may be closed by the
        driver once idle.
        """
        if peer_id in self._active or peer_id in self._pending:
            return True
        return self._join is not None and self._join.contact.id == peer_id

    # --- inputs ---------------------------------------------------------------------------

    def start(self, now: float) -> list[Effect]:
        """Arm the periodic shuffle (the first one after a random part of a period) and the
        probes of lost contacts (deviation 9)."""
        if self._left or self._shuffle_token is not None:
            return []
        self._shuffle_token = self._token()
        delay = self.config.shuffle_interval * self._rng.uniform(
            0.5, 1.0 + self.config.shuffle_jitter
        )
        out: list[Effect] = [SetTimer(delay, ShuffleTimer(self._shuffle_token))]
        self._arm_reconnect(out)
        return out

    def join(self, contact: Peer, now: float) -> list[Effect]:
        """Send JOIN to `contact` (paper section 4.2); a pending join is replaced."""
        if self._left or contact.id == self.me.id:
            return []
        token = self._token()
        self._join = _PendingJoin(contact, token)
        self.stats.joins += 1
        return [Send(contact, Join()), SetTimer(self.config.join_timeout, JoinTimeout(token))]

    def leave(self, now: float) -> list[Effect]:
        """Graceful leave (SPEC section 4): DISCONNECT(alive=False) to every active peer."""
        if self._left:
            return []
        out: list[Effect] = []
        for peer in self._active.values():
            out.append(Send(peer, Disconnect(alive=False)))
            out.append(CloseLink(peer))
        for pending in self._pending.values():
            if pending.peer.id not in self._active:
                out.append(CloseLink(pending.peer))
        self._left = True
        self._active.clear()
        self._pending.clear()
        self._lost.clear()
        self._shuffles.clear()
        self._join = None
        out.append(Emit(Left()))
        return out

    def handle_message(self, sender: Peer, message: Message, now: float) -> list[Effect]:
        """Apply one message from `sender` (the authenticated peer of the link)."""
        if self._left or sender.id == self.me.id:
            return []
        # A message over a live link: whatever split us is over (deviation 9). Not a
        # refusal: a peer that will not link with us may still be in another overlay.
        if not (isinstance(message, NeighborReply) and not message.accepted):
            self._lost.pop(sender.id, None)
        out: list[Effect] = []
        match message:
            case Join():
                self._on_join(sender, out, now)
            case ForwardJoin():
                self._on_forward_join(sender, message, out, now)
            case Neighbor():
                self._on_neighbor(sender, message, out, now)
            case NeighborReply():
                self._on_neighbor_reply(sender, message, out, now)
            case Disconnect():
                self._on_disconnect(sender, message, out, now)
            case Shuffle():
                self._on_shuffle(sender, message, out, now)
            case ShuffleReply():
                self._on_shuffle_reply(sender, message, out, now)
            case _:
                pass  # not a membership message: the driver routes those elsewhere
        return out

    def handle_link_down(self, peer: Peer, now: float) -> list[Effect]:
        """The link to `peer` broke, timed out, or could not be dialed (section 4.3)."""
        if self._left:
            return []
        out: list[Effect] = []
        if self._join is not None and self._join.contact.id == peer.id:
            # The contact is unreachable: the join failed, the driver tries another seed.
            self._join = None
        pending = self._pending.pop(peer.id, None)
        if peer.id in self._active:
            self._fail_active(peer.id, out, now)
        elif pending is not None:
            self._candidate_failed(peer.id, now)
        else:
            return out  # a temporary link closing: nothing was waiting on it
        self._refill(out, now)
        return out

    def handle_timer(self, timer: Hashable, now: float) -> list[Effect]:
        """A timer armed with `SetTimer` fired; stale ones (old tokens) do nothing."""
        if self._left:
            return []
        out: list[Effect] = []
        match timer:
            case ShuffleTimer(token=token) if token == self._shuffle_token:
                self._do_shuffle(out, now)
                self._refill(out, now)
            case JoinTimeout(token=token) if self._join is not None and token == self._join.token:
                self.stats.join_timeouts += 1
                contact = self._join.contact
                self._join = None
                if contact.id not in self._active and contact.id not in self._pending:
                    # Abandon the attempt for good: a late acceptance must not leave the
                    # contact holding a link we never took (it sees the link close).
                    out.append(CloseLink(contact))
            case NeighborTimeout(peer_id=peer_id, token=token):
                pending = self._pending.get(peer_id)
                if pending is not None and pending.token == token:
                    self._neighbor_timed_out(pending, out, now)
            case ShuffleTimeout(nonce=nonce) if nonce in self._shuffles:
                del self._shuffles[nonce]
                self.stats.shuffle_timeouts += 1
            case RefillTimer(token=token) if token == self._refill_token:
                self._refill_token = None
                self._refill_at = None
                self._refill(out, now)
            case ReconnectTimer(token=token) if token == self._reconnect_token:
                self._probe_lost(out, now)
                self._arm_reconnect(out)
            case _:
                pass  # stale or foreign timer
        return out

    # --- JOIN and FORWARD_JOIN (paper section 4.2) ----------------------------------------

    def _on_join(self, newcomer: Peer, out: list[Effect], now: float) -> None:
        # A NEIGHBOR we had out to the newcomer will never be answered (it restarted, or the
        # JOIN crossed it); this JOIN and our answer settle the link instead.
        self._pending.pop(newcomer.id, None)
        if len(self._active) >= self.config.active_size and newcomer.id not in self._active:
            if now < self._join_evicted_at + self.config.join_eviction_interval:
                # Deviation 13: busy with joins, the walks alone place the newcomer.
                self.stats.joins_walked += 1
                out.append(Send(newcomer, NeighborReply(accepted=False)))
                out.append(CloseLink(newcomer))
                for peer in self._active.values():
                    out.append(Send(peer, ForwardJoin(newcomer, self.config.arwl)))
                return
            self._join_evicted_at = now
        # "A node that receives a join request will start by adding the new node to its
        # active view, even if it has to drop a random node from it" (section 4.2). We also
        # answer, so that the newcomer adds us: views are symmetric (SPEC section 4).
        self.stats.joins_accepted += 1
        self._may_replace(newcomer.id, now, force=True)  # deviation 11
        self._add_active(newcomer, out, now)
        out.append(Send(newcomer, NeighborReply(accepted=True)))
        # "...then send to all other nodes in its active view a ForwardJoin request
        # containing the new node identifier", with time to live ARWL.
        for peer in self._active.values():
            if peer.id != newcomer.id:
                out.append(Send(peer, ForwardJoin(newcomer, self.config.arwl)))

    def _on_forward_join(
        self, sender: Peer, message: ForwardJoin, out: list[Effect], now: float
    ) -> None:
        self.stats.forward_joins += 1
        self._check_neighbor(sender, out)
        newcomer = message.peer
        if newcomer.id == self.me.id:
            return
        if message.ttl > self.config.arwl:
            # Deviation 10: a walk never runs longer than ours (the wire allows 255; a
            # member sending long walks would multiply them through the cluster).
            self.stats.ttl_clamped += 1
            message = attrs.evolve(message, ttl=self.config.arwl)
        targets = [
            peer for peer in self._active.values() if peer.id not in (sender.id, newcomer.id)
        ]
        # Section 4.2 i): "If the time to live is equal to zero or if the number of nodes in
        # p's active view is equal to one, it will add the new node to its active view."
        # Deviation 3: also when there is nobody else to forward the walk to.
        if message.ttl == 0 or len(self._active) <= 1 or not targets:
            if newcomer.id not in self._active and self._learnable(newcomer, (sender.id,), now):
                if self._may_replace(sender.id, now):
                    self._add_active(newcomer, out, now)
                    self._send_neighbor(newcomer, high=True, added=True, out=out)
                else:
                    self.stats.replacements_refused += 1
                    self._add_passive(newcomer, sources=(sender.id,))
            return
        # ii) "If the time to live is equal to PRWL, p will insert the new node into its
        # passive view."
        if message.ttl == self.config.prwl and self._learnable(newcomer, (sender.id,), now):
            self._add_passive(newcomer, sources=(sender.id,))
        # iii) + iv): decrement and forward to a random active peer other than the sender.
        target = self._rng.choice(targets)
        self.stats.forward_joins_forwarded += 1
        out.append(Send(target, ForwardJoin(newcomer, message.ttl - 1)))

    # --- NEIGHBOR and DISCONNECT (paper section 4.3) --------------------------------------

    def _on_neighbor(self, sender: Peer, message: Neighbor, out: list[Effect], now: float) -> None:
        if sender.id in self._active:
            out.append(Send(sender, NeighborReply(accepted=True)))
            return
        # "A node q that receives a high priority neighbor request will always accept the
        # request, even if it has to drop a random member from its active view... If a node
        # q receives a low priority Neighbor request, it will only accept the request if it
        # has a free slot in its active view" (section 4.3). A slot reserved by a request of
        # ours to the same peer counts as free for it (crossed requests).
        if message.high or self._free_slots(excluding=sender.id) > 0:
            self.stats.neighbor_accepted += 1
            self._add_active(sender, out, now)
            out.append(Send(sender, NeighborReply(accepted=True)))
        else:
            self.stats.neighbor_rejected += 1
            self._add_passive(sender)
            out.append(Send(sender, NeighborReply(accepted=False)))

    def _on_neighbor_reply(
        self, sender: Peer, message: NeighborReply, out: list[Effect], now: float
    ) -> None:
        if self._join is not None and self._join.contact.id == sender.id:
            # The contact's answer to our JOIN (deviation 1).
            self._join = None
            if message.accepted:
                self._accept_answer(sender, out, now)
            return
        pending = self._pending.get(sender.id)
        if pending is None:
            if message.accepted and sender.id not in self._active:
                # Its request is gone (timed out, or we evicted the peer since): the peer
                # holds a link we do not. Undo it (deviation 5).
                self.stats.repairs += 1
                out.append(Send(sender, Disconnect(alive=True)))
            return
        if pending.added:
            # A high NEIGHBOR is never refused; a refusal answers an earlier low request
            # to the same peer, and the confirmation is still to come.
            if message.accepted:
                del self._pending[sender.id]
            return
        del self._pending[sender.id]
        if sender.id in self._active:
            return  # crossed requests: the peer's own NEIGHBOR already linked us
        if message.accepted and pending.reconnect:
            # A lost contact answered: this link may be the only one across a healed cut,
            # so it is kept even if a neighbour must make room (deviation 9).
            self.stats.reconnects += 1
            self._refusals = 0
            if pending.high:
                self._reconnected_at = now
            self._add_active(sender, out, now)
            return
        if message.accepted:
            self._accept_answer(sender, out, now)
            return
        if pending.reconnect:
            # A lost contact refused a low-priority probe (its view is full): alive and
            # reachable; asked again after its (longer) wait, with high priority once the
            # window after the last reconnect is over.
            lost = self._lost.get(sender.id)
            if lost is not None:
                lost.failures += 1
            return
        # "On reject, keep the rejecter in passive and try another passive peer" (SPEC 4),
        # after a backoff of the whole refill that grows with refusals in a row.
        self.stats.neighbor_refused += 1
        entry = self._add_passive(sender)
        if entry is not None:
            entry.retry_at = now + self.config.refusal_backoff
        self._refusals += 1
        excess = self._refusals - self.config.refusals_before_backoff
        if excess > 0:
            backoff = self.config.backoff_base * 2 ** min(excess - 1, 16)
            self._refill_not_before = now + min(backoff, self.config.refill_backoff_max)
        self._refill(out, now)

    def _accept_answer(self, peer: Peer, out: list[Effect], now: float) -> None:
        """The peer took us into its active view on our request: take it into ours."""
        self._refusals = 0
        self._refill_not_before = 0.0
        if peer.id in self._active:
            return
        if len(self._active) < self.config.active_size:
            self._add_active(peer, out, now)
            return
        # Full after all (a high request filled the reserved slot meanwhile): decline.
        self.stats.repairs += 1
        out.append(Send(peer, Disconnect(alive=True)))
        self._add_passive(peer)

    def _on_disconnect(
        self, sender: Peer, message: Disconnect, out: list[Effect], now: float
    ) -> None:
        # "...a node q receives a Disconnect notification, it removes p from its active
        # view and adds p to its passive view" (section 4.3); a leaving node is forgotten.
        pending = self._pending.get(sender.id)
        if sender.id in self._active:
            self._pending.pop(sender.id, None)
            del self._active[sender.id]
            if message.alive:
                self.stats.evicted += 1
                out.append(Emit(PeerDown(sender, DownReason.EVICTED)))
                entry = self._add_passive(sender)
                if entry is not None:
                    # It just made room for someone else: do not ask it straight back.
                    entry.retry_at = now + self.config.backoff_base
            else:
                self.stats.left += 1
                out.append(Emit(PeerDown(sender, DownReason.LEFT)))
                self._passive.pop(sender.id, None)
            self._refill(out, now)
        elif not message.alive:
            self._passive.pop(sender.id, None)
            if pending is not None:
                del self._pending[sender.id]
                self._refill(out, now)
        # Disconnect(alive=True) from a non-neighbor is stale (it crossed one of ours, or
        # repairs a link we no longer hold); a pending request to it is answered separately.

    # --- SHUFFLE (paper section 4.4) ------------------------------------------------------

    def _do_shuffle(self, out: list[Effect], now: float) -> None:
        assert self._shuffle_token is not None
        cfg = self.config
        delay = cfg.shuffle_interval * self._rng.uniform(
            1 - cfg.shuffle_jitter, 1 + cfg.shuffle_jitter
        )
        out.append(SetTimer(delay, ShuffleTimer(self._shuffle_token)))
        if not self._active:
            return
        target = self._rng.choice(list(self._active.values()))
        # "...a list... containing: p's own identifier, ka nodes from its active view and kp
        # nodes from its passive view" (section 4.4).
        others = [peer for peer in self._active.values() if peer.id != target.id]
        sample = self._sample(others, cfg.shuffle_active)
        passive = [entry.peer for entry in self._passive.values()]
        sample += self._sample(passive, cfg.shuffle_passive)
        nonce = self._rng.getrandbits(64) & U64
        self._shuffles[nonce] = frozenset(peer.id for peer in sample)
        self.stats.shuffles_sent += 1
        out.append(Send(target, Shuffle(self.me, cfg.shuffle_ttl, (*sample, self.me), nonce)))
        out.append(SetTimer(cfg.shuffle_timeout, ShuffleTimeout(nonce)))

    def _on_shuffle(self, sender: Peer, message: Shuffle, out: list[Effect], now: float) -> None:
        self._check_neighbor(sender, out)
        origin = message.origin
        if origin.id == self.me.id:
            return
        # "A node q that receives a Shuffle request will first decrease its time to live. If
        # the time to live of the message is greater than zero and the number of nodes in q's
        # active view is greater than 1, the node will select a random node from its active
        # view, different from the one he received this shuffle message from, and simply
        # forwards the Shuffle request" (section 4.4). The origin is skipped too: it would
        # end the walk at the node that started it.
        if message.ttl > self.config.shuffle_ttl:
            self.stats.ttl_clamped += 1  # deviation 10, as for FORWARD_JOIN
            message = attrs.evolve(message, ttl=self.config.shuffle_ttl)
        ttl = message.ttl - 1
        if ttl > 0 and len(self._active) > 1:
            targets = [
                peer for peer in self._active.values() if peer.id not in (sender.id, origin.id)
            ]
            if targets:
                self.stats.shuffles_forwarded += 1
                target = self._rng.choice(targets)
                self._remember_route(origin.id, message.nonce, sender, now)
                out.append(Send(target, attrs.evolve(message, ttl=ttl)))
                return
        # "Otherwise, node q accepts the Shuffle request and send back, using a temporary
        # TCP connection, a ShuffleReply message that includes a number of nodes selected
        # at random from q's passive view equal to the number of nodes received". Ours goes
        # back along the walk instead (deviation 7): no connection is opened for it.
        self.stats.shuffles_received += 1
        received = {peer.id for peer in message.peers}
        candidates = [
            entry.peer
            for entry in self._passive.values()
            if entry.peer.id not in received and entry.peer.id != origin.id
        ]
        reply = self._sample(candidates, len(message.peers))
        out.append(Send(sender, ShuffleReply(tuple(reply), message.nonce, origin.id)))
        # The walk's origin chose these ids; the hops only carried them.
        # The sender is authenticated; the origin is only named, but it chose the ids: both
        # answer for them, so that neither a relay nor a made-up origin escapes.
        sources = (sender.id,) if origin.id == sender.id else (sender.id, origin.id)
        self._integrate(message.peers, sent={peer.id for peer in reply}, sources=sources, now=now)

    def _remember_route(self, origin_id: str, nonce: int, sender: Peer, now: float) -> None:
        routes = self._routes
        if self.config.shuffle_routes == 0:
            return
        while len(routes) >= self.config.shuffle_routes:
            del routes[next(iter(routes))]  # the oldest
        routes[(origin_id, nonce)] = (sender, now + self.config.shuffle_timeout)

    def _route_reply(self, message: ShuffleReply, out: list[Effect], now: float) -> None:
        route = self._routes.pop((message.origin, message.nonce), None)
        if route is None or route[1] < now or route[0].id not in self._active:
            # The walk's way back is gone (timed out, or the hop left our view): the
            # origin's own timeout covers it.
            self.stats.shuffle_replies_unroutable += 1
            return
        self.stats.shuffle_replies_routed += 1
        out.append(Send(route[0], message))

    def _on_shuffle_reply(
        self, sender: Peer, message: ShuffleReply, out: list[Effect], now: float
    ) -> None:
        if message.origin and message.origin != self.me.id:
            self._route_reply(message, out, now)
            return
        sent = self._shuffles.pop(message.nonce, None)
        if sent is None:
            return  # unknown or timed-out nonce: not an answer to anything we asked
        self.stats.shuffle_replies += 1
        self._integrate(message.peers, sent=sent, sources=(sender.id,), now=now)
        self._refill(out, now)

    def _integrate(
        self, peers: Iterable[Peer], sent: Collection[str], sources: tuple[str, ...], now: float
    ) -> None:
        # "...it will first attempt to remove identifiers sent to the peer. If no such
        # identifiers remain in the passive view, it will remove identifiers at random."
        # Entries that failed their last try go before those (`_add_passive`, deviation 2).
        budget = self.config.passive_size
        # The canonical addresses of the views, or more (an entry dropped meanwhile stays):
        # a peer whose address is not among them cannot conflict with an entry, so only
        # the teachers are asked (`_learnable` would walk both views for nothing).
        taken = {canonical_address(known.address) for known in self._active.values()}
        taken.update(map(_address_of, self._passive.values()))
        for peer in peers:
            if budget == 0:
                break
            if peer.id == self.me.id or peer.id in self._active or peer.id in self._passive:
                continue
            address = canonical_address(peer.address)
            if address in taken:
                if not self._learnable(peer, sources, now):
                    continue
            elif self._penalised(sources, now):
                continue
            budget -= 1
            self._add_passive(peer, prefer_evict=sent, sources=sources)
            taken.add(address)

    # --- what one peer may do to our views (deviations 11 and 12) -------------------------

    def _may_replace(self, sender_id: str, now: float, *, force: bool = False) -> bool:
        """Whether `sender_id`'s FORWARD_JOIN may take a newcomer in now (and count it).

        `force`: a JOIN, always taken in (section 4.2), whose eviction counts against its
        sender all the same: joining does not also buy a FORWARD_JOIN eviction."""
        if len(self._active) < self.config.active_size:
            return True  # a free slot: nobody is evicted
        period = self.config.replacement_period
        recent = [t for t in self._replacements.get(sender_id, ()) if t > now - period]
        if len(recent) >= self.config.replacement_limit and not force:
            self._replacements[sender_id] = recent
            return False
        recent.append(now)
        self._replacements[sender_id] = recent
        if len(self._replacements) > 4 * self.config.active_size:
            # Forget senders with nothing recent: the map stays as small as the views.
            self._replacements = {
                k: v for k, v in self._replacements.items() if v and v[-1] > now - period
            }
        return True

    def _learnable(self, peer: Peer, sources: tuple[str, ...], now: float) -> bool:
        """Whether to take `peer`, as taught by `sources`, into a view."""
        if self._penalised(sources, now):
            return False
        address = canonical_address(peer.address)
        for known in self._active.values():
            if known.id != peer.id and canonical_address(known.address) == address:
                self.stats.address_conflicts += 1
                return False
        stale = []
        for entry in self._passive.values():
            if entry.address == address and entry.peer.id != peer.id:
                if not entry.failures:
                    self.stats.address_conflicts += 1
                    return False
                # The id we knew there did not answer last time: most likely a node
                # restarted under another name (CLI nodes get random ones).
                stale.append(entry.peer.id)
        for peer_id in stale:
            del self._passive[peer_id]
        return True

    def _penalised(self, sources: tuple[str, ...], now: float) -> bool:
        """Whether one of `sources` is penalised for teaching bad ids (counted if so)."""
        for source in sources:
            teacher = self._teachers.get(source)
            if teacher is not None and teacher.penalised_until > now:
                self.stats.addresses_ignored += 1
                return True
        return False

    def _teacher(self, source: str, now: float) -> _Teacher:
        teacher = self._teachers.get(source)
        if teacher is None or (
            teacher.since <= now - self.config.bad_address_period and teacher.penalised_until <= now
        ):
            teacher = self._teachers[source] = _Teacher(since=now)
            if len(self._teachers) > 2 * self.config.passive_size:
                cutoff = now - self.config.bad_address_period
                self._teachers = {
                    k: t
                    for k, t in self._teachers.items()
                    if t.since > cutoff or t.penalised_until > now
                }
                self._teachers[source] = teacher
        return teacher

    def _prune_standing_failed(self, now: float) -> dict[str, float]:
        """`_standing_failed` without what is older than `bad_address_period`."""
        failed = self._standing_failed
        cutoff = now - self.config.bad_address_period
        while failed:
            oldest = next(iter(failed))
            if failed[oldest] > cutoff:
                break
            del failed[oldest]
        return failed

    def _taught_entry_failed(self, entry: _PassiveEntry, now: float) -> None:
        if entry.failures != 1 or not entry.sources:
            return  # counted once per entry
        # Every taught entry that failed in the period, once each: what a teacher's share
        # is measured against. When many nodes crash, everyone's entries fail and no
        # teacher stands out (a mass failure is not an attack, and dropping what the
        # teachers taught would slow the healing).
        failed = self._failed_entries
        failed.append(now)
        while failed[0] <= now - self.config.bad_address_period:
            failed.popleft()
        # Standing neighbours of ours failing too: a mass failure, not a teacher lying to
        # us. Early after one, the first few tries fall unevenly on the teachers, and a
        # penalty would drop untried entries that may be the last live ids we (or anyone)
        # hold. Nothing is counted against the teachers meanwhile either: the counts
        # would judge them once the exemption ends.
        if len(self._prune_standing_failed(now)) >= 2:
            return
        for source in entry.sources:
            teacher = self._teacher(source, now)
            teacher.failed += 1
            if (
                teacher.penalised_until <= now
                and teacher.failed >= self.config.bad_address_limit
                and teacher.failed > 3 * teacher.answered
                and teacher.failed > 2 * (len(failed) - teacher.failed)
            ):
                self.stats.teachers_penalised += 1
                teacher.penalised_until = now + self.config.bad_address_period
                taught = [pid for pid, e in self._passive.items() if source in e.sources]
                for pid in taught:
                    del self._passive[pid]

    # --- view operations ------------------------------------------------------------------

    def _add_active(self, peer: Peer, out: list[Effect], now: float) -> None:
        """Put `peer` in the active view, dropping a random member if full (section 4.3)."""
        if peer.id in self._active or peer.id == self.me.id:
            return
        if len(self._active) >= self.config.active_size:
            victim = self._rng.choice([p for p in self._active.values() if p.id != peer.id])
            self._evict(victim, out, now)
        entry = self._passive.pop(peer.id, None)
        if entry is not None:
            for source in entry.sources:
                self._teacher(source, now).answered += 1
        self._lost.pop(peer.id, None)
        self._active[peer.id] = peer
        self._active_since[peer.id] = now
        if len(self._active_since) > 4 * self.config.active_size:
            self._active_since = {
                pid: t for pid, t in self._active_since.items() if pid in self._active
            }
        if len(self._active) >= min(self.config.min_active, self.config.active_size):
            self._low_since = None  # a later drop starts a new grace
        out.append(Emit(PeerUp(peer)))

    def _evict(self, victim: Peer, out: list[Effect], now: float) -> None:
        # "...the member that is dropped will receive a Disconnect notification" (4.3).
        self.stats.evictions += 1
        del self._active[victim.id]
        self._pending.pop(victim.id, None)
        out.append(Emit(PeerDown(victim, DownReason.EVICTED)))
        out.append(Send(victim, Disconnect(alive=True)))
        out.append(CloseLink(victim))
        entry = self._add_passive(victim)
        if entry is not None:
            entry.retry_at = now + self.config.backoff_base

    def _add_passive(
        self,
        peer: Peer,
        prefer_evict: Collection[str] = (),
        sources: tuple[str, ...] = (),
        *,
        failed: bool = False,
    ) -> _PassiveEntry | None:
        """Put `peer` in the passive view (or return its entry); None if it cannot be there.

        In a full view an entry that failed its last try makes room first, then one of
        `prefer_evict`, then any. A `failed` peer (an active peer whose link just failed)
        only takes the place of another failed entry: never of one that may be alive
        (deviation 2)."""
        if peer.id == self.me.id or peer.id in self._active:
            return None
        entry = self._passive.get(peer.id)
        if entry is not None:
            return entry
        if len(self._passive) >= self.config.passive_size:
            # Walk the view, not the set: a set's order changes with the hash seed, and the
            # same seed must give the same run.
            victims = [pid for pid, e in self._passive.items() if e.failures]
            if not victims:
                if failed:
                    return None
                victims = list(filter(prefer_evict.__contains__, self._passive))
            if not victims:
                victims = list(self._passive)
            del self._passive[self._rng.choice(victims)]
        entry = _PassiveEntry(peer, sources=sources)
        self._passive[peer.id] = entry
        return entry

    def _fail_active(self, peer_id: str, out: list[Effect], now: float) -> None:
        """An active peer failed: PeerDown(FAILED), passive with a failure (section 4.3)."""
        peer = self._active.pop(peer_id)
        self.stats.failures += 1
        since = self._active_since.pop(peer_id, now)
        if now - since >= self.config.shuffle_interval:
            # Only a neighbour that stood counts towards a mass failure (deviation 12): a
            # newcomer pushed on us that never answers, or a link a member opens and
            # drops, is cheap to make fail and must not turn the penalty off.
            self._standing_failed.pop(peer_id, None)
            self._standing_failed[peer_id] = now
            self._prune_standing_failed(now)
        self._remember_lost(peer, now)
        out.append(Emit(PeerDown(peer, DownReason.FAILED)))
        entry = self._add_passive(peer, failed=True)
        if entry is not None:
            self._record_failure(entry, now)

    def _candidate_failed(self, peer_id: str, now: float) -> None:
        entry = self._passive.get(peer_id)
        if entry is not None:
            self._record_failure(entry, now)
        lost = self._lost.get(peer_id)
        if lost is not None:
            lost.failures += 1
            wait = self.config.reconnect_interval * 2 ** min(lost.failures, 16)
            lost.retry_at = now + min(wait, self.config.reconnect_backoff_max)

    def _record_failure(self, entry: _PassiveEntry, now: float) -> None:
        entry.failures += 1
        self._taught_entry_failed(entry, now)
        if entry.peer.id not in self._passive:
            return  # its teacher was penalised: the entry went with the others it taught
        if entry.failures >= self.config.max_failures:
            self.stats.forgotten += 1
            del self._passive[entry.peer.id]
            self._remember_lost(entry.peer, now)
            return
        backoff = self.config.backoff_base * 2 ** (entry.failures - 1)
        entry.retry_at = now + min(backoff, self.config.backoff_max)

    def _neighbor_timed_out(self, pending: _PendingNeighbor, out: list[Effect], now: float) -> None:
        del self._pending[pending.peer.id]
        self.stats.neighbor_timeouts += 1
        if pending.added:
            # Unconfirmed neighbor: the NEIGHBOR or its answer was lost. Drop it and close
            # the link so that the peer, if it did take us in, drops us too.
            if pending.peer.id in self._active:
                self._fail_active(pending.peer.id, out, now)
                out.append(CloseLink(pending.peer))
        else:
            self._candidate_failed(pending.peer.id, now)
            if pending.peer.id not in self._active:
                out.append(CloseLink(pending.peer))
        self._refill(out, now)

    def _check_neighbor(self, sender: Peer, out: list[Effect]) -> None:
        """Deviation 5: a neighbor-only message from a non-neighbor means a one-sided link."""
        if sender.id not in self._active:
            self.stats.repairs += 1
            out.append(Send(sender, Disconnect(alive=True)))

    # --- refilling the active view (section 4.3) ------------------------------------------

    def _free_slots(self, excluding: str | None = None) -> int:
        reserved = sum(1 for pid, p in self._pending.items() if not p.added and pid != excluding)
        return self.config.active_size - len(self._active) - reserved

    def _refill(self, out: list[Effect], now: float) -> None:
        # "When a node p suspects that one of the nodes present in its active view has
        # failed... it selects a random node q from its passive view and attempts to
        # establish a TCP connection with q... If the connection fails to establish, node q
        # is considered failed... another node q' is selected at random and a new attempt is
        # made" (section 4.3), with a NEIGHBOR of high priority if the active view is empty.
        if self._left:
            return
        cfg = self.config
        low = len(self._active) < min(cfg.min_active, cfg.active_size)
        if not low:
            self._low_since = None
        elif self._low_since is None:
            self._low_since = now
        # Deviation 8: high priority when the view is empty (the paper), and also when it
        # has stayed under `min_active` for `low_view_grace` (a node with one neighbour
        # among full views is refused forever otherwise).
        escalate = low and (
            not self._active
            or (self._low_since is not None and now >= self._low_since + cfg.low_view_grace)
        )
        if (
            not escalate
            and now < self._refill_not_before
            and len(self._active) >= cfg.active_size - 1
        ):
            # Refusals in a row while one neighbour short: the refill waits (deviation 8).
            self.stats.refills_backed_off += 1
            self._arm_refill(out, now, not_before=self._refill_not_before)
            return
        slots = self._free_slots()
        while slots > 0:
            ready = [
                entry
                for pid, entry in self._passive.items()
                if entry.retry_at <= now and pid not in self._pending
            ]
            if not ready:
                self._arm_refill(out, now)
                break
            entry = self._rng.choice(ready)
            high = escalate and not any(p.high for p in self._pending.values())
            if high and self._active:
                self.stats.low_view_escalations += 1
            self._send_neighbor(entry.peer, high=high, added=False, out=out)
            slots -= 1
        if low and not escalate and self._low_since is not None:
            # Come back when the grace ends, whatever else happens meanwhile.
            self._arm_refill(out, now, at=self._low_since + cfg.low_view_grace)

    def _arm_refill(
        self, out: list[Effect], now: float, *, not_before: float = 0.0, at: float | None = None
    ) -> None:
        if at is None:
            waiting = [
                entry.retry_at for pid, entry in self._passive.items() if pid not in self._pending
            ]
            if not waiting:
                return
            at = max(min(waiting), not_before)
        if self._refill_at is not None and self._refill_at <= at:
            return  # an earlier refill is already armed
        self._refill_token = self._token()
        self._refill_at = at
        out.append(SetTimer(max(at - now, 0.0), RefillTimer(self._refill_token)))

    # --- lost contacts (deviation 9) -------------------------------------------------------

    def _remember_lost(self, peer: Peer, now: float) -> None:
        cfg = self.config
        if not cfg.reconnect_interval or not cfg.max_lost or peer.id in self._lost:
            return
        # The first probe waits one interval: a peer restarting needs a moment.
        self._lost[peer.id] = _Lost(peer, now, now + cfg.reconnect_interval)
        while len(self._lost) > cfg.max_lost:
            del self._lost[next(iter(self._lost))]

    def _arm_reconnect(self, out: list[Effect]) -> None:
        interval = self.config.reconnect_interval
        if not interval:
            return
        self._reconnect_token = self._token()
        delay = interval * self._rng.uniform(0.75, 1.25)
        out.append(SetTimer(delay, ReconnectTimer(self._reconnect_token)))

    def _probe_lost(self, out: list[Effect], now: float) -> None:
        """Ask every lost contact whose wait has ended to be our neighbour again.

        All of them, not one: dead contacts must not hold up a live one across a healed
        cut (each is asked at most once per its own wait, so the dials stay bounded). For
        `reconnect_backoff_max` after one answered, the others are asked with low
        priority: that link has most likely merged the overlays already, and forcing
        a link to every other lost peer would evict a neighbour on both sides each time.
        """
        cfg = self.config
        horizon = now - cfg.reconnect_timeout
        for peer_id in [i for i, lost in self._lost.items() if lost.since < horizon]:
            del self._lost[peer_id]
        joining = self._join.contact.id if self._join is not None else None
        high = now >= self._reconnected_at + cfg.reconnect_backoff_max
        for peer_id, lost in list(self._lost.items()):
            if (
                lost.retry_at > now
                or peer_id in self._active
                or peer_id in self._pending
                or peer_id == joining
            ):
                continue
            # Set now, so that it is not asked again before this request is settled.
            wait = cfg.reconnect_interval * 2 ** min(lost.failures, 16)
            lost.retry_at = now + min(wait, cfg.reconnect_backoff_max)
            self.stats.reconnect_probes += 1
            self._send_neighbor(lost.peer, high=high, added=False, out=out, reconnect=True)

    def reach(self, peer: Peer, now: float) -> list[Effect]:
        """Ask `peer` to be our neighbour with high priority, taken in even into a full
        view, as a lost contact is (deviation 9). For the driver's seeds: seeds keep links
        to one another, so overlays that formed or healed apart through different seeds
        merge. Nothing if `peer` is already a neighbour or a request to it is out."""
        if self._left or peer.id == self.me.id:
            return []
        if peer.id in self._active or peer.id in self._pending or peer.id in self._passive:
            # A neighbour, or known to our overlay: no need to force a link (with more
            # seeds than active slots, forcing them all would evict for ever).
            return []
        out: list[Effect] = []
        self.stats.reconnect_probes += 1
        self._send_neighbor(peer, high=True, added=False, out=out, reconnect=True)
        return out

    @property
    def lost(self) -> tuple[Peer, ...]:
        """Peers lost to a failure that this node still probes (deviation 9)."""
        return tuple(entry.peer for entry in self._lost.values())

    def _send_neighbor(
        self, peer: Peer, *, high: bool, added: bool, out: list[Effect], reconnect: bool = False
    ) -> None:
        token = self._token()
        self._pending[peer.id] = _PendingNeighbor(peer, token, high, added, reconnect)
        self.stats.neighbor_requests += 1
        out.append(Send(peer, Neighbor(high=high)))
        out.append(SetTimer(self.config.neighbor_timeout, NeighborTimeout(peer.id, token)))

    # --- helpers --------------------------------------------------------------------------

    def _token(self) -> int:
        self._tokens += 1
        return self._tokens

    def _sample(self, peers: list[Peer], count: int) -> list[Peer]:
        if count <= 0 or not peers:
            return []
        if len(peers) <= count:
            result = list(peers)
            self._rng.shuffle(result)
            return result
        return self._rng.sample(peers, count)

    def check_invariants(self) -> None:
        """Raise AssertionError if a view invariant is broken (used by the tests and the sim)."""
        assert self.me.id not in self._active, "self in the active view"
        assert self.me.id not in self._passive, "self in the passive view"
        assert len(self._active) <= self.config.active_size, "active view over size"
        assert len(self._passive) <= self.config.passive_size, "passive view over size"
        assert not (self._active.keys() & self._passive.keys()), "a peer in both views"
        for pid, pending in self._pending.items():
            assert pid == pending.peer.id
            assert not pending.added or pid in self._active, "confirmation for a non-neighbor"
