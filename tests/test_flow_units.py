"""Flow control primitives on their own: fair inbox, feeds and Lagged, pressure, pacing."""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing

from trio_replica.core.events import Lagged
from trio_replica.runtime.congestion import OriginationLimit, QueueingDelay, WritePacer
from trio_replica.runtime.feeds import Fanout, Feed, Offer
from trio_replica.runtime.flow import OTHER, BoundedCounter, Pressure
from trio_replica.runtime.inbox import FairInbox

# --- fair inbox ----------------------------------------------------------------------------


def test_sources_are_served_in_turn_and_keep_their_order() -> None:
    inbox = FairInbox[str](source_items=100, source_bytes=10**6, total_bytes=10**7)
    for i in range(5):
        inbox.put_forced("flood", f"f{i}", 1)
    inbox.put_forced("a", "a0", 1)
    inbox.put_forced("b", "b0", 1)
    inbox.put_forced("a", "a1", 1)
    got = [inbox.get_nowait() for _ in range(len(inbox))]
    # One input per source per turn: the flood delays the others by one input each.
    assert got == ["f0", "a0", "b0", "f1", "a1", "f2", "f3", "f4"]
    with pytest.raises(trio.WouldBlock):
        inbox.get_nowait()


def test_a_source_over_its_share_is_refused_others_are_not() -> None:
    inbox = FairInbox[int](source_items=3, source_bytes=100, total_bytes=1000)
    assert all(inbox.put_nowait("x", i, 10) for i in range(3))
    assert not inbox.put_nowait("x", 3, 10), "items share"
    assert inbox.put_nowait("y", 0, 10)
    assert inbox.put_nowait("y", 1, 85)
    assert not inbox.put_nowait("y", 2, 10), "bytes share"
    # A source with nothing waiting always gets one input in, whatever its size.
    assert inbox.put_nowait("z", 0, 5000)
    assert inbox.throttled == 2


def test_the_total_bound_holds_across_sources() -> None:
    inbox = FairInbox[int](source_items=10, source_bytes=100, total_bytes=150)
    assert inbox.put_nowait("a", 0, 80)
    assert inbox.put_nowait("b", 0, 60)
    assert not inbox.put_nowait("a", 1, 20)  # the total would pass 150
    assert inbox.put_nowait("c", 0, 90)  # a source with nothing waiting: one input


async def test_put_waits_for_its_own_share_and_resumes_as_it_drains() -> None:
    inbox = FairInbox[int](source_items=2, source_bytes=100, total_bytes=1000)
    await inbox.put("x", 0, 1)
    await inbox.put("x", 1, 1)
    done = trio.Event()

    async def third() -> None:
        await inbox.put("x", 2, 1)
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(third)
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set()
        assert inbox.get_nowait() == 0
        await done.wait()
    assert [inbox.get_nowait(), inbox.get_nowait()] == [1, 2]


async def test_credit_is_reported_when_an_input_is_taken_and_pressure_follows_the_backlog() -> None:
    taken: list[tuple[object, int]] = []
    pressure = Pressure()
    inbox = FairInbox[str](
        source_items=10,
        source_bytes=1000,
        total_bytes=10_000,
        pressure=pressure,
        high_items=2,
        on_taken=lambda source, credit: taken.append((source, credit)),
    )
    inbox.put_forced("link", "payload", 40, credit=40)
    assert pressure.is_clear()
    inbox.put_forced("link", "control", 5)
    assert not pressure.is_clear() and pressure.holders() == {"inbox": 1}
    inbox.get_nowait()
    assert taken == [("link", 40)] and pressure.is_clear()
    inbox.get_nowait()
    assert taken == [("link", 40)], "inputs without credit report nothing"


# --- feeds ---------------------------------------------------------------------------------


