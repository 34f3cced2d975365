"""The wire codec: every message round-trips, and anything malformed is a `WireError`."""

from __future__ import annotations

import contextlib

import attrs
import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_replica.core.messages import (
    ENDORSEMENT_BYTES,
    KEY_BYTES,
    MAX_IHAVE_ENTRIES,
    MAX_NODE_ID,
    MAX_TAG,
    NONCE_BYTES,
    PROOF_BYTES,
    SIGNATURE_BYTES,
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
    MessageId,
    Neighbor,
    NeighborReply,
    Peer,
    Ping,
    Pong,
    Proof,
    Prune,
    Refuse,
    Shuffle,
    ShuffleReply,
    SyncChunk,
    SyncDigest,
    SyncRequest,
    Welcome,
    valid_node_id,
)
from trio_replica.core.strict_cbor import strict_loads
from trio_replica.core.wire import (
    PROTOCOL_VERSION,
    decode_frame,
    decode_frame_sized,
    decode_payload,
    encode_frame,
    encode_message,
    encode_payload,
)
from trio_replica.errors import MessageTooLarge, WireError

# Node ids (and tags, names: the same strings do for them).
ids = st.text(min_size=1, max_size=20).filter(valid_node_id)
u64 = st.integers(0, 2**64 - 1)
addresses = st.one_of(
    st.builds(
        "ws://{}:{}".format,
        # Names: an all-digit host is an IPv4 address to the resolver ("0" is 0.0.0.0).
        st.from_regex(r"[a-z][a-z0-9]{0,19}(\.[a-z0-9]{1,10}){0,2}", fullmatch=True),
        st.integers(1, 65535),
    ),
    st.from_regex(r"mem://[a-z0-9]{1,20}", fullmatch=True),
)
peers = st.builds(Peer, ids, addresses)
mids = st.builds(MessageId, ids, u64, u64)


@st.composite
def digest_rounds(draw: st.DrawFn) -> SyncDigest:
    level = draw(st.integers(1, 4))
    parents = draw(st.lists(st.integers(0, 16 ** (level - 1) - 1), max_size=4).map(tuple))
    digests = draw(
        st.lists(
            st.tuples(st.integers(0, 16**level - 1), u64, st.integers(1, 2**64 - 1)), max_size=4
        ).map(tuple)
    )
    want = draw(
        st.lists(
            st.integers(1, 4).flatmap(
                lambda lv: st.tuples(st.just(lv), st.integers(0, 16**lv - 1))
            ),
            max_size=4,
        ).map(tuple)
    )
    return SyncDigest(draw(ids), draw(u64), level, parents, digests, want)


