"""The nodes of a benchmark cluster: all in this process (``inproc``) or one OS process each.

This module owns how ``bench/cluster.py`` starts, drives, reads and stops N nodes linked by
real websockets on 127.0.0.1, behind one interface (`Cluster`) so every measurement runs
unchanged in both modes:

* `open_inproc`: `open_local_cluster` in this process. All nodes share one Python thread
  and so one core; the CPU figure is this whole process's (nodes and the harness).
* `open_procs`: one child process per node (``python bench/cluster_nodes.py --child``),
  started by the harness with ``trio.open_process``. A child opens its node, then prints a
  ready line with its id and address: the harness waits for that line (with a deadline)
  instead of sleeping, starts the first node alone and the others with it as their seed.
  Commands go to the child's stdin and answers come back on its stdout, one JSON object per
  line; deliveries and broadcast start times come back the same way, unasked. Stopping
  sends ``quit`` to every child, waits for each with a deadline and kills what is left:
  every child is reaped, also when the harness is cancelled or fails. The CPU figure is
  the sum of the children's `time.process_time` (the harness is not counted) and each
  child reports its own peak RSS (VmHWM). ``probe`` asks a child how fast its node answers
  `status` and a metrics scrape, with its memory and flow counters.

Every time is `time.monotonic()`, which on Linux is one clock for all processes of the
machine, so a start time taken in one child and a delivery time taken in another compare.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import os
import resource
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import attrs
import trio
from common import TAG, json_lines, payload_of
from prometheus_client import generate_latest

from trio_replica.core.events import Delivery, DownReason, PeerDown
from trio_replica.core.wire import encode_payload
from trio_replica.localcluster import open_local_cluster
from trio_replica.node import Node, open_node
from trio_replica.ops.metrics import metrics_registry
from trio_replica.runtime.config import NodeConfig

#: A child must say it is ready within this time (imports, then opening its node).
READY_TIMEOUT_S = 60.0
#: A command's answer; a child that takes longer is reported as broken.
ANSWER_TIMEOUT_S = 30.0
#: How long `quit` may take (a graceful leave) before the child is killed.
QUIT_TIMEOUT_S = 10.0
#: Deliveries a node's subscriber may hold: the benchmark must never drop one.
SUBSCRIBER_BUFFER = 100_000
CHILD = Path(__file__).resolve()


class ChildFailed(RuntimeError):
    """A child process died, answered garbage, or did not answer in time."""


@attrs.define
class Counters:
    """Counters summed over the cluster's nodes at one instant."""

    messages: collections.Counter[str] = attrs.field(factory=collections.Counter)
    bytes: collections.Counter[str] = attrs.field(factory=collections.Counter)
    tree: collections.Counter[str] = attrs.field(factory=collections.Counter)
    frames: int = 0
    #: Links established, suspicions raised, and `PeerDown(FAILED)` events: every node of
    #: a benchmark cluster is alive, so each of those is a false failure.
    links_established: int = 0
    suspicions: int = 0
    false_failures: int = 0
    #: CPU seconds of the nodes (inproc: this process, harness included).
    cpu: float = 0.0
    #: Peak resident set size of each node's process, in KiB (inproc: one shared figure).
    peak_rss_kib: list[int] = attrs.field(factory=list)

    def add(self, stats: dict[str, Any]) -> None:
        self.messages.update(stats["messages_sent"])
        self.bytes.update(stats["bytes_sent"])
        self.frames += stats["frames_sent"]
        self.links_established += stats["links_established"]
        self.suspicions += stats["flow"].get("suspicions", 0)
        for name, value in stats["broadcast"].items():
            if isinstance(value, int):
                self.tree[name] += value


async def send_command(name: str, process: trio.Process, command: dict[str, Any]) -> None:
    """One JSON command line to a child's stdin; `ChildFailed` if the child is gone."""
    assert process.stdin is not None
    try:
        await process.stdin.send_all(json.dumps(command).encode() + b"\n")
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise ChildFailed(f"{name}: stdin closed ({exc})") from exc


class Sink(Protocol):
    """Where a cluster reports broadcast start times and deliveries (`bench/cluster.Watch`)."""

    def started(self, seq: int, at: float) -> None: ...

    def arrived(self, seq: int, at: float, hops: int) -> None: ...