def test_a_full_feed_counts_what_it_misses_and_says_so_in_place() -> None:
    feed = Feed[str](max_items=2, max_bytes=10**6)
    assert feed.offer("a") is Offer.KEPT
    assert feed.offer("b") is Offer.KEPT
    assert feed.offer("c") is Offer.MISSED
    assert feed.offer("d") is Offer.MISSED
    assert feed.receive_nowait() == "a"
    assert feed.offer("e") is Offer.KEPT  # after the loss: Lagged goes in first
    assert [feed.receive_nowait() for _ in range(3)] == ["b", Lagged(2), "e"]
    assert feed.missed_total == 2


def test_a_subscriber_that_drains_everything_still_hears_of_its_loss() -> None:
    feed = Feed[str](max_items=1, max_bytes=10**6)
    feed.offer("a")
    feed.offer("b")
    assert feed.receive_nowait() == "a"
    assert feed.receive_nowait() == Lagged(1)
    with pytest.raises(trio.WouldBlock):
        feed.receive_nowait()


def test_a_feed_is_bounded_in_bytes_but_takes_one_large_event_when_empty() -> None:
    feed = Feed[str](max_items=100, max_bytes=100)
    assert feed.offer("big", 500) is Offer.KEPT
    assert feed.offer("small", 1) is Offer.MISSED
    assert feed.receive_nowait() == "big"
    assert feed.offer("small", 1) is Offer.KEPT


def test_losses_from_upstream_are_told_too() -> None:
    feed = Feed[str](max_items=10, max_bytes=10**6)
    feed.offer("a")
    feed.note_missed(3)
    feed.offer("b")
    assert [feed.receive_nowait() for _ in range(3)] == ["a", Lagged(3), "b"]


async def test_the_end_of_a_feed_comes_after_what_it_buffered() -> None:
    feed = Feed[str](max_items=10, max_bytes=10**6)
    feed.offer("a")
    feed.close_source()
    assert await feed.receive() == "a"
    with pytest.raises(trio.EndOfChannel):
        await feed.receive()
    other = Feed[str](max_items=9, max_bytes=99)
    other.offer("x")
    other.offer("y")
    other.close_source()
    assert [event async for event in other] == ["x", "y"]


async def test_a_feed_with_backpressure_holds_the_pressure_at_half_full() -> None:
    pressure = Pressure()
    feed = Feed[str](max_items=4, max_bytes=10**6, pressure=pressure)
    feed.offer("a")
    assert pressure.is_clear()
    feed.offer("b")
    assert pressure.holders() == {"subscriber": 1}
    feed.receive_nowait()
    assert pressure.is_clear()
    feed.offer("c")
    feed.close()  # a subscriber that leaves releases what it held
    assert pressure.is_clear()


def test_fanout_offers_to_every_feed_and_forgets_closed_ones() -> None:
    fanout = Fanout[str]()
    small, large = Feed[str](max_items=1, max_bytes=99), Feed[str](max_items=9, max_bytes=99)
    gone = Feed[str](max_items=9, max_bytes=99)
    for feed in (small, large, gone):
        fanout.add(feed)
    gone.close()
    assert fanout.publish("a") == 0
    assert len(fanout) == 2
    assert fanout.publish("b") == 1  # the small feed missed it
    fanout.close_all()
    assert len(fanout) == 0


# --- pressure, counters ----------------------------------------------------------------------


async def test_writers_wait_while_anything_holds_the_pressure() -> None:
    pressure = Pressure()
    pressure.hold("link", "link")
    pressure.hold("feed", "subscriber")
    passed = trio.Event()

    async def writer() -> None:
        await pressure.wait_clear("writer")
        passed.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        await trio.testing.wait_all_tasks_blocked()
        pressure.release("link")
        await trio.testing.wait_all_tasks_blocked()
        assert not passed.is_set()
        pressure.release("feed")
        await passed.wait()
    assert pressure.waits == {"writer": 1}


def test_counters_fed_by_peers_keep_a_bounded_set_of_keys() -> None:
    counter = BoundedCounter(max_keys=4)
    for i in range(100):
        counter[f"tag{i}"] += 1
    counter["tag0"] += 1
    assert len(counter) == 4
    assert counter["tag0"] == 2 and counter[OTHER] == 97
    assert sum(counter.values()) == 101


