"""The HyParView core driven with literal messages: one test per protocol rule, exact effects.

Then a hypothesis state machine feeds random inputs from a pool of peers and checks the view
invariants after every step.
"""

from __future__ import annotations

import random

import attrs
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from trio_replica.core.effects import CloseLink, Effect, Emit, Send, SetTimer
from trio_replica.core.events import DownReason, Left, PeerDown, PeerUp
from trio_replica.core.hyparview import (
    HyParView,
    HyParViewConfig,
    JoinTimeout,
    NeighborTimeout,
    ReconnectTimer,
    RefillTimer,
    ShuffleTimeout,
    ShuffleTimer,
)
from trio_replica.core.messages import (
    Disconnect,
    ForwardJoin,
    Join,
    Message,
    Neighbor,
    NeighborReply,
    Peer,
    Shuffle,
    ShuffleReply,
)
from trio_replica.errors import ConfigError


def peer(name: str) -> Peer:
    return Peer(name, f"ws://{name}:9000")


ME = peer("me")
A, B, C, D, E, N, ORIGIN = (peer(x) for x in ("a", "b", "c", "d", "e", "n", "o"))


def make(**config: object) -> HyParView:
    return HyParView(ME, HyParViewConfig(**config), random.Random(7))  # type: ignore[arg-type]


def link_up(core: HyParView, *peers: Peer, now: float = 0.0) -> None:
    """Make `peers` active neighbors the way the protocol does: a high NEIGHBOR from each."""
    for p in peers:
        out = core.handle_message(p, Neighbor(high=True), now)
        assert out == [Emit(PeerUp(p)), Send(p, NeighborReply(accepted=True))]


def learn(core: HyParView, *peers: Peer, now: float = 0.0) -> None:
    """Put `peers` in the passive view through FORWARD_JOINs at TTL == PRWL from A.

    Needs exactly A and B active, so that the walk is forwarded to B.
    """
    assert {p.id for p in core.active} == {"a", "b"}
    prwl = core.config.prwl
    for p in peers:
        out = core.handle_message(A, ForwardJoin(p, prwl), now)
        assert out == [Send(B, ForwardJoin(p, prwl - 1))]
    assert all(core.is_passive(p.id) for p in peers)


def ids(peers: tuple[Peer, ...]) -> set[str]:
    return {p.id for p in peers}


def timer_of(effect: Effect) -> object:
    assert isinstance(effect, SetTimer)
    return effect.timer


# --- configuration --------------------------------------------------------------------------------


def test_config_defaults_are_the_papers() -> None:
    config = HyParViewConfig()
    assert (config.active_size, config.passive_size, config.arwl, config.prwl) == (5, 30, 6, 3)
    assert (config.shuffle_active, config.shuffle_passive, config.shuffle_ttl) == (3, 4, 6)
    assert config.shuffle_interval == 10.0


