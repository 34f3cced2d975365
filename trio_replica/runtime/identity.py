"""Who a node is: its Ed25519 key, key rotation, and the trust store that binds ids to keys.

A cluster secret proves membership; a node key proves identity. Every node holds an Ed25519
key (kept in ``data_dir/node.key``, given by the embedder, or, without either, made for the
life of the process) and signs the handshake transcript with it (handshake.py). What a
peer's key is allowed to be is the trust store's decision, in one of three modes:

* ``secret``: any key, as long as the cluster secret is proven. A node id is still bound to
  its key while a link to it is open: another key for the same id is refused (the node
  checks that), so a member holding the secret cannot take over a live node's links.
* ``tofu``: trust on first use. The first key seen for an id is pinned (in
  ``data_dir/known_nodes``, or in memory without a data directory) and every later
  handshake for that id must show it, like SSH's ``known_hosts``.
* ``allowlist``: only the keys listed in a directory of files (``<anything>.keys``, one
  ``<node-id> <key> [until=<unix seconds>]`` per line) are accepted, each for its id.

Rotation without downtime: a node given a new key and its previous one (`IdentityConfig`
``previous_key``, ``rotate_until``) presents the new key with an *endorsement*: the previous
key's signature over (cluster, id, new key, end of the window). A trust store that pinned
the previous key moves the pin to the new one and keeps accepting the previous key until
the window ends; after it, the previous key is refused. An allow-list rotates by listing
both keys, the old one with ``until=``.

Keys are written ``ed25519:<base64url>`` (`format_key`), the form ``python -m trio_replica
key`` prints and the allow-list and ``known_nodes`` files hold.
"""

from __future__ import annotations

import base64
import logging
import math
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path

import attrs
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..core.messages import ENDORSEMENT_BYTES, GOSSIP_SIGNATURE_BYTES, KEY_BYTES, valid_node_id
from ..errors import ConfigError

log = logging.getLogger("trio_replica.identity")

#: File of a node's own key inside `data_dir`, and of TOFU pins.
KEY_FILE = "node.key"
KNOWN_FILE = "known_nodes"
KEY_PREFIX = "ed25519:"


class TrustMode:
    SECRET = "secret"
    TOFU = "tofu"
    ALLOWLIST = "allowlist"
    ALL = (SECRET, TOFU, ALLOWLIST)


def format_key(public: bytes) -> str:
    return KEY_PREFIX + base64.urlsafe_b64encode(public).rstrip(b"=").decode()


def parse_key(text: str) -> bytes:
    """A public key written by `format_key` (the ``ed25519:`` prefix is optional)."""
    body = text.strip().removeprefix(KEY_PREFIX)
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except ValueError:
        raise ConfigError(f"not a public key: {text!r:.60}") from None
    if len(raw) != KEY_BYTES:
        raise ConfigError(f"not an Ed25519 public key (32 bytes): {text!r:.60}")
    return raw


def public_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def verify(public: bytes, signature: bytes, data: bytes) -> bool:
    """True if `signature` is `public`'s over `data` (False for a malformed key too)."""
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


def load_private_key(value: Ed25519PrivateKey | bytes | str | Path) -> Ed25519PrivateKey:
    """A private key given as an object, 32 raw bytes, PEM bytes or the path of a PEM file."""
    if isinstance(value, Ed25519PrivateKey):
        return value
    if isinstance(value, bytes) and len(value) == KEY_BYTES:
        return Ed25519PrivateKey.from_private_bytes(value)
    if isinstance(value, str | Path):
        path = Path(value)
        try:
            value = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read the node key {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(value, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"not a PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError("the node key must be an Ed25519 key")
    return key


def key_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """The key in `path`, made (mode 0600, written atomically) if the file does not exist."""
    if path.exists():
        if path.stat().st_mode & 0o077:
            log.warning("node key %s is readable by other users; chmod 600 it", path)
        return load_private_key(path)
    key = Ed25519PrivateKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    # A leftover keeps its mode under O_CREAT: start afresh so the key is never readable.
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, key_pem(key))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    log.info("made a new node key in %s: %s", path, format_key(public_bytes(key)))
    return key


def node_key(config: IdentityConfig, data_dir: Path | None) -> Ed25519PrivateKey:
    """The node's key: the configured one, else ``data_dir/node.key``, else a fresh one."""
    if config.key is not None:
        return load_private_key(config.key)
    if config.key_file is not None:
        return load_or_create_key(config.key_file)
    if data_dir is not None:
        return load_or_create_key(data_dir / KEY_FILE)
    if config.trust != TrustMode.SECRET:
        log.warning(
            "this node's key lives only as long as the process (no data_dir and no key): "
            "peers that pinned it will refuse the node after a restart"
        )
    return Ed25519PrivateKey.generate()


def _gossip_signed(origin: str, stamp: int, nonce: int, tag: str, payload: bytes) -> bytes:
    parts = [b"trio_replica gossip v1", origin.encode(), tag.encode(), payload]
    head = struct.pack(">QQ", stamp, nonce)
    return head + b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def sign_gossip(
    key: Ed25519PrivateKey, origin: str, stamp: int, nonce: int, tag: str, payload: bytes
) -> bytes:
    """What a signed broadcast carries: our public key and its signature of the message."""
    return public_bytes(key) + key.sign(_gossip_signed(origin, stamp, nonce, tag, payload))


def gossip_signer(
    signature: bytes, origin: str, stamp: int, nonce: int, tag: str, payload: bytes
) -> bytes | None:
    """The key that signed a broadcast, if the signature is valid; else None."""
    if len(signature) != GOSSIP_SIGNATURE_BYTES:
        return None
    key, sig = signature[:KEY_BYTES], signature[KEY_BYTES:]
    if not verify(key, sig, _gossip_signed(origin, stamp, nonce, tag, payload)):
        return None
    return key


def _endorsed(cluster: str, node_id: str, new: bytes, until_ms: int) -> bytes:
    parts = [b"trio_replica rotate v1", cluster.encode(), node_id.encode(), new]
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts) + struct.pack(">Q", until_ms)