# --- queueing delay and pacing ---------------------------------------------------------------


def test_queueing_delay_is_the_excess_over_each_origins_best_and_ignores_clock_offsets() -> None:
    delay = QueueingDelay(window=1)
    # Origin "far" runs 5 s ahead of us and is 30 ms away; "near" is in step, 2 ms away.
    assert delay.observe("far", 10_000 + 5_000, 10_030) == 0.0
    assert delay.observe("near", 10_050, 10_052) == 0.0
    delay.observe("far", 10_100 + 5_000, 10_130 + 40)
    delay.observe("near", 10_150, 10_152 + 25)
    assert delay.observe("far", 10_200 + 5_000, 10_230 + 40) == 25.0, "the smaller of both"
    assert delay.observe("near", 10_250, 10_252 + 45) == 40.0


def test_a_burst_of_late_messages_from_one_origin_is_not_queueing() -> None:
    delay = QueueingDelay(window=4)
    delay.observe("a", 0, 10)
    delay.observe("b", 0, 10)
    for t in range(1, 5):
        delay.observe("a", t * 100, t * 100 + 10 + 500)  # repaired upstream, late
    delay.observe("b", 600, 610)
    assert delay.current_ms == 0.0
    for t in range(7, 12):  # now everything is late: that is queueing
        delay.observe("a", t * 100, t * 100 + 10 + 300)
        delay.observe("b", t * 100, t * 100 + 10 + 300)
    assert delay.current_ms == 300.0 and delay.recent_max_ms == 300.0


def test_an_origin_that_stamps_in_the_past_cannot_slow_this_node_down() -> None:
    """A member flooding messages stamped long ago used to make every writer here wait."""
    delay = QueueingDelay()
    for t in range(0, 5000, 10):
        delay.observe("honest", t, t + 5)
        delay.observe("liar", 0, t + 5)  # its stamp never advances: 'late' more and more
        delay.observe("ancient", -(10**9), t + 5)  # beyond any clock skew: not a sample
    assert delay.current_ms == 0.0
    assert delay.implausible == 500


