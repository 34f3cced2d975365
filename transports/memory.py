"""In-memory network for tests and simulation: latency, loss, partitions and crashes.

This module owns `MemoryNetwork` (the simulated network and its counters), `MemoryTransport`
(one host's view of it, scheme ``mem``) and `MemoryConnection`. Everything runs on Trio's
clock, so under `trio.testing.MockClock` (pytest-trio's ``autojump_clock``) a simulated minute
costs no real time.

Theory of operation
-------------------
A connection is two *pipes*, one per direction. A pipe is a FIFO of ``(due, frame)`` entries:
`send` stamps a frame with ``due = max(now + latency, due of the previous frame)`` and appends
it; `receive` pops the head once the clock has reached its due time, sleeping on the clock
until then. The ``max`` keeps frames in order even when the link latency changes while frames
are in flight. No task runs per frame or per connection: the receiver does the waiting, so
hundreds of hosts with thousands of connections cost only the tasks the caller runs.

- Backpressure: a pipe holds at most `capacity` frames that the receiver has not taken yet
  (in flight or arrived). A sender facing a full pipe blocks, like a TCP sender whose window
  is closed, so a peer that stops reading eventually stalls its sender.
- Loss: each frame is dropped at send time with the link's `loss` probability, drawn from a
  random generator per pipe seeded from the network seed and the pipe's identity, so a run
  is reproducible whatever order Trio schedules tasks in.
- Partitions black-hole traffic the way a cut network does: a frame is lost if its two hosts
  are in different groups when it is sent or when it arrives; connections stay "open" and
  nothing is reported, so the upper layer's ping and idle timeouts must notice. Dialing
  across a partition hangs until the caller's timeout.
- Graceful close (`aclose`) sends an end-of-stream marker that travels like a frame (after
  the frames before it; lost in a partition); the peer's `receive` then raises
  `TransportClosed`. From the moment of the close the peer's `send` raises it too, unless
  the two hosts are partitioned (then its frames vanish).
- `kill(host)` simulates a crashed process: every connection of the host is reset at once
  (both ends raise `TransportClosed` promptly, whatever the partitions) and its listener is
  unbound, so dialing it is refused.

Dialing takes one round trip (twice the link latency) and is not subject to loss.
"""

from __future__ import annotations

import errno
import itertools
import logging
import math
import random
from collections import deque
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

import attrs
import trio
from trio.lowlevel import ParkingLot, cancel_shielded_checkpoint, checkpoint_if_cancelled

from ..core.wire import DEFAULT_MAX_FRAME
from ..errors import MessageTooLarge
from .base import ConnectError, Handler, TransportClosed, run_handler

logger = logging.getLogger(__name__)

SCHEME = "mem"
_PREFIX = SCHEME + "://"


