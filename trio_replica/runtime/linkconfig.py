"""`LinkConfig`: the timers and bounds of every link, from the dial to the close.

Dials and handshakes (connections.py, handshake.py, admission.py), the established link
and its outbox (link.py, outbox.py) all read theirs here: one group of settings,
``NodeConfig.link``.
"""

from __future__ import annotations

import math

import attrs

from ..core.wire import DEFAULT_MAX_FRAME
from ..errors import ConfigError
from .handshake import HANDSHAKE_MAX_FRAME


@attrs.frozen
class LinkConfig:
    """Timers and bounds of every link. Defaults detect a dead peer in about 4 s."""

    #: Whole handshake deadline, each side.
    handshake_timeout: float = 5.0
    #: Dial deadline (TCP + TLS + websocket upgrade).
    connect_timeout: float = 5.0
    #: A link quiet for this long in our direction sends a ping (on link.py's `PING_TICK`
    #: grid, so up to a quarter second later). Pings are not answered: the peer's own pings
    #: carry the other direction.
    ping_interval: float = 1.0
    #: Nothing received for this long: the peer is suspected. Three to four missed pings
    #: (SPEC 3: a few seconds, not the ~60 s barrel_p2p inherits from Erlang distribution
    #: ticks). Stretched while our loop or the peer's lags (health.py).
    idle_timeout: float = 4.0
    #: A suspected peer still silent this much longer is failed; any frame from it first
    #: clears the suspicion (counted: `suspicions_cleared`). Also stretched with lag.
    suspicion_timeout: float = 2.0
    #: One frame send blocked this long with nothing received from the peer meanwhile: the
    #: peer is failed. A peer that keeps talking but reads slowly is busy, not dead (its
    #: inbox makes its readers wait: backpressure); one that never reads fills our control
    #: outbox and is failed for that (`outbox_full`).
    send_timeout: float = 5.0
    #: Payload messages (gossip, sync chunks) waiting in one outbox, and their bytes: a
    #: payload that would pass either bound is refused (the broadcast layer then announces
    #: it lazily, so the peer grafts it later).
    outbox_payload: int = 1024
    outbox_payload_bytes: int = 4 * 1024 * 1024
    #: High-water mark of the payload outbox: above either, the link holds the node's
    #: pressure (writers wait, readers holding payloads wait a bounded time). A frame
    #: carries every queued message that fits, so a few frames' worth keeps the link busy;
    #: more only adds latency (a payload waiting here past timeout1 is grafted again).
    outbox_high_items: int = 128
    outbox_high_bytes: int = 1024 * 1024
    #: Control messages waiting in one outbox, and their bytes. Reaching either means the
    #: peer reads none of our control traffic: the link is failed (nothing is dropped).
    outbox_control: int = 4096
    outbox_control_bytes: int = 4 * 1024 * 1024
    #: Payload messages and bytes a peer may have sent us and we have not processed yet
    #: (the credit window we grant; outbox.py). Small: on one machine or a LAN the
    #: link needs little in flight to stay busy, and anything beyond is queueing delay that
    #: Plumtree's timeout1 reads as a missing payload. A message larger than the byte window
    #: still goes, alone.
    window_messages: int = 64
    window_bytes: int = 1024 * 1024
    #: Largest frame sent or accepted, in bytes.
    max_frame: int = DEFAULT_MAX_FRAME
    #: Malformed frames tolerated on one link before it is closed.
    max_bad_frames: int = 8
    #: A link that membership no longer needs is closed after this long without traffic.
    linger: float = 2.0
    #: Bound on the shielded close of a link.
    close_timeout: float = 1.0
    #: Dials a node starts per second, and in one burst (dialing.py); 0 is no limit. A
    #: forming node needs a handful; more is a storm that starves live links.
    dial_rate: float = 5.0
    dial_burst: int = 10
    #: Dials in progress at once (peers can make us dial addresses they name), and messages
    #: queued for one of them.
    max_dials: int = 64
    dial_queue_messages: int = 256
    #: Incoming handshakes in progress at once; more are refused (`too_many`). A
    #: connection takes one of these until its hello says what it is; a control client
    #: then moves to its own `max_client_handshakes` slots, so that clients cannot crowd
    #: out nodes (`client_slots`). At most `max_handshakes_per_host` come from one remote
    #: address (`host_slots`).
    max_handshakes: int = 128
    max_client_handshakes: int = 16
    max_handshakes_per_host: int = 32
    #: An accepted connection must send its hello within this (a silent one holds a slot).
    hello_timeout: float = 2.0

    def __attrs_post_init__(self) -> None:
        for name in (
            "handshake_timeout",
            "connect_timeout",
            "ping_interval",
            "idle_timeout",
            "suspicion_timeout",
            "send_timeout",
            "linger",
            "close_timeout",
            "hello_timeout",
        ):
            if not getattr(self, name) > 0:
                raise ConfigError(f"link.{name} must be positive")
        if not (math.isfinite(self.dial_rate) and self.dial_rate >= 0):
            raise ConfigError("link.dial_rate must be >= 0")
        for name in (
            "dial_burst",
            "max_dials",
            "dial_queue_messages",
            "max_handshakes",
            "max_client_handshakes",
            "max_handshakes_per_host",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"link.{name} must be at least 1")
        if self.idle_timeout <= self.ping_interval:
            raise ConfigError("link.idle_timeout must exceed link.ping_interval")
        for name in (
            "outbox_payload",
            "outbox_payload_bytes",
            "outbox_high_items",
            "outbox_high_bytes",
            "outbox_control",
            "outbox_control_bytes",
            "window_messages",
            "window_bytes",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"link.{name} must be at least 1")
        if (
            self.outbox_high_items > self.outbox_payload
            or self.outbox_high_bytes > self.outbox_payload_bytes
        ):
            raise ConfigError("link outbox high-water marks must not exceed the outbox bounds")
        if self.max_frame < HANDSHAKE_MAX_FRAME:
            raise ConfigError(f"link.max_frame must be at least {HANDSHAKE_MAX_FRAME}")
