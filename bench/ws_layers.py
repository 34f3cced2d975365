"""The websocket layers side by side: what one frame costs in each (issue 19).

A script, not a test: ``.venv/bin/python bench/ws_layers.py [--repeats 3] [--seconds 2]
[--label after] [--no-write]``. Over 127.0.0.1, one connection pair in this one process, a
client sends and a reader task on the server side receives, through three layers:

* ``trio_websocket``: the library itself (`wrap_client_stream`, `serve_websocket`,
  `send_message` / `get_message`), with the settings our transport gives it (one queued
  message, 64 KiB reads): its background reader task, memory channel and send lock.
* ``bare_wsproto``: a minimal wsproto connection over the Trio stream: `receive` reads the
  socket and feeds wsproto in the caller's task, `send` writes wsproto's bytes directly.
* ``transport``: `transports.websocket.WebsocketTransport`, whatever it is built on today.

Workloads, as in bench/cluster.py's ``websocket_ceiling`` and ``websocket_paced`` steps
(a short unmeasured burst first): 100-byte frames back to back for ``--seconds``; the same
paced at one frame per millisecond (each frame wakes both ends on its own); 1,000 frames of
60 KiB back to back. Per run: messages per second and the process's CPU (both ends, from
`time.process_time`) per message. The layers take turns within each repeat, so background
load hits them alike; medians (and the least CPU) over the repeats are reported, every run
is kept. Apart, in a pass of its own with a Trio instrument installed: Trio task steps and
scheduler I/O waits per message (both ends and the harness), which background load does
not change (paced CPU figures on a shared machine swing by half between runs). One JSON
document goes to stdout and to ``bench/results/ws_layers_<date>[_<label>].json``.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import trio
import trio_websocket
from common import run_header
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection as WsprotoConnection
from wsproto.events import AcceptConnection, BytesMessage, Request

from trio_replica.transports.base import Connection
from trio_replica.transports.websocket import WebsocketTransport

SECONDS = 2.0
SMALL = 100
PACE = 0.001
LARGE = 60 * 1024
LARGE_COUNT = 1000
REPEATS = 3
READ = 64 * 1024
MAX_MESSAGE = 1 << 20
RESULTS = Path(__file__).resolve().parent / "results"

Send = Callable[[bytes], Awaitable[None]]
Receive = Callable[[], Awaitable[Any]]
OpenPair = Callable[[], AbstractAsyncContextManager[tuple[Send, Receive]]]


def progress(message: str) -> None:
    print(f"[ws_layers] {message}", file=sys.stderr, flush=True)


# --- the layers: each yields (client send, server receive) ---------------------------------


@asynccontextmanager
async def trio_websocket_pair() -> AsyncIterator[tuple[Send, Receive]]:
    accepted: trio.MemorySendChannel[trio_websocket.WebSocketConnection]
    accepted, arrivals = trio.open_memory_channel(1)

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        await accepted.send(await request.accept())
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            functools.partial(
                trio_websocket.serve_websocket,
                message_queue_size=1,
                max_message_size=MAX_MESSAGE,
                receive_buffer_size=READ,
            ),
            handler,
            "127.0.0.1",
            0,
            None,
        )
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        client = await trio_websocket.wrap_client_stream(
            nursery,
            stream,
            f"127.0.0.1:{server.port}",
            "/",
            message_queue_size=1,
            max_message_size=MAX_MESSAGE,
            receive_buffer_size=READ,
        )
        ws = await arrivals.receive()
        yield client.send_message, ws.get_message
        nursery.cancel_scope.cancel()


class BareWebsocket:
    """The least a websocket connection can be over wsproto: no reader task, no channel,
    no lock; messages parsed from one read wait in a deque for the next `receive`."""

    def __init__(self, stream: trio.SocketStream, ws: WsprotoConnection) -> None:
        self._stream = stream
        self._ws = ws
        self._ready: collections.deque[bytes] = collections.deque()
        self._parts: list[bytes | bytearray] = []

    async def send(self, message: bytes) -> None:
        await self._stream.send_all(self._ws.send(BytesMessage(data=message)))

    async def receive(self) -> bytes:
        while not self._ready:
            data = await self._stream.receive_some(READ)
            if not data:
                raise EOFError
            self._ws.receive_data(data)
            for event in self._ws.events():
                if isinstance(event, BytesMessage):
                    self._parts.append(event.data)
                    if event.message_finished:
                        self._ready.append(b"".join(self._parts))
                        self._parts.clear()
        await trio.lowlevel.checkpoint_if_cancelled()
        return self._ready.popleft()


async def _upgrade(stream: trio.SocketStream, ws: WSConnection, want: type) -> WsprotoConnection:
    while True:
        for event in ws.events():
            if isinstance(event, Request):
                await stream.send_all(ws.send(AcceptConnection()))
            if isinstance(event, want) and ws.connection is not None:
                return ws.connection
        data = await stream.receive_some(READ)
        if not data:
            raise EOFError("closed during the upgrade")
        ws.receive_data(data)


@asynccontextmanager
async def bare_wsproto_pair() -> AsyncIterator[tuple[Send, Receive]]:
    accepted: trio.MemorySendChannel[BareWebsocket]
    accepted, arrivals = trio.open_memory_channel(1)

    async def on_stream(stream: trio.SocketStream) -> None:
        ws = await _upgrade(stream, WSConnection(ConnectionType.SERVER), Request)
        await accepted.send(BareWebsocket(stream, ws))
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, host="127.0.0.1"), on_stream, 0
        )
        port = listeners[0].socket.getsockname()[1]
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        client_ws = WSConnection(ConnectionType.CLIENT)
        await stream.send_all(client_ws.send(Request(host=f"127.0.0.1:{port}", target="/")))
        client = BareWebsocket(stream, await _upgrade(stream, client_ws, AcceptConnection))
        server = await arrivals.receive()
        yield client.send, server.receive
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def transport_pair() -> AsyncIterator[tuple[Send, Receive]]:
    # Nobody reads once a run is over, so each close waits out its disconnect timeout.
    transport = WebsocketTransport(max_frame=MAX_MESSAGE, disconnect_timeout=0.2)
    accepted: trio.MemorySendChannel[Connection]
    accepted, arrivals = trio.open_memory_channel(1)

    async def handler(conn: Connection) -> None:
        await accepted.send(conn)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        address = await nursery.start(transport.serve, "ws://127.0.0.1:0", handler)
        async with transport.open_connection(address, timeout=5.0) as client:
            server = await arrivals.receive()
            yield client.send, server.receive
        nursery.cancel_scope.cancel()


LAYERS: dict[str, OpenPair] = {
    "trio_websocket": trio_websocket_pair,
    "bare_wsproto": bare_wsproto_pair,
    "transport": transport_pair,
}


# --- one measurement ------------------------------------------------------------------------


class StepCounter(trio.abc.Instrument):
    """Trio task steps (a task resumed once by the scheduler), all tasks of the process,
    and the scheduler's passes through its I/O wait (one epoll call each)."""

    def __init__(self) -> None:
        self.steps = 0
        self.io_waits = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1

    def after_io_wait(self, timeout: float) -> None:
        self.io_waits += 1


