"""`NodeConfig`: everything a node needs to start, with the papers' defaults.

One frozen object, validated at construction, grouping the settings of each layer (links,
membership, broadcast). Protocol sizes and timers live in the cores' own config classes
next to the rules they tune; this module gathers them and adds the node's identity,
addresses and security settings.
"""

from __future__ import annotations

import ipaddress
import math
import secrets
import ssl
import urllib.parse
from collections.abc import Iterable
from pathlib import Path

import attrs

from ..core.hlc import DEFAULT_MAX_OFFSET_MS, MAX_WALL
from ..core.hyparview import HyParViewConfig
from ..core.messages import MAX_CLUSTER, MAX_NODE_ID, valid_node_id
from ..core.plumtree import PlumtreeConfig
from ..core.replication import DigestSyncConfig
from ..errors import ConfigError
from .flow import FlowConfig
from .health import HealthConfig
from .identity import IdentityConfig
from .linkconfig import LinkConfig

#: The shard's largest ring.
MAX_RING = 65_536

#: Largest application payload (a broadcast, a value) by default.
DEFAULT_MAX_PAYLOAD = 1024 * 1024


def _to_tuple(value: str | Iterable[str]) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def _secret(value: bytes | str | None) -> bytes | None:
    if isinstance(value, str):
        return value.encode()
    return value


def _secrets(values: Iterable[bytes | str]) -> tuple[bytes, ...]:
    return tuple(_secret(v) or b"" for v in values)


def normalize_address(address: str, *, default_scheme: str = "ws") -> str:
    """Accept ``host:port`` as shorthand for ``ws://host:port``; check the URL's shape."""
    if "://" not in address:
        address = f"{default_scheme}://{address}"
    try:
        parsed = urllib.parse.urlsplit(address)
    except ValueError as exc:
        raise ConfigError(
            f"address {address!r} is not a URL ({exc}); IPv6 hosts go in brackets: [::1]:7000"
        ) from None
    if parsed.scheme in ("ws", "wss"):
        try:
            port = parsed.port
        except ValueError:
            port = None
            if parsed.netloc.rpartition(":")[2]:
                hint = "; IPv6 hosts go in brackets: [::1]:7000" if "[" not in address else ""
                hint = hint if parsed.netloc.count(":") > 1 else ""
                raise ConfigError(
                    f"address {address!r}: the port must be a number from 0 to 65535{hint}"
                ) from None
        if not parsed.hostname or port is None:
            raise ConfigError(f"address {address!r} needs a host and a port")
        if parsed.path not in ("", "/") or parsed.query or parsed.fragment or parsed.username:
            raise ConfigError(
                f"address {address!r}: nodes serve their protocol at the root, without a path"
            )
    elif parsed.scheme == "mem":
        if not parsed.netloc:
            raise ConfigError(f"address {address!r} needs a name")
    else:
        raise ConfigError(f"address {address!r}: unknown scheme {parsed.scheme!r}")
    return address


def is_loopback(address: str) -> bool:
    """True for an address only this machine can reach (or the in-memory network)."""
    parsed = urllib.parse.urlsplit(address)
    if parsed.scheme == "mem":
        return True
    host = parsed.hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@attrs.frozen
class ReplicaConfig:
    """Settings of replica instances."""

    #: Mean anti-entropy period in seconds (each tick jittered by +-25%); SPEC default 30 s.
    anti_entropy_interval: float = 30.0
    #: Largest chunk of a full sync, in bytes of CBOR. Decoding one strictly and merging it
    #: takes loop time in proportion (about 25 ms for 64 KiB of small entries; 256 KiB held
    #: the loop for 100 ms, issue 13).
    sync_chunk_bytes: int = 64 * 1024
    #: Inputs of one source (deliveries, membership events, one peer's direct messages)
    #: waiting for the driver task; a source beyond it waits (a peer is then not read).
    inbox_size: int = 1024
    #: Bytes waiting for the driver task, all sources together (one source with nothing
    #: waiting is always admitted one input).
    inbox_bytes: int = 8 * 1024 * 1024
    #: Deliveries buffered between the broadcast component and the driver; at half of it
    #: the node slows down (backpressure) before the driver would miss any.
    delivery_buffer: int = 1024
    #: Shortest time between two sync pulls after `Lagged` notices.
    resync_interval: float = 1.0
    #: Digest anti-entropy (for owners that offer a digest: `digestsync`).
    digest: DigestSyncConfig = attrs.field(factory=DigestSyncConfig)
    #: A full sync (owners without a digest) served to one peer is not served to it again
    #: sooner than this: requests meanwhile wait, folded into one.
    full_sync_again_after: float = 10.0
    #: Seconds an owner's callback (`merge_delta`, `apply_full_sync`, `remove_node`,
    #: `before_sync`, ...) may take on the driver's task: past it the callback is
    #: cancelled, reported (`CallbackHung`, logged and counted) and the driver restarted,
    #: so that a hung callback does not stall the instance for good.
    callback_timeout: float = 30.0
    #: Most writes (`broadcast_update`) one delta broadcast carries, and its most bytes
    #: (also capped by `max_payload`): the writes made while the node cannot send yet
    #: travel together (`replica_writes`); a write waits while the batch is full. Measured
    #: (issue 19, `bench/map_writes.py`, 10 writers on 10 nodes at full speed): 128 and
    #: 16 KiB against 512 and 64 KiB, the same writes per second (within the runs' noise)
    #: and RMR 0.10-0.29 instead of 0.56-1.06: a big delta takes each hop long enough for
    #: announcements on other paths to be grafted before it arrives.
    batch_entries: int = 128
    batch_bytes: int = 16 * 1024

    def __attrs_post_init__(self) -> None:
        if not self.anti_entropy_interval > 0:
            raise ConfigError("replica.anti_entropy_interval must be positive")
        if self.sync_chunk_bytes < 1024:
            raise ConfigError("replica.sync_chunk_bytes must be at least 1024")
        for name in ("inbox_size", "inbox_bytes", "delivery_buffer", "batch_entries"):
            if getattr(self, name) < 1:
                raise ConfigError(f"replica.{name} must be at least 1")
        if self.batch_bytes < 1024:
            raise ConfigError("replica.batch_bytes must be at least 1024")
        if not (math.isfinite(self.resync_interval) and self.resync_interval >= 0):
            raise ConfigError("replica.resync_interval must be >= 0")
        if not self.callback_timeout > 0:
            raise ConfigError("replica.callback_timeout must be positive")


