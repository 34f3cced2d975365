"""A link's outbox and flow control: the queues it sends from and the credit both ways.

Flow control (`trio_replica.runtime.flow`). Payload messages (gossip, sync chunks: the ones that
make work at the receiver; `Message.CREDITED`) travel on credit, as HTTP/2 and QUIC streams
do: each side grants the other a window (`window_messages`, `window_bytes`) with a `Credit`
message when the link starts, and grants more as its node *processes* what arrived (not as
it reads it). A sender never has more than the window unprocessed at the receiver, so the
backlog waits in the sender's outbox, where it is counted and slows the sender's writers,
instead of in kernel socket buffers (on loopback they grow to megabytes: with only TCP's
backpressure a 10-node cluster queued seconds of work there, and Plumtree's repair timers
fired on payloads that were merely queued). A peer that sends payloads beyond what it was
granted breaks the protocol and the link is failed (`flow_violation`): that is the budget
that stops one member from flooding a node's inbox.

The outbox has two queues, bounded in bytes and in messages: control messages, sent first,
and the rest (payloads, and IHAVE announcements, which must not overtake the payloads
queued before them: an IHAVE that did would get them grafted while they merely wait for
credit, a duplicate each; measured in a 10-node cluster under load, it broke the tree). A
message is encoded when it is queued, so the bounds count real bytes. `send_nowait` never
blocks: a payload message that does not fit is refused (False) and the caller decides what
that means (the broadcast layer announces the message lazily instead; nothing is dropped
here; the announcement itself is never refused). A control message that does not fit means
the peer has stopped reading our control traffic; dropping it would break a protocol
exchange, so the link is failed instead. While the payload outbox is over its high-water
mark the link holds the node's `Pressure`, which slows the node's writers; `send` waits for
room instead. Control messages are not credited; a peer that floods them is slowed by not
being read (the node makes the reader wait while that peer's share of a component's inbox
is full).
"""

from __future__ import annotations

import collections
import logging
from typing import TYPE_CHECKING

import trio

from ..core.messages import Credit, Message, Peer
from ..core.wire import FRAME_OVERHEAD, encode_message
from ..errors import LinkClosed
from .flow import Pressure
from .linkconfig import LinkConfig

if TYPE_CHECKING:
    from .stats import NodeStats

log = logging.getLogger("trio_replica.link")


