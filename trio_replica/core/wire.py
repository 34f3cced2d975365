"""The wire codec: messages to CBOR frames and back, with a decoder that trusts nothing.

A frame is one CBOR array ``[version, msg, msg, ...]``; each message is a positional array
``[kind, field, ...]`` (see `trio_replica.core.messages`). Several small messages share a frame so
that control traffic costs one websocket message per batch, not per message.

Decoding is strict because every frame comes from a peer we do not control (SPEC section 2,
and the cbor2 traps in STYLE.md): the frame size is checked before parsing; cbor2 runs with a
small `max_depth`, no indefinite lengths, no duplicate map keys, only text or byte map keys,
and every semantic tag refused (dates, bignums, regexes, MIME, shared values, string refs);
trailing bytes are refused; then every field is checked for type and range. Anything wrong
raises `WireError` with a stable `reason`; nothing else escapes the decoder.

Application payloads (`Gossip.payload`) are CBOR nested inside the frame as a byte string;
`encode_payload` / `decode_payload` apply the same rules to them.

The strict CBOR rules live in `trio_replica.core.strict_cbor`, the field checks in
`trio_replica.core.wire_fields` and the positional form of each message in
`trio_replica.core.wire_positional`; this module owns the payload codec, the checks of
addresses and peers, the decoder of each message kind, frames and chunks.
"""

from __future__ import annotations

import io
import ipaddress
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import cbor2

from ..errors import MessageTooLarge, WireError
from .messages import (
    ENDORSEMENT_BYTES,
    GOSSIP_SIGNATURE_BYTES,
    KEY_BYTES,
    MAX_ADDRESS,
    MAX_CLUSTER,
    MAX_OP,
    MAX_REASON,
    MAX_ROUND,
    MAX_SHUFFLE_PEERS,
    MAX_TAG,
    MAX_TTL,
    NONCE_BYTES,
    PROOF_BYTES,
    SIGNATURE_BYTES,
    U64,
    ControlReply,
    ControlRequest,
    Credit,
    Direct,
    DirectReply,
    Disconnect,
    ForwardJoin,
    Gossip,
    Graft,
    Hello,
    IHave,
    Join,
    Message,
    Neighbor,
    NeighborReply,
    Peer,
    Ping,
    Pong,
    Proof,
    Prune,
    Refuse,
    Role,
    Shuffle,
    ShuffleReply,
    SyncChunk,
    SyncDigest,
    SyncRequest,
    Welcome,
    address_host,
)
from .strict_cbor import REFUSE_TAGS, check_plain, refuse_tag_hook, strict_loads
from .wire_fields import (
    check_bool,
    check_bytes,
    check_digest_round,
    check_fixed_bytes,
    check_ihave,
    check_int,
    check_list,
    check_message_id,
    check_node_id,
    check_str,
    fail_field,
)
from .wire_positional import POSITIONAL, positional

#: Version of the message protocol; a frame with another version is refused.
#: 2: payload messages are flow-controlled by `Credit` (a version 1 peer sends none, so a
#: version 2 node would never send it payloads: the handshake refuses the mismatch).
#: 3: `Ping` carries the sender's loop lag; `ShuffleReply` names the shuffle's origin and
#: travels back along the walk.
#: 4: the handshake carries node keys and signatures (identity.py).
#: 5: `Credit` says whether the node granting it is congested.
#: 6: `IHave` entries name their tag (an index into the batch's list of tags).
PROTOCOL_VERSION = 6
#: Default largest frame accepted or sent, in bytes (one payload plus a little framing).
DEFAULT_MAX_FRAME = 1024 * 1024 + 4096
#: Nesting allowed in a frame: frame > message > field > entry > id, plus payload headroom.
FRAME_MAX_DEPTH = 8
#: Nesting allowed inside an application payload.
PAYLOAD_MAX_DEPTH = 32


# --- payloads ------------------------------------------------------------------------------


