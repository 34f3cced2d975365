"""Metrics: a node process serves Prometheus text; the collector and the HTTP responder."""

from __future__ import annotations

import signal
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from trio_replica.localcluster import open_local_cluster, wait_for_views
from trio_replica.ops.metrics import (
    MAX_REQUEST,
    METRIC_NAMES,
    metrics_registry,
    parse_host_port,
    serve_metrics,
)

PY = [sys.executable, "-m", "trio_replica"]


def _families(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_node_process_serves_metrics_over_http(tmp_path: object) -> None:
    proc = subprocess.Popen(
        [*PY, "node", "--name", "m1", "--map", "cfg", "--metrics", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert "listening on" in proc.stdout.readline()
        line = proc.stdout.readline()  # "metrics at http://127.0.0.1:PORT/metrics"
        url = line.split()[-1]
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = response.read().decode()
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(url.removesuffix("metrics") + "other", timeout=10)
        assert missing.value.code == 404
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    samples = _families(text)
    for name in (
        "trio_replica_node_info",
        "trio_replica_active_view_size",
        "trio_replica_passive_view_size",
        "trio_replica_eager_peers",
        "trio_replica_lazy_peers",
        "trio_replica_inbox_depth",
        "trio_replica_queued_messages",
        "trio_replica_frames_sent_total",
        "trio_replica_links_established_total",
    ):
        assert name in samples, name
    assert samples["trio_replica_map_size"] == {(("map", "cfg"),): 0.0}
    assert samples["trio_replica_map_tombstones"] == {(("map", "cfg"),): 0.0}
    info = next(iter(samples["trio_replica_node_info"]))
    assert ("node", "m1") in info


async def test_collector_reports_traffic_views_and_maps() -> None:
    async with open_local_cluster(3) as nodes:
        maps = [await node.open_map("m") for node in nodes]
        with trio.fail_after(20):
            await wait_for_views(nodes, min_active=2)
            await maps[0].put("k", 1)
            await maps[0].put("gone", 2)
            await maps[0].delete("gone")
            while len(maps[2]) != 1 or maps[2].tombstones != 1:  # noqa: ASYNC110
                await trio.sleep(0.05)
        registry = metrics_registry(nodes[0])
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(serve_metrics, registry, "127.0.0.1", 0)
            text = await _get(host, port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            oversized = await _get(host, port, b"GET /" + b"x" * (MAX_REQUEST + 10))
            post = await _get(host, port, b"POST /metrics HTTP/1.1\r\n\r\n")
            nursery.cancel_scope.cancel()
    head, body = text.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 OK")
    samples = _families(body.decode())
    # Every family is described (# HELP, # TYPE), even one with no sample yet.
    names = {family.name for family in text_string_to_metric_families(body.decode())}
    assert names == set(METRIC_NAMES)
    assert samples["trio_replica_active_view_size"][()] == 2
    assert samples["trio_replica_map_size"][(("map", "m"),)] == 1
    assert samples["trio_replica_map_tombstones"][(("map", "m"),)] == 1
    assert samples["trio_replica_map_puts_total"][(("map", "m"),)] == 2
    assert samples["trio_replica_broadcast_events_total"][(("event", "broadcasts"),)] >= 3
    gossip = samples["trio_replica_messages_sent_total"][(("kind", "Gossip"),)]
    assert gossip >= 3
    assert oversized.startswith(b"HTTP/1.1 400")
    assert post.startswith(b"HTTP/1.1 405")


async def _get(host: str, port: int, request: bytes) -> bytes:
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(request)
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    return data


def test_parse_host_port() -> None:
    assert parse_host_port("127.0.0.1:9100") == ("127.0.0.1", 9100)
    assert parse_host_port("[::1]:0") == ("::1", 0)
    for bad in ("9100", ":9100", "host:", "host:99999", "host:x"):
        with pytest.raises(ValueError):
            parse_host_port(bad)
