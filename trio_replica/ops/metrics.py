"""Prometheus metrics of one node: a collector over ``node.stats()`` and a tiny Trio HTTP server.

* `NodeCollector` reads ``node.stats()`` and the node's open maps at scrape time (nothing is
  recorded twice, nothing goes stale) and turns them into metric families named
  ``trio_replica_*``: counters by kind, direction and reason, gauges for view and tree
  sizes, inbox depths, queued messages, and per-map size and tombstones.
* `metrics_registry` gives each node its own `CollectorRegistry` (several nodes may share a
  process; the global default registry would mix them).
* `serve_metrics` answers ``GET /metrics`` over plain TCP from a Trio task: no thread, no
  prometheus_client server; given the node, also ``GET /readyz`` (200 once the node has
  joined and its maps are open, `Node.readiness`; 503 with the reason before) and
  ``GET /healthz`` (200 while its machinery runs, `Node.liveness`; 503 otherwise), for
  orchestrators' probes. Each request is read under a deadline and a size bound, at most
  `MAX_CONNECTIONS` are served at once (more are closed at once), and every connection is
  closed after one response. Cancel the task to stop the server.

Every metric has a ``# HELP`` line; `METRIC_NAMES` lists the families (without the
``_total`` suffix Prometheus adds to counters).
"""

from __future__ import annotations

import collections
import logging
import re
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ..runtime.health import LAG_BUCKETS
from ..transports.base import Refusals, remote_host
from .status import NodeFace

log = logging.getLogger("trio_replica.metrics")

PREFIX = "trio_replica_"
#: The text format `generate_latest` writes.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: A scrape request is a request line and a few headers; anything larger is not a scraper.
MAX_REQUEST = 8 * 1024
#: A client has this long to send its request and read the answer.
REQUEST_TIMEOUT = 5.0
#: The request head must arrive within this: a scraper sends it at once.
HEADER_TIMEOUT = 1.0
MAX_CONNECTIONS = 16
#: Connections served at once for one client address.
MAX_PER_CLIENT = 4


class MeteredNode(NodeFace, Protocol):
    """What the metrics endpoint reads of a node (the `Node` facade)."""

    @property
    def http_refusals(self) -> Refusals: ...

    def readiness(self) -> tuple[bool, str]: ...
    def liveness(self) -> tuple[bool, str]: ...


# Node-level counters with one label: (stats key, metric name, label, help).
_LABELLED_COUNTERS = (
    ("messages_sent", "messages_sent", "kind", "Protocol messages sent, by message kind."),
    ("bytes_sent", "message_bytes_sent", "kind", "Encoded bytes of messages sent, by kind."),
    ("messages_received", "messages_received", "kind", "Protocol messages received, by kind."),
    ("bytes_received", "message_bytes_received", "kind", "Encoded bytes received, by kind."),
    ("rejected", "rejected", "reason", "Frames or messages refused as malformed, by reason."),
    ("handshakes_refused", "handshakes_refused", "reason", "Handshakes refused, by reason."),
    (
        "connections_refused",
        "connections_refused",
        "reason",
        "Connections closed before the websocket upgrade (too many pending), by reason.",
    ),
    ("links_closed", "links_closed", "reason", "Links that ended, by reason."),
    ("dial_failures", "dial_failures", "reason", "Dials that failed, by reason."),
    ("drops", "drops", "reason", "Messages not sent or not delivered, by reason."),
)
_PLAIN_COUNTERS = (
    ("frames_sent", "Frames written to links."),
    ("frame_bytes_sent", "Bytes of frames written to links."),
    ("frames_received", "Frames read from links."),
    ("frame_bytes_received", "Bytes of frames read from links."),
    ("links_established", "Links that completed the handshake."),
)
_MAP_COUNTERS = (
    ("puts", "map_puts", "Local puts."),
    ("deletes", "map_deletes", "Local deletes."),
    ("remote_changes", "map_remote_changes", "Entries changed by peers' deltas and syncs."),
    ("tombstones_collected", "map_tombstones_collected", "Tombstones dropped after their TTL."),
    ("subscriber_drops", "map_subscriber_drops", "Change events lost by slow subscribers."),
    ("store_errors", "map_store_errors", "Failed writes to the map's SQLite store."),
    (
        "lost_commits",
        "map_store_lost_commits",
        "Acknowledged transactions the map's store did not recover at open (pulled back "
        "from peers).",
    ),
)
# Keys of the membership and broadcast sections that are not monotonic counters.
_MEMBERSHIP_NOT_COUNTERS = {"active_size", "passive_size", "inbox", "crashes"}
_BROADCAST_GAUGES = {
    "cache_size": ("broadcast_cache_size", "Payloads kept to answer GRAFTs."),
    "cache_bytes": ("broadcast_cache_bytes", "Bytes of the payloads kept to answer GRAFTs."),
    "origin_trees": ("broadcast_origin_trees", "Origins with a Plumtree tree of their own."),
    "seen_size": ("broadcast_seen_size", "Message ids remembered as delivered."),
    "missing_size": ("broadcast_missing_size", "Announced messages not yet received."),
    "max_hops": ("broadcast_max_hops", "Largest hop count of a delivered broadcast."),
}
_BROADCAST_NOT_COUNTERS = {"eager_size", "lazy_size", "inbox", "crashes", "hops", "unsubscribed"}

