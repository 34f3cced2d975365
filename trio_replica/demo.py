"""``python -m trio_replica demo``: a local cluster replicating, failing and healing, live.

The scenario, each step under its own deadline:

1. start: `n` nodes on 127.0.0.1 over websockets (a random cluster secret, default timers),
   all joining through the first; wait for a connected overlay with symmetric views.
2. write: put keys into the replicated map ``demo`` on the first node; every node converges.
3. crash: abort the last node (no leave, as a crash); the others notice (``PeerDown``),
   drop it and refill their active views from their passive views (HyParView §4.3).
4. write while down: more puts and a delete on a surviving node; the survivors converge.
5. restart: the crashed node comes back with the same name and data directory; it recovers
   its map from SQLite, rejoins, and catches up with the writes it missed.

Output: on a terminal, progress lines above a table refreshed in place (per node: state,
active and passive view sizes, map size, frames per second in and out); otherwise plain lines, with
the table printed after each step. `run_demo` returns 0 when every step met its deadline,
1 with a message naming the failed step otherwise.

Each node runs in a task of its own with its own cancel scope (so one can be crashed and
restarted) inside `logs.node_context`, which labels its log records with its id.
"""

from __future__ import annotations

import collections
import contextlib
import secrets
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import IO, Any

import attrs
import trio

from .core.events import PeerDown
from .localcluster import overlay_ok
from .node import Node, open_node
from .runtime.config import NodeConfig
from .runtime.logs import node_context
from .stores.maps import ReplicatedMap

MAP = "demo"
FIRST_KEYS = 20
LATER_KEYS = 10
POLL = 0.05
#: Frames per second are counted over about this long (seconds).
RATE_WINDOW = 1.0


class StepFailed(Exception):
    """A step of the scenario missed its deadline."""

    def __init__(self, step: str, what: str, timeout: float) -> None:
        super().__init__(f"step '{step}' failed: {what} not reached within {timeout:g} s")
        self.step = step


@attrs.define
class DemoNode:
    """One node of the demo and the task that runs it."""

    name: str
    config: NodeConfig
    node: Node | None = None
    map: ReplicatedMap | None = None
    recovered: int = 0
    scope: trio.CancelScope | None = None
    stopped: trio.Event = attrs.field(factory=trio.Event)
    #: (frames sent and received, time) at recent draws: the rate is taken over the last
    #: second or so, not since the last draw (two draws a moment apart, as around a crash,
    #: showed 0 frames/s on every node).
    samples: collections.deque[tuple[int, float]] = attrs.field(factory=collections.deque)
    rate: float = 0.0

    @property
    def up(self) -> bool:
        return self.node is not None


async def _run_node(member: DemoNode, scope: trio.CancelScope, started: trio.Event) -> None:
    """Run `member` until its scope is cancelled (graceful leave) or it is aborted (crash)."""
    try:
        with node_context(member.name), scope:
            async with open_node(member.config) as node:
                # Opened here, not by the caller: the map's tasks inherit this node's log context.
                the_map = await node.open_map(MAP, persist=True)
                member.node, member.map, member.recovered = node, the_map, len(the_map)
                member.samples.clear()
                member.samples.append((_messages(node), trio.current_time()))
                started.set()
                await trio.sleep_forever()
    finally:
        member.node = member.map = None
        member.stopped.set()


def _messages(node: Node) -> int:
    # Frames, not protocol messages: what actually crossed the wire, control traffic included.
    counters = node.runtime.stats_counters
    return counters.frames_sent + counters.frames_received


