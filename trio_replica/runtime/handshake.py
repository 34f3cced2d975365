"""The handshake that authenticates a new link's peer: hellos, proofs, credentials.

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
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import secrets
from collections.abc import Callable

import attrs
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..core.messages import NONCE_BYTES, Hello, Message, Peer, Proof, Refuse, Role, Welcome
from ..core.wire import PROTOCOL_VERSION, decode_frame, encode_message, frame_from_parts
from ..errors import HandshakeError, WireError
from ..transports.base import Connection, TransportClosed
from .identity import Refused, TrustMode, TrustStore, format_key, public_bytes, verify

#: Largest handshake frame; a hello is a few hundred bytes.
HANDSHAKE_MAX_FRAME = 4096


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
        # Each node named by its id: the text also travels to the other side (`Refuse`),
        # and either end may hold the wrong secret.
        me = creds.me.id
        if not creds.secret:
            text = f"{me} has no cluster secret and {theirs.node_id} has one (--secret-file)"
        else:
            text = f"the cluster secrets of {me} and {theirs.node_id} differ"
        raise HandshakeError(text, reason="secret")
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
        # Each side named by its id: the text also travels to the other side (`Refuse`).
        raise HandshakeError(
            f"cluster names differ: {hello.node_id} is in {hello.cluster!r}, "
            f"{creds.me.id} in {creds.cluster!r}",
            reason="cluster",
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