METRIC_NAMES = (
    *(PREFIX + name for _key, name, _label, _help in _LABELLED_COUNTERS),
    *(PREFIX + name for name, _help in _PLAIN_COUNTERS),
    PREFIX + "membership_events",
    PREFIX + "broadcast_events",
    PREFIX + "broadcast_delivered_hops",
    PREFIX + "broadcast_unsubscribed",
    PREFIX + "component_crashes",
    PREFIX + "active_view_size",
    PREFIX + "passive_view_size",
    PREFIX + "eager_peers",
    PREFIX + "lazy_peers",
    *(PREFIX + name for name, _help in _BROADCAST_GAUGES.values()),
    PREFIX + "inbox_depth",
    PREFIX + "inbox_bytes",
    PREFIX + "inbox_throttled",
    PREFIX + "queued_messages",
    PREFIX + "queued_bytes",
    PREFIX + "congested_links",
    PREFIX + "flow_pressure",
    PREFIX + "flow_waits",
    PREFIX + "flow_wait_seconds",
    PREFIX + "queueing_delay_ms",
    PREFIX + "origination_limited",
    PREFIX + "origination_wait_seconds",
    PREFIX + "loop_lag_seconds",
    PREFIX + "loop_lag_recent_seconds",
    PREFIX + "timeout_stretch",
    PREFIX + "suspicions",
    PREFIX + "suspicions_cleared",
    PREFIX + "dials_delayed",
    PREFIX + "links_open",
    PREFIX + "control_clients",
    PREFIX + "dials_in_progress",
    PREFIX + "map_recovering",
    PREFIX + "map_size",
    PREFIX + "map_tombstones",
    PREFIX + "map_rejected",
    *(PREFIX + name for _key, name, _help in _MAP_COUNTERS),
    PREFIX + "node_info",
)


def _counter(
    name: str, doc: str, labels: Mapping[str, int] | None = None, *, label: str = "", value: int = 0
) -> CounterMetricFamily:
    if labels is None:
        return CounterMetricFamily(PREFIX + name, doc, value=value)
    family = CounterMetricFamily(PREFIX + name, doc, labels=[label])
    for key, count in sorted(labels.items()):
        family.add_metric([key], count)
    return family


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, doc, value=value)


