"""Overload is not failure: loop health, stretched timeouts, suspicion, the dial budget."""

from __future__ import annotations

import random
import time

import pytest
import trio
import trio.testing

from trio_replica.core.effects import SetTimer
from trio_replica.core.events import DownReason, PeerDown
from trio_replica.core.hyparview import HyParViewConfig
from trio_replica.core.messages import MessageId, Neighbor
from trio_replica.core.plumtree import FlushTimer, GraftTimer
from trio_replica.errors import ConfigError
from trio_replica.runtime.config import NodeConfig
from trio_replica.runtime.dialing import DialBudget
from trio_replica.runtime.health import HealthConfig, LoopHealth, loop_health
from trio_replica.runtime.linkconfig import LinkConfig
from trio_replica.transports.memory import MemoryNetwork

from .harness import Cluster, link_pair, wait_until

# --- LoopHealth ----------------------------------------------------------------------------


def test_a_healthy_loop_leaves_timeouts_alone() -> None:
    health = LoopHealth()
    for i in range(100):
        health.record(0.002, i * 0.05)
    assert health.timeout(4.0, now=5.0) == 4.0
    assert health.stretch(now=5.0) == 1.0


def test_a_stall_stretches_timeouts_then_decays_with_the_half_life() -> None:
    health = LoopHealth(HealthConfig(slack=4.0, half_life=5.0, max_stretch=8.0))
    health.record(1.5, 10.0)
    assert health.recent_lag(10.0) == pytest.approx(1.5)
    assert health.timeout(4.0, now=10.0) == pytest.approx(4.0 + 4 * 1.5)
    assert health.recent_lag(15.0) == pytest.approx(0.75)
    assert health.timeout(4.0, now=15.0) == pytest.approx(4.0 + 4 * 0.75)
    # Capped at max_stretch times the base.
    health.record(30.0, 20.0)
    assert health.timeout(4.0, now=20.0) == pytest.approx(32.0)
    # Long after, back to the base.
    assert health.timeout(4.0, now=200.0) == 4.0
    assert health.max_lag == 30.0
    assert sum(health.buckets) == 2


def test_a_peer_that_says_it_lags_gets_the_same_slack() -> None:
    health = LoopHealth()
    assert health.timeout(4.0, peer_lag=1.0, now=0.0) == pytest.approx(8.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sample_interval": 0},
        {"quiet_interval": 0},
        {"tolerance": -1},
        {"slack": -1},
        {"max_stretch": 0.5},
    ],
)
def test_bad_health_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        HealthConfig(**kwargs)


async def test_the_sampler_sees_a_stall_of_the_real_loop() -> None:
    # Real time: a task that holds the loop for 300 ms shows as a lag sample that large.
    health = LoopHealth(HealthConfig(sample_interval=0.01, quiet_interval=0.01))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(health.serve)
        await trio.sleep(0.05)
        time.sleep(0.3)  # noqa: ASYNC251 - the stall under test: no checkpoint
        await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert health.max_lag >= 0.25
    assert health.recent_lag() >= 0.2


async def test_one_sampler_per_run_and_another_takes_over_when_it_ends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # One period throughout (a healthy loop would otherwise sample at the quiet period).
    health = loop_health(HealthConfig(sample_interval=0.1, quiet_interval=0.1))
    assert loop_health() is health
    period = health.config.sample_interval
    async with trio.open_nursery() as outer:
        first = trio.CancelScope()

        async def run_first() -> None:
            with first:
                await health.serve()

        outer.start_soon(run_first)
        outer.start_soon(health.serve)
        await trio.sleep(10 * period + period / 2)
        # Two tasks serve, one samples: one sample per period, not two.
        assert health.samples == 10
        first.cancel()
        # Half a period off every sample time, so that no sample ties with our wake-up.
        await trio.sleep(10 * period - period / 2)
        # The other task took over at once: its first sample one period after, then one
        # per period (9 more by now, the old task's pending one cancelled).
        assert health.samples == 19
        outer.cancel_scope.cancel()


async def test_a_healthy_loop_is_sampled_at_the_quiet_period_a_lagging_one_more_often(
    autojump_clock: trio.testing.MockClock,
) -> None:
    health = LoopHealth(HealthConfig(sample_interval=0.1, quiet_interval=0.25, tolerance=0.05))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(health.serve)
        # The first sample after 0.1 s, then every 0.25 s while none is late.
        await trio.sleep(0.1 + 4 * 0.25 + 0.01)
        assert health.samples == 5
        # A stall: the clock jumps while the sampler sleeps, so its next sample is late...
        autojump_clock.jump(0.5)
        await trio.sleep(0.01)
        assert health.samples == 6
        assert health.max_lag >= 0.25
        # ...and the next one comes 0.1 s after it, not 0.25 s.
        before = health.samples
        await trio.sleep(0.15)
        assert health.samples == before + 1
        nursery.cancel_scope.cancel()


# --- links: stretched idle timeout and suspicion --------------------------------------------