@attrs.frozen
class DeparturesConfig:
    """When a suspected node counts as failed (module docstring)."""

    #: Distinct nodes whose link to it failed.
    observers: int = 2
    #: Time left for a refutation once enough nodes suspect it.
    confirm_delay: float = 3.0
    #: A suspicion that nothing refutes this long confirms with one observer.
    lone_timeout: float = 30.0
    #: Refutations of suspicions about this node: at most one per this many seconds.
    refute_interval: float = 1.0

    def __attrs_post_init__(self) -> None:
        if self.observers < 1:
            raise ConfigError("departures.observers must be at least 1")
        for name in ("confirm_delay", "lone_timeout", "refute_interval"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"departures.{name} must be >= 0")


# --- the built-ins' settings (the built-ins live in `trio_replica.stores`; their settings
# are here, with the rest of `NodeConfig`, so that the runtime's config needs nothing above it)


@attrs.frozen
class LeaseConfig:
    #: Seconds between two renewals of a node's lease, and how far ahead each reaches
    #: (barrel_p2p's shard: 2 s and 6 s).
    heartbeat: float = 2.0
    ttl: float = 6.0

    def __attrs_post_init__(self) -> None:
        if not 0 < self.heartbeat < self.ttl:
            raise ConfigError(f"{type(self).__name__}: 0 < heartbeat < ttl is needed")


@attrs.frozen
class LeaderConfig(LeaseConfig):
    #: Seconds a new candidacy waits before it may lead (and for a first comparison with a
    #: peer, or a TTL without one), so that candidacies put at once have all arrived.
    settle: float = 2.0

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if not self.settle >= 0:
            raise ConfigError("leader: settle must be >= 0")


@attrs.frozen
class RegistryConfig(LeaseConfig):
    """Lease timing of the registry (`LeaseConfig`)."""


@attrs.frozen
class ShardConfig(LeaseConfig):
    #: Partitions of the key space (the same on every member): more than the members by
    #: far, so that ownership spreads evenly (64 members get 16 partitions each).
    ring_size: int = 1024

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if type(self.ring_size) is not int or not 1 <= self.ring_size <= MAX_RING:
            raise ConfigError(f"shard: ring_size must be an integer from 1 to {MAX_RING}")


@attrs.frozen
class ReminderConfig(LeaseConfig):
    #: Seconds a worker waits, after the workers changed, before firing reminders it did
    #: not own before.
    handoff: float = 2.0

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if not self.handoff >= 0:
            raise ConfigError("reminders: handoff must be >= 0")