def encode_payload(data: Any, *, max_size: int) -> bytes:
    """Encode application data as CBOR; raise `MessageTooLarge` beyond `max_size` bytes.

    Only plain data is accepted (None, bool, int, float, str, bytes, list, tuple, and dicts
    with str or bytes keys), the same set `decode_payload` gives back.
    """
    _check_encodable(data)
    try:
        encoded: bytes = cbor2.dumps(data)
    except (cbor2.CBOREncodeError, TypeError, ValueError) as exc:
        raise TypeError(f"payload is not CBOR-encodable: {exc}") from None
    if len(encoded) > max_size:
        raise MessageTooLarge(f"payload is {len(encoded)} bytes, the limit is {max_size}")
    return encoded


def _check_encodable(data: Any) -> None:
    stack: list[tuple[Any, int]] = [(data, 0)]
    while stack:
        v, depth = stack.pop()
        if depth > PAYLOAD_MAX_DEPTH:
            raise TypeError(f"payload nests deeper than {PAYLOAD_MAX_DEPTH} levels")
        if v is None or isinstance(v, bool | str | bytes | float):
            continue
        if isinstance(v, int):
            if not -(2**64) <= v <= U64:
                raise TypeError("payload integers must fit in 64 bits")
            continue
        if isinstance(v, list | tuple):
            stack.extend((x, depth + 1) for x in v)
        elif isinstance(v, dict):
            for k, x in v.items():
                if not isinstance(k, str | bytes):
                    raise TypeError(
                        f"payload map keys must be str or bytes, not {type(k).__name__}"
                    )
                stack.append((x, depth + 1))
        else:
            raise TypeError(f"payload value of type {type(v).__name__} is not plain data")


def decode_payload(data: bytes, *, max_size: int) -> Any:
    """Decode application data received from a peer, under the strict rules."""
    if len(data) > max_size:
        raise WireError(
            f"payload is {len(data)} bytes, the limit is {max_size}", reason="too_large"
        )
    return strict_loads(data, max_depth=PAYLOAD_MAX_DEPTH)


# --- addresses, peers, hello ---------------------------------------------------------------


def check_address(v: Any, name: str = "address") -> str:
    """A dialable address: ``ws://host:port``, ``wss://host:port`` or ``mem://name``.

    Peers hand us addresses that we later dial (forward joins, shuffles): one that the
    resolver would choke on must be refused here, at the boundary.
    """
    address = check_str(v, MAX_ADDRESS, name)
    if address.startswith("mem://"):
        if len(address) > 6 and "/" not in address[6:] and address.isprintable():
            return address
        fail_field(f"{name} {address!r:.80} is not a valid mem:// address")
    try:
        parsed = urllib.parse.urlsplit(address)
        host, port = parsed.hostname, parsed.port
        if parsed.scheme not in ("ws", "wss") or not host or not port:
            raise ValueError("needs ws:// or wss://, a host and a port")
        if parsed.path not in ("", "/") or parsed.query or parsed.fragment or parsed.username:
            # Nodes serve their protocol at the root: an address with a path, a query or a
            # user would have us send requests of a peer's choosing to a third party.
            raise ValueError("a node address has no path, query or user")
        host.encode("idna")
        if not _dialable_host(host):
            raise ValueError("not a host one can dial")
    except (ValueError, UnicodeError) as exc:
        fail_field(f"{name} {address!r:.80} is not a valid address: {exc}")
    return address


def _dialable_host(host: str) -> bool:
    """False for IP literals no node listens on: unspecified, multicast, broadcast (in any
    spelling the resolver takes: ``0`` is 0.0.0.0, this host)."""
    try:
        ip = ipaddress.ip_address(address_host(host))
    except ValueError:
        return True  # a name
    return not (ip.is_unspecified or ip.is_multicast or str(ip) == "255.255.255.255")


def check_peer(v: Any, name: str = "peer") -> Peer:
    if type(v) is not list or len(v) != 2:
        fail_field(f"{name} must be [id, address]")
    return Peer(check_node_id(v[0], f"{name}.id"), check_address(v[1], f"{name}.address"))


def _peers(v: Any) -> tuple[Peer, ...]:
    return tuple(check_peer(p) for p in check_list(v, MAX_SHUFFLE_PEERS, "peers"))


