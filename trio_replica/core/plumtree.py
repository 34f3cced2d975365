"""The Plumtree broadcast core: an epidemic broadcast tree as a sans-IO state machine.

This module owns the rules of Epidemic Broadcast Trees (Leitão, Pereira, Rodrigues, SRDS 2007,
following Algorithm 1 as revised by the authors in 2019, and Algorithm 2, the optimisation of
section 3.8) and SPEC section 5. It never does I/O: every input is a method call carrying the
current time, every output is a list of `Send`, `SetTimer` and `Emit` effects that the Trio
runtime carries out in order. It never blocks, never reads a clock, and never raises on a
peer's input (only on a caller's programming error).

Theory of operation
-------------------

Every neighbour (a peer in the HyParView active view) is in exactly one of two sets. *Eager*
peers receive whole payloads (GOSSIP) as soon as a message is first received; *lazy* peers
receive only announcements (IHAVE: message id, round and tag), batched per peer over a
short window. Links start eager (`neighbor_up`), so the first broadcast floods; every duplicate
payload then prunes the link it arrived on (the receiver moves the sender to lazy and sends
PRUNE so the sender does the same), and what stays eager is the tree of first arrivals. A
later broadcast follows that tree and costs one payload per node (RMR 0), while the lazy
links carry cheap announcements that detect and repair holes: a node that hears an IHAVE for
a message it lacks waits `ihave_timeout` (the paper's timeout1) for the eager copy, then
GRAFTs the first announcer, which puts the link back in the tree on both ends and answers
with the payload. If that payload does not come within `graft_timeout` (timeout2), the next
announcer is grafted, and so on until announcers run out (barrel_p2p grafts once and gives
up).

Rounds. ``Gossip.round`` is the number of hops the copy has travelled when it *arrives*:
the origin sends round 1, a node that received round r forwards round r + 1, and
`Delivered.hops` is the round received (0 for one's own broadcast). An IHAVE carries the
round its sender forwards (its own hops + 1), which is the round a grafted copy would arrive
with, so a received GOSSIP round and an announced IHAVE round compare directly. The paper
sends round 0 from the origin and delivers round + 1; the two conventions differ only by
that constant, and ours makes the wire value equal to the hop count (messages.py).

Overlapping broadcasts. When broadcasts follow each other faster than one crosses the tree,
prune and graft decisions for different messages race, and Algorithm 1 as published can
lock into a regime where the eager graph keeps falling apart and being grafted back (in
our simulations of 100 nodes, 5-20 ms links, a broadcast every 50 ms from random origins:
2 runs in 6 stayed at RMR 0.4 with about 30 repair GRAFTs per broadcast). Four local
rules, each explained where it is applied, bring that to RMR 0 in 14 runs of 16 with the
optimisation off (16 of 16 with a timeout1 of 1 s, and on 1-3 ms links with a broadcast
every 10 ms):
a first copy from a lazy peer re-grafts that link on both ends (`_on_gossip`); a second
copy over the link that brought the first is not a reason to prune it (`_on_gossip`);
timeout1 is jittered (`_on_ihave`); and a GRAFT asks its announcer for every missing
message it announced, not only the one whose timer fired (`_on_graft_timer`).

Tree optimisation (SRDS 2007 section 3.8, Algorithm 2). A node whose payload arrives by a
path at least `optimization_threshold` hops longer than one announced to it by an earlier
IHAVE grafts that announcer and prunes the sender of the long path. As in Algorithm 2,
only IHAVEs received *before* the payload count, and the check runs as the payload
arrives, so the sender pruned is the one that delivered it this instant (optimising also
on IHAVEs that arrive after delivery, against a remembered sender, prunes on stale
information: on 200 simulated nodes it raised RMR from 0 to 0.36). The tree is shared by
all origins, so with origins spread evenly each swap helps one origin and hurts others;
in the same simulations the published rule then fired about ten times per broadcast, did
not lower the mean hop count, and under overlapping broadcasts locked every run into the
repair regime above. We therefore swap only when the same announcer won on
`optimization_streak` payloads in a row (any late IHAVE from it ends its streak): a
dominant origin still pulls the tree to its shortest paths (mean hops 6.9 to 5.3; 3.6
with the published rule), while evenly spread origins rarely do (11 runs in 16 at RMR 0,
and all 16 on 1-3 ms links; none with the published rule).

The paper's optimisation GRAFT carries no message id, because the grafted peer must not
resend a payload we hold. Ours says so with `Graft.link_only`, and keeps the id, whose
origin names the tree the link joins. (It used to be implied by an IHAVE for the id sent
just before on the same link; IHAVEs now wait behind payloads, so the GRAFT overtook it.)
Should a payload come anyway, that one copy is recognised and dropped without a PRUNE,
which would undo the optimisation.

Peers outside the sets. The driver adds and removes neighbours from membership events, and
a message can race with them. A message from a peer in neither set is handled without
changing the sets and without answering: a new GOSSIP is still delivered and forwarded (it
is valid data), a duplicate is counted but not pruned, and IHAVE, GRAFT and PRUNE are
ignored, because answering or grafting would make the driver dial a peer that is not a
neighbour. Counted in `stats.from_non_neighbors`.

Flow control. The runtime may be unable to queue an eager push (the peer's link is
congested; `trio_replica.runtime.flow`). It then calls `push_deferred`, and the peer gets the
message lazily instead: an IHAVE in its next batch, so it grafts the payload when its link
has room. The peer stays eager (the link is slow, not redundant). A GRAFT answer that
cannot be queued is deferred the same way, and an announcer that answers a GRAFT with an
IHAVE goes back among the announcers to graft (`_on_ihave`). No push is ever dropped
without the peer hearing of the message.

Giving up. Under load a payload is slow far more often than lost, so a node is patient
before it gives up on a message: the runtime stretches timeout1 and timeout2 while its
own loop lags (`Broadcast.timer_delay`); a grafted announcer we keep hearing from is
waited for (`graft_patience`): its link is up, so the GRAFT or its answer is queued; when
none answers, each is grafted once more (a GRAFT can be lost: ignored by a peer that does
not yet count us as a neighbour), or every neighbour is if all the announcers left the
active view meanwhile. What a node still gives up on (or what overflows the missing
table) and still lacks `abandon_grace` later is reported with an `Abandoned` event, naming
the tags its announcers gave (IHAVE entries carry their tag; honest ones agree), so that
the layers above that tag repair it (a replica pulls a sync) and no other subscriber is
bothered. Before
these rules, 50 nodes in one process sending 2,000 broadcasts as fast as flow control
allowed gave up on 10,530 payloads, all delivered within the grace; with them, none
(bench/overlay.py).

One tree per busy origin. The paper's nodes keep one eager set for every sender, and
evaluate it with one broadcast at a time. When broadcasts from several origins overlap,
each prunes the link that was slower *for it*: in a cycle of the overlay, messages entering
from different sides prune different links, and together they cut the tree apart, which
GRAFTs then repair with duplicates (Riak's broadcast, which keeps one tree per root, met the
same: basho/riak_core#378). A 10-node cluster with a writer on every node ran at RMR 0.8-1.0
this way with no queue anywhere. So an origin that broadcasts often (`origin_tree_messages`
within `origin_tree_window`) says so in its messages (`Gossip.own_tree`), and every node
then keeps a tree for that origin's messages alone (`_Tree`), started with every neighbour
eager as at bootstrap, so that it is made of this origin's own first arrivals. The other
origins share one tree, as in the paper. A message's rules (prune, graft, regraft,
optimisation) change only the tree it follows, and PRUNE names that tree; membership
changes (a neighbour up or down) change every tree. One origin's overlap with another thus
never cuts its tree, and after a failure a busy origin's tree repairs itself at its next
message (soon: it is busy). The origin decides, not each node from the deliveries it
counts: nodes counting for themselves crossed the threshold at different moments, and the
prunes of one tree landed in another (RMR 0.3-0.5). Only busy origins get trees because
each pays for every change of the overlay, a new link entering every tree and each tree
pruning it with a duplicate of its own (with a tree for every origin, 1,000 simulated nodes
under 0.5% churn per cycle, origins drawn at random, went from RMR 0.0085, max 0.065, to
0.14, max 2.0), and its first message floods. An origin stays busy until it has not
broadcast for `origin_tree_idle`; a tree unused that long is dropped, and at most
`max_origin_trees` are kept, the least recently used dropped first. `eager` and `lazy`
report the shared tree.

Queueing is not loss. Under load a payload can spend longer in queues (outboxes waiting for
credit, inboxes) than timeout1, while IHAVEs, which are small and never wait behind
payloads, arrive on time: every such payload is then grafted as well, each graft answer is
one more payload in the same queues, and the delay feeds itself (a 10-node cluster with a
writer per node: as many GRAFTs as deliveries, queueing growing to seconds, RMR 1.3). The
runtime measures the queueing delay of deliveries and hands it to `set_delay_allowance`;
timeout1 and timeout2 armed from then on are longer by that allowance.

Memory is bounded everywhere a peer can make it grow: payload cache (count, bytes and
age), seen ids (count and age, kept longer than payloads so late duplicates are still
recognised), the missing table (count, and each entry lives at most timeout1 + k * timeout2
+ graft_patience for k announcers, at most one per neighbour), IHAVE batches (flushed by a
timer or when full). Timers are never cancelled: each carries a token, and a timer whose
token no longer matches the state it was armed for is ignored.
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterable

import attrs

from ..errors import ConfigError
from .effects import Effect, Emit, Send, SetTimer
from .events import Abandoned, Delivered
from .messages import (
    MAX_IHAVE_ENTRIES,
    MAX_ROUND,
    Gossip,
    Graft,
    IHave,
    Message,
    MessageId,
    Peer,
    Prune,
)

__all__ = [
    "AbandonTimer",
    "FlushTimer",
    "GraftTimer",
    "Plumtree",
    "PlumtreeConfig",
    "PlumtreeStats",
    "PlumtreeTimer",
]


@attrs.frozen
class PlumtreeConfig:
    """Plumtree parameters; the same values are expected on every node of a cluster."""

    #: timeout1: how long an IHAVE for a missing message waits for the eager copy before we
    #: GRAFT. The paper leaves it to deployment, from "the diameter of the overlay and a
    #: target maximum recovery latency". It must exceed how much longer a tree path takes
    #: than a lazy one, or nodes graft payloads already on their way (a duplicate each, and
    #: tree churn). 0.5 s is far above tree paths on one machine or a LAN, and keeps repair
    #: under the seconds-scale failure detection of SPEC section 3.
    #: Raise it for slow overlays: with 5-20 ms links and 100 nodes (tree paths of a few
    #: hundred ms), 1 s removed the remaining repair storms in our simulations. iroh-gossip
    #: uses 80 ms, by its own comment an unvalidated guess.
    ihave_timeout: float = 0.5
    #: timeout1 is drawn from [t, t * (1 + jitter)) per missing message: see `_on_ihave`.
    #: In simulations of 100 nodes with overlapping broadcasts, 0.25 left more runs locked
    #: in a regime of repeated repairs than 0.5; 1.0 was no better and repairs later.
    ihave_timeout_jitter: float = 0.5
    #: timeout2: after a GRAFT, how long to wait for the payload before grafting the next
    #: announcer. The paper: smaller than timeout1, in the order of an average round trip
    #: to a neighbour; the answer is a payload that may queue behind other payloads on the
    #: link, hence a few round trips rather than one.
    graft_timeout: float = 0.25
    #: A grafted announcer that keeps talking to us after our GRAFT is alive and
    #: backlogged, not failed: the GRAFT or its answer waits in a queue between us (module
    #: docstring, queueing is not loss). Once every announcer is grafted, we wait
    #: `graft_timeout` more at a time while we still hear from one of them, for at most
    #: this long in all, before giving up. Under load a give-up was nearly always such a
    #: payload (50 nodes, 2,000 broadcasts as fast as flow control allowed: 10,530
    #: give-ups, all delivered within the grace). The cost: a GRAFT the peer could not
    #: answer (payload no longer cached) is given up on up to this much later.
    graft_patience: float = 10.0
    #: IHAVEs are batched per peer over this window (SPEC section 5): one frame carries many
    #: announcements, which matters on websockets (about 55 us per frame, STYLE.md). It also
    #: gives the eager copy a head start over the announcement. 0 sends them at once.
    #: Measured (issue 19, `bench/profile_broadcast.py`, 50 paced broadcasts a second, every
    #: node in one process): from 0.05 to 0.25 s, IHAVE messages per delivery fell from
    #: 1.5 to 0.4 (N = 10) and 1.0 to 0.27 (N = 25), frames per delivery from 2.7 to 1.6
    #: and 2.1 to 1.2-1.4, CPU per delivery by 22-29% and 23%; 0.1 s got half of that. The
    #: cost: a payload that was lost is grafted up to 0.2 s later (the IHAVE that announces
    #: it comes later, then timeout1 runs), and the tree optimisation, which counts only
    #: IHAVEs that arrive before the payload, needs tree paths slower than the window: on
    #: links of tens of ms with a dominant origin, 0.05 s lets it work (on fast links no
    #: announcement beats a tree path at either setting).
    ihave_batch_window: float = 0.25
    #: Tree optimisation threshold in hops (SRDS 2007 section 3.8); SPEC section 5 asks for 3.
    #: Lower values chase small gains and churn the tree; a value above MAX_ROUND disables it.
    optimization_threshold: int = 3
    #: Payloads in a row on which one announcer must beat the eager path by the threshold
    #: before the tree is changed (1 is Algorithm 2 as published). Damps the optimisation
    #: to sources that dominate the traffic: see the module docstring for why and the
    #: measurements.
    optimization_streak: int = 5
    #: Payloads kept to answer GRAFTs. A graft comes within timeout1 + a few timeout2 of the
    #: IHAVE (about 1-2 s), so 30 s of age is a wide margin (iroh-gossip keeps 30 s too);
    #: the count bounds memory under bursts.
    cache_max_messages: int = 4096
    cache_max_age: float = 30.0
    #: Bytes of cached payloads: with large payloads the count alone would let the cache
    #: hold gigabytes (4,096 x 1 MiB). At 1 MiB per payload this still keeps the last 32.
    cache_max_bytes: int = 32 * 1024 * 1024
    #: Ids of delivered messages, kept longer than payloads so that a late duplicate (a slow
    #: path, a graft answered late) is recognised and pruned instead of being delivered twice
    #: (iroh-gossip keeps ids 90 s, three times the payloads). About 200 bytes each.
    seen_max_messages: int = 65_536
    seen_max_age: float = 90.0
    #: Messages announced but not yet received that we track at once. An entry lives at
    #: most timeout1 + (announcers * timeout2); a flood of bogus IHAVEs beyond this bound is
    #: dropped and counted rather than allowed to grow memory and timers.
    missing_max_messages: int = 8192
    #: A message given up on (every announcer grafted in vain, or no room to track it) is
    #: reported `Abandoned` only if it is still missing this long after: under load a
    #: payload can arrive after its repair timers gave up. Ids waiting for this are bounded
    #: by `missing_max_messages`; beyond it they are reported at once.
    abandon_grace: float = 10.0
    #: Most entries in one IHAVE; a fuller batch is sent at once (the wire limit by default).
    max_ihave_entries: int = MAX_IHAVE_ENTRIES
    #: This node's messages follow a tree of their own (module docstring) once it has
    #: broadcast `origin_tree_messages` times within `origin_tree_window` seconds, until
    #: it has not broadcast for `origin_tree_idle`; trees of other origins unused that long
    #: are dropped, and at most `max_origin_trees` kept. A tree costs two small sets of
    #: neighbours, and its first message floods (it starts all eager): worth it for an
    #: origin that keeps broadcasting several times a second, not for one that broadcast
    #: twice by chance (200 nodes, origins drawn at random 20 times a second: with 2 in
    #: 2 s, RMR 0.42; with 4, 0). In the cluster benchmark (50 broadcasts a second from
    #: random origins) 4 in 2 s made most of 25 origins fork a tree, each fork a flood:
    #: paced RMR 0.22-0.41 at N = 25-50; with 8 in 1 s, 0.0-0.0006, and 10 writers at
    #: full speed from a cold start keep RMR 0.08-0.09 (0.05-0.06 with 4 in 2 s).
    origin_tree_messages: int = 8
    origin_tree_window: float = 1.0
    origin_tree_idle: float = 60.0
    max_origin_trees: int = 1024
    #: False turns Plumtree into flooding over the active view, the baseline of both papers
    #: (HyParView section 5, SRDS 2007 section 4): a duplicate never prunes its link, so
    #: every link stays eager and every node forwards each payload to all its neighbours
    #: but the sender. For benchmarks (``bench/cluster.py`` measures both over the same
    #: overlay); it costs about active_size - 1 redundant copies per delivery.
    prune: bool = True

    def __attrs_post_init__(self) -> None:
        for name in (
            "ihave_timeout",
            "graft_timeout",
            "graft_patience",
            "cache_max_age",
            "seen_max_age",
            "abandon_grace",
            "origin_tree_window",
            "origin_tree_idle",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"plumtree {name} must be a positive number, got {value!r}")
        for name in ("ihave_batch_window", "ihave_timeout_jitter"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"plumtree {name} must be >= 0, got {value!r}")
        for name in (
            "optimization_threshold",
            "optimization_streak",
            "cache_max_messages",
            "cache_max_bytes",
            "missing_max_messages",
            "origin_tree_messages",
            "max_origin_trees",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"plumtree {name} must be >= 1, got {getattr(self, name)!r}")
        if not 1 <= self.max_ihave_entries <= MAX_IHAVE_ENTRIES:
            raise ConfigError(
                f"plumtree max_ihave_entries must be in 1..{MAX_IHAVE_ENTRIES}, "
                f"got {self.max_ihave_entries!r}"
            )
        # Seen ids must outlive payloads: a cached payload whose id was forgotten would be
        # delivered again on its next copy.
        if self.seen_max_messages < self.cache_max_messages:
            raise ConfigError("plumtree seen_max_messages must be >= cache_max_messages")
        if self.seen_max_age < self.cache_max_age:
            raise ConfigError("plumtree seen_max_age must be >= cache_max_age")


@attrs.define
class PlumtreeStats:
    """Counters of one Plumtree core; the runtime reads them (RMR, LDH) and never writes them.

    Message counters count messages (an IHAVE batch is one message), `*_entries` count the
    announcements inside them. The `*_size` fields are refreshed after every call.
    """

    broadcasts: int = 0
    delivered: int = 0
    gossip_received: int = 0
    gossip_sent: int = 0
    duplicates: int = 0
    ihave_received: int = 0
    ihave_entries_received: int = 0
    ihave_sent: int = 0
    ihave_entries_sent: int = 0
    #: Every GRAFT sent: repairs and optimisations (`optimisations` counts the latter).
    grafts_sent: int = 0
    grafts_received: int = 0
    #: GRAFTs we could not answer: the payload had left the cache.
    graft_misses: int = 0
    prunes_sent: int = 0
    prunes_received: int = 0
    optimisations: int = 0
    #: Links grafted back after our PRUNE crossed a first copy in flight on them.
    regrafts: int = 0
    #: GRAFTs from a peer that announced the id to us: the link is restored, no payload sent.
    grafts_without_payload: int = 0
    #: Missing messages given up on: every announcer was grafted twice and none answered,
    #: none of them still talking to us (or `graft_patience` ran out).
    missing_abandoned: int = 0
    #: Of those, given up on because every announcer left the active view (and the retry
    #: asked every neighbour in vain)...
    abandoned_announcers_left: int = 0
    #: ... or because `graft_patience` ran out while one was still talking to us.
    abandoned_after_patience: int = 0
    #: Extra `graft_timeout` waits for an answer from a grafted peer still talking to us.
    graft_waits: int = 0
    #: Missing messages whose announcers were all grafted a second time, none having
    #: answered the first GRAFT.
    graft_retries: int = 0
    #: Of those (and of the dropped ones), delivered within `abandon_grace` after all...
    late_after_abandon: int = 0
    #: ... and still missing then: reported with an `Abandoned` event.
    reported_lost: int = 0
    #: IHAVE entries dropped because the missing table was full.
    missing_dropped: int = 0
    #: Eager pushes the runtime could not queue, announced lazily instead.
    pushes_deferred: int = 0
    #: Deferred pushes whose payload had already left the cache (announced to nobody).
    deferred_uncached: int = 0
    #: Announcers grafted again because they answered a GRAFT with an IHAVE (no room).
    regraft_after_deferral: int = 0
    #: Copies that arrived after we had repaired their message with a GRAFT: the repair was
    #: premature (the payload was on its way), a sign that timeout1 is short for the load.
    copies_after_repair: int = 0
    from_non_neighbors: int = 0
    stale_timers: int = 0
    #: Largest hop count delivered so far (last delivery hop, LDH).
    max_hops: int = 0
    cache_size: int = 0
    cache_bytes: int = 0
    #: Origins with a tree of their own.
    origin_trees: int = 0
    seen_size: int = 0
    missing_size: int = 0


@attrs.frozen
class GraftTimer:
    """timeout1 or timeout2 for a missing message; stale unless `token` is the entry's.

    `answer` marks timeout2: a wait for the answer to a GRAFT (the runtime stretches only
    those while its loop lags: timeout1 guards the latency of a broken tree)."""

    id: MessageId
    token: int
    answer: bool = False


@attrs.frozen
class FlushTimer:
    """End of the IHAVE batch window; stale unless `token` is the pending flush's."""

    token: int


