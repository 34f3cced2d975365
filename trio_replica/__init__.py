"""trio_replica: peer-to-peer replication for Trio.

A node joins a cluster over websockets, keeps a partial view of it with HyParView, spreads
messages along Plumtree broadcast trees, and keeps replicated state in sync with an
HLC-stamped OR-Map. Start here: `open_node(NodeConfig(...))`.
"""

from .core.events import (
    Delivery,
    DownReason,
    Event,
    Lagged,
    Left,
    PeerDown,
    PeerUp,
    Resubscribed,
)
from .core.messages import MessageId, Peer
from .errors import (
    CallbackHung,
    ComponentDead,
    ConfigError,
    DirectError,
    HandshakeError,
    LinkClosed,
    MessageTooLarge,
    NodeClosed,
    NoHandler,
    ReplicaError,
    RequestFailed,
    RequestTimeout,
    UnknownPeer,
    WireError,
)
from .node import Node, open_node
from .runtime.config import (
    LeaderConfig,
    LeaseConfig,
    NodeConfig,
    RegistryConfig,
    ReminderConfig,
    ReplicaConfig,
    ShardConfig,
)
from .runtime.control import ControlClient, ControlError, open_control
from .runtime.flow import FlowConfig
from .runtime.linkconfig import LinkConfig
from .runtime.replica import Replica
from .runtime.replica_api import Add, Remove, ReplicaCallbacks
from .stores.leader import Elected, FencedResource, Leadership, Revoked, StaleFence
from .stores.maps import Put, Removed, ReplicatedMap, ValidationError
from .stores.registry import Registered, Registration, Unregistered
from .stores.reminders import Fired, Reminder, ReminderInbox
from .stores.shard import Acquired, Released, RingSizeMismatch
from .stores.store import StoreCorrupt, StoreError
from .version import __version__

__all__ = [
    "Acquired",
    "Add",
    "CallbackHung",
    "ComponentDead",
    "ConfigError",
    "ControlClient",
    "ControlError",
    "Delivery",
    "DirectError",
    "DownReason",
    "Elected",
    "Event",
    "FencedResource",
    "Fired",
    "FlowConfig",
    "HandshakeError",
    "Lagged",
    "LeaderConfig",
    "Leadership",
    "LeaseConfig",
    "Left",
    "LinkClosed",
    "LinkConfig",
    "MessageId",
    "MessageTooLarge",
    "NoHandler",
    "Node",
    "NodeClosed",
    "NodeConfig",
    "Peer",
    "PeerDown",
    "PeerUp",
    "Put",
    "Registered",
    "Registration",
    "RegistryConfig",
    "Released",
    "Reminder",
    "ReminderConfig",
    "ReminderInbox",
    "Remove",
    "Removed",
    "Replica",
    "ReplicaCallbacks",
    "ReplicaConfig",
    "ReplicaError",
    "ReplicatedMap",
    "RequestFailed",
    "RequestTimeout",
    "Resubscribed",
    "Revoked",
    "RingSizeMismatch",
    "ShardConfig",
    "StaleFence",
    "StoreCorrupt",
    "StoreError",
    "UnknownPeer",
    "Unregistered",
    "ValidationError",
    "WireError",
    "__version__",
    "open_control",
    "open_node",
]
