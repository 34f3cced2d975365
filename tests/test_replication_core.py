"""The replica core (core/replication.py), sans-IO: whom it compares with, its sessions and
their limits, its scheduling, its removals. Plain calls and effects, no trio."""

from __future__ import annotations

import random
from typing import Any

import attrs
import pytest

from trio_replica.core.antientropy import DigestRound, opening
from trio_replica.core.effects import SetTimer
from trio_replica.core.hlc import Timestamp
from trio_replica.core.messages import Peer
from trio_replica.core.ormap import Dot, ORMap, Value
from trio_replica.core.replication import (
    CancelServes,
    DigestSyncConfig,
    PushFullSync,
    RemoveNode,
    ReplicationCore,
    RequestFullSync,
    Serve,
    SyncCompleted,
)
from trio_replica.errors import ConfigError


def peer(name: str) -> Peer:
    return Peer(name, f"ws://{name}.example:1")


def filled(keys: int, node: str = "w") -> ORMap:
    state = ORMap()
    for i in range(keys):
        state.merge_entry(f"k{i}", Value(i, Dot(node, Timestamp(1_000 + i, 0))))
    return state


def core(
    me: str = "m",
    source: ORMap | None = None,
    config: DigestSyncConfig | None = None,
    **kwargs: Any,
) -> ReplicationCore:
    return ReplicationCore(
        me,
        source=ORMap() if source is None else source,
        rng=random.Random(1),
        config=config,
        **kwargs,
    )


def idle(me: str, neighbors: list[Peer], **kwargs: Any) -> ReplicationCore:
    """A started core that has caught up once, with these neighbours and no comparison
    running: they came up after the start, and have smaller ids (they open the
    comparisons). A fresh core opens one with its first peer itself (tested below)."""
    c = core(me, **kwargs)
    c.start([], [], 0.0)
    c._caught_up = True
    for p in neighbors:
        assert p.id < me and c.peer_up(p, 0.0) == []
    return c


def of(kind: type, effects: list[Any]) -> list[Any]:
    return [e for e in effects if isinstance(e, kind)]


def bare_reply(c: ReplicationCore, p: Peer, now: float) -> list[Any]:
    session = c.session_with(p.id)
    assert session is not None
    return c.round_received(p, session, DigestRound(2, (), ()), now)


# --- whom to compare with --------------------------------------------------------------------


def test_start_compares_with_the_hosts_of_greater_id_or_else_every_neighbour() -> None:
    c = core("m", config=DigestSyncConfig(max_sessions=8))
    effects = c.start([peer("a"), peer("z")], [peer("b"), peer("y"), peer("m")], 0.0)
    assert sorted(s.peer.id for s in of(Serve, effects)) == ["y"]
    assert c.sync_peers() == [peer("b"), peer("y")]  # the hosts, not the neighbours
    alone = core("m", config=DigestSyncConfig(max_sessions=8))
    effects = alone.start([peer("a"), peer("z")], [], 0.0)
    assert sorted(s.peer.id for s in of(Serve, effects)) == ["a", "z"]
    # The opening is the root's children of the digest.
    assert all(s.rounds == (opening(alone.source),) for s in of(Serve, effects))  # type: ignore[arg-type]


def test_a_new_neighbour_is_compared_once_per_pair_and_only_if_it_hosts() -> None:
    c = core("m")
    c.start([], [peer("h")], 0.0)
    assert c.peer_up(peer("x"), 1.0) == []  # hosts are known and x is not one
    assert c.peer_up(peer("a"), 1.0) == []  # a smaller id: the other side opens
    c2 = core("m")
    c2.start([], [], 0.0)
    assert len(of(Serve, c2.peer_up(peer("z"), 1.0))) == 1
    assert c2.peer_up(peer("z"), 2.0) == []  # the same peer again: nothing new


def test_a_host_announced_later_is_compared_by_the_smaller_id() -> None:
    c = core("m")
    c.start([], [], 0.0)
    assert len(of(Serve, c.host_added(peer("q"), 1.0))) == 1
    assert c.host_added(peer("q"), 2.0) == []  # known
    assert c.host_added(peer("c"), 2.0) == []  # smaller: c opens
    assert c.host_added(peer("m"), 2.0) == []  # ourselves
    everywhere = core("m", everywhere=True)
    everywhere.start([peer("n")], [peer("q")], 0.0)
    assert everywhere.host_added(peer("q"), 1.0) == [] and everywhere.hosts == {}