async def test_a_lagging_loop_does_not_fail_a_silent_peer_at_the_base_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = LinkConfig()
    net = MemoryNetwork(seed=45)
    health = LoopHealth()
    async with trio.open_nursery() as nursery:
        pair = await link_pair(nursery, net, config, health_a=health)
        await trio.sleep(2.0)
        net.partition(["a"], ["b"])
        cut = trio.current_time()
        # Our loop just stalled for 2 s: 4 s + 4 x 2 s before suspicion, and the
        # suspicion's 2 s stretched as well (capped at 8x).
        health.record(2.0, cut)
        await pair.a.closed.wait()
        took = trio.current_time() - cut
        assert pair.a.close_reason == "idle_timeout"
        assert took > config.idle_timeout + config.suspicion_timeout + 2.0
        nursery.cancel_scope.cancel()


async def test_a_suspected_peer_that_speaks_again_is_cleared_not_failed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = LinkConfig()
    net = MemoryNetwork(seed=46)
    async with trio.open_nursery() as nursery:
        pair = await link_pair(nursery, net, config)
        await trio.sleep(1.0)
        net.partition(["a"], ["b"])
        # Polling is right here: the link has no event for its suspicion.
        while not pair.a.suspected:  # noqa: ASYNC110
            await trio.sleep(0.05)
        net.heal()
        await trio.sleep(config.suspicion_timeout + 2.0)
        assert pair.a.is_open and not pair.a.suspected, (pair.a.close_reason, pair.b.close_reason)
        assert pair.a_stats.flow["suspicions"] >= 1
        assert pair.a_stats.flow["suspicions_cleared"] >= 1
        nursery.cancel_scope.cancel()


async def test_pings_carry_the_senders_lag(autojump_clock: trio.testing.MockClock) -> None:
    config = LinkConfig()
    net = MemoryNetwork(seed=47)
    health_b = LoopHealth()
    async with trio.open_nursery() as nursery:
        pair = await link_pair(nursery, net, config, health_b=health_b)
        health_b.record(1.0, trio.current_time())
        await trio.sleep(3 * config.ping_interval)
        # b said so in its pings; a now allows b 4 x its lag more.
        assert 0.5 < pair.a.peer_lag <= 1.0
        nursery.cancel_scope.cancel()


# --- the dial budget ------------------------------------------------------------------------


async def test_the_dial_budget_lets_a_burst_through_then_paces(
    autojump_clock: trio.testing.MockClock,
) -> None:
    budget = DialBudget(rate=5.0, burst=10, rng=random.Random(1))
    start = trio.current_time()
    for _ in range(10):
        await budget.acquire()
    assert trio.current_time() == start
    for _ in range(10):
        await budget.acquire()
    took = trio.current_time() - start
    # 10 more at 5 a second, each with up to one interval of jitter.
    assert 2.0 <= took <= 2.0 + 0.2 * 10
    assert budget.delayed == 10


async def test_a_zero_rate_is_no_limit(autojump_clock: trio.testing.MockClock) -> None:
    budget = DialBudget(rate=0, burst=1, rng=random.Random(1))
    start = trio.current_time()
    for _ in range(100):
        await budget.acquire()
    assert trio.current_time() == start and budget.delayed == 0


# --- waiting for the overlay, leaving ---------------------------------------------------------


async def test_wait_ready_returns_once_the_node_has_joined(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork(seed=48)
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, net)
        a = await c.start("a")
        with trio.move_on_after(5) as alone:
            await a.wait_ready()
        assert alone.cancelled_caught  # nobody joined through it yet
        b = await c.start("b", [a.address])
        nodes = [a, b, *(await c.start_many(["c", "d", "e"], a))]
        with trio.fail_after(30):
            for node in nodes:
                await node.wait_ready(min_active=2)
        assert all(len(node.active_view()) >= 2 for node in nodes)
        nursery.cancel_scope.cancel()


async def test_leave_is_graceful_idempotent_and_peers_see_left(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork(seed=49)
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, net)
        a = await c.start("a")
        b = await c.start("b", [a.address])
        with trio.fail_after(30):
            await b.wait_ready()
        async with a.events() as events:
            await b.leave()
            await b.leave()
            with trio.fail_after(10):
                event = await events.receive()
        assert event == PeerDown(b.me, DownReason.LEFT)
        nursery.cancel_scope.cancel()


async def test_a_node_listed_among_its_own_seeds_is_a_seed_and_keeps_a_seed_neighbour(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Seeds re-join each interval until another seed is a neighbour (`should_rejoin`);
    # a node knows it is a seed when its own address is in its seed list.
    net = MemoryNetwork(seed=50)
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, net)
        seeds = ["mem://s1", "mem://s2"]
        s1 = await c.start("s1", seeds)
        s2 = await c.start("s2", seeds)
        with trio.fail_after(30):
            await s1.wait_ready()
            await s2.wait_ready()
        assert "s1" in s1.runtime.seeding.seed_ids and "s2" in s2.runtime.seeding.seed_ids
        others = [await c.start(f"n{i}", seeds) for i in range(4)]
        with trio.fail_after(30):
            for node in others:
                await node.wait_ready()
        assert all(node.id not in node.runtime.seeding.seed_ids for node in others)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("chance", [1.0, 0.0])
