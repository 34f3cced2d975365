"""Signed broadcasts: a member cannot speak, or write a map entry, as another node."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from trio_replica.core.events import Delivery
from trio_replica.core.messages import Gossip, MessageId, Peer, Role
from trio_replica.core.ormap import Dot, Value
from trio_replica.core.wire import encode_frame, encode_payload
from trio_replica.node import Node
from trio_replica.runtime.config import NodeConfig
from trio_replica.runtime.handshake import Credentials, handshake_as_dialer
from trio_replica.runtime.identity import IdentityConfig, format_key, public_bytes, sign_gossip
from trio_replica.runtime.replica_api import TAG_PREFIX
from trio_replica.transports.memory import MemoryNetwork

from .harness import Cluster, overlay_ok, wait_until

NAMES = ("a", "b", "c", "d", "evil")
BASE = NodeConfig(name="base", secret=b"s" * 16)


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Ed25519PrivateKey]:
    """A key per node, each in the allow-list at ``tmp_path`` (evil is a member too)."""
    made = {name: Ed25519PrivateKey.generate() for name in NAMES}
    lines = [f"{name} {format_key(public_bytes(key))}\n" for name, key in made.items()]
    (tmp_path / "cluster.keys").write_text("".join(lines))
    return made


def _identity(keys: dict[str, Ed25519PrivateKey], allowlist: Path, name: str) -> IdentityConfig:
    return IdentityConfig(
        trust="allowlist",
        allowlist=allowlist,
        key=keys[name],
        sign_broadcasts=True,
        require_signatures=True,
    )


async def _start(
    c: Cluster, keys: dict[str, Ed25519PrivateKey], allowlist: Path, name: str, seeds: list[str]
) -> Node:
    return await c.start(name, seeds, identity=_identity(keys, allowlist, name))


def test_requiring_signatures_needs_an_allowlist_and_signing() -> None:
    from trio_replica.errors import ConfigError

    with pytest.raises(ConfigError, match="allowlist"):
        IdentityConfig(trust="tofu", sign_broadcasts=True, require_signatures=True)
    # And signing: a node that required signatures without signing would refuse its own.
    with pytest.raises(ConfigError, match="sign_broadcasts"):
        IdentityConfig(trust="allowlist", allowlist=Path("/"), require_signatures=True)


async def test_signed_broadcasts_reach_everyone(
    keys: dict[str, Ed25519PrivateKey], tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    net = MemoryNetwork(seed=41)
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, net, base=BASE)
        a = await _start(c, keys, tmp_path, "a", [])
        nodes = [a] + [await _start(c, keys, tmp_path, n, [a.address]) for n in "bcd"]
        with trio.fail_after(60):
            await wait_until(lambda: overlay_ok(nodes))
        maps = [await node.open_map("m") for node in nodes]
        for i, m in enumerate(maps):
            await m.put(f"k{i}", i)
        with trio.fail_after(30):
            await wait_until(lambda: all(len(m) == len(maps) for m in maps))
        for node in nodes:
            assert not {k for k in node.stats()["rejected"] if k.startswith(("gossip", "map"))}
        nursery.cancel_scope.cancel()


async def test_a_forged_origin_is_refused(
    keys: dict[str, Ed25519PrivateKey], tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    net = MemoryNetwork(seed=42)
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, net, base=BASE)
        a = await _start(c, keys, tmp_path, "a", [])
        b = await _start(c, keys, tmp_path, "b", [a.address])
        with trio.fail_after(30):
            await wait_until(lambda: [p.id for p in b.active_view()] == ["a"])
        async with b.subscribe("t") as deliveries:
            async with net.transport("evil").open_connection(b.address, timeout=5) as conn:
                evil = keys["evil"]
                creds = Credentials("trio-replica", b"s" * 16, Peer("evil", "mem://evil"), key=evil)
                await handshake_as_dialer(conn, creds, role=Role.NODE, timeout=5)
                payload = encode_payload("I am a", max_size=1024)

                def forged(nonce: int, signature: bytes) -> bytes:
                    message = Gossip(MessageId("a", 1, nonce), 1, "t", payload, False, signature)
                    return encode_frame([message])

                mine = sign_gossip(evil, "a", 1, 2, "t", payload)
                await conn.send(forged(1, b""))  # unsigned
                await conn.send(forged(2, mine))  # signed, by the wrong key
                await conn.send(forged(3, mine))  # a signature of another message
                with trio.fail_after(10):
                    await wait_until(
                        lambda: (
                            {"gossip_unsigned", "gossip_origin_key", "gossip_bad_signature"}
                            <= set(b.stats()["rejected"])
                        )
                    )
            # And a genuine broadcast from a still arrives, first.
            await a.broadcast("t", "really a")
            with trio.fail_after(10):
                first = await deliveries.receive()
            assert isinstance(first, Delivery) and first.payload == "really a"
        nursery.cancel_scope.cancel()


async def test_a_member_cannot_write_map_entries_as_another_node(
    keys: dict[str, Ed25519PrivateKey], tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    net = MemoryNetwork(seed=43)
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, net, base=BASE)
        a = await _start(c, keys, tmp_path, "a", [])
        b = await _start(c, keys, tmp_path, "b", [a.address])
        evil = await _start(c, keys, tmp_path, "evil", [a.address])
        nodes = [a, b, evil]
        with trio.fail_after(60):
            await wait_until(lambda: overlay_ok(nodes))
        on_b = await b.open_map("m")
        await a.open_map("m")
        await evil.open_map("m")
        # A broadcast under evil's own, valid signature, whose entry claims a as its writer
        # and carries evil's signature of it: the entry is checked against a's key.
        forged = Value("forged", Dot("a", a.clock.now()))
        signature = evil.runtime.sign_entry("m", "k", forged)
        delta = [["k", 1, "a", forged.dot.ts.wall, forged.dot.ts.logical, "forged", signature]]
        await evil.broadcast(TAG_PREFIX + "m", ["d", delta])
        with trio.fail_after(10):
            await wait_until(lambda: b.stats()["rejected"].get("map_signature", 0) == 1)
        assert on_b.get("k") is None
        nursery.cancel_scope.cancel()


async def test_an_allowlist_refuses_control_clients_it_does_not_list(
    keys: dict[str, Ed25519PrivateKey], tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    from trio_replica.runtime.control import ControlError, open_control

    net = MemoryNetwork(seed=44)
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, net, base=BASE)
        a = await _start(c, keys, tmp_path, "a", [])
        transport = net.transport("ops")
        with pytest.raises(ControlError, match="not in the allow-list"):
            async with open_control(a.address, transport=transport, secret=b"s" * 16):
                pass
        async with open_control(
            a.address, transport=transport, secret=b"s" * 16, key=keys["evil"]
        ) as client:
            assert (await client.call("status"))["id"] == "a"
        nursery.cancel_scope.cancel()


async def test_entries_keep_their_signatures_through_sync_and_the_store(
    keys: dict[str, Ed25519PrivateKey], tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Entries travel by anti-entropy too (a node that missed the broadcast, a new node):
    # each carries its writer's signature, stored with it, and a node that requires
    # signatures takes only entries whose writer signed them.
    net = MemoryNetwork(seed=45)
    allowlist, data = tmp_path, tmp_path / "a-data"
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, net, base=BASE)
        a = await c.start("a", identity=_identity(keys, allowlist, "a"), data_dir=data)
        evil = await _start(c, keys, allowlist, "evil", [a.address])
        with trio.fail_after(30):
            await wait_until(lambda: [p.id for p in a.active_view()] == ["evil"])
        on_a = await a.open_map("m", persist=True)
        on_evil = await evil.open_map("m")
        for i in range(20):
            await on_a.put(f"k{i}", i)
        await on_a.delete("k0")
        with trio.fail_after(30):
            await wait_until(lambda: len(on_evil) == 19)
        # The member slips an entry "written by a" into its own replica: no broadcast, so
        # only anti-entropy can carry it.
        forged = Value("forged", Dot("a", evil.clock.now()))
        on_evil._map.merge_entry("k1", forged)  # what a member's modified code could do
        c.stop("a")
        await c.wait_stopped("a")
        # a restarts from its store; b is new and syncs with both.
        a = await c.start("a", identity=_identity(keys, allowlist, "a"), data_dir=data)
        on_a = await a.open_map("m", persist=True)
        b = await _start(c, keys, allowlist, "b", [a.address, evil.address])
        on_b = await b.open_map("m")
        with trio.fail_after(120):
            await wait_until(
                lambda: len(on_b) == 19 and on_b.stats.rejected.get("signature", 0) >= 1
            )
        assert on_b.get("k1") == 1 and on_a.get("k1") == 1
        assert "k0" not in on_b
        nursery.cancel_scope.cancel()


def test_entry_signatures_travel_in_the_wire_form_and_are_checked() -> None:
    from trio_replica.core.hlc import HybridClock, Timestamp
    from trio_replica.core.ormap import ORMap
    from trio_replica.core.ormap_wire import from_wire_signed, ingest, to_wire

    entry = Value("v", Dot("a", Timestamp(HybridClock().now().wall, 0)))
    sig = b"s" * 64
    wire = to_wire([("k", entry), ("j", entry)], {"k": sig})
    assert [s for _, _, s in from_wire_signed(wire)] == [sig, b""]
    clock, local = HybridClock(), ORMap()
    result = ingest(local, wire, clock, authenticate=lambda key, e, s: s == sig)
    assert [r.reason for r in result.rejected] == ["signature"] and result.signatures == {"k": sig}
    bad = [[*wire[0][:-1], b"short"]]
    assert [r.reason for r in ingest(ORMap(), bad, clock).rejected] == ["signature"]
    # Not required: a signature that does not check is dropped and the entry kept.
    lenient = ingest(ORMap(), wire, clock, authenticate=lambda k, e, s: False, required=False)
    assert not lenient.rejected and lenient.signatures == {}
    # One dot twice in a slice (a writer whose clock went back): the winner keeps its own.
    w = entry.dot.ts.wall
    twice = [["k", 1, "a", w, 0, "zz", b"A" * 64], ["k", 1, "a", w, 0, "aa", b"B" * 64]]
    local = ORMap()
    assert ingest(local, twice, clock).signatures == {"k": b"A" * 64}
    assert local.get("k") == "zz"
