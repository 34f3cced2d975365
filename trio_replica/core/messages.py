"""Every protocol message as a frozen value object, and the identities they carry.

This module owns *what* travels between nodes; `trio_replica.core.wire` owns *how* it is encoded
and checked. The sans-IO cores (HyParView, Plumtree) build and consume these classes and
never see bytes. Each class has a stable `KIND` number: the first element of its positional
CBOR array on the wire. Kinds are grouped by layer:

* 1-9    link keep-alive (ping/pong)
* 10-19  HyParView membership (DSN 2007, Algorithms 1 and 2)
* 20-29  Plumtree broadcast (SRDS 2007, Algorithm 1 of the 2019 revision)
* 30-39  direct messages between named replica instances
* 40-49  the authenticated control path used by the command-line client
* 60-69  the link handshake (only valid before the link is established)

Field limits (lengths, counts, integer ranges) are the constants below; the decoder in
`trio_replica.core.wire` enforces every one of them on input.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
import urllib.parse
from collections.abc import Sequence
from typing import ClassVar

import attrs

#: Longest node id, in characters.
MAX_NODE_ID = 128


def address_host(host: str) -> str:
    """A host in one spelling: an IP literal in its standard form (``0x0a000001``, ``10.1``
    and ``10.0.0.1`` are one IPv4 address to the resolver), a name lowercased without its
    trailing dot."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
        return str(mapped or ip)
    try:
        # The forms inet_aton takes (hex, octal, fewer parts) are what a dial would use.
        return socket.inet_ntoa(socket.inet_aton(host))
    except OSError:
        return host.lower().rstrip(".")


@functools.lru_cache(maxsize=65_536)
def canonical_address(address: str) -> str:
    """`address` in one spelling, for telling whether two ids claim the same endpoint."""
    if address.startswith("mem://"):
        return address
    try:
        parts = urllib.parse.urlsplit(address)
        port = parts.port or (443 if parts.scheme == "wss" else 80)
        return f"{parts.scheme}://{address_host(parts.hostname or '')}:{port}"
    except ValueError:
        return address


def valid_node_id(node_id: str) -> bool:
    """A node id: 1 to `MAX_NODE_ID` printable characters, no space and no ``#`` (ids are
    written into line-based files such as ``known_nodes``, where those would split or end
    a line)."""
    return (
        0 < len(node_id) <= MAX_NODE_ID
        and node_id.isprintable()
        and " " not in node_id
        and "#" not in node_id
    )


#: Longest dialable address (``ws://host:port/path``), in characters.
MAX_ADDRESS = 256
#: Longest broadcast tag or replica instance name, in characters.
MAX_TAG = 128
#: Most peers in one SHUFFLE or SHUFFLE_REPLY (ka + kp + 1 with generous headroom).
MAX_SHUFFLE_PEERS = 64
#: Most (id, round, tag) entries batched in one IHAVE (and so most tags in one).
MAX_IHAVE_ENTRIES = 1024
#: Largest random-walk TTL accepted from a peer.
MAX_TTL = 255
#: Largest Plumtree round (hop count) accepted from a peer.
MAX_ROUND = 65_535
#: Unsigned 64-bit range, for nonces and packed HLC stamps.
U64 = 2**64 - 1


@attrs.frozen(order=True, cache_hash=True)
class Peer:
    """A node as others see it: its unique id and the address to dial it at.

    Its hash is cached (as `MessageId`'s): both key the cores' tables, which look them up
    several times per message.
    """

    id: str
    address: str

    def __str__(self) -> str:
        return f"{self.id}@{self.address}"


@attrs.frozen(order=True, cache_hash=True)
class MessageId:
    """Unique id of one broadcast: origin node, its HLC stamp at send time, and a random nonce.

    Unique without coordination: the HLC is strictly increasing per origin and the nonce
    separates two incarnations of a node that reuse an id after a restart.
    """

    origin: str
    stamp: int
    nonce: int

    def __str__(self) -> str:
        return f"{self.origin}/{self.stamp:x}/{self.nonce:08x}"