messages = st.one_of(
    st.builds(Ping, u64),
    st.builds(Pong, u64),
    st.builds(Credit, st.integers(0, 2**32 - 1), st.integers(0, 2**48), st.booleans()),
    st.just(Join()),
    st.builds(ForwardJoin, peers, st.integers(0, 255)),
    st.builds(Neighbor, st.booleans()),
    st.builds(NeighborReply, st.booleans()),
    st.builds(Disconnect, st.booleans()),
    st.builds(Shuffle, peers, st.integers(0, 255), st.lists(peers, max_size=8).map(tuple), u64),
    st.builds(ShuffleReply, st.lists(peers, max_size=8).map(tuple), u64),
    st.builds(Gossip, mids, st.integers(0, 65535), ids, st.binary(max_size=64), st.booleans()),
    st.lists(
        st.tuples(mids, st.integers(0, 65535), st.sampled_from(["t", "u", "maps/users"])),
        max_size=5,
    ).map(IHave.of),
    st.builds(Graft, mids, st.integers(0, 65535)),
    st.builds(Prune, st.one_of(st.just(""), ids)),
    st.builds(ControlRequest, u64, st.text(min_size=1, max_size=10), st.binary(max_size=20)),
    st.builds(ControlReply, u64, st.booleans(), st.binary(max_size=20)),
    st.builds(
        lambda *fields: Hello(*fields, proof=b"", signature=b""),
        st.integers(0, 65535),
        ids,
        ids,
        st.one_of(st.just(""), addresses),
        st.sampled_from(["node", "client"]),
        st.binary(min_size=NONCE_BYTES, max_size=NONCE_BYTES),
        st.binary(min_size=KEY_BYTES, max_size=KEY_BYTES),
        st.one_of(st.just(b""), st.binary(min_size=ENDORSEMENT_BYTES, max_size=ENDORSEMENT_BYTES)),
    ).flatmap(
        lambda hello: st.one_of(
            st.just(attrs.evolve(hello, proof=b"", signature=b"")),
            st.builds(
                lambda p, s: attrs.evolve(hello, proof=p, signature=s),
                st.binary(min_size=PROOF_BYTES, max_size=PROOF_BYTES),
                st.binary(min_size=SIGNATURE_BYTES, max_size=SIGNATURE_BYTES),
            ),
        )
    ),
    st.builds(
        Proof,
        st.binary(min_size=PROOF_BYTES, max_size=PROOF_BYTES),
        st.binary(min_size=SIGNATURE_BYTES, max_size=SIGNATURE_BYTES),
    ),
    st.just(Welcome()),
    st.builds(Refuse, st.text(min_size=1, max_size=50)),
    st.builds(SyncRequest, ids),
    st.builds(Direct, ids, u64, st.binary(max_size=20)),
    st.builds(DirectReply, st.integers(1, 2**64 - 1), st.booleans(), st.binary(max_size=20)),
    st.builds(SyncChunk, ids, u64, st.integers(0, 2**32 - 1), st.booleans(), st.binary(max_size=9)),
    digest_rounds(),
)


@given(st.lists(messages, min_size=1, max_size=6))
def test_every_message_round_trips(batch: list[object]) -> None:
    frame = encode_frame(batch)  # type: ignore[arg-type]
    assert decode_frame(frame) == batch
    sized = decode_frame_sized(frame)
    assert [size for _, size in sized] == [len(encode_message(m)) for m in batch]  # type: ignore[arg-type]


@settings(max_examples=300)
@given(st.lists(messages, min_size=1, max_size=4), st.data())
def test_mutated_frames_only_raise_wire_error(batch: list[object], data: st.DataObject) -> None:
    frame = bytearray(encode_frame(batch))  # type: ignore[arg-type]
    how = data.draw(st.sampled_from(["truncate", "flip", "insert", "append"]))
    if how == "truncate":
        frame = frame[: data.draw(st.integers(0, len(frame) - 1))]
    elif how == "flip":
        i = data.draw(st.integers(0, len(frame) - 1))
        frame[i] ^= data.draw(st.integers(1, 255))
    elif how == "insert":
        i = data.draw(st.integers(0, len(frame)))
        frame[i:i] = data.draw(st.binary(min_size=1, max_size=8))
    else:
        frame += data.draw(st.binary(min_size=1, max_size=8))
    try:
        decoded = decode_frame(bytes(frame))
    except WireError:
        return
    # A mutation may still be a valid frame (e.g. a flipped bit in a string): then it decodes
    # to well-typed messages, never to anything else.
    assert all(type(m).KIND for m in decoded)


@given(st.binary(max_size=200))
def test_random_bytes_only_raise_wire_error(blob: bytes) -> None:
    with contextlib.suppress(WireError):
        decode_frame(blob)


def _frame(*items: object) -> bytes:
    return bytes(cbor2.dumps([PROTOCOL_VERSION, *items]))


#: An array of two items, the first our protocol version: what every frame starts with.
#: A hello's key and (empty) endorsement.
_KEYS = [b"k" * KEY_BYTES, b""]
_HEAD = bytes([0x82, PROTOCOL_VERSION])


