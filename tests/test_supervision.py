"""Supervision: fresh cores after crashes, restart budgets, callback deadlines.

A rule that raises may stop halfway (a peer added before another is evicted, a pending
exchange recorded for a peer already gone). `HyParView.survivors` reads what is left as
plain peers and `HyParView.restore` starts a fresh core from it and from the links that
are open. The state machine below crashes the core at a random point inside a random
rule (the k-th change of one of its views raises), restores, and checks that every
invariant holds and that the events the rest of the node saw still add up to the
active view, then keeps feeding inputs to the fresh core.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from trio_replica import testing
from trio_replica.core.effects import CloseLink, Effect, Emit, Send, SetTimer
from trio_replica.core.events import Left, PeerDown, PeerUp
from trio_replica.core.hyparview import HyParView, HyParViewConfig
from trio_replica.core.messages import (
    Disconnect,
    ForwardJoin,
    Join,
    Neighbor,
    NeighborReply,
    Peer,
    Shuffle,
    ShuffleReply,
)
from trio_replica.errors import ComponentDead
from trio_replica.runtime.config import NodeConfig, ReplicaConfig

ME = Peer("me", "mem://me")
POOL = tuple(Peer(f"p{i}", f"mem://p{i}") for i in range(10))
peers_st = st.sampled_from(POOL)
CONFIG = HyParViewConfig(active_size=3, passive_size=5, max_failures=2)


class Crash(Exception):
    """Raised from inside a rule, as a bug would."""


class _Bomb:
    """Counts changes of a core's views and raises at the armed one."""

    def __init__(self) -> None:
        self.left: int | None = None

    def tick(self) -> None:
        if self.left is not None:
            self.left -= 1
            if self.left < 0:
                self.left = None
                raise Crash("mid-rule")


class _BombDict(dict[str, Any]):
    """A view whose changes count towards the bomb."""

    def __init__(self, bomb: _Bomb, *args: Any) -> None:
        super().__init__(*args)
        self._bomb = bomb

    def __setitem__(self, key: str, value: Any) -> None:
        self._bomb.tick()
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        self._bomb.tick()
        super().__delitem__(key)

    def pop(self, key: str, *default: Any) -> Any:
        if key in self:
            self._bomb.tick()
        return super().pop(key, *default)


def _armed(core: HyParView, bomb: _Bomb) -> HyParView:
    for name in ("_active", "_passive", "_pending", "_lost"):
        setattr(core, name, _BombDict(bomb, getattr(core, name)))
    return core