@attrs.frozen
class AbandonTimer:
    """End of `abandon_grace` for a message given up on."""

    id: MessageId


PlumtreeTimer = GraftTimer | FlushTimer | AbandonTimer


def _key(message: Gossip) -> str:
    """The tree a payload follows: its origin's own, or "" for the shared one."""
    return message.id.origin if message.own_tree else ""


@attrs.define
class _Seen:
    """What we remember of a delivered message after its payload may be gone."""

    at: float
    #: The peer the first copy came from (None for our own broadcast).
    first_from: Peer | None = None
    #: A peer we grafted for the optimisation, whose one resent copy is expected, not pruned.
    expect_copy_from: Peer | None = None
    #: The first copy answered our repair GRAFT.
    repaired: bool = False


@attrs.define
class _Cached:
    """A payload kept to answer GRAFTs, and the neighbours known to hold it already."""

    at: float
    tag: str
    payload: bytes
    hops: int
    #: The tree it follows: its origin's, or "" for the shared one.
    key: str
    #: Peers that announced this id to us: a GRAFT from one of them asks for the link, not
    #: for the payload (a link-only GRAFT, see `_graft_link`).
    holders: set[Peer] = attrs.Factory(set)
    signature: bytes = b""


@attrs.define
class _Missing:
    """An announced message we lack: the announcers not yet grafted, in arrival order."""

    token: int
    pending: deque[tuple[Peer, int]]
    #: The tags its announcers named, each once: an `Abandoned` names them all, so that an
    #: announcer naming a wrong tag cannot keep the loss from the true tag's subscribers.
    #: At most one per announcer, and announcers are neighbours.
    tags: list[str]
    grafted: list[Peer] = attrs.Factory(list)
    #: Per grafted announcer: messages heard from it when last grafted or waited on.
    marks: dict[Peer, int] = attrs.Factory(dict)
    #: End of `graft_patience`, set at the first wait.
    patient_until: float | None = None
    #: The round each grafted announcer announced (for a retry's GRAFT).
    rounds: dict[Peer, int] = attrs.Factory(dict)
    #: Whether the announcers were grafted a second time (once per entry)...
    retried: bool = False
    #: ... or, all of them gone, the other neighbours.
    fallback: bool = False

    def knows(self, peer: Peer) -> bool:
        return peer in self.grafted or any(p == peer for p, _ in self.pending)


