"""Flow control on one link: credit, its violation, bounded outboxes, ordering, pressure."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

from trio_replica.core.messages import (
    Gossip,
    IHave,
    Message,
    MessageId,
    Neighbor,
    Peer,
    Role,
)
from trio_replica.core.wire import encode_frame
from trio_replica.runtime.flow import Pressure
from trio_replica.runtime.link import Link
from trio_replica.runtime.linkconfig import LinkConfig
from trio_replica.runtime.stats import NodeStats
from trio_replica.transports.memory import MemoryNetwork

from .harness import link_pair, wait_until


def gossip(n: int, size: int = 1) -> Gossip:
    return Gossip(MessageId("a", n, 1), 1, "t", b"\x41" * size)


class Holder:
    """A receiving node that keeps payloads unprocessed until told to process them."""

    def __init__(self) -> None:
        self.got: list[Message] = []
        self.held: list[tuple[Link, int]] = []

    async def on_message(self, link: Link, message: Message, size: int) -> None:
        self.got.append(message)
        if message.CREDITED:
            self.held.append((link, size))

    def process_all(self) -> None:
        for link, size in self.held:
            link.processed(size)
        self.held.clear()


async def test_payloads_travel_only_on_credit_granted_as_they_are_processed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = LinkConfig(window_messages=8)
    holder = Holder()
    async with trio.open_nursery() as nursery:
        pair = await link_pair(nursery, MemoryNetwork(seed=1), config, on_message=holder.on_message)
        for n in range(20):
            assert pair.a.send_nowait(gossip(n))
        await trio.sleep(1)
        # The window went; the rest waits in a's outbox, counted, not in the network.
        assert len(holder.got) == 8 and pair.a.queued() == 12
        holder.process_all()
        await trio.sleep(1)
        assert len(holder.got) == 16
        holder.process_all()
        await trio.sleep(1)
        assert [m.id.stamp for m in holder.got if isinstance(m, Gossip)] == list(range(20))
        assert pair.a.queued() == 0
        nursery.cancel_scope.cancel()


async def test_a_large_payload_goes_alone_on_any_byte_credit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = LinkConfig(window_bytes=4096)
    holder = Holder()
    async with trio.open_nursery() as nursery:
        pair = await link_pair(nursery, MemoryNetwork(seed=2), config, on_message=holder.on_message)
        pair.a.send_nowait(gossip(1, 10_000))
        pair.a.send_nowait(gossip(2, 10))
        await trio.sleep(1)
        assert len(holder.got) == 1, "the large one overdrew the byte window: the next waits"
        holder.process_all()
        await trio.sleep(1)
        assert len(holder.got) == 2
        nursery.cancel_scope.cancel()


async def test_a_congested_receiver_says_so_in_the_credit_it_grants(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The first hop of a flood learns that the next hop is congested (flow.py)."""
    sender, receiver = Pressure(hold=1.0), Pressure(hold=1.0)
    async with trio.open_nursery() as nursery:
        pair = await link_pair(
            nursery,
            MemoryNetwork(seed=3),
            LinkConfig(window_messages=4),  # a grant per payload processed
            pressure_a=sender,
            pressure_b=receiver,
        )
        pair.a.send_nowait(gossip(1))
        await trio.sleep(1)
        assert not sender.downstream_congested(excluding="x")  # b was not congested when it granted
        receiver.hold("an outbox", "link")
        pair.a.send_nowait(gossip(2))
        await trio.sleep(0.1)
        assert sender.downstream_congested(excluding="x")
        assert not sender.congested()  # a's own flag is untouched: it is not congested
        receiver.release("an outbox")
        await trio.sleep(1.5)
        pair.a.send_nowait(gossip(3))
        await trio.sleep(0.1)
        assert not sender.downstream_congested(excluding="x")
        nursery.cancel_scope.cancel()