@pytest.mark.parametrize(
    "bad",
    [
        {"active_size": 0},
        {"passive_size": 0},
        {"prwl": 7},
        {"arwl": -1},
        {"shuffle_ttl": 256},
        {"shuffle_active": 40, "shuffle_passive": 40},
        {"shuffle_interval": 0},
        {"join_timeout": -1.0},
        {"shuffle_jitter": 1.0},
        {"backoff_base": 10.0, "backoff_max": 5.0},
        {"max_failures": 0},
        {"rejoin_interval": -1.0},
        {"rejoin_chance": 1.5},
        {"min_active": 0},
        {"low_view_grace": 0},
        {"refill_backoff_max": 0},
        {"refusals_before_backoff": -1},
        {"shuffle_routes": -1},
        {"join_eviction_interval": -1.0},
        {"join_eviction_interval": float("inf")},
    ],
)
def test_config_rejects_invalid_values(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        HyParViewConfig(**bad)  # type: ignore[arg-type]


# --- JOIN (section 4.2) ---------------------------------------------------------------------------


def test_join_sends_join_and_arms_its_timeout() -> None:
    core = make()
    assert core.needs_join()
    out = core.join(C, 0.0)
    assert out[0] == Send(C, Join())
    assert out[1] == SetTimer(5.0, JoinTimeout(out[1].timer.token))  # type: ignore[union-attr]
    assert not core.needs_join()
    assert core.wants_link("c")
    assert core.stats.joins == 1


def test_contact_answer_adds_the_contact() -> None:
    core = make()
    core.join(C, 0.0)
    assert core.handle_message(C, NeighborReply(accepted=True), 0.1) == [Emit(PeerUp(C))]
    assert core.active == (C,)
    assert not core.needs_join()


def test_join_timeout_abandons_the_contact_and_allows_a_retry() -> None:
    core = make()
    timer = timer_of(core.join(C, 0.0)[1])
    assert core.handle_timer(timer, 5.0) == [CloseLink(C)]
    assert core.needs_join()
    assert core.stats.join_timeouts == 1
    assert core.handle_timer(timer, 5.0) == []  # stale now


def test_join_fails_when_the_contact_cannot_be_reached() -> None:
    core = make()
    core.join(C, 0.0)
    assert core.handle_link_down(C, 1.0) == []
    assert core.needs_join()


def test_contact_adds_newcomer_answers_and_forwards_join_to_every_other_neighbor() -> None:
    core = make()
    link_up(core, A, B)
    out = core.handle_message(N, Join(), 1.0)
    assert out == [
        Emit(PeerUp(N)),
        Send(N, NeighborReply(accepted=True)),
        Send(A, ForwardJoin(N, 6)),
        Send(B, ForwardJoin(N, 6)),
    ]
    assert ids(core.active) == {"a", "b", "n"}


def test_full_contact_evicts_a_random_member_with_disconnect() -> None:
    core = make(active_size=2)
    link_up(core, A, B)
    out = core.handle_message(N, Join(), 1.0)
    victim = A if out[1] == Send(A, Disconnect(alive=True)) else B
    kept = B if victim is A else A
    assert out == [
        Emit(PeerDown(victim, DownReason.EVICTED)),
        Send(victim, Disconnect(alive=True)),
        CloseLink(victim),
        Emit(PeerUp(N)),
        Send(N, NeighborReply(accepted=True)),
        Send(kept, ForwardJoin(N, 6)),
    ]
    assert ids(core.active) == {kept.id, "n"}
    assert core.passive == (victim,)
    assert core.stats.evictions == 1


# --- FORWARD_JOIN (section 4.2) -------------------------------------------------------------------


def test_a_contact_busy_with_joins_leaves_the_newcomer_to_the_walks() -> None:
    # Deviation 13: one JOIN per interval may evict a member of a full view; the newcomers
    # in between are placed by the walks only, so that concurrent joins through one
    # contact do not link the newest newcomers among themselves.
    core = make(active_size=2, join_eviction_interval=1.0)
    link_up(core, A, B)
    core.handle_message(N, Join(), 1.0)  # taken in, evicting A or B
    assert core.is_active("n") and core.stats.joins_accepted == 1
    (other,) = [p for p in core.active if p.id != "n"]
    out = core.handle_message(C, Join(), 1.5)
    assert out == [
        Send(C, NeighborReply(accepted=False)),
        CloseLink(C),
        *(Send(p, ForwardJoin(C, 6)) for p in core.active),
    ]
    assert {p.id for p in core.active} == {"n", other.id}
    assert core.stats.joins_walked == 1
    core.handle_message(D, Join(), 2.0)  # the interval counts from the last eviction
    assert core.is_active("d") and core.stats.joins_accepted == 2


def test_a_contact_with_room_or_the_rule_off_takes_every_newcomer() -> None:
    core = make(active_size=3)
    link_up(core, A)
    for now, newcomer in ((1.0, N), (1.1, C)):  # free slots: nobody is evicted
        core.handle_message(newcomer, Join(), now)
    assert ids(core.active) == {"a", "n", "c"}
    off = make(active_size=1, join_eviction_interval=0.0)
    for now, newcomer in ((1.0, N), (1.1, C), (1.2, D)):
        off.handle_message(newcomer, Join(), now)
        assert ids(off.active) == {newcomer.id}
    assert off.stats.joins_walked == 0


def test_forward_join_at_ttl_zero_adds_newcomer_and_sends_high_neighbor() -> None:
    core = make()
    link_up(core, A, B)
    out = core.handle_message(A, ForwardJoin(N, 0), 1.0)
    token = timer_of(out[2]).token  # type: ignore[attr-defined]
    assert out == [
        Emit(PeerUp(N)),
        Send(N, Neighbor(high=True)),
        SetTimer(5.0, NeighborTimeout("n", token)),
    ]
    assert core.is_active("n")
    assert core.wants_link("n")


def test_forward_join_with_a_single_neighbor_adds_newcomer() -> None:
    core = make()
    link_up(core, A)
    out = core.handle_message(A, ForwardJoin(N, 5), 1.0)
    assert out[:2] == [Emit(PeerUp(N)), Send(N, Neighbor(high=True))]


def test_forward_join_is_forwarded_to_a_neighbor_other_than_the_sender() -> None:
    core = make()
    link_up(core, A, B)
    assert core.handle_message(A, ForwardJoin(N, 5), 1.0) == [Send(B, ForwardJoin(N, 4))]
    assert not core.is_active("n") and not core.is_passive("n")


def test_forward_join_at_prwl_adds_newcomer_to_passive_and_forwards() -> None:
    core = make()
    link_up(core, A, B)
    assert core.handle_message(A, ForwardJoin(N, 3), 1.0) == [Send(B, ForwardJoin(N, 2))]
    assert core.passive == (N,)


def test_high_neighbor_confirmation_settles_the_forward_join() -> None:
    core = make()
    link_up(core, A, B)
    timer = timer_of(core.handle_message(A, ForwardJoin(N, 0), 1.0)[2])
    assert core.handle_message(N, NeighborReply(accepted=True), 1.1) == []
    assert core.handle_timer(timer, 6.0) == []  # confirmed: the timeout is stale
    assert core.is_active("n")


def test_unconfirmed_neighbor_is_dropped_as_failed_and_its_link_closed() -> None:
    core = make()
    link_up(core, A, B)
    timer = timer_of(core.handle_message(A, ForwardJoin(N, 0), 1.0)[2])
    out = core.handle_timer(timer, 6.0)
    assert out[:2] == [Emit(PeerDown(N, DownReason.FAILED)), CloseLink(N)]
    # N is backed off in the passive view, so the refill waits for it (nothing else known).
    assert out[2:] == [SetTimer(2.0, RefillTimer(timer_of(out[2]).token))]  # type: ignore[attr-defined]
    assert not core.is_active("n") and core.is_passive("n")


def test_forward_join_about_ourselves_is_ignored() -> None:
    core = make()
    link_up(core, A, B)
    assert core.handle_message(A, ForwardJoin(ME, 0), 1.0) == []
    assert ids(core.active) == {"a", "b"}


# --- NEIGHBOR (section 4.3) -----------------------------------------------------------------------


def test_high_neighbor_is_always_accepted_even_when_full() -> None:
    core = make(active_size=1)
    link_up(core, A)
    out = core.handle_message(N, Neighbor(high=True), 1.0)
    assert out == [
        Emit(PeerDown(A, DownReason.EVICTED)),
        Send(A, Disconnect(alive=True)),
        CloseLink(A),
        Emit(PeerUp(N)),
        Send(N, NeighborReply(accepted=True)),
    ]
    assert core.active == (N,) and core.passive == (A,)


def test_low_neighbor_is_accepted_with_a_free_slot() -> None:
    core = make(active_size=2)
    link_up(core, A)
    out = core.handle_message(N, Neighbor(high=False), 1.0)
    assert out == [Emit(PeerUp(N)), Send(N, NeighborReply(accepted=True))]
    assert core.stats.neighbor_accepted == 2


def test_low_neighbor_is_refused_when_full_and_the_sender_kept_passive() -> None:
    core = make(active_size=2)
    link_up(core, A, B)
    out = core.handle_message(N, Neighbor(high=False), 1.0)
    assert out == [Send(N, NeighborReply(accepted=False))]
    assert core.is_passive("n")
    assert core.stats.neighbor_rejected == 1


def test_a_freed_slot_is_refilled_with_a_low_neighbor_to_a_passive_peer() -> None:
    core = make()
    link_up(core, A, B)
    learn(core, C)
    out = core.handle_message(B, Disconnect(alive=True), 2.0)
    token = timer_of(out[2]).token  # type: ignore[attr-defined]
    # B just evicted us: it is backed off, so C is the only candidate; A keeps us non-empty.
    assert out[:3] == [
        Emit(PeerDown(B, DownReason.EVICTED)),
        Send(C, Neighbor(high=False)),
        SetTimer(5.0, NeighborTimeout("c", token)),
    ]
    assert core.is_passive("b") and core.wants_link("c")


def test_an_empty_active_view_sends_a_high_neighbor() -> None:
    core = make(active_size=1)
    link_up(core, A)
    core.handle_message(C, Neighbor(high=False), 1.0)  # refused (full): C is now passive
    out = core.handle_link_down(A, 3.0)
    token = timer_of(out[2]).token  # type: ignore[attr-defined]
    assert out == [
        Emit(PeerDown(A, DownReason.FAILED)),
        Send(C, Neighbor(high=True)),
        SetTimer(5.0, NeighborTimeout("c", token)),
    ]


def test_accepted_neighbor_request_adds_the_peer() -> None:
    core = make()
    link_up(core, A, B)
    learn(core, C)
    core.handle_message(B, Disconnect(alive=True), 2.0)
    assert core.handle_message(C, NeighborReply(accepted=True), 2.1) == [Emit(PeerUp(C))]
    assert ids(core.active) == {"a", "c"}
    assert not core.wants_link("b")


def test_refusal_keeps_the_rejecter_passive_and_tries_another_passive_peer() -> None:
    core = make(active_size=2, refusals_before_backoff=0)
    link_up(core, A, B)
    learn(core, C, D)
    out = core.handle_message(B, Disconnect(alive=True), 2.0)
    asked = out[1]
    assert isinstance(asked, Send) and asked.message == Neighbor(high=False)
    other = D if asked.peer == C else C
    out = core.handle_message(asked.peer, NeighborReply(accepted=False), 2.1)
    # The refill backs off first (deviation 8): backoff_base after one refusal.
    assert len(out) == 1 and isinstance(out[0], SetTimer)
    assert isinstance(out[0].timer, RefillTimer) and out[0].delay == pytest.approx(2.0)
    assert core.is_passive(asked.peer.id)
    assert core.stats.neighbor_refused == 1
    out = core.handle_timer(timer_of(out[0]), 4.1)
    token = timer_of(out[1]).token  # type: ignore[attr-defined]
    assert out[:2] == [
        Send(other, Neighbor(high=False)),
        SetTimer(5.0, NeighborTimeout(other.id, token)),
    ]


def test_several_free_slots_are_refilled_at_once() -> None:
    core = make()
    link_up(core, A, B)
    learn(core, C, D)
    out = core.handle_message(B, Disconnect(alive=True), 2.0)
    # Four free slots, two ready candidates: both asked at once (deviation 4); B evicted
    # us and is left alone for a while, so the refill arms a timer for it.
    assert {e.peer.id for e in out if isinstance(e, Send)} == {"c", "d"}
    assert isinstance(timer_of(out[-1]), RefillTimer)


def test_neighbor_timeout_is_a_failure_of_the_candidate() -> None:
    core = make()
    link_up(core, A, B)
    learn(core, C)
    out = core.handle_message(B, Disconnect(alive=True), 2.0)
    timer = timer_of(out[2])
    out = core.handle_timer(timer, 7.0)
    assert out[0] == CloseLink(C)
    assert core.is_passive("c")  # one failure of three: backed off, not forgotten
    assert core.stats.neighbor_timeouts == 1


def test_link_down_during_a_neighbor_request_is_a_failure_of_the_candidate() -> None:
    core = make(max_failures=1)
    link_up(core, A, B)
    learn(core, C)
    core.handle_message(B, Disconnect(alive=True), 2.0)
    core.handle_link_down(C, 2.5)
    assert not core.is_passive("c")  # max_failures=1: forgotten at once (the paper's rule)
    assert not core.wants_link("c")
    assert core.stats.forgotten == 1


def test_crossed_neighbor_requests_end_linked_once() -> None:
    core = make(active_size=2)
    link_up(core, A, B)
    learn(core, C)
    core.handle_message(B, Disconnect(alive=True), 2.0)  # asks C (low), reserving the slot
    # C asked us at the same time: its request takes the slot our own request reserved.
    out = core.handle_message(C, Neighbor(high=False), 2.1)
    assert out == [Emit(PeerUp(C)), Send(C, NeighborReply(accepted=True))]
    assert core.handle_message(C, NeighborReply(accepted=True), 2.2) == []
    assert ids(core.active) == {"a", "c"}


# --- DISCONNECT and failures (section 4.3) --------------------------------------------------------


def test_disconnect_alive_moves_the_sender_to_passive() -> None:
    core = make()
    link_up(core, A)
    out = core.handle_message(A, Disconnect(alive=True), 1.0)
    assert out[0] == Emit(PeerDown(A, DownReason.EVICTED))
    assert core.passive == (A,) and core.active == ()
    assert core.stats.evicted == 1


def test_disconnect_of_a_leaving_peer_forgets_it() -> None:
    core = make()
    link_up(core, A)
    assert core.handle_message(A, Disconnect(alive=False), 1.0) == [
        Emit(PeerDown(A, DownReason.LEFT))
    ]
    assert core.passive == () and core.active == ()


def test_failed_neighbor_is_backed_off_then_forgotten_after_max_failures() -> None:
    core = make(max_failures=3, backoff_base=2.0)
    link_up(core, A)
    out = core.handle_link_down(A, 10.0)
    # Not tried again before its backoff ends: the refill arms a timer for then.
    refill = timer_of(out[1])
    assert out == [Emit(PeerDown(A, DownReason.FAILED)), SetTimer(2.0, refill)]
    assert core.passive == (A,)
    out = core.handle_timer(refill, 12.0)
    assert out == [
        Send(A, Neighbor(high=True)),
        SetTimer(5.0, NeighborTimeout("a", timer_of(out[1]).token)),  # type: ignore[attr-defined]
    ]
    out = core.handle_link_down(A, 12.5)  # second failure: the backoff doubles
    assert out == [SetTimer(4.0, timer_of(out[0]))]
    out = core.handle_timer(timer_of(out[0]), 16.5)
    assert out[0] == Send(A, Neighbor(high=True))
    assert core.handle_link_down(A, 17.0) == []  # third failure: forgotten
    assert not core.passive
    assert core.stats.forgotten == 1
    assert core.needs_join()


def test_a_failed_active_peer_never_takes_the_place_of_a_passive_entry_that_may_be_alive() -> None:
    # After a mass crash every detected failure used to evict a random passive entry, often
    # one of the few live ones: a survivor could lose its last way back (issue 20).
    core = make(passive_size=2)
    link_up(core, A, B)
    learn(core, C, D)
    core.handle_link_down(A, 1.0)
    assert ids(core.passive) == {"c", "d"}
    assert core.stats.failures == 1
    # It is still remembered as a lost contact, probed later (deviation 9).
    assert "a" in core._lost


def test_entries_that_failed_make_room_first() -> None:
    core = make(passive_size=3)
    link_up(core, A, B)
    learn(core, C, D)
    link_up(core, E)
    core.handle_link_down(E, 1.0)  # E goes passive with its failure: there is room
    assert ids(core.passive) == {"c", "d", "e"}
    learn(core, N, now=2.0)  # a full view: the failed entry makes room, never C or D
    assert ids(core.passive) == {"c", "d", "n"}


def test_link_down_of_a_temporary_link_changes_nothing() -> None:
    core = make()
    link_up(core, A, B)
    learn(core, C)
    assert core.handle_link_down(C, 1.0) == []
    assert core.is_passive("c")


# --- SHUFFLE (section 4.4) ------------------------------------------------------------------------


def test_start_arms_a_jittered_shuffle_timer() -> None:
    core = make()
    out = core.start(0.0)
    assert [type(e.timer) for e in out if isinstance(e, SetTimer)] == [
        ShuffleTimer,
        ReconnectTimer,
    ]
    assert isinstance(out[0], SetTimer) and 5.0 <= out[0].delay <= 12.5
    assert core.start(0.0) == []  # once


def test_shuffle_timer_sends_active_and_passive_samples_and_self() -> None:
    core = make()
    link_up(core, A)
    timer = timer_of(core.start(0.0)[0])
    out = core.handle_timer(timer, 10.0)
    assert isinstance(out[0], SetTimer) and out[0].timer == timer
    send = out[1]
    assert isinstance(send, Send) and send.peer == A
    shuffle = send.message
    assert isinstance(shuffle, Shuffle)
    assert shuffle.origin == ME and shuffle.ttl == 6 and shuffle.peers == (ME,)
    assert out[2] == SetTimer(10.0, ShuffleTimeout(shuffle.nonce))
    assert core.stats.shuffles_sent == 1


def test_shuffle_sample_sizes() -> None:
    core = make()
    link_up(core, A, B)
    learn(core, *(peer(f"p{i}") for i in range(10)))
    link_up(core, C, D, E)
    out = core.handle_timer(timer_of(core.start(0.0)[0]), 10.0)
    shuffle = next(e.message for e in out if isinstance(e, Send))
    assert isinstance(shuffle, Shuffle)
    assert len(shuffle.peers) == 3 + 4 + 1
    assert shuffle.peers[-1] == ME
    assert len(ids(shuffle.peers)) == 8


def test_shuffle_walk_is_forwarded_while_ttl_stays_positive() -> None:
    core = make()
    link_up(core, A, B)
    message = Shuffle(ORIGIN, 3, (ORIGIN, C), 42)
    assert core.handle_message(A, message, 1.0) == [Send(B, Shuffle(ORIGIN, 2, (ORIGIN, C), 42))]
    assert core.stats.shuffles_forwarded == 1


def test_shuffle_walk_ends_with_a_reply_to_the_origin_and_integration() -> None:
    core = make()
    link_up(core, A, B)
    learn(core, C, D)
    out = core.handle_message(A, Shuffle(ORIGIN, 1, (ORIGIN, E), 42), 1.0)
    assert len(out) == 1
    reply = out[0]
    # Back along the walk, to the hop it came from (deviation 7), naming the origin.
    assert isinstance(reply, Send) and reply.peer == A
    assert isinstance(reply.message, ShuffleReply) and reply.message.nonce == 42
    assert reply.message.origin == ORIGIN.id
    assert ids(reply.message.peers) == {"c", "d"}  # as many as received, from passive
    assert ids(core.passive) == {"c", "d", "o", "e"}
    assert core.stats.shuffles_received == 1


def test_shuffle_walk_ends_at_a_node_with_a_single_neighbor() -> None:
    core = make()
    link_up(core, A)
    out = core.handle_message(A, Shuffle(ORIGIN, 5, (ORIGIN,), 1), 1.0)
    assert out == [Send(A, ShuffleReply((), 1, ORIGIN.id))]


def test_a_forwarded_walk_routes_its_reply_back_to_the_hop_it_came_from() -> None:
    core = make()
    link_up(core, A, B)
    out = core.handle_message(A, Shuffle(ORIGIN, 3, (ORIGIN,), 9), 1.0)
    assert out == [Send(B, Shuffle(ORIGIN, 2, (ORIGIN,), 9))]
    reply = ShuffleReply((N,), 9, ORIGIN.id)
    assert core.handle_message(B, reply, 2.0) == [Send(A, reply)]
    assert core.stats.shuffle_replies_routed == 1
    # Each way back serves once, and a reply for a walk we never saw goes nowhere.
    assert core.handle_message(B, reply, 2.1) == []
    assert core.stats.shuffle_replies_unroutable == 1
    assert N.id not in {p.id for p in core.passive}


def test_a_way_back_expires_with_the_shuffle_timeout_and_needs_the_hop_active() -> None:
    core = make(shuffle_timeout=5.0)
    link_up(core, A, B, C)
    core.handle_message(A, Shuffle(ORIGIN, 3, (ORIGIN,), 1), 1.0)
    core.handle_message(A, Shuffle(ORIGIN, 3, (ORIGIN,), 2), 1.0)
    assert core.handle_message(B, ShuffleReply((), 1, ORIGIN.id), 6.5) == []
    core.handle_message(A, Disconnect(alive=True), 2.0)
    assert core.handle_message(B, ShuffleReply((), 2, ORIGIN.id), 2.5) == []
    assert core.stats.shuffle_replies_unroutable == 2


def test_remembered_ways_back_are_bounded() -> None:
    core = make(shuffle_routes=2)
    link_up(core, A, B)
    for nonce in range(3):
        core.handle_message(A, Shuffle(ORIGIN, 3, (ORIGIN,), nonce), 1.0)
    assert core.handle_message(B, ShuffleReply((), 0, ORIGIN.id), 1.5) == []  # oldest gone
    assert core.handle_message(B, ShuffleReply((), 2, ORIGIN.id), 1.5) != []


def test_refusals_in_a_row_back_the_whole_refill_off_exponentially() -> None:
    core = make(
        active_size=2,
        min_active=1,
        refusal_backoff=0.5,
        refill_backoff_max=5.0,
        refusals_before_backoff=0,
    )
    link_up(core, A, B)
    learn(core, C)
    out = core.handle_message(B, Disconnect(alive=True), 0.0)
    now, delays = 0.0, []
    for _ in range(4):
        asked = next(e for e in out if isinstance(e, Send) and isinstance(e.message, Neighbor))
        out = core.handle_message(asked.peer, NeighborReply(accepted=False), now)
        timer = next(e for e in out if isinstance(e, SetTimer))
        delays.append(timer.delay)
        now += timer.delay
        out = core.handle_timer(timer.timer, now)
    assert delays == [2.0, 4.0, 5.0, 5.0]
    assert core.stats.refills_backed_off >= 4
    # An acceptance resets it.
    asked = next(e for e in out if isinstance(e, Send) and isinstance(e.message, Neighbor))
    core.handle_message(asked.peer, NeighborReply(accepted=True), now)
    assert core._refusals == 0


def test_a_view_under_min_active_asks_with_high_priority_after_the_grace() -> None:
    core = make(min_active=2, low_view_grace=10.0, refusal_backoff=5.0)
    link_up(core, A, B)
    learn(core, C, D, E)
    # B goes: one neighbour left, under min_active; a low request first.
    out = core.handle_message(B, Disconnect(alive=False), 1.0)
    sends = [e for e in out if isinstance(e, Send)]
    assert sends and all(e.message == Neighbor(high=False) for e in sends)
    # A refill is armed for the end of the grace.
    timer = next(e for e in out if isinstance(e, SetTimer) and isinstance(e.timer, RefillTimer))
    assert timer.delay == pytest.approx(10.0)
    timers = [(1.0 + timer.delay, timer.timer)]
    for e in sends:
        out = core.handle_message(e.peer, NeighborReply(accepted=False), 1.1)
        timers += [(1.1 + t.delay, t.timer) for t in out if isinstance(t, SetTimer)]
    # Refill timers chain (each re-arms the next); by the end of the grace a request goes
    # with high priority, whatever the refill's backoff.
    highs: list[Effect] = []
    while timers and not highs:
        timers.sort(key=lambda t: t[0])
        at, fired = timers.pop(0)
        out = core.handle_timer(fired, at)
        timers += [(at + t.delay, t.timer) for t in out if isinstance(t, SetTimer)]
        highs = [e for e in out if isinstance(e, Send) and e.message == Neighbor(high=True)]
        if highs:
            assert at >= 11.0
    assert len(highs) == 1
    assert core.stats.low_view_escalations == 1


def test_shuffle_integration_evicts_the_ids_just_sent_first() -> None:
    core = make(passive_size=2)
    link_up(core, A, B)
    learn(core, C, D)
    out = core.handle_message(A, Shuffle(ORIGIN, 0, (ORIGIN,), 7), 1.0)
    reply = out[0]
    assert isinstance(reply, Send) and isinstance(reply.message, ShuffleReply)
    sent = reply.message.peers[0]
    assert ids(core.passive) == ({"c", "d"} - {sent.id}) | {"o"}


def test_shuffle_reply_is_integrated_by_the_origin_evicting_the_ids_it_sent() -> None:
    core = make(passive_size=3, shuffle_passive=1)
    link_up(core, A, B)
    learn(core, C, D, E)
    out = core.handle_timer(timer_of(core.start(0.0)[0]), 10.0)
    shuffle = next(e.message for e in out if isinstance(e, Send))
    assert isinstance(shuffle, Shuffle)
    sent = ids(shuffle.peers) & {"c", "d", "e"}
    assert len(sent) == 1
    assert core.handle_message(ORIGIN, ShuffleReply((N,), shuffle.nonce), 11.0) == []
    assert ids(core.passive) == ({"c", "d", "e"} - sent) | {"n"}
    assert core.stats.shuffle_replies == 1


def test_shuffle_reply_with_an_unknown_or_expired_nonce_is_ignored() -> None:
    core = make()
    link_up(core, A)
    out = core.handle_timer(timer_of(core.start(0.0)[0]), 10.0)
    timeout = out[2]
    assert isinstance(timeout, SetTimer) and isinstance(timeout.timer, ShuffleTimeout)
    assert core.handle_message(ORIGIN, ShuffleReply((N,), 12345), 11.0) == []
    assert core.handle_timer(timeout.timer, 20.0) == []
    assert core.handle_message(ORIGIN, ShuffleReply((N,), timeout.timer.nonce), 21.0) == []
    assert not core.is_passive("n")
    assert core.stats.shuffle_timeouts == 1


def test_shuffle_never_puts_self_or_neighbors_in_passive() -> None:
    core = make()
    link_up(core, A, B)
    core.handle_message(A, Shuffle(ORIGIN, 0, (ME, A, B, ORIGIN), 1), 1.0)
    assert ids(core.passive) == {"o"}


# --- symmetry repair, leave, bootstrap helpers ----------------------------------------------------


def test_neighbor_only_message_from_a_non_neighbor_is_answered_with_disconnect() -> None:
    core = make()
    link_up(core, A, B)
    out = core.handle_message(C, ForwardJoin(N, 5), 1.0)
    assert out[0] == Send(C, Disconnect(alive=True))
    assert core.stats.repairs == 1


def test_unexpected_acceptance_is_undone_with_disconnect() -> None:
    core = make()
    link_up(core, A)
    assert core.handle_message(C, NeighborReply(accepted=True), 1.0) == [
        Send(C, Disconnect(alive=True))
    ]
    assert core.handle_message(C, NeighborReply(accepted=False), 1.0) == []


def test_leave_disconnects_every_neighbor_and_then_ignores_input() -> None:
    core = make()
    link_up(core, A, B)
    out = core.leave(5.0)
    assert out == [
        Send(A, Disconnect(alive=False)),
        CloseLink(A),
        Send(B, Disconnect(alive=False)),
        CloseLink(B),
        Emit(Left()),
    ]
    assert core.active == () and core.has_left
    assert core.handle_message(N, Join(), 6.0) == []
    assert core.join(C, 6.0) == []
    assert core.leave(6.0) == []
    assert not core.needs_join()


def test_messages_from_ourselves_are_ignored() -> None:
    core = make()
    assert core.handle_message(ME, Join(), 0.0) == []
    assert core.join(ME, 0.0) == []


def test_should_rejoin_on_an_ordinary_node() -> None:
    core = make()
    seeds = {"a", "s"}
    assert core.should_rejoin(seeds)  # knows no seed
    link_up(core, A, B)
    assert not core.should_rejoin(seeds)  # a seed is a neighbor
    core.handle_link_down(A, 1.0)
    assert core.should_rejoin(seeds)  # the seed is only known with a failure on record
    assert not core.should_rejoin({"me"})  # no other seed named
    core.join(C, 2.0)
    assert not core.should_rejoin(seeds)  # a join is pending


def test_should_rejoin_on_a_seed_asks_for_a_seed_neighbor() -> None:
    core = make()
    link_up(core, A, B)
    learn(core, C)
    assert core.should_rejoin({"me", "c"})  # the other seed is only passive
    assert not core.should_rejoin({"me", "a"})


def test_wants_link_covers_neighbors_and_pending_exchanges_only() -> None:
    core = make()
    link_up(core, A, B)
    learn(core, C)
    assert core.wants_link("a") and not core.wants_link("c") and not core.wants_link("zz")
    core.join(D, 1.0)
    assert core.wants_link("d")


def test_foreign_and_stale_timers_are_ignored() -> None:
    core = make()
    assert core.handle_timer("not ours", 0.0) == []
    assert core.handle_timer(JoinTimeout(1), 0.0) == []
    assert core.handle_timer(NeighborTimeout("a", 1), 0.0) == []
    assert core.handle_timer(RefillTimer(1), 0.0) == []


def test_unknown_messages_are_ignored() -> None:
    @attrs.frozen
    class Other(Message):
        KIND = 99

    core = make()
    assert core.handle_message(A, Other(), 0.0) == []


# --- property: invariants under random input ------------------------------------------------------

POOL = tuple(peer(f"p{i}") for i in range(12))
peers_st = st.sampled_from(POOL)


class HyParViewMachine(RuleBasedStateMachine):
    """Random inputs from a pool of 12 peers into one core with small views."""

    def __init__(self) -> None:
        super().__init__()
        self.core = HyParView(
            ME,
            HyParViewConfig(active_size=3, passive_size=5, max_failures=2),
            random.Random(0),
        )
        self.now = 0.0
        self.timers: list[object] = []
        self.nonces: list[int] = []
        self.up: set[str] = set()
        self.feed(self.core.start(self.now))

    def feed(self, effects: list[Effect]) -> None:
        for effect in effects:
            match effect:
                case SetTimer(timer=timer):
                    self.timers.append(timer)
                case Emit(event=PeerUp(peer=p)):
                    assert p.id not in self.up, "PeerUp twice"
                    self.up.add(p.id)
                case Emit(event=PeerDown(peer=p)):
                    assert p.id in self.up, "PeerDown without PeerUp"
                    self.up.discard(p.id)
                case Emit(event=Left()):
                    self.up.clear()
                case Send(peer=p, message=Shuffle(nonce=nonce)) if p.id != ME.id:
                    self.nonces.append(nonce)
                case Send(peer=p):
                    assert p.id != ME.id, "sent to ourselves"
                case _:
                    pass

    @rule(dt=st.floats(0, 3))
    def tick(self, dt: float) -> None:
        self.now += dt

    @rule(sender=peers_st)
    def join_from(self, sender: Peer) -> None:
        self.feed(self.core.handle_message(sender, Join(), self.now))

    @rule(sender=peers_st, who=st.sampled_from((*POOL, ME)), ttl=st.integers(0, 7))
    def forward_join(self, sender: Peer, who: Peer, ttl: int) -> None:
        self.feed(self.core.handle_message(sender, ForwardJoin(who, ttl), self.now))

    @rule(sender=peers_st, high=st.booleans())
    def neighbor(self, sender: Peer, high: bool) -> None:
        self.feed(self.core.handle_message(sender, Neighbor(high), self.now))

    @rule(sender=peers_st, accepted=st.booleans())
    def neighbor_reply(self, sender: Peer, accepted: bool) -> None:
        self.feed(self.core.handle_message(sender, NeighborReply(accepted), self.now))

    @rule(sender=peers_st, alive=st.booleans())
    def disconnect(self, sender: Peer, alive: bool) -> None:
        self.feed(self.core.handle_message(sender, Disconnect(alive), self.now))

    @rule(
        sender=peers_st,
        origin=st.sampled_from((*POOL, ME)),
        ttl=st.integers(0, 6),
        sample=st.lists(st.sampled_from((*POOL, ME)), max_size=8),
    )
    def shuffle(self, sender: Peer, origin: Peer, ttl: int, sample: list[Peer]) -> None:
        message = Shuffle(origin, ttl, tuple(sample), 1)
        self.feed(self.core.handle_message(sender, message, self.now))

    @rule(
        sender=peers_st, sample=st.lists(st.sampled_from((*POOL, ME)), max_size=8), data=st.data()
    )
    def shuffle_reply(self, sender: Peer, sample: list[Peer], data: st.DataObject) -> None:
        nonce = data.draw(st.sampled_from(self.nonces)) if self.nonces else 5
        self.feed(self.core.handle_message(sender, ShuffleReply(tuple(sample), nonce), self.now))

    @rule(target_peer=peers_st)
    def link_down(self, target_peer: Peer) -> None:
        self.feed(self.core.handle_link_down(target_peer, self.now))

    @rule(contact=peers_st)
    def join(self, contact: Peer) -> None:
        self.feed(self.core.join(contact, self.now))

    @precondition(lambda self: bool(self.timers))
    @rule(data=st.data())
    def fire_timer(self, data: st.DataObject) -> None:
        timer = data.draw(st.sampled_from(self.timers))
        self.timers.remove(timer)
        self.feed(self.core.handle_timer(timer, self.now))

    @rule()
    def leave(self) -> None:
        self.feed(self.core.leave(self.now))

    @invariant()
    def views_are_sound(self) -> None:
        core = self.core
        core.check_invariants()
        active, passive = ids(core.active), ids(core.passive)
        assert len(active) == len(core.active) <= core.config.active_size
        assert len(passive) == len(core.passive) <= core.config.passive_size
        assert ME.id not in active | passive
        assert not active & passive
        # Replaying PeerUp/PeerDown gives exactly the active view.
        assert self.up == active
        assert all(core.wants_link(pid) for pid in active)


TestHyParViewMachine = HyParViewMachine.TestCase
TestHyParViewMachine.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)