def _hello(f: list[Any]) -> Hello:
    role = check_str(f[4], 16, "role")
    if role not in Role.ALL:
        fail_field(f"unknown role {role!r}")
    endorsement, proof, signature = f[7], f[8], f[9]
    if endorsement != b"":
        endorsement = check_fixed_bytes(endorsement, ENDORSEMENT_BYTES, "endorsement")
    if proof != b"":
        proof = check_fixed_bytes(proof, PROOF_BYTES, "proof")
    if signature != b"":
        signature = check_fixed_bytes(signature, SIGNATURE_BYTES, "signature")
    if (proof == b"") != (signature == b""):
        fail_field("a hello carries both a proof and a signature, or neither")
    return Hello(
        version=check_int(f[0], 0, 65535, "version"),
        cluster=check_str(f[1], MAX_CLUSTER, "cluster"),
        node_id=check_node_id(f[2], "node id"),
        address=check_address(f[3]) if f[3] != "" else "",
        role=role,
        nonce=check_fixed_bytes(f[5], NONCE_BYTES, "nonce"),
        key=check_fixed_bytes(f[6], KEY_BYTES, "key"),
        endorsement=endorsement,
        proof=proof,
        signature=signature,
    )


# --- messages ------------------------------------------------------------------------------

# Per kind: the field count and a function from the positional fields to the message.
_Decoder = Callable[[list[Any], int], Message]

_DECODERS: dict[int, tuple[int, _Decoder]] = {
    Ping.KIND: (
        2,
        lambda f, _: Ping(check_int(f[0], 0, U64, "nonce"), check_int(f[1], 0, 2**32, "lag_ms")),
    ),
    Pong.KIND: (1, lambda f, _: Pong(check_int(f[0], 0, U64, "nonce"))),
    Credit.KIND: (
        3,
        lambda f, _: Credit(
            check_int(f[0], 0, 2**32 - 1, "messages"),
            check_int(f[1], 0, 2**48, "size"),
            check_bool(f[2], "congested"),
        ),
    ),
    Join.KIND: (0, lambda f, _: Join()),
    ForwardJoin.KIND: (
        2,
        lambda f, _: ForwardJoin(check_peer(f[0]), check_int(f[1], 0, MAX_TTL, "ttl")),
    ),
    Neighbor.KIND: (1, lambda f, _: Neighbor(check_bool(f[0], "high"))),
    NeighborReply.KIND: (1, lambda f, _: NeighborReply(check_bool(f[0], "accepted"))),
    Disconnect.KIND: (1, lambda f, _: Disconnect(check_bool(f[0], "alive"))),
    Shuffle.KIND: (
        4,
        lambda f, _: Shuffle(
            check_peer(f[0], "origin"),
            check_int(f[1], 0, MAX_TTL, "ttl"),
            _peers(f[2]),
            check_int(f[3], 0, U64, "nonce"),
        ),
    ),
    ShuffleReply.KIND: (
        3,
        lambda f, _: ShuffleReply(
            _peers(f[0]),
            check_int(f[1], 0, U64, "nonce"),
            check_node_id(f[2], "origin", allow_empty=True),
        ),
    ),
    Gossip.KIND: (
        6,
        lambda f, max_payload: Gossip(
            check_message_id(f[0]),
            check_int(f[1], 0, MAX_ROUND, "round"),
            check_str(f[2], MAX_TAG, "tag"),
            check_bytes(f[3], max_payload, "payload"),
            check_bool(f[4], "own tree"),
            f[5] if f[5] == b"" else check_fixed_bytes(f[5], GOSSIP_SIGNATURE_BYTES, "signature"),
        ),
    ),
    IHave.KIND: (2, lambda f, _: check_ihave(f[0], f[1])),
    Graft.KIND: (
        3,
        lambda f, _: Graft(
            check_message_id(f[0]),
            check_int(f[1], 0, MAX_ROUND, "round"),
            check_bool(f[2], "link only"),
        ),
    ),
    Prune.KIND: (
        1,
        lambda f, _: Prune(check_node_id(f[0], "origin", allow_empty=True)),
    ),
    SyncRequest.KIND: (1, lambda f, _: SyncRequest(check_str(f[0], MAX_TAG, "name"))),
    SyncChunk.KIND: (
        5,
        lambda f, max_payload: SyncChunk(
            check_str(f[0], MAX_TAG, "name"),
            check_int(f[1], 0, U64, "sync id"),
            check_int(f[2], 0, 2**32 - 1, "seq"),
            check_bool(f[3], "last"),
            check_bytes(f[4], max_payload, "items"),
        ),
    ),
    SyncDigest.KIND: (6, lambda f, _: check_digest_round(f)),
    Direct.KIND: (
        3,
        lambda f, max_payload: Direct(
            check_str(f[0], MAX_TAG, "tag"),
            check_int(f[1], 0, U64, "request id"),
            check_bytes(f[2], max_payload, "payload"),
        ),
    ),
    DirectReply.KIND: (
        3,
        lambda f, max_payload: DirectReply(
            check_int(f[0], 1, U64, "request id"),
            check_bool(f[1], "ok"),
            check_bytes(f[2], max_payload, "payload"),
        ),
    ),
    ControlRequest.KIND: (
        3,
        lambda f, max_payload: ControlRequest(
            check_int(f[0], 0, U64, "request id"),
            check_str(f[1], MAX_OP, "op"),
            check_bytes(f[2], max_payload, "args"),
        ),
    ),
    ControlReply.KIND: (
        3,
        lambda f, max_payload: ControlReply(
            check_int(f[0], 0, U64, "request id"),
            check_bool(f[1], "ok"),
            check_bytes(f[2], max_payload, "result"),
        ),
    ),
    Hello.KIND: (10, lambda f, _: _hello(f)),
    Proof.KIND: (
        2,
        lambda f, _: Proof(
            check_fixed_bytes(f[0], PROOF_BYTES, "proof"),
            check_fixed_bytes(f[1], SIGNATURE_BYTES, "signature"),
        ),
    ),
    Welcome.KIND: (0, lambda f, _: Welcome()),
    Refuse.KIND: (1, lambda f, _: Refuse(check_str(f[0], MAX_REASON, "reason"))),
}