class CrashingMembership(RuleBasedStateMachine):
    """The membership component's view of its core: inputs, crashes, fresh cores."""

    def __init__(self) -> None:
        super().__init__()
        self.bomb = _Bomb()
        self.rng = random.Random(0)
        self.core = _armed(HyParView(ME, CONFIG, random.Random(1)), self.bomb)
        self.now = 0.0
        self.timers: list[object] = []
        #: What PeerUp/PeerDown told the node: who is up.
        self.up: set[str] = set()
        #: Links open right now (the runtime's, not the core's).
        self.linked: set[str] = set()
        self.crashes = 0
        self.feed(self.core.start(self.now))

    def feed(self, effects: list[Effect]) -> None:
        for effect in effects:
            match effect:
                case SetTimer(timer=timer):
                    self.timers.append(timer)
                case Emit(event=PeerUp(peer=p)):
                    assert p.id not in self.up, "PeerUp twice"
                    self.up.add(p.id)
                    self.linked.add(p.id)
                case Emit(event=PeerDown(peer=p)):
                    assert p.id in self.up, "PeerDown without PeerUp"
                    self.up.discard(p.id)
                case Emit(event=Left()):
                    self.up.clear()
                case Send(peer=p):
                    assert p.id != ME.id, "sent to ourselves"
                    self.linked.add(p.id)
                case CloseLink(peer=p):
                    self.linked.discard(p.id)
                case _:
                    pass

    def run(self, rule: Any) -> None:
        """Run one input; if it crashes, do what `Membership.on_start` does after a crash."""
        try:
            self.feed(rule())
        except Crash:
            self.crashes += 1
            old = self.core.survivors()
            # The component forgets the old core's timers (`Component.clear_timers`).
            self.timers.clear()
            self.core = _armed(HyParView(ME, CONFIG, random.Random(self.crashes + 1)), self.bomb)
            announced = [p for p in POOL if p.id in self.up]
            self.feed(self.core.restore(old, frozenset(self.linked), announced, self.now))

    @rule(after=st.integers(0, 6))
    def arm(self, after: int) -> None:
        self.bomb.left = after

    @rule(dt=st.floats(0, 3))
    def tick(self, dt: float) -> None:
        self.now += dt

    @rule(sender=peers_st)
    def join_from(self, sender: Peer) -> None:
        self.linked.add(sender.id)
        self.run(lambda: self.core.handle_message(sender, Join(), self.now))

    @rule(sender=peers_st, who=peers_st, ttl=st.integers(0, 7))
    def forward_join(self, sender: Peer, who: Peer, ttl: int) -> None:
        self.run(lambda: self.core.handle_message(sender, ForwardJoin(who, ttl), self.now))

    @rule(sender=peers_st, high=st.booleans())
    def neighbor(self, sender: Peer, high: bool) -> None:
        self.linked.add(sender.id)
        self.run(lambda: self.core.handle_message(sender, Neighbor(high), self.now))

    @rule(sender=peers_st, accepted=st.booleans())
    def neighbor_reply(self, sender: Peer, accepted: bool) -> None:
        self.run(lambda: self.core.handle_message(sender, NeighborReply(accepted), self.now))

    @rule(sender=peers_st, alive=st.booleans())
    def disconnect(self, sender: Peer, alive: bool) -> None:
        self.run(lambda: self.core.handle_message(sender, Disconnect(alive), self.now))

    @rule(sender=peers_st, sample=st.lists(peers_st, max_size=6), ttl=st.integers(0, 6))
    def shuffle(self, sender: Peer, sample: list[Peer], ttl: int) -> None:
        message = Shuffle(sender, ttl, tuple(sample), 1)
        self.run(lambda: self.core.handle_message(sender, message, self.now))

    @rule(sender=peers_st, sample=st.lists(peers_st, max_size=6))
    def shuffle_reply(self, sender: Peer, sample: list[Peer]) -> None:
        reply = ShuffleReply(tuple(sample), 1)
        self.run(lambda: self.core.handle_message(sender, reply, self.now))

    @rule(peer=peers_st)
    def link_down(self, peer: Peer) -> None:
        self.linked.discard(peer.id)
        self.run(lambda: self.core.handle_link_down(peer, self.now))

    @rule(data=st.data())
    def fire_timer(self, data: st.DataObject) -> None:
        if self.timers:
            timer = data.draw(st.sampled_from(self.timers))
            self.timers.remove(timer)
            self.run(lambda: self.core.handle_timer(timer, self.now))

    @invariant()
    def the_core_is_sound(self) -> None:
        # After every input the core is either the one that ran it to the end, or a fresh
        # one restored after the input crashed it: both must be sound.
        core = self.core
        core.check_invariants()
        active = {p.id for p in core.active}
        assert ME.id not in active
        # Replaying PeerUp/PeerDown, across crashes, gives exactly the active view.
        assert self.up == active
        assert all(core.wants_link(pid) for pid in active)


TestCrashingMembership = CrashingMembership.TestCase
TestCrashingMembership.settings = settings(max_examples=200, stateful_step_count=60, deadline=None)


def test_a_crash_between_adding_a_peer_and_announcing_it_is_repaired() -> None:
    bomb = _Bomb()
    core = _armed(HyParView(ME, CONFIG, random.Random(1)), bomb)
    core.start(0.0)
    # A FORWARD_JOIN at ttl 0 adds the newcomer, then records the NEIGHBOR it sends to
    # it: the second change of a view raises, after the first.
    bomb.left = 1
    p0 = POOL[0]
    try:
        core.handle_message(p0, ForwardJoin(p0, 0), 1.0)
    except Crash:
        pass
    else:
        raise AssertionError("the armed crash did not go off")
    assert [p.id for p in core.active] == ["p0"]  # in the view, never announced
    fresh = HyParView(ME, CONFIG, random.Random(2))
    effects = fresh.restore(core.survivors(), {"p0"}, [], 2.0)
    assert Emit(PeerUp(p0)) in effects
    assert [p.id for p in fresh.active] == ["p0"]
    fresh.check_invariants()