@pytest.mark.parametrize(
    ("blob", "reason"),
    [
        (b"", "cbor"),
        (cbor2.dumps({"a": 1}), "shape"),
        (cbor2.dumps([PROTOCOL_VERSION]), "shape"),
        (cbor2.dumps([99, [1, 5]]), "version"),
        (cbor2.dumps([True, [1, 5]]), "version"),
        (_frame([2, 5]) + b"\x00", "cbor"),  # trailing byte
        (_frame([2, True]), "field"),  # bool where an int belongs
        (_frame([2, -1]), "field"),
        (_frame([2, 2**64]), "cbor"),  # bignum: a semantic tag
        (_frame([2]), "shape"),
        (_frame([2, 1, 2]), "shape"),
        (_frame([999]), "kind"),
        (_frame(["ping", 1]), "shape"),
        (_frame([11, ["a", "b"], 256]), "field"),  # ttl out of range
        (_frame([11, ["", "b"], 3]), "field"),  # empty node id
        (_frame([11, ["x" * (MAX_NODE_ID + 1), "mem://b"], 3]), "field"),
        (_frame([11, ["a", "ws://" + "a" * 70 + ".example:80"], 3]), "field"),  # bad DNS label
        (_frame([11, ["a", "http://x:1"], 3]), "field"),
        (_frame([11, ["a", "ws://x"], 3]), "field"),  # no port
        # Learned addresses are dialed: only a node's root, on a host one can dial.
        (_frame([11, ["a", "ws://x:1/admin?x=1"], 3]), "field"),
        (_frame([11, ["a", "ws://user@x:1"], 3]), "field"),
        (_frame([11, ["a", "ws://x:0"], 3]), "field"),
        (_frame([11, ["a", "ws://0.0.0.0:80"], 3]), "field"),
        (_frame([11, ["a", "ws://[::]:80"], 3]), "field"),
        (_frame([11, ["a", "ws://224.0.0.1:80"], 3]), "field"),
        (_frame([11, ["a"], 3]), "field"),
        (_frame([20, ["a", 1, 2], 0, "t", "not bytes", False, b""]), "field"),
        (_frame([20, ["a", 1, 2], 0, "t", b"x", "not a bool", b""]), "field"),
        (_frame([20, ["a", 1, 2], 0, "t", b"x", False, b"short signature"]), "field"),
        (_frame([20, ["a b", 1, 2], 0, "t", b"x", False, b""]), "field"),  # not a node id
        (_frame([21, [[["a", 1, 2], 0, 0]] * (MAX_IHAVE_ENTRIES + 1), ["t"]]), "field"),
        (_frame([21, [[["a", 1, 2], 0]], ["t"]]), "field"),  # no tag index
        (_frame([21, [[["a", 1, 2], 0, 1]], ["t"]]), "field"),  # tag index out of range
        (_frame([21, [[["a", 1, 2], 0, -1]], ["t"]]), "field"),
        (_frame([21, [[["a", 1, 2], 0, 0.0]], ["t"]]), "field"),
        (_frame([21, [[["a", 1, 2], 0, 0]], [""]]), "field"),  # an empty tag
        (_frame([21, [[["a", 1, 2], 0, True]], ["t"]]), "field"),
        (_frame([21, [[["a", 1, 2], 0, 0]], ["t", "t"]]), "field"),  # a tag listed twice
        (_frame([21, [[["a", 1, 2], 0, 0]], ["t", "u"]]), "field"),  # a tag never used
        (_frame([21, [[["a", 1, 2], 0, 0]], ["x" * (MAX_TAG + 1)]]), "field"),
        (_frame([21, [[["a", 1, 2], 0, 0]], "t"]), "field"),
        (_frame([21, [[["a", 1, 2], 0, 0]]]), "shape"),  # a version 5 IHAVE
        (_frame([32, "m", 1, 0, [0], [], []]), "field"),  # level 0: nothing to compare
        (_frame([32, "m", 1, 5, [0], [], []]), "field"),  # below the leaves
        (_frame([32, "m", 1, 2, [16], [], []]), "field"),  # parent beyond level 1
        (_frame([32, "m", 1, 1, [0], [[16, 1, 1]], []]), "field"),  # index beyond level 1
        (_frame([32, "m", 1, 1, [0], [[3, 1, 0]], []]), "field"),  # an empty digest
        (_frame([32, "m", 1, 1, [0], [[3, 1]], []]), "field"),
        (_frame([32, "m", 1, 1, [0], [], [[0, 0]]]), "field"),  # want the whole state
        (_frame([32, "m", 1, 1, [0], [], [[2, 256]]]), "field"),
        (_frame([32, "m", 1, 4, list(range(257)), [], []]), "field"),  # too many parents
        (_frame([60, 1, "c", "n", "", "root", b"x" * NONCE_BYTES, *_KEYS, b"", b""]), "field"),
        (_frame([60, 1, "c", "n", "", "node", b"short", *_KEYS, b"", b""]), "field"),
        (_frame([60, 1, "c", "n", "", "node", b"x" * NONCE_BYTES, b"k", b"", b"", b""]), "field"),
        # A proof without a signature.
        (
            _frame([60, 1, "c", "n", "", "node", b"x" * NONCE_BYTES, *_KEYS, b"p" * 32, b""]),
            "field",
        ),
        (bytes.fromhex("829f01ff"), "cbor"),  # indefinite-length array
        (_HEAD + cbor2.dumps(cbor2.CBORTag(1, 0)), "cbor"),  # a date tag
        (_HEAD + cbor2.dumps(cbor2.CBORTag(40000, 0)), "cbor"),  # unknown tag
        (bytes.fromhex("9bffffffffffffffff"), "cbor"),  # huge length prefix
        (_HEAD + bytes.fromhex("5bffffffffffffffff"), "cbor"),  # huge bytes
        (_HEAD + bytes.fromhex("f7"), "cbor"),  # undefined
        (_HEAD + bytes.fromhex("a2616101616102"), "cbor"),  # duplicate map key
        (_HEAD + bytes.fromhex("a1010a"), "cbor"),  # integer map key
    ],
)
def test_malformed_frames_are_refused_with_a_reason(blob: bytes, reason: str) -> None:
    with pytest.raises(WireError) as info:
        decode_frame(blob)
    assert info.value.reason == reason