class LinkFailure(Exception):
    """Internal: ends a link's tasks with a reason (a stable token for counters and logs)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail or reason)
        self.reason = reason


class Outbox:
    """The sending side of a link (`Link` is one): its two queues, the credit the peer
    granted, and the window we grant it; see the module docstring.

    `pressure` (the node's) is held while the payload outbox is over its high-water mark.
    """

    #: When a message other than liveness or credit last went into the outbox or came from
    #: the peer (an idle link is closed once membership no longer needs it); `Link` sets it
    #: when it starts.
    last_activity: float

    def __init__(
        self,
        peer: Peer,
        *,
        config: LinkConfig,
        stats: NodeStats,
        pressure: Pressure | None = None,
    ) -> None:
        self.peer = peer
        self.config = config
        self._stats = stats
        self._pressure = pressure
        # Queued messages with their encoding: the bounds count real bytes, and the writer
        # only joins parts.
        self._control: collections.deque[tuple[Message, bytes]] = collections.deque()
        self._payload: collections.deque[tuple[Message, bytes]] = collections.deque()
        self._control_bytes = 0
        self._payload_bytes = 0
        # Credit (module docstring). Ours to spend: granted by the peer, not yet used.
        self._credit_messages = 0
        self._credit_bytes = 0
        # The peer's: granted to it and not yet used; received and not yet processed; and
        # processed since our last grant.
        self._grant_messages = config.window_messages
        self._grant_bytes = config.window_bytes
        self._unprocessed = 0
        self._processed_messages = 0
        self._processed_bytes = 0
        self._wakeup = trio.Event()
        #: Senders waiting for payload room (`send`, `wait_room`).
        self._room = trio.lowlevel.ParkingLot()
        self._closing = False
        self._closed = False
        self.retired = False

    @property
    def is_open(self) -> bool:
        """True while the link accepts messages to send (not closing, closed or retired)."""
        return not (self._closing or self._closed or self.retired)

    def queued(self) -> int:
        return len(self._control) + len(self._payload)

    def queued_bytes(self) -> int:
        return self._control_bytes + self._payload_bytes

    @property
    def congested(self) -> bool:
        """The payload outbox is over its high-water mark."""
        return (
            len(self._payload) > self.config.outbox_high_items
            or self._payload_bytes > self.config.outbox_high_bytes
        )

    def send_nowait(self, message: Message, *, repair: bool = False) -> bool:
        """Queue `message`; return False if it does not fit (nothing queued, nothing counted).

        Never blocks. A payload message that does not fit is the caller's to handle; a
        control message that does not fit fails the link (see the module docstring). A
        `repair` (a payload the peer asked for with a GRAFT) may fill the outbox to twice
        its bounds: refused at the usual bound, answers to GRAFTs lost every race for a
        free slot to the continuous eager pushes, until their payloads left the cache.
        Raises `LinkClosed` if the link is closing or closed.
        """
        if not self.is_open:
            raise LinkClosed(f"link to {self.peer} is closed")
        return self._queue(message, encode_message(message), 2 if repair else 1)

    async def send(self, message: Message) -> None:
        """Queue `message`, waiting for room below the outbox's high-water mark.

        For bulk senders (a full sync, a control stream): they never push the outbox past
        its mark, so they never hold the node's pressure on their own, and a control stream
        never fills the control outbox (control messages wait while it is half full).
        Raises `LinkClosed` if the link is or becomes closed.
        """
        part = encode_message(message)
        await self.wait_room(len(part), control=message.CONTROL)
        if not self.is_open or not self._queue(message, part):
            raise LinkClosed(f"link to {self.peer} is closed")

    def _queue(self, message: Message, part: bytes, allowance: int = 1) -> bool:
        size = len(part)
        cfg = self.config
        if message.CONTROL:
            if (
                len(self._control) >= cfg.outbox_control
                or self._control_bytes + size > cfg.outbox_control_bytes
            ):
                self._stats.drop("outbox_full", message)
                log.warning(
                    "link to %s: control outbox full (%d messages, %d bytes): failing the link",
                    self.peer,
                    len(self._control),
                    self._control_bytes,
                )
                self.fail("outbox_full")
                return False
            self._control.append((message, part))
            self._control_bytes += size
        else:
            # One payload always fits an empty outbox, whatever its size (up to a frame).
            # An announcement always fits: it is what a refused payload becomes.
            if (
                message.CREDITED
                and self._payload
                and (
                    len(self._payload) >= allowance * cfg.outbox_payload
                    or self._payload_bytes + size > allowance * cfg.outbox_payload_bytes
                )
            ):
                return False
            self._payload.append((message, part))
            self._payload_bytes += size
            if self._pressure is not None and self.congested:
                self._pressure.hold(self, "link")
        self.last_activity = trio.current_time()
        self._wakeup.set()
        return True

    async def wait_room(self, size: int = 0, *, control: bool = False) -> None:
        """Return once the outbox has room for `size` more bytes below its mark (for the
        control outbox: below half its bounds); a checkpoint either way."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while self.is_open and not self._has_room(size, control):
            await self._room.park()
        if not self.is_open:
            raise LinkClosed(f"link to {self.peer} is closed")
        await trio.lowlevel.cancel_shielded_checkpoint()

    def _has_room(self, size: int, control: bool) -> bool:
        cfg = self.config
        if control:
            return (
                2 * len(self._control) < cfg.outbox_control
                and 2 * (self._control_bytes + size) <= cfg.outbox_control_bytes
            )
        if not self._payload:
            return True
        return (
            len(self._payload) < cfg.outbox_high_items
            and self._payload_bytes + size <= cfg.outbox_high_bytes
        )

    def processed(self, size: int) -> None:
        """The node is done with one payload message of `size` bytes from this peer (handled,
        or discarded): it may send another. Grants go back in batches (module docstring)."""
        cfg = self.config
        self._unprocessed -= 1
        self._processed_messages += 1
        self._processed_bytes += size
        if (
            4 * self._processed_messages >= cfg.window_messages
            or 4 * self._processed_bytes >= cfg.window_bytes
            or (
                # Nothing of the peer's left here and its grant is running low: it may be
                # waiting for this grant, so it goes now rather than with the next batch.
                self._unprocessed == 0
                and (
                    2 * self._grant_messages < cfg.window_messages
                    or 2 * self._grant_bytes < cfg.window_bytes
                )
            )
        ):
            self._grant(self._processed_messages, self._processed_bytes)
            self._processed_messages = self._processed_bytes = 0

    def _grant(self, messages: int, size: int) -> None:
        if self._closed:
            return
        self._grant_messages += messages
        self._grant_bytes += size
        # Straight into the control queue: a retired link (no longer sent on) must still
        # grant credit, since the peer may still be sending on it.
        # Whether we are congested rides along: our neighbour may be the first hop of a
        # flood we forward, and it cannot see our outboxes fill (credit returns on
        # processing, whatever our outboxes hold).
        congested = self._pressure is not None and self._pressure.congested()
        credit = Credit(messages, size, congested)
        part = encode_message(credit)
        self._control.append((credit, part))
        self._control_bytes += len(part)
        self._wakeup.set()

    def _spend_grant(self, size: int) -> None:
        """The peer sent us a payload message: it must have had the credit for it."""
        self._grant_messages -= 1
        self._grant_bytes -= size
        self._unprocessed += 1
        # A message may overdraw the byte grant by less than one frame (the sender needs
        # only some credit left to send it), never the message grant.
        if self._grant_messages < 0 or self._grant_bytes <= -self.config.max_frame:
            self._stats.reject("flow_violation")
            raise LinkFailure(
                "flow_violation",
                f"{self.peer} sent payloads beyond the credit we granted "
                f"({-self._grant_messages} messages, {-self._grant_bytes} bytes over)",
            )

    def take_over(self, messages: list[Message]) -> None:
        """Queue messages already accepted for this peer elsewhere (the other of two links to
        it, or the queue of a dial): whatever the bounds, since refusing them now would
        lose them. They are bounded by where they came from."""
        for message in messages:
            if not self.is_open:
                self._stats.drop("link_closed", message)
                continue
            part = encode_message(message)
            queue = self._control if message.CONTROL else self._payload
            queue.append((message, part))
            if message.CONTROL:
                self._control_bytes += len(part)
            else:
                self._payload_bytes += len(part)
        if messages:
            if self._pressure is not None and self.congested:
                self._pressure.hold(self, "link")
            self._wakeup.set()

    def drain_queue(self) -> list[Message]:
        """Take every queued message out (to move them to another link to the same peer)."""
        out = [message for message, _ in (*self._control, *self._payload)]
        self._control.clear()
        self._payload.clear()
        self._control_bytes = self._payload_bytes = 0
        self._drained()
        return out

    def _on_credit(self, credit: Credit) -> None:
        if credit.congested and self._pressure is not None:
            self._pressure.peer_congested(self.peer.id)
        self._credit_messages += credit.messages
        self._credit_bytes += credit.size
        if self._payload:
            self._wakeup.set()

    def _take_batch(self) -> list[bytes]:
        """Pop messages, control first, while their encoded sizes fit in one frame.

        A message that does not fit goes back to the head of its queue for the next frame.
        A message too big for any frame cannot have been queued by a caller that checks
        sizes; if one is, it is dropped and counted rather than allowed to break the link.
        """
        budget = self.config.max_frame - FRAME_OVERHEAD
        parts: list[bytes] = []
        for queue in (self._control, self._payload):
            control = queue is self._control
            while queue:
                message, part = queue[0]
                size = len(part)
                if message.CREDITED and (self._credit_messages < 1 or self._credit_bytes <= 0):
                    break  # no credit: the rest waits here, counted, until the peer grants
                if size > budget:
                    if parts:
                        break
                    queue.popleft()
                    self._account_taken(control, size)
                    self._stats.drop("larger_than_frame", message)
                    log.error(
                        "dropped a %s of %d bytes for %s: larger than a frame",
                        type(message).__name__,
                        size,
                        self.peer,
                    )
                    continue
                queue.popleft()
                self._account_taken(control, size)
                if message.CREDITED:
                    self._credit_messages -= 1
                    self._credit_bytes -= size
                budget -= size
                parts.append(part)
                self._stats.message_sent(message, size)
        if parts:
            self._drained()
        return parts

    def _account_taken(self, control: bool, size: int) -> None:
        if control:
            self._control_bytes -= size
        else:
            self._payload_bytes -= size

    def _drained(self) -> None:
        """Messages left the outbox: wake senders waiting for room, release the pressure."""
        self._room.unpark_all()
        if self._pressure is not None and not self.congested:
            self._pressure.release(self)

    def fail(self, reason: str) -> None:
        """Tear the link down (`Link.fail`): a full control outbox does."""
        raise NotImplementedError
