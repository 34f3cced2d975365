"""CPU per Plumtree delivery of an in-process cluster, for profiling the hot paths.

A script, not a test: ``.venv/bin/python bench/profile_broadcast.py [--nodes 25]
[--seconds 10] [--pace-ms 20] [--cprofile FILE] [--pause]``. It opens `open_local_cluster`
(every node in this process, real websockets on 127.0.0.1), waits for views, warms the tree
up, then broadcasts 100-byte payloads from random nodes on an absolute schedule for
`--seconds` and reports process CPU (`time.process_time`) per delivery, frames and messages
per delivery by kind, and the idle CPU rate measured just before (the figure of
``bench/cluster.py``'s ``plumtree_paced`` phase, over a longer window so that a sampling
profiler sees enough of it).

``--pause`` prints the process id and waits 3 s before the measured window, so that
``py-spy record -p PID -d SECONDS -f raw`` can be attached to exactly that window;
``--cprofile FILE`` runs the window under cProfile instead. ``--steps`` counts Trio task
steps per delivery (an instrument, which costs CPU of its own); ``--ihave-window`` sets
Plumtree's ``ihave_batch_window`` on every node.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import json
import logging
import os
import random
import sys
import time
from collections.abc import Sequence
from typing import Any

import attrs
import trio

from trio_replica.core.events import Delivery
from trio_replica.localcluster import open_local_cluster, wait_for_views
from trio_replica.node import Node
from trio_replica.runtime.config import NodeConfig

TAG = "profile"
WARMUP_S = 3.0
TAIL_S = 1.0


def progress(message: str) -> None:
    print(f"[profile_broadcast] {message}", file=sys.stderr, flush=True)


class StepCounter(trio.abc.Instrument):
    """Task steps by task function, and scheduler waits for I/O or a timeout."""

    def __init__(self) -> None:
        self.steps: collections.Counter[str] = collections.Counter()
        self.io_waits = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps[task.name.rsplit(".", 1)[-1]] += 1

    def before_io_wait(self, timeout: float) -> None:
        self.io_waits += 1


def sent(nodes: Sequence[Node]) -> tuple[collections.Counter[str], int]:
    kinds: collections.Counter[str] = collections.Counter()
    frames = 0
    for node in nodes:
        stats = node.stats()
        kinds.update(stats["messages_sent"])
        frames += stats["frames_sent"]
    return kinds, frames


async def paced(nodes: Sequence[Node], seconds: float, pace: float, rng: random.Random) -> int:
    count = int(seconds / pace)
    start = trio.current_time()
    for i in range(count):
        await trio.sleep_until(start + i * pace)
        await nodes[rng.randrange(len(nodes))].broadcast(TAG, {"i": i, "pad": b"x" * 88})
    return count


async def measure(
    n: int,
    seconds: float,
    pace: float,
    profile: cProfile.Profile | None,
    pause: bool,
    count_steps: bool,
    ihave_window: float | None,
) -> dict[str, Any]:
    rng = random.Random(7)
    delivered = 0

    async def count_deliveries(node: Node, task_status: trio.TaskStatus[None]) -> None:
        nonlocal delivered
        async with node.subscribe(TAG, buffer=1_000_000) as sub:
            task_status.started()
            async for item in sub:
                if isinstance(item, Delivery):
                    delivered += 1

    base = NodeConfig()
    if ihave_window is not None:
        base = attrs.evolve(
            base, broadcast=attrs.evolve(base.broadcast, ihave_batch_window=ihave_window)
        )
    async with open_local_cluster(n, base=base) as nodes, trio.open_nursery() as nursery:
        with trio.fail_after(60):
            await wait_for_views(nodes, min_active=2)
        for node in nodes:
            await nursery.start(count_deliveries, node)
        await paced(nodes, WARMUP_S, pace, rng)
        await trio.sleep(TAIL_S)
        idle0, idle_t0 = time.process_time(), trio.current_time()
        await trio.sleep(1.0)
        idle_rate = (time.process_time() - idle0) / (trio.current_time() - idle_t0)
        if pause:
            progress(f"pid {os.getpid()}: measuring in 3 s for {seconds + TAIL_S:.0f} s")
            await trio.sleep(3.0)
        kinds0, frames0 = sent(nodes)
        delivered = 0
        steps = StepCounter()
        if count_steps:
            trio.lowlevel.add_instrument(steps)
        cpu0, t0 = time.process_time(), trio.current_time()
        if profile is not None:
            profile.enable()
        count = await paced(nodes, seconds, pace, rng)
        await trio.sleep(TAIL_S)
        if profile is not None:
            profile.disable()
        cpu, wall = time.process_time() - cpu0, trio.current_time() - t0
        if count_steps:
            trio.lowlevel.remove_instrument(steps)
        kinds1, frames1 = sent(nodes)
        nursery.cancel_scope.cancel()
    per = max(delivered, 1)
    return {
        "nodes": n,
        "broadcasts": count,
        "deliveries": delivered,
        "expected": count * (n - 1),
        "cpu_us_per_delivery": round(cpu / per * 1e6, 1),
        "cpu_us_per_delivery_net_of_idle": round((cpu - idle_rate * wall) / per * 1e6, 1),
        "idle_cpu_utilisation": round(idle_rate, 4),
        "cpu_utilisation": round(cpu / wall, 3),
        "frames_per_delivery": round((frames1 - frames0) / per, 3),
        "ihave_batch_window": base.broadcast.ihave_batch_window,
        "task_steps_per_delivery": round(sum(steps.steps.values()) / per, 2),
        "scheduler_waits_per_delivery": round(steps.io_waits / per, 2),
        "steps_per_delivery_by_task": {
            name: round(count / per, 2) for name, count in steps.steps.most_common(10)
        },
        "messages_per_delivery": {
            k: round((kinds1[k] - kinds0[k]) / per, 3)
            for k in sorted(kinds1)
            if kinds1[k] - kinds0[k]
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--nodes", type=int, default=25)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--pace-ms", type=float, default=20.0)
    parser.add_argument("--cprofile", default=None, help="write cProfile stats here")
    parser.add_argument("--pause", action="store_true", help="wait 3 s to attach py-spy")
    parser.add_argument(
        "--steps", action="store_true", help="count task steps (an instrument: costs CPU)"
    )
    parser.add_argument(
        "--ihave-window", type=float, default=None, help="Plumtree ihave_batch_window (s)"
    )
    args = parser.parse_args(argv)
    logging.getLogger("trio_replica").setLevel(logging.ERROR)
    profile = cProfile.Profile() if args.cprofile else None
    figure = trio.run(
        measure,
        args.nodes,
        args.seconds,
        args.pace_ms / 1e3,
        profile,
        args.pause,
        args.steps,
        args.ihave_window,
    )
    if profile is not None and args.cprofile:
        profile.dump_stats(args.cprofile)
    print(json.dumps(figure, indent=2))


if __name__ == "__main__":
    main()
