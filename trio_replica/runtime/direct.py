"""Messages to one node: one-way sends, and requests answered by a handler there.

This module owns `DirectMessaging`, one per node (`Node.direct`; the node's `send`,
`request` and `serve` are its front):

* ``node.serve(tag, handler)`` registers ``async def handler(sender: Peer, payload)``
  for messages with `tag` (a context manager: leaving it unregisters). Its return value
  is the reply to a request (plain data); what it raises is reported to the requester
  (`RequestFailed`) and logged here. Tags starting with ``_`` are reserved for the node's
  own services (the built-ins).
* ``await node.send(peer, tag, payload)``: one way, over the existing link or a dialed
  one, waiting for room on the link (flow control), within `timeout`.
* ``await node.request(peer, tag, payload)``: the same, then waits for the reply within
  `timeout` (`RequestTimeout`: it may or may not have run).
* Each message's handler runs in a task of its own: handlers run concurrently, in no
  promised order (one-way messages from one sender included).
* At most `MAX_RUNNING` handlers run at once on a node; a request beyond them is answered
  "busy" at once (`RequestFailed`), and a one-way message beyond them is dropped (counted):
  the link that brings them is never held, since it carries the other protocols too.

`peer` is a node id (its address is looked up in the links, the views, the lost
contacts and the host directory; `UnknownPeer` if none) or a `Peer`. A request to the
node itself runs its handler directly.

Untrusted input: payloads are decoded strictly (`wire.decode_payload`); at most
`MAX_RUNNING` handlers run at once for the node (more are answered "busy", never waited
for); a reply is taken only from the node the request went to; error texts are cut to
`MAX_ERROR_TEXT`. Refused input is counted (`stats()["drops"]`) and logged.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

import trio

from ..core.messages import MAX_TAG, Direct, DirectReply, Peer
from ..core.wire import decode_payload, encode_payload
from ..errors import (
    LinkClosed,
    MessageTooLarge,
    NoHandler,
    RequestFailed,
    RequestTimeout,
    UnknownPeer,
    WireError,
)
from .services import NodeBasics, Sending

if TYPE_CHECKING:
    from .link import Link

log = logging.getLogger("trio_replica.direct")

Handler = Callable[[Peer, Any], Awaitable[Any]]

#: Handlers running at once on one node; a request beyond them is answered "busy" (the
#: link's reader never waits for a handler: it also carries the other protocols).
MAX_RUNNING = 64
#: Seconds a handler's reply may wait for room on the link before it is dropped.
REPLY_TIMEOUT = 10.0
#: Longest error text sent back.
MAX_ERROR_TEXT = 1000
#: Requests of this node waiting for their replies at once; more wait for a slot.
MAX_PENDING = 4096


class DirectHost(NodeBasics, Sending, Protocol):
    """What direct messaging uses of its node."""

    @property
    def me(self) -> Peer: ...

    def known_peer(self, peer_id: str) -> Peer | None: ...


class DirectMessaging:
    """One node's direct messages (module docstring)."""

    def __init__(self, node: DirectHost) -> None:
        self.node = node
        self._handlers: dict[str, Handler] = {}
        self._pending: dict[int, tuple[str, trio.MemorySendChannel[DirectReply]]] = {}
        self._ids = itertools.count(1)
        self._running = trio.Semaphore(MAX_RUNNING)
        self._waiting = trio.Semaphore(MAX_PENDING)

    # --- the API ------------------------------------------------------------------------

    @contextlib.contextmanager
    def serve(self, tag: str, handler: Handler, *, _internal: bool = False) -> Iterator[None]:
        """Handle messages with `tag` while the block runs (module docstring)."""
        if not 0 < len(tag) <= MAX_TAG:
            raise ValueError(f"a tag has 1 to {MAX_TAG} characters")
        if tag.startswith("_") and not _internal:
            raise ValueError(f"tags starting with '_' are reserved for the node: {tag!r}")
        if tag in self._handlers:
            raise ValueError(f"a handler for {tag!r} is already registered")
        self._handlers[tag] = handler
        try:
            yield
        finally:
            self._handlers.pop(tag, None)

    async def send(self, peer: str | Peer, tag: str, payload: Any, *, timeout: float = 5.0) -> None:
        """One message to `peer`'s handler of `tag`; no answer (module docstring)."""
        target = self._resolve(peer)
        encoded = encode_payload(payload, max_size=self.node.config.max_payload)
        if target.id == self.node.id:
            await self._run_local(tag, encoded, timeout)
            return
        with trio.move_on_after(timeout) as scope:
            await self._send(target, Direct(tag, 0, encoded))
        if scope.cancelled_caught:
            raise RequestTimeout(f"could not send to {target} within {timeout} s")

    async def request(
        self, peer: str | Peer, tag: str, payload: Any, *, timeout: float = 5.0
    ) -> Any:
        """Ask `peer`'s handler of `tag` and return its answer (module docstring)."""
        target = self._resolve(peer)
        limit = self.node.config.max_payload
        encoded = encode_payload(payload, max_size=limit)
        if target.id == self.node.id:
            return await self._run_local(tag, encoded, timeout)
        with trio.move_on_after(timeout) as scope:
            async with self._waiting:
                request_id = next(self._ids)
                send, receive = trio.open_memory_channel[DirectReply](1)
                self._pending[request_id] = (target.id, send)
                try:
                    await self._send(target, Direct(tag, request_id, encoded))
                    reply = await receive.receive()
                finally:
                    self._pending.pop(request_id, None)
        if scope.cancelled_caught:
            raise RequestTimeout(f"no answer from {target} to {tag!r} within {timeout} s")
        result = decode_payload(reply.payload, max_size=limit)
        if not reply.ok:
            text = str(result)
            if text.startswith("no handler"):
                raise NoHandler(f"{target}: {text}")
            raise RequestFailed(f"{target}: {text}")
        return result

    # --- the wire -----------------------------------------------------------------------

    def _resolve(self, peer: str | Peer) -> Peer:
        if isinstance(peer, Peer):
            return peer
        if peer == self.node.id:
            return self.node.me
        found = self.node.known_peer(peer)
        if found is None:
            raise UnknownPeer(
                f"no address known for node {peer!r}: it is not linked, not in the views "
                "and hosts nothing; pass a Peer(id, address)"
            )
        return found

    async def _send(self, target: Peer, message: Direct | DirectReply) -> None:
        try:
            await self.node.send_message(target, message)
        except LinkClosed as exc:
            raise RequestFailed(f"could not send to {target}: {exc}") from None

    async def _run_local(self, tag: str, encoded: bytes, timeout: float) -> Any:
        """A message to this node: its handler runs here, with the same errors."""
        handler = self._handlers.get(tag)
        if handler is None:
            raise NoHandler(f"no handler for {tag!r} on this node")
        payload = decode_payload(encoded, max_size=self.node.config.max_payload)
        with trio.move_on_after(timeout) as scope:
            try:
                return await handler(self.node.me, payload)
            except Exception as exc:
                raise RequestFailed(f"handler failed: {type(exc).__name__}: {exc}") from exc
        assert scope.cancelled_caught
        raise RequestTimeout(f"the handler of {tag!r} did not answer within {timeout} s")

    async def deliver(self, link: Link, message: Direct | DirectReply, size: int) -> None:
        """A direct message arrived on `link` (from the node's reader: may wait)."""
        if isinstance(message, DirectReply):
            link.processed(size)
            pending = self._pending.get(message.request_id)
            if pending is None or pending[0] != link.peer.id:
                # Late (timed out), or not the node we asked: dropped, counted.
                self.node.stats_counters.drop("direct_reply_unexpected")
                return
            try:
                pending[1].send_nowait(message)
            except trio.WouldBlock:
                self.node.stats_counters.drop("direct_reply_duplicate")
            return
        try:
            self._running.acquire_nowait()
        except trio.WouldBlock:
            # Never wait here: this reader also carries membership, broadcast and sync
            # (and a handler that calls back into its sender would deadlock).
            self.node.stats_counters.drop("direct_busy")
            link.processed(size)
            reply = self._error(message, "busy: too many requests running; try again")
            if reply is not None:
                self.node.send_to(link.peer, reply)
            return
        try:
            self.node.spawn(self._handle, link, message, size)
        except BaseException:
            self._running.release()
            link.processed(size)
            raise

    async def _handle(self, link: Link, message: Direct, size: int) -> None:
        peer = link.peer
        limit = self.node.config.max_payload
        try:
            reply: DirectReply | None = None
            try:
                payload = decode_payload(message.payload, max_size=limit)
            except WireError as exc:
                self.node.stats_counters.reject(f"direct_{exc.reason}")
                log.warning(
                    "node %s: malformed direct message from %s: %s", self.node.id, peer, exc
                )
                reply = self._error(message, f"malformed payload: {exc}")
            else:
                handler = self._handlers.get(message.tag)
                if handler is None:
                    self.node.stats_counters.drop("direct_no_handler")
                    reply = self._error(message, f"no handler for {message.tag!r}")
                else:
                    reply = await self._call(handler, peer, message, payload)
            if reply is not None:
                with trio.move_on_after(REPLY_TIMEOUT) as scope, contextlib.suppress(LinkClosed):
                    await self.node.send_message(peer, reply)
                if scope.cancelled_caught:
                    self.node.stats_counters.drop("direct_reply_timeout")
        finally:
            link.processed(size)
            self._running.release()

    async def _call(
        self, handler: Handler, peer: Peer, message: Direct, payload: Any
    ) -> DirectReply | None:
        try:
            result = await handler(peer, payload)
        except Exception as exc:
            # Application code: reported to the requester, logged here, the node goes on.
            log.warning(
                "node %s: handler of %r failed for %s",
                self.node.id,
                message.tag,
                peer,
                exc_info=True,
            )
            return self._error(message, f"handler failed: {type(exc).__name__}: {exc}")
        if not message.request_id:
            return None
        try:
            encoded = encode_payload(result, max_size=self.node.config.max_payload)
        except (MessageTooLarge, TypeError) as exc:
            return self._error(message, f"the handler's answer cannot travel: {exc}")
        return DirectReply(message.request_id, True, encoded)

    def _error(self, message: Direct, text: str) -> DirectReply | None:
        if not message.request_id:
            return None
        if len(text) > MAX_ERROR_TEXT:
            text = text[:MAX_ERROR_TEXT] + "..."
        return DirectReply(message.request_id, False, encode_payload(text, max_size=8 * 1024))