def endorse(
    previous: Ed25519PrivateKey, cluster: str, node_id: str, new: bytes, until: float
) -> bytes:
    """The previous key's endorsement of `new` until `until` (wall seconds)."""
    until_ms = int(until * 1000)
    signature = previous.sign(_endorsed(cluster, node_id, new, until_ms))
    return public_bytes(previous) + struct.pack(">Q", until_ms) + signature


# An endorsement is the previous public key, the end of the window (ms since the epoch,
# 8 bytes big-endian) and the previous key's signature: ENDORSEMENT_BYTES in all.


def read_endorsement(
    endorsement: bytes, cluster: str, node_id: str, new: bytes
) -> tuple[bytes, float] | None:
    """(previous key, end of window in wall seconds) if the endorsement is valid, else None."""
    if len(endorsement) != ENDORSEMENT_BYTES:
        return None
    previous = endorsement[:KEY_BYTES]
    (until_ms,) = struct.unpack(">Q", endorsement[KEY_BYTES : KEY_BYTES + 8])
    signature = endorsement[KEY_BYTES + 8 :]
    if not verify(previous, signature, _endorsed(cluster, node_id, new, until_ms)):
        return None
    return previous, until_ms / 1000


@attrs.frozen
class IdentityConfig:
    """A node's key and how it trusts its peers' keys (module docstring)."""

    #: The node's private key (object, 32 raw bytes, PEM bytes or a PEM file's path). None:
    #: ``data_dir/node.key`` (made on first start), or a key for this process only.
    key: Ed25519PrivateKey | bytes | str | Path | None = attrs.field(default=None, repr=False)
    #: The key being rotated out, still endorsing `key` until `rotate_until` (wall seconds).
    previous_key: Ed25519PrivateKey | bytes | str | Path | None = attrs.field(
        default=None, repr=False
    )
    rotate_until: float | None = None
    #: The same two keys as PEM files (what a config file or the command line gives);
    #: `key_file` is made (mode 0600) if it does not exist.
    key_file: Path | None = attrs.field(default=None, converter=attrs.converters.optional(Path))
    previous_key_file: Path | None = attrs.field(
        default=None, converter=attrs.converters.optional(Path)
    )
    #: ``secret``, ``tofu`` or ``allowlist`` (module docstring).
    trust: str = TrustMode.SECRET
    #: Directory of ``*.keys`` files for ``allowlist``.
    allowlist: Path | None = attrs.field(default=None, converter=attrs.converters.optional(Path))
    #: Sign every broadcast this node originates (its key and signature travel with it),
    #: and refuse broadcasts that are unsigned, signed by a key the trust store does not
    #: give their origin, or carry map writes of another writer than their origin. Turn on
    #: signing everywhere first, then requiring (README "Security": the cost).
    sign_broadcasts: bool = False
    require_signatures: bool = False

    def __attrs_post_init__(self) -> None:
        if self.trust not in TrustMode.ALL:
            raise ConfigError(f"identity.trust must be one of {', '.join(TrustMode.ALL)}")
        if self.trust == TrustMode.ALLOWLIST and self.allowlist is None:
            raise ConfigError("identity.trust = allowlist needs identity.allowlist (a directory)")
        if self.key is not None and self.key_file is not None:
            raise ConfigError("give identity.key or identity.key_file, not both")
        if self.previous_key is not None and self.previous_key_file is not None:
            raise ConfigError("give identity.previous_key or identity.previous_key_file, not both")
        if self.previous_key_file is not None and self.previous_key is None:
            object.__setattr__(self, "previous_key", self.previous_key_file)
        if (self.previous_key is None) != (self.rotate_until is None):
            raise ConfigError("identity.previous_key and identity.rotate_until go together")
        if self.require_signatures and not self.sign_broadcasts:
            raise ConfigError(
                "identity.require_signatures needs sign_broadcasts: this node's own writes "
                "would be unsigned, and refused by itself and by its peers"
            )
        if self.require_signatures and self.trust != TrustMode.ALLOWLIST:
            raise ConfigError(
                "identity.require_signatures needs trust = allowlist: a broadcast reaches "
                "nodes that never met its origin, and only an allow-list tells them its key "
                "(under tofu the first key seen would decide, and a member could be first)"
            )