# --- lost contacts (deviation 9) ---------------------------------------------------------------


class Ticks:
    """The periodic reconnect timer, followed from one firing to the next."""

    def __init__(self, core: HyParView) -> None:
        self.core = core
        (self.timer,) = [
            e.timer
            for e in core.start(0.0)
            if isinstance(e, SetTimer) and isinstance(e.timer, ReconnectTimer)
        ]

    def fire(self, now: float) -> list[tuple[str, bool]]:
        """The NEIGHBOR probes sent when the timer fires at `now`: (peer id, high)."""
        out = self.core.handle_timer(self.timer, now)
        (self.timer,) = [e.timer for e in out if isinstance(e, SetTimer)][-1:]
        return sorted(
            (e.peer.id, e.message.high)
            for e in out
            if isinstance(e, Send) and isinstance(e.message, Neighbor)
        )


def test_a_failed_neighbour_is_probed_until_it_answers_even_into_a_full_view() -> None:
    core = make(active_size=2, reconnect_interval=10.0, reconnect_backoff_max=30.0)
    ticks = Ticks(core)
    link_up(core, A, B)
    core.handle_link_down(A, 1.0)  # the link failed: A is lost (a partition, perhaps)
    assert ids(core.lost) == {"a"}
    assert ticks.fire(5.0) == []  # not before one interval
    assert ticks.fire(11.0) == [("a", True)]
    core.handle_link_down(A, 12.0)  # unreachable: its wait doubles (20 s)
    assert ticks.fire(25.0) == []
    assert ticks.fire(33.0) == [("a", True)]
    link_up(core, C)  # the view is full again (B, C) meanwhile
    out = core.handle_message(A, NeighborReply(accepted=True), 34.0)
    # Kept: a neighbour makes room; the link across the cut is the one that matters.
    assert core.is_active("a") and len(core.active) == 2
    assert any(isinstance(e, Send) and isinstance(e.message, Disconnect) for e in out)
    assert core.lost == () and core.stats.reconnects == 1
    core.check_invariants()


