"""A protocol component: one sans-IO core driven by one supervised task.

The node owns a component's state (the core, its inbox, its timer heap); the component's
task only turns inputs into effects. So when the task crashes (a bug, or
`testing.crash_component` in a chaos test) the supervisor restarts it with bounded
exponential backoff and nothing queued is lost: inputs wait in the inbox. A subclass
decides what its core becomes (`on_start` with `first=False`): membership and broadcast
build a fresh one from what survives (their old timers are then forgotten,
`clear_timers`). Restarts are limited in intensity (`supervision.Restarts`): past its
budget the component gives up and `ComponentDead` closes the node, so that a bug hit by
every input ends the node loudly rather than restarting its machinery forever.
A subclass's `on_crash` closes what the crash invalidated (the broadcast component's
subscriber channels: subscribers re-subscribe, SPEC section 9).

Inputs are closures ``now -> effects`` posted to the inbox, so the same task runs every
kind of input (a message, a link going down, a local call) and the core never sees two
inputs at once. The inbox is a `FairInbox`: each source (a link, or the node's own callers)
has a bounded share, in items and bytes, and the task serves the sources in turn, so one
peer flooding the node delays the others by at most one input each (inputs from one source
keep their order). A source over its share waits in `post` (a link's reader then stops
reading: the peer is slowed, not dropped).
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import math
from collections.abc import Callable, Hashable, Iterable
from typing import Any

import trio

from ..core.effects import Effect, SetTimer
from .flow import FlowConfig, Pressure
from .inbox import FairInbox, OnTaken
from .supervision import Restarts

log = logging.getLogger("trio_replica.component")

Input = Callable[[float], Iterable[Effect]]

#: Inputs run in one wake-up of a component's task before timers are checked again.
DRAIN_BATCH = 64

#: The source of inputs from the node itself (local calls, as opposed to a peer's link).
LOCAL = "local"


class ComponentCrash(Exception):
    """Raised inside a component's task by `crash()`, to look exactly like a failure."""