# --- sessions --------------------------------------------------------------------------------


def test_sessions_run_one_at_a_time_and_coalesce() -> None:
    c = core("m")
    c.start([], [], 0.0)
    assert len(of(Serve, c.compare(peer("a"), 0.0))) == 1
    assert c.compare(peer("b"), 0.0) == []  # waits
    assert c.compare(peer("a"), 0.0) == [] and c.compare(peer("b"), 0.0) == []
    assert c.digest_stats.sessions_coalesced == 2
    assert c.snapshot()["sessions_waiting"] == 1
    done = bare_reply(c, peer("a"), 5.0)
    assert of(SyncCompleted, done) == [SyncCompleted(0.0)]
    # The waiting one opens as the first ends.
    assert [s.peer.id for s in of(Serve, done)] == ["b"]
    assert c.session_with("b") is not None and c.busy()


def test_a_silent_session_times_out_from_the_last_time_it_heard() -> None:
    config = DigestSyncConfig(session_timeout=10.0)
    c = core("m", config=config)
    c.start([], [], 0.0)
    (timer,) = of(SetTimer, c.compare(peer("a"), 0.0))
    c.compare(peer("b"), 0.0)
    c.chunk_received("a", c.session_with("a"), 6.0)  # type: ignore[arg-type]
    # Fired at 10 s: heard at 6 s, so re-armed for 16 s.
    rearm = c.handle_timer(timer.timer, 10.0)
    assert rearm == [SetTimer(6.0, timer.timer)] and c.session_with("a") is not None
    ended = c.handle_timer(timer.timer, 16.0)
    assert c.session_with("a") is None and c.digest_stats.sessions_timed_out == 1
    assert [s.peer.id for s in of(Serve, ended)] == ["b"]
    assert of(SyncCompleted, ended) == []
    # A stale watchdog (a session long gone) does nothing.
    assert c.handle_timer(timer.timer, 100.0) == []


def test_a_peer_gone_ends_its_session_and_cancels_what_waits_for_it() -> None:
    c = core("m", filled(10))
    c.start([peer("a")], [], 0.0)
    assert c.session_with("a") is not None
    effects = c.peer_down("a", 1.0)
    assert CancelServes("a") in effects and c.session_with("a") is None
    assert c.neighbors == {}


# --- answering peers, bounded ----------------------------------------------------------------


def test_rounds_from_one_peer_are_rate_limited_and_queued_answers_bounded() -> None:
    config = DigestSyncConfig(rounds_per_s=1.0, rounds_burst=3, peer_queue=2)
    c = core("m", filled(100), config)
    flood = peer("f")
    empty = DigestRound(1, (0,), ())
    served = [c.round_received(flood, i, empty, 0.0) for i in range(5)]
    assert [len(of(Serve, e)) for e in served] == [1, 1, 0, 0, 0]
    assert c.digest_stats.rounds_refused == {"queue_full": 1, "rate": 2}
    # Once the driver has sent one, another may wait; the rate still holds.
    ticket = of(Serve, served[0])[0].ticket
    c.served("f", ticket)
    assert len(of(Serve, c.round_received(flood, 9, empty, 1.0))) == 1
    assert c.round_received(flood, 10, empty, 1.0) == []


def test_the_allowance_is_the_whole_state_per_window_and_a_refusal_cuts_the_session() -> None:
    config = DigestSyncConfig(serve_window=10.0, min_allowance=1, peer_queue=100)
    c = core("m", filled(1000), config)
    asker = peer("f")
    everything = DigestRound(1, (0,), ())  # "I hold nothing": every range is sent
    first = of(Serve, c.round_received(asker, 1, everything, 0.0))[0]
    assert sum(c.source.range_digest(*r)[1] for r in first.ranges) == 1000  # type: ignore[union-attr]
    assert c.digest_stats.items_sent == 1000
    c.served("f", first.ticket)  # sent
    second = of(Serve, c.round_received(asker, 2, everything, 1.0))
    # A tenth of a window later: a tenth of the map at most, and no rounds (the peer
    # must not think it holds everything).
    assert c.digest_stats.ranges_refused > 0 and c.digest_stats.sessions_cut == 1
    assert all(s.rounds == () for s in second)
    assert c.digest_stats.items_sent <= 1100