async def test_a_peer_that_sends_payloads_beyond_its_credit_is_failed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The budget that stops one member from flooding an inbox: a raw peer ignoring credit."""
    net = MemoryNetwork(seed=3)
    config = LinkConfig(window_messages=16)
    holder = Holder()
    stats = NodeStats()
    reasons: list[str] = []

    async def serve(conn: Any) -> None:
        link = Link(
            conn,
            Peer("flooder", "mem://flooder"),
            role=Role.NODE,
            outbound=False,
            config=config,
            stats=stats,
            on_message=holder.on_message,
        )
        reasons.append(await link.run())

    async with trio.open_nursery() as nursery:
        await nursery.start(net.transport("victim").serve, "mem://victim", serve)
        async with net.transport("flooder").open_connection("mem://victim", timeout=5) as conn:
            # Within the window: accepted and held, as from any peer.
            await conn.send(encode_frame([gossip(n) for n in range(16)]))
            await trio.sleep(1)
            assert len(holder.got) == 16 and not reasons
            await conn.send(encode_frame([gossip(100)]))
            with trio.fail_after(5):
                await wait_until(lambda: bool(reasons))
        assert reasons == ["flow_violation"]
        assert stats.rejected["flow_violation"] == 1
        nursery.cancel_scope.cancel()


async def test_an_announcement_waits_behind_the_payloads_queued_before_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = LinkConfig(window_messages=2)
    holder = Holder()
    async with trio.open_nursery() as nursery:
        pair = await link_pair(nursery, MemoryNetwork(seed=4), config, on_message=holder.on_message)
        for n in range(4):
            pair.a.send_nowait(gossip(n))
        ihave = IHave.of([(MessageId("x", 9, 9), 2, "t")])
        pair.a.send_nowait(ihave)
        pair.a.send_nowait(Neighbor(True))  # control: first
        await trio.sleep(1)
        assert holder.got == [Neighbor(True), gossip(0), gossip(1)]
        holder.process_all()
        await trio.sleep(1)
        holder.process_all()
        await trio.sleep(1)
        assert holder.got[3:] == [gossip(2), gossip(3), ihave]
        nursery.cancel_scope.cancel()


async def test_a_payload_that_does_not_fit_is_refused_an_announcement_never(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = LinkConfig(window_messages=1, outbox_payload=3, outbox_high_items=2)
    holder = Holder()
    async with trio.open_nursery() as nursery:
        pair = await link_pair(nursery, MemoryNetwork(seed=5), config, on_message=holder.on_message)
        await trio.sleep(1)
        accepted = [pair.a.send_nowait(gossip(n)) for n in range(6)]
        # Queued in one go (the writer has not run): three fit, the rest are refused.
        assert accepted == [True, True, True, False, False, False]
        assert pair.a.send_nowait(IHave.of([(MessageId("x", 1, 1), 1, "t")]))
        assert pair.a_stats.drops == {}, "a refusal is the caller's to handle, not a drop"
        nursery.cancel_scope.cancel()


async def test_a_peer_that_reads_no_control_traffic_fails_its_link(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = LinkConfig(outbox_control=4)
    async with trio.open_nursery() as nursery:
        pair = await link_pair(nursery, MemoryNetwork(seed=6), config)
        results = [pair.a.send_nowait(Neighbor(True)) for _ in range(5)]
        assert results == [True, True, True, True, False]
        assert not pair.a.is_open and pair.a.close_reason == "outbox_full"
        assert pair.a_stats.drops == {"outbox_full:Neighbor": 1}
        nursery.cancel_scope.cancel()


async def test_a_congested_link_holds_the_pressure_and_bulk_senders_wait_for_room(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = LinkConfig(window_messages=1, outbox_high_items=2)
    pressure = Pressure()
    holder = Holder()
    async with trio.open_nursery() as nursery:
        pair = await link_pair(nursery, MemoryNetwork(seed=7), config, on_message=holder.on_message)
        pair.a._pressure = pressure  # the node's, as Node._new_link passes it
        await trio.sleep(1)
        for n in range(4):
            pair.a.send_nowait(gossip(n))
        await trio.sleep(0.1)
        assert pair.a.congested and pressure.holders() == {"link": 1}
        sent = trio.Event()

        async def bulk() -> None:
            await pair.a.send(gossip(99))
            sent.set()

        nursery.start_soon(bulk)
        await trio.testing.wait_all_tasks_blocked()
        assert not sent.is_set(), "a bulk sender never pushes a link past its mark"
        with trio.fail_after(5):
            while not sent.is_set():
                holder.process_all()
                await trio.sleep(0.1)
        with trio.fail_after(5):
            while pair.a.queued() or holder.held:
                holder.process_all()
                await trio.sleep(0.1)
        assert pressure.is_clear()
        nursery.cancel_scope.cancel()