def test_every_due_contact_is_probed_and_low_priority_after_one_answered() -> None:
    core = make(active_size=5, reconnect_interval=10.0, reconnect_backoff_max=30.0)
    ticks = Ticks(core)
    link_up(core, A, B, C, D)
    for p in (A, B, C):
        core.handle_link_down(p, 1.0)
    assert ticks.fire(12.0) == [("a", True), ("b", True), ("c", True)]
    core.handle_message(A, NeighborReply(accepted=True), 12.5)
    core.handle_link_down(B, 13.0)
    core.handle_link_down(C, 13.0)
    # Within reconnect_backoff_max of A's answer: the others are asked without forcing.
    assert ticks.fire(34.0) == [("b", False), ("c", False)]
    out = core.handle_message(B, NeighborReply(accepted=False), 34.5)  # full: refused
    assert out == [] and not core.is_active("b") and "b" in ids(core.lost)
    # After the window, high priority again (B may be asked by the refill meanwhile).
    core.handle_link_down(C, 35.0)
    assert ("c", True) in ticks.fire(80.0)
    core.check_invariants()


def test_lost_contacts_end_with_a_message_a_timeout_or_the_bound() -> None:
    core = make(reconnect_interval=10.0, reconnect_timeout=100.0, max_lost=2)
    ticks = Ticks(core)
    link_up(core, A, B, C)
    for p in (A, B, C):
        core.handle_link_down(p, 1.0)
    assert ids(core.lost) == {"b", "c"}  # at most max_lost: the oldest went
    core.handle_message(B, Disconnect(alive=True), 2.0)  # B reached us: not lost any more
    assert ids(core.lost) == {"c"}
    ticks.fire(102.0)  # remembered for reconnect_timeout only
    assert core.lost == ()