def test_ranges_still_on_their_way_to_a_peer_are_not_sent_again() -> None:
    c = core("m", filled(1000), DigestSyncConfig(peer_queue=100))
    asker = peer("f")
    everything = DigestRound(1, (0,), ())
    first = of(Serve, c.round_received(asker, 1, everything, 0.0))[0]
    # Another comparison while the first stream is going: those entries are coming.
    second = of(Serve, c.round_received(asker, 2, everything, 0.5))
    assert all(s.ranges == () for s in second) and second[0].rounds
    assert c.digest_stats.ranges_in_flight == len(first.ranges)
    assert c.digest_stats.items_sent == 1000 and c.digest_stats.ranges_refused == 0
    # Once sent, a range that differs again is sent again.
    c.served("f", first.ticket)
    third = of(Serve, c.round_received(asker, 3, everything, 20.0))
    assert third[0].ranges == first.ranges


def test_malformed_rounds_are_refused_and_counted() -> None:
    c = core("m", filled(10))
    assert c.round_received(peer("f"), 1, DigestRound(9, (0,), ()), 0.0) == []
    assert c.round_received(peer("f"), 1, DigestRound(1, (0, 0), ()), 0.0) == []
    assert c.digest_stats.rounds_refused == {"malformed": 2}


def test_an_owner_without_a_digest_pulls_and_pushes_whole_states() -> None:
    c = ReplicationCore("m", source=None, rng=random.Random(1), anti_entropy_interval=30.0)
    effects = c.start([peer("a"), peer("b")], [], 0.0)
    assert of(RequestFullSync, effects) == [RequestFullSync(peer("a")), RequestFullSync(peer("b"))]
    assert of(PushFullSync, effects) == [PushFullSync(peer("a")), PushFullSync(peer("b"))]
    assert c.peer_up(peer("c"), 1.0) == [PushFullSync(peer("c"))]
    (tick,) = of(SetTimer, effects)
    assert len(of(RequestFullSync, c.handle_timer(tick.timer, 30.0))) == 1
    # A digest round from a peer gets a bare answer, so its comparison ends at once; it
    # holds no ticket (nothing to stream, nothing to count against the peer).
    for session in range(50):
        (answer,) = c.round_received(peer("a"), session, DigestRound(1, (0,), ()), 1.0)
        assert isinstance(answer, Serve) and answer.rounds[0].bare and answer.session == session
        assert answer.ranges == () and answer.ticket == 0
    assert c._outstanding == {}


# --- scheduling ------------------------------------------------------------------------------


def test_anti_entropy_ticks_with_jitter_and_compares_with_one_sync_peer() -> None:
    c = core("m", anti_entropy_interval=30.0)
    (tick,) = of(SetTimer, c.start([], [], 0.0))
    assert 22.5 < tick.delay <= 37.5
    effects = c.handle_timer(tick.timer, tick.delay)
    assert of(Serve, effects) == [] and len(of(SetTimer, effects)) == 1  # nobody to ask
    c._caught_up = True  # else its first peer gets a comparison at once (tested below)
    c.peer_up(peer("a"), 40.0)
    effects = c.handle_timer(tick.timer, 60.0)
    assert [s.peer.id for s in of(Serve, effects)] == ["a"]
    assert c.stats.anti_entropy_pulls == 1


def test_lost_deliveries_cost_one_pull_per_resync_interval() -> None:
    c = idle("z", [peer("a"), peer("b")], resync_interval=1.0)
    (first,) = of(Serve, c.deliveries_lost(3, 10.0))
    later = c.deliveries_lost(2, 10.2)
    assert of(Serve, later) == [] and len(of(SetTimer, later)) == 1
    assert c.deliveries_lost(1, 10.3) == []  # folded into the one pending
    (timer,) = of(SetTimer, later)
    bare_reply(c, first.peer, 10.5)
    assert len(of(Serve, c.handle_timer(timer.timer, 11.0))) == 1
    assert c.stats.deliveries_missed == 6 and c.stats.resyncs_after_lag == 3