def encode_message(message: Message) -> bytes:
    """Encode one message alone (a positional array); frames are built from these parts."""
    form: Callable[[Any], list[Any]] = POSITIONAL.get(type(message), positional)
    return bytes(cbor2.dumps(form(message)))


def _array_header(n: int) -> bytes:
    if n < 24:
        return bytes([0x80 + n])
    if n < 256:
        return bytes([0x98, n])
    if n < 65536:
        return bytes([0x99]) + n.to_bytes(2, "big")
    return bytes([0x9A]) + n.to_bytes(4, "big")


_VERSION_ITEM = bytes(cbor2.dumps(PROTOCOL_VERSION))
#: Bytes a frame adds around its messages (array header and version), at most.
FRAME_OVERHEAD = 5 + len(_VERSION_ITEM)


def cbor_array(parts: Sequence[bytes]) -> bytes:
    """A CBOR array from items each already encoded (e.g. to chunk a list by size)."""
    return b"".join((_array_header(len(parts)), *parts))


def frame_from_parts(parts: Sequence[bytes]) -> bytes:
    """Join messages encoded by `encode_message` into one frame ``[version, *messages]``.

    A CBOR array is its header followed by its items, so a frame is built without encoding
    any message twice and each message's size on the wire is known exactly.
    """
    return b"".join((_array_header(len(parts) + 1), _VERSION_ITEM, *parts))


def encode_frame(messages: Iterable[Message]) -> bytes:
    """Encode messages into one frame (no size check: the sender bounds what it batches)."""
    return frame_from_parts([encode_message(m) for m in messages])


def decode_frame(data: bytes, *, max_frame: int = DEFAULT_MAX_FRAME) -> list[Message]:
    """Decode and validate a frame from a peer; raise `WireError` for anything malformed."""
    return [m for m, _ in decode_frame_sized(data, max_frame=max_frame)]