@attrs.define(eq=False)
class _Tree:
    """The eager and lazy neighbours for the messages of one origin (or the shared ones).

    Dicts as insertion-ordered sets: iteration order (hence effect order) is reproducible,
    unlike a set of str-keyed objects under hash randomisation.
    """

    eager: dict[Peer, None] = attrs.Factory(dict)
    lazy: dict[Peer, None] = attrs.Factory(dict)
    #: Per announcer: consecutive payloads its earlier IHAVE beat by the threshold.
    streaks: dict[Peer, int] = attrs.Factory(dict)
    #: When a message last followed it (for dropping idle trees).
    used: float = 0.0

    def make_eager(self, peer: Peer) -> None:
        self.lazy.pop(peer, None)
        self.eager[peer] = None

    def make_lazy(self, peer: Peer) -> None:
        self.eager.pop(peer, None)
        self.lazy[peer] = None

    def forget(self, peer: Peer) -> None:
        self.eager.pop(peer, None)
        self.lazy.pop(peer, None)
        self.streaks.pop(peer, None)

    def flooded(self, now: float) -> _Tree:
        """A new tree over the same neighbours, all of them eager (as after NeighborUp)."""
        return _Tree({peer: None for peer in (*self.eager, *self.lazy)}, {}, used=now)


#: How much earlier than exact `Plumtree._expire_at` is: far more than a float's rounding
#: of times (it only makes `_expire` look when it need not).
_EXPIRY_MARGIN = 1e-6