def test_a_replica_that_received_entries_follows_up_with_another_peer() -> None:
    config = DigestSyncConfig(follow_up=1.0, follow_up_tries=2)
    c = idle("z", [peer("a"), peer("b"), peer("c")], config=config)
    (timer,) = of(SetTimer, c.chunk_received("a", 1, 5.0))
    assert c.chunk_received("b", 2, 5.1) == []  # one follow-up pending at a time
    effects = c.handle_timer(timer.timer, 6.0)
    (serve,) = of(Serve, effects)
    assert serve.peer.id != "b"  # not the one that just brought entries
    assert c.digest_stats.follow_ups == 1
    # It brought nothing: one more try (follow_up_tries=2), then it stops.
    again = of(SetTimer, bare_reply(c, serve.peer, 7.0))
    assert [t.timer for t in again] == [timer.timer]
    (serve2,) = of(Serve, c.handle_timer(timer.timer, 8.0))
    assert of(SetTimer, bare_reply(c, serve2.peer, 9.0)) == []
    assert c.digest_stats.follow_ups == 2


def test_follow_ups_need_a_change_and_stay_within_their_budget() -> None:
    config = DigestSyncConfig(follow_up=1.0, follow_up_budget=2)
    c = idle("z", [peer("a"), peer("b"), peer("c")], config=config, anti_entropy_interval=30.0)
    # Entries that changed nothing (already held): no follow-up.
    assert c.chunk_received("a", 1, 1.0, changed=False) == []
    (timer,) = of(SetTimer, c.chunk_received("a", 1, 2.0))
    opened = 0
    for t in range(10):
        now = 10.0 + 2 * t
        c.chunk_received("a", 1, now)  # entries keep coming
        for serve in of(Serve, c.handle_timer(timer.timer, now + 1)):
            opened += 1
            bare_reply(c, serve.peer, now + 1.5)
    # 2 per 30 s period, plus what refilled in the 20 s that passed.
    assert opened == 3 and c.digest_stats.follow_ups_over_budget == 7


def test_follow_ups_can_be_turned_off_and_never_target_the_only_peer_again() -> None:
    off = core("m", config=DigestSyncConfig(follow_up=0))
    off.start([peer("a")], [], 0.0)
    assert off.chunk_received("a", 1, 1.0) == []
    alone = core("m")
    alone.start([peer("a")], [], 0.0)
    (timer,) = of(SetTimer, alone.chunk_received("a", 1, 1.0))
    assert of(Serve, alone.handle_timer(timer.timer, 2.0)) == []


# --- removals --------------------------------------------------------------------------------


def test_a_removed_node_is_removed_once_and_a_lagged_feed_catches_up() -> None:
    c = core("m")
    c.start([peer("a")], [peer("h")], 0.0)
    effects = c.node_removed("h", 1.0)
    assert of(RemoveNode, effects) == [RemoveNode("h")]
    # After lost membership events: only what this replica has not removed yet.
    effects = c.membership_lagged([peer("a")], ["h", "x", "y"], 2.0)
    assert of(RemoveNode, effects) == [RemoveNode("x"), RemoveNode("y")]
    assert c.stats.nodes_removed == 3
    # Heard of again (a new life): a later departure removes it again.
    c.peer_up(peer("x"), 3.0)
    assert of(RemoveNode, c.membership_lagged([], ["x"], 4.0)) == [RemoveNode("x")]


def test_a_host_announced_again_is_compared_again_and_set_hosts_reconciles() -> None:
    c = core("a", config=DigestSyncConfig(max_sessions=8))
    c.start([], [], 0.0)
    assert len(of(Serve, c.host_added(peer("q"), 1.0))) == 1
    bare_reply(c, peer("q"), 2.0)
    # A restart at the same address announces a new incarnation: it needs our state.
    assert len(of(Serve, c.host_added(peer("q"), 3.0))) == 1
    # After lost notices: the directory as it stands.
    effects = c.set_hosts([peer("r"), peer("a")], 4.0)
    assert "q" not in c.hosts and set(c.hosts) == {"r"}
    assert CancelServes("q") in effects or c.session_with("q") is None
    assert [s.peer.id for s in of(Serve, effects)] == ["r"]


