"""What a sans-IO protocol core asks its driver to do.

The cores (`hyparview`, `plumtree`) take inputs through plain method calls (a message from a
peer, a link going down, a timer firing, the current time) and return a list of these
effects. The Trio runtime carries them out in order. Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Hashable

import attrs

from .events import Event
from .messages import Message, Peer


@attrs.frozen
class Send:
    """Send `message` to `peer`, dialing `peer.address` first if no link is open.

    If the peer cannot be reached the driver reports it back with the core's
    `handle_link_down(peer, now)`. A `repair` (a payload the peer asked for) may use room
    beyond the outbox's usual bound: ordinary traffic must not starve it.
    """

    peer: Peer
    message: Message
    repair: bool = False


@attrs.frozen
class CloseLink:
    """Close the link to `peer` once what was queued before this effect has been sent."""

    peer: Peer


@attrs.frozen
class SetTimer:
    """Call the core's `handle_timer(timer, now)` after `delay` seconds.

    Timers are never cancelled: a core recognises a stale timer from its payload (a
    generation number, a nonce) and ignores it.
    """

    delay: float
    timer: Hashable


@attrs.frozen
class Emit:
    """Hand `event` to the subscribers of this component's events."""

    event: Event


Effect = Send | CloseLink | SetTimer | Emit