class NodeCollector(Collector):
    """Metric families of one node, computed from ``node.stats()`` at each scrape."""

    def __init__(self, node: MeteredNode) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        node = self.node
        stats: dict[str, Any] = node.stats()
        info = GaugeMetricFamily(
            PREFIX + "node_info",
            "The node's id, address and cluster (value 1).",
            labels=["node", "address", "cluster"],
        )
        info.add_metric([node.id, node.address, node.config.cluster], 1)
        yield info
        for key, name, label, doc in _LABELLED_COUNTERS:
            yield _counter(name, doc, stats[key], label=label)
        for name, doc in _PLAIN_COUNTERS:
            yield _counter(name, doc, value=stats[name])

        membership: dict[str, int] = stats["membership"]
        broadcast: dict[str, Any] = stats["broadcast"]
        yield _counter(
            "membership_events",
            "HyParView activity (joins, neighbor requests, shuffles, failures...), by event.",
            {k: v for k, v in membership.items() if k not in _MEMBERSHIP_NOT_COUNTERS},
            label="event",
        )
        yield _counter(
            "broadcast_events",
            "Plumtree activity (gossip, IHAVE, GRAFT, PRUNE, duplicates...), by event.",
            {
                k: v
                for k, v in broadcast.items()
                if k not in _BROADCAST_NOT_COUNTERS and k not in _BROADCAST_GAUGES
            },
            label="event",
        )
        yield _counter(
            "broadcast_delivered_hops",
            "Broadcasts delivered here, by the number of hops they travelled.",
            broadcast["hops"],
            label="hops",
        )
        yield _counter(
            "broadcast_unsubscribed",
            "Broadcasts delivered with no subscriber for their tag, by tag.",
            broadcast["unsubscribed"],
            label="tag",
        )
        yield _counter(
            "component_crashes",
            "Restarts of a supervised component after a crash, by component.",
            {"membership": membership["crashes"], "broadcast": broadcast["crashes"]},
            label="component",
        )

        yield _gauge(
            "active_view_size", "Peers in HyParView's active view.", membership["active_size"]
        )
        yield _gauge(
            "passive_view_size", "Peers in HyParView's passive view.", membership["passive_size"]
        )
        yield _gauge("eager_peers", "Plumtree eager-push peers.", broadcast["eager_size"])
        yield _gauge("lazy_peers", "Plumtree lazy-push peers.", broadcast["lazy_size"])
        for key, (name, doc) in _BROADCAST_GAUGES.items():
            yield _gauge(name, doc, broadcast.get(key, 0))
        inbox = GaugeMetricFamily(
            PREFIX + "inbox_depth", "Events waiting in a component's inbox.", labels=["component"]
        )
        inbox.add_metric(["membership"], membership["inbox"])
        inbox.add_metric(["broadcast"], broadcast["inbox"])
        yield inbox
        links: dict[str, int] = stats["links"]
        yield _gauge(
            "queued_messages", "Messages queued on links, not yet written.", links["queued"]
        )
        yield from self._flow(stats["flow"], links)
        yield from self._health(stats)
        yield _gauge("links_open", "Open peer links.", links["open"])
        yield _gauge("control_clients", "Open control connections (CLI clients).", links["clients"])
        yield _gauge("dials_in_progress", "Outbound connections being set up.", links["dialing"])

        yield from self._maps()

    def _flow(self, flow: dict[str, Any], links: dict[str, int]) -> Iterator[Metric]:
        """Flow control (README "Flow control"): every label set here is fixed."""
        inbox_bytes = GaugeMetricFamily(
            PREFIX + "inbox_bytes", "Bytes waiting in a component's inbox.", labels=["component"]
        )
        throttled = CounterMetricFamily(
            PREFIX + "inbox_throttled",
            "Inputs that waited for their source's share of a component's inbox.",
            labels=["component"],
        )
        for component in ("membership", "broadcast"):
            inbox_bytes.add_metric([component], flow["inbox_bytes"][component])
            throttled.add_metric([component], flow["throttled"][component])
        yield inbox_bytes
        yield throttled
        yield _gauge(
            "queued_bytes", "Bytes queued on links, not yet written.", links["queued_bytes"]
        )
        yield _gauge(
            "congested_links", "Links whose outbox is over its high-water mark.", links["congested"]
        )
        pressure = GaugeMetricFamily(
            PREFIX + "flow_pressure",
            "Buffers over their high-water mark now, by kind: writers wait while any is.",
            labels=["kind"],
        )
        for kind in ("link", "subscriber", "inbox"):
            pressure.add_metric([kind], flow["pressure"].get(kind, 0))
        yield pressure
        yield _counter(
            "flow_waits",
            "Writes that found the node's outgoing budget spent and waited.",
            {"writer": flow["waits"].get("writer", 0)},
            label="who",
        )
        seconds = CounterMetricFamily(
            PREFIX + "flow_wait_seconds",
            "Seconds writes spent waiting for the outgoing budget, or paced.",
            labels=["who"],
        )
        seconds.add_metric(["writer"], flow["waited_seconds"].get("writer", 0.0))
        seconds.add_metric(["paced"], flow["paced_seconds"])
        yield seconds
        yield _gauge(
            "queueing_delay_ms",
            "Queueing delay of deliveries (one-way delay over its minimum, filtered).",
            flow["queueing_delay_ms"],
        )
        yield _counter(
            "origination_limited",
            "Peers' own broadcasts held to their limit at this first hop.",
            value=flow["origination_limited"],
        )
        yield CounterMetricFamily(
            PREFIX + "origination_wait_seconds",
            "Seconds peers' own broadcasts waited for their limit here.",
            value=flow["origination_waited_seconds"],
        )

    def _health(self, stats: dict[str, Any]) -> Iterator[Metric]:
        """The loop's lag and what it does to failure detection (health.py)."""
        loop = stats["loop"]
        histogram = HistogramMetricFamily(
            PREFIX + "loop_lag_seconds",
            "How late the event loop ran each sample (shared by the nodes of one process).",
        )
        cumulative, buckets = 0, []
        for bound, count in zip(LAG_BUCKETS, loop["buckets"], strict=False):
            cumulative += count
            buckets.append((repr(bound), cumulative))
        buckets.append(("+Inf", loop["samples"]))
        histogram.add_metric([], buckets, sum_value=loop["lag_sum_s"])
        yield histogram
        yield _gauge(
            "loop_lag_recent_seconds",
            "The loop's recent lag (largest sample, halved every half-life).",
            loop["lag_ms"] / 1000,
        )
        yield _gauge(
            "timeout_stretch",
            "How many times failure-detection timeouts are stretched by the loop's lag now.",
            loop["stretch"],
        )
        flow = stats["flow"]
        yield _counter(
            "suspicions",
            "Peers suspected after the idle timeout (failed only if still silent).",
            value=flow.get("suspicions", 0),
        )
        yield _counter(
            "suspicions_cleared",
            "Suspected peers that spoke again before the suspicion timeout (failures avoided).",
            value=flow.get("suspicions_cleared", 0),
        )
        yield _counter(
            "dials_delayed",
            "Dials that waited for the node's dial budget.",
            value=stats["dials"]["delayed"],
        )

    def _maps(self) -> Iterator[Metric]:
        maps = sorted(self.node.maps().items())
        size = GaugeMetricFamily(PREFIX + "map_size", "Live keys of a map.", labels=["map"])
        tombs = GaugeMetricFamily(
            PREFIX + "map_tombstones", "Deleted keys remembered by a map.", labels=["map"]
        )
        rejected = CounterMetricFamily(
            PREFIX + "map_rejected",
            "Remote entries a map refused, by reason.",
            labels=["map", "reason"],
        )
        counters = {
            key: CounterMetricFamily(PREFIX + name, doc, labels=["map"])
            for key, name, doc in _MAP_COUNTERS
        }
        for name, the_map in maps:
            size.add_metric([name], len(the_map))
            tombs.add_metric([name], the_map.tombstones)
            for reason, count in sorted(the_map.stats.rejected.items()):
                rejected.add_metric([name, reason], count)
            for key, family in counters.items():
                family.add_metric([name], getattr(the_map.stats, key))
        recovering = GaugeMetricFamily(
            PREFIX + "map_recovering",
            "1 while a map pulls from peers the writes its store lost, else 0.",
            labels=["map"],
        )
        for name, the_map in maps:
            recovering.add_metric([name], 1 if the_map.recovering else 0)
        yield recovering
        yield size
        yield tombs
        yield rejected
        yield from counters.values()


