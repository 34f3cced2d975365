"""Node keys and trust: impersonation refused, TOFU, allow-lists, key and secret rotation."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from trio_replica.core.messages import Peer, Role
from trio_replica.errors import ConfigError, HandshakeError
from trio_replica.localcluster import run_node
from trio_replica.node import Node
from trio_replica.runtime.config import NodeConfig
from trio_replica.runtime.handshake import Credentials, handshake_as_dialer, handshake_as_listener
from trio_replica.runtime.identity import (
    IdentityConfig,
    Refused,
    TrustMode,
    TrustStore,
    endorse,
    format_key,
    load_or_create_key,
    parse_key,
    public_bytes,
)
from trio_replica.transports.memory import MemoryNetwork

from .harness import Cluster, wait_until


def _key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def _pub(key: Ed25519PrivateKey) -> bytes:
    return public_bytes(key)


# --- the trust store ------------------------------------------------------------------------


def test_keys_print_and_parse_back() -> None:
    pub = _pub(_key())
    assert parse_key(format_key(pub)) == pub
    with pytest.raises(ConfigError):
        parse_key("ed25519:AAAA")


def test_tofu_pins_the_first_key_and_refuses_another(tmp_path: Path) -> None:
    known = tmp_path / "known_nodes"
    store = TrustStore(TrustMode.TOFU, cluster="c", known_file=known)
    first, second = _pub(_key()), _pub(_key())
    store.check("b", first, b"")
    store.check("b", first, b"")
    with pytest.raises(Refused) as info:
        store.check("b", second, b"")
    assert info.value.reason == "key_mismatch"
    # The pin survives a restart (the file), and forgetting it trusts the next key.
    again = TrustStore(TrustMode.TOFU, cluster="c", known_file=known)
    assert again.pinned("b") == first
    assert again.forget("b")
    again.check("b", second, b"")
    assert again.pinned("b") == second


def test_an_endorsed_rotation_moves_the_pin_and_the_old_key_expires() -> None:
    now = [1000.0]
    store = TrustStore(TrustMode.TOFU, cluster="c", wall=lambda: now[0])
    old, new = _key(), _key()
    store.check("b", _pub(old), b"")
    endorsement = endorse(old, "c", "b", _pub(new), until=1100.0)
    store.check("b", _pub(new), endorsement)
    assert store.pinned("b") == _pub(new)
    store.check("b", _pub(old), b"")  # within the window
    now[0] = 1100.0
    with pytest.raises(Refused) as info:
        store.check("b", _pub(old), b"")
    assert info.value.reason == "key_expired"
    store.check("b", _pub(new), b"")


def test_endorsements_are_checked() -> None:
    now = [1000.0]
    store = TrustStore(TrustMode.TOFU, cluster="c", wall=lambda: now[0])
    old, new, stranger = _key(), _key(), _key()
    store.check("b", _pub(old), b"")
    # Endorsed by a key that is not the pinned one, for another id, or after the window.
    for endorsement in (
        endorse(stranger, "c", "b", _pub(new), until=1100.0),
        endorse(old, "c", "b", _pub(new), until=900.0),
    ):
        with pytest.raises(Refused) as info:
            store.check("b", _pub(new), endorsement)
        assert info.value.reason == "key_mismatch"
    with pytest.raises(Refused) as info:
        store.check("b", _pub(new), endorse(old, "c", "x", _pub(new), until=1100.0))
    assert info.value.reason == "endorsement"
    assert store.pinned("b") == _pub(old)


def test_allowlist_accepts_only_listed_keys(tmp_path: Path) -> None:
    now = [1000.0]
    b1, b2, c = _pub(_key()), _pub(_key()), _pub(_key())
    (tmp_path / "team.keys").write_text(
        f"# our nodes\nb {format_key(b2)}\nb {format_key(b1)} until=1100\n"
    )
    store = TrustStore(TrustMode.ALLOWLIST, cluster="x", allowlist=tmp_path, wall=lambda: now[0])
    store.check("b", b2, b"")
    store.check("b", b1, b"")
    for node_id, key, reason in (("c", c, "not_allowed"), ("b", c, "key_mismatch")):
        with pytest.raises(Refused) as info:
            store.check(node_id, key, b"")
        assert info.value.reason == reason
    now[0] = 1100.0
    with pytest.raises(Refused) as info:
        store.check("b", b1, b"")
    assert info.value.reason == "key_expired"


def test_a_node_key_is_made_once_and_kept_private(tmp_path: Path) -> None:
    path = tmp_path / "d" / "node.key"
    key = load_or_create_key(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert _pub(load_or_create_key(path)) == _pub(key)


def test_identity_settings_are_checked() -> None:
    with pytest.raises(ConfigError):
        IdentityConfig(trust="nobody")
    with pytest.raises(ConfigError):
        IdentityConfig(trust="allowlist")
    with pytest.raises(ConfigError):
        IdentityConfig(previous_key=_key())
    with pytest.raises(ConfigError):
        NodeConfig(secret=b"s" * 16, accepted_secrets=(b"short",))


# --- the handshake ----------------------------------------------------------------------------


class _Bound:
    """A connection that claims another TLS channel (a man in the middle's other half)."""

    def __init__(self, conn: Any, binding: bytes) -> None:
        self._conn = conn
        self.channel_binding = binding

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


async def _handshake(
    dialer: Credentials, listener: Credentials, binding: bytes = b""
) -> tuple[Any, Any]:
    """Run both sides over the memory network; each outcome or its HandshakeError."""
    net = MemoryNetwork(seed=1)
    outcome: dict[str, Any] = {}

    async def serve(conn: Any) -> None:
        try:
            outcome["listener"] = await handshake_as_listener(
                conn, listener, timeout=5, accept=lambda hello: None
            )
        except HandshakeError as exc:
            outcome["listener"] = exc

    async with trio.open_nursery() as nursery:
        await nursery.start(net.transport("l").serve, "mem://l", serve)
        async with net.transport("d").open_connection("mem://l", timeout=5) as conn:
            try:
                outcome["dialer"] = await handshake_as_dialer(
                    _Bound(conn, binding), dialer, role=Role.NODE, timeout=5
                )
            except HandshakeError as exc:
                outcome["dialer"] = exc
        with trio.fail_after(10):
            await wait_until(lambda: "listener" in outcome)
        nursery.cancel_scope.cancel()
    return outcome["dialer"], outcome["listener"]


def _creds(name: str, secret: bytes = b"s" * 16, **kw: Any) -> Credentials:
    return Credentials("c", secret, Peer(name, f"mem://{name}"), **kw)


async def test_the_handshake_proves_both_keys(autojump_clock: trio.testing.MockClock) -> None:
    d, listener = _creds("d"), _creds("l")
    dialed, accepted = await _handshake(d, listener)
    assert dialed.key == listener.public and accepted.key == d.public
    assert accepted.peer == Peer("d", "mem://d") and accepted.role == Role.NODE


async def test_a_handshake_across_two_tls_channels_fails(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A relay terminating TLS on each side sees two channels: the transcripts differ.
    dialed, accepted = await _handshake(_creds("d"), _creds("l"), binding=b"other channel")
    assert isinstance(dialed, HandshakeError) and dialed.reason == "secret"
    assert isinstance(accepted, HandshakeError)


async def test_a_secret_keyring_accepts_old_and_new_secrets(
    autojump_clock: trio.testing.MockClock,
) -> None:
    old, new, other = b"o" * 16, b"n" * 16, b"x" * 16
    # Mid-rotation: one side proves the new secret, the other still the old; both accept both.
    dialed, accepted = await _handshake(
        _creds("d", old, accepted=(new,)), _creds("l", new, accepted=(old,))
    )
    assert not isinstance(dialed, HandshakeError) and not isinstance(accepted, HandshakeError)
    dialed, accepted = await _handshake(_creds("d", other), _creds("l", new, accepted=(old,)))
    assert isinstance(dialed, HandshakeError) and dialed.reason == "secret"


# --- nodes ------------------------------------------------------------------------------------


async def _impostor(
    nursery: trio.Nursery, net: MemoryNetwork, base: NodeConfig, victim: str, seed: str
) -> Node:
    """A node with the cluster secret that takes `victim`'s id from another host."""
    config = NodeConfig(
        name=victim,
        listen="mem://impostor",
        seeds=(seed,),
        secret=base.secret,
        identity=base.identity,
        rng_seed=99,
    )
    node: Node = await nursery.start(
        run_node, config, net.transport("impostor"), trio.CancelScope(), trio.Event()
    )
    return node


async def test_a_member_cannot_take_a_live_nodes_id(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork(seed=5)
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, net, base=NodeConfig(name="base", secret=b"s" * 16))
        a = await c.start("a")
        b = await c.start("b", [a.address])
        with trio.fail_after(30):
            await wait_until(lambda: [p.id for p in a.active_view()] == ["b"])
        await _impostor(nursery, net, c.base, "b", a.address)
        with trio.fail_after(30):
            await wait_until(lambda: a.stats()["handshakes_refused"].get("id_taken", 0) >= 2)
        assert a.active_view() == [b.me]
        assert a.runtime.connections.get("b").key == b.public_key
        nursery.cancel_scope.cancel()


async def test_tofu_refuses_another_key_for_a_known_id_even_when_it_is_down(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork(seed=6)
    base = NodeConfig(name="base", secret=b"s" * 16, identity=IdentityConfig(trust="tofu"))
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, net, base=base)
        a = await c.start("a")
        b = await c.start("b", [a.address])
        with trio.fail_after(30):
            await wait_until(lambda: [p.id for p in a.active_view()] == ["b"])
        assert a.trust.pinned("b") == b.public_key
        c.crash("b")
        with trio.fail_after(30):
            await wait_until(lambda: a.active_view() == [])
        await _impostor(nursery, net, base, "b", a.address)
        with trio.fail_after(30):
            await wait_until(lambda: a.stats()["handshakes_refused"].get("key_mismatch", 0) >= 1)
        assert a.active_view() == []
        nursery.cancel_scope.cancel()


async def test_a_rotated_key_is_accepted_in_its_window_and_the_old_one_refused_after(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork(seed=7)
    base = NodeConfig(name="base", secret=b"s" * 16, identity=IdentityConfig(trust="tofu"))
    old, new = _key(), _key()
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, net, base=base)
        a = await c.start("a")
        # a's wall clock, which we move past the window below (b endorses on its own,
        # real, clock: the window must be open there).
        ahead = [0]
        a.clock.physical = lambda: int(time.time() * 1000) + ahead[0]

        async def b_with(identity: IdentityConfig) -> Node:
            b = await c.start("b", [a.address], identity=identity)
            with trio.fail_after(30):
                await wait_until(lambda: [p.id for p in a.active_view()] == ["b"])
            return b

        async def b_stopped() -> None:
            c.stop("b")
            await c.wait_stopped("b")
            with trio.fail_after(30):
                await wait_until(lambda: a.active_view() == [])

        await b_with(IdentityConfig(trust="tofu", key=old))
        assert a.trust.pinned("b") == _pub(old)
        await b_stopped()
        until = time.time() + 60
        rotated = IdentityConfig(trust="tofu", key=new, previous_key=old, rotate_until=until)
        await b_with(rotated)
        assert a.trust.pinned("b") == _pub(new)
        await b_stopped()
        # Within the window a node still on the old key is accepted...
        await b_with(IdentityConfig(trust="tofu", key=old))
        await b_stopped()
        ahead[0] = 61_000
        # ...after it, refused.
        await c.start("b", [a.address], identity=IdentityConfig(trust="tofu", key=old))
        with trio.fail_after(30):
            await wait_until(lambda: a.stats()["handshakes_refused"].get("key_expired", 0) >= 1)
        assert a.active_view() == []
        nursery.cancel_scope.cancel()


async def test_an_allowlist_admits_only_the_listed_nodes(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    net = MemoryNetwork(seed=8)
    keys = {name: _key() for name in "abc"}
    (tmp_path / "cluster.keys").write_text(
        "".join(f"{name} {format_key(_pub(keys[name]))}\n" for name in "ab")
    )
    listed = IdentityConfig(trust="allowlist", allowlist=tmp_path)
    base = NodeConfig(name="base", secret=b"s" * 16, identity=listed)
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, net, base=base)

        def identity(name: str) -> IdentityConfig:
            return IdentityConfig(trust="allowlist", allowlist=tmp_path, key=keys[name])

        a = await c.start("a", identity=identity("a"))
        await c.start("b", [a.address], identity=identity("b"))
        with trio.fail_after(30):
            await wait_until(lambda: [p.id for p in a.active_view()] == ["b"])
        await c.start("c", [a.address], identity=identity("c"))
        with trio.fail_after(30):
            await wait_until(lambda: a.stats()["handshakes_refused"].get("not_allowed", 0) >= 1)
        assert [p.id for p in a.active_view()] == ["b"]
        nursery.cancel_scope.cancel()