class Message:
    """Base class of every message; `KIND` is its wire number.

    `CONTROL` is its priority: control messages go ahead of the others in a link's outbox
    (SPEC section 3). `CREDITED` messages (payloads: they make real work at the receiver)
    are sent only on the receiver's credit (flow control, outbox.py).
    """

    KIND: ClassVar[int]
    CONTROL: ClassVar[bool] = True
    CREDITED: ClassVar[bool] = False
    __slots__ = ()


# --- link keep-alive -----------------------------------------------------------------


@attrs.frozen
class Ping(Message):
    """Keep-alive, sent on a link quiet in our direction; never answered (link.py).

    `lag_ms` is the sender's recent event-loop lag (health.py): a peer that says its loop
    is late gets longer before its silence counts as failure.
    """

    KIND: ClassVar[int] = 1
    nonce: int
    lag_ms: int = 0


@attrs.frozen
class Pong(Message):
    """Answer to a `Ping`."""

    KIND: ClassVar[int] = 2
    nonce: int


@attrs.frozen
class Credit(Message):
    """Flow control: the sender may send us `messages` more payload messages and `size`
    more bytes of them (outbox.py). Sent once at the start of a link (the window), then as we
    process what arrived. `congested`: our own buffers were over their mark lately (a
    first hop that hears it holds its peers' own broadcasts to their limit, flow.py)."""

    KIND: ClassVar[int] = 3
    messages: int
    size: int
    congested: bool = False


# --- HyParView ------------------------------------------------------------------------


@attrs.frozen
class Join(Message):
    """A newcomer asks its contact to take it into the active view (the sender is the link peer)."""

    KIND: ClassVar[int] = 10


@attrs.frozen
class ForwardJoin(Message):
    """Random walk spreading a newcomer through the overlay; `ttl` counts down from ARWL."""

    KIND: ClassVar[int] = 11
    peer: Peer
    ttl: int


@attrs.frozen
class Neighbor(Message):
    """Ask the link peer to become an active neighbor; `high` priority is always accepted."""

    KIND: ClassVar[int] = 12
    high: bool


@attrs.frozen
class NeighborReply(Message):
    """Answer to `Neighbor` (and to `Join`): whether the sender took us into its active view."""

    KIND: ClassVar[int] = 13
    accepted: bool


@attrs.frozen
class Disconnect(Message):
    """The sender drops us from its active view.

    `alive` is true for an eviction (the sender keeps running: keep it in the passive view),
    false for a graceful leave (the sender is going away: forget it).
    """

    KIND: ClassVar[int] = 14
    alive: bool


@attrs.frozen
class Shuffle(Message):
    """Random-walk exchange of view samples, integrated by the node where the walk ends."""

    KIND: ClassVar[int] = 15
    origin: Peer
    ttl: int
    peers: tuple[Peer, ...]
    nonce: int


@attrs.frozen
class ShuffleReply(Message):
    """A sample of the replier's passive view, for the shuffle's `origin` (a node id).

    It travels back along the walk, hop by hop over active links (each hop remembers where
    the shuffle came from), so that no link is opened for it; "" means the receiver is the
    origin.
    """

    KIND: ClassVar[int] = 16
    peers: tuple[Peer, ...]
    nonce: int
    origin: str = ""


# --- Plumtree ---------------------------------------------------------------------------


@attrs.frozen
class Gossip(Message):
    """A broadcast payload travelling along the eager tree.

    `payload` is the CBOR encoding of the application's data, kept as bytes so that a node
    forwards it without decoding; it is decoded (strictly) only when delivered.
    `round` is the number of hops from the origin.
    """

    KIND: ClassVar[int] = 20
    CONTROL: ClassVar[bool] = False
    CREDITED: ClassVar[bool] = True
    id: MessageId
    round: int
    tag: str
    payload: bytes
    #: Its origin broadcasts often: it follows the origin's own tree (core/plumtree.py).
    own_tree: bool = False
    #: Empty, or the origin's public key and its signature of the message (identity.py,
    #: `GOSSIP_SIGNATURE_BYTES`): forwarded untouched, checked where signatures are required.
    signature: bytes = b""