def test_a_node_address_may_end_with_a_slash() -> None:
    (message,) = decode_frame(_frame([11, ["a", "ws://x:1/"], 3]))
    assert message == ForwardJoin(Peer("a", "ws://x:1/"), 3)


def test_deep_nesting_is_refused() -> None:
    deep: object = 0
    for _ in range(50):
        deep = [deep]
    with pytest.raises(WireError):
        decode_frame(_frame([40, 1, "op", b""], deep))
    with pytest.raises(WireError):
        strict_loads(cbor2.dumps(deep), max_depth=16)


def test_oversize_frame_is_refused_before_parsing() -> None:
    frame = encode_frame([Gossip(MessageId("a", 1, 2), 0, "t", b"x" * 5000)])
    assert decode_frame(frame, max_frame=len(frame))
    with pytest.raises(WireError) as info:
        decode_frame(frame, max_frame=len(frame) - 1)
    assert info.value.reason == "too_large"


def test_payloads_are_plain_data_and_bounded() -> None:
    value = {"a": [1, 2.5, None, True, b"x", "s"], "b": {"c": -3}}
    assert decode_payload(encode_payload(value, max_size=100), max_size=100) == value
    assert decode_payload(encode_payload((1, 2), max_size=10), max_size=10) == [1, 2]
    with pytest.raises(MessageTooLarge):
        encode_payload("x" * 100, max_size=50)
    with pytest.raises(TypeError):
        encode_payload({1: "int keys are refused"}, max_size=100)
    with pytest.raises(TypeError):
        encode_payload(object(), max_size=100)
    with pytest.raises(TypeError):
        encode_payload(2**64, max_size=100)
    with pytest.raises(WireError):
        decode_payload(b"x" * 10, max_size=5)
