"""The per-message paths made cheap for CPU: they keep every rule they had.

Links: a ping is never answered yet keeps the peer alive, pings are not activity (an idle
link is closed once unwanted), pings of idle links share a grid, a blocked send still ends
the link. Components: inputs queued together run in one wake-up without starving timers,
`post_nowait` refuses a full inbox. Wire: the hand-written encoders give exactly the bytes of
the generic one, and the faster plain-data check refuses what the old one refused.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Iterable
from typing import Any

import attrs
import cbor2
import pytest
import trio
import trio.testing
from hypothesis import given

from trio_replica.core.effects import Effect, SetTimer
from trio_replica.core.messages import (
    Gossip,
    IHave,
    Message,
    MessageId,
    Neighbor,
    Peer,
    Ping,
    Pong,
    Role,
)
from trio_replica.core.wire import (
    PROTOCOL_VERSION,
    decode_frame,
    encode_frame,
    encode_message,
    frame_from_parts,
)
from trio_replica.core.wire_positional import message_fields
from trio_replica.errors import WireError
from trio_replica.runtime.component import DRAIN_BATCH, Component
from trio_replica.runtime.config import NodeConfig
from trio_replica.runtime.flow import FlowConfig
from trio_replica.runtime.link import PING_TICK, Link
from trio_replica.runtime.linkconfig import LinkConfig
from trio_replica.runtime.stats import NodeStats
from trio_replica.transports.base import TransportClosed
from trio_replica.transports.memory import MemoryNetwork

from .harness import FAST_LINKS, Cluster, link_pair, wait_until
from .test_wire import messages

# --- wire ----------------------------------------------------------------------------------


def _reference_default(encoder: Any, value: Any) -> None:
    """The generic encoding the fast paths must match: value objects as positional arrays."""
    if isinstance(value, Peer):
        encoder.encode([value.id, value.address])
    elif isinstance(value, MessageId):
        encoder.encode([value.origin, value.stamp, value.nonce])
    elif isinstance(value, Message):
        encoder.encode(message_fields(value))
    else:
        raise cbor2.CBOREncodeError(f"cannot encode {type(value).__name__}")


@given(messages)
def test_every_kind_encodes_to_the_generic_bytes(message: Message) -> None:
    assert encode_message(message) == cbor2.dumps(message, default=_reference_default)


def test_hot_kinds_encode_to_the_generic_bytes() -> None:
    mid = MessageId("n12", 2**47 + 5, 2**64 - 1)
    for message in (
        Gossip(mid, 7, "tag", b"\x00" * 300),
        IHave.of([(MessageId(f"n{i}", i, 2**63 + i), i, f"tag{i % 3}") for i in range(40)]),
        IHave.of([(MessageId("n1", 1, 1), 1, "one")]),
        IHave((), ()),
        Ping(0),
        Ping(2**64 - 1),
    ):
        assert encode_message(message) == cbor2.dumps(message, default=_reference_default)


@pytest.mark.parametrize(
    "bad",
    [
        cbor2.undefined,
        cbor2.CBORSimpleValue(16),
        [1, [2, [3, cbor2.undefined]]],
        {"a": [1, {"b": cbor2.CBORSimpleValue(19)}]},
    ],
)
def test_simple_values_are_refused_at_any_depth(bad: Any) -> None:
    frame = bytes([0x82]) + cbor2.dumps(PROTOCOL_VERSION) + cbor2.dumps([20, bad])
    with pytest.raises(WireError) as info:
        decode_frame(frame)
    assert info.value.reason == "cbor"


def test_frames_of_several_messages_round_trip_with_their_sizes() -> None:
    batch: list[Message] = [Ping(1), Gossip(MessageId("a", 1, 2), 1, "t", b"xy"), Pong(3)]
    assert decode_frame(encode_frame(batch)) == batch


# --- links ---------------------------------------------------------------------------------


async def test_pings_are_not_answered_and_keep_an_idle_link_alive(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = LinkConfig()
    async with trio.open_nursery() as nursery:
        pair = await link_pair(nursery, MemoryNetwork(seed=41), config)
        await trio.sleep(10 * config.idle_timeout)
        assert pair.a.is_open and pair.b.is_open
        for stats in (pair.a_stats, pair.b_stats):
            assert stats.messages_sent["Ping"] >= 10
            assert stats.messages_received["Ping"] >= 10
            assert "Pong" not in stats.messages_sent
        # Pings are not activity: nothing but pings crossed, so both links look idle.
        assert pair.a.last_activity == pair.a.established_at
        assert pair.b.last_activity == pair.b.established_at
        assert pair.got == []
        nursery.cancel_scope.cancel()


async def test_a_pong_from_an_older_peer_is_accepted_and_not_delivered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        pair = await link_pair(nursery, MemoryNetwork(seed=42), LinkConfig())
        pair.a.send_nowait(Pong(5))
        pair.a.send_nowait(Gossip(MessageId("a", 1, 1), 1, "t", b"\xa0"))
        await trio.sleep(1)
        assert pair.got == [Gossip(MessageId("a", 1, 1), 1, "t", b"\xa0")]
        assert pair.b_stats.messages_received["Pong"] == 1
        assert pair.b.last_activity > pair.b.established_at
        nursery.cancel_scope.cancel()


@attrs.define
class _PingTimes(NodeStats):
    """Counters that also note when each ping was sent."""

    pings: list[float] = attrs.Factory(list)

    def message_sent(self, message: Message, size: int) -> None:
        if isinstance(message, Ping):
            self.pings.append(trio.current_time())
        super().message_sent(message, size)


async def test_idle_links_ping_on_a_shared_grid(autojump_clock: trio.testing.MockClock) -> None:
    config = LinkConfig()
    async with trio.open_nursery() as nursery:
        # b's side starts 0.37 s after a's: without the grid their pings would never align.
        pair = await link_pair(
            nursery, MemoryNetwork(seed=43), config, b_starts=0.37, stats=_PingTimes
        )
        await trio.sleep(6.0)
        nursery.cancel_scope.cancel()
    for stats in (pair.a_stats, pair.b_stats):
        assert isinstance(stats, _PingTimes)
        times = stats.pings
        assert len(times) >= 4
        for t in times:
            assert abs(t / PING_TICK - round(t / PING_TICK)) < 1e-6
        gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
        assert all(config.ping_interval <= g <= config.ping_interval + PING_TICK for g in gaps)


async def test_a_silent_peer_is_failed_within_the_idle_timeout_and_one_tick(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = LinkConfig()
    net = MemoryNetwork(seed=44)
    async with trio.open_nursery() as nursery:
        pair = await link_pair(nursery, net, config)
        await trio.sleep(3.0)
        cut = trio.current_time()
        net.partition(["a"], ["b"])
        with trio.fail_after(60):
            reason = await _closed(pair.a)
        assert reason == "idle_timeout"
        # Suspected after the idle timeout, failed after the suspicion timeout more.
        silent = config.idle_timeout + config.suspicion_timeout
        assert silent - 1.0 <= trio.current_time() - cut <= silent + PING_TICK + 0.01
        nursery.cancel_scope.cancel()


async def _closed(link: Link) -> str | None:
    await link.closed.wait()
    return link.close_reason


class _StuckConnection:
    """A connection whose sends never complete (a peer that stopped reading)."""

    remote = "stuck"

    def __init__(self) -> None:
        self.closed = False

    async def send(self, frame: bytes) -> None:
        await trio.sleep_forever()

    async def receive(self) -> bytes:
        await trio.sleep_forever()
        raise TransportClosed("unreachable")

    async def aclose(self) -> None:
        self.closed = True


def _lone_link(conn: _StuckConnection, config: LinkConfig) -> Link:
    """A link over `conn` to a peer "b", ignoring what it receives."""

    async def ignore(*_: Any) -> None:
        return None

    return Link(
        conn,
        Peer("b", "mem://b"),
        role=Role.NODE,
        outbound=True,
        config=config,
        stats=NodeStats(),
        on_message=ignore,
    )


async def test_a_blocked_send_still_ends_the_link(autojump_clock: trio.testing.MockClock) -> None:
    config = LinkConfig()
    conn = _StuckConnection()
    link = _lone_link(conn, config)
    start = trio.current_time()
    link.send_nowait(Gossip(MessageId("a", 1, 1), 1, "t", b"\xa0"))
    assert await link.run() == "send_timeout"
    assert trio.current_time() - start == pytest.approx(config.send_timeout)
    assert conn.closed


class _TalkingButNotReading(_StuckConnection):
    """A peer that sends us a ping every second but never reads (busy, or hostile)."""

    def __init__(self) -> None:
        super().__init__()
        self.nonce = 0

    async def receive(self) -> bytes:
        await trio.sleep(1.0)
        self.nonce += 1
        return frame_from_parts([encode_message(Ping(self.nonce))])


async def test_a_blocked_send_is_not_a_failure_while_the_peer_talks(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Overload is not failure: a peer whose reader waits (its inbox is full) still sends.
    # It is failed only when it fills our control outbox, i.e. when it reads nothing at all.
    config = LinkConfig(outbox_control=50)
    link = _lone_link(_TalkingButNotReading(), config)
    start = trio.current_time()

    async def keep_sending() -> None:
        for _ in range(60):
            await trio.sleep(1.0)
            if not link.is_open:
                return
            link.send_nowait(Neighbor(high=False))

    with trio.fail_after(300):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_sending)
            reason = await link.run()
            nursery.cancel_scope.cancel()
    assert reason == "outbox_full"
    assert trio.current_time() - start > 3 * config.send_timeout


async def test_a_link_carrying_only_pings_is_closed_once_unwanted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork(seed=45)
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, net, base=NodeConfig(name="base", link=FAST_LINKS))
        a = await c.start("a")
        b = await c.start("b", [a.address])
        with trio.fail_after(30):
            await wait_until(lambda: [p.id for p in a.active_view()] == ["b"])
        # A third node dials a without joining: neither side's membership wants that link,
        # which then carries only pings; it must not outlive `linger` (pings once refreshed
        # its activity through the pongs that answered them, and such links never closed).
        extra = await c.start("x")
        peer = await extra.runtime.connect_seed(a.address)
        assert peer is not None and peer.id == "a"
        with trio.fail_after(30):
            await wait_until(lambda: "x" not in {p.id for p in a.links()})
        assert a.stats()["links_closed"].get("local_close", 0) >= 1
        del b
        nursery.cancel_scope.cancel()


# --- components ----------------------------------------------------------------------------


class _Recorder(Component):
    """A component that records inputs and timer firings, with a periodic timer."""

    def __init__(self, period: float) -> None:
        super().__init__("recorder", flow=FlowConfig(inbox_items_per_peer=8))
        self.period = period
        self.ran: list[int] = []
        self.fired: list[float] = []
        self.wakeups = 0

    def on_start(self, now: float, first: bool) -> Iterable[Effect]:
        return [SetTimer(self.period, "tick")]

    def on_timer(self, timer: Hashable, now: float) -> Iterable[Effect]:
        self.fired.append(now)
        return [SetTimer(self.period, "tick")]

    def execute(self, effect: Effect) -> None:
        raise AssertionError(f"unexpected effect {effect}")

    def input(self, i: int) -> Any:
        def run(_now: float) -> list[Effect]:
            self.ran.append(i)
            return []

        return run


async def test_inputs_queued_together_run_in_order_in_one_wake_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    comp = _Recorder(period=1000.0)
    steps = 0

    class Count(trio.abc.Instrument):
        def before_task_step(self, task: trio.lowlevel.Task) -> None:
            nonlocal steps
            if task.name.endswith("serve"):
                steps += 1

    async with trio.open_nursery() as nursery:
        await nursery.start(comp.serve)
        await trio.testing.wait_all_tasks_blocked()
        count = Count()
        trio.lowlevel.add_instrument(count)
        # One source's share of the inbox is 8 inputs.
        assert all(comp.post_nowait(comp.input(i)) for i in range(8))
        assert not comp.post_nowait(comp.input(8)), "a full share refuses, queues nothing"
        await trio.testing.wait_all_tasks_blocked()
        trio.lowlevel.remove_instrument(count)
        assert comp.ran == list(range(8))
        assert steps == 1
        nursery.cancel_scope.cancel()


async def test_a_link_down_runs_after_what_that_link_delivered_before_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A peer's DISCONNECT queued from its link, then the link's end: membership must see
    # them in that order (the other way round, an eviction looks like a failure).
    comp = _Recorder(period=1000.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(comp.serve)
        await trio.testing.wait_all_tasks_blocked()
        link, other = object(), object()
        # Queued in one go, before the task runs any of them.
        assert comp.post_nowait(comp.input(1), source=link)
        assert comp.post_nowait(comp.input(2), source=link)
        comp.post_after(link, comp.input(3))  # the link's end
        comp.post_notice(comp.input(4))  # any other notice still runs first
        comp.post_after(other, comp.input(5))  # nothing queued from it: a plain notice
        await trio.testing.wait_all_tasks_blocked()
        assert comp.ran == [4, 5, 1, 2, 3]
        nursery.cancel_scope.cancel()


async def test_timers_fire_on_time_while_inputs_keep_coming(
    autojump_clock: trio.testing.MockClock,
) -> None:
    comp = _Recorder(period=0.5)
    async with trio.open_nursery() as nursery:
        await nursery.start(comp.serve)
        start = trio.current_time()

        async def flood() -> None:
            i = 0
            while True:
                for _ in range(DRAIN_BATCH * 3):
                    await comp.post(comp.input(i))
                    i += 1
                await trio.sleep(0.01)

        nursery.start_soon(flood)
        await trio.sleep(5.0)
        nursery.cancel_scope.cancel()
    assert len(comp.fired) >= 9
    for k, at in enumerate(comp.fired[:9], start=1):
        assert at - start == pytest.approx(0.5 * k, abs=0.02)
    assert comp.ran == sorted(comp.ran)


async def test_a_crash_during_a_drained_batch_restarts_and_loses_no_queued_input(
    autojump_clock: trio.testing.MockClock,
) -> None:
    comp = _Recorder(period=1000.0)

    def boom(_now: float) -> list[Effect]:
        raise RuntimeError("core bug")

    async with trio.open_nursery() as nursery:
        await nursery.start(comp.serve)
        await trio.testing.wait_all_tasks_blocked()
        comp.post_nowait(comp.input(1))
        comp.post_nowait(boom)
        comp.post_nowait(comp.input(2))
        with trio.fail_after(10):
            await wait_until(lambda: comp.ran == [1, 2])
        assert comp.crashes == 1 and comp.restarts == 1
        nursery.cancel_scope.cancel()
