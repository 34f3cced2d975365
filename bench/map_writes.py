"""Replicated-map write throughput and put latency of a 10-node websocket cluster.

A script, not a test: ``.venv/bin/python bench/map_writes.py [--modes inproc,procs]
[--keys 10000] [--writers-per-node 1,8] [--stem _after] [--no-write]``. N nodes (10) on
127.0.0.1 over real websockets, in two modes: ``inproc``, every node in this process
(`open_local_cluster`: one Python thread, one core), and ``procs``, one OS process per node
(``python bench/map_writes.py --child``: it opens its node and the map, prints a ready
line, then obeys JSON commands on stdin and answers on stdout; every child is reaped with
deadlines, as in `cluster_nodes`). Both modes run the same measuring code (`Agent`), once
called directly, once through the pipes. One progress line per step goes to stderr, one
JSON document to stdout and to ``bench/results/map_writes_<date><stem>.json``.

Steps: first the raw websocket figure of this run (`cluster.websocket_ceiling`: 100-byte
frames over one connection pair, CPU of both ends per message). Then per mode, once the
active views are symmetric and connected (2 peers each) and warm-up rounds (3 puts from
every node, until a round causes no GRAFT and no duplicate and no view changed for 3 s):

* ``put_latency``: 200 puts from random nodes, 20 ms apart on an absolute schedule; per put
  the time from the call to the moment the last *other* node holds the value (its map's
  `Put` event), p50/p90/p99/max.
* ``writes`` (once per ``--writers-per-node`` K): every node writes ``keys // N`` distinct
  keys, split among K concurrent tasks, each as fast as ``put`` returns.
  ``writes_per_s_applied_on_every_node``: keys / (the moment the slowest node held all of
  them - the first put). ``cpu_us_per_write``: CPU over the phase per write (inproc: this
  whole process; procs: the sum of the children's), and ``cpu_ratio_to_raw_message``: that
  divided by the raw websocket CPU per message. ``rmr``: Plumtree's relative message
  redundancy over the phase, payloads received / (broadcasts (N - 1)) - 1, a broadcast
  being one delta. ``deltas_per_write``: delta broadcasts per write (below 1 when writes
  travel in batches; null on a library without the counter). ``peak_rss_kib``: VmHWM of
  each node's process (inproc: of this process). ``lost_keys``: keys some node still lacks
  30 s after the last put returned (must be 0).

Every time is `time.monotonic()` (on Linux one clock for every process, so a put's start
in one child and its arrival in another compare). Every wait has a deadline; a missed one
is reported (``complete: false``, ``lost_keys``), and a mode that fails is reported with
its error while the other still runs.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import random
import subprocess
import sys
import time
import traceback
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio
from cluster import websocket_ceiling
from cluster_nodes import (
    READY_TIMEOUT_S,
    ChildFailed,
    peak_rss_kib,
    quiet_logs,
    send_command,
    stop_children,
)
from common import json_lines, percentiles_ms, run_header, write_results
from map_figures import TREE_COUNTERS, value_of

from trio_replica.core.events import Lagged
from trio_replica.localcluster import open_local_cluster, views_ok
from trio_replica.node import Node, open_node
from trio_replica.ops.config_file import apply_settings, parse_set
from trio_replica.runtime.config import NodeConfig
from trio_replica.stores.maps import Put, ReplicatedMap

SEED = 20261130
NODES = 10
MAP = "writes"
MIN_ACTIVE = 2
KEYS = 10_000
WRITERS_PER_NODE = (1, 8)
PACE = 0.020
PACED_COUNT = 200
FORM_TIMEOUT_S = 60.0
#: Warm-up: puts per node per round; stop after a clean round once no view changed for
#: WARMUP_STEADY_S, or give up after WARMUP_MAX_S.
WARMUP_PUTS = 3
WARMUP_STEADY_S = 3.0
WARMUP_MAX_S = 30.0
#: Every node must hold every put of the latency phase this long after the last one.
LATENCY_TIMEOUT_S = 20.0
#: The writers' puts must all return within this time.
WRITE_TIMEOUT_S = 300.0
#: Keys some node lacks this long after the last put returned are lost.
LOST_DEADLINE_S = 30.0
#: A command's answer (beyond the wait the command itself asked for).
ANSWER_TIMEOUT_S = 30.0
#: Quiet period after a phase: IHAVE batches, grafts and prunes of it finish.
SETTLE_S = 2.0
SUBSCRIBER_BUFFER = 1_000_000
RESULTS = Path(__file__).resolve().parent / "results"
SCRIPT = Path(__file__).resolve()
#: The driver's counters read for each phase (getattr: older libraries lack some).
REPLICA_COUNTERS = ("deltas_sent", "updates_sent", "deltas_received")


def progress(message: str) -> None:
    print(f"[map_writes] {message}", file=sys.stderr, flush=True)


# --- one node's side: the same in both modes ------------------------------------------------


class Agent:
    """One node and its map: writes, and when each key of a phase arrived.

    Every method takes and returns plain data, so the harness calls it directly (inproc)
    or through a child's pipes (procs). Keys are ``<phase>:<rest>``; a `Put` event counts
    for its phase, and for the phases in `track` its time is kept per key.
    """

    def __init__(self, index: int, node: Node, the_map: ReplicatedMap) -> None:
        #: The node's place in the cluster (0 .. N - 1): the writes phase's keys name it.
        self.index = index
        self.node = node
        self.map = the_map
        self.counts: collections.Counter[str] = collections.Counter()
        self.targets: dict[str, int] = {}
        self.reached_at: dict[str, float] = {}
        self.reached: dict[str, trio.Event] = {}
        self.track: set[str] = set()
        self.starts: dict[str, float] = {}
        self.arrivals: dict[str, float] = {}
        self.lagged = 0

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with self.map.subscribe(buffer=SUBSCRIBER_BUFFER) as feed:
            task_status.started()
            async for event in feed:
                self._on(event)
                # Every queued event before yielding: one scheduler pass per batch.
                while True:
                    try:
                        event = feed.receive_nowait()
                    except trio.WouldBlock:
                        break
                    self._on(event)

    def _on(self, event: Any) -> None:
        if not isinstance(event, Put):
            if isinstance(event, Lagged):
                self.lagged += event.missed
            return
        key = event.key
        if not isinstance(key, str):
            return
        phase = key.partition(":")[0]
        self.counts[phase] += 1
        if phase in self.track:
            self.arrivals[key] = time.monotonic()
        target = self.targets.get(phase)
        if target is not None and self.counts[phase] >= target and phase not in self.reached_at:
            self.reached_at[phase] = time.monotonic()
            self.reached[phase].set()

    async def call(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        method = getattr(self, f"op_{op}", None)
        if method is None:
            raise ValueError(f"unknown command {op!r}")
        result: dict[str, Any] = await method(**args)
        return result

    async def op_expect(self, prefix: str, count: int, track: bool = False) -> dict[str, Any]:
        """From now on, note when this map first holds `count` keys of `prefix`."""
        self.targets[prefix] = count
        self.reached[prefix] = trio.Event()
        if track:
            self.track.add(prefix)
        if self.counts[prefix] >= count:
            self.reached_at[prefix] = time.monotonic()
            self.reached[prefix].set()
        return {}

    async def op_put(self, key: str, i: int) -> dict[str, Any]:
        self.starts[key] = time.monotonic()
        await self.map.put(key, value_of(i))
        return {}

    async def op_write(self, prefix: str, count: int, writers: int) -> dict[str, Any]:
        """Write `count` keys of `prefix` with `writers` tasks, each as fast as `put` returns."""
        calls: list[float] = []

        async def write(first: int) -> None:
            for i in range(first, count, writers):
                t = time.monotonic()
                await self.map.put(f"{prefix}:{self.index:02d}:{i:06d}", value_of(i))
                calls.append(time.monotonic() - t)

        start = time.monotonic()
        async with trio.open_nursery() as nursery:
            for first in range(writers):
                nursery.start_soon(write, first)
        return {"start": start, "end": time.monotonic(), "put_call": percentiles_ms(calls)}

    async def op_reached(self, prefix: str, wait_s: float) -> dict[str, Any]:
        """When this map first held the expected keys of `prefix` (None: not in `wait_s`)."""
        with trio.move_on_after(wait_s):
            await self.reached[prefix].wait()
        return {"at": self.reached_at.get(prefix), "count": self.counts[prefix]}

    async def op_times(self, prefix: str) -> dict[str, Any]:
        """Start times of the puts of `prefix` made here, and the arrival of each key here."""
        mine = prefix + ":"
        return {
            "starts": {k: t for k, t in self.starts.items() if k.startswith(mine)},
            "arrivals": {k: t for k, t in self.arrivals.items() if k.startswith(mine)},
        }

    async def op_missing(self, prefix: str, nodes: int, per_node: int) -> dict[str, Any]:
        """The keys of a writes phase this map lacks."""
        keys = (f"{prefix}:{w:02d}:{i:06d}" for w in range(nodes) for i in range(per_node))
        return {"missing": [k for k in keys if k not in self.map]}

    async def op_snapshot(self) -> dict[str, Any]:
        stats = self.node.stats()
        tree = {**stats["broadcast"], "frames_sent": stats["frames_sent"]}
        replica = self.map.replica.stats
        return {
            "tree": {name: tree[name] for name in TREE_COUNTERS},
            "replica": {name: getattr(replica, name, None) for name in REPLICA_COUNTERS},
            "drops": dict(stats["drops"]),
            "subscriber_lagged": self.lagged,
            "active": sorted(p.id for p in self.node.active_view()),
            "cpu": time.process_time(),
            "peak_rss_kib": peak_rss_kib(),
        }


# --- the cluster: agents in this process, or one child process each ---------------------------


@attrs.define
class Counters:
    """Counters summed over the nodes at one instant."""

    tree: collections.Counter[str]
    replica: dict[str, int | None]
    drops: collections.Counter[str]
    lagged: int
    views: dict[str, list[str]]
    cpu: float
    peak_rss_kib: list[int]

    @classmethod
    def of(cls, ids: Sequence[str], snaps: Sequence[dict[str, Any]]) -> Counters:
        tree: collections.Counter[str] = collections.Counter()
        drops: collections.Counter[str] = collections.Counter()
        replica: dict[str, int | None] = dict.fromkeys(REPLICA_COUNTERS, 0)
        for snap in snaps:
            tree.update(snap["tree"])
            drops.update(snap["drops"])
            for name, value in snap["replica"].items():
                current = replica[name]
                replica[name] = None if value is None or current is None else current + value
        return cls(
            tree=tree,
            replica=replica,
            drops=drops,
            lagged=sum(s["subscriber_lagged"] for s in snaps),
            views={i: s["active"] for i, s in zip(ids, snaps, strict=True)},
            cpu=sum(s["cpu"] for s in snaps),
            peak_rss_kib=[s["peak_rss_kib"] for s in snaps],
        )


class Cluster:
    """N nodes behind one interface: `call` a command on a node, `put` without waiting."""

    mode: str
    ids: list[str]

    @property
    def size(self) -> int:
        return len(self.ids)

    async def call(
        self, index: int, op: str, timeout: float = ANSWER_TIMEOUT_S, **args: Any
    ) -> dict[str, Any]:
        raise NotImplementedError

    async def put(self, index: int, key: str, i: int) -> None:
        raise NotImplementedError

    async def call_all(
        self, op: str, timeout: float = ANSWER_TIMEOUT_S, **args: Any
    ) -> list[dict[str, Any]]:
        answers: list[dict[str, Any]] = [{} for _ in range(self.size)]

        async def one(i: int) -> None:
            answers[i] = await self.call(i, op, timeout, **args)

        async with trio.open_nursery() as nursery:
            for i in range(self.size):
                nursery.start_soon(one, i)
        return answers

    async def counters(self) -> Counters:
        return Counters.of(self.ids, await self.call_all("snapshot"))


class InprocCluster(Cluster):
    mode = "inproc"

    def __init__(self, agents: list[Agent]) -> None:
        self.agents = agents
        self.ids = [a.node.id for a in agents]

    async def call(
        self, index: int, op: str, timeout: float = ANSWER_TIMEOUT_S, **args: Any
    ) -> dict[str, Any]:
        with trio.fail_after(timeout):
            return await self.agents[index].call(op, args)

    async def put(self, index: int, key: str, i: int) -> None:
        await self.agents[index].op_put(key, i)

    async def counters(self) -> Counters:
        counters = await super().counters()
        # One process: its CPU and peak RSS once, not once per node.
        counters.cpu = time.process_time()
        counters.peak_rss_kib = [peak_rss_kib()]
        return counters


#: ``--set KEY=VALUE`` settings of every node (both modes), as the CLI takes them.
SETTINGS: list[str] = []


def node_config(**fields: Any) -> NodeConfig:
    return apply_settings(NodeConfig(**fields), parse_set(SETTINGS))


@contextlib.asynccontextmanager
async def open_inproc(n: int) -> AsyncIterator[InprocCluster]:
    async with (
        open_local_cluster(n, prefix="w", base=node_config()) as nodes,
        trio.open_nursery() as nursery,
    ):
        agents = [Agent(i, node, await node.open_map(MAP)) for i, node in enumerate(nodes)]
        for agent in agents:
            await nursery.start(agent.serve)
        yield InprocCluster(agents)
        nursery.cancel_scope.cancel()


@attrs.define(eq=False)
class Child:
    """One node's process; answers are matched to commands by id."""

    name: str
    process: trio.Process
    pending: dict[int, trio.MemorySendChannel[dict[str, Any]]] = attrs.field(factory=dict)
    next_id: int = 0
    ended: bool = False
    id: str = ""
    address: str = ""

    async def send(self, command: dict[str, Any]) -> None:
        await send_command(self.name, self.process, command)

    async def ask(self, op: str, timeout: float, args: dict[str, Any]) -> dict[str, Any]:
        if self.ended:
            raise ChildFailed(f"{self.name}: exited before {op}")
        self.next_id += 1
        ident = self.next_id
        answer_in, answer = trio.open_memory_channel[dict[str, Any]](1)
        self.pending[ident] = answer_in
        try:
            await self.send({"op": op, "id": ident, **args})
            with trio.move_on_after(timeout):
                try:
                    reply = await answer.receive()
                except trio.EndOfChannel:
                    raise ChildFailed(f"{self.name}: exited while asked {op}") from None
                if "error" in reply:
                    raise ChildFailed(f"{self.name}: {op} failed: {reply['error']}")
                return reply
            raise ChildFailed(f"{self.name}: no answer to {op} in {timeout:g} s")
        finally:
            self.pending.pop(ident, None)