def test_reach_asks_only_a_peer_in_neither_view() -> None:
    core = make()
    link_up(core, A, B)
    learn(core, C)
    assert core.reach(A, 0.0) == [] and core.reach(C, 0.0) == [] and core.reach(ME, 0.0) == []
    out = core.reach(D, 0.0)
    assert [e.message for e in out if isinstance(e, Send)] == [Neighbor(high=True)]
    assert core.reach(D, 0.0) == []  # a request is out already


def test_walks_longer_than_ours_are_cut_to_our_walk_length() -> None:
    # Deviation 10: a FORWARD_JOIN or SHUFFLE with the wire's largest ttl (255) is treated
    # as one of our own length (arwl 6, shuffle_ttl 6 by default): no long walks.
    core = make()
    link_up(core, A, B)
    arwl = core.config.arwl
    assert core.handle_message(A, ForwardJoin(N, 255), 1.0) == [Send(B, ForwardJoin(N, arwl - 1))]
    assert core.stats.ttl_clamped == 1
    assert core.handle_message(A, ForwardJoin(N, arwl), 1.0) == [Send(B, ForwardJoin(N, arwl - 1))]
    assert core.stats.ttl_clamped == 1


def test_one_neighbour_cannot_replace_the_whole_active_view() -> None:
    # Deviation 11: 300 FORWARD_JOINs with ttl 0 for made-up nodes from one member (the
    # eclipse of issue 17) evict one member per period, not the view.
    core = make()
    honest = [peer(f"h{i}") for i in range(4)]
    link_up(core, A, *honest)
    sends = []
    for i in range(300):
        out = core.handle_message(A, ForwardJoin(peer(f"fake{i}"), 0), 1.0)
        sends += [e for e in out if isinstance(e, Send) and isinstance(e.message, Neighbor)]
    assert len(sends) == 1  # one newcomer taken in (one dial), one member evicted
    assert len(ids(core.active) & ids(tuple(honest))) == 3
    assert core.stats.replacements_refused == 299
    # The refused newcomers wait in the passive view (bounded), not in the active one.
    assert len(core.passive) == core.config.passive_size
    later = core.handle_message(A, ForwardJoin(peer("fresh"), 0), 1.0 + 10.0)
    assert any(isinstance(e, Send) and e.message == Neighbor(high=True) for e in later)
    core.check_invariants()


