"""`NodeConfig`: everything a node needs to start, with the papers' defaults.

One frozen object, validated at construction, grouping the settings of each layer (links,
membership, broadcast). Protocol sizes and timers live in the cores' own config classes
next to the rules they tune; this module gathers them and adds the node's identity,
addresses and security settings.
"""

from __future__ import annotations

import ipaddress
import secrets
import ssl
import urllib.parse
from collections.abc import Iterable
from pathlib import Path

import attrs

from ..core.hyparview import HyParViewConfig
from ..core.messages import MAX_CLUSTER, MAX_NODE_ID, valid_node_id
from ..core.plumtree import PlumtreeConfig
from ..errors import ConfigError
from ..stores.leader import LeaderConfig
from ..stores.registry import RegistryConfig
from ..stores.reminders import ReminderConfig
from ..stores.shard import ShardConfig
from .departures import DeparturesConfig
from .flow import FlowConfig
from .health import HealthConfig
from .identity import IdentityConfig
from .link import LinkConfig
from .replica import ReplicaConfig

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
    parsed = urllib.parse.urlsplit(address)
    if parsed.scheme in ("ws", "wss"):
        if not parsed.hostname or parsed.port is None:
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
            raise ConfigError("a wss:// listen address needs server_ssl")
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
        if not 0 < self.seed_retry_min <= self.seed_retry_max:
            raise ConfigError("need 0 < seed_retry_min <= seed_retry_max")
        if self.subscriber_buffer < 1:
            raise ConfigError("subscriber_buffer must be at least 1")