@attrs.frozen
class IHave(Message):
    """Lazy announcements, batched: each entry is a message id, the round it was seen at and
    its tag, as an index into `tags` (a batch's messages share few tags: each is sent once).

    The tag lets a node that gives up on a message tell that tag's subscribers alone
    (`Abandoned`). Not a control message: it waits behind the payloads queued before it on
    its link, so that it never overtakes them (an announcement that did would get them
    grafted while they only queue: outbox.py). It needs no credit and is never refused.
    """

    KIND: ClassVar[int] = 21
    CONTROL: ClassVar[bool] = False
    #: ``(id, round, index into tags)``.
    entries: tuple[tuple[MessageId, int, int], ...]
    tags: tuple[str, ...]

    @classmethod
    def of(cls, announced: Sequence[tuple[MessageId, int, str]]) -> IHave:
        """The batch announcing `(id, round, tag)` entries, each tag listed once."""
        if len(announced) == 1:
            # Most batches (a broadcast every window or less): no tag index to build.
            ((id, round, tag),) = announced
            return cls(((id, round, 0),), (tag,))
        index: dict[str, int] = {}
        entries = []
        for id, round, tag in announced:
            i = index.get(tag)
            if i is None:
                i = index[tag] = len(index)
            entries.append((id, round, i))
        return cls(tuple(entries), tuple(index))


@attrs.frozen
class Graft(Message):
    """Ask the peer to put us back in its eager set and to send the payload of `id`.

    With `link_only`, the sender holds the payload and asks for the link alone, in the tree
    of `id`'s origin (the paper's GRAFT(null) of its optimisation, and our regraft).
    """

    KIND: ClassVar[int] = 22
    id: MessageId
    round: int
    link_only: bool = False


@attrs.frozen
class Prune(Message):
    """The sender moved us to its lazy set in `origin`'s tree (`""`: the shared tree, which
    the messages of origins without a tree of their own follow); we do the same with it."""

    KIND: ClassVar[int] = 23
    origin: str


# --- replica instances (direct messages, not broadcast) -------------------------------------


@attrs.frozen
class SyncRequest(Message):
    """Ask the peer to send us the full state of its replica instance `name`."""

    KIND: ClassVar[int] = 30
    name: str


@attrs.frozen
class SyncChunk(Message):
    """One bounded piece of a full sync of instance `name`.

    `items` is the CBOR encoding of a list of snapshot items; a chunk is complete in itself
    (a snapshot of some keys), so chunks can be applied as they come and a missing chunk
    never implies a removal. `sync_id` groups the chunks of one sync, `seq` numbers them,
    `last` marks the final one.
    """

    KIND: ClassVar[int] = 31
    CONTROL: ClassVar[bool] = False
    CREDITED: ClassVar[bool] = True
    name: str
    sync_id: int
    seq: int
    last: bool
    items: bytes


#: Ranges descended in one digest round (`core.antientropy.AntiEntropyConfig.max_parents`
#: may not exceed it), their digests (16 per parent), and ranges wanted in one round.
MAX_DIGEST_PARENTS = 256
MAX_DIGESTS = 16 * MAX_DIGEST_PARENTS
MAX_WANTS = 16 * MAX_DIGEST_PARENTS
#: Deepest level of the digest tree (`core.antientropy.LEAF_LEVEL`).
MAX_DIGEST_LEVEL = 4


@attrs.frozen
class SyncDigest(Message):
    """One round of a digest comparison of instance `name` (`core.antientropy`).

    `session` is chosen by the node that opened the comparison and echoed by both sides.
    `parents` are ranges at ``level - 1``; `digests` the sender's ``(index, sum, count)``
    for the non-empty children of those parents; `want` the ``(level, index)`` ranges
    whose entries the receiver should send. A payload, not control: it travels in order
    with the `SyncChunk` streams of the same comparison, so a round that follows entries
    arrives after them.
    """

    KIND: ClassVar[int] = 32
    CONTROL: ClassVar[bool] = False
    CREDITED: ClassVar[bool] = True
    name: str
    session: int
    level: int
    parents: tuple[int, ...]
    digests: tuple[tuple[int, int, int], ...]
    want: tuple[tuple[int, int], ...]


REPLICA_KINDS: tuple[type[Message], ...] = (SyncRequest, SyncChunk, SyncDigest)


# --- direct messages (one node to another) ------------------------------------------------