class Display:
    """Progress lines and the node table, refreshed in place on a terminal."""

    def __init__(self, members: list[DemoNode], out: IO[str], live: bool) -> None:
        self.members = members
        self.out = out
        self.live = live
        self._drawn = 0  # lines of the table currently on screen (live mode)

    def table(self) -> list[str]:
        now = trio.current_time()
        lines = [f"  {'node':<6}{'state':<7}{'active':>7}{'passive':>8}{'map':>6}{'frames/s':>10}"]
        for m in self.members:
            if m.node is None or m.map is None:
                lines.append(f"  {m.name:<6}{'down':<7}{'-':>7}{'-':>8}{'-':>6}{'-':>10}")
                continue
            count, samples = _messages(m.node), m.samples
            samples.append((count, now))
            while len(samples) > 2 and now - samples[1][1] >= RATE_WINDOW:
                samples.popleft()
            first, then = samples[0]
            if now - then >= 0.01:  # since the node started, while it is younger than that
                m.rate = (count - first) / (now - then)
            lines.append(
                f"  {m.name:<6}{'up':<7}{len(m.node.active_view()):>7}"
                f"{len(m.node.passive_view()):>8}{len(m.map):>6}{m.rate:>10.0f}"
            )
        return lines

    def say(self, text: str) -> None:
        """A progress line (above the table when live)."""
        if self.live:
            self._clear()
            print(text, file=self.out)
            self.draw()
        else:
            print(text, file=self.out, flush=True)

    def draw(self) -> None:
        """Redraw the table in place (live), or print it once (plain)."""
        lines = self.table()
        if self.live:
            self._clear()
            self._drawn = len(lines)
        print("\n".join(lines), file=self.out, flush=True)

    def _clear(self) -> None:
        if self._drawn:
            # Cursor up to the table's first line, then erase to the end of the screen.
            self.out.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0

    async def refresh(self) -> None:
        """Live mode: redraw twice a second until cancelled."""
        while True:
            self.draw()
            await trio.sleep(0.5)


@contextlib.contextmanager
def _step(name: str, timeout: float, what: str) -> Iterator[None]:
    with trio.move_on_after(timeout) as scope:
        yield
    if scope.cancelled_caught:
        raise StepFailed(name, what, timeout)


async def _until(predicate: Callable[[], bool]) -> None:
    # Polling: the conditions span several nodes and nothing signals them.
    while not predicate():  # noqa: ASYNC110
        await trio.sleep(POLL)


def _live(members: list[DemoNode]) -> list[Node]:
    return [m.node for m in members if m.node is not None]


def _converged(members: list[DemoNode], expected: dict[Any, Any]) -> bool:
    return all(m.map is not None and dict(m.map.items()) == expected for m in members if m.up)


@contextlib.asynccontextmanager
async def _watch_down(nodes: list[Node]) -> AsyncIterator[dict[str, list[PeerDown]]]:
    """Collect the PeerDown events of `nodes`, by node id, while the block runs."""
    seen: dict[str, list[PeerDown]] = {node.id: [] for node in nodes}

    async def watch(node: Node) -> None:
        async with node.events() as events:
            async for event in events:
                if isinstance(event, PeerDown):
                    seen[node.id].append(event)

    async with trio.open_nursery() as nursery:
        for node in nodes:
            nursery.start_soon(watch, node)
        yield seen
        nursery.cancel_scope.cancel()