class Cluster(Protocol):
    @property
    def mode(self) -> str: ...

    @property
    def size(self) -> int: ...

    async def broadcast(self, index: int, seqs: Sequence[int], payload_bytes: int) -> None:
        """Node `index` broadcasts `seqs` one after another, as fast as it can."""

    async def views(self) -> dict[str, set[str]]:
        """Every node's active view, as ids."""

    async def counters(self) -> Counters: ...

    async def set_flooding(self, on: bool) -> None:
        """Every node switches between Plumtree and flooding over its current links."""


def peak_rss_kib() -> int:
    """This process's peak resident set size, in KiB.

    VmHWM (Linux), not ``ru_maxrss``: resource usage survives ``execve``, so a child's
    ``ru_maxrss`` starts at its parent's RSS when it was forked (a harness that had held
    50 in-process nodes made every child report 100 MiB).
    """
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    # Elsewhere, the best there is (KiB on Linux and BSDs, bytes on macOS).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def rss_kib() -> int:
    """This process's resident set size now, in KiB (VmRSS; 0 where /proc is missing)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def probe(node: Node) -> dict[str, Any]:
    """How long the node takes to answer `status` (encoded, as the control path sends it)
    and a metrics scrape, with its memory and flow counters: is it still serving?"""
    t0 = time.perf_counter()
    status = encode_payload(node.status(), max_size=node.config.max_payload)
    t1 = time.perf_counter()
    metrics = generate_latest(metrics_registry(node))
    t2 = time.perf_counter()
    stats = node.stats()
    return {
        "status_ms": round((t1 - t0) * 1e3, 2),
        "status_bytes": len(status),
        "metrics_ms": round((t2 - t1) * 1e3, 2),
        "metrics_bytes": len(metrics),
        "rss_kib": rss_kib(),
        "peak_rss_kib": peak_rss_kib(),
        "links_closed": stats["links_closed"],
        "rejected": stats["rejected"],
        "drops": stats["drops"],
        "flow": stats["flow"],
        "cpu": time.process_time(),
    }


class FailureCount:
    """`PeerDown(FAILED)` events seen by the nodes it watches."""

    def __init__(self) -> None:
        self.failed = 0

    async def watch(
        self, node: Node, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with node.events() as events:
            task_status.started()
            async for event in events:
                if isinstance(event, PeerDown) and event.reason is DownReason.FAILED:
                    self.failed += 1


def counter_stats(stats: dict[str, Any]) -> dict[str, Any]:
    """The part of `node.stats()` that `Counters.add` reads."""
    keep = ("messages_sent", "bytes_sent", "frames_sent", "broadcast", "links_established")
    out = {k: stats[k] for k in keep}
    out["flow"] = {"suspicions": stats["flow"].get("suspicions", 0)}
    return out


def quiet_logs() -> None:
    # Every node warns that it listens on loopback only: expected here, noise.
    logging.getLogger("trio_replica").setLevel(logging.ERROR)


async def watch_node(
    node: Node,
    on_delivery: Callable[[int, float, int], None],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Call `on_delivery(seq, time, hops)` for each benchmark broadcast `node` delivers."""
    async with node.subscribe(TAG, buffer=SUBSCRIBER_BUFFER) as sub:
        task_status.started()
        async for item in sub:
            if isinstance(item, Delivery):
                on_delivery(item.payload["seq"], time.monotonic(), item.hops)


async def broadcast_from(
    node: Node, seqs: Sequence[int], payload_bytes: int, on_start: Callable[[int, float], None]
) -> None:
    payloads = [payload_of(seq, payload_bytes) for seq in seqs]
    for seq, payload in zip(seqs, payloads, strict=True):
        on_start(seq, time.monotonic())
        await node.broadcast(TAG, payload)


def set_node_flooding(node: Node, on: bool) -> None:
    # The benchmark reaches into the running Plumtree core: flooding is a baseline to
    # measure against, not a mode the node offers.
    node.runtime.broadcaster.core.set_prune(not on)


# --- inproc -------------------------------------------------------------------------------