@attrs.frozen
class Direct(Message):
    """An application message to one node (`Node.send`, `Node.request`): `payload` is the
    CBOR encoding of plain data for the handler of `tag` there. `request_id` 0 is a
    one-way send; any other number asks for a `DirectReply` with it."""

    KIND: ClassVar[int] = 50
    CONTROL: ClassVar[bool] = False
    CREDITED: ClassVar[bool] = True
    tag: str
    request_id: int
    payload: bytes


@attrs.frozen
class DirectReply(Message):
    """The answer to a `Direct` request: the handler's result (CBOR), or when not `ok` an
    error text (CBOR string): no handler, the handler failed, busy."""

    KIND: ClassVar[int] = 51
    CONTROL: ClassVar[bool] = False
    CREDITED: ClassVar[bool] = True
    request_id: int
    ok: bool
    payload: bytes


DIRECT_KINDS: tuple[type[Message], ...] = (Direct, DirectReply)


# --- control path (command-line client to node) -------------------------------------------

#: Longest control operation name.
MAX_OP = 64


@attrs.frozen
class ControlRequest(Message):
    """A client asks the node to run operation `op`; `args` is CBOR-encoded plain data."""

    KIND: ClassVar[int] = 40
    request_id: int
    op: str
    args: bytes


@attrs.frozen
class ControlReply(Message):
    """The node's answer to a `ControlRequest`: `result` (CBOR) or an error text when not `ok`."""

    KIND: ClassVar[int] = 41
    request_id: int
    ok: bool
    result: bytes


# --- handshake ------------------------------------------------------------------------------

#: Length of a handshake nonce in bytes.
NONCE_BYTES = 32
#: Length of an HMAC-SHA256 proof in bytes.
PROOF_BYTES = 32
#: Length of an Ed25519 public key, of a signature, and of a key endorsement (identity.py).
KEY_BYTES = 32
SIGNATURE_BYTES = 64
ENDORSEMENT_BYTES = KEY_BYTES + 8 + SIGNATURE_BYTES
#: A signed broadcast carries its origin's key and signature.
GOSSIP_SIGNATURE_BYTES = KEY_BYTES + SIGNATURE_BYTES
#: Longest cluster name, in characters.
MAX_CLUSTER = 128
#: Longest refusal reason, in characters.
MAX_REASON = 256


class Role:
    """Who opens a link: another node of the cluster, or a command-line client."""

    NODE = "node"
    CLIENT = "client"
    ALL = (NODE, CLIENT)


@attrs.frozen
class Hello(Message):
    """First message of each side: who we are, what cluster, and a fresh challenge nonce.

    The dialer sends it first; the listener answers with its own `Hello` plus `proof` (the
    cluster secret's HMAC) and `signature` (its node key's) over the transcript, which
    answer the dialer's nonce. `address` is where the sender can be dialed (empty for a
    client). `key` is the sender's Ed25519 public key; `endorsement` is empty or the
    previous key's endorsement of it (identity.py). `proof` and `signature` are empty in
    the dialer's hello.
    """

    KIND: ClassVar[int] = 60
    version: int
    cluster: str
    node_id: str
    address: str
    role: str
    nonce: bytes
    key: bytes
    endorsement: bytes
    proof: bytes
    signature: bytes


@attrs.frozen
class Proof(Message):
    """The dialer's answer to the listener's nonce: the secret's HMAC and the key's signature."""

    KIND: ClassVar[int] = 61
    proof: bytes
    signature: bytes


@attrs.frozen
class Welcome(Message):
    """The listener accepted the dialer: the link is established."""

    KIND: ClassVar[int] = 62


@attrs.frozen
class Refuse(Message):
    """The handshake failed; `reason` says why (sent before closing, for a clear error)."""

    KIND: ClassVar[int] = 63
    reason: str


HANDSHAKE_KINDS: tuple[type[Message], ...] = (Hello, Proof, Welcome, Refuse)
CONTROL_KINDS: tuple[type[Message], ...] = (ControlRequest, ControlReply)
LINK_KINDS: tuple[type[Message], ...] = (Ping, Pong)
HYPARVIEW_KINDS: tuple[type[Message], ...] = (
    Join,
    ForwardJoin,
    Neighbor,
    NeighborReply,
    Disconnect,
    Shuffle,
    ShuffleReply,
)
PLUMTREE_KINDS: tuple[type[Message], ...] = (Gossip, IHave, Graft, Prune)