class Component:
    """Base class: subclasses implement `on_timer` and `execute` (and may override `on_start`)."""

    def __init__(
        self,
        name: str,
        *,
        flow: FlowConfig,
        pressure: Pressure | None = None,
        on_taken: OnTaken | None = None,
    ) -> None:
        self.name = name
        self._inbox = FairInbox[Input](
            source_items=flow.inbox_items_per_peer,
            source_bytes=flow.inbox_bytes_per_peer,
            total_bytes=flow.inbox_bytes,
            pressure=pressure,
            high_items=flow.inbox_high_items,
            on_taken=on_taken,
        )
        self._timers: list[tuple[float, int, Hashable]] = []
        self._seq = itertools.count()
        self._crash_requested = False
        self._notices: collections.deque[Input] = collections.deque()
        self._scope = trio.CancelScope()
        self.running = trio.Event()
        #: Crashes, restarts and the restart budget (`supervision.Restarts`).
        self.supervision = Restarts(f"component {name}")

    @property
    def crashes(self) -> int:
        return self.supervision.crashes

    @property
    def restarts(self) -> int:
        return self.supervision.restarts

    @property
    def dead(self) -> str | None:
        """Why the component stopped being restarted (None while it is supervised)."""
        return self.supervision.dead

    # --- inputs ---------------------------------------------------------------------------

    async def post(
        self, item: Input, *, source: Hashable = LOCAL, size: int = 0, credit: int = 0
    ) -> None:
        """Queue an input, waiting while `source` is over its share (backpressure on it).

        `credit`: the input is a payload message of that many bytes whose link grants
        credit back once the input has been taken (`FairInbox`).
        """
        await self._inbox.put(source, item, size, credit)

    def post_nowait(
        self, item: Input, *, source: Hashable = LOCAL, size: int = 0, credit: int = 0
    ) -> bool:
        """Queue an input if `source` has room; return False (nothing queued) if not.

        For a caller that checkpoints anyway (a link's reader between two frames): `post`
        yields to the scheduler on every call, once per message, which this avoids.
        """
        return self._inbox.put_nowait(source, item, size, credit)

    def post_forced(self, item: Input, *, source: Hashable = LOCAL, size: int = 0) -> None:
        """Queue an input whatever the shares: for a caller that already waited for room."""
        self._inbox.put_forced(source, item, size)

    def has_room(self, source: Hashable = LOCAL, size: int = 0) -> bool:
        return self._inbox.has_room(source, size)

    async def wait_room(self, source: Hashable = LOCAL, size: int = 0) -> None:
        """Return once `source` may queue an input of `size` bytes (a checkpoint either way)."""
        await self._inbox.wait_room(source, size)

    def post_notice(self, item: Input) -> None:
        """Queue an input that must not be lost (a link down, a membership change).

        Notices bypass the bounded inbox: a peer flooding us keeps its share full, and
        dropping the news that a link died would leave a dead peer in the views. They are
        few (one per membership change) and run before the next inbox item.
        """
        self._notices.append(item)
        self._inbox.wake()

    def post_after(self, source: Hashable, item: Input) -> None:
        """Queue a notice that must run after the inputs `source` has queued: a link's end
        after the messages read from it before it ended (a peer's DISCONNECT, then its
        close, must not be seen the other way round, as a failure). With nothing queued
        from `source` it is an ordinary notice. Never lost either way."""
        if self._inbox.depth(source):
            self._inbox.put_forced(source, item, 0)
        else:
            self.post_notice(item)

    def queued(self, source: Hashable) -> int:
        """Inputs from `source` waiting in the inbox."""
        return self._inbox.depth(source)

    def inbox_depth(self) -> int:
        return len(self._inbox) + len(self._notices)

    def inbox_bytes(self) -> int:
        return self._inbox.bytes

    @property
    def throttled(self) -> int:
        """Inputs that had to wait for their source's share (or the inbox) to drain."""
        return self._inbox.throttled

    # --- to implement ---------------------------------------------------------------------

    def on_start(self, now: float, first: bool) -> Iterable[Effect]:
        """Called when the task (re)starts; `first` is False after a crash."""
        return ()

    def on_timer(self, timer: Hashable, now: float) -> Iterable[Effect]:
        raise NotImplementedError

    def execute(self, effect: Effect) -> None:
        raise NotImplementedError

    def on_crash(self) -> None:
        """Called after the task died: close subscriber channels, reset derived state."""

    def clear_timers(self) -> None:
        """Forget every armed timer: for an `on_start` that replaces its core after a crash
        (the old core's timer tokens would otherwise reach the new one)."""
        self._timers.clear()

    def timer_delay(self, effect: SetTimer) -> float:
        """The delay to arm `effect` with (a component may stretch its timeouts)."""
        return effect.delay

    # --- running --------------------------------------------------------------------------

    def apply(self, effects: Iterable[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, SetTimer):
                heapq.heappush(
                    self._timers,
                    (trio.current_time() + self.timer_delay(effect), next(self._seq), effect.timer),
                )
            else:
                self.execute(effect)

    async def _serve_inputs(self, wait: trio.CancelScope) -> None:
        """Run inputs as they come, and timers due between them, until `wait`'s deadline."""
        inbox = self._inbox
        get_nowait = inbox.get_nowait
        deadline = math.inf
        while True:
            self._run_notices()
            self._run_timers()
            next_timer = self._timers[0][0] if self._timers else math.inf
            if next_timer != deadline:
                deadline = wait.deadline = next_timer
            await inbox.wait()
            # Everything already queued runs in this one wake-up: a frame of several
            # messages, or several links' messages, costs one task switch, not one each.
            # Bounded, so that timers due meanwhile are not starved.
            for _ in range(DRAIN_BATCH):
                self._run_notices()
                try:
                    item = get_nowait()
                except trio.WouldBlock:
                    break
                self.apply(item(trio.current_time()))

    def _run_timers(self) -> None:
        now = trio.current_time()
        while self._timers and self._timers[0][0] <= now:
            _, _, timer = heapq.heappop(self._timers)
            self.apply(self.on_timer(timer, now))

    def _run_notices(self) -> None:
        while self._notices:
            notice = self._notices.popleft()
            self.apply(notice(trio.current_time()))

    def crash(self) -> None:
        """Make the running task fail as a crash would (for tests and chaos runs)."""
        self._crash_requested = True
        if self.running.is_set():
            self.running = trio.Event()
        self._scope.cancel()

    async def _run_once(self, first: bool) -> None:
        with trio.CancelScope() as self._scope:
            self.apply(self.on_start(trio.current_time(), first))
            self.running.set()
            while True:
                # One wait scope serves every wake-up until a timer fires: its deadline is
                # moved to the earliest timer rather than a new scope opened per wake-up,
                # which cost as much as handling a small message.
                with trio.CancelScope() as wait:
                    await self._serve_inputs(wait)
                self._run_timers()
        if self._crash_requested:
            self._crash_requested = False
            raise ComponentCrash(f"{self.name}: crash requested")

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run the component until cancelled, restarting its task when it crashes."""
        first = True
        started = False
        supervision = self.supervision
        while True:
            try:
                if not started:
                    started = True
                    task_status.started()
                supervision.started(trio.current_time())
                await self._run_once(first)
            except ComponentCrash as exc:
                log.warning("component %s crashed: %s; restarting", self.name, exc)
            except Exception:
                log.exception("component %s crashed; restarting", self.name)
            if self.running.is_set():  # (`crash` may have replaced it already)
                self.running = trio.Event()
            self.on_crash()
            first = False
            # Past its budget this raises `ComponentDead`: the node closes.
            await trio.sleep(supervision.crashed(trio.current_time()))