def test_an_announced_peer_whose_link_is_gone_goes_down_after_a_crash() -> None:
    core = HyParView(ME, CONFIG, random.Random(1))
    core.start(0.0)
    p0, p1 = POOL[0], POOL[1]
    core.handle_message(p0, Join(), 1.0)
    core.handle_message(p1, Join(), 1.0)
    fresh = HyParView(ME, CONFIG, random.Random(2))
    effects = fresh.restore(core.survivors(), {"p1"}, [p0, p1], 2.0)
    downs = [
        e.event.peer.id for e in effects if isinstance(e, Emit) and isinstance(e.event, PeerDown)
    ]
    assert downs == ["p0"]
    assert [p.id for p in fresh.active] == ["p1"]
    assert "p0" in {p.id for p in fresh.lost}
    fresh.check_invariants()


# --- replica drivers ---------------------------------------------------------------------


def _base(**replica: Any) -> NodeConfig:
    return NodeConfig(name="x", replica=ReplicaConfig(**replica))


async def test_a_hung_callback_is_reported_and_its_driver_restarted(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    # The wall clock must agree that the callback hangs (module `replica`): a short one.
    async with testing.cluster(2, base=_base(callback_timeout=0.2)) as c:
        writer, slow = [await c[name].open_map("m") for name in ("n1", "n2")]
        original = slow.merge_delta
        hung = trio.Event()

        async def hang_once(name: str, delta: Any) -> None:
            slow.merge_delta = original  # type: ignore[method-assign]
            hung.set()
            await trio.sleep_forever()

        slow.merge_delta = hang_once  # type: ignore[method-assign]
        replica = slow.replica
        # A guard only: virtual time races ahead while the wall clock catches up.
        with trio.fail_after(36_000):
            await writer.put("a", 1)
            await hung.wait()
            await testing.wait_until(lambda: replica.supervision.restarts == 1, poll=0.5)
        assert replica.stats.callbacks_hung == 1
        assert "callback merge_delta did not return within 0.2 s" in caplog.text
        assert c["n2"].status()["replicas"]["m"]["hung_callbacks"] == 1
        # The fresh driver compares with its host: the delta the hung callback dropped
        # comes back, and later ones arrive as usual.
        await writer.put("b", 2)
        with trio.fail_after(60):
            await testing.wait_until(lambda: slow.get("a") == 1 and slow.get("b") == 2)
        assert c["n2"].liveness() == (True, "ok")


async def test_a_crashed_driver_restarts_with_a_fresh_core_and_catches_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with testing.cluster(3) as c:
        maps = [await c[name].open_map("m") for name in ("n1", "n2", "n3")]
        await maps[0].put("before", 1)
        with trio.fail_after(60):
            await c.converged("m")
        old_core = maps[2].replica.core
        c.crash_replica("n3", "m")
        assert c["n3"].liveness() == (False, "replica m restarting")
        await maps[0].put("after", 2)
        with trio.fail_after(60):
            await testing.wait_until(lambda: maps[2].get("after") == 2)
        assert maps[2].replica.core is not old_core
        assert maps[2].replica.supervision.crashes == 1
        with trio.fail_after(60):
            await c.converged("m")


async def test_a_driver_that_keeps_crashing_closes_its_node(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with pytest.RaisesGroup(ComponentDead, flatten_subgroups=True):
        async with testing.cluster(2) as c:
            the_map = await c["n2"].open_map("m")
            replica = the_map.replica
            for crashes in range(1, replica.supervision.max_restarts + 2):
                with trio.fail_after(30):
                    await replica.running.wait()  # a crash lands on a running life
                    c.crash_replica("n2", "m")
                    await testing.wait_until(
                        lambda n=crashes: replica.supervision.crashes == n, poll=0.01
                    )
            await trio.sleep_forever()  # the node's error ends the block