def test_an_address_held_by_another_id_is_not_learned() -> None:
    # Deviation 12: many ids pointing at one host would have us dial it once per id.
    core = make()
    link_up(core, A, B)
    learn(core, C)
    core.handle_message(A, ForwardJoin(Peer("c2", C.address), core.config.prwl), 0.0)
    core.handle_message(
        A, Shuffle(ORIGIN, 0, (Peer("c3", C.address), Peer("a2", A.address), D), 1), 0.0
    )
    assert {"c", "d"} <= ids(core.passive)
    assert not {"c2", "c3", "a2"} & ids(core.passive)
    assert core.stats.address_conflicts == 3
    # Once the id we knew there fails to answer, a new id at that address replaces it (a
    # node restarted under another name).
    core._candidate_failed("c", 1.0)
    core.handle_message(A, ForwardJoin(Peer("c4", C.address), core.config.prwl), 1.0)
    assert "c4" in ids(core.passive) and "c" not in ids(core.passive)


def test_a_peer_that_teaches_dead_addresses_is_ignored_for_a_while() -> None:
    # Deviation 12: A feeds ids that never answer; after bad_address_limit of them fail,
    # what A taught is dropped and what it sends is ignored for bad_address_period.
    core = make(bad_address_limit=3, bad_address_period=60.0)
    link_up(core, A, B)
    dead = [peer(f"dead{i}") for i in range(5)]
    core.handle_message(A, Shuffle(A, 0, tuple(dead), 1), 0.0)
    assert ids(tuple(dead)) <= ids(core.passive)
    for p in dead[:3]:
        core._candidate_failed(p.id, 1.0)
    assert core.stats.teachers_penalised == 1
    assert not ids(tuple(dead)) & ids(core.passive)
    core.handle_message(A, Shuffle(A, 0, (peer("more"),), 2), 2.0)
    # Relayed by an honest neighbour, but naming A as the walk's origin: ignored too.
    core.handle_message(B, Shuffle(A, 0, (peer("relayed"),), 5), 2.0)
    assert not {"more", "relayed"} & ids(core.passive) and core.stats.addresses_ignored == 2
    # B relaying C's walk is heard; after the period A is heard again.
    core.handle_message(B, Shuffle(C, 0, (peer("fromc"),), 3), 2.0)
    assert "fromc" in ids(core.passive)
    core.handle_message(A, Shuffle(A, 0, (peer("later"),), 4), 62.0)
    assert "later" in ids(core.passive)
    core.check_invariants()