def test_an_owner_digest_that_raises_skips_the_comparison_and_anti_entropy_goes_on() -> None:
    class Broken(ORMap):
        def child_digests(self, level: int, index: int) -> list[tuple[int, int, int]]:
            raise RuntimeError("store bug")

        def range_digest(self, level: int, index: int) -> tuple[int, int]:
            raise RuntimeError("store bug")

    c = core("m", Broken(), anti_entropy_interval=30.0)
    (tick,) = of(SetTimer, c.start([], [], 0.0))
    c.peer_up(peer("z"), 0.0)  # a comparison that fails to open
    assert not c.busy() and c.digest_stats.source_errors == 1
    effects = c.handle_timer(tick.timer, 30.0)
    assert [t.timer for t in of(SetTimer, effects)] == [tick.timer]
    assert not c.busy()
    # Answering a round fails the same way: nothing sent, nothing charged.
    assert c.round_received(peer("f"), 1, DigestRound(1, (0,), ()), 31.0) == []
    assert c.digest_stats.source_errors == 3


def test_what_was_not_sent_goes_back_to_the_peers_allowance() -> None:
    config = DigestSyncConfig(serve_window=1000.0, min_allowance=1, peer_queue=100)
    c = core("m", filled(1000), config)
    asker = peer("f")
    everything = DigestRound(1, (0,), ())
    first = of(Serve, c.round_received(asker, 1, everything, 0.0))[0]
    c.served("f", first.ticket, sent=False)  # the link dropped before it went out
    again = of(Serve, c.round_received(asker, 2, everything, 0.1))[0]
    assert again.ranges == first.ranges and c.digest_stats.ranges_refused == 0
    c.peer_down("f", 0.2)  # cancelled: refunded too
    third = of(Serve, c.round_received(asker, 3, everything, 0.3))[0]
    assert third.ranges == first.ranges and c.digest_stats.ranges_refused == 0
    c.served("f", third.ticket)  # sent: charged for good
    assert all(s.ranges == () for s in of(Serve, c.round_received(asker, 4, everything, 0.4)))
    assert c.digest_stats.ranges_refused > 0


def test_link_loss_and_eviction_never_remove_a_node() -> None:
    c = core("m")
    c.start([peer("a")], [], 0.0)
    effects = c.peer_down("a", 1.0) + c.host_removed("a", 1.0)
    assert of(RemoveNode, effects) == []


@pytest.mark.parametrize(
    "field, value",
    [("follow_up", -1.0), ("follow_up", float("nan")), ("follow_up_tries", 0)],
)
def test_config_is_validated(field: str, value: object) -> None:
    with pytest.raises(ConfigError):
        attrs.evolve(DigestSyncConfig(), **{field: value})


def test_a_fresh_core_opens_a_comparison_with_its_first_peer_whatever_the_ids() -> None:
    # The smaller id opens comparisons; but a core that never completed one opens one
    # itself, so that it learns when it has caught up (`SyncCompleted`), once.
    c = core("z")
    c.start([], [], 0.0)
    (serve,) = of(Serve, c.peer_up(peer("a"), 1.0))
    assert serve.peer.id == "a"
    assert c.peer_up(peer("b"), 1.0) == []  # one under way: not another
    session = c.session_with("a")
    assert session is not None
    effects = c.round_received(peer("a"), session, DigestRound(2, (), ()), 2.0)
    assert of(SyncCompleted, effects)
    assert c.peer_up(peer("c"), 3.0) == []  # caught up: the smaller id opens again
    # At the start, with only smaller-id hosts known, it opens with one of them.
    d = core("z")
    assert [s.peer.id for s in of(Serve, d.start([], [peer("a"), peer("b")], 0.0))] == ["b"]


def test_the_smaller_id_does_not_repeat_a_comparison_its_peer_runs_with_it() -> None:
    # b (fresh, greater id) opened a comparison with a; a then hears b announced as a
    # host: a's own comparison would only repeat b's (one moves both ways).
    a = core("a")
    a.start([], [], 0.0)
    a._caught_up = True
    a.round_received(peer("b"), 7, DigestRound(1, (0,), ()), 1.0)
    assert of(Serve, a.host_added(peer("b"), 1.5)) == []
    # Once it is over (its bare round) or silent for a session timeout, a opens again.
    a.round_received(peer("b"), 7, DigestRound(2, (), ()), 2.0)
    assert [s.peer.id for s in of(Serve, a.host_added(peer("b"), 2.5))] == ["b"]
