"""What N idle nodes cost: process CPU and traffic per second, by message kind.

A script, not a test: ``.venv/bin/python bench/profile_idle.py [--sizes 25,50] [--seconds 10]
[--cprofile FILE]``. For each size it opens `open_local_cluster(n)` (every node in this one
process, real websockets on 127.0.0.1), waits for symmetric connected views, lets the
overlay settle, then measures over an idle period: the process CPU (`time.process_time`, so
another process busy on the machine does not count), frames and messages sent per second by
kind (``node.stats()`` deltas), and Trio scheduler activity (task steps per second, from an
`trio.abc.Instrument`). One JSON document goes to stdout; progress lines to stderr.

With ``--cprofile FILE`` the idle window of the largest size runs under cProfile and the
stats are written to FILE (read them with ``python -m pstats FILE``); with ``--pause`` the
process id is printed 3 s before each idle window, to attach ``py-spy record -p PID``.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import trio

from trio_replica.localcluster import open_local_cluster, wait_for_views
from trio_replica.node import Node

SETTLE_S = 3.0


def progress(message: str) -> None:
    print(f"[profile_idle] {message}", file=sys.stderr, flush=True)


class StepCounter(trio.abc.Instrument):
    """Counts task steps and scheduler wake-ups (`before_io_wait` with a timeout)."""

    def __init__(self) -> None:
        self.steps = 0
        self.io_waits = 0
        self.by_task: collections.Counter[str] = collections.Counter()

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1
        self.by_task[task.name.rsplit(".", 1)[-1]] += 1

    def before_io_wait(self, timeout: float) -> None:
        self.io_waits += 1


def totals(nodes: Sequence[Node]) -> dict[str, Any]:
    messages: collections.Counter[str] = collections.Counter()
    frames = links = 0
    for node in nodes:
        stats = node.stats()
        messages.update(stats["messages_sent"])
        frames += stats["frames_sent"]
        links += stats["links_established"]
    return {"messages": messages, "frames": frames, "links": links}


async def measure(
    n: int, seconds: float, profile: cProfile.Profile | None, pause: bool
) -> dict[str, Any]:
    async with open_local_cluster(n) as nodes:
        with trio.fail_after(60):
            await wait_for_views(nodes, min_active=2)
        # Joins, neighbor requests and first shuffles finish; timers settle.
        await trio.sleep(SETTLE_S)
        if pause:
            progress(f"pid {os.getpid()}: measuring in 3 s for {seconds:.0f} s")
            await trio.sleep(3.0)
        counter = StepCounter()
        before = totals(nodes)
        trio.lowlevel.add_instrument(counter)
        cpu0, t0 = time.process_time(), trio.current_time()
        if profile is not None:
            profile.enable()
        await trio.sleep(seconds)
        if profile is not None:
            profile.disable()
        cpu, wall = time.process_time() - cpu0, trio.current_time() - t0
        trio.lowlevel.remove_instrument(counter)
        after = totals(nodes)
        links = sum(len(node.links()) for node in nodes)
    kinds = {
        k: round((after["messages"][k] - before["messages"][k]) / wall, 1)
        for k in sorted(after["messages"])
        if after["messages"][k] - before["messages"][k]
    }
    frames = (after["frames"] - before["frames"]) / wall
    return {
        "nodes": n,
        "link_ends": links,
        "seconds": round(wall, 2),
        "cpu_utilisation": round(cpu / wall, 4),
        "cpu_us_per_node_per_s": round(cpu / wall / n * 1e6),
        "frames_sent_per_s": round(frames, 1),
        # Each side of a new link counts it once: a dial and handshake is about two of these.
        "links_established_per_s": round((after["links"] - before["links"]) / wall, 1),
        "messages_sent_per_s": kinds,
        "task_steps_per_s": round(counter.steps / wall),
        "scheduler_waits_per_s": round(counter.io_waits / wall),
        "steps_per_s_by_task": {
            name: round(count / wall) for name, count in counter.by_task.most_common(12)
        },
    }


async def run(
    sizes: Sequence[int], seconds: float, profile_path: str | None, pause: bool
) -> list[Any]:
    out = []
    for n in sizes:
        profile = cProfile.Profile() if profile_path and n == max(sizes) else None
        figure = await measure(n, seconds, profile, pause)
        progress(
            f"N={n}: idle CPU {figure['cpu_utilisation']:.1%} of a core, "
            f"{figure['frames_sent_per_s']} frames/s, {figure['task_steps_per_s']} task steps/s"
        )
        out.append(figure)
        if profile is not None and profile_path:
            profile.dump_stats(profile_path)
            progress(f"cProfile stats written to {profile_path}")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--sizes", type=lambda s: tuple(int(x) for x in s.split(",")), default=(25, 50)
    )
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--cprofile", default=None, help="write cProfile stats here")
    parser.add_argument("--pause", action="store_true", help="wait 3 s to attach py-spy")
    args = parser.parse_args(argv)
    logging.getLogger("trio_replica").setLevel(logging.ERROR)
    figures = trio.run(run, args.sizes, args.seconds, args.cprofile, args.pause)
    print(json.dumps({"benchmark": "idle", "runs": figures}, indent=2))


if __name__ == "__main__":
    main()
