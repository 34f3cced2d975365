"""The node's links: one per peer id, dialed or accepted, and the dials in progress.

This module owns `Connections`: the link table, the dials (messages wait in a bounded
queue until the link is up), the accepted connections' handshake (admission slots, then
`handshake_as_listener`), and the sweep of links nobody needs.

Two nodes that dial each other at the same moment end up with two connections; both
sides keep the one dialed by the node with the smaller id and move anything queued on the
other to it, so the choice agrees without a message. Links that membership no longer
needs (a shuffle reply's temporary link, a peer dropped from the active view) are closed
once idle for `link.linger` seconds (`sweep`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import attrs
import trio

from ..core.messages import Hello, Message, Peer, Role
from ..core.wire import encode_message
from ..errors import HandshakeError, LinkClosed
from ..transports.base import ConnectError, Connection, Transport
from .admission import Admission
from .config import NodeConfig
from .dialing import DialBudget
from .flow import Pressure
from .handshake import (
    Authenticated,
    Credentials,
    handshake_as_dialer,
    handshake_as_listener,
)
from .health import LoopHealth
from .link import Link
from .logs import PEER
from .stats import NodeStats
from .tasks import TaskScopes

log = logging.getLogger("trio_replica.node")

#: Called with each message a link reads: ``(link, message, size)``.
OnMessage = Callable[[Link, Message, int], Awaitable[None]]


#: Addresses whose last connect failure `Connections.connect_errors` remembers.
_MAX_CONNECT_ERRORS = 64


@attrs.define
class Dial:
    """A dial in progress: messages waiting for the link, and who waits for the outcome."""

    address: str
    expected: Peer | None
    queue: list[Message] = attrs.Factory(list)
    queued_bytes: int = 0
    done: trio.Event = attrs.Factory(trio.Event)
    peer: Peer | None = None
    error: str | None = None
    detail: str = ""


class Connections:
    """The links of one node (module docstring)."""

    def __init__(
        self,
        *,
        node_id: str,
        config: NodeConfig,
        transport: Transport,
        tasks: TaskScopes,
        stats: NodeStats,
        health: LoopHealth,
        pressure: Pressure,
        admission: Admission,
        dial_budget: DialBudget,
        credentials: Callable[[], Credentials],
        on_message: OnMessage,
        on_link_down: Callable[[Peer, Link | None], None],
        on_link_closed: Callable[[Link], None],
        closing: Callable[[], bool],
        ready: trio.Event,
    ) -> None:
        self._id = node_id
        self._config = config
        self._transport = transport
        self._tasks = tasks
        self._stats = stats
        self._health = health
        self._pressure = pressure
        self._admission = admission
        self._dial_budget = dial_budget
        self._credentials = credentials
        self._on_message = on_message
        self._on_link_down = on_link_down
        self._on_link_closed = on_link_closed
        self._closing = closing
        self._ready = ready
        self._links: dict[str, Link] = {}
        self.clients: set[Link] = set()
        self.dials: dict[str, Dial] = {}
        #: Why the last `connect` to an address failed (reason: detail), until one succeeds;
        #: the seeding task says it when a node cannot join. At most `_MAX_CONNECT_ERRORS`.
        self.connect_errors: dict[str, str] = {}
        #: Losing duplicates of a link, still delivering what was in flight on them.
        self._retired: set[Link] = set()

    # --- reading ------------------------------------------------------------------------

    def get(self, peer_id: str) -> Link | None:
        """The link to `peer_id` (open or closing), if there is one."""
        return self._links.get(peer_id)

    def open_link(self, peer_id: str) -> Link | None:
        link = self._links.get(peer_id)
        return link if link is not None and link.is_open else None

    def all(self) -> list[Link]:
        return list(self._links.values())

    def linked_ids(self) -> set[str]:
        """Ids of the peers with an open link."""
        return {pid for pid, link in self._links.items() if link.is_open}

    def snapshot(self) -> dict[str, int]:
        links = list(self._links.values())
        return {
            "open": len(links),
            "clients": len(self.clients),
            "dialing": len(self.dials),
            "queued": sum(link.queued() for link in links),
            "queued_bytes": sum(link.queued_bytes() for link in links),
            "congested": sum(link.congested for link in links),
        }

    # --- sending ------------------------------------------------------------------------

    def send_to(self, peer: Peer, message: Message, *, repair: bool = False) -> bool:
        """Queue `message` for `peer`, dialing it if needed; never blocks (`Node.send_to`)."""
        link = self._links.get(peer.id)
        if link is not None and link.is_open:
            return link.send_nowait(message, repair=repair)
        dial = self.dials.get(peer.id)
        if dial is None:
            if len(self.dials) >= self._config.link.max_dials:
                # Peers can make us dial addresses they name (shuffles, forward joins):
                # bound the sockets that costs. The core treats it as an unreachable peer.
                self._stats.drop("too_many_dials", message)
                self._link_down(peer)
                return False
            dial = self.start_dial(peer.address, peer)
        size = len(encode_message(message))
        if (
            len(dial.queue) >= self._config.link.dial_queue_messages
            or dial.queued_bytes + size > self._config.flow.dial_queue_bytes
        ):
            self._stats.drop("dial_queue_full", message)
            return False
        dial.queue.append(message)
        dial.queued_bytes += size
        return True

    async def send_message(self, peer: Peer, message: Message) -> None:
        """Queue `message` for `peer`, waiting for room on its link (bulk senders: syncs).

        Dials the peer if no link is open. Raises `LinkClosed` if the message cannot be
        queued (the link closed, or the dial's queue is full).
        """
        link = self._links.get(peer.id)
        if link is not None and link.is_open:
            await link.send(message)
            return
        await trio.lowlevel.checkpoint()
        if not self.send_to(peer, message):
            raise LinkClosed(f"no link to {peer} to send on")

    def close_link(self, peer: Peer) -> None:
        link = self._links.get(peer.id)
        if link is not None and link.is_open:
            link.close_soon()

    # --- dialing ------------------------------------------------------------------------

    def start_dial(self, address: str, expected: Peer | None) -> Dial:
        dial = Dial(address, expected)
        if expected is not None:
            self.dials[expected.id] = dial
        self._tasks.spawn(self._dial_task, dial)
        return dial

    async def connect(self, address: str) -> Peer | None:
        """Dial a node by address; return its peer once the link is up, None on failure."""
        dial = self.start_dial(address, None)
        await dial.done.wait()
        errors = self.connect_errors
        errors.pop(address, None)
        if dial.peer is None:
            if len(errors) >= _MAX_CONNECT_ERRORS:
                del errors[next(iter(errors))]
            errors[address] = f"{dial.error}: {dial.detail}"
        return dial.peer

    async def _dial_task(self, dial: Dial) -> None:
        cfg = self._config.link
        await self._dial_budget.acquire()
        health = self._health
        try:
            async with self._transport.open_connection(
                dial.address, timeout=health.timeout(cfg.connect_timeout)
            ) as conn:
                try:
                    auth = await handshake_as_dialer(
                        conn,
                        self._credentials(),
                        role=Role.NODE,
                        timeout=health.timeout(cfg.handshake_timeout),
                    )
                except HandshakeError as exc:
                    self._stats.handshakes_refused[exc.reason] += 1
                    self._dial_failed(dial, exc.reason, str(exc))
                    return
                peer = auth.peer
                if dial.expected is not None and peer.id != dial.expected.id:
                    self._dial_failed(
                        dial, "wrong_id", f"{dial.address} is {peer.id}, not {dial.expected.id}"
                    )
                    return
                taken = self._held_by_other_key(peer.id, auth.key)
                if taken is not None:
                    self._stats.handshakes_refused["id_taken"] += 1
                    self._dial_failed(dial, "id_taken", taken)
                    return
                link = self._new_link(conn, auth, outbound=True)
                self._register(link, dial)
                dial.peer = peer
                dial.done.set()
                await self._run_link(link)
        except ConnectError as exc:
            self._dial_failed(dial, "connect", str(exc))
        except Exception as exc:
            # Whatever else dialing a peer-supplied address raises must not end the node.
            log.warning("node %s: dialing %s failed", self._id, dial.address, exc_info=True)
            if not dial.done.is_set():
                self._dial_failed(dial, "error", repr(exc))

    def _dial_failed(self, dial: Dial, reason: str, detail: str) -> None:
        self._stats.dial_failures[reason] += 1
        log.info("node %s: dialing %s failed (%s): %s", self._id, dial.address, reason, detail)
        dial.error = reason
        dial.detail = detail
        dial.done.set()
        if dial.expected is not None:
            if self.dials.get(dial.expected.id) is dial:
                del self.dials[dial.expected.id]
            for message in dial.queue:
                self._stats.drop("unreachable", message)
            dial.queue.clear()
            dial.queued_bytes = 0
            link = self._links.get(dial.expected.id)
            if link is None or not link.is_open:
                self._link_down(dial.expected)

    def _link_down(self, peer: Peer, link: Link | None = None) -> None:
        if not self._closing():
            self._on_link_down(peer, link)

    def superseded_by(self, peer: Peer, link: Link | None) -> bool:
        """Whether news of `link` ending is stale: a newer link to `peer` came up since."""
        current = self._links.get(peer.id)
        return link is not None and current is not None and current is not link

    # --- links --------------------------------------------------------------------------

    def _new_link(self, conn: Connection, auth: Authenticated, *, outbound: bool) -> Link:
        node_link = auth.role == Role.NODE
        return Link(
            conn,
            auth.peer,
            role=auth.role,
            key=auth.key,
            outbound=outbound,
            config=self._config.link,
            stats=self._stats,
            on_message=self._on_message,
            pressure=self._pressure if node_link else None,
            health=self._health,
        )

    def _register(self, link: Link, dial: Dial | None = None) -> None:
        """Make `link` the link to its peer, resolving a duplicate, and flush queued sends."""
        peer_id = link.peer.id
        self._stats.links_established += 1
        old = self._links.get(peer_id)
        winner = link
        if old is not None and old.is_open:
            # Keep the connection dialed by the smaller id; the peer makes the same choice.
            keep_new = link.outbound == (self._id < peer_id)
            winner, loser = (link, old) if keep_new else (old, link)
            winner.take_over(loser.drain_queue())
            loser.retire("superseded")
            self._retired.add(loser)
        self._links[peer_id] = winner
        pending = self.dials.pop(peer_id, None)
        for d in {id(x): x for x in (pending, dial) if x is not None}.values():
            winner.take_over(d.queue)
            d.queue.clear()
            d.queued_bytes = 0

    async def _run_link(self, link: Link) -> None:
        # This task serves one peer until the link ends: label its records (and its reader's
        # and writer's) with that peer.
        PEER.set(link.peer.id)
        reason = "closed"
        try:
            reason = await link.run()
        finally:
            self._retired.discard(link)
            self._on_link_closed(link)
            self._stats.links_closed[reason] += 1
            if self._links.get(link.peer.id) is link:
                del self._links[link.peer.id]
                # A dial to the same peer in flight reports its own outcome: reporting this
                # old link's end would fail a peer whose new link is about to come up.
                if reason != "superseded" and link.peer.id not in self.dials:
                    log.info("node %s: link to %s closed (%s)", self._id, link.peer, reason)
                    self._link_down(link.peer, link)

    async def handle_incoming(self, conn: Connection) -> None:
        """Serve one accepted connection: handshake within its slot, then its link."""
        cfg = self._config.link
        slot = self._admission.enter(conn.remote)
        if slot is None:
            return
        try:
            # Counted while it waits for the node to be ready too: a burst at startup is
            # bounded like any other.
            with trio.move_on_after(cfg.handshake_timeout):
                await self._ready.wait()
            if not self._ready.is_set() or self._closing():
                return
            auth = await handshake_as_listener(
                conn,
                self._credentials(),
                timeout=self._health.timeout(cfg.handshake_timeout),
                hello_timeout=self._health.timeout(cfg.hello_timeout),
                accept=self._accept,
                admit=slot.admit,
            )
        except HandshakeError as exc:
            self._admission.refused(exc.reason, conn.remote, f": {exc}")
            return
        finally:
            slot.release()
        link = self._new_link(conn, auth, outbound=False)
        if auth.role == Role.CLIENT:
            self.clients.add(link)
            try:
                await link.run()
            finally:
                self.clients.discard(link)
            return
        self._register(link)
        await self._run_link(link)

    def _accept(self, hello: Hello) -> tuple[str, str] | None:
        if self._closing():
            return "closing", "node is shutting down"
        if hello.role == Role.NODE:
            taken = self._held_by_other_key(hello.node_id, hello.key)
            if taken is not None:
                return "id_taken", taken
        return None

    def _held_by_other_key(self, node_id: str, key: bytes) -> str | None:
        """Why `node_id` cannot be linked with `key`: an open link holds it with another key.

        In every trust mode an id is bound to its key while linked: another process with
        the cluster secret cannot take over a live node's links (and two nodes given one
        name cannot keep taking over each other's). The operator must give them distinct
        names; a node that restarted with a new key is accepted once its old link is gone.
        """
        current = self._links.get(node_id)
        if current is not None and current.is_open and current.key != key:
            return f"node id {node_id!r} is already linked with another key"
        return None

    async def wait_flushed(self) -> None:
        """Wait until the links now closing have sent what was queued on them."""
        for link in [link for link in self._links.values() if not link.is_open]:
            await link.closed.wait()

    async def sweep(self, wants_link: Callable[[str], bool]) -> None:
        """Close links nobody wants once idle for `linger` (runs until cancelled)."""
        linger = self._config.link.linger
        while True:
            await trio.sleep(linger / 2)
            now = trio.current_time()
            for link in list(self._retired):
                # The side that dialed a retired link closes it once it has gone quiet (the
                # other side only waits, so both never close at once mid-flight); the other
                # side gives up after a longer wait in case that close never comes.
                quiet = now - link.last_activity
                if quiet > (linger if link.outbound else 4 * linger):
                    link.fail("superseded")
            for link in list(self._links.values()):
                if (
                    link.is_open
                    and not wants_link(link.peer.id)
                    and now - link.last_activity > linger
                ):
                    link.close_soon()