@attrs.define
class _Pin:
    key: bytes
    #: Keys this id used before, accepted until the wall time given.
    previous: dict[bytes, float] = attrs.field(factory=dict)


class Refused(Exception):
    """The trust store refuses a key for an id; `reason` is a counter label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class TrustStore:
    """Which key each node id may use (module docstring). Checked after the signature."""

    def __init__(
        self,
        mode: str,
        *,
        cluster: str,
        known_file: Path | None = None,
        allowlist: Path | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.mode = mode
        self.cluster = cluster
        self._known_file = known_file
        self._allowlist = allowlist
        self._wall = wall
        self._pins: dict[str, _Pin] = {}
        self._allow_mtime: float | None = None
        self._allow_checked = -1.0
        if mode == TrustMode.TOFU and known_file is not None and known_file.exists():
            self._pins = self._read(known_file, several=False)
        if mode == TrustMode.ALLOWLIST:
            self._load_allowlist()

    # --- files -----------------------------------------------------------------------------

    def _read(self, path: Path, *, several: bool) -> dict[str, _Pin]:
        """Pins from a ``known_nodes`` or allow-list file; `several`: an id may have more
        than one current key (allow-lists only; in ``known_nodes`` it means tampering)."""
        pins: dict[str, _Pin] = {}
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
        for number, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            fields = line.split()
            until: float | None = None
            if len(fields) == 3 and fields[2].startswith("until="):
                try:
                    until = float(fields[2].removeprefix("until="))
                except ValueError:
                    raise ConfigError(f"{path}:{number}: bad until= value") from None
            elif len(fields) != 2:
                raise ConfigError(f"{path}:{number}: expected '<node-id> <key> [until=<secs>]'")
            node_id, key = fields[0], parse_key(fields[1])
            if not valid_node_id(node_id):
                raise ConfigError(f"{path}:{number}: {node_id!r:.60} is not a node id")
            pin = pins.get(node_id)
            if until is not None:
                if pin is None:
                    pin = pins[node_id] = _Pin(b"")
                pin.previous[key] = until
            elif pin is None or not pin.key:
                if pin is None:
                    pins[node_id] = _Pin(key)
                else:
                    pin.key = key
            elif several:
                # An allow-list may list several current keys for an id (a rotation whose
                # window the operator ends by editing the file): keep them all.
                pin.previous[key] = float("inf")
            else:
                raise ConfigError(f"{path}:{number}: a second current key for {node_id!r}")
        return pins

    def _load_allowlist(self) -> None:
        assert self._allowlist is not None
        if not self._allowlist.is_dir():
            raise ConfigError(f"allow-list directory {self._allowlist} does not exist")
        pins: dict[str, _Pin] = {}
        for path in sorted(self._allowlist.glob("*.keys")):
            for node_id, pin in self._read(path, several=True).items():
                mine = pins.setdefault(node_id, _Pin(b""))
                if pin.key and not mine.key:
                    mine.key = pin.key
                elif pin.key:
                    mine.previous[pin.key] = float("inf")
                mine.previous.update(pin.previous)
        self._pins = pins
        self._allow_mtime = self._allowlist_mtime()

    def _allowlist_mtime(self) -> float:
        assert self._allowlist is not None
        paths = [self._allowlist, *self._allowlist.glob("*.keys")]
        return max(p.stat().st_mtime for p in paths)

    def _refresh_allowlist(self) -> None:
        """Re-read the allow-list when a file changed (looked at once a second at most)."""
        now = time.monotonic()
        if now - self._allow_checked < 1.0:
            return
        self._allow_checked = now
        try:
            if self._allowlist_mtime() != self._allow_mtime:
                self._load_allowlist()
                log.info("allow-list %s re-read: %d node ids", self._allowlist, len(self._pins))
        except (OSError, ConfigError) as exc:
            log.error("allow-list %s not re-read, keeping the last one: %s", self._allowlist, exc)

    def _save(self) -> None:
        if self._known_file is None:
            return
        lines = ["# node ids and the keys they proved first (trio_replica, trust = tofu)"]
        for node_id, pin in sorted(self._pins.items()):
            lines.append(f"{node_id} {format_key(pin.key)}")
            for key, until in pin.previous.items():
                lines.append(f"{node_id} {format_key(key)} until={until:.3f}")
        tmp = self._known_file.with_name(self._known_file.name + ".tmp")
        try:
            # Flushed before the rename: a crash must not leave an empty file (every pin
            # forgotten, every key trusted afresh).
            with tmp.open("w") as out:
                out.write("\n".join(lines) + "\n")
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self._known_file)
        except OSError as exc:
            log.error("cannot save pinned keys to %s: %s", self._known_file, exc)

    # --- the decision ----------------------------------------------------------------------

    def pinned(self, node_id: str) -> bytes | None:
        pin = self._pins.get(node_id)
        return pin.key if pin is not None and pin.key else None

    def knows_key(self, key: bytes) -> bool:
        """Whether an allow-list lists `key` (for any id, current or within its window)."""
        self._refresh_allowlist()
        now = self._wall()
        return any(
            key == pin.key or pin.previous.get(key, -math.inf) > now for pin in self._pins.values()
        )

    def check(self, node_id: str, key: bytes, endorsement: bytes) -> None:
        """Accept `key` for `node_id` (pinning or rotating it) or raise `Refused`.

        `endorsement` has been checked by nobody yet: it is verified here. Called for keys
        proven in a handshake only: a key seen in a broadcast is checked with `allows`.
        """
        now = self._wall()
        endorsed = (
            read_endorsement(endorsement, self.cluster, node_id, key) if endorsement else None
        )
        if endorsement and endorsed is None:
            raise Refused("endorsement", f"{node_id} shows an invalid key endorsement")
        if self.mode == TrustMode.SECRET:
            return
        if self.mode == TrustMode.ALLOWLIST:
            self._refresh_allowlist()
        pin = self._pins.get(node_id)
        if pin is None:
            if self.mode == TrustMode.ALLOWLIST:
                raise Refused("not_allowed", f"node id {node_id!r} is not in the allow-list")
            self._pins[node_id] = _Pin(key)
            log.info("pinned %s to key %s (first use)", node_id, format_key(key))
            self._save()
            return
        if key == pin.key:
            return
        until = pin.previous.get(key)
        if until is not None:
            if now < until:
                return
            raise Refused(
                "key_expired", f"{node_id}'s key {format_key(key)} was rotated out at {until:.0f}"
            )
        if self.mode == TrustMode.ALLOWLIST:
            raise Refused("key_mismatch", f"{node_id} shows a key the allow-list does not hold")
        if endorsed is not None:
            previous, window_end = endorsed
            if previous == pin.key and now < window_end:
                pin.previous[pin.key] = window_end
                pin.key = key
                log.warning(
                    "%s rotated its key to %s (the previous one is accepted until %.0f)",
                    node_id,
                    format_key(key),
                    window_end,
                )
                self._save()
                return
        raise Refused(
            "key_mismatch",
            f"node id {node_id!r} is pinned to another key ({format_key(pin.key)}); "
            f"refusing {format_key(key)}",
        )

    def keys_for(self, node_id: str, *, history: bool = False) -> list[bytes]:
        """The keys an allow-list gives `node_id` now (none in the other modes); with
        `history`, also those whose rotation window has ended but that are still listed
        (what they signed while valid stays theirs)."""
        if self.mode != TrustMode.ALLOWLIST:
            return []
        self._refresh_allowlist()
        pin = self._pins.get(node_id)
        if pin is None:
            return []
        now = self._wall()
        keys = [pin.key] if pin.key else []
        return keys + [k for k, until in pin.previous.items() if history or until > now]

    def allows(self, node_id: str, key: bytes) -> bool:
        """Whether an allow-list gives `key` to `node_id` now (broadcast signatures: never
        pins anything, so a relayed message cannot decide whose key an id has)."""
        if self.mode != TrustMode.ALLOWLIST:
            return False
        self._refresh_allowlist()
        pin = self._pins.get(node_id)
        if pin is None:
            return False
        return key == pin.key or pin.previous.get(key, -math.inf) > self._wall()

    def forget(self, node_id: str) -> bool:
        """Drop `node_id`'s pin (TOFU: its next key is trusted on first use again)."""
        if self._pins.pop(node_id, None) is None:
            return False
        self._save()
        return True