async def measure(
    open_pair: OpenPair,
    size: int,
    *,
    seconds: float | None = None,
    count: int | None = None,
    pace: float | None = None,
    counter: StepCounter | None = None,
) -> dict[str, Any]:
    """Send frames of `size` bytes for `seconds` (or `count` of them), back to back or one
    every `pace` seconds, until the reader has them all; rate and CPU per message, and
    with `counter` (installed as an instrument) task steps per message."""
    frame = b"x" * size
    received = 0
    target = -1
    all_received = trio.Event()

    async def reader(receive: Receive) -> None:
        nonlocal received
        while True:
            await receive()
            received += 1
            if received == target:
                all_received.set()

    async def wait_for(sent: int) -> None:
        nonlocal target
        target = sent
        if received >= sent:
            return
        with trio.move_on_after(10):
            await all_received.wait()

    async with open_pair() as (send, receive), trio.open_nursery() as nursery:
        nursery.start_soon(reader, receive)
        # A short unmeasured burst: the first frames pay for imports and buffer growth.
        warm = 200 if size < 4096 else 20
        for _ in range(warm):
            await send(frame)
        await wait_for(warm)
        received, target, all_received = 0, -1, trio.Event()
        sent = 0
        steps0 = counter.steps if counter is not None else 0
        waits0 = counter.io_waits if counter is not None else 0
        cpu0, t0 = time.process_time(), trio.current_time()
        deadline = t0 + seconds if seconds is not None else None
        while (deadline is None or trio.current_time() < deadline) and (
            count is None or sent < count
        ):
            if pace is not None:
                await trio.sleep_until(t0 + sent * pace)
            await send(frame)
            sent += 1
        await wait_for(sent)
        wall, cpu = trio.current_time() - t0, time.process_time() - cpu0
        counted = {}
        if counter is not None:
            counted = {
                "task_steps_per_message": round((counter.steps - steps0) / received, 2),
                "io_waits_per_message": round((counter.io_waits - waits0) / received, 2),
            }
        nursery.cancel_scope.cancel()
    return {
        **counted,
        "messages": sent,
        "received": received,
        "seconds": round(wall, 3),
        "messages_per_s": round(received / wall),
        "cpu_us_per_message": round(cpu / max(received, 1) * 1e6, 2),
        "cpu_utilisation": round(cpu / wall, 3),
    }