def test_a_mass_crash_penalises_no_teacher_even_when_the_first_tries_fall_unevenly() -> None:
    # Deviation 12: right after a mass crash the refill's first tries may all fall on one
    # teacher's entries. Standing neighbours of ours failing too says it is a crash, not a
    # lie: the untried entries stay (at 90% crashed, such an entry was the last live id a
    # survivor's only live contact held of it).
    core = make(bad_address_limit=3, bad_address_period=60.0)
    link_up(core, A, B, C, D)
    taught = [peer(f"a-{i}") for i in range(5)]
    core.handle_message(A, Shuffle(A, 0, tuple(taught), 1), 0.0)
    core.handle_link_down(B, 20.0)
    core.handle_link_down(C, 20.0)
    for p in taught[:3]:
        core._candidate_failed(p.id, 21.0)
    assert core.stats.teachers_penalised == 0
    assert {"a-3", "a-4"} <= ids(core.passive)
    # Once the neighbours' failures are a period old, the same pattern is penalised, on
    # failures counted from then on only.
    more = [peer(f"b-{i}") for i in range(4)]
    core.handle_message(A, Shuffle(A, 0, tuple(more), 2), 90.0)
    core._candidate_failed(taught[3].id, 90.5)
    core._candidate_failed(more[0].id, 91.0)
    assert core.stats.teachers_penalised == 0
    core._candidate_failed(more[1].id, 91.0)
    assert core.stats.teachers_penalised == 1
    assert not {"a-4", "b-2", "b-3"} & ids(core.passive)
    core.check_invariants()