@attrs.frozen
class NodeConfig:
    """Configuration of one node.

    `listen` is where the node binds (``ws://127.0.0.1:0`` picks a free port); `advertise`
    is the address other nodes dial (defaults to the bound address). `seeds` are addresses
    of nodes to join through. Without a `secret` the node refuses to listen on anything but
    a loopback address: the secret is what keeps strangers out of the cluster.
    """

    name: str = attrs.field(factory=lambda: f"node-{secrets.token_hex(4)}")
    listen: str = "ws://127.0.0.1:0"
    advertise: str | None = None
    seeds: tuple[str, ...] = attrs.field(default=(), converter=_to_tuple)
    cluster: str = "trio-replica"
    secret: bytes | None = attrs.field(default=None, converter=_secret, repr=False)
    #: Further cluster secrets accepted from peers (this node proves `secret`): rotate the
    #: secret by adding the new one here everywhere, then swapping, then dropping the old.
    accepted_secrets: tuple[bytes, ...] = attrs.field(default=(), converter=_secrets, repr=False)
    #: The node's key, key rotation and the trust mode (identity.py, README "Security").
    identity: IdentityConfig = attrs.field(factory=IdentityConfig)
    #: Server-side TLS for ``wss://`` listeners (set verify_mode for client certificates).
    server_ssl: ssl.SSLContext | None = None
    #: Client-side TLS for dialing ``wss://`` peers (CA, and a client certificate if required).
    client_ssl: ssl.SSLContext | None = None
    link: LinkConfig = attrs.field(factory=LinkConfig)
    membership: HyParViewConfig = attrs.field(factory=HyParViewConfig)
    broadcast: PlumtreeConfig = attrs.field(factory=PlumtreeConfig)
    replica: ReplicaConfig = attrs.field(factory=ReplicaConfig)
    #: Bounds of inboxes, subscribers and dial queues; backpressure waits (README "Flow control").
    flow: FlowConfig = attrs.field(factory=FlowConfig)
    #: How the event loop's lag is sampled and stretches timeouts (health.py). Nodes in
    #: one process share one loop and one measure: the first node's setting holds.
    health: HealthConfig = attrs.field(factory=HealthConfig)
    #: When a node that left the active view counts as gone for the cluster (departures.py).
    departures: DeparturesConfig = attrs.field(factory=DeparturesConfig)
    #: Lease timing of the service registry (registry.py).
    registry: RegistryConfig = attrs.field(factory=RegistryConfig)
    #: Ring size and lease timing of the shard placement (shard.py).
    shard: ShardConfig = attrs.field(factory=ShardConfig)
    #: Lease timing and settle time of leader elections (leader.py).
    leader: LeaderConfig = attrs.field(factory=LeaderConfig)
    #: Hand-off delay of durable reminders (reminders.py).
    reminders: ReminderConfig = attrs.field(factory=ReminderConfig)
    #: Where persistent maps keep their SQLite files (needed for ``open_map(persist=True)``).
    data_dir: Path | None = attrs.field(default=None, converter=attrs.converters.optional(Path))
    #: Largest application payload accepted for a broadcast or a replicated value, in bytes.
    max_payload: int = DEFAULT_MAX_PAYLOAD
    #: The clock's skew bound, in seconds: a peer's timestamp further ahead of this node's
    #: wall clock is refused (and offered again by anti-entropy once it is within the
    #: bound). The node's own stored data is not held to it (`HybridClock.resume`).
    max_clock_offset: float = DEFAULT_MAX_OFFSET_MS / 1000
    #: Seed retry backoff while isolated: first delay and cap, in seconds.
    seed_retry_min: float = 0.5
    seed_retry_max: float = 10.0
    #: Events buffered for each subscription (and `flow.subscriber_bytes`); a subscriber
    #: further behind misses events, counted, and is told with a `Lagged` notice.
    subscriber_buffer: int = 1024
    #: Seed for the protocol's random choices (None: from the OS); tests pin it.
    rng_seed: int | None = None

    def __attrs_post_init__(self) -> None:
        if not valid_node_id(self.name):
            raise ConfigError(
                f"name must be 1 to {MAX_NODE_ID} printable characters, without spaces or '#'"
            )
        if not 0 < len(self.cluster) <= MAX_CLUSTER:
            raise ConfigError(f"cluster must be 1 to {MAX_CLUSTER} characters")
        object.__setattr__(self, "listen", normalize_address(self.listen))
        if self.advertise is not None:
            object.__setattr__(self, "advertise", normalize_address(self.advertise))
        object.__setattr__(self, "seeds", tuple(normalize_address(s) for s in self.seeds))
        if self.listen.startswith("wss://") and self.server_ssl is None:
            raise ConfigError(
                "a wss:// listen address needs a certificate: --tls-cert and --tls-key "
                "(NodeConfig.server_ssl when embedding)"
            )
        if not self.secret and not is_loopback(self.listen):
            raise ConfigError(
                f"refusing to listen on {self.listen} without a cluster secret: anyone who can "
                "reach it could join the cluster. Set a secret (--secret-file) or listen on "
                "127.0.0.1."
            )
        if any(len(x) < 16 for x in self.accepted_secrets) or (
            self.accepted_secrets and not self.secret
        ):
            raise ConfigError("accepted_secrets need a secret, and each at least 16 bytes")
        if self.max_payload < 1 or self.max_payload > self.link.max_frame - 4096:
            raise ConfigError(
                "max_payload must be positive and leave 4 KiB of room in link.max_frame"
            )
        if not 0 <= self.max_clock_offset <= MAX_WALL / 1000:
            raise ConfigError(
                f"max_clock_offset must be in [0, {MAX_WALL / 1000:.0f}] seconds,"
                f" not {self.max_clock_offset}"
            )
        if not 0 < self.seed_retry_min <= self.seed_retry_max:
            raise ConfigError("need 0 < seed_retry_min <= seed_retry_max")
        if self.subscriber_buffer < 1:
            raise ConfigError("subscriber_buffer must be at least 1")
