"""The Plumtree core driven synchronously with literal messages, then as a simulated network.

Unit tests: one per rule of SRDS 2007 Algorithms 1 and 2 and SPEC section 5, with literal
inputs and the exact effects expected. Then a property test over random input sequences
(invariants after every call), and a deterministic in-test network (cores wired as a random
regular graph, messages passed through a time-ordered queue) showing that the eager links
settle into a spanning tree (RMR 0 against flooding's), that a cut tree link is repaired
through the lazy links by GRAFT, that the tree also settles under a stream of broadcasts
overlapping in flight, and that the optimisation shortens paths from a dominant origin.
"""

from __future__ import annotations

import heapq
import random
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_replica.core.effects import Effect, Emit, Send, SetTimer
from trio_replica.core.events import Abandoned, Delivered
from trio_replica.core.messages import (
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
from trio_replica.core.plumtree import (
    AbandonTimer,
    FlushTimer,
    GraftTimer,
    Plumtree,
    PlumtreeConfig,
)
from trio_replica.errors import ConfigError

DEFAULTS = PlumtreeConfig()
#: Unit tests assert exact delays: timeout1 without its jitter (tested on its own).
CONFIG = attrs.evolve(DEFAULTS, ihave_timeout_jitter=0.0)
#: Algorithm 2 as published: optimise on the first payload that qualifies.
PAPER = attrs.evolve(CONFIG, optimization_streak=1)
T1 = CONFIG.ihave_timeout
T2 = CONFIG.graft_timeout
WINDOW = CONFIG.ihave_batch_window


def peer(name: str) -> Peer:
    return Peer(name, f"mem://{name}")


A, B, C, D, E = (peer(n) for n in "ABCDE")


def ihave(entries: Iterable[tuple[MessageId, int]], tag: str = "t") -> IHave:
    """An IHAVE announcing `(id, round)` entries, all of `tag` (the tests' broadcasts use "t")."""
    return IHave.of([(id, round, tag) for id, round in entries])


def mid(n: int, origin: str = "O") -> MessageId:
    return MessageId(origin, n, 7)


def core(
    eager: Sequence[Peer] = (), lazy: Sequence[Peer] = (), config: PlumtreeConfig = CONFIG
) -> Plumtree:
    """A core for node "me" with the given neighbours (lazy ones made so by a PRUNE)."""
    tree = Plumtree("me", config, random.Random(1))
    for p in (*eager, *lazy):
        assert tree.neighbor_up(p, 0.0) == []
    for p in lazy:
        assert tree.handle_message(p, Prune(""), 0.0) == []
    tree.check_invariants()
    return tree


def sends(effects: list[Effect]) -> list[tuple[Peer, Message]]:
    return [(e.peer, e.message) for e in effects if isinstance(e, Send)]


def timers(effects: list[Effect]) -> list[SetTimer]:
    return [e for e in effects if isinstance(e, SetTimer)]


def delivered(effects: list[Effect]) -> list[Delivered]:
    return [e.event for e in effects if isinstance(e, Emit) and isinstance(e.event, Delivered)]


def only_timer(effects: list[Effect]) -> Hashable:
    (timer,) = timers(effects)
    return timer.timer


# --- configuration ----------------------------------------------------------------------


def test_default_config_follows_the_paper_and_spec() -> None:
    assert DEFAULTS.optimization_threshold == 3
    assert DEFAULTS.graft_timeout < DEFAULTS.ihave_timeout
    assert DEFAULTS.ihave_batch_window < DEFAULTS.ihave_timeout
    assert DEFAULTS.max_ihave_entries == MAX_IHAVE_ENTRIES
    assert DEFAULTS.seen_max_age >= DEFAULTS.cache_max_age


@pytest.mark.parametrize(
    "changes",
    [
        {"ihave_timeout": 0.0},
        {"graft_timeout": -1.0},
        {"graft_patience": 0.0},
        {"ihave_timeout": float("nan")},
        {"cache_max_age": float("inf")},
        {"ihave_batch_window": -0.01},
        {"ihave_timeout_jitter": -0.5},
        {"optimization_streak": 0},
        {"optimization_threshold": 0},
        {"cache_max_messages": 0},
        {"missing_max_messages": 0},
        {"max_ihave_entries": 0},
        {"max_ihave_entries": MAX_IHAVE_ENTRIES + 1},
        {"seen_max_messages": 10, "cache_max_messages": 11},
        {"seen_max_age": 5.0, "cache_max_age": 6.0},
    ],
)
def test_invalid_config_is_refused(changes: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        PlumtreeConfig(**changes)  # type: ignore[arg-type]


# --- Algorithm 1 --------------------------------------------------------------------------


def test_broadcast_delivers_locally_pushes_to_eager_and_batches_ihaves() -> None:
    tree = core(eager=[A, B], lazy=[C, D])
    effects = tree.broadcast(mid(1), "t", b"x", 1.0)

    gossip = Gossip(mid(1), 1, "t", b"x")
    assert sorted(sends(effects)) == [(A, gossip), (B, gossip)]
    assert only_timer(effects) == FlushTimer(1)
    assert timers(effects)[0].delay == WINDOW
    assert delivered(effects) == [Delivered(mid(1), "t", b"x", 0, None)]
    assert tree.stats.broadcasts == 1 and tree.stats.delivered == 1

    # A second broadcast inside the window joins the same batches: no second timer.
    effects = tree.broadcast(mid(2), "t", b"y", 1.01)
    assert timers(effects) == []

    effects = tree.handle_timer(FlushTimer(1), 1.0 + WINDOW)
    both = ihave(((mid(1), 1), (mid(2), 1)))
    assert sends(effects) == [(C, both), (D, both)]
    assert tree.stats.ihave_sent == 2 and tree.stats.ihave_entries_sent == 4


def test_broadcast_of_a_remembered_id_is_a_caller_bug() -> None:
    tree = core(eager=[A])
    tree.broadcast(mid(1), "t", b"x", 0.0)
    with pytest.raises(ValueError):
        tree.broadcast(mid(1), "t", b"x", 0.0)


def test_first_receipt_forwards_to_eager_and_announces_to_lazy() -> None:
    tree = core(eager=[A, B], lazy=[C, D])
    effects = tree.handle_message(A, Gossip(mid(1), 2, "t", b"x"), 1.0)

    # Forwarded one hop further, never back to the sender.
    assert sends(effects) == [(B, Gossip(mid(1), 3, "t", b"x"))]
    assert delivered(effects) == [Delivered(mid(1), "t", b"x", 2, A)]
    assert A in tree.eager
    flush = only_timer(effects)
    assert sends(tree.handle_timer(flush, 1.0 + WINDOW)) == [
        (C, ihave(((mid(1), 3),))),
        (D, ihave(((mid(1), 3),))),
    ]
    assert tree.stats.gossip_received == 1 and tree.stats.delivered == 1
    assert tree.stats.max_hops == 2


def test_first_copy_from_a_lazy_peer_regrafts_the_link_on_both_ends() -> None:
    # We pruned C while its copy was in flight: C has processed our PRUNE, so making C
    # eager on our side only (Algorithm 1) would leave a one-way link. A link-only GRAFT
    # (we hold the payload) restores it on C's side too, in this origin's tree.
    tree = core(eager=[A], lazy=[C, D])
    effects = tree.handle_message(C, Gossip(mid(1), 1, "t", b"x"), 0.0)
    assert tree.eager == {A, C} and tree.lazy == {D}
    assert sends(effects) == [
        (C, Graft(mid(1), 1, link_only=True)),
        (A, Gossip(mid(1), 2, "t", b"x")),
    ]
    assert tree.stats.regrafts == 1
    assert sends(tree.handle_timer(only_timer(effects), WINDOW)) == [(D, ihave(((mid(1), 2),)))]

    # C's side: it sent the copy, got our PRUNE, then our GRAFT: eager again, and no
    # payload sent back.
    c = Plumtree("C", CONFIG, random.Random(3))
    me = peer("me")
    c.neighbor_up(me, 0.0)
    c.broadcast(mid(1), "t", b"x", 0.0)
    c.handle_message(me, Prune(""), 0.01)
    assert c.lazy == {me}
    answers = [e for _, m in sends(effects)[:1] for e in c.handle_message(me, m, 0.02)]
    assert answers == [] and c.eager == {me}


def test_a_second_copy_over_the_first_link_does_not_prune_it() -> None:
    # A's eager copy and its answer to our GRAFT crossed: no redundant path is proven.
    tree = core(eager=[A, B])
    tree.handle_message(A, Gossip(mid(1), 1, "t", b"x"), 0.0)
    assert tree.handle_message(A, Gossip(mid(1), 1, "t", b"x"), 0.1) == []
    assert tree.eager == {A, B} and tree.stats.duplicates == 1


def test_duplicate_moves_sender_to_lazy_and_prunes_it() -> None:
    tree = core(eager=[A, B])
    tree.handle_message(A, Gossip(mid(1), 1, "t", b"x"), 0.0)

    effects = tree.handle_message(B, Gossip(mid(1), 1, "t", b"x"), 0.01)
    assert effects == [Send(B, Prune(""))]
    assert tree.eager == {A} and tree.lazy == {B}
    assert tree.stats.duplicates == 1 and tree.stats.prunes_sent == 1


def test_without_pruning_every_link_stays_eager_and_forwards_every_first_copy() -> None:
    # prune=False is flooding over the active view (the papers' baseline).
    tree = core(eager=[A, B, C], config=attrs.evolve(CONFIG, prune=False))
    effects = tree.handle_message(A, Gossip(mid(1), 1, "t", b"x"), 0.0)
    assert {p for p, m in sends(effects) if isinstance(m, Gossip)} == {B, C}
    assert tree.handle_message(B, Gossip(mid(1), 1, "t", b"x"), 0.01) == []
    assert tree.eager == {A, B, C} and tree.lazy == set()
    assert tree.stats.duplicates == 1 and tree.stats.prunes_sent == 0


def test_switching_pruning_off_makes_lazy_links_eager_and_ignores_late_prunes() -> None:
    tree = core(eager=[A], lazy=[B])
    tree.set_prune(False)
    assert tree.eager == {A, B} and tree.lazy == set()
    # A PRUNE sent before the peer switched arrives late: it must not undo the switch.
    assert tree.handle_message(B, Prune(""), 0.0) == []
    assert tree.eager == {A, B}
    tree.check_invariants()
    tree.set_prune(True)
    tree.handle_message(A, Gossip(mid(1), 1, "t", b"x"), 0.0)
    assert tree.handle_message(B, Gossip(mid(1), 1, "t", b"x"), 0.01) == [Send(B, Prune(""))]


def test_prune_moves_sender_to_lazy() -> None:
    tree = core(eager=[A, B])
    assert tree.handle_message(A, Prune(""), 0.0) == []
    assert tree.eager == {B} and tree.lazy == {A}
    assert tree.stats.prunes_received == 1
    # Idempotent: a second PRUNE changes nothing.
    tree.handle_message(A, Prune(""), 0.0)
    assert tree.eager == {B} and tree.lazy == {A}


def test_ihave_for_an_unknown_id_grafts_the_announcer_after_timeout1() -> None:
    tree = core(eager=[A], lazy=[C])
    effects = tree.handle_message(C, ihave(((mid(1), 4),)), 1.0)
    (timer,) = timers(effects)
    assert timer.delay == T1
    assert sends(effects) == []
    assert tree.stats.missing_size == 1

    effects = tree.handle_timer(timer.timer, 1.0 + T1)
    assert sends(effects) == [(C, Graft(mid(1), 4))]
    assert [t.delay for t in timers(effects)] == [T2]
    assert C in tree.eager
    assert tree.stats.grafts_sent == 1

    # The grafted peer answers: delivered, the missing entry is gone, timeout2 goes stale.
    effects2 = tree.handle_message(C, Gossip(mid(1), 4, "t", b"x"), 1.0 + T1 + 0.01)
    # Marked repaired: its delay includes our timeout1 (not a queueing sample).
    assert delivered(effects2) == [Delivered(mid(1), "t", b"x", 4, C, repaired=True)]
    assert tree.stats.missing_size == 0
    assert tree.handle_timer(only_timer(effects), 1.0 + T1 + T2) == []
    assert tree.stats.stale_timers == 1


def test_timeout1_is_jittered_within_its_bound() -> None:
    tree = core(lazy=[C], config=DEFAULTS)
    delays = [
        timers(tree.handle_message(C, ihave(((mid(n), 1),)), 0.0))[0].delay for n in range(50)
    ]
    top = DEFAULTS.ihave_timeout * (1 + DEFAULTS.ihave_timeout_jitter)
    assert all(DEFAULTS.ihave_timeout <= d < top for d in delays)
    assert len(set(delays)) == 50


def test_a_graft_fetches_every_missing_message_its_announcer_announced() -> None:
    # A broken link leaves a run of messages missing; the first timer to fire grafts C for
    # all of those C announced, over the one link being restored.
    tree = core(lazy=[C, D])
    first = timers(tree.handle_message(C, ihave(((mid(1), 2), (mid(2), 3))), 0.0))[0].timer
    tree.handle_message(D, ihave(((mid(3), 4), (mid(2), 3))), 0.1)
    effects = tree.handle_timer(first, T1)
    assert sends(effects) == [(C, Graft(mid(1), 2)), (C, Graft(mid(2), 3))]
    assert [t.delay for t in timers(effects)] == [T2, T2]
    assert tree.eager == {C} and tree.lazy == {D}
    # mid(2) moves on to D at its timeout2, and D is asked for mid(3) at the same time.
    second = [t.timer for t in timers(effects)][1]
    assert sends(tree.handle_timer(second, T1 + T2)) == [
        (D, Graft(mid(2), 3)),
        (D, Graft(mid(3), 4)),
    ]


def test_eager_copy_arriving_before_timeout1_cancels_the_graft() -> None:
    tree = core(eager=[A], lazy=[C])
    timer = only_timer(tree.handle_message(C, ihave(((mid(1), 2),)), 0.0))
    tree.handle_message(A, Gossip(mid(1), 3, "t", b"x"), 0.1)
    assert tree.handle_timer(timer, T1) == []
    assert tree.stats.grafts_sent == 0 and tree.lazy == {C}


def test_graft_goes_to_the_next_announcer_when_the_first_never_answers() -> None:
    tree = core(eager=[A], lazy=[C, D, E])
    first = only_timer(tree.handle_message(C, ihave(((mid(1), 2),)), 0.0))
    # Later announcers join the same entry: no second timeout1; a repeated one is ignored.
    assert tree.handle_message(D, ihave(((mid(1), 3),)), 0.1) == []
    assert tree.handle_message(C, ihave(((mid(1), 2),)), 0.1) == []
    assert tree.handle_message(E, ihave(((mid(1), 1),)), 0.2) == []

    effects = tree.handle_timer(first, T1)
    assert sends(effects) == [(C, Graft(mid(1), 2))]
    effects = tree.handle_timer(only_timer(effects), T1 + T2)
    assert sends(effects) == [(D, Graft(mid(1), 3))]
    effects = tree.handle_timer(only_timer(effects), T1 + 2 * T2)
    assert sends(effects) == [(E, Graft(mid(1), 1))]
    # Announcers exhausted and silent: each is grafted once more, in the same order...
    for n, (p, round) in enumerate([(C, 2), (D, 3), (E, 1)], start=3):
        effects = tree.handle_timer(only_timer(effects), T1 + n * T2)
        assert sends(effects) == [(p, Graft(mid(1), round))]
    assert tree.stats.graft_retries == 1
    # ... then the entry is dropped after a last timeout2, and reported lost if it has not
    # come by the end of the grace period.
    grace = tree.handle_timer(only_timer(effects), T1 + 6 * T2)
    assert grace == [SetTimer(CONFIG.abandon_grace, AbandonTimer(mid(1)))]
    assert tree.handle_timer(AbandonTimer(mid(1)), 20.0) == [Emit(Abandoned(mid(1), ("t",)))]
    assert tree.stats.reported_lost == 1
    assert tree.stats.missing_size == 0 and tree.stats.missing_abandoned == 1
    assert tree.stats.grafts_sent == 6
    assert tree.eager == {A, C, D, E}

    # A new announcement starts over with timeout1.
    effects = tree.handle_message(C, ihave(((mid(1), 2),)), 2.0)
    assert [t.delay for t in timers(effects)] == [T1]


def test_a_grafted_announcer_still_sending_payloads_is_waited_for() -> None:
    # It keeps talking to us, so its link is up and the GRAFT or the answer is queued
    # between us: no give-up while we hear from it.
    tree = core(eager=[A], lazy=[C])
    effects = tree.handle_timer(only_timer(tree.handle_message(C, ihave(((mid(1), 2),)), 0.0)), T1)
    assert sends(effects) == [(C, Graft(mid(1), 2))]
    timer = only_timer(effects)
    now = T1
    for n in range(2, 6):
        now += T2
        # C sends a payload (a duplicate of what A sent) or an IHAVE before each timeout2.
        tree.handle_message(A, Gossip(mid(n), 1, "t", b"x"), now - 0.01)
        heard = Gossip(mid(n), 2, "t", b"x") if n % 2 else ihave(((mid(n), 2),))
        tree.handle_message(C, heard, now - 0.01)
        effects = tree.handle_timer(timer, now)
        # No second GRAFT: a second answer would queue behind the first.
        assert sends(effects) == [] and [t.delay for t in timers(effects)] == [T2]
        timer = only_timer(effects)
    assert tree.stats.graft_waits == 4 and tree.stats.missing_abandoned == 0
    # The answer arrives: delivered as a repair, nothing given up.
    got = delivered(tree.handle_message(C, Gossip(mid(1), 2, "t", b"y"), now + 0.1))
    assert [d.id for d in got] == [mid(1)] and got[0].repaired
    assert tree.handle_timer(timer, now + T2) == []
    assert tree.stats.missing_abandoned == 0 and tree.stats.late_after_abandon == 0
    tree.check_invariants()


def test_announcements_name_their_tags_and_a_give_up_names_the_announcers() -> None:
    """IHAVE entries carry each message's tag, listed once per batch, so that a node that
    gives up on a message tells only that tag's subscribers (`Abandoned.tags`)."""
    sender = core(lazy=[B])
    effects = sender.broadcast(mid(1, "me"), "chat", b"x", 0.0)
    effects += sender.broadcast(mid(2, "me"), "maps/users", b"y", 0.0)
    effects += sender.broadcast(mid(3, "me"), "chat", b"z", 0.0)
    (flush,) = timers(effects)
    ((to, batch),) = sends(sender.handle_timer(flush.timer, WINDOW))
    assert to == B and isinstance(batch, IHave)
    assert batch.tags == ("chat", "maps/users")
    assert [(id, round, batch.tags[i]) for id, round, i in batch.entries] == [
        (mid(1, "me"), 1, "chat"),
        (mid(2, "me"), 1, "maps/users"),
        (mid(3, "me"), 1, "chat"),
    ]

    # A batch of several tags: each id given up on names its own entry's tag.
    tree = core(lazy=[C], config=PlumtreeConfig(missing_max_messages=1))
    effects = tree.handle_message(C, IHave.of([(mid(1), 2, "a"), (mid(2), 2, "b")]), 0.0)
    graft, grace = timers(effects)
    assert grace == SetTimer(tree.config.abandon_grace, AbandonTimer(mid(2)))  # table full
    assert tree.handle_timer(grace.timer, 10.0) == [Emit(Abandoned(mid(2), ("b",)))]
    effects = tree.handle_timer(graft.timer, T1)
    while not any(isinstance(e.timer, AbandonTimer) for e in timers(effects)):
        assert sends(effects), "grafts until it gives up"
        effects = tree.handle_timer(only_timer(effects), T1 + 10 * T2)
    (abandon,) = timers(effects)
    assert tree.handle_timer(abandon.timer, 100.0) == [Emit(Abandoned(mid(1), ("a",)))]

    # Two announcers disagree on the tag: both are told, so a lying first announcer cannot
    # keep the loss from the true tag's subscribers.
    tree = core(eager=[A], lazy=[C, D, E])
    first = only_timer(tree.handle_message(C, ihave(((mid(1), 2),), tag="other"), 0.0))
    assert tree.handle_message(D, ihave(((mid(1), 2),), tag="chat"), 0.0) == []
    assert tree.handle_message(E, ihave(((mid(1), 2),), tag="chat"), 0.0) == []
    effects = tree.handle_timer(first, T1)
    while not any(isinstance(e.timer, AbandonTimer) for e in timers(effects)):
        assert sends(effects), "grafts until it gives up"
        effects = tree.handle_timer(only_timer(effects), T1 + 10 * T2)
    (abandon,) = timers(effects)
    expected = Abandoned(mid(1), ("other", "chat"))
    assert tree.handle_timer(abandon.timer, 100.0) == [Emit(expected)]


def test_a_silent_grafted_announcer_is_given_up_on_and_patience_is_bounded() -> None:
    config = attrs.evolve(CONFIG, graft_patience=1.0)
    tree = core(eager=[A], lazy=[C], config=config)
    first = only_timer(tree.handle_message(C, ihave(((mid(1), 2),)), 0.0))
    timer = only_timer(tree.handle_timer(first, T1))
    # Silent since the GRAFT: grafted once more, then given up on at its timeout2.
    effects = tree.handle_timer(timer, T1 + T2)
    assert sends(effects) == [(C, Graft(mid(1), 2))]
    assert timers(tree.handle_timer(only_timer(effects), T1 + 2 * T2)) == [
        SetTimer(config.abandon_grace, AbandonTimer(mid(1)))
    ]
    assert tree.stats.missing_abandoned == 1 and tree.stats.graft_waits == 0

    # Streaming forever: waited for at most graft_patience after the first wait.
    first = only_timer(tree.handle_message(C, ihave(((mid(2), 2),)), 2.0))
    timer = only_timer(tree.handle_timer(first, 2.0 + T1))
    now, n = 2.0 + T1, 10
    while True:
        now += T2
        n += 1
        tree.handle_message(C, Gossip(mid(n), 2, "t", b"x"), now - 0.01)
        effects = tree.handle_timer(timer, now)
        if sends(effects):
            break
        timer = only_timer(effects)
    # The first wait began one timeout2 after the GRAFT; patience ends 1 s after it, and
    # then C is grafted once more, and given up on at once after that timeout2 though it
    # still talks (patience is spent).
    assert 2.0 + T1 + T2 + config.graft_patience <= now < 2.0 + T1 + 3 * T2 + config.graft_patience
    assert sends(effects) == [(C, Graft(mid(2), 2))]
    tree.handle_message(C, ihave(((mid(99), 2),)), now + 0.1)
    effects = tree.handle_timer(only_timer(effects), now + T2)
    assert timers(effects) == [SetTimer(config.abandon_grace, AbandonTimer(mid(2)))]
    assert tree.stats.missing_abandoned == 2 and tree.stats.abandoned_after_patience == 1
    tree.check_invariants()


def test_graft_patience_forgets_a_neighbour_that_left() -> None:
    tree = core(eager=[A], lazy=[C])
    timer = only_timer(
        tree.handle_timer(only_timer(tree.handle_message(C, ihave(((mid(1), 2),)), 0.0)), T1)
    )
    tree.handle_message(C, Gossip(mid(2), 2, "t", b"x"), T1 + 0.1)
    tree.neighbor_down(C, T1 + 0.2)
    tree.check_invariants()
    # C is gone, so we hear from no grafted peer: the neighbours left are asked instead...
    effects = tree.handle_timer(timer, T1 + T2)
    assert sends(effects) == [(A, Graft(mid(1), 1))]
    # ... and when they do not answer either, the message is given up on.
    assert tree.handle_timer(only_timer(effects), T1 + 2 * T2) == [
        SetTimer(CONFIG.abandon_grace, AbandonTimer(mid(1)))
    ]
    assert tree.stats.abandoned_announcers_left == 1 and tree.stats.graft_retries == 1


def test_graft_is_answered_from_the_cache() -> None:
    tree = core(eager=[A], lazy=[C])
    tree.handle_message(A, Gossip(mid(1), 2, "t", b"x"), 0.0)

    effects = tree.handle_message(C, Graft(mid(1), 3), 0.5)
    # The answer carries our own hop count + 1, like a forward would; it is a repair, which
    # ordinary pushes must not crowd out of the outbox.
    assert effects == [Send(C, Gossip(mid(1), 3, "t", b"x"), repair=True)]
    assert C in tree.eager
    assert tree.stats.grafts_received == 1


def test_graft_for_an_unknown_id_only_restores_the_link() -> None:
    tree = core(eager=[A], lazy=[C])
    assert tree.handle_message(C, Graft(mid(9), 3), 0.0) == []
    assert C in tree.eager
    assert tree.stats.graft_misses == 1


def test_neighbor_up_adds_to_eager() -> None:
    tree = core(lazy=[C])
    tree.neighbor_up(A, 0.0)
    assert tree.eager == {A}
    # A peer that comes up again while lazy is eager again (Algorithm 1, NeighborUp).
    tree.neighbor_up(C, 0.0)
    assert tree.eager == {A, C} and tree.lazy == set()


def test_neighbor_down_removes_from_sets_queues_and_missing_announcers() -> None:
    tree = core(eager=[A, B], lazy=[C, D, E])
    tree.broadcast(mid(5), "t", b"x", 0.0)  # queues IHAVEs for C, D, E
    first = only_timer(tree.handle_message(C, ihave(((mid(1), 2),)), 0.0))
    tree.handle_message(D, ihave(((mid(1), 2),)), 0.0)

    for p in (A, C):
        assert tree.neighbor_down(p, 0.01) == []
    tree.check_invariants()
    assert tree.eager == {B} and tree.lazy == {D, E}
    assert A not in tree.eager and C not in tree.lazy
    # No IHAVE for the peer that left, and its announcement is forgotten: D is grafted.
    assert [p for p, _ in sends(tree.handle_timer(FlushTimer(1), WINDOW))] == [D, E]
    assert sends(tree.handle_timer(first, T1)) == [(D, Graft(mid(1), 2))]


def test_neighbor_down_of_the_grafted_peer_moves_on_at_timeout2() -> None:
    tree = core(lazy=[C, D])
    first = only_timer(tree.handle_message(C, ihave(((mid(1), 2),)), 0.0))
    tree.handle_message(D, ihave(((mid(1), 2),)), 0.0)
    second = only_timer(tree.handle_timer(first, T1))
    tree.neighbor_down(C, T1 + 0.01)
    assert sends(tree.handle_timer(second, T1 + T2)) == [(D, Graft(mid(1), 2))]


def test_cache_is_bounded_by_count_but_ids_are_remembered_longer() -> None:
    config = PlumtreeConfig(cache_max_messages=2, seen_max_messages=4)
    tree = core(eager=[A], lazy=[C], config=config)
    for n in range(1, 4):
        tree.handle_message(A, Gossip(mid(n), 1, "t", b"%d" % n), 0.0)
    assert tree.stats.cache_size == 2 and tree.stats.seen_size == 3

    # The oldest payload is gone: a graft for it is not answered, the newest is.
    assert tree.handle_message(C, Graft(mid(1), 2), 0.0) == []
    assert sends(tree.handle_message(C, Graft(mid(3), 2), 0.0)) == [
        (C, Gossip(mid(3), 2, "t", b"3"))
    ]
    # Its id is still known: a late copy is a duplicate, not a second delivery.
    effects = tree.handle_message(C, Gossip(mid(1), 5, "t", b"1"), 0.0)
    assert effects == [Send(C, Prune(""))]

    # The seen ids are bounded too, oldest first.
    for n in range(4, 7):
        tree.handle_message(A, Gossip(mid(n), 1, "t", b"x"), 0.0)
    assert tree.stats.seen_size == 4
    assert not tree.has_seen(mid(2)) and tree.has_seen(mid(3))


def test_cache_is_bounded_by_age() -> None:
    config = PlumtreeConfig(cache_max_age=10.0, seen_max_age=20.0)
    tree = core(eager=[A], lazy=[C], config=config)
    tree.handle_message(A, Gossip(mid(1), 1, "t", b"x"), 0.0)
    tree.handle_message(A, Gossip(mid(2), 1, "t", b"y"), 5.0)

    assert tree.handle_message(C, Graft(mid(1), 2), 9.9) != []
    assert tree.handle_message(C, Graft(mid(1), 2), 10.0) == []
    assert tree.stats.cache_size == 1
    assert tree.handle_message(C, Graft(mid(2), 2), 10.0) != []

    # Past seen_max_age the id itself is forgotten (the documented limit of any bound).
    tree.handle_message(A, Prune(""), 19.0)
    assert tree.has_seen(mid(1))
    tree.neighbor_up(A, 20.0)
    assert not tree.has_seen(mid(1)) and tree.stats.seen_size == 1


def test_ihave_batch_is_split_at_max_entries() -> None:
    # Five broadcasts at once would make this node busy, with a tree of its own: keep the
    # shared tree, where C is lazy.
    config = PlumtreeConfig(max_ihave_entries=2, origin_tree_messages=10**6)
    tree = core(eager=[A], lazy=[C], config=config)
    all_effects: list[Effect] = []
    for n in range(1, 6):
        all_effects += tree.broadcast(mid(n), "t", b"x", 0.0)
    ihaves = [m for p, m in sends(all_effects) if isinstance(m, IHave)]
    # Full batches leave at once, without waiting for the window.
    assert ihaves == [
        ihave(((mid(1), 1), (mid(2), 1))),
        ihave(((mid(3), 1), (mid(4), 1))),
    ]
    flush = only_timer(all_effects)
    assert sends(tree.handle_timer(flush, WINDOW)) == [(C, ihave(((mid(5), 1),)))]


def test_zero_batch_window_announces_at_once() -> None:
    tree = core(eager=[A], lazy=[C], config=PlumtreeConfig(ihave_batch_window=0.0))
    effects = tree.broadcast(mid(1), "t", b"x", 0.0)
    assert (C, ihave(((mid(1), 1),))) in sends(effects)
    assert timers(effects) == []


def test_stale_timers_are_ignored() -> None:
    tree = core(eager=[A], lazy=[C])
    old = only_timer(tree.handle_message(C, ihave(((mid(1), 2),)), 0.0))
    tree.handle_message(A, Gossip(mid(1), 3, "t", b"x"), 0.1)
    # A timer for a message since received, a flush that never was, an unknown entry.
    assert tree.handle_timer(old, T1) == []
    assert tree.handle_timer(FlushTimer(99), T1) == []
    assert tree.handle_timer(GraftTimer(mid(7), 1), T1) == []
    assert tree.stats.stale_timers == 3

    # A timer of an earlier entry for the same id does not fire the new entry's graft.
    tree2 = core(lazy=[C, D])
    first = only_timer(tree2.handle_message(C, ihave(((mid(1), 2),)), 0.0))
    second = only_timer(tree2.handle_timer(first, T1))
    # C silent: grafted once more, then dropped (reported later, unless it arrives).
    retry = only_timer(tree2.handle_timer(second, T1 + T2))
    assert timers(tree2.handle_timer(retry, T1 + 2 * T2)) == [
        SetTimer(CONFIG.abandon_grace, AbandonTimer(mid(1)))
    ]
    assert tree2.stats.missing_size == 0
    renewed = only_timer(tree2.handle_message(D, ihave(((mid(1), 2),)), 2.0))
    assert tree2.handle_timer(first, 2.1) == []
    assert tree2.handle_timer(second, 2.1) == []
    assert tree2.handle_timer(retry, 2.1) == []
    assert sends(tree2.handle_timer(renewed, 2.0 + T1)) == [(D, Graft(mid(1), 2))]

    with pytest.raises(TypeError):
        tree.handle_timer(("not", "ours"), 0.0)


# --- flow control -------------------------------------------------------------------------


def test_a_deferred_push_is_announced_and_grafted_later() -> None:
    """No loss without repair: a push the runtime could not queue reaches the peer lazily."""
    sender = core(eager=[B])
    (push,) = sends(sender.broadcast(mid(1, "me"), "t", b"x", 0.0))
    assert push == (B, Gossip(mid(1, "me"), 1, "t", b"x"))
    effects = sender.push_deferred(B, Gossip(mid(1, "me"), 1, "t", b"x"), 0.0)
    assert sends(effects) == []  # batched like any IHAVE
    flushed = sender.handle_timer(only_timer(effects), WINDOW)
    assert sends(flushed) == [(B, ihave(((mid(1, "me"), 1),)))]
    assert sender.eager == {B}, "a slow link stays in the tree"
    assert sender.stats.pushes_deferred == 1

    # The receiver grafts it after timeout1; the sender answers with the payload.
    receiver = core(eager=[peer("me")])
    timer = only_timer(receiver.handle_message(peer("me"), ihave(((mid(1, "me"), 1),)), 0.1))
    graft = sends(receiver.handle_timer(timer, 0.1 + T1))
    assert graft == [(peer("me"), Graft(mid(1, "me"), 1))]
    answer = sends(sender.handle_message(B, Graft(mid(1, "me"), 1), 0.2 + T1))
    assert answer == [(B, Gossip(mid(1, "me"), 1, "t", b"x"))]
    got = receiver.handle_message(peer("me"), Gossip(mid(1, "me"), 1, "t", b"x"), 0.3 + T1)
    assert [d.id for d in delivered(got)] == [mid(1, "me")]


def test_an_announcer_that_defers_its_graft_answer_is_grafted_again() -> None:
    tree = core(eager=[A], lazy=[C])
    first = only_timer(tree.handle_message(C, ihave(((mid(1), 2),)), 0.0))
    effects = tree.handle_timer(first, T1)
    assert sends(effects) == [(C, Graft(mid(1), 2))]
    # C had no room for the payload: it announces again instead (push_deferred there).
    assert tree.handle_message(C, ihave(((mid(1), 2),)), T1 + 0.1) == []
    assert tree.stats.regraft_after_deferral == 1
    again = tree.handle_timer(only_timer(effects), T1 + T2)
    assert sends(again) == [(C, Graft(mid(1), 2))], "not abandoned: C still holds it"
    tree.check_invariants()


def test_a_message_given_up_on_is_not_reported_if_it_arrives_late() -> None:
    """Under load a payload can arrive after its repair timers gave up: not a loss."""
    tree = core(eager=[A], lazy=[C])
    first = only_timer(tree.handle_message(C, ihave(((mid(1), 2),)), 0.0))
    second = only_timer(tree.handle_timer(first, T1))
    retry = only_timer(tree.handle_timer(second, T1 + T2))
    assert timers(tree.handle_timer(retry, T1 + 2 * T2)) == [
        SetTimer(CONFIG.abandon_grace, AbandonTimer(mid(1)))
    ]
    assert delivered(tree.handle_message(A, Gossip(mid(1), 4, "t", b"x"), 3.0))
    assert tree.handle_timer(AbandonTimer(mid(1)), 20.0) == []
    assert tree.stats.late_after_abandon == 1 and tree.stats.reported_lost == 0
    tree.check_invariants()


def test_the_payload_cache_is_bounded_in_bytes() -> None:
    tree = core(eager=[A], config=attrs.evolve(CONFIG, cache_max_bytes=2500))
    for n in range(5):
        tree.broadcast(mid(n, "me"), "t", b"x" * 1000, float(n))
        tree.check_invariants()
    assert tree.stats.cache_size == 2 and tree.stats.cache_bytes == 2000
    # A GRAFT for an evicted payload is a miss; the newest are still answered.
    assert sends(tree.handle_message(A, Graft(mid(0, "me"), 1), 5.0)) == []
    assert len(sends(tree.handle_message(A, Graft(mid(4, "me"), 1), 5.0))) == 1
    # One payload larger than the bound is still kept (it may be grafted).
    tree.broadcast(mid(9, "me"), "t", b"y" * 5000, 6.0)
    assert tree.stats.cache_size == 1 and tree.stats.cache_bytes == 5000


def test_delivery_happens_exactly_once_per_id() -> None:
    tree = core(eager=[A, B], lazy=[C])
    copies: list[Effect] = []
    copies += tree.handle_message(A, Gossip(mid(1), 1, "t", b"x"), 0.0)
    copies += tree.handle_message(B, Gossip(mid(1), 2, "t", b"x"), 0.0)
    copies += tree.handle_message(C, Gossip(mid(1), 1, "t", b"x"), 0.0)
    copies += tree.handle_message(A, Gossip(mid(1), 1, "t", b"x"), 1.0)
    copies += tree.broadcast(mid(2), "t", b"y", 1.0)
    copies += tree.handle_message(B, Gossip(mid(2), 3, "t", b"y"), 1.0)
    assert [d.id for d in delivered(copies)] == [mid(1), mid(2)]
    assert tree.stats.delivered == 2 and tree.stats.duplicates == 4


def test_round_is_clamped_to_the_wire_limit() -> None:
    tree = core(eager=[A, B])
    effects = tree.handle_message(A, Gossip(mid(1), MAX_ROUND, "t", b"x"), 0.0)
    assert sends(effects) == [(B, Gossip(mid(1), MAX_ROUND, "t", b"x"))]


def test_messages_from_non_neighbors_change_no_set_and_get_no_answer() -> None:
    tree = core(eager=[A], lazy=[C])
    stranger = peer("X")
    effects = tree.handle_message(stranger, Gossip(mid(1), 1, "t", b"x"), 0.0)
    # Valid data is delivered and forwarded, but the stranger joins no set.
    assert delivered(effects) == [Delivered(mid(1), "t", b"x", 1, stranger)]
    assert sends(effects) == [(A, Gossip(mid(1), 2, "t", b"x"))]
    assert tree.handle_message(stranger, Gossip(mid(1), 1, "t", b"x"), 0.0) == []
    assert tree.handle_message(stranger, Graft(mid(1), 1), 0.0) == []
    assert tree.handle_message(stranger, ihave(((mid(2), 1),)), 0.0) == []
    assert tree.handle_message(stranger, Prune(""), 0.0) == []
    assert tree.eager == {A} and tree.lazy == {C}
    assert tree.stats.missing_size == 0 and tree.stats.from_non_neighbors == 5
    with pytest.raises(TypeError):
        tree.handle_message(A, object(), 0.0)  # type: ignore[arg-type]


def test_missing_table_is_bounded() -> None:
    tree = core(lazy=[C], config=PlumtreeConfig(missing_max_messages=2))
    effects = tree.handle_message(C, ihave(tuple((mid(n), 1) for n in range(5))), 0.0)
    # Two tracked (timeout1 each); three dropped, of which two wait out the grace period
    # (bounded like the table) and the last is reported lost at once.
    graft_timers = [t for t in timers(effects) if isinstance(t.timer, GraftTimer)]
    assert len(graft_timers) == 2
    assert tree.stats.missing_size == 2 and tree.stats.missing_dropped == 3
    assert [e.event for e in effects if isinstance(e, Emit)] == [Abandoned(mid(4), ("t",))]
    tree.check_invariants()


# --- Algorithm 2: tree optimisation --------------------------------------------------------


def test_optimisation_grafts_an_announcer_that_beat_the_eager_copy() -> None:
    tree = core(eager=[A, B], lazy=[C, D, E], config=PAPER)
    tree.handle_message(C, ihave(((mid(1), 3),)), 0.0)
    tree.handle_message(D, ihave(((mid(1), 2),)), 0.0)
    tree.handle_message(E, ihave(((mid(1), 2),)), 0.0)
    effects = tree.handle_message(A, Gossip(mid(1), 5, "t", b"x"), 0.1)
    # Three hops shorter: the first announcer with the smallest round is grafted and the
    # sender of the long path pruned. The GRAFT asks for the link only: the paper's
    # GRAFT(null). The announcers get no IHAVE (they have the message); B gets the payload
    # as usual.
    assert sends(effects) == [
        (B, Gossip(mid(1), 6, "t", b"x")),
        (D, Graft(mid(1), 2, link_only=True)),
        (A, Prune("")),
    ]
    assert timers(effects) == []
    assert delivered(effects) == [Delivered(mid(1), "t", b"x", 5, A)]
    assert tree.eager == {B, D} and tree.lazy == {A, C, E}
    assert tree.stats.optimisations == 1 and tree.stats.missing_size == 0

    # Should D resend the payload anyway: one duplicate, but no PRUNE (that would undo the
    # optimisation). A second copy from D is an ordinary duplicate again.
    assert tree.handle_message(D, Gossip(mid(1), 3, "t", b"x"), 0.2) == []
    assert tree.eager == {B, D} and tree.stats.duplicates == 1
    assert tree.handle_message(D, Gossip(mid(1), 3, "t", b"x"), 0.3) == [Send(D, Prune(""))]


def test_no_optimisation_below_the_threshold() -> None:
    tree = core(eager=[A], lazy=[C], config=PAPER)
    tree.handle_message(C, ihave(((mid(1), 4),)), 0.0)
    effects = tree.handle_message(A, Gossip(mid(1), 6, "t", b"x"), 0.1)
    assert [m for _, m in sends(effects) if isinstance(m, Graft | Prune)] == []
    assert tree.eager == {A} and tree.lazy == {C}


def test_no_optimisation_on_an_ihave_after_delivery() -> None:
    # Only announcements that beat the payload count (Algorithm 2; the module docstring
    # has the measurement against optimising on late announcements too).
    tree = core(eager=[A], lazy=[C], config=PAPER)
    tree.handle_message(A, Gossip(mid(1), 9, "t", b"x"), 0.0)
    assert tree.handle_message(C, ihave(((mid(1), 1),)), 0.1) == []
    assert tree.eager == {A} and tree.stats.optimisations == 0


def test_graft_from_a_peer_that_announced_the_id_restores_only_the_link() -> None:
    # The other end of the optimisation: D announced the id to us, so it has the payload.
    tree = core(eager=[A], lazy=[D])
    tree.handle_message(A, Gossip(mid(1), 1, "t", b"x"), 0.0)
    assert tree.handle_message(D, ihave(((mid(1), 7),)), 0.1) == []
    assert tree.handle_message(D, Graft(mid(1), 2), 0.1) == []
    assert D in tree.eager
    assert tree.stats.grafts_without_payload == 1


def test_optimisation_round_trip_between_two_cores() -> None:
    # Y announces round 2 to X before X's payload arrives from P on a path 7 hops long.
    x = Plumtree("X", PAPER, random.Random(1))
    y = Plumtree("Y", PAPER, random.Random(2))
    X, Y, P, Q = peer("X"), peer("Y"), peer("P"), peer("Q")
    for p in (P, Y):
        x.neighbor_up(p, 0.0)
    for p in (Q, X):
        y.neighbor_up(p, 0.0)
    x.handle_message(Y, Prune(""), 0.0)
    y.handle_message(X, Prune(""), 0.0)
    flush = only_timer(y.handle_message(Q, Gossip(mid(1), 1, "t", b"x"), 0.0))
    (announce,) = sends(y.handle_timer(flush, WINDOW))
    assert announce == (X, ihave(((mid(1), 2),)))
    x.handle_message(Y, announce[1], WINDOW)

    effects = x.handle_message(P, Gossip(mid(1), 7, "t", b"x"), WINDOW + 0.01)
    to_y = [m for p, m in sends(effects) if p == Y]
    answers = [e for m in to_y for e in y.handle_message(X, m, WINDOW + 0.02)]
    # Y makes the link eager and sends no payload back: no duplicate anywhere.
    assert answers == []
    assert X in y.eager and Y in x.eager and P in x.lazy
    assert x.stats.duplicates == 0 and y.stats.gossip_sent == 0


def test_optimisation_waits_for_a_streak_of_wins_by_one_announcer() -> None:
    config = attrs.evolve(CONFIG, optimization_streak=3)
    tree = core(eager=[A], lazy=[C, D], config=config)

    def payload_after_ihave(n: int, announcer: Peer, round: int) -> list[Effect]:
        tree.handle_message(announcer, ihave(((mid(n), round),)), float(n))
        return tree.handle_message(A, Gossip(mid(n), 6, "t", b"x"), n + 0.1)

    # C beats the eager path by 4 hops twice, then announces a message late (after its
    # payload arrived): its streak ends.
    for n in (1, 2):
        payload_after_ihave(n, C, 2)
    tree.handle_message(A, Gossip(mid(3), 6, "t", b"x"), 3.0)
    tree.handle_message(C, ihave(((mid(3), 2),)), 3.1)
    # D wins once (its streak is 1), C wins three times in a row: C is grafted.
    payload_after_ihave(4, D, 2)
    for n in (5, 6):
        assert tree.stats.optimisations == 0
        payload_after_ihave(n, C, 2)
    effects = payload_after_ihave(7, C, 2)
    assert (C, Graft(mid(7), 2, link_only=True)) in sends(effects)
    assert (A, Prune("")) in sends(effects)
    assert tree.stats.optimisations == 1 and tree.eager == {C}


def test_no_optimisation_for_own_broadcasts() -> None:
    tree = core(eager=[A], lazy=[C])
    tree.broadcast(mid(1), "t", b"x", 0.0)
    assert tree.handle_message(C, ihave(((mid(1), 1),)), 0.1) == []


# --- property: invariants under random inputs ----------------------------------------------

POOL = [A, B, C, D]
KINDS = [
    "up",
    "down",
    "gossip",
    "ihave",
    "graft",
    "prune",
    "broadcast",
    "deferred",
    "timer",
    "wait",
]
# (kind, peer, small number: message or timer index, delay or round seed)
op = st.tuples(
    st.sampled_from(KINDS), st.sampled_from(POOL), st.integers(0, 30), st.floats(0.0, 1.0)
)


@settings(max_examples=150, deadline=None)
@given(st.lists(op, max_size=60))
def test_invariants_hold_under_random_inputs(ops: list[tuple[str, Peer, int, float]]) -> None:
    """Any input sequence keeps the bookkeeping consistent, sends only to neighbours (the
    driver dials whatever it is asked to), and delivers each id at most once."""
    tree = Plumtree("me", PlumtreeConfig(max_ihave_entries=3), random.Random(0))
    now = 0.0
    armed: list[Hashable] = []
    delivered_ids: Counter[MessageId] = Counter()
    for kind, who, n, x in ops:
        id, rnd = mid(n % 6), 1 + int(x * 8)
        if kind == "up":
            effects = tree.neighbor_up(who, now)
        elif kind == "down":
            effects = tree.neighbor_down(who, now)
        elif kind == "gossip":
            # Half the origins' messages follow a tree of their own (own_tree).
            own = n % 2 == 0
            effects = tree.handle_message(who, Gossip(id, rnd, "t", b"p", own), now)
        elif kind == "ihave":
            effects = tree.handle_message(who, ihave(((id, rnd),)), now)
        elif kind == "graft":
            effects = tree.handle_message(who, Graft(id, rnd), now)
        elif kind == "prune":
            effects = tree.handle_message(who, Prune(id.origin if x < 0.5 else ""), now)
        elif kind == "broadcast":
            if tree.has_seen(mid(n, "me")):
                continue
            effects = tree.broadcast(mid(n, "me"), "t", b"b", now)
        elif kind == "deferred":
            # The runtime could not queue a push: only for payloads the core just sent.
            if not tree.has_seen(id):
                continue
            effects = tree.push_deferred(who, Gossip(id, rnd, "t", b"p"), now)
        elif kind == "timer" and armed:
            effects = tree.handle_timer(armed.pop(n % len(armed)), now)
        else:
            now += x
            continue
        tree.check_invariants()
        neighbors = tree.eager | tree.lazy
        for e in effects:
            if isinstance(e, Send):
                assert e.peer in neighbors, f"sent to non-neighbour {e.peer}: {e}"
            elif isinstance(e, SetTimer):
                assert e.delay >= 0
                armed.append(e.timer)
            elif isinstance(e, Emit) and isinstance(e.event, Abandoned):
                assert not tree.has_seen(e.event.id)
            else:
                assert isinstance(e, Emit) and isinstance(e.event, Delivered)
                delivered_ids[e.event.id] += 1
    assert all(count == 1 for count in delivered_ids.values())


# --- a simulated network ------------------------------------------------------------------


def random_regular_graph(n: int, degree: int, rng: random.Random) -> dict[int, set[int]]:
    """A connected simple random `degree`-regular graph (configuration model, retried)."""
    while True:
        stubs = [node for node in range(n) for _ in range(degree)]
        rng.shuffle(stubs)
        pairs = list(zip(stubs[::2], stubs[1::2], strict=True))
        if any(a == b for a, b in pairs) or len({frozenset(p) for p in pairs}) < len(pairs):
            continue
        graph: dict[int, set[int]] = {node: set() for node in range(n)}
        for a, b in pairs:
            graph[a].add(b)
            graph[b].add(a)
        if is_connected(graph):
            return graph


def is_connected(graph: dict[int, set[int]]) -> bool:
    seen = {0}
    todo = [0]
    while todo:
        for other in graph[todo.pop()]:
            if other not in seen:
                seen.add(other)
                todo.append(other)
    return len(seen) == len(graph)


def flooding_rmr(graph: dict[int, set[int]], origin: int) -> float:
    """RMR of plain flooding: every node forwards its first copy to all neighbours but one."""
    messages = len(graph[origin]) + sum(len(graph[v]) - 1 for v in graph if v != origin)
    return messages / (len(graph) - 1) - 1


@attrs.define
class Network:
    """Plumtree cores linked along `graph`, driven through one time-ordered event queue.

    Each link has a fixed latency (so links stay FIFO, like a websocket); timers fire at
    their simulated time. Every Send is checked to target a current neighbour.
    """

    graph: dict[int, set[int]]
    config: PlumtreeConfig = DEFAULTS
    seed: int = 0
    now: float = 0.0
    peers: list[Peer] = attrs.Factory(list)
    cores: list[Plumtree] = attrs.Factory(list)
    latency: dict[frozenset[int], float] = attrs.Factory(dict)
    cut: set[frozenset[int]] = attrs.Factory(set)
    queue: list[tuple[float, int, int, object]] = attrs.Factory(list)
    seq: int = 0
    deliveries: dict[MessageId, Counter[int]] = attrs.Factory(dict)
    hops: dict[MessageId, list[int]] = attrs.Factory(dict)

    def __attrs_post_init__(self) -> None:
        rng = random.Random(self.seed)
        self.peers = [Peer(f"n{i}", f"mem://n{i}") for i in self.graph]
        self.cores = [Plumtree(p.id, self.config, random.Random(rng.random())) for p in self.peers]
        for a in self.graph:
            for b in self.graph[a]:
                self.latency.setdefault(frozenset((a, b)), rng.uniform(0.005, 0.02))
                self.cores[a].neighbor_up(self.peers[b], self.now)

    def index(self, p: Peer) -> int:
        return int(p.id[1:])

    def apply(self, node: int, effects: list[Effect]) -> None:
        for e in effects:
            if isinstance(e, Send):
                target = self.index(e.peer)
                assert e.peer in self.cores[node].eager | self.cores[node].lazy
                link = frozenset((node, target))
                self.push(self.now + self.latency[link], target, (node, e.message))
            elif isinstance(e, SetTimer):
                self.push(self.now + e.delay, node, e.timer)
            else:
                assert isinstance(e, Emit) and isinstance(e.event, Delivered)
                self.deliveries.setdefault(e.event.id, Counter())[node] += 1
                self.hops.setdefault(e.event.id, []).append(e.event.hops)

    def push(self, at: float, node: int, item: object) -> None:
        self.seq += 1
        heapq.heappush(self.queue, (at, self.seq, node, item))

    def run(self) -> None:
        while self.queue:
            at, _, node, item = heapq.heappop(self.queue)
            self.now = at
            if isinstance(item, tuple) and item[0] == "broadcast":
                effects = self.cores[node].broadcast(item[1], "t", b"payload", at)
            elif isinstance(item, tuple):
                source, message = item
                if frozenset((source, node)) in self.cut:
                    continue  # in flight on a link that broke: lost
                effects = self.cores[node].handle_message(self.peers[source], message, at)
            else:
                assert isinstance(item, Hashable)
                effects = self.cores[node].handle_timer(item, at)
            self.cores[node].check_invariants()
            self.apply(node, effects)

    def broadcast(self, origin: int, n: int) -> tuple[MessageId, float]:
        """Broadcast and run to quiescence; return the id and the RMR of this broadcast."""
        before = sum(c.stats.gossip_received for c in self.cores)
        id = MessageId(f"n{origin}", n, 0)
        self.now += 10.0
        self.apply(origin, self.cores[origin].broadcast(id, "t", b"payload", self.now))
        self.run()
        payloads = sum(c.stats.gossip_received for c in self.cores) - before
        return id, payloads / (len(self.cores) - 1) - 1

    def cut_link(self, a: int, b: int) -> None:
        self.cut.add(frozenset((a, b)))
        self.cores[a].neighbor_down(self.peers[b], self.now)
        self.cores[b].neighbor_down(self.peers[a], self.now)

    def eager_edges(self) -> set[frozenset[int]]:
        edges = set()
        for a, tree in enumerate(self.cores):
            for p in tree.eager:
                b = self.index(p)
                # The tree is symmetric: both ends agree on every eager link.
                assert self.peers[a] in self.cores[b].eager
                edges.add(frozenset((a, b)))
        return edges

    def delivered_once_everywhere(self, id: MessageId) -> bool:
        counts = self.deliveries.get(id, Counter())
        return set(counts) == set(self.graph) and set(counts.values()) == {1}


def spanning_tree(edges: set[frozenset[int]], n: int) -> bool:
    graph: dict[int, set[int]] = {v: set() for v in range(n)}
    for edge in edges:
        a, b = tuple(edge)
        graph[a].add(b)
        graph[b].add(a)
    return len(edges) == n - 1 and is_connected(graph)


def repair_grafts(net: Network) -> int:
    """GRAFTs sent because a payload was missing (not by the tree optimisation)."""
    return sum(c.stats.grafts_sent - c.stats.optimisations for c in net.cores)


N, DEGREE = 40, 5


def test_eager_links_settle_into_a_spanning_tree_with_rmr_zero() -> None:
    rng = random.Random(42)
    graph = random_regular_graph(N, DEGREE, rng)
    net = Network(graph, seed=1)
    flood = flooding_rmr(graph, 0)

    # The first broadcast floods (every link starts eager) and prunes every cycle.
    first, first_rmr = net.broadcast(0, 1)
    assert net.delivered_once_everywhere(first)
    assert first_rmr > 2.0

    # A few broadcasts from assorted origins settle the tree...
    for n in range(2, 8):
        net.broadcast(rng.randrange(N), n)
    assert spanning_tree(net.eager_edges(), N)

    # ...and from then on every broadcast, from any origin, costs one payload per node.
    rmrs = []
    for n in range(8, 20):
        id, rmr = net.broadcast(rng.randrange(N), n)
        assert net.delivered_once_everywhere(id)
        rmrs.append(rmr)
    assert rmrs == [0.0] * len(rmrs)
    assert flood == pytest.approx((DEGREE + (N - 1) * (DEGREE - 1)) / (N - 1) - 1)
    assert flood > 3.0
    # No repair was ever needed: every graft was an optimisation's.
    assert repair_grafts(net) == 0


def test_a_cut_tree_link_is_repaired_through_the_lazy_links() -> None:
    rng = random.Random(7)
    graph = random_regular_graph(N, DEGREE, rng)
    net = Network(graph, seed=2)
    for n in range(1, 6):
        net.broadcast(rng.randrange(N), n)
    tree = net.eager_edges()
    assert spanning_tree(tree, N)

    # Cut a tree link (both ends see neighbor_down), then broadcast from one side.
    a, b = sorted(sorted(tree, key=sorted)[len(tree) // 2])
    net.cut_link(a, b)
    remaining = {v: graph[v] - ({b} if v == a else {a} if v == b else set()) for v in graph}
    assert is_connected(remaining)
    grafts_before = repair_grafts(net)
    id, _ = net.broadcast(a, 100)

    # Everyone still gets it exactly once: the far side of the cut via IHAVE then GRAFT.
    assert net.delivered_once_everywhere(id)
    assert repair_grafts(net) > grafts_before
    assert frozenset((a, b)) not in net.eager_edges()

    # The repaired tree serves later broadcasts with RMR 0 again, without grafting.
    for n in range(101, 104):
        net.broadcast(rng.randrange(N), n)
    rmrs = []
    grafts_before = repair_grafts(net)
    for n in range(104, 110):
        id, rmr = net.broadcast(rng.randrange(N), n)
        assert net.delivered_once_everywhere(id)
        rmrs.append(rmr)
    assert rmrs == [0.0] * len(rmrs)
    assert repair_grafts(net) == grafts_before
    assert spanning_tree(net.eager_edges(), N)


def stream(net: Network, origins: list[int], first: int, every: float) -> list[MessageId]:
    """Broadcast from `origins`, one every `every` seconds (overlapping in flight), then run
    to quiescence; return the ids."""
    ids = []
    start = net.now + 10.0
    for k, origin in enumerate(origins):
        id = MessageId(f"n{origin}", first + k, 0)
        ids.append(id)
        net.push(start + k * every, origin, ("broadcast", id))
    net.run()
    return ids


def overlapping_network(n: int, low: float, high: float, config: PlumtreeConfig) -> Network:
    graph = random_regular_graph(n, DEGREE, random.Random(5))
    net = Network(graph, config=config, seed=6)
    rng = random.Random(7)
    for link in sorted(net.latency, key=sorted):
        net.latency[link] = rng.uniform(low, high)
    return net


def test_overlapping_broadcasts_from_random_origins_settle_into_a_tree() -> None:
    """100 nodes, 1-3 ms links, a broadcast every 10 ms from a random origin: each takes
    longer than that to cross, so prunes and grafts for different messages race. After
    a warm-up the eager links form a spanning tree and a whole stream costs one payload
    per node and message, with no repair GRAFT."""
    n = 100
    net = overlapping_network(n, 0.001, 0.003, DEFAULTS)
    rng = random.Random(8)
    for k in range(3):
        stream(net, [rng.randrange(n) for _ in range(20)], 100 * k, every=0.01)
    before = sum(c.stats.gossip_received for c in net.cores)
    repairs = repair_grafts(net)
    ids = stream(net, [rng.randrange(n) for _ in range(40)], 1000, every=0.01)
    assert all(net.delivered_once_everywhere(id) for id in ids)
    assert sum(c.stats.gossip_received for c in net.cores) - before == len(ids) * (n - 1)
    assert repair_grafts(net) == repairs
    assert spanning_tree(net.eager_edges(), n)


def farthest_from(graph: dict[int, set[int]], source: int) -> int:
    distance = {source: 0}
    order = [source]
    for v in order:
        for w in sorted(graph[v]):
            if w not in distance:
                distance[w] = distance[v] + 1
                order.append(w)
    return order[-1]


def test_optimisation_shortens_the_tree_for_a_dominant_origin() -> None:
    """Section 3.8: the first flood, from node 0, leaves the tree of first arrivals from
    node 0; a steady stream from the node farthest from it then pulls the tree towards
    that origin's shortest paths (5-20 ms links, a broadcast every 50 ms: tree paths are
    slow enough for announcements on short lazy paths to beat them). RMR stays 0.

    On the shared tree, that is; a stream this steady makes the origin busy, and its own
    tree is made of its own first arrivals from the start: at least as short.

    Only IHAVEs that arrive before the payload count, so the batch window must be shorter
    than the tree paths: 50 ms here, the setting for such slow links (the default, 250 ms,
    suits fast ones, whose tree paths no announcement can beat anyway)."""
    n = 100
    mean_hops = {}
    wan = attrs.evolve(DEFAULTS, ihave_batch_window=0.05)
    shared = attrs.evolve(wan, origin_tree_messages=10**6)
    for name, config in (
        ("off", attrs.evolve(shared, optimization_threshold=MAX_ROUND + 1)),
        ("on", shared),
        ("own tree", wan),
    ):
        net = overlapping_network(n, 0.005, 0.02, config)
        origin = farthest_from(net.graph, 0)
        net.broadcast(0, 0)
        for k in range(1, 4):
            stream(net, [origin] * 30, 100 * k, every=0.05)
        before = sum(c.stats.gossip_received for c in net.cores)
        ids = stream(net, [origin] * 30, 1000, every=0.05)
        assert all(net.delivered_once_everywhere(id) for id in ids)
        assert sum(c.stats.gossip_received for c in net.cores) - before == len(ids) * (n - 1)
        hops = [h for id in ids for h in net.hops[id]]
        mean_hops[name] = sum(hops) / len(hops)
    assert mean_hops["on"] < mean_hops["off"] - 0.5
    assert mean_hops["own tree"] <= mean_hops["on"] + 0.1


def test_a_busy_origin_gets_a_tree_of_its_own_and_its_prunes_stay_there() -> None:
    """Overlapping broadcasts from different origins must not cut each other's trees."""
    config = attrs.evolve(CONFIG, origin_tree_messages=3, origin_tree_window=2.0)
    tree = core(eager=[A, B], config=config)
    # This node's own broadcasts: the third within 2 s says it follows its own tree.
    flags = [
        next(m.own_tree for _, m in sends(tree.broadcast(mid(n, "me"), "t", b"x", 0.1 * n)))
        for n in range(4)
    ]
    assert flags == [False, False, True, True]
    # A busy origin's message prunes its own tree only; the shared tree keeps the link.
    tree.handle_message(A, Gossip(mid(1, "X"), 1, "t", b"x", own_tree=True), 1.0)
    effects = tree.handle_message(B, Gossip(mid(1, "X"), 2, "t", b"x", own_tree=True), 1.0)
    assert sends(effects) == [(B, Prune("X"))]
    assert tree.eager_for("X") == {A} and tree.eager == {A, B}
    # The shared tree's message from another origin still goes to both.
    out = sends(tree.handle_message(A, Gossip(mid(2, "Y"), 1, "t", b"x"), 1.1))
    assert [p for p, m in out if isinstance(m, Gossip)] == [B]
    # A PRUNE names its tree: "" prunes the shared one.
    tree.handle_message(B, Prune(""), 1.2)
    assert tree.eager == {A} and tree.eager_for("X") == {A}
    tree.check_invariants()
    # A neighbour that comes up joins every tree, eager.
    tree.neighbor_up(C, 1.3)
    assert C in tree.eager and C in tree.eager_for("X")
    # Idle trees are dropped.
    tree.handle_timer(FlushTimer(999), 1.0 + config.origin_tree_idle + 1)
    assert tree.stats.origin_trees == 0