def decode_frame_sized(
    data: bytes, *, max_frame: int = DEFAULT_MAX_FRAME
) -> list[tuple[Message, int]]:
    """Like `decode_frame`, with the number of bytes each message took on the wire."""
    if len(data) > max_frame:
        raise WireError(f"frame is {len(data)} bytes, the limit is {max_frame}", reason="too_large")
    count, offset = _read_array_header(data)
    if count < 2:
        raise WireError("frame must be an array [version, message, ...]", reason="shape")
    fp = io.BytesIO(data)
    fp.seek(offset)
    decoder = cbor2.CBORDecoder(
        fp,
        semantic_decoders=REFUSE_TAGS,
        tag_hook=refuse_tag_hook,
        max_depth=FRAME_MAX_DEPTH - 1,
        allow_indefinite=False,
        allow_duplicate_keys=False,
        strict_hashable_types=True,
    )
    # Runs once per frame received: locals instead of attribute look-ups in the loop.
    decode, tell = decoder.decode, fp.tell
    raws: list[tuple[Any, int]] = []
    try:
        version = decode()
        start = tell()
        for _ in range(count - 1):
            raw = decode()
            end = tell()
            raws.append((raw, end - start))
            start = end
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise WireError(f"invalid CBOR: {exc}", reason="cbor") from None
    except EOFError:
        raise WireError("truncated CBOR", reason="cbor") from None
    if start != len(data):
        raise WireError(f"{len(data) - start} trailing bytes after frame", reason="cbor")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise WireError(f"unsupported protocol version {version!r:.20}", reason="version")
    out = []
    for raw, size in raws:
        check_plain(raw)
        out.append((decode_message(raw, max_frame), size))
    return out


def _read_array_header(data: bytes) -> tuple[int, int]:
    """Parse a definite-length array header; return (item count, header length)."""
    if not data:
        raise WireError("empty frame", reason="cbor")
    b = data[0]
    if not 0x80 <= b <= 0x9B:
        raise WireError("frame must be an array [version, message, ...]", reason="shape")
    if b < 0x98:
        return b - 0x80, 1
    width = 1 << (b - 0x98)
    if len(data) < 1 + width:
        raise WireError("truncated CBOR", reason="cbor")
    count = int.from_bytes(data[1 : 1 + width], "big")
    # Every item is at least one byte: a count beyond the frame length is a lie.
    if count > len(data):
        raise WireError(f"array claims {count} items in {len(data)} bytes", reason="cbor")
    return count, 1 + width


def decode_message(raw: Any, max_payload: int = DEFAULT_MAX_FRAME) -> Message:
    """Validate one already-parsed positional message."""
    if type(raw) is not list or not raw or type(raw[0]) is not int:
        raise WireError("message must be an array [kind, field, ...]", reason="shape")
    spec = _DECODERS.get(raw[0])
    if spec is None:
        raise WireError(f"unknown message kind {raw[0]}", reason="kind")
    count, decoder = spec
    if len(raw) != count + 1:
        raise WireError(
            f"message kind {raw[0]} takes {count} fields, got {len(raw) - 1}", reason="shape"
        )
    return decoder(raw[1:], max_payload)


class Chunker:
    """Packs items into CBOR arrays of at most `max_bytes` (one item may exceed alone), as
    they come: a snapshot streamed in batches fills each chunk across batch boundaries."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._parts: list[bytes] = []
        self._size = 0

    def add(self, item: Any) -> bytes | None:
        """Take `item`; return the chunk it closed, if it did not fit in the open one."""
        part = bytes(cbor2.dumps(item))
        full = None
        if self._parts and self._size + len(part) + 9 > self.max_bytes:
            full = self.flush()
        self._parts.append(part)
        self._size += len(part)
        return full

    def flush(self) -> bytes | None:
        """The open chunk, if it holds anything."""
        if not self._parts:
            return None
        chunk = cbor_array(self._parts)
        self._parts, self._size = [], 0
        return chunk