async def test_a_node_that_knows_no_live_seed_rejoins_by_chance(
    autojump_clock: trio.testing.MockClock, chance: float
) -> None:
    # Once lost contacts are forgotten too (here: turned off), the only way back for a
    # group that holds no seed and remembers none is the ordinary nodes' periodic
    # re-join, taken with `rejoin_chance` per interval.
    interval = 30.0
    membership = HyParViewConfig(
        rejoin_interval=interval, rejoin_chance=chance, reconnect_interval=0.0
    )
    net = MemoryNetwork(seed=52)
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, net, base=NodeConfig(name="base", membership=membership))
        seed = await c.start("s")
        others = [await c.start(name, [seed.address]) for name in "abc"]
        with trio.fail_after(30):
            for node in others:
                await node.wait_ready(min_active=2)
        seed_id = seed.id
        c.crash("s")
        await c.wait_stopped("s")

        def nobody_knows_the_seed() -> bool:
            return all(
                seed_id
                not in {p.id for p in (*n.active_view(), *n.runtime.membership.core.passive)}
                for n in others
            )

        # Refills try the crashed seed until it has failed `max_failures` times.
        with trio.fail_after(600):
            await wait_until(nobody_knows_the_seed)
        # The seed comes back empty (no seeds of its own): only a JOIN reaches it.
        seed = await c.start("s")
        if chance == 1.0:
            with trio.fail_after(2 * interval + 10):
                await seed.wait_ready()
            assert sum(n.stats()["membership"]["joins"] for n in others) >= 1
        else:
            await trio.sleep(5 * interval)
            assert seed.active_view() == []
        nursery.cancel_scope.cancel()


async def test_a_restarted_seed_with_no_seeds_is_found_by_the_nodes_that_lost_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The nodes that lost the seed keep probing it (lost contacts), long after their
    # passive views forgot it: back, it is linked again without any re-join.
    membership = HyParViewConfig(rejoin_chance=0.0)
    net = MemoryNetwork(seed=53)
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, net, base=NodeConfig(name="base", membership=membership))
        seed = await c.start("s")
        others = [await c.start(name, [seed.address]) for name in "abc"]
        with trio.fail_after(30):
            for node in others:
                await node.wait_ready(min_active=2)
        c.crash("s")
        await c.wait_stopped("s")
        await trio.sleep(300)  # long after the refills gave up on it
        assert all(seed.id in {p.id for p in n.runtime.membership.core.lost} for n in others)
        seed = await c.start("s")
        bound = membership.reconnect_backoff_max + 1.25 * membership.reconnect_interval + 5
        with trio.fail_after(bound):
            await seed.wait_ready()
            # The prober counts it when the seed's answer arrives.
            await wait_until(
                lambda: sum(n.stats()["membership"]["reconnects"] for n in others) >= 1
            )
        nursery.cancel_scope.cancel()


async def test_a_late_wake_up_is_not_read_as_a_send_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The writer waits with a deadline (its next ping). Woken by a message just before it,
    # it ran after it (the loop was busy): its cancel scope was then already cancelled,
    # and the send that followed was cut at once and counted as a send timeout, failing
    # a live peer. 8 of the 8 false failures of 100 idle nodes in one process came so.
    config = LinkConfig()
    net = MemoryNetwork(seed=51)
    async with trio.open_nursery() as nursery:
        pair = await link_pair(nursery, net, config)
        for _ in range(20):
            await trio.sleep(config.ping_interval / 2 + 0.013)
            assert pair.a.is_open, pair.a.close_reason
            pair.a.send_nowait(Neighbor(high=False))  # wakes a's writer...
            autojump_clock.jump(config.ping_interval)  # ...which runs after its deadline
            await trio.lowlevel.checkpoint()
        await trio.sleep(1.0)
        assert pair.a.is_open, pair.a.close_reason
        assert sum(isinstance(m, Neighbor) for m in pair.got) == 20
        nursery.cancel_scope.cancel()


async def test_a_lagging_loop_stretches_the_wait_for_a_graft_answer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # timeout2 waits for a GRAFT's answer, which may sit unread in our socket while our
    # loop lags: it stretches like the link timeouts; timeout1 (the latency of repairing
    # a broken tree) and the IHAVE batch window do not.
    net = MemoryNetwork(seed=51)
    async with trio.open_nursery() as nursery:
        a = await Cluster(nursery, net).start("a")
        answer = SetTimer(0.25, GraftTimer(MessageId("o", 1, 1), 1, answer=True))
        first = SetTimer(0.5, GraftTimer(MessageId("o", 1, 1), 1))
        flush = SetTimer(0.05, FlushTimer(1))
        assert a.runtime.broadcaster.timer_delay(answer) == 0.25
        a.runtime.health.record(0.2, trio.current_time())
        assert a.runtime.broadcaster.timer_delay(answer) == pytest.approx(0.25 + 4 * 0.2)
        assert a.runtime.broadcaster.timer_delay(first) == 0.5
        assert a.runtime.broadcaster.timer_delay(flush) == 0.05
        nursery.cancel_scope.cancel()
