"""The exceptions trio_replica raises: one narrow, named type per kind of failure.

Every error a peer can cause is a `WireError` or a `HandshakeError`; the runtime counts and
logs them and keeps serving. Errors a local caller can cause (`MessageTooLarge`,
`ConfigError`, `NodeClosed`) are raised to that caller.
"""

from __future__ import annotations


class ReplicaError(Exception):
    """Base class of every exception defined by trio_replica."""


class ConfigError(ReplicaError, ValueError):
    """A configuration value is invalid or unsafe (e.g. a public listen address and no secret)."""


class WireError(ReplicaError):
    """A frame or message from a peer is malformed, too large, or carries an invalid field.

    `reason` is a short stable token (``"cbor"``, ``"too_large"``, ``"shape"``, ``"field"``,
    ``"kind"``, ``"version"``) used as the label of the rejection counter; the message says
    what exactly was wrong.
    """

    def __init__(self, message: str, *, reason: str = "field") -> None:
        super().__init__(message)
        self.reason = reason


class MessageTooLarge(ReplicaError, ValueError):
    """A message or payload is larger than the configured maximum; refused at the sender."""


class HandshakeError(ReplicaError):
    """The link handshake failed: wrong secret, wrong cluster, wrong version, or a timeout.

    `reason` is a short stable token used as the label of the refusal counter.
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class LinkClosed(ReplicaError):
    """The link to a peer is closed; nothing more can be sent on it."""


class ComponentDead(ReplicaError):
    """A protocol component or replica driver crashed more often than its supervisor
    allows (`runtime/supervision.py`):
    raised out of the node, which closes; replace the process or open the node again."""


class CallbackHung(ReplicaError):
    """A replica owner's callback did not return within `ReplicaConfig.callback_timeout`:
    it is cancelled and its instance's driver restarted (logged, counted)."""


class NodeClosed(ReplicaError):
    """The node is closing or closed; the requested operation cannot start."""


class DirectError(ReplicaError):
    """A direct message (`Node.send`, `Node.request`) could not be delivered or answered."""


class UnknownPeer(DirectError, LookupError):
    """No address is known for that node id (not linked, not in the views, no host
    directory entry): pass a `Peer` with its address."""


class NoHandler(DirectError):
    """The node has no handler for that tag (`Node.serve`)."""


class RequestFailed(DirectError):
    """The handler on the other node raised, or the node was too busy to run it; the
    message says which."""


class RequestTimeout(DirectError, TimeoutError):
    """No answer within the request's deadline (the request may or may not have run)."""