WORKLOADS: dict[str, dict[str, Any]] = {
    "back_to_back_100B": {"size": SMALL},
    "paced_1ms_100B": {"size": SMALL, "pace": PACE},
    "large_60KiB": {"size": LARGE, "count": LARGE_COUNT},
}
#: Frames of the task-step count, a pass of its own (the instrument costs CPU per step).
STEP_COUNTS = {"back_to_back_100B": 5000, "paced_1ms_100B": 500, "large_60KiB": 200}


async def run(repeats: int, seconds: float) -> dict[str, Any]:
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        w: {layer: [] for layer in LAYERS} for w in WORKLOADS
    }
    for repeat in range(repeats):
        for workload, params in WORKLOADS.items():
            for layer, open_pair in LAYERS.items():
                kwargs = dict(params)
                if "count" not in kwargs:
                    kwargs["seconds"] = seconds
                result = await measure(open_pair, **kwargs)
                runs[workload][layer].append(result)
                progress(
                    f"{repeat + 1}/{repeats} {workload:18} {layer:15}"
                    f" {result['messages_per_s']:>8} msg/s"
                    f" {result['cpu_us_per_message']:>8} us CPU/msg"
                )
    # Task steps are the same on every run (no clock in them): counted once, apart.
    counter = StepCounter()
    trio.lowlevel.add_instrument(counter)
    try:
        steps = {
            workload: {
                layer: await measure(
                    open_pair, **{**params, "count": STEP_COUNTS[workload]}, counter=counter
                )
                for layer, open_pair in LAYERS.items()
            }
            for workload, params in WORKLOADS.items()
        }
    finally:
        trio.lowlevel.remove_instrument(counter)
    for workload, tallies in steps.items():
        progress(
            f"{workload:18} task steps / I/O waits per message: "
            + ", ".join(
                f"{layer} {r['task_steps_per_message']} / {r['io_waits_per_message']}"
                for layer, r in tallies.items()
            )
        )
    medians: dict[str, dict[str, dict[str, float]]] = {}
    for workload, by_layer in runs.items():
        medians[workload] = {
            layer: {
                key: statistics.median(r[key] for r in results)
                for key in ("messages_per_s", "cpu_us_per_message", "cpu_utilisation")
            }
            for layer, results in by_layer.items()
        }
        base = medians[workload]["trio_websocket"]["cpu_us_per_message"]
        for layer, figures in medians[workload].items():
            # The least CPU of the repeats: what background load cannot have added to.
            figures["cpu_us_per_message_min"] = min(
                r["cpu_us_per_message"] for r in runs[workload][layer]
            )
            figures["trio_websocket_cpu_ratio"] = round(base / figures["cpu_us_per_message"], 2)
            figures["task_steps_per_message"] = steps[workload][layer]["task_steps_per_message"]
            figures["io_waits_per_message"] = steps[workload][layer]["io_waits_per_message"]
    return {"medians": medians, "runs": runs}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--seconds", type=float, default=SECONDS, help="per small-frame run")
    parser.add_argument("--label", default="", help="appended to the result file's name")
    parser.add_argument("--no-write", action="store_true", help="write no file")
    args = parser.parse_args(argv)
    figures = trio.run(run, args.repeats, args.seconds)
    result = {
        **run_header(
            "ws_layers",
            repeats=args.repeats,
            seconds=args.seconds,
            label=args.label,
            versions={"trio": trio.__version__, "trio_websocket": trio_websocket.__version__},
        ),
        **figures,
    }
    text = json.dumps(result, indent=1)
    print(text, flush=True)
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        suffix = f"_{args.label}" if args.label else ""
        path = RESULTS / f"ws_layers_{result['date'][:10]}{suffix}.json"
        path.write_text(text + "\n")
        progress(f"wrote {path.name}")


if __name__ == "__main__":
    main()