@attrs.define
class InprocCluster:
    nodes: list[Node]
    sink: Sink
    nursery: trio.Nursery
    failures: FailureCount
    mode: str = "inproc"

    @property
    def size(self) -> int:
        return len(self.nodes)

    async def broadcast(self, index: int, seqs: Sequence[int], payload_bytes: int) -> None:
        await broadcast_from(self.nodes[index], seqs, payload_bytes, self.sink.started)

    async def views(self) -> dict[str, set[str]]:
        return {node.id: {p.id for p in node.active_view()} for node in self.nodes}

    async def counters(self) -> Counters:
        counters = Counters(cpu=time.process_time(), peak_rss_kib=[peak_rss_kib()])
        for node in self.nodes:
            counters.add(node.stats())
        counters.false_failures = self.failures.failed
        return counters

    async def set_flooding(self, on: bool) -> None:
        for node in self.nodes:
            set_node_flooding(node, on)


@contextlib.asynccontextmanager
async def open_inproc(n: int, sink: Sink) -> AsyncIterator[InprocCluster]:
    async with open_local_cluster(n) as nodes, trio.open_nursery() as nursery:
        failures = FailureCount()
        for node in nodes:
            await nursery.start(watch_node, node, sink.arrived)
            await nursery.start(failures.watch, node)
        yield InprocCluster(nodes, sink, nursery, failures)
        nursery.cancel_scope.cancel()


# --- procs: the harness side --------------------------------------------------------------


@attrs.define
class Child:
    """One node's process, its pipes, and the answers it owes."""

    name: str
    process: trio.Process
    answers_in: trio.MemorySendChannel[dict[str, Any]]
    answers: trio.MemoryReceiveChannel[dict[str, Any]]
    lock: trio.Lock = attrs.field(factory=trio.Lock)
    id: str = ""
    address: str = ""

    async def send(self, command: dict[str, Any]) -> None:
        await send_command(self.name, self.process, command)

    async def ask(self, command: dict[str, Any]) -> dict[str, Any]:
        async with self.lock:
            await self.send(command)
            with trio.move_on_after(ANSWER_TIMEOUT_S):
                try:
                    return await self.answers.receive()
                except trio.EndOfChannel:
                    raise ChildFailed(f"{self.name}: exited while asked {command}") from None
            raise ChildFailed(f"{self.name}: no answer to {command} in {ANSWER_TIMEOUT_S} s")


async def read_child(
    child: Child, sink: Sink, ready: trio.Event, stdout: trio.abc.ReceiveStream
) -> None:
    """Route the child's lines: ready, answers, start times and deliveries."""
    async with child.answers_in:
        async for item in json_lines(stdout):
            if "d" in item:
                sink.arrived(item["d"], item["t"], item["h"])
            elif "b" in item:
                sink.started(item["b"], item["t"])
            elif "ready" in item:
                child.id, child.address = item["ready"]["id"], item["ready"]["address"]
                ready.set()
            else:
                await child.answers_in.send(item)


@attrs.define
class ProcsCluster:
    children: list[Child]
    mode: str = "procs"

    @property
    def size(self) -> int:
        return len(self.children)

    async def broadcast(self, index: int, seqs: Sequence[int], payload_bytes: int) -> None:
        # Start times come back with the deliveries (the child takes them), not as an answer.
        await self.children[index].send(
            {"op": "broadcast", "seqs": list(seqs), "size": payload_bytes}
        )

    async def _ask_all(self, command: dict[str, Any]) -> list[dict[str, Any]]:
        answers: list[dict[str, Any]] = [{} for _ in self.children]

        async def ask(i: int) -> None:
            answers[i] = await self.children[i].ask(command)

        async with trio.open_nursery() as nursery:
            for i in range(len(self.children)):
                nursery.start_soon(ask, i)
        return answers

    async def views(self) -> dict[str, set[str]]:
        answers = await self._ask_all({"op": "views"})
        return {child.id: set(a["active"]) for child, a in zip(self.children, answers, strict=True)}

    async def counters(self) -> Counters:
        counters = Counters()
        for answer in await self._ask_all({"op": "counters"}):
            counters.add(answer["stats"])
            counters.false_failures += answer["false_failures"]
            counters.cpu += answer["cpu"]
            counters.peak_rss_kib.append(answer["peak_rss_kib"])
        return counters

    async def set_flooding(self, on: bool) -> None:
        await self._ask_all({"op": "flood", "on": on})


