"""Who may start a handshake with this node: the slots of connections not yet authenticated.

A connection accepted by the transport takes one of `LinkConfig.max_handshakes` shared
slots, and one of `max_handshakes_per_host` for its remote address (an IPv6 one by its
/64), until its handshake ends. As soon as its hello says it is a control client, it moves
to `max_client_handshakes` slots of its own, so that clients never crowd out nodes. A
connection that finds no slot is refused at once, counted (`handshakes_refused`) and
logged once per reason per period (`transports.base.Refusals`). Issue 17 measured what
happens without this: 140 silent upgraded connections made a legitimate join take three
tries, and 400 control sessions at once took every slot.
"""

from __future__ import annotations

import collections

from ..core.messages import Hello, Role
from ..transports.base import Refusals, remote_host
from .linkconfig import LinkConfig
from .stats import NodeStats


class Slot:
    """One connection's hold on the handshake slots; `release` it when the handshake ends."""

    def __init__(self, admission: Admission, host: str) -> None:
        self._admission = admission
        self._host = host
        self._client = False
        self._released = False

    def admit(self, hello: Hello) -> str | None:
        """The hello has come: a control client moves to its own slots, or is refused
        (`client_slots`); a node keeps its shared slot."""
        if hello.role != Role.CLIENT or self._client:
            return None
        admission = self._admission
        if admission.clients >= admission.config.max_client_handshakes:
            return "client_slots"
        self._client = True
        admission.clients += 1
        admission.shared -= 1
        return None

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        admission = self._admission
        if self._client:
            admission.clients -= 1
        else:
            admission.shared -= 1
        by_host = admission.by_host
        by_host[self._host] -= 1
        if not by_host[self._host]:
            del by_host[self._host]


class Admission:
    """The node's handshake slots (module docstring)."""

    def __init__(self, config: LinkConfig, stats: NodeStats, refusals: Refusals) -> None:
        self.config = config
        self._stats = stats
        self.refusals = refusals
        #: Connections in the shared slots, in control clients' slots, and by remote host.
        self.shared = 0
        self.clients = 0
        self.by_host: collections.Counter[str] = collections.Counter()

    def enter(self, remote: str) -> Slot | None:
        """A slot for a new connection from `remote`, or None (refused, counted, logged)."""
        host = remote_host(remote)
        if self.shared >= self.config.max_handshakes:
            reason = "too_many"
        elif self.by_host[host] >= self.config.max_handshakes_per_host:
            reason = "host_slots"
        else:
            self.shared += 1
            self.by_host[host] += 1
            return Slot(self, host)
        self.refused(reason, remote)
        return None

    def refused(self, reason: str, remote: str, detail: str = "") -> None:
        """Count and log (once a period) a connection refused before authentication."""
        self._stats.handshakes_refused[reason] += 1
        self.refusals.refuse(reason, remote, detail)