def test_one_neighbour_failing_does_not_stop_the_penalty() -> None:
    core = make(bad_address_limit=3, bad_address_period=60.0)
    link_up(core, A, B, C)
    taught = [peer(f"a-{i}") for i in range(5)]
    core.handle_message(A, Shuffle(A, 0, tuple(taught), 1), 0.0)
    core.handle_link_down(B, 20.0)
    for p in taught[:3]:
        core._candidate_failed(p.id, 21.0)
    assert core.stats.teachers_penalised == 1
    assert not {"a-3", "a-4"} & ids(core.passive)


def test_newcomers_pushed_on_us_that_never_answer_do_not_stop_the_penalty() -> None:
    # Deviation 12: a member cannot turn the penalty off by making cheap links fail:
    # newcomers it pushes (FORWARD_JOIN, time to live 0) whose dials fail at once never
    # stood in the view, so they do not count as a mass failure.
    core = make(bad_address_limit=3, bad_address_period=60.0)
    link_up(core, A, B)
    taught = [peer(f"a-{i}") for i in range(5)]
    core.handle_message(A, Shuffle(A, 0, tuple(taught), 1), 0.0)
    for i in range(2):
        fake = peer(f"fake{i}")
        core.handle_message(A, ForwardJoin(fake, 0), 20.0 + i)
        assert fake.id in ids(core.active)
        core.handle_link_down(fake, 20.5 + i)
    for p in taught[:3]:
        core._candidate_failed(p.id, 23.0)
    assert core.stats.teachers_penalised == 1
    assert not {"a-3", "a-4"} & ids(core.passive)
    core.check_invariants()


def test_a_join_uses_its_senders_eviction_for_the_period() -> None:
    # Deviation 11: a member that JOINs a full view (one eviction, always taken in) gets
    # no FORWARD_JOIN eviction on top within the period.
    core = make()
    link_up(core, A, B, C, D, E)
    core.handle_message(N, Join(), 1.0)
    assert core.stats.evictions == 1
    core.handle_message(N, ForwardJoin(peer("fake"), 0), 2.0)
    assert core.stats.evictions == 1 and core.stats.replacements_refused == 1
    core.handle_message(N, ForwardJoin(peer("fake2"), 0), 12.0)
    assert core.stats.evictions == 2
    core.check_invariants()


def test_a_mass_crash_penalises_no_teacher() -> None:
    # Deviation 12: when many nodes crash, every teacher's entries fail alike: nobody is
    # penalised and nothing taught is dropped (the healing needs the passive view).
    core = make(bad_address_limit=3, bad_address_period=60.0)
    link_up(core, A, B, C, D)
    taught = {p: [peer(f"{p.id}-{i}") for i in range(4)] for p in (A, B, C, D)}
    for nonce, (teacher, peers) in enumerate(taught.items()):
        core.handle_message(teacher, Shuffle(teacher, 0, tuple(peers), nonce), 0.0)
    for i in range(3):  # the refill tries candidates across teachers
        for peers in taught.values():
            core._candidate_failed(peers[i].id, 1.0)
    assert core.stats.teachers_penalised == 0
    assert all(peers[3].id in ids(core.passive) for peers in taught.values())
