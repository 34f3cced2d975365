"""The node's tasks: each in a shielded cancel scope of its own, cancelled by the node.

Cancelling the caller's ``async with open_node(...)`` block must not kill the links before
the graceful leave has flushed its DISCONNECTs, so the node's tasks are cancelled by the
node itself, in `open_node`'s cleanup, right after the (bounded) leave: `cancel_all`.
Every task still lives in the node's nursery, so none outlives it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio


class TaskScopes:
    """Starts tasks in the node's nursery, each shielded until `cancel_all`."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self._scopes: set[trio.CancelScope] = set()
        self._cancelled = False

    def spawn(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        """Run `fn(*args)` as a task of the node; it ends when the node closes."""
        scope = self._new_scope()
        self._nursery.start_soon(self._in_scope, scope, fn, args)

    async def start(self, fn: Callable[..., Awaitable[object]], *args: object) -> Any:
        """Like `spawn`, for a task that reports readiness through ``task_status``."""
        # Shield only once started: a shielded task that is still starting when the caller
        # is cancelled stays in trio's temporary start nursery, which then never exits.
        scope = self._new_scope(shield=False)
        value = await self._nursery.start(self._in_scope_started, scope, fn, args)
        scope.shield = True
        return value

    def cancel_all(self) -> None:
        """Cancel every task started so far, and every task started from now on."""
        self._cancelled = True
        for scope in list(self._scopes):
            scope.cancel()

    def cancel_nursery(self) -> None:
        """`cancel_all`, and the nursery's own scope (the ``open_node`` block): a crash."""
        self.cancel_all()
        self._nursery.cancel_scope.cancel()

    def _new_scope(self, *, shield: bool = True) -> trio.CancelScope:
        scope = trio.CancelScope(shield=shield)
        if self._cancelled:
            scope.cancel()
        self._scopes.add(scope)
        return scope

    async def _in_scope(
        self,
        scope: trio.CancelScope,
        fn: Callable[..., Awaitable[object]],
        args: tuple[object, ...],
    ) -> None:
        try:
            with scope:
                await fn(*args)
        finally:
            self._scopes.discard(scope)

    async def _in_scope_started(
        self,
        scope: trio.CancelScope,
        fn: Callable[..., Awaitable[object]],
        args: tuple[object, ...],
        task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            with scope:
                await fn(*args, task_status=task_status)
        finally:
            self._scopes.discard(scope)
