"""CPU per message through one `Link` pair, beside the raw websocket figure of the same run.

A script, not a test: ``.venv/bin/python bench/profile_link.py [--seconds 2] [--burst 1]``.
It isolates the link layer (outbox, writer, reader, wire codec, stats) from the protocol
components: two `Link` objects over one websocket connection on 127.0.0.1, the dialing side
queues 100-byte `Gossip` messages with `send_nowait`, the other side's message handler
counts them. With ``--burst 1`` the sender waits for each message to arrive before queueing
the next (one frame per message, a wake-up of every task each time: the shape of a paced
broadcast); with a larger burst it queues that many at once (the writer batches them into
frames). The raw figure is ``bench/cluster.py``'s ceiling: 100-byte frames through
`WebsocketConnection.send` / `receive` as fast as send returns; the lockstep raw figure
waits for each frame to arrive before sending the next, like ``--bursts 1``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any

import trio

from trio_replica.core.messages import Gossip, Message, MessageId, Peer
from trio_replica.runtime.link import Link
from trio_replica.runtime.linkconfig import LinkConfig
from trio_replica.runtime.stats import NodeStats
from trio_replica.transports.base import Connection, TransportClosed
from trio_replica.transports.websocket import WebsocketTransport


def progress(message: str) -> None:
    print(f"[profile_link] {message}", file=sys.stderr, flush=True)


async def raw(seconds: float, lockstep: bool = False) -> dict[str, Any]:
    """The raw figure; with `lockstep`, each frame waits until the previous one arrived."""
    transport = WebsocketTransport()
    frame = b"x" * 100
    received = 0
    arrived = trio.Event()

    async def handler(conn: Connection) -> None:
        nonlocal received
        try:
            while True:
                await conn.receive()
                received += 1
                arrived.set()
        except TransportClosed:
            return

    async with trio.open_nursery() as nursery:
        address = await nursery.start(transport.serve, "ws://127.0.0.1:0", handler)
        async with transport.open_connection(address, timeout=5.0) as conn:
            for _ in range(200):
                await conn.send(frame)
            sent, received = 0, 0
            cpu0, t0 = time.process_time(), trio.current_time()
            while trio.current_time() < t0 + seconds:
                if lockstep:
                    arrived = trio.Event()
                await conn.send(frame)
                sent += 1
                if lockstep:
                    await arrived.wait()
            while received < sent:  # noqa: ASYNC110
                await trio.sleep(0.001)
            cpu, wall = time.process_time() - cpu0, trio.current_time() - t0
        nursery.cancel_scope.cancel()
    return {"messages": sent, "cpu_us_per_message": round(cpu / sent * 1e6, 2), "seconds": wall}


async def through_links(seconds: float, burst: int) -> dict[str, Any]:
    transport = WebsocketTransport()
    config = LinkConfig()
    received = 0
    arrived = trio.Event()
    server_link: list[Link] = []

    async def on_message(_link: Link, _message: Message, _size: int) -> None:
        nonlocal received, arrived
        received += 1
        arrived.set()

    async def handler(conn: Connection) -> None:
        link = Link(
            conn,
            Peer("a", "ws://127.0.0.1:1"),
            role="node",
            outbound=False,
            config=config,
            stats=NodeStats(),
            on_message=on_message,
        )
        server_link.append(link)
        await link.run()

    payload = b"x" * 100
    async with trio.open_nursery() as nursery:
        address = await nursery.start(transport.serve, "ws://127.0.0.1:0", handler)
        async with transport.open_connection(address, timeout=5.0) as conn:
            stats = NodeStats()
            link = Link(
                conn,
                Peer("b", address),
                role="node",
                outbound=True,
                config=config,
                stats=stats,
                on_message=on_message,
            )
            nursery.start_soon(link.run)
            seq = 0

            async def send_burst() -> None:
                nonlocal seq, arrived
                target = received + burst
                for _ in range(burst):
                    seq += 1
                    link.send_nowait(Gossip(MessageId("a", seq, seq), 1, "t", payload))
                while received < target:
                    arrived = trio.Event()
                    await arrived.wait()

            for _ in range(200 // burst + 1):
                await send_burst()
            start_received, frames0 = received, stats.frames_sent
            cpu0, t0 = time.process_time(), trio.current_time()
            while trio.current_time() < t0 + seconds:
                await send_burst()
            cpu, wall = time.process_time() - cpu0, trio.current_time() - t0
            count = received - start_received
            frames = stats.frames_sent - frames0
            link.fail("done")
        nursery.cancel_scope.cancel()
    return {
        "burst": burst,
        "messages": count,
        "frames": frames,
        "cpu_us_per_message": round(cpu / count * 1e6, 2),
        "cpu_us_per_frame": round(cpu / max(frames, 1) * 1e6, 2),
        "seconds": wall,
    }


async def run(seconds: float, bursts: list[int]) -> dict[str, Any]:
    ceiling = await raw(seconds)
    progress(f"raw websocket: {ceiling['cpu_us_per_message']} us CPU per message")
    lockstep = await raw(seconds, lockstep=True)
    progress(f"raw websocket in lockstep: {lockstep['cpu_us_per_message']} us CPU per message")
    out: dict[str, Any] = {"raw": ceiling, "raw_lockstep": lockstep, "links": []}
    for burst in bursts:
        figure = await through_links(seconds, burst)
        figure["over_raw"] = round(figure["cpu_us_per_message"] / ceiling["cpu_us_per_message"], 2)
        progress(
            f"links, burst {burst}: {figure['cpu_us_per_message']} us CPU per message "
            f"({figure['over_raw']}x raw), {figure['cpu_us_per_frame']} us per frame"
        )
        out["links"].append(figure)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--bursts", type=lambda s: [int(x) for x in s.split(",")], default=[1, 10])
    args = parser.parse_args(argv)
    logging.getLogger("trio_replica").setLevel(logging.ERROR)
    print(json.dumps(trio.run(run, args.seconds, args.bursts), indent=2))


if __name__ == "__main__":
    main()