@attrs.define(eq=False)
class Plumtree:
    """The Plumtree state of one node. Not thread-safe; driven by one task.

    `rng` makes the protocol's random choices reproducible: the jitter of timeout1, and the
    order in which eager peers are sent a payload (with equal link latencies, a simulation
    or a LAN, a fixed order would make the same neighbour win every race and bias which
    links the tree keeps).
    """

    me: str
    config: PlumtreeConfig
    rng: random.Random = attrs.field(repr=False)
    #: Whether input from `peer` waits in the runtime's queue, not yet handed to us. The
    #: runtime sets it: a grafted peer whose messages wait there is still being heard from
    #: (`_on_graft_timer`), and its answer may be among them. A query, not an input,
    #: because only a graft timer with every announcer tried asks it.
    queued_from: Callable[[Peer], bool] = attrs.field(
        default=lambda peer: False, repr=False, kw_only=True
    )
    stats: PlumtreeStats = attrs.field(init=False, factory=PlumtreeStats)
    #: The shared tree: every neighbour, eager or lazy (module docstring).
    _shared: _Tree = attrs.field(init=False, factory=_Tree)
    #: One tree per busy origin, least recently used first.
    _trees: OrderedDict[str, _Tree] = attrs.field(init=False, factory=OrderedDict)
    #: This node's own broadcasts: when the current window began, how many it holds, when
    #: the last was, and whether they follow a tree of their own.
    _own_window: float = attrs.field(init=False, default=-math.inf)
    _own_count: int = attrs.field(init=False, default=0)
    _own_last: float = attrs.field(init=False, default=-math.inf)
    _own_tree: bool = attrs.field(init=False, default=False)
    #: The time of the input being handled (set by `_expire`, which every input runs).
    _now: float = attrs.field(init=False, default=0.0)
    #: Before this time `_expire` has nothing to drop (see there).
    _expire_at: float = attrs.field(init=False, default=-math.inf)
    _seen: OrderedDict[MessageId, _Seen] = attrs.field(init=False, factory=OrderedDict)
    _cache: OrderedDict[MessageId, _Cached] = attrs.field(init=False, factory=OrderedDict)
    _cache_bytes: int = attrs.field(init=False, default=0)
    _missing: dict[MessageId, _Missing] = attrs.field(init=False, factory=dict)
    #: Messages given up on, waiting for `abandon_grace` before they are reported.
    _given_up: dict[MessageId, tuple[str, ...]] = attrs.field(init=False, factory=dict)
    #: Messages received per neighbour: a grafted peer whose count moves is alive and
    #: talking to us (`_on_graft_timer`).
    _heard_from: dict[Peer, int] = attrs.field(init=False, factory=dict)
    _batches: dict[Peer, list[tuple[MessageId, int, str]]] = attrs.field(init=False, factory=dict)
    _flush_token: int | None = attrs.field(init=False, default=None)
    _last_token: int = attrs.field(init=False, default=0)
    #: Added to timeout1 and timeout2 (`set_delay_allowance`).
    _allowance: float = attrs.field(init=False, default=0.0)

    # --- read-only views ------------------------------------------------------------------

    @property
    def eager(self) -> frozenset[Peer]:
        """Peers that receive whole payloads in the shared tree (module docstring)."""
        return frozenset(self._shared.eager)

    @property
    def lazy(self) -> frozenset[Peer]:
        """Peers that receive only IHAVE announcements in the shared tree."""
        return frozenset(self._shared.lazy)

    def eager_for(self, origin: str) -> frozenset[Peer]:
        """The eager peers for the messages of `origin` (its tree, or the shared one)."""
        tree = self._trees.get(origin, self._shared)
        return frozenset(tree.eager)

    def set_prune(self, enabled: bool) -> None:
        """Switch between Plumtree (True) and flooding over the same links (False).

        For benchmarks that compare both over one overlay. Turning pruning off makes every
        lazy peer eager on our side; every node of the cluster is expected to switch, so
        both ends of each link end up eager. Turning it back on lets duplicates prune the
        links again, as after NeighborUp.
        """
        self.config = attrs.evolve(self.config, prune=enabled)
        if not enabled:
            for tree in (self._shared, *self._trees.values()):
                for peer in list(tree.lazy):
                    tree.make_eager(peer)

    def set_delay_allowance(self, seconds: float) -> None:
        """Lengthen timeout1 and timeout2 armed from now on by `seconds` (module docstring):
        the queueing delay the runtime measures, so that queued payloads are not grafted."""
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"delay allowance must be a finite number >= 0, got {seconds!r}")
        self._allowance = seconds

    def has_seen(self, id: MessageId) -> bool:
        """Whether `id` was delivered here and is still remembered."""
        return id in self._seen

    # --- inputs ---------------------------------------------------------------------------

    def neighbor_up(self, peer: Peer, now: float) -> list[Effect]:
        """`peer` entered the active view: it starts eager (Algorithm 1, NeighborUp)."""
        self._expire(now)
        for tree in (self._shared, *self._trees.values()):
            tree.make_eager(peer)
        return self._done([])

    def neighbor_down(self, peer: Peer, now: float) -> list[Effect]:
        """`peer` left the active view: forget it everywhere (Algorithm 1, NeighborDown).

        Its announcements leave the missing table (a graft would dial a peer that is gone)
        and its queued IHAVEs are dropped. A missing entry left without announcers stays
        until its timer fires, so an announcer arriving meanwhile is still grafted.
        """
        self._expire(now)
        for tree in (self._shared, *self._trees.values()):
            tree.forget(peer)
        self._batches.pop(peer, None)
        self._heard_from.pop(peer, None)
        for entry in self._missing.values():
            if entry.knows(peer):
                entry.pending = deque((p, r) for p, r in entry.pending if p != peer)
                entry.grafted = [p for p in entry.grafted if p != peer]
        return self._done([])

    def broadcast(
        self, id: MessageId, tag: str, payload: bytes, now: float, signature: bytes = b""
    ) -> list[Effect]:
        """Broadcast a new message from this node (Algorithm 1, Broadcast).

        Payload to eager peers at round 1, IHAVE to lazy peers, and a local `Delivered`
        with hops 0 and no sender. `id` must be fresh (the runtime mints it); reusing a
        remembered id is a caller bug and raises ValueError. `signature` (the runtime's,
        opaque here) travels with the payload wherever it goes.
        """
        self._expire(now)
        if id in self._seen:
            raise ValueError(f"message id {id} was already broadcast or received")
        self.stats.broadcasts += 1
        self._missing.pop(id, None)
        own_tree = self._busy(now)
        self._remember(id, tag, payload, 0, now, own_tree, signature)
        effects = self._push(
            Gossip(id, 1, tag, payload, own_tree, signature), exclude=None, holders=()
        )
        self.stats.delivered += 1
        effects.append(Emit(Delivered(id, tag, payload, 0, None)))
        return self._done(effects)

    def handle_message(self, sender: Peer, message: Message, now: float) -> list[Effect]:
        """A Plumtree message from `sender`, the authenticated peer of the link it came on."""
        self._expire(now)
        neighbor = self._is_neighbor(sender)
        if neighbor:
            self._heard_from[sender] = self._heard_from.get(sender, 0) + 1
        if isinstance(message, Gossip):
            effects = self._on_gossip(sender, neighbor, message, now)
        elif isinstance(message, IHave):
            effects = self._on_ihave(sender, neighbor, message)
        elif isinstance(message, Graft):
            effects = self._on_graft(sender, message)
        elif isinstance(message, Prune):
            effects = self._on_prune(sender, message)
        else:
            raise TypeError(f"not a Plumtree message: {type(message).__name__}")
        return self._done(effects)

    def handle_timer(self, timer: Hashable, now: float) -> list[Effect]:
        """A timer armed by an earlier `SetTimer` fired; stale ones are counted and ignored."""
        self._expire(now)
        if isinstance(timer, GraftTimer):
            effects = self._on_graft_timer(timer)
        elif isinstance(timer, FlushTimer):
            effects = self._on_flush_timer(timer)
        elif isinstance(timer, AbandonTimer):
            effects = self._on_abandon_timer(timer)
        else:
            raise TypeError(f"not a Plumtree timer: {timer!r}")
        return self._done(effects)

    def push_deferred(self, peer: Peer, message: Gossip, now: float) -> list[Effect]:
        """The runtime could not queue `message` (a payload we pushed) for `peer`.

        The peer hears of it lazily instead: an IHAVE with the round the push carried, in
        its next batch, so that it grafts the payload once its link has room (module
        docstring, flow control). The peer stays eager: its link is slow, not redundant.
        """
        self._expire(now)
        self.stats.pushes_deferred += 1
        if not self._is_neighbor(peer):
            return self._done([])
        if message.id not in self._cache:
            # Cannot happen for a push made this instant; counted should it ever.
            self.stats.deferred_uncached += 1
            return self._done([])
        effects: list[Effect] = []
        batch = self._batches.setdefault(peer, [])
        batch.append((message.id, message.round, message.tag))
        if len(batch) >= self.config.max_ihave_entries:
            del self._batches[peer]
            effects.append(self._ihave(peer, batch))
        effects += self._arm_flush()
        return self._done(effects)

    # --- message rules --------------------------------------------------------------------

    def _on_gossip(self, sender: Peer, neighbor: bool, message: Gossip, now: float) -> list[Effect]:
        self.stats.gossip_received += 1
        if not neighbor:
            self.stats.from_non_neighbors += 1
        seen = self._seen.get(message.id)
        if seen is not None:
            # Algorithm 1, GOSSIP already received: the link closes a cycle of the tree.
            # Both ends make it lazy: we move the sender, PRUNE makes the sender move us.
            self.stats.duplicates += 1
            if seen.repaired:
                self.stats.copies_after_repair += 1
            if sender == seen.first_from:
                # A second copy over the link that brought the first (a GRAFT answer
                # crossing the eager copy): it proves no redundant path, and pruning would
                # cut our own tree link.
                return []
            if seen.expect_copy_from == sender:
                # The answer to an optimisation graft (module docstring): the new tree link
                # must stay.
                seen.expect_copy_from = None
                return []
            if not neighbor or not self.config.prune:
                return []
            key = _key(message)
            self._make_lazy(sender, key)
            self.stats.prunes_sent += 1
            return [Send(sender, Prune(key))]

        # Algorithm 1, first receipt: deliver, remember, forward, keep the sender eager.
        if message.id in self._given_up:
            del self._given_up[message.id]
            self.stats.late_after_abandon += 1
        hops = message.round
        self.stats.delivered += 1
        self.stats.max_hops = max(self.stats.max_hops, hops)
        entry = self._missing.pop(message.id, None)
        key = _key(message)
        seen = self._remember(
            message.id, message.tag, message.payload, hops, now, message.own_tree, message.signature
        )
        seen.first_from = sender
        # Built field by field: `attrs.evolve` reads the class's fields on every call, and
        # this runs once per delivery at every node.
        forward = Gossip(
            message.id,
            min(hops + 1, MAX_ROUND),
            message.tag,
            message.payload,
            message.own_tree,
            message.signature,
        )
        # Announcers already have the message: announcing it back to them is waste.
        holders: tuple[Peer, ...] = ()
        if entry is not None:
            holders = (*entry.grafted, *(p for p, _ in entry.pending))
            self._cache[message.id].holders.update(holders)
        effects: list[Effect] = []
        if sender in self._tree(key).lazy:
            # A first copy from a lazy peer: we pruned this link while the copy was in
            # flight (the only way a lazy peer sends a payload unasked). Algorithm 1 makes
            # the sender eager again on our side only, but the sender has processed our
            # PRUNE and will not send again: under overlapping broadcasts, two such races
            # at one node prune both of its tree links and cut off its subtree until a
            # timeout1 repair. Tell the sender too (a link-only GRAFT); a later duplicate
            # prunes the cycle this may leave.
            self.stats.regrafts += 1
            effects += self._graft_link(sender, message.id, hops)
        if neighbor:
            self._make_eager(sender, key)
        effects += self._push(forward, exclude=sender, holders=holders)
        if entry is not None and entry.pending:
            effects += self._optimise(message.id, key, seen, sender, hops, entry.pending)
        # Delivered goes last: the forwards are queued before the application sees the
        # message, so a slow subscriber never delays the tree.
        repaired = seen.repaired = entry is not None and bool(entry.grafted)
        effects.append(
            Emit(Delivered(message.id, message.tag, message.payload, hops, sender, repaired))
        )
        return effects

    def _on_ihave(self, sender: Peer, neighbor: bool, message: IHave) -> list[Effect]:
        self.stats.ihave_received += 1
        self.stats.ihave_entries_received += len(message.entries)
        if not neighbor:
            self.stats.from_non_neighbors += 1
            return []
        effects: list[Effect] = []
        tags = message.tags
        for id, round, tag_index in message.entries:
            if id in self._seen:
                # Delivered already, so this announcer's path was not the faster one: its
                # streak for the optimisation ends (module docstring). It holds the
                # payload, which a GRAFT from it will tell us.
                self._tree(self._guess_key(id)).streaks.pop(sender, None)
                cached = self._cache.get(id)
                if cached is not None:
                    cached.holders.add(sender)
                continue
            entry = self._missing.get(id)
            if entry is None:
                if len(self._missing) >= self.config.missing_max_messages:
                    self.stats.missing_dropped += 1
                    effects += self._give_up(id, (tags[tag_index],))
                    continue
                # Algorithm 1, IHAVE for an unknown id: remember the announcer and give the
                # eager copy timeout1 to arrive.
                token = self._token()
                self._missing[id] = _Missing(token, deque([(sender, round)]), [tags[tag_index]])
                # Jittered, so that of the nodes a broken link cut off, which all hear the
                # announcements at about the same moment, one grafts first and the rest
                # receive through it before their own timers fire (the randomised repair
                # timers of SRM). In step they would all graft, add as many links, and
                # the duplicates on those cycles, pruned concurrently by the messages in
                # flight, can cut the tree again.
                jitter = 1.0 + self.config.ihave_timeout_jitter * self.rng.random()
                delay = self.config.ihave_timeout * jitter + self._allowance
                effects.append(SetTimer(delay, GraftTimer(id, token)))
            elif sender in entry.grafted:
                # We grafted it and it announced instead of sending: its link had no room
                # for the payload (`push_deferred`). It holds the message: graft it again,
                # after the announcers not yet tried.
                self.stats.regraft_after_deferral += 1
                entry.grafted.remove(sender)
                entry.pending.append((sender, round))
            elif not entry.knows(sender):
                # Every announcer, in arrival order: each is a fallback for the one before.
                entry.pending.append((sender, round))
                if tags[tag_index] not in entry.tags:
                    entry.tags.append(tags[tag_index])
        return effects

    def _on_graft(self, sender: Peer, message: Graft) -> list[Effect]:
        self.stats.grafts_received += 1
        if not self._is_neighbor(sender):
            # A graft racing with neighbor_down: the grafter tries its next announcer after
            # timeout2; answering would dial a peer that is no longer a neighbour.
            self.stats.from_non_neighbors += 1
            return []
        # Algorithm 1, GRAFT: the link rejoins the tree; send the payload if we still have it.
        cached = self._cache.get(message.id)
        key = self._guess_key(message.id) if cached is None else cached.key
        # The link rejoins the tree the message follows (module docstring).
        self._make_eager(sender, key)
        if message.link_only:
            # The optimisation's GRAFT(null) of Algorithm 2, or a regraft: the grafter holds
            # the payload and asks for the link only.
            self.stats.grafts_without_payload += 1
            return []
        if cached is None:
            self.stats.graft_misses += 1
            return []
        if sender in cached.holders:
            # It announced this id to us, so it holds the payload after all.
            self.stats.grafts_without_payload += 1
            return []
        self.stats.gossip_sent += 1
        # Our own hop count + 1, as a forward would carry: `message.round` is what the
        # grafter was told, our cache is what we know.
        round = min(cached.hops + 1, MAX_ROUND)
        answer = Gossip(
            message.id, round, cached.tag, cached.payload, bool(cached.key), cached.signature
        )
        return [Send(sender, answer, repair=True)]

    def _on_prune(self, sender: Peer, message: Prune) -> list[Effect]:
        # `message.origin` names the tree: an origin's own, or "" for the shared one.
        self.stats.prunes_received += 1
        if not self._is_neighbor(sender):
            self.stats.from_non_neighbors += 1
            return []
        if not self.config.prune:
            # Flooding: a PRUNE sent before the switch (`set_prune`) must not undo it.
            return []
        # Algorithm 1, PRUNE: the sender dropped the link from the origin's tree; so do we.
        self._make_lazy(sender, message.origin)
        return []

    # --- timer rules ----------------------------------------------------------------------

    def _on_graft_timer(self, timer: GraftTimer) -> list[Effect]:
        entry = self._missing.get(timer.id)
        if entry is None or entry.token != timer.token:
            self.stats.stale_timers += 1
            return []
        if not entry.pending:
            if self._still_hearing(entry):
                # A grafted announcer is still talking to us, so its link is up: our GRAFT
                # or its answer waits in a queue between us (its inbox, its outbox waiting
                # for credit, ours). Wait; do not graft again (a second answer would be one
                # more payload in the same queues).
                if entry.patient_until is None:
                    entry.patient_until = self._now + self.config.graft_patience
                if self._now < entry.patient_until:
                    for peer in entry.grafted:
                        entry.marks[peer] = self._heard_from.get(peer, 0)
                    entry.token = self._token()
                    self.stats.graft_waits += 1
                    delay = self.config.graft_timeout + self._allowance
                    return [SetTimer(delay, GraftTimer(timer.id, entry.token, answer=True))]
            retry = [] if entry.retried else entry.grafted or self._all_neighbors()
            if retry:
                # Silent, or patience ran out: the GRAFT may have been lost (ignored by a
                # peer that had not yet seen us as a neighbour, or cut with a link that was
                # replaced). Each announcer still a neighbour is grafted once more. If all
                # of them left the view (churn under load), every neighbour is asked
                # instead: by now the message has had time to reach them.
                entry.retried = True
                entry.fallback = not entry.grafted
                entry.pending = deque((p, entry.rounds.get(p, 1)) for p in retry)
                entry.grafted = []
                self.stats.graft_retries += 1
            else:
                if entry.fallback or not entry.grafted:
                    self.stats.abandoned_announcers_left += 1
                elif entry.patient_until is not None and self._now >= entry.patient_until:
                    self.stats.abandoned_after_patience += 1
                # Every announcer was grafted (or left) and no payload came. A new IHAVE
                # starts over with timeout1; anti-entropy above us covers what is lost for
                # good.
                del self._missing[timer.id]
                self.stats.missing_abandoned += 1
                return self._give_up(timer.id, tuple(entry.tags))
        # Algorithm 1, Timer(mID): GRAFT the first remaining announcer, make the link eager,
        # and give it timeout2 before the next one. The same GRAFT goes for every other
        # missing message that announcer announced: a broken link leaves a run of messages
        # missing at once, and fetching them all through the one link being restored adds
        # no second new link (each would close a cycle; see _on_ihave).
        peer = entry.pending[0][0]
        effects: list[Effect] = []
        for id, missing in self._missing.items():
            round = next((r for p, r in missing.pending if p == peer), None)
            if round is None:
                continue
            # The payload has not come, so whether it follows its origin's tree is unknown:
            # its origin's tree if we keep one (module docstring).
            self._make_eager(peer, self._guess_key(id))
            missing.pending = deque((p, r) for p, r in missing.pending if p != peer)
            missing.grafted.append(peer)
            missing.marks[peer] = self._heard_from.get(peer, 0)
            missing.rounds[peer] = round
            missing.token = self._token()
            self.stats.grafts_sent += 1
            effects.append(Send(peer, Graft(id, round)))
            delay = self.config.graft_timeout + self._allowance
            effects.append(SetTimer(delay, GraftTimer(id, missing.token, answer=True)))
        return effects

    def _still_hearing(self, entry: _Missing) -> bool:
        """Whether a grafted announcer sent us anything since we grafted or last checked, or
        has input waiting in the runtime's queue."""
        return any(
            self._heard_from.get(peer, 0) > entry.marks.get(peer, 0) or self.queued_from(peer)
            for peer in entry.grafted
        )

    def _on_abandon_timer(self, timer: AbandonTimer) -> list[Effect]:
        tags = self._given_up.pop(timer.id, None)
        if tags is None:
            return []  # delivered meanwhile (counted then)
        if timer.id in self._seen or timer.id in self._missing:
            return []  # being fetched again: its own timers decide
        self.stats.reported_lost += 1
        return [Emit(Abandoned(timer.id, tags))]

    def _give_up(self, id: MessageId, tags: tuple[str, ...]) -> list[Effect]:
        """Stop fetching `id`; report it lost unless it arrives within `abandon_grace`."""
        if id in self._given_up:
            return []
        if len(self._given_up) >= self.config.missing_max_messages:
            self.stats.reported_lost += 1
            return [Emit(Abandoned(id, tags))]
        self._given_up[id] = tags
        return [SetTimer(self.config.abandon_grace, AbandonTimer(id))]

    def _on_flush_timer(self, timer: FlushTimer) -> list[Effect]:
        if timer.token != self._flush_token:
            self.stats.stale_timers += 1
            return []
        self._flush_token = None
        return self._flush_all()

    # --- helpers --------------------------------------------------------------------------

    def _push(self, gossip: Gossip, exclude: Peer | None, holders: Iterable[Peer]) -> list[Effect]:
        """EagerPush and LazyPush of Algorithm 1 for one message (`exclude`: its sender)."""
        tree = self._tree(_key(gossip))
        # The eager peers but `exclude`, by the dict's hash lookup instead of comparing
        # each peer with it (a dict holds at most one key equal to it).
        others = dict(tree.eager)
        if exclude is not None:
            others.pop(exclude, None)
        targets = list(others)
        self.rng.shuffle(targets)
        effects: list[Effect] = [Send(peer, gossip) for peer in targets]
        self.stats.gossip_sent += len(targets)
        skip = set(holders)
        if exclude is not None:
            skip.add(exclude)
        entry = (gossip.id, gossip.round, gossip.tag)
        for peer in tree.lazy:
            if peer in skip:
                continue
            batch = self._batches.setdefault(peer, [])
            batch.append(entry)
            if len(batch) >= self.config.max_ihave_entries:
                # A full batch goes now: waiting would only grow it past the wire limit.
                del self._batches[peer]
                effects.append(self._ihave(peer, batch))
        effects += self._arm_flush()
        return effects

    def _arm_flush(self) -> list[Effect]:
        """Send queued IHAVEs at the end of the batch window (or now, without a window)."""
        if self.config.ihave_batch_window == 0:
            return self._flush_all()
        if self._batches and self._flush_token is None:
            self._flush_token = self._token()
            return [SetTimer(self.config.ihave_batch_window, FlushTimer(self._flush_token))]
        return []

    def _flush_all(self) -> list[Effect]:
        batches, self._batches = self._batches, {}
        return [self._ihave(peer, batch) for peer, batch in batches.items() if batch]

    def _ihave(self, peer: Peer, batch: list[tuple[MessageId, int, str]]) -> Send:
        self.stats.ihave_sent += 1
        self.stats.ihave_entries_sent += len(batch)
        return Send(peer, IHave.of(batch))

    def _optimise(
        self,
        id: MessageId,
        key: str,
        seen: _Seen,
        sender: Peer,
        hops: int,
        announced: Iterable[tuple[Peer, int]],
    ) -> list[Effect]:
        """Algorithm 2 (section 3.8), damped: the payload came `hops` long from `sender`
        after the IHAVEs `announced`; trade that path for the shortest announced one if it
        was `optimization_threshold` hops shorter on `optimization_streak` payloads in a row.
        """
        threshold = self.config.optimization_threshold
        tree = self._tree(key)
        streaks = tree.streaks
        best: tuple[Peer, int] | None = None
        for peer, round in announced:
            if hops - round >= threshold:
                streaks[peer] = streaks.get(peer, 0) + 1
                if best is None or round < best[1]:
                    best = (peer, round)
            else:
                streaks.pop(peer, None)
        if best is None or best[0] == sender:
            return []
        announcer, round = best
        if streaks[announcer] < self.config.optimization_streak:
            return []
        # The tree changes: the evidence gathered on the old one no longer holds.
        streaks.clear()
        self.stats.optimisations += 1
        effects = self._graft_link(announcer, id, round)
        if sender in tree.eager:
            self._make_lazy(sender, key)
            self.stats.prunes_sent += 1
            effects.append(Send(sender, Prune(key)))
        seen.expect_copy_from = announcer
        return effects

    def _graft_link(self, peer: Peer, id: MessageId, round: int) -> list[Effect]:
        """GRAFT(null) of Algorithm 2: make `peer` eager on both ends, in the tree of `id`'s
        origin, without asking for the payload of `id`, which we hold."""
        self.stats.grafts_sent += 1
        cached = self._cache.get(id)
        self._make_eager(peer, self._guess_key(id) if cached is None else cached.key)
        return [Send(peer, Graft(id, round, link_only=True))]

    def _remember(
        self,
        id: MessageId,
        tag: str,
        payload: bytes,
        hops: int,
        now: float,
        own_tree: bool,
        signature: bytes,
    ) -> _Seen:
        seen = _Seen(now)
        self._seen[id] = seen
        self._may_expire_from(now)
        self._cache[id] = _Cached(
            now, tag, payload, hops, id.origin if own_tree else "", signature=signature
        )
        self._cache_bytes += len(payload)
        # Evict oldest first: both tables are in arrival order, which is time order.
        while len(self._seen) > self.config.seen_max_messages:
            self._seen.popitem(last=False)
        config = self.config
        while len(self._cache) > config.cache_max_messages or (
            self._cache_bytes > config.cache_max_bytes and len(self._cache) > 1
        ):
            self._evict_oldest_payload()
        return seen

    def _evict_oldest_payload(self) -> None:
        _, cached = self._cache.popitem(last=False)
        self._cache_bytes -= len(cached.payload)

    def _expire(self, now: float) -> None:
        """Drop what outlived its age; amortised O(1), the tables being in time order.

        Every input runs it, and most find nothing old enough: `_expire_at` (the first
        moment a table's oldest entry can expire, a little early) skips the look then.
        """
        self._now = now
        if now < self._expire_at:
            return
        config = self.config
        # Each walk stops at the entry that stays, whose expiry bounds the next look.
        expire_at = math.inf
        idle = now - config.origin_tree_idle
        trees = self._trees
        while trees:
            used = next(iter(trees.values())).used
            if used > idle:
                expire_at = used + config.origin_tree_idle
                break
            trees.popitem(last=False)
        cache_limit = now - config.cache_max_age
        while self._cache:
            first = next(iter(self._cache.values()))
            if first.at > cache_limit:
                expire_at = min(expire_at, first.at + config.cache_max_age)
                break
            self._evict_oldest_payload()
        seen_limit = now - config.seen_max_age
        seen = self._seen
        while seen:
            oldest = next(iter(seen.values()))
            if oldest.at > seen_limit:
                expire_at = min(expire_at, oldest.at + config.seen_max_age)
                break
            seen.popitem(last=False)
        self._expire_at = expire_at - _EXPIRY_MARGIN

    def _may_expire_from(self, at: float) -> None:
        """An entry of time `at` joined a table: `_expire` looks again from its expiry on
        (the shortest age bounds it; later entries of a table never expire first)."""
        config = self.config
        age = min(config.origin_tree_idle, config.cache_max_age)
        self._expire_at = min(self._expire_at, at + age - _EXPIRY_MARGIN)

    def _all_neighbors(self) -> list[Peer]:
        """Every neighbour, eager ones first (the likelier to hold a recent message)."""
        return [*self._shared.eager, *self._shared.lazy]

    def _is_neighbor(self, peer: Peer) -> bool:
        return peer in self._shared.eager or peer in self._shared.lazy

    def _tree(self, key: str) -> _Tree:
        """The tree named `key`: an origin's own (started all eager if new), or, for "",
        the shared one (module docstring)."""
        if not key:
            return self._shared
        tree = self._trees.get(key)
        if tree is None:
            tree = self._trees[key] = self._shared.flooded(self._now)
            self._may_expire_from(self._now)
            if len(self._trees) > self.config.max_origin_trees:
                self._trees.popitem(last=False)
        else:
            tree.used = self._now
            self._trees.move_to_end(key)
        return tree

    def _guess_key(self, id: MessageId) -> str:
        """The tree `id` most likely follows when we do not hold its message."""
        return id.origin if id.origin in self._trees else ""

    def _busy(self, now: float) -> bool:
        """Whether this node's next broadcast follows its own tree (module docstring)."""
        config = self.config
        if now - self._own_last > config.origin_tree_idle:
            self._own_tree = False
        if now - self._own_window > config.origin_tree_window:
            self._own_window, self._own_count = now, 0
        self._own_count += 1
        self._own_last = now
        if self._own_count >= config.origin_tree_messages:
            self._own_tree = True
        return self._own_tree

    def _make_eager(self, peer: Peer, key: str) -> None:
        """`peer` is a link of the tree named `key`."""
        self._tree(key).make_eager(peer)

    def _make_lazy(self, peer: Peer, key: str) -> None:
        """`peer` leaves the tree named `key`."""
        self._tree(key).make_lazy(peer)

    def _token(self) -> int:
        self._last_token += 1
        return self._last_token

    def _done(self, effects: list[Effect]) -> list[Effect]:
        self.stats.cache_size = len(self._cache)
        self.stats.cache_bytes = self._cache_bytes
        self.stats.seen_size = len(self._seen)
        self.stats.missing_size = len(self._missing)
        self.stats.origin_trees = len(self._trees)
        return effects

    def check_invariants(self) -> None:
        """Raise AssertionError if the bookkeeping disagrees with itself (tests, simulations)."""
        problems: list[str] = []
        shared = self._shared
        neighbors = shared.eager.keys() | shared.lazy.keys()
        for origin, tree in (("shared", shared), *self._trees.items()):
            both = tree.eager.keys() & tree.lazy.keys()
            if both:
                problems.append(f"eager and lazy at once in {origin}'s tree: {sorted(both)}")
            if tree.eager.keys() | tree.lazy.keys() != neighbors:
                problems.append(f"{origin}'s tree does not span exactly the neighbours")
            if not tree.streaks.keys() <= neighbors:
                problems.append("an optimisation streak kept for a non-neighbour")
        if len(self._trees) > self.config.max_origin_trees:
            problems.append("origin trees over their bound")
        if not self._batches.keys() <= neighbors:
            problems.append("IHAVEs queued for a non-neighbour")
        if any(not batch for batch in self._batches.values()):
            problems.append("an empty IHAVE batch is queued")
        if self._batches and self._flush_token is None:
            problems.append("IHAVEs queued with no flush timer")
        for id, entry in self._missing.items():
            if id in self._seen:
                problems.append(f"{id} is both missing and seen")
            if any(p not in neighbors for p, _ in entry.pending):
                problems.append(f"{id} has an announcer that is not a neighbour")
        if not self._cache.keys() <= self._seen.keys():
            problems.append("a cached payload whose id is not remembered")
        if len(self._cache) > self.config.cache_max_messages:
            problems.append("cache over its bound")
        if self._cache_bytes != sum(len(c.payload) for c in self._cache.values()):
            problems.append("cache bytes miscounted")
        if self._cache_bytes > self.config.cache_max_bytes and len(self._cache) > 1:
            problems.append("cache over its byte bound")
        if len(self._seen) > self.config.seen_max_messages:
            problems.append("seen ids over their bound")
        if len(self._missing) > self.config.missing_max_messages:
            problems.append("missing table over its bound")
        if len(self._given_up) > self.config.missing_max_messages:
            problems.append("given-up ids over their bound")
        if not all(self._is_neighbor(peer) for peer in self._heard_from):
            problems.append("payload counts kept for a peer that is not a neighbour")
        if any(id in self._seen for id in self._given_up):
            problems.append("a delivered message is still given up")
        if problems:
            raise AssertionError(f"plumtree {self.me}: " + "; ".join(problems))