async def test_the_pacer_spaces_writes_while_delay_is_over_target_and_lets_go_after(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pacer = WritePacer(target=0.05, max_interval=1.0, rng=random.Random(1))
    assert pacer.interval == 0.0
    for _ in range(200):
        pacer.sample(0.2)  # four times the target
    high = pacer.interval
    assert 0 < high <= 1.0
    start = trio.current_time()
    for _ in range(10):
        await pacer.wait_turn()
    assert trio.current_time() - start >= 9 * high * 0.5  # jittered +-50%
    for _ in range(2000):
        pacer.sample(0.0)
    assert pacer.interval == 0.0


async def test_a_peer_originating_beyond_its_limit_waits_others_do_not(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limit = OriginationLimit(rate=10, bytes_rate=1000)
    start = trio.current_time()
    for _ in range(10):  # a second's worth goes at once
        await limit.admit("flooder", 10)
    assert trio.current_time() == start
    for _ in range(10):  # then at the rate
        await limit.admit("flooder", 10)
    assert trio.current_time() - start == pytest.approx(1.0, abs=0.01)
    await limit.admit("honest", 10)
    assert trio.current_time() - start == pytest.approx(1.0, abs=0.01)
    # Bytes are limited too; one broadcast larger than a second's worth goes when full.
    big = OriginationLimit(rate=1000, bytes_rate=1000)
    t0 = trio.current_time()
    await big.admit("p", 5000)
    await big.admit("p", 500)
    assert trio.current_time() - t0 == pytest.approx(0.5, abs=0.01)
    assert big.limited == 1


async def test_congestion_is_remembered_for_a_while_after_the_pressure_drops(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pressure = Pressure()
    assert not pressure.held_within(1.0)
    pressure.hold("link", "link")
    assert pressure.held_within(0.0)
    pressure.release("link")
    await trio.sleep(0.5)
    assert pressure.held_within(1.0)
    await trio.sleep(0.6)
    assert not pressure.held_within(1.0)


async def test_a_neighbours_congestion_counts_for_the_hold_and_is_not_passed_on(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pressure = Pressure(hold=1.0)
    pressure.peer_congested("a")  # a's credit said it is congested
    assert pressure.downstream_congested(excluding="b")
    # Never against a itself: a busy writer's own full outbox must not get it capped.
    assert not pressure.downstream_congested(excluding="a")
    # Our own flag (what our credit tells others) stays ours: no echo between neighbours.
    assert not pressure.congested()
    await trio.sleep(1.1)
    assert not pressure.downstream_congested(excluding="b")
    pressure.hold("link", "link")
    assert pressure.congested() and not pressure.downstream_congested(excluding="b")


def test_the_congestion_others_meet_excludes_one_origin() -> None:
    """Near its first hop, a flooder's own messages are the least delayed of all."""
    delay = QueueingDelay(window=1)
    for t in range(0, 200, 10):
        delay.observe("flooder", t, t + 1)
        delay.observe("honest", t, t + 1)
    for t in range(200, 400, 10):
        delay.observe("flooder", t, t + 1)  # fresh, one hop away
        delay.observe("honest", t, t + 1 + 80)  # queued downstream
    assert delay.current_ms == 0.0
    assert delay.excluding("flooder") == 80.0
    assert delay.excluding("honest") == 0.0


def test_token_bucket_saves_up_to_its_capacity_and_says_how_long_a_debt_lasts() -> None:
    from trio_replica.core.tokens import TokenBucket

    bucket = TokenBucket(rate=2.0, capacity=3.0)
    assert [bucket.take(1, 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(1, 0.0) == pytest.approx(0.5)  # one in debt: half a second at 2/s
    assert bucket.take(1, 100.0) == 0.0  # refilled, but never past the capacity
    assert bucket.tokens == pytest.approx(2.0)


async def test_a_closed_inbox_returns_the_credit_of_what_it_drops() -> None:
    """A replica that closes drops its queued inputs: their link credit must go back, or
    the peer's sender runs out of credit for that link and stops sending anything on it."""
    returned: list[tuple[object, int]] = []
    inbox = FairInbox[str](
        source_items=2,
        source_bytes=10**6,
        total_bytes=10**7,
        on_taken=lambda source, credit: returned.append((source, credit)),
    )
    inbox.put_forced("link", "chunk 1", 10, credit=10)
    inbox.put_forced("link", "chunk 2", 20, credit=20)
    inbox.put_forced("tick", "timer", 0)
    waited: list[str] = []

    async def producer() -> None:
        await inbox.put("link", "chunk 3", 30, credit=30)  # over the link's share: waits
        waited.append("done")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(producer)
        await trio.testing.wait_all_tasks_blocked()
        assert waited == []
        assert inbox.close() == 3
        assert sorted(returned) == [("link", 10), ("link", 20)]
    # The waiting producer was let through and its input dropped, credit returned too.
    assert waited == ["done"]
    assert sorted(c for s, c in returned if s == "link") == [10, 20, 30]
    inbox.put_forced("link", "late", 5, credit=5)
    assert returned[-1] == ("link", 5) and len(inbox) == 0


async def test_a_producer_waiting_for_the_total_bound_is_let_go_by_close() -> None:
    returned: list[int] = []
    inbox = FairInbox[str](
        source_items=10,
        source_bytes=100,
        total_bytes=100,
        on_taken=lambda source, credit: returned.append(credit),
    )
    inbox.put_forced("one", "a", 90, credit=90)
    inbox.put_forced("two", "b", 5, credit=5)
    done = trio.Event()

    async def producer() -> None:
        await inbox.put("two", "c", 50, credit=50)  # its own share has room; the total not
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(producer)
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set()
        inbox.close()
    assert done.is_set() and sorted(returned) == [5, 50, 90]