async def read_child(child: Child, ready: trio.Event, stdout: trio.abc.ReceiveStream) -> None:
    """Route the child's lines: the ready line, then answers by id; at EOF fail the askers."""
    try:
        async for item in json_lines(stdout):
            if "ready" in item:
                child.id, child.address = item["ready"]["id"], item["ready"]["address"]
                ready.set()
            elif (waiting := child.pending.get(item.get("id", -1))) is not None:
                waiting.send_nowait(item)
    finally:
        child.ended = True
        for waiting in child.pending.values():
            waiting.close()


class ProcsCluster(Cluster):
    mode = "procs"

    def __init__(self, children: list[Child]) -> None:
        self.children = children
        self.ids = [c.id for c in children]

    async def call(
        self, index: int, op: str, timeout: float = ANSWER_TIMEOUT_S, **args: Any
    ) -> dict[str, Any]:
        return await self.children[index].ask(op, timeout, args)

    async def put(self, index: int, key: str, i: int) -> None:
        # No answer: the child keeps the start time, `times` returns it.
        await self.children[index].send({"op": "put", "key": key, "i": i})


async def start_child(
    nursery: trio.Nursery, name: str, seed: str | None, children: list[Child]
) -> Child:
    argv = [sys.executable, str(SCRIPT), "--child", "--name", name]
    for setting in SETTINGS:
        argv += ["--set", setting]
    if seed:
        argv += ["--join", seed]
    # stderr is inherited: a child's traceback shows in the harness's output.
    process = await trio.lowlevel.open_process(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    child = Child(name, process)
    children.append(child)
    ready = trio.Event()
    assert process.stdout is not None
    nursery.start_soon(read_child, child, ready, process.stdout)
    with trio.move_on_after(READY_TIMEOUT_S):
        await ready.wait()
    if not ready.is_set():
        raise ChildFailed(f"{name}: not ready in {READY_TIMEOUT_S} s (exit {process.returncode})")
    return child


@contextlib.asynccontextmanager
async def open_procs(n: int) -> AsyncIterator[ProcsCluster]:
    """One child per node, the first one the seed of the others; every child reaped on the
    way out (quit, then kill after `QUIT_TIMEOUT_S`), also on failure or cancellation."""
    children: list[Child] = []
    async with trio.open_nursery() as nursery:
        try:
            first = await start_child(nursery, "p1", None, children)
            async with trio.open_nursery() as starting:
                for i in range(2, n + 1):
                    starting.start_soon(start_child, nursery, f"p{i}", first.address, children)
            children.sort(key=lambda c: int(c.name[1:]))
            yield ProcsCluster(children)
        finally:
            await stop_children(children)


# --- the child process ------------------------------------------------------------------------


async def child_main(index: int, name: str, seed: str | None) -> None:
    """Run one node and its map; obey the harness's commands until ``quit`` or EOF."""
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    stdout = trio.lowlevel.FdStream(os.dup(sys.stdout.fileno()))
    out_in, out = trio.open_memory_channel[bytes](10_000)

    def emit(item: dict[str, Any]) -> None:
        out_in.send_nowait(json.dumps(item).encode() + b"\n")

    async def write_out() -> None:
        async for line in out:
            await stdout.send_all(line)

    async def answer(agent: Agent, ident: int, op: str, args: dict[str, Any]) -> None:
        try:
            reply = await agent.call(op, args)
        except Exception as exc:
            traceback.print_exc()
            reply = {"error": repr(exc)}
        emit({"id": ident, **reply})

    config = node_config(name=name, seeds=(seed,) if seed else ())
    async with open_node(config) as node, trio.open_nursery() as nursery:
        agent = Agent(index, node, await node.open_map(MAP))
        nursery.start_soon(write_out)
        await nursery.start(agent.serve)
        emit({"ready": {"id": node.id, "address": node.address}})
        async for command in json_lines(stdin):
            op = command.pop("op")
            if op == "quit":
                break
            if op == "put":
                nursery.start_soon(agent.op_put, command["key"], command["i"])
            else:
                nursery.start_soon(answer, agent, command.pop("id"), op, command)
        nursery.cancel_scope.cancel()


# --- phases -----------------------------------------------------------------------------------


def traffic(before: Counters, after: Counters, writes: int, n: int) -> dict[str, Any]:
    delta: dict[str, Any] = {k: after.tree[k] - before.tree[k] for k in TREE_COUNTERS}
    broadcasts = delta["broadcasts"]
    delta["rmr"] = (
        round(delta["gossip_received"] / (broadcasts * (n - 1)) - 1, 4) if broadcasts else None
    )
    delta["broadcasts_per_write"] = round(broadcasts / writes, 4)
    delta["frames_per_write"] = round(delta["frames_sent"] / writes, 3)
    for name in REPLICA_COUNTERS:
        b, a = before.replica[name], after.replica[name]
        delta[name] = None if a is None or b is None else a - b
    sent = delta["deltas_sent"]
    delta["deltas_per_write"] = round(sent / writes, 4) if sent is not None else None
    delta["writes_per_delta"] = round(writes / sent, 1) if sent else None
    delta["drops"] = {k: v for k, v in (after.drops - before.drops).items() if v}
    delta["subscriber_lagged"] = after.lagged - before.lagged
    return delta


async def wait_formed(cluster: Cluster) -> dict[str, Any]:
    t0 = time.monotonic()
    formed = False
    with trio.move_on_after(FORM_TIMEOUT_S):
        while True:
            views = (await cluster.counters()).views
            if views_ok(views, min_active=MIN_ACTIVE):
                formed = True
                break
            await trio.sleep(0.05)
    return {"formed": formed, "formed_s": round(time.monotonic() - t0, 2)}


async def paced_puts(
    cluster: Cluster, rng: random.Random, prefix: str, count: int, pace: float
) -> dict[str, int]:
    """`count` puts of ``prefix:i`` from random nodes, `pace` apart on an absolute schedule
    (not caught up in a burst when late); which node wrote each key."""
    writers: dict[str, int] = {}
    start = trio.current_time()
    for i in range(count):
        await trio.sleep_until(start + i * pace)
        key = f"{prefix}:{i:05d}"
        writers[key] = w = rng.randrange(cluster.size)
        await cluster.put(w, key, i)
    return writers


async def warm_up(cluster: Cluster, rng: random.Random) -> dict[str, Any]:
    """Rounds of a few puts from every node until one causes no GRAFT and no duplicate, every
    node holds its keys, and no active view changed for `WARMUP_STEADY_S`."""
    n = cluster.size
    start = time.monotonic()
    rounds: list[dict[str, Any]] = []
    views = (await cluster.counters()).views
    changed_at = start
    steady = False
    while time.monotonic() - start < WARMUP_MAX_S:
        prefix = f"warm{len(rounds)}"
        count = WARMUP_PUTS * n
        await cluster.call_all("expect", prefix=prefix, count=count)
        before = await cluster.counters()
        await paced_puts(cluster, rng, prefix, count, PACE)
        reached = await cluster.call_all(
            "reached", timeout=10.0 + ANSWER_TIMEOUT_S, prefix=prefix, wait_s=10.0
        )
        await trio.sleep(1.0)
        after = await cluster.counters()
        now = time.monotonic()
        if after.views != views:
            views, changed_at = after.views, now
        grafts = after.tree["grafts_sent"] - before.tree["grafts_sent"]
        duplicates = after.tree["duplicates"] - before.tree["duplicates"]
        converged = all(r["at"] is not None for r in reached)
        rounds.append(
            {"grafts": grafts, "duplicates": duplicates, "converged": converged},
        )
        if converged and not grafts and not duplicates and now - changed_at >= WARMUP_STEADY_S:
            steady = True
            break
    return {
        "steady": steady,
        "seconds": round(time.monotonic() - start, 2),
        "rounds": rounds,
        "active_sizes": sorted(len(v) for v in views.values()),
    }


async def phase_put_latency(cluster: Cluster, rng: random.Random) -> dict[str, Any]:
    n, prefix, count = cluster.size, "lat", PACED_COUNT
    await cluster.call_all("expect", prefix=prefix, count=count, track=True)
    before = await cluster.counters()
    t0 = time.monotonic()
    writers = await paced_puts(cluster, rng, prefix, count, PACE)
    offered_s = time.monotonic() - t0
    reached = await cluster.call_all(
        "reached",
        timeout=LATENCY_TIMEOUT_S + ANSWER_TIMEOUT_S,
        prefix=prefix,
        wait_s=LATENCY_TIMEOUT_S,
    )
    after = await cluster.counters()
    times = await cluster.call_all("times", prefix=prefix)
    starts = {k: t for answer in times for k, t in answer["starts"].items()}
    latencies = []
    for key, w in writers.items():
        arrived = [times[j]["arrivals"].get(key) for j in range(n) if j != w]
        if key in starts and all(t is not None for t in arrived):
            latencies.append(max(t for t in arrived if t is not None) - starts[key])
    return {
        "puts": count,
        "pace_ms": PACE * 1e3,
        "achieved_puts_per_s": round(count / offered_s, 1),
        "complete": len(latencies),
        "every_node_held_all": all(r["at"] is not None for r in reached),
        "to_last_other_node": percentiles_ms(latencies),
        "over_100ms": sum(x > 0.1 for x in latencies),
        "traffic": traffic(before, after, count, n),
        "active_views_changed": before.views != after.views,
    }


async def phase_writes(
    cluster: Cluster, keys: int, writers: int, raw_cpu_us: float
) -> dict[str, Any]:
    n = cluster.size
    per_node = keys // n
    total = per_node * n
    prefix = f"w{writers}"
    await cluster.call_all("expect", prefix=prefix, count=total)
    before = await cluster.counters()
    done = await cluster.call_all(
        "write", timeout=WRITE_TIMEOUT_S, prefix=prefix, count=per_node, writers=writers
    )
    # The deadline counts from the last put's return: lost is what is still missing then.
    reached = await cluster.call_all(
        "reached", timeout=LOST_DEADLINE_S + ANSWER_TIMEOUT_S, prefix=prefix, wait_s=LOST_DEADLINE_S
    )
    after = await cluster.counters()
    missing = await cluster.call_all("missing", prefix=prefix, nodes=n, per_node=per_node)
    start = min(d["start"] for d in done)
    written = max(d["end"] for d in done)
    arrived = [r["at"] for r in reached]
    complete = all(t is not None for t in arrived)
    applied = max(t for t in arrived if t is not None) if complete else None
    cpu = after.cpu - before.cpu
    cpu_us = cpu / total * 1e6
    lost = set().union(*(m["missing"] for m in missing))
    wall = (applied if applied is not None else time.monotonic()) - start
    return {
        "writers_per_node": writers,
        "writers": writers * n,
        "keys": total,
        "complete": complete,
        "puts_returned_after_s": round(written - start, 3),
        "local_puts_per_s": round(total / (written - start)),
        "fully_replicated_after_s": round(applied - start, 3) if applied is not None else None,
        "writes_per_s_applied_on_every_node": (
            round(total / (applied - start), 1) if applied is not None else None
        ),
        "put_call_node0": done[0]["put_call"],
        "put_call_p99_ms_max_over_nodes": max(d["put_call"].get("p99_ms", 0) for d in done),
        "cpu_s": round(cpu, 3),
        "cpu_us_per_write": round(cpu_us, 1),
        "cpu_ratio_to_raw_message": round(cpu_us / raw_cpu_us, 1),
        "cpu_utilisation": round(cpu / max(wall, 1e-9), 3),
        "traffic": traffic(before, after, total, n),
        "peak_rss_kib": after.peak_rss_kib,
        "missing_entries": sum(len(m["missing"]) for m in missing),
        "lost_keys": len(lost),
        "lost_sample": sorted(lost)[:10],
        "active_views_changed": before.views != after.views,
    }


async def mode_run(
    mode: str, n: int, keys: int, writer_counts: Sequence[int], rng: random.Random, raw: float
) -> dict[str, Any]:
    opener = open_inproc if mode == "inproc" else open_procs
    out: dict[str, Any] = {"mode": mode, "nodes": n}
    t0 = time.monotonic()
    async with opener(n) as cluster:
        out["started_s"] = round(time.monotonic() - t0, 2)
        out["overlay"] = await wait_formed(cluster)
        progress(
            f"{mode}: {n} nodes started in {out['started_s']} s, overlay formed "
            f"{out['overlay']['formed']} after {out['overlay']['formed_s']} s"
        )
        warm = await warm_up(cluster, rng)
        out["warmup"] = warm
        progress(
            f"{mode}: warm-up steady {warm['steady']} after {warm['seconds']} s "
            f"({len(warm['rounds'])} rounds); active sizes {warm['active_sizes']}"
        )
        lat = await phase_put_latency(cluster, rng)
        out["put_latency"] = lat
        p = lat["to_last_other_node"]
        progress(
            f"{mode}: put to last other node p50 {p.get('p50_ms')} ms p99 {p.get('p99_ms')} ms "
            f"max {p.get('max_ms')} ms ({lat['complete']}/{lat['puts']} complete, "
            f"grafts {lat['traffic']['grafts_sent']})"
        )
        await trio.sleep(SETTLE_S)
        out["writes"] = []
        for writers in writer_counts:
            w = await phase_writes(cluster, keys, writers, raw)
            out["writes"].append(w)
            t = w["traffic"]
            progress(
                f"{mode}: {writers} writer(s)/node: {w['writes_per_s_applied_on_every_node']} "
                f"writes/s applied on every node ({w['local_puts_per_s']} local puts/s), "
                f"{w['cpu_us_per_write']} us CPU/write = {w['cpu_ratio_to_raw_message']}x raw; "
                f"rmr {t['rmr']}, deltas/write {t['deltas_per_write']}, lost {w['lost_keys']}"
            )
            await trio.sleep(SETTLE_S)
        final = await cluster.counters()
        out["peak_rss_kib"] = final.peak_rss_kib
        out["peak_rss_kib_max"] = max(final.peak_rss_kib)
        out["drops_total"] = dict(final.drops)
    out["total_s"] = round(time.monotonic() - t0, 1)
    return out


def leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


async def run(
    modes: Sequence[str], n: int, keys: int, writer_counts: Sequence[int], seed: int
) -> dict[str, Any]:
    rng = random.Random(seed)
    t0 = time.monotonic()
    ceiling = await websocket_ceiling()
    raw = ceiling["cpu_us_per_message"]
    progress(f"raw websocket: {ceiling['messages_per_s']} msg/s, {raw} us CPU per message")
    results: dict[str, Any] = {}
    for mode in modes:
        try:
            results[mode] = await mode_run(mode, n, keys, writer_counts, rng, raw)
        except* (ChildFailed, trio.TooSlowError) as group:
            # Nurseries wrap what failed in groups (a dead child fails every ask at once).
            errors = sorted({repr(exc) for exc in leaves(group)})
            progress(f"{mode}: FAILED: {'; '.join(errors)}")
            results[mode] = {"mode": mode, "error": errors}
    return {
        "nodes": n,
        "keys": keys,
        "writers_per_node": list(writer_counts),
        "seed": seed,
        "websocket_ceiling": ceiling,
        "modes": results,
        "total_s": round(time.monotonic() - t0, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--modes", default="inproc,procs", help="inproc, procs or both")
    parser.add_argument("--nodes", type=int, default=NODES)
    parser.add_argument("--keys", type=int, default=KEYS, help="keys of a writes phase, all nodes")
    parser.add_argument(
        "--writers-per-node",
        default=",".join(map(str, WRITERS_PER_NODE)),
        help="concurrent writer tasks per node; one writes phase per value (e.g. 1,8)",
    )
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--stem", default="", help="suffix of the results file name")
    parser.add_argument("--no-write", action="store_true", help="do not write the results file")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a node setting, as `python -m trio_replica node --set` takes it (repeatable)",
    )
    # The child side (started by the harness).
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    parser.add_argument("--join", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    SETTINGS[:] = args.set
    quiet_logs()
    if args.child:
        # Children are named p1 .. pN: the index in the writes phase's keys.
        trio.run(child_main, int(args.name[1:]) - 1, args.name, args.join)
        return
    modes = [m for m in args.modes.split(",") if m]
    if not modes or any(m not in ("inproc", "procs") for m in modes):
        parser.error("--modes: inproc, procs or both")
    writer_counts = [int(k) for k in args.writers_per_node.split(",") if k]
    if args.nodes < 2 or args.keys < args.nodes or any(k < 1 for k in writer_counts):
        parser.error("need --nodes >= 2, --keys >= --nodes and writers per node >= 1")
    figures = trio.run(run, modes, args.nodes, args.keys, writer_counts, args.seed)
    result = {**run_header("map_writes", settings=args.set), **figures}
    print(json.dumps(result, indent=2), flush=True)
    if not args.no_write:
        stem = RESULTS / f"map_writes_{result['date'][:10]}{args.stem}"
        for path in write_results(stem, result):
            progress(f"wrote {path}")


if __name__ == "__main__":
    main()