async def start_child(
    nursery: trio.Nursery, name: str, seed: str | None, sink: Sink, children: list[Child]
) -> Child:
    argv = [sys.executable, str(CHILD), "--child", "--name", name]
    if seed:
        argv += ["--seed", seed]
    # stderr is inherited: a child's traceback shows in the harness's output.
    process = await trio.lowlevel.open_process(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    answers_in, answers = trio.open_memory_channel[dict[str, Any]](16)
    child = Child(name, process, answers_in, answers)
    children.append(child)
    ready = trio.Event()
    assert process.stdout is not None
    nursery.start_soon(read_child, child, sink, ready, process.stdout)
    with trio.move_on_after(READY_TIMEOUT_S):
        await ready.wait()
    if not ready.is_set():
        raise ChildFailed(f"{name}: not ready in {READY_TIMEOUT_S} s (exit {process.returncode})")
    return child


async def stop_children(children: Sequence[Child]) -> None:
    """Ask every child to quit, wait with a deadline, kill the rest; reap them all."""
    with trio.CancelScope(shield=True):
        # One deadline for the polite part: a child that stopped reading its stdin could
        # block the quit's write as well as its exit.
        with trio.move_on_after(QUIT_TIMEOUT_S):
            for child in children:
                if child.process.returncode is None:
                    # A child whose stdin is closed has exited or is about to: it is
                    # waited for (and killed if need be) below either way.
                    with contextlib.suppress(ChildFailed):
                        await child.send({"op": "quit"})
            for child in children:
                await child.process.wait()
        for child in children:
            if child.process.returncode is None:
                child.process.kill()
            await child.process.wait()
            if child.process.stdin is not None:
                await child.process.stdin.aclose()


@contextlib.asynccontextmanager
async def open_procs(n: int, sink: Sink) -> AsyncIterator[ProcsCluster]:
    children: list[Child] = []
    async with trio.open_nursery() as nursery:
        try:
            first = await start_child(nursery, "n1", None, sink, children)
            async with trio.open_nursery() as starting:
                for i in range(2, n + 1):
                    starting.start_soon(
                        start_child, nursery, f"n{i}", first.address, sink, children
                    )
            # Children are listed in start order, which the concurrent starts scramble.
            children.sort(key=lambda c: int(c.name[1:]))
            yield ProcsCluster(children)
        finally:
            await stop_children(children)
        # The readers end at the children's EOF.


# --- procs: the child side ----------------------------------------------------------------


async def child_main(name: str, seed: str | None) -> None:
    """Run one node; answer the harness's commands on stdin until ``quit`` or EOF."""
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    stdout = trio.lowlevel.FdStream(os.dup(sys.stdout.fileno()))
    out_in, out = trio.open_memory_channel[bytes](SUBSCRIBER_BUFFER)

    def emit(item: dict[str, Any]) -> None:
        # Never blocks the node: the buffer is as large as the subscriber's.
        out_in.send_nowait(json.dumps(item).encode() + b"\n")

    async def write_out() -> None:
        # One write per batch of pending lines, not one per line.
        async for line in out:
            lines = [line]
            while True:
                try:
                    lines.append(out.receive_nowait())
                except trio.WouldBlock:
                    break
            await stdout.send_all(b"".join(lines))

    config = NodeConfig(name=name, seeds=(seed,) if seed else ())
    failures = FailureCount()
    async with open_node(config) as node, trio.open_nursery() as nursery:
        nursery.start_soon(write_out)
        await nursery.start(failures.watch, node)
        await nursery.start(
            watch_node, node, lambda seq, at, hops: emit({"d": seq, "t": at, "h": hops})
        )
        emit({"ready": {"id": node.id, "address": node.address}})
        async for command in json_lines(stdin):
            op = command["op"]
            if op == "broadcast":
                nursery.start_soon(
                    broadcast_from,
                    node,
                    command["seqs"],
                    command["size"],
                    lambda seq, at: emit({"b": seq, "t": at}),
                )
            elif op == "views":
                emit({"active": [p.id for p in node.active_view()]})
            elif op == "counters":
                emit(
                    {
                        "stats": counter_stats(node.stats()),
                        "false_failures": failures.failed,
                        "cpu": time.process_time(),
                        "peak_rss_kib": peak_rss_kib(),
                    }
                )
            elif op == "flood":
                set_node_flooding(node, command["on"])
                emit({"ok": True})
            elif op == "probe":
                emit(probe(node))
            elif op == "quit":
                break
            else:
                raise ValueError(f"unknown command {command!r}")
        nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description="one benchmark node (run by bench/cluster.py)")
    parser.add_argument("--child", action="store_true", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--seed")
    args = parser.parse_args()
    quiet_logs()
    trio.run(child_main, args.name, args.seed)


if __name__ == "__main__":
    main()