def metrics_registry(node: MeteredNode) -> CollectorRegistry:
    """A registry of its own for `node`, holding one `NodeCollector`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(node))
    return registry


def parse_host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` to (host, port); ValueError when malformed."""
    host, sep, port_text = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host, int(port_text)


def _response(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


_HEAD_END = re.compile(rb"\r?\n\r?\n")


async def _read_request_head(stream: trio.abc.ReceiveStream) -> bytes | None:
    """The request up to its blank line, or None when it is too large or ends early.

    Lines may end with a bare LF (RFC 9112 section 2.2 lets a server accept them; clients
    such as ``printf 'GET /metrics HTTP/1.0\n\n' | nc`` send them).
    """
    data = b""
    while (end := _HEAD_END.search(data)) is None:
        if len(data) > MAX_REQUEST:
            return None
        chunk = await stream.receive_some(4096)
        if not chunk:
            return None
        data += chunk
    return data[: end.start()].replace(b"\r\n", b"\n")


def answer(
    registry: CollectorRegistry, head: bytes | None, node: MeteredNode | None = None
) -> bytes:
    """The HTTP response to a request head (None: unreadable or oversized)."""
    if head is None:
        return _response("400 Bad Request", b"bad request\n")
    parts = head.split(b"\n", 1)[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
        return _response("400 Bad Request", b"bad request\n")
    method, target = parts[0], parts[1].split(b"?", 1)[0]
    if method not in (b"GET", b"HEAD"):
        return _response("405 Method Not Allowed", b"only GET\n")
    if node is not None and target in (b"/readyz", b"/healthz"):
        ok, why = node.readiness() if target == b"/readyz" else node.liveness()
        response = _response("200 OK" if ok else "503 Service Unavailable", f"{why}\n".encode())
    elif target != b"/metrics":
        paths = b"/metrics, /readyz, /healthz" if node is not None else b"/metrics"
        return _response("404 Not Found", b"serving " + paths + b"\n")
    else:
        response = _response("200 OK", generate_latest(registry), CONTENT_TYPE)
    if method == b"HEAD":
        response = response.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
    return response


async def _serve_one(
    registry: CollectorRegistry,
    stream: trio.SocketStream,
    node: MeteredNode | None,
    refusals: Refusals,
) -> None:
    async with stream:
        with trio.move_on_after(REQUEST_TIMEOUT):
            try:
                head: bytes | None = None
                with trio.move_on_after(HEADER_TIMEOUT) as reading:
                    head = await _read_request_head(stream)
                if reading.cancelled_caught:
                    refusals.refuse("metrics_slow_request", _client_of(stream))
                    return
                await stream.send_all(answer(registry, head, node))
            except trio.BrokenResourceError as exc:
                log.debug("metrics client went away: %s", exc)


def _client_of(stream: trio.SocketStream) -> str:
    """Who a metrics client is, for its share of the slots (an IPv6 client by its /64)."""
    try:
        return remote_host(str(stream.socket.getpeername()[0]))
    except OSError:
        return "<gone>"


async def serve_metrics(
    registry: CollectorRegistry,
    host: str,
    port: int,
    *,
    node: MeteredNode | None = None,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``GET /metrics`` (and with `node`, ``/readyz`` and ``/healthz``) on
    `host`:`port` until cancelled; reports the bound address.

    Start it with ``await nursery.start(serve_metrics, registry, host, port)``; binding
    errors (``OSError``) come out of that call.
    """
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()
    limit = trio.Semaphore(MAX_CONNECTIONS)
    per_client: collections.Counter[str] = collections.Counter()
    refusals = node.http_refusals if node is not None else Refusals(log, "metrics endpoint")
    async with trio.open_nursery() as nursery:
        task_status.started((str(bound[0]), int(bound[1])))
        log.info("metrics on http://%s:%d/metrics", bound[0], bound[1])

        async def handle(stream: trio.SocketStream) -> None:
            client = _client_of(stream)
            # A burst beyond the bounds is refused rather than queued (scrapers retry); one
            # client gets at most MAX_PER_CLIENT of the slots, so a few slow clients cannot
            # hold them all (issue 17: 20 clients sending a byte a second blocked scrapes).
            if limit.value == 0 or per_client[client] >= MAX_PER_CLIENT:
                refusals.refuse(
                    "metrics_full" if limit.value == 0 else "metrics_per_client", client
                )
                await stream.aclose()
                return
            per_client[client] += 1
            try:
                async with limit:
                    await _serve_one(registry, stream, node, refusals)
            finally:
                per_client[client] -= 1
                if not per_client[client]:
                    del per_client[client]

        await trio.serve_listeners(handle, listeners, handler_nursery=nursery)
