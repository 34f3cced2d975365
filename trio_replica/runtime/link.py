"""One authenticated link to a peer: the handshake, the outbox, the reader and the writer.

Theory of operation
-------------------
A link starts on a transport connection (dialed or accepted). The handshake runs first,
under one deadline, before any protocol message is read:

1. dialer -> listener: ``Hello(version, cluster, id, address, role, nonce_d, key_d, ...)``
2. listener -> dialer: ``Hello(..., nonce_l, key_l, ..., proof_l, signature_l)``
3. dialer -> listener: ``Proof(proof_d, signature_d)``
4. listener -> dialer: ``Welcome()`` (or ``Refuse(reason)`` at any step, then close)

The transcript binds the cluster name, both nonces, ids, addresses and public keys (and
key endorsements), and under ``wss://`` the TLS channel (``tls-unique``, the same on both
ends of one TLS session and different on each side of a man in the middle). Each side
proves it with an HMAC-SHA256 under the cluster secret (membership) and an Ed25519
signature under its node key (identity), with a side label so neither can be replayed or
reflected. The trust store (identity.py) then decides whether that key may use that node
id. A peer that does not know the secret learns nothing and gets no further than step 2 or
3; it is refused with a clear reason and counted.

Once established, a link runs two tasks (STYLE.md: trio-websocket's send has no buffer and
a full inbound queue stops pongs and close frames, so reading and writing never share a
task):

* the **reader** decodes each frame strictly, counts and drops malformed ones (closing the
  link after too many), and hands each message to the node;
* the **writer** drains a bounded outbox, control messages ahead of payload messages,
  batching as many as fit in one frame; it sends a ping when the link has been quiet for
  `ping_interval`, and fails the link when nothing was received for `idle_timeout` or when
  one send blocks for `send_timeout` (the peer reads nothing: the HyParView paper expels
  slow peers so blocking does not spread).

Liveness is one-way per direction: each side pings only while it has nothing else to send,
and any frame received proves the peer alive. A ping is therefore never answered: a pong
would only repeat what the peer's own pings (or traffic) already tell, and on an idle link
answering doubled the frames (measured with 25 idle nodes: 249 pings and 249 pongs a
second). `Pong` stays a valid message, so a peer that still answers is not refused. Pings
do not count as activity for `last_activity`, so a link that carries nothing but pings is
idle and the node closes it once membership no longer needs it.

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
import contextlib
import hashlib
import hmac
import logging
import math
import secrets
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import attrs
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from transports.base import Connection, TransportClosed

from ..core.messages import (
    NONCE_BYTES,
    Credit,
    Hello,
    Message,
    Peer,
    Ping,
    Pong,
    Proof,
    Refuse,
    Role,
    Welcome,
)
from ..core.wire import (
    DEFAULT_MAX_FRAME,
    FRAME_OVERHEAD,
    PROTOCOL_VERSION,
    decode_frame,
    decode_frame_sized,
    encode_message,
    frame_from_parts,
)
from ..errors import ConfigError, HandshakeError, LinkClosed, MessageTooLarge, WireError
from .flow import Pressure
from .identity import Refused, TrustMode, TrustStore, format_key, public_bytes, verify

if TYPE_CHECKING:
    from .health import LoopHealth
    from .stats import NodeStats

log = logging.getLogger("trio_replica.link")

#: Grid of the writers' ping and idle deadlines, in seconds (at most a quarter of the ping
#: interval): a ping goes out up to this much after it is due, and a silent peer is failed up
#: to this much after `idle_timeout`.
PING_TICK = 0.25


def _on_grid(at: float, tick: float) -> float:
    """`at` rounded up to a multiple of `tick`, never earlier than `at` itself."""
    return max(at, math.ceil(at / tick) * tick)


#: Messages that only prove the peer alive (`Pong` from peers that still answer pings).
_LIVENESS = frozenset((Ping, Pong))

#: Largest handshake frame; a hello is a few hundred bytes.
HANDSHAKE_MAX_FRAME = 4096


@attrs.frozen
class LinkConfig:
    """Timers and bounds of every link. Defaults detect a dead peer in about 4 s."""

    #: Whole handshake deadline, each side.
    handshake_timeout: float = 5.0
    #: Dial deadline (TCP + TLS + websocket upgrade).
    connect_timeout: float = 5.0
    #: A link quiet for this long in our direction sends a ping (on the `PING_TICK` grid, so
    #: up to a quarter second later). Pings are not answered: the peer's own pings carry the
    #: other direction.
    ping_interval: float = 1.0
    #: Nothing received for this long: the peer is suspected. Three to four missed pings
    #: (SPEC 3: a few seconds, not the ~60 s barrel_p2p inherits from Erlang distribution
    #: ticks). Stretched while our loop or the peer's lags (health.py).
    idle_timeout: float = 4.0
    #: A suspected peer still silent this much longer is failed; any frame from it first
    #: clears the suspicion (counted: `suspicions_cleared`). Also stretched with lag.
    suspicion_timeout: float = 2.0
    #: One frame send blocked this long with nothing received from the peer meanwhile: the
    #: peer is failed. A peer that keeps talking but reads slowly is busy, not dead (its
    #: inbox makes its readers wait: backpressure); one that never reads fills our control
    #: outbox and is failed for that (`outbox_full`).
    send_timeout: float = 5.0
    #: Payload messages (gossip, sync chunks) waiting in one outbox, and their bytes: a
    #: payload that would pass either bound is refused (the broadcast layer then announces
    #: it lazily, so the peer grafts it later).
    outbox_payload: int = 1024
    outbox_payload_bytes: int = 4 * 1024 * 1024
    #: High-water mark of the payload outbox: above either, the link holds the node's
    #: pressure (writers wait, readers holding payloads wait a bounded time). A frame
    #: carries every queued message that fits, so a few frames' worth keeps the link busy;
    #: more only adds latency (a payload waiting here past timeout1 is grafted again).
    outbox_high_items: int = 128
    outbox_high_bytes: int = 1024 * 1024
    #: Control messages waiting in one outbox, and their bytes. Reaching either means the
    #: peer reads none of our control traffic: the link is failed (nothing is dropped).
    outbox_control: int = 4096
    outbox_control_bytes: int = 4 * 1024 * 1024
    #: Payload messages and bytes a peer may have sent us and we have not processed yet
    #: (the credit window we grant; module docstring). Small: on one machine or a LAN the
    #: link needs little in flight to stay busy, and anything beyond is queueing delay that
    #: Plumtree's timeout1 reads as a missing payload. A message larger than the byte window
    #: still goes, alone.
    window_messages: int = 64
    window_bytes: int = 1024 * 1024
    #: Largest frame sent or accepted, in bytes.
    max_frame: int = DEFAULT_MAX_FRAME
    #: Malformed frames tolerated on one link before it is closed.
    max_bad_frames: int = 8
    #: A link that membership no longer needs is closed after this long without traffic.
    linger: float = 2.0
    #: Bound on the shielded close of a link.
    close_timeout: float = 1.0
    #: Dials a node starts per second, and in one burst (dialing.py); 0 is no limit. A
    #: forming node needs a handful; more is a storm that starves live links.
    dial_rate: float = 5.0
    dial_burst: int = 10
    #: Dials in progress at once (peers can make us dial addresses they name), and messages
    #: queued for one of them.
    max_dials: int = 64
    dial_queue_messages: int = 256
    #: Incoming handshakes in progress at once; more are refused (`too_many`). A
    #: connection takes one of these until its hello says what it is; a control client
    #: then moves to its own `max_client_handshakes` slots, so that clients cannot crowd
    #: out nodes (`client_slots`). At most `max_handshakes_per_host` come from one remote
    #: address (`host_slots`).
    max_handshakes: int = 128
    max_client_handshakes: int = 16
    max_handshakes_per_host: int = 32
    #: An accepted connection must send its hello within this (a silent one holds a slot).
    hello_timeout: float = 2.0

    def __attrs_post_init__(self) -> None:
        for name in (
            "handshake_timeout",
            "connect_timeout",
            "ping_interval",
            "idle_timeout",
            "suspicion_timeout",
            "send_timeout",
            "linger",
            "close_timeout",
            "hello_timeout",
        ):
            if not getattr(self, name) > 0:
                raise ConfigError(f"link.{name} must be positive")
        if not (math.isfinite(self.dial_rate) and self.dial_rate >= 0):
            raise ConfigError("link.dial_rate must be >= 0")
        for name in (
            "dial_burst",
            "max_dials",
            "dial_queue_messages",
            "max_handshakes",
            "max_client_handshakes",
            "max_handshakes_per_host",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"link.{name} must be at least 1")
        if self.idle_timeout <= self.ping_interval:
            raise ConfigError("link.idle_timeout must exceed link.ping_interval")
        for name in (
            "outbox_payload",
            "outbox_payload_bytes",
            "outbox_high_items",
            "outbox_high_bytes",
            "outbox_control",
            "outbox_control_bytes",
            "window_messages",
            "window_bytes",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"link.{name} must be at least 1")
        if (
            self.outbox_high_items > self.outbox_payload
            or self.outbox_high_bytes > self.outbox_payload_bytes
        ):
            raise ConfigError("link outbox high-water marks must not exceed the outbox bounds")
        if self.max_frame < HANDSHAKE_MAX_FRAME:
            raise ConfigError(f"link.max_frame must be at least {HANDSHAKE_MAX_FRAME}")


# --- handshake -----------------------------------------------------------------------------


@attrs.frozen
class Credentials:
    """What a node proves and checks in every handshake.

    `secret` is the cluster secret this side proves; `accepted` are further secrets whose
    proofs it accepts (a keyring: rotate the cluster secret by adding the new one to
    `accepted` everywhere, then making it `secret` everywhere, then dropping the old one).
    `key` signs the transcript; `endorsement` is the previous key's, during a rotation.
    `trust` decides which key each node id may use (None: any key, as in ``secret`` mode).
    """

    cluster: str
    secret: bytes
    me: Peer
    key: Ed25519PrivateKey = attrs.field(factory=Ed25519PrivateKey.generate, repr=False)
    accepted: tuple[bytes, ...] = ()
    endorsement: bytes = b""
    trust: TrustStore | None = None
    #: Our public key (derived from `key`).
    public: bytes = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "public", public_bytes(self.key))

    def proves(self, side: bytes, transcript: bytes, proof: bytes) -> bool:
        """True if `proof` is the HMAC of `transcript` under any secret of the keyring."""
        ok = False
        for secret in (self.secret, *self.accepted):
            ok |= hmac.compare_digest(_proof(secret, side, transcript), proof)
        return ok


def _transcript(cluster: str, binding: bytes, dialer: Hello, listener: Hello) -> bytes:
    """Everything both sides said, bound to the TLS channel (empty binding over ws://)."""
    parts = [
        b"trio_replica handshake v2",
        cluster.encode(),
        binding,
        dialer.node_id.encode(),
        dialer.address.encode(),
        dialer.role.encode(),
        dialer.nonce,
        dialer.key,
        dialer.endorsement,
        listener.node_id.encode(),
        listener.address.encode(),
        listener.nonce,
        listener.key,
        listener.endorsement,
    ]
    # Length-prefix every part so that no two different transcripts serialise alike.
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def _proof(secret: bytes, side: bytes, transcript: bytes) -> bytes:
    return hmac.new(secret, side + transcript, hashlib.sha256).digest()


def _sign(creds: Credentials, side: bytes, transcript: bytes) -> tuple[bytes, bytes]:
    """Our (proof, signature) of the transcript, with a side label against reflection."""
    return _proof(creds.secret, side, transcript), creds.key.sign(side + transcript)


def _check_proofs(
    creds: Credentials,
    side: bytes,
    transcript: bytes,
    theirs: Hello,
    proof: bytes,
    signature: bytes,
) -> None:
    """Check the peer's secret proof, key signature and key; raise `HandshakeError`."""
    if not creds.proves(side, transcript, proof):
        raise HandshakeError("peer failed to prove the cluster secret", reason="secret")
    if not verify(theirs.key, signature, side + transcript):
        raise HandshakeError(
            f"{theirs.node_id} failed to prove its key {format_key(theirs.key)}", reason="signature"
        )
    if creds.trust is None:
        return
    if theirs.role == Role.NODE:
        try:
            creds.trust.check(theirs.node_id, theirs.key, theirs.endorsement)
        except Refused as exc:
            raise HandshakeError(str(exc), reason=exc.reason) from None
    elif creds.trust.mode == TrustMode.ALLOWLIST and not creds.trust.knows_key(theirs.key):
        # A control client can write as the node it talks to: under an allow-list the
        # secret alone does not admit it either.
        raise HandshakeError(
            f"client key {format_key(theirs.key)} is not in the allow-list", reason="not_allowed"
        )


async def _send_one(conn: Connection, message: Message) -> None:
    await conn.send(frame_from_parts([encode_message(message)]))


async def _send_step(conn: Connection, message: Message) -> None:
    """Send one handshake message; a closed connection is a failed handshake."""
    try:
        await _send_one(conn, message)
    except TransportClosed:
        raise HandshakeError(
            "peer closed the connection during the handshake", reason="closed"
        ) from None


async def _receive_one(conn: Connection) -> Message:
    try:
        frame = await conn.receive()
    except TransportClosed:
        raise HandshakeError(
            "peer closed the connection during the handshake", reason="closed"
        ) from None
    try:
        messages = decode_frame(frame, max_frame=HANDSHAKE_MAX_FRAME)
    except WireError as exc:
        raise HandshakeError(f"malformed handshake frame: {exc}", reason="malformed") from None
    if len(messages) != 1:
        raise HandshakeError("handshake frames carry exactly one message", reason="malformed")
    return messages[0]


async def _refuse(conn: Connection, error: HandshakeError) -> HandshakeError:
    """Tell the peer why (best effort, bounded), then hand the error back to raise."""
    with trio.move_on_after(1.0), contextlib.suppress(TransportClosed):
        await _send_one(conn, Refuse(str(error)[:200]))
    return error


def _check_hello(hello: Message, creds: Credentials) -> Hello:
    if not isinstance(hello, Hello):
        raise HandshakeError(f"expected Hello, got {type(hello).__name__}", reason="malformed")
    if hello.version != PROTOCOL_VERSION:
        raise HandshakeError(
            f"protocol version {hello.version} is not ours ({PROTOCOL_VERSION})", reason="version"
        )
    if hello.cluster != creds.cluster:
        raise HandshakeError(
            f"peer is in cluster {hello.cluster!r}, we are in {creds.cluster!r}", reason="cluster"
        )
    if hello.node_id == creds.me.id:
        raise HandshakeError(f"peer uses our own node id {hello.node_id!r}", reason="duplicate_id")
    return hello


def _hello(creds: Credentials, role: str) -> Hello:
    return Hello(
        PROTOCOL_VERSION,
        creds.cluster,
        creds.me.id,
        creds.me.address,
        role,
        secrets.token_bytes(NONCE_BYTES),
        creds.public,
        creds.endorsement,
        b"",
        b"",
    )


@attrs.frozen
class Authenticated:
    """The outcome of a handshake: who the peer is, as what, and the key it proved."""

    peer: Peer
    role: str
    key: bytes


async def handshake_as_dialer(
    conn: Connection, creds: Credentials, *, role: str, timeout: float
) -> Authenticated:
    """Run the dialer side; return the authenticated peer or raise `HandshakeError`."""
    with trio.move_on_after(timeout) as scope:
        mine = _hello(creds, role)
        await _send_step(conn, mine)
        reply = await _receive_one(conn)
        if isinstance(reply, Refuse):
            raise HandshakeError(f"peer refused us: {reply.reason}", reason="refused")
        try:
            theirs = _check_hello(reply, creds)
            if theirs.role != Role.NODE or not theirs.address or not theirs.proof:
                raise HandshakeError(
                    "the listening side must be a node with an address and a proof",
                    reason="malformed",
                )
            unsigned = attrs.evolve(theirs, proof=b"", signature=b"")
            transcript = _transcript(creds.cluster, conn.channel_binding, mine, unsigned)
            _check_proofs(creds, b"L", transcript, theirs, theirs.proof, theirs.signature)
        except HandshakeError as exc:
            raise await _refuse(conn, exc) from None
        await _send_step(conn, Proof(*_sign(creds, b"D", transcript)))
        final = await _receive_one(conn)
        if isinstance(final, Refuse):
            raise HandshakeError(f"peer refused us: {final.reason}", reason="refused")
        if not isinstance(final, Welcome):
            raise HandshakeError(
                f"expected Welcome, got {type(final).__name__}", reason="malformed"
            )
        return Authenticated(Peer(theirs.node_id, theirs.address), Role.NODE, theirs.key)
    assert scope.cancelled_caught
    raise HandshakeError(f"handshake did not finish within {timeout} s", reason="timeout")


async def handshake_as_listener(
    conn: Connection,
    creds: Credentials,
    *,
    timeout: float,
    accept: Callable[[Hello], tuple[str, str] | None],
    hello_timeout: float | None = None,
    admit: Callable[[Hello], str | None] | None = None,
) -> Authenticated:
    """Run the listener side; return the authenticated peer or raise `HandshakeError`.

    The dialer's hello must come within `hello_timeout` (default: `timeout`). `admit(hello)`
    is asked as soon as it has come, before any cryptography; it returns a refusal reason
    (a counter label, e.g. no free slot for its role) or None. `accept(hello)` is asked
    after authentication; it returns a refusal as (reason, message) (for example the id is
    linked already with another key) or None to accept.
    """
    with trio.move_on_after(timeout) as scope:
        first: Message | None = None
        with trio.move_on_after(timeout if hello_timeout is None else hello_timeout):
            first = await _receive_one(conn)
        if first is None:
            waited = timeout if hello_timeout is None else hello_timeout
            raise HandshakeError(f"no hello within {waited:.1f} s", reason="silent")
        try:
            theirs = _check_hello(first, creds)
            refused = admit(theirs) if admit is not None else None
            if refused is not None:
                raise HandshakeError(f"too many {theirs.role} handshakes here", reason=refused)
            if theirs.proof:
                raise HandshakeError("dialer hello must not carry a proof", reason="malformed")
            if theirs.role == Role.NODE and not theirs.address:
                raise HandshakeError(
                    "a node must announce the address it listens on", reason="malformed"
                )
        except HandshakeError as exc:
            raise await _refuse(conn, exc) from None
        mine = _hello(creds, Role.NODE)
        transcript = _transcript(creds.cluster, conn.channel_binding, theirs, mine)
        proof, signature = _sign(creds, b"L", transcript)
        await _send_step(conn, attrs.evolve(mine, proof=proof, signature=signature))
        answer = await _receive_one(conn)
        if isinstance(answer, Refuse):
            raise HandshakeError(f"peer refused us: {answer.reason}", reason="refused")
        try:
            if not isinstance(answer, Proof):
                raise HandshakeError(
                    f"expected Proof, got {type(answer).__name__}", reason="malformed"
                )
            _check_proofs(creds, b"D", transcript, theirs, answer.proof, answer.signature)
            refusal = accept(theirs)
            if refusal is not None:
                raise HandshakeError(refusal[1], reason=refusal[0])
        except HandshakeError as exc:
            raise await _refuse(conn, exc) from None
        await _send_step(conn, Welcome())
        return Authenticated(Peer(theirs.node_id, theirs.address), theirs.role, theirs.key)
    assert scope.cancelled_caught
    raise HandshakeError(f"handshake did not finish within {timeout} s", reason="timeout")


# --- established link ----------------------------------------------------------------------


class LinkFailure(Exception):
    """Internal: ends a link's tasks with a reason (a stable token for counters and logs)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail or reason)
        self.reason = reason


MessageHandler = Callable[["Link", Message, int], Awaitable[None]]


class Link:
    """An established, authenticated link to `peer`; see the module docstring.

    Owned by the node: it runs `run()` in a task of the node's nursery and gets the reason
    back when the link ends. Cancelling `run()` closes the connection (shielded, bounded).
    `pressure` (the node's) is held while the payload outbox is over its high-water mark.
    """

    def __init__(
        self,
        conn: Connection,
        peer: Peer,
        *,
        role: str,
        outbound: bool,
        config: LinkConfig,
        key: bytes = b"",
        stats: NodeStats,
        on_message: MessageHandler,
        pressure: Pressure | None = None,
        health: LoopHealth | None = None,
    ) -> None:
        self.conn = conn
        self.peer = peer
        self.role = role
        self.outbound = outbound
        #: The public key the peer proved in the handshake.
        self.key = key
        self.config = config
        self._stats = stats
        self._on_message = on_message
        self._pressure = pressure
        self._health = health
        #: The peer's loop lag as its last ping said (seconds), and whether its silence
        #: has made it suspect.
        self.peer_lag = 0.0
        self.suspected = False
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
        now = trio.current_time()
        self.established_at = now
        self.last_received = now
        self.last_sent = now
        self.last_activity = now
        self._ping_nonce = 0
        #: True while the writer is in a send: a deadline firing then is a send timeout.
        self._sending = False
        #: The writer's cancel scope, whose deadline the reader pushes on while a send is
        #: blocked and the peer still talks (`send_timeout`).
        self._write_scope: trio.CancelScope | None = None
        self._bad_frames = 0
        self._handing_over = False
        self.retired = False
        self.close_reason: str | None = None
        #: Set once `run()` has returned and the connection is closed.
        self.closed = trio.Event()

    def __repr__(self) -> str:
        return f"<Link {'to' if self.outbound else 'from'} {self.peer}>"

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
        credit = Credit(messages, size)
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

    def close_soon(self) -> None:
        """Flush what is queued, then close (used after a Disconnect or for idle links)."""
        self._closing = True
        self._wakeup.set()
        self._room.unpark_all()

    async def run(self) -> str:
        """Run the reader and writer until the link ends; return why it ended."""
        reason = "closed"
        # Our window, granted before anything else goes out.
        self._grant_messages = self._grant_bytes = 0
        self._grant(self.config.window_messages, self.config.window_bytes)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._reader)
                nursery.start_soon(self._writer)
        except* LinkFailure as group:
            first = group.exceptions[0]
            assert isinstance(first, LinkFailure)
            reason = first.reason
        finally:
            self._closed = True
            self._closing = True
            self._room.unpark_all()
            if self._pressure is not None:
                self._pressure.release(self)
            for message, _ in self._payload:
                # Waiting for credit the peer never gave: the link is gone, so are they.
                self._stats.drop("link_closed", message)
            self._payload.clear()
            self._payload_bytes = 0
            with trio.move_on_after(self.config.close_timeout) as cleanup:
                cleanup.shield = True
                await self.conn.aclose()
        if self.close_reason is None:
            self.close_reason = reason
        self.closed.set()
        return self.close_reason

    def retire(self, reason: str) -> None:
        """Stop taking messages, but keep reading (and pinging) until the link is closed.

        Used for the losing one of two links to the same peer: frames the peer sent on it
        before it learned of the other link are still in flight and must be delivered.
        """
        self.retired = True
        self._room.unpark_all()
        if self.close_reason is None:
            self.close_reason = reason

    def fail(self, reason: str) -> None:
        """Record why the link is being torn down by its owner (before cancelling `run`)."""
        if self.close_reason is None:
            self.close_reason = reason
        self._closing = True
        self._wakeup.set()
        self._room.unpark_all()
        if self._sending and self._write_scope is not None:
            # A send blocked on a peer that reads nothing would hold the link open.
            self._write_scope.cancel()

    async def _reader(self) -> None:
        while True:
            try:
                frame = await self.conn.receive()
            except TransportClosed:
                if self._closing:
                    self.close_reason = self.close_reason or "local_close"
                raise LinkFailure(self.close_reason or "peer_closed") from None
            now = trio.current_time()
            self.last_received = now
            if self._sending and self._write_scope is not None and not self._closing:
                # The peer talks while our send is blocked: it is slow, not gone.
                self._write_scope.deadline = max(
                    self._write_scope.deadline, now + self._timeout(self.config.send_timeout, now)
                )
            if self.suspected:
                self.suspected = False
                self._stats.flow["suspicions_cleared"] += 1
                log.info("link to %s: suspicion cleared, the peer spoke", self.peer)
            self._stats.frame_received(len(frame))
            try:
                messages = decode_frame_sized(frame, max_frame=self.config.max_frame)
            except WireError as exc:
                self._bad_frames += 1
                self._stats.reject(exc.reason)
                log.warning("rejected frame from %s (%s): %s", self.peer, exc.reason, exc)
                if self._bad_frames >= self.config.max_bad_frames:
                    raise LinkFailure(
                        "bad_frames", f"{self._bad_frames} malformed frames"
                    ) from None
                continue
            self._handing_over = True
            try:
                for message, size in messages:
                    self._stats.message_received(message, size)
                    kind = type(message)
                    if kind in _LIVENESS:
                        # The frame refreshed last_received; that is all a ping is for,
                        # with the peer's word on its own loop.
                        if kind is Ping:
                            assert isinstance(message, Ping)
                            self.peer_lag = message.lag_ms / 1000
                        continue
                    if kind is Credit:
                        assert isinstance(message, Credit)
                        self._on_credit(message)
                        continue
                    if message.CREDITED:
                        self._spend_grant(size)
                    self.last_activity = now
                    await self._on_message(self, message, size)
            finally:
                self._handing_over = False
                # Waiting for a busy component is our delay, not the peer's silence.
                self.last_received = trio.current_time()

    def _on_credit(self, credit: Credit) -> None:
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

    async def _writer(self) -> None:
        # One cancel scope serves many frames: its deadline is moved (to the next ping or
        # idle check while waiting, to the send timeout while sending) instead of a new scope
        # per wait and per send, which cost more than the send itself on small frames. A
        # deadline that fires ends the scope; a new one is opened unless it was a send's.
        while True:
            with trio.CancelScope() as scope:
                await self._write_frames(scope)
            if self._sending:
                raise LinkFailure(
                    "send_timeout", f"a send blocked for {self.config.send_timeout} s"
                )

    async def _write_frames(self, scope: trio.CancelScope) -> None:
        self._write_scope = scope
        cfg = self.config
        tick = min(PING_TICK, cfg.ping_interval / 4)
        while True:
            if scope.cancel_called:
                # The wait's deadline passed after something had already woken us (a
                # lagging loop runs us late): a cancelled scope stays cancelled even if its
                # deadline moves, so the next send would be cut at once and read as a send
                # timeout. Start a new scope instead.
                return
            now = trio.current_time()
            if self._handing_over:
                self.last_received = now
            silent_until = self._silence_deadline(now)
            if now >= silent_until:
                if not self.suspected:
                    self.suspected = True
                    self._stats.flow["suspicions"] += 1
                    log.info(
                        "link to %s: suspected, silent for %.1f s",
                        self.peer,
                        now - self.last_received,
                    )
                    silent_until = self._silence_deadline(now)
                if now >= silent_until:
                    raise LinkFailure(
                        "idle_timeout", f"nothing received for {now - self.last_received:.1f} s"
                    )
            parts = self._take_batch() if self._control or self._payload else []
            # The wait's deadline is never before this instant (`_on_grid`), so float
            # rounding cannot make the writer wake for a ping it then finds not due (a busy
            # loop on a mock clock).
            if not parts and not self._closing and now >= self.last_sent + cfg.ping_interval:
                self._ping_nonce += 1
                lag = self._health.recent_lag(now) if self._health is not None else 0.0
                ping = Ping(self._ping_nonce, min(round(lag * 1000), 2**32))
                part = encode_message(ping)
                self._stats.message_sent(ping, len(part))
                parts = [part]
            if parts:
                await self._send_frame(scope, frame_from_parts(parts))
                continue
            if self._closing:
                raise LinkFailure(self.close_reason or "local_close")
            # Sleep until there is something to send, a ping is due, or the peer has been
            # silent too long; no periodic wake-ups in between. The deadline is rounded up
            # to a grid shared by every link of the process, so that the pings of idle
            # links go out together: one scheduler wake-up (and one on the receiving side)
            # serves many links instead of one each.
            self._wakeup = trio.Event()
            scope.deadline = _on_grid(min(self.last_sent + cfg.ping_interval, silent_until), tick)
            await self._wakeup.wait()

    def _timeout(self, base: float, now: float) -> float:
        """`base` stretched while our loop or the peer's lags (health.py)."""
        if self._health is None:
            return base
        return self._health.timeout(base, self.peer_lag, now)

    def _silence_deadline(self, now: float) -> float:
        """When the peer's silence makes it suspect, or, once suspected, failed."""
        cfg = self.config
        deadline = self.last_received + self._timeout(cfg.idle_timeout, now)
        if self.suspected:
            deadline += self._timeout(cfg.suspicion_timeout, now)
        return deadline

    async def _send_frame(self, scope: trio.CancelScope, frame: bytes) -> None:
        now = trio.current_time()
        scope.deadline = now + self._timeout(self.config.send_timeout, now)
        self._sending = True
        try:
            await self.conn.send(frame)
        except TransportClosed:
            raise LinkFailure(self.close_reason or "peer_closed") from None
        except MessageTooLarge as exc:
            # The transport's frame limit is below ours: a configuration mismatch.
            raise LinkFailure("frame_too_large", str(exc)) from None
        self._sending = False
        self._stats.frame_sent(len(frame))
        self.last_sent = trio.current_time()