def _check_latency(_instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not (value >= 0.0 and math.isfinite(value)):
        raise ValueError(f"{attribute.name} must be a finite number >= 0, got {value!r}")


def _check_loss(_instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{attribute.name} must be within [0, 1], got {value!r}")


def _check_positive(_instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 1:
        raise ValueError(f"{attribute.name} must be >= 1, got {value!r}")


def parse_memory_address(address: str) -> str:
    """Return the host named by ``mem://host``; raise `ValueError` for anything else."""
    if not address.startswith(_PREFIX):
        raise ValueError(f"not a {SCHEME}:// address: {address!r}")
    host = address[len(_PREFIX) :]
    if not host or "/" in host or any(c.isspace() for c in host):
        raise ValueError(f"invalid {SCHEME}:// host in {address!r}")
    return host


@attrs.define
class NetworkCounters:
    """What the network did with the frames it was given (frames and their bytes)."""

    frames_delivered: int = 0
    bytes_delivered: int = 0
    frames_lost: int = 0
    bytes_lost: int = 0
    frames_partitioned: int = 0
    bytes_partitioned: int = 0
    connects: int = 0
    connects_refused: int = 0
    handler_errors: int = 0


@attrs.frozen
class LinkConditions:
    """Latency (seconds, one way) and loss probability of the link between two hosts."""

    latency: float = attrs.field(validator=_check_latency)
    loss: float = attrs.field(validator=_check_loss)


#: The end-of-stream marker queued by a graceful close.
_EOF = None


@attrs.define(eq=False)
class _Pipe:
    """One direction of a connection: what `src` sent and `dst` has not taken yet."""

    src: str
    dst: str
    rng: random.Random
    queue: deque[tuple[float, bytes | None]] = attrs.Factory(deque)
    last_due: float = -math.inf
    #: The receiving end is closed: frames sent now are refused (or black-holed).
    read_closed: bool = False
    #: The end-of-stream marker reached the receiver.
    eof: bool = False
    #: The connection was reset (a host was killed); both ends fail at once.
    reset: bool = False
    readable: ParkingLot = attrs.Factory(ParkingLot)
    writable: ParkingLot = attrs.Factory(ParkingLot)

    def wake_all(self) -> None:
        self.readable.unpark_all()
        self.writable.unpark_all()


@attrs.define(eq=False)
class _Listener:
    nursery: trio.Nursery
    handler: Handler


@attrs.define(eq=False)
class MemoryConnection:
    """One end of an in-memory connection; see the module docstring for its behaviour.

    `send` blocks while the pipe to the peer is full; `receive` blocks until the next frame
    is due. Both are cancellable without losing or corrupting anything. Closed by `aclose`,
    by the handler returning (server side), by leaving `open_connection` (client side), or
    reset by `MemoryNetwork.kill`.
    """

    _network: MemoryNetwork
    local_host: str
    remote_host: str
    _outgoing: _Pipe
    _incoming: _Pipe
    _closed: bool = attrs.field(default=False, init=False)

    @property
    def channel_binding(self) -> bytes:
        """The memory network has no channel to bind the handshake to."""
        return b""

    @property
    def remote(self) -> str:
        return _PREFIX + self.remote_host

    def _check_usable(self) -> None:
        if self._closed:
            raise TransportClosed(f"connection to {self.remote} was closed locally")

    async def send(self, frame: bytes) -> None:
        """Queue `frame` for the peer, blocking while `capacity` frames are already queued."""
        await checkpoint_if_cancelled()
        if len(frame) > self._network.max_frame:
            raise MessageTooLarge(
                f"frame of {len(frame)} bytes exceeds max_frame {self._network.max_frame}"
            )
        pipe = self._outgoing
        while True:
            self._check_usable()
            if pipe.reset:
                raise TransportClosed(f"connection to {self.remote} was reset")
            if pipe.read_closed:
                if self._network.reachable(pipe.src, pipe.dst):
                    raise TransportClosed(f"connection closed by {self.remote}")
                # The peer's close has not been able to reach us; the frame vanishes.
                self._network._count_partitioned(len(frame))
                break
            if len(pipe.queue) < self._network.capacity:
                self._network._transmit(pipe, bytes(frame))
                break
            await pipe.writable.park()
        await cancel_shielded_checkpoint()

    async def receive(self) -> bytes:
        """Return the next frame once it is due; raise `TransportClosed` when the peer is gone."""
        await checkpoint_if_cancelled()
        pipe = self._incoming
        network = self._network
        while True:
            self._check_usable()
            if pipe.reset:
                raise TransportClosed(f"connection reset by {self.remote}")
            if pipe.eof:
                raise TransportClosed(f"connection closed by {self.remote}")
            if not pipe.queue:
                await pipe.readable.park()
                continue
            due, frame = pipe.queue[0]
            if due > trio.current_time():
                with trio.move_on_at(due):
                    await pipe.readable.park()
                continue
            pipe.queue.popleft()
            if len(pipe.queue) < network.capacity:
                pipe.writable.unpark_all()
            if not network.reachable(pipe.src, pipe.dst):
                if frame is not _EOF:
                    network._count_partitioned(len(frame))
                continue
            if frame is _EOF:
                pipe.eof = True
                continue
            network.counters.frames_delivered += 1
            network.counters.bytes_delivered += len(frame)
            await cancel_shielded_checkpoint()
            return frame

    async def aclose(self) -> None:
        """Close gracefully: the peer gets the frames already sent, then end of stream."""
        if not self._closed:
            self._closed = True
            self._network._unregister(self)
            out = self._outgoing
            if not out.reset:
                due = max(trio.current_time() + self._network._latency(out), out.last_due)
                out.last_due = due
                out.queue.append((due, _EOF))
                out.readable.unpark_all()
            self._incoming.read_closed = True
            self._incoming.queue.clear()
            self._incoming.wake_all()
            out.writable.unpark_all()
        await cancel_shielded_checkpoint()

    def _reset(self) -> None:
        for pipe in (self._outgoing, self._incoming):
            pipe.reset = True
            pipe.queue.clear()
            pipe.wake_all()


@attrs.define(eq=False)
class MemoryTransport:
    """One host's access to a `MemoryNetwork`: listens on ``mem://<host>``, dials from it.

    Get it with `MemoryNetwork.transport`. Connections it dials originate from `host`, which
    is what partitions and `kill` act on.
    """

    network: MemoryNetwork
    host: str
    schemes: tuple[str, ...] = attrs.field(default=(SCHEME,), init=False)

    @property
    def address(self) -> str:
        return _PREFIX + self.host

    @asynccontextmanager
    async def open_connection(
        self,
        address: str,
        *,
        timeout: float,
    ) -> AsyncIterator[MemoryConnection]:
        """Dial `address` from this host (one simulated round trip); see `Transport`.

        Refused at once (after the round trip) when nobody listens there; hangs until
        `timeout`, then `ConnectError`, when the two hosts are partitioned.
        """
        try:
            dst = parse_memory_address(address)
        except ValueError as exc:
            raise ConnectError(str(exc)) from None
        conn = None
        with trio.move_on_after(timeout):
            conn = await self.network._dial(self.host, dst)
        if conn is None:
            raise ConnectError(
                f"connecting {self.address} -> {address} timed out after {timeout} s"
            )
        try:
            yield conn
        finally:
            await conn.aclose()

    async def serve(
        self,
        address: str,
        handler: Handler,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``mem://<host>`` until cancelled (or until the host is killed).

        Raises `ValueError` for another host's address and `OSError` if the address is
        already bound. Each connection's handler runs in a task of this call.
        """
        host = parse_memory_address(address)
        if host != self.host:
            raise ValueError(f"transport of {self.address} cannot listen on {address!r}")
        # Checked before the nursery opens so that the error is not wrapped in a group; no
        # checkpoint separates the check from the binding.
        self.network._check_free(host)
        async with trio.open_nursery() as nursery:
            listener = _Listener(nursery=nursery, handler=handler)
            self.network._bind(host, listener)
            try:
                task_status.started(self.address)
                await trio.sleep_forever()
            finally:
                self.network._unbind(host, listener)


@attrs.define(eq=False)
class MemoryNetwork:
    """A simulated network of named hosts (see the module docstring).

    `latency` (one way, seconds) and `loss` are the defaults of every link and may be changed
    at any time; `set_link` overrides them for one pair of hosts. `capacity` bounds the
    frames queued per direction of a connection; `max_frame` is the largest frame `send`
    accepts. All methods except the connection I/O are synchronous and may be called from
    any task (typically the test driving the simulation).
    """

    seed: int = 0
    latency: float = attrs.field(default=0.001, kw_only=True, validator=_check_latency)
    loss: float = attrs.field(default=0.0, kw_only=True, validator=_check_loss)
    capacity: int = attrs.field(default=256, kw_only=True, validator=_check_positive)
    max_frame: int = attrs.field(default=DEFAULT_MAX_FRAME, kw_only=True, validator=_check_positive)
    counters: NetworkCounters = attrs.field(factory=NetworkCounters, init=False)
    _transports: dict[str, MemoryTransport] = attrs.field(factory=dict, init=False)
    _listeners: dict[str, _Listener] = attrs.field(factory=dict, init=False)
    _connections: dict[str, set[MemoryConnection]] = attrs.field(factory=dict, init=False)
    _links: dict[tuple[str, str], LinkConditions] = attrs.field(factory=dict, init=False)
    _groups: dict[str, int] | None = attrs.field(default=None, init=False)
    _pipe_serials: dict[tuple[str, str], itertools.count[int]] = attrs.field(
        factory=dict, init=False
    )

    # --- configuration -----------------------------------------------------------------------

    def transport(self, host: str) -> MemoryTransport:
        """The transport of `host` (created on first use, then the same object)."""
        parse_memory_address(_PREFIX + host)
        transport = self._transports.get(host)
        if transport is None:
            transport = self._transports[host] = MemoryTransport(network=self, host=host)
        return transport

    def set_link(
        self, a: str, b: str, *, latency: float | None = None, loss: float | None = None
    ) -> None:
        """Override latency and/or loss between `a` and `b` (both directions).

        A parameter left to None keeps its current value for that link. Frames already in
        flight keep their due time; later frames never overtake them.
        """
        current = self.link(a, b)
        self._links[_pair(a, b)] = LinkConditions(
            latency=current.latency if latency is None else latency,
            loss=current.loss if loss is None else loss,
        )

    def clear_link(self, a: str, b: str) -> None:
        """Drop the override of the link between `a` and `b`: back to the network defaults."""
        self._links.pop(_pair(a, b), None)

    def link(self, a: str, b: str) -> LinkConditions:
        """The conditions currently applied between `a` and `b`."""
        found = self._links.get(_pair(a, b))
        if found is None:
            return LinkConditions(latency=self.latency, loss=self.loss)
        return found

    def partition(self, *groups: Iterable[str]) -> None:
        """Cut the network between `groups`; replaces any previous partition.

        Hosts in different groups cannot reach each other; hosts named in no group form one
        more group together. Existing connections are not told (see the module docstring).
        """
        assigned: dict[str, int] = {}
        for index, group in enumerate(groups):
            for host in group:
                if host in assigned:
                    raise ValueError(f"host {host!r} is in more than one partition group")
                assigned[host] = index
        self._groups = assigned

    def heal(self) -> None:
        """End the partition: every host can reach every other again."""
        self._groups = None

    def reachable(self, a: str, b: str) -> bool:
        """Whether traffic between hosts `a` and `b` currently gets through."""
        groups = self._groups
        if groups is None:
            return True
        return groups.get(a, -1) == groups.get(b, -1)

    def kill(self, host: str) -> None:
        """Crash `host`: reset all its connections and stop its listener accepting.

        Both ends of each connection raise `TransportClosed` at once. The host's `serve` call
        keeps running, unbound, until cancelled; a new `serve` may bind the address again
        (a restarted process).
        """
        for conn in self._connections.pop(host, set()):
            conn._reset()
        if self._listeners.pop(host, None) is not None:
            logger.debug("killed %s%s: listener unbound", _PREFIX, host)

    def is_listening(self, host: str) -> bool:
        return host in self._listeners

    # --- internals used by transports and connections --------------------------------------

    def _latency(self, pipe: _Pipe) -> float:
        if not self._links:
            return self.latency
        return self.link(pipe.src, pipe.dst).latency

    def _count_partitioned(self, size: int) -> None:
        self.counters.frames_partitioned += 1
        self.counters.bytes_partitioned += size

    def _transmit(self, pipe: _Pipe, frame: bytes) -> None:
        if not self.reachable(pipe.src, pipe.dst):
            self._count_partitioned(len(frame))
            return
        conditions = self.link(pipe.src, pipe.dst) if self._links else None
        loss = self.loss if conditions is None else conditions.loss
        if loss > 0.0 and pipe.rng.random() < loss:
            self.counters.frames_lost += 1
            self.counters.bytes_lost += len(frame)
            return
        latency = self.latency if conditions is None else conditions.latency
        due = max(trio.current_time() + latency, pipe.last_due)
        pipe.last_due = due
        pipe.queue.append((due, frame))
        if len(pipe.queue) == 1:
            # Otherwise the receiver sleeps until the head is due, which is no later.
            pipe.readable.unpark_all()

    def _new_pipe(self, src: str, dst: str) -> _Pipe:
        serial = next(self._pipe_serials.setdefault((src, dst), itertools.count()))
        return _Pipe(src=src, dst=dst, rng=random.Random(f"{self.seed}:{src}>{dst}:{serial}"))

    async def _dial(self, src: str, dst: str) -> MemoryConnection:
        await trio.sleep(2 * self.link(src, dst).latency)
        if not self.reachable(src, dst):
            # A SYN into a black hole: no answer ever; the caller's timeout ends the wait.
            await trio.sleep_forever()
        listener = self._listeners.get(dst)
        if listener is None:
            self.counters.connects_refused += 1
            raise ConnectError(f"{_PREFIX}{dst} refused the connection from {_PREFIX}{src}")
        self.counters.connects += 1
        forward, backward = self._new_pipe(src, dst), self._new_pipe(dst, src)
        client = MemoryConnection(
            network=self, local_host=src, remote_host=dst, outgoing=forward, incoming=backward
        )
        server = MemoryConnection(
            network=self, local_host=dst, remote_host=src, outgoing=backward, incoming=forward
        )
        self._connections.setdefault(src, set()).add(client)
        self._connections.setdefault(dst, set()).add(server)
        listener.nursery.start_soon(self._run_handler, listener, server)
        return client

    async def _run_handler(self, listener: _Listener, conn: MemoryConnection) -> None:
        if await run_handler(listener.handler, conn, log=logger):
            self.counters.handler_errors += 1

    def _unregister(self, conn: MemoryConnection) -> None:
        conns = self._connections.get(conn.local_host)
        if conns is not None:
            conns.discard(conn)
            if not conns:
                del self._connections[conn.local_host]

    def _check_free(self, host: str) -> None:
        if host in self._listeners:
            raise OSError(errno.EADDRINUSE, f"{_PREFIX}{host} is already bound")

    def _bind(self, host: str, listener: _Listener) -> None:
        self._check_free(host)
        self._listeners[host] = listener

    def _unbind(self, host: str, listener: _Listener) -> None:
        # After a kill and a restart the address may belong to a newer listener: keep it.
        if self._listeners.get(host) is listener:
            del self._listeners[host]


def _pair(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a <= b else (b, a)