async def _scenario(
    members: list[DemoNode], nursery: trio.Nursery, display: Display, step_timeout: float
) -> None:
    n = len(members)
    t0 = trio.current_time()

    def elapsed() -> str:
        return f"{trio.current_time() - t0:5.2f}s"

    async def start(member: DemoNode) -> None:
        scope = member.scope = trio.CancelScope()
        member.stopped = trio.Event()
        started = trio.Event()
        # start_soon and an event rather than nursery.start: a step deadline must not cancel
        # a node half-way through open_node (a node cancelled while it starts can hang).
        nursery.start_soon(_run_node, member, scope, started)
        await started.wait()

    # 1. start
    with _step("start", step_timeout, f"a connected overlay of {n} nodes"):
        await start(members[0])
        seed = members[0].node
        assert seed is not None
        for m in members[1:]:
            m.config = attrs.evolve(m.config, seeds=(seed.address,))
            await start(m)
        display.say(
            f"[{elapsed()}] started {n} nodes on 127.0.0.1, seed {seed.id} at {seed.address}"
        )
        await _until(lambda: overlay_ok(_live(members), min_active=min(2, n - 1)))
    display.say(f"[{elapsed()}] overlay connected: active views symmetric, every node reachable")
    display.draw()

    # 2. write on the first node, every node converges
    first = members[0].map
    assert first is not None
    with _step("replicate", step_timeout, f"all {n} nodes holding the {FIRST_KEYS} keys"):
        for i in range(FIRST_KEYS):
            await first.put(f"key-{i:02}", {"value": i, "by": members[0].name})
        display.say(f"[{elapsed()}] {members[0].name} wrote {FIRST_KEYS} keys to map '{MAP}'")
        expected = dict(first.items())
        await _until(lambda: _converged(members, expected))
    display.say(f"[{elapsed()}] all {n} nodes hold the same {len(expected)} keys")
    display.draw()

    # 3. crash the last node; the others notice and repair their views
    victim = members[-1]
    survivors = members[:-1]
    live = _live(survivors)
    assert victim.node is not None
    had_it = {node.id for node in live if victim.name in {p.id for p in node.active_view()}}
    async with _watch_down(live) as downs:
        with _step("crash", step_timeout, f"the survivors dropping {victim.name} and repairing"):
            victim.node.abort()
            display.say(f"[{elapsed()}] crashed {victim.name} (no goodbye: its sockets just close)")
            await victim.stopped.wait()

            def repaired() -> bool:
                noticed = all(
                    any(d.peer.id == victim.name for d in downs[node_id]) for node_id in had_it
                )
                forgotten = all(
                    victim.name not in {p.id for p in node.active_view()}
                    and victim.name not in {p.id for p in node.links()}
                    for node in live
                )
                return noticed and forgotten and overlay_ok(live, min_active=min(2, n - 2))

            await _until(repaired)
    for node_id in sorted(had_it):
        reasons = sorted({d.reason.value for d in downs[node_id] if d.peer.id == victim.name})
        display.say(f"[{elapsed()}]   {node_id} saw PeerDown({victim.name}, {'/'.join(reasons)})")
    if not had_it:
        display.say(f"[{elapsed()}]   no node had {victim.name} in its active view")
    sizes = ", ".join(f"{node.id}: {len(node.active_view())}" for node in live)
    display.say(
        f"[{elapsed()}] views repaired: {victim.name} gone from every active view, the "
        f"{len(live)} survivors symmetric and connected (active sizes {sizes})"
    )
    display.draw()

    # 4. write while the victim is down
    writer = survivors[1 % len(survivors)]
    assert writer.map is not None
    with _step("write while down", step_timeout, f"the {len(live)} survivors converging"):
        for i in range(FIRST_KEYS, FIRST_KEYS + LATER_KEYS):
            await writer.map.put(f"key-{i:02}", {"value": i, "by": writer.name})
        await writer.map.delete("key-00")
        display.say(
            f"[{elapsed()}] {writer.name} wrote {LATER_KEYS} keys and deleted key-00 "
            f"while {victim.name} was down"
        )
        expected = dict(writer.map.items())
        await _until(lambda: _converged(survivors, expected))
    display.say(f"[{elapsed()}] the survivors hold the same {len(expected)} keys")

    # 5. restart the victim: same name, same data directory
    with _step("restart", step_timeout, f"{victim.name} catching up"):
        alive = survivors[0].node
        assert alive is not None
        victim.config = attrs.evolve(victim.config, seeds=(alive.address,))
        await start(victim)
        display.say(
            f"[{elapsed()}] restarted {victim.name}: recovered {victim.recovered} keys "
            f"from {victim.config.data_dir}"
        )
        await _until(
            lambda: (
                _converged(members, expected)
                and overlay_ok(_live(members), min_active=min(2, n - 1))
            )
        )
    display.say(
        f"[{elapsed()}] {victim.name} caught up: all {n} nodes hold the same {len(expected)} keys"
    )
    display.draw()


async def run_demo(
    n: int = 5, *, step_timeout: float = 15.0, out: IO[str] | None = None, live: bool | None = None
) -> int:
    """Run the scenario with `n` nodes; 0 when every step met `step_timeout`, else 1."""
    out = out if out is not None else sys.stdout
    if n < 3:
        print("the demo needs at least 3 nodes (one crashes, two keep the cluster)", file=out)
        return 2
    live = out.isatty() if live is None else live
    with tempfile.TemporaryDirectory(prefix="trio-replica-demo-") as tmp:
        base = NodeConfig(secret=secrets.token_bytes(32))
        members = [
            DemoNode(
                f"n{i}",
                attrs.evolve(
                    base, name=f"n{i}", listen="ws://127.0.0.1:0", data_dir=Path(tmp, f"n{i}")
                ),
            )
            for i in range(1, n + 1)
        ]
        display = Display(members, out, live)
        status = 0
        async with trio.open_nursery() as nursery:
            if live:
                nursery.start_soon(display.refresh)
            try:
                await _scenario(members, nursery, display, step_timeout)
                display.say("demo succeeded: replicated, failed and healed; stopping the nodes")
            except StepFailed as exc:
                display.say(f"demo FAILED: {exc}")
                display.draw()
                print(f"error: demo {exc}", file=sys.stderr, flush=True)
                status = 1
            # Graceful leave of every node (each leave is bounded by the node itself).
            nursery.cancel_scope.cancel()
    return status
