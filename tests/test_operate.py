"""Operating a node (issue 15): settings from TOML and ``--set``, readiness and health
probes, the control operations that read a whole map (dump, digest, watch with a
snapshot, get with its writer and timestamp), and map requests during a start."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import trio
import trio.lowlevel
import trio.testing

from trio_replica.cli import build_parser, node_config
from trio_replica.errors import ConfigError
from trio_replica.node import open_node
from trio_replica.ops.config_file import apply_settings, parse_set
from trio_replica.ops.metrics import answer, metrics_registry
from trio_replica.runtime.config import NodeConfig
from trio_replica.runtime.control import ControlError, open_control
from trio_replica.testing import crash_component
from trio_replica.transports.memory import MemoryNetwork

from .harness import Cluster, wait_until

PY = [sys.executable, "-m", "trio_replica"]

# --- settings ----------------------------------------------------------------------------------


def test_set_flags_and_toml_reach_every_nested_setting(tmp_path: Path) -> None:
    config_file = tmp_path / "node.toml"
    config_file.write_text(
        'name = "h1"\nseeds = ["127.0.0.1:7001"]\nmaps = ["kv"]\ntombstone_ttl = 60\n'
        "[membership]\nrejoin_interval = 30\n"
        "[replica]\nanti_entropy_interval = 10\n[replica.digest]\nfollow_up = 0\n"
    )
    args = build_parser().parse_args(
        [
            "node",
            "--config",
            str(config_file),
            "--set",
            "membership.rejoin_interval=45",
            "--set",
            "link.idle_timeout=6",
            "--map",
            "extra",
            "--listen",
            "127.0.0.1:0",
        ]
    )
    config, own = node_config(args)
    assert config.name == "h1" and config.seeds == ("ws://127.0.0.1:7001",)
    assert config.membership.rejoin_interval == 45.0  # --set beats the file
    assert config.replica.anti_entropy_interval == 10.0
    assert config.replica.digest.follow_up == 0.0
    assert config.link.idle_timeout == 6.0
    assert own["maps"] == ["kv", "extra"] and own["tombstone_ttl"] == 60


@pytest.mark.parametrize(
    "item, message",
    [
        ("membership.no_such=1", "unknown setting 'membership.no_such'"),
        ("membership=1", "is a section"),
        ("membership.rejoin_interval=fast", "takes a number"),
        ("membership.rejoin_interval=-1", "rejoin_interval"),
        ("link.idle_timeout=true", "takes a number"),
        ("secret=abc", "unknown setting 'secret'"),
        ("novalue", "expected KEY=VALUE"),
    ],
)
def test_bad_settings_are_refused_by_name(item: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        apply_settings(NodeConfig(), parse_set([item]))


def test_set_values_keep_their_text_for_strings_and_are_typed_otherwise() -> None:
    def applied(*items: str) -> NodeConfig:
        return apply_settings(NodeConfig(), parse_set(items))

    # A string setting takes the text as typed (TOML would make these True, 1000, 31).
    assert applied("cluster=true").cluster == "true"
    assert applied("cluster=1_000").cluster == "1_000"
    assert applied("name=0x1F").name == "0x1F"
    assert applied("replica.digest.max_sessions=2").replica.digest.max_sessions == 2
    assert applied("rng_seed=5").rng_seed == 5
    for bad in ("rng_seed=abc", "rng_seed=1.5", 'seeds=["a", 1]'):
        with pytest.raises(ConfigError):
            applied(bad)


def test_set_beats_the_file_also_for_join_and_own_settings_are_checked(tmp_path: Path) -> None:
    config_file = tmp_path / "node.toml"
    config_file.write_text('seeds = ["127.0.0.1:7001"]\ntombstone_ttl = 60\n')

    def parsed(*extra: str) -> tuple[NodeConfig, dict[str, object]]:
        args = build_parser().parse_args(["node", "--config", str(config_file), *extra])
        return node_config(args)

    config, _ = parsed("--set", 'join=["127.0.0.1:7002"]')
    assert config.seeds == ("ws://127.0.0.1:7002",)
    assert parsed("--tombstone-ttl", "30")[1]["tombstone_ttl"] == 30.0
    with pytest.raises(ConfigError, match="positive"):
        parsed("--tombstone-ttl", "0")
    config_file.write_text('tombstone_ttl = "7d"\n')
    with pytest.raises(ConfigError, match="tombstone_ttl"):
        parsed()


def test_the_clock_skew_bound_comes_from_the_file_set_or_its_flag(tmp_path: Path) -> None:
    config_file = tmp_path / "node.toml"
    config_file.write_text("max_clock_offset = 300\n")

    def parsed(*extra: str) -> NodeConfig:
        args = build_parser().parse_args(["node", "--config", str(config_file), *extra])
        return node_config(args)[0]

    assert NodeConfig().max_clock_offset == 60.0
    assert parsed().max_clock_offset == 300.0
    assert parsed("--set", "max_clock_offset=5").max_clock_offset == 5.0
    flag_wins = parsed("--set", "max_clock_offset=5", "--max-clock-offset", "0.5")
    assert flag_wins.max_clock_offset == 0.5
    for bad in ("-1", "nan"):
        with pytest.raises(ConfigError, match="max_clock_offset"):
            parsed("--max-clock-offset", bad)
    with pytest.raises(ConfigError, match="max_clock_offset"):
        parsed("--set", "max_clock_offset=soon")


# --- readiness and health ---------------------------------------------------------------------


def _get(node: object, path: str) -> tuple[str, bytes]:
    head = f"GET {path} HTTP/1.1\r\nHost: x".encode()
    response = answer(metrics_registry(node), head, node)  # type: ignore[arg-type]
    status_line, _, rest = response.partition(b"\r\n")
    return status_line.decode(), rest.split(b"\r\n\r\n", 1)[1]


async def test_readyz_waits_for_the_maps_and_a_neighbour_healthz_for_the_machinery(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork(seed=70)
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, net)
        a = await c.start("a")
        config = NodeConfig(name="b", listen="mem://b", seeds=("mem://a",))
        async with open_node(config, transport=net.transport("b"), hold_control=True) as b:
            status, body = _get(b, "/readyz")
            assert status.endswith("503 Service Unavailable") and b"starting" in body
            assert _get(b, "/healthz")[0].endswith("200 OK")
            await b.open_map("kv")
            b.mark_control_ready()
            with trio.fail_after(30):
                await b.wait_ready()
            assert _get(b, "/readyz") == ("HTTP/1.1 200 OK", b"ready\n")
            crash_component(b, "membership")
            while b.runtime.membership.running.is_set():  # the crash lands at its next checkpoint
                await trio.lowlevel.checkpoint()
            status, body = _get(b, "/healthz")
            assert status.endswith("503 Service Unavailable") and b"membership" in body
            with trio.fail_after(10):
                await b.runtime.membership.running.wait()
            assert _get(b, "/healthz")[0].endswith("200 OK")
            assert _get(b, "/nothing")[0].endswith("404 Not Found")
            assert b.status()["ready"] is True
        assert a.status()["ready"] is True  # a lone first node with no seeds is ready
        nursery.cancel_scope.cancel()


# --- the control operations -------------------------------------------------------------------


async def test_dump_digest_get_meta_and_watch_snapshot_over_the_control_path(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork(seed=71)
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, net)
        a = await c.start("a")
        b = await c.start("b", [a.address])
        ma, mb = await a.open_map("kv"), await b.open_map("kv")
        for i in range(1200):  # more than one dump batch
            await ma.put(f"k{i}", i)
        await ma.delete("k7")
        with trio.fail_after(60):
            await wait_until(lambda: len(mb) == 1199)
        async with open_control("mem://a", transport=net.transport("cli")) as client:
            rows = []
            async for batch in client.stream("map.dump", ["kv", False]):
                if not batch:
                    break
                rows.extend(batch)
            assert len(rows) == 1199 and {r[0] for r in rows} == {f"k{i}" for i in range(1200)} - {
                "k7"
            }
            _, value, writer, wall, logical, deleted = next(r for r in rows if r[0] == "k5")
            assert (value, writer, deleted) == (5, a.id, False)
            with_tombstones = []
            async for batch in client.stream("map.dump", ["kv", True]):
                if not batch:
                    break
                with_tombstones.extend(batch)
            assert [r for r in with_tombstones if r[5]] == [
                ["k7", None, a.id, *[e for e in _hlc(ma, "k7")], True]
            ]
            got = await client.call("map.get", ["kv", "k5"])
            assert got["found"] and got["value"] == 5 and got["writer"] == a.id
            assert got["hlc"] == [wall, logical]
            gone = await client.call("map.get", ["kv", "k7"])
            assert not gone["found"] and gone["deleted"]
            digest_a = await client.call("map.digest", ["kv"])
            assert digest_a["keys"] == 1199 and digest_a["entries"] == 1200
        async with open_control("mem://b", transport=net.transport("cli2")) as client:
            assert (await client.call("map.digest", ["kv"]))["digest"] == digest_a["digest"]
            seen: list[object] = []
            async with trio.open_nursery() as inner:

                async def watch() -> None:
                    async for event in client.stream("map.watch", ["kv", True]):
                        seen.append(event)

                inner.start_soon(watch)
                with trio.fail_after(10):
                    await wait_until(lambda: ["snapshot_end"] in seen)
                await ma.put("after", 1)
                with trio.fail_after(10):
                    await wait_until(lambda: any(e[0] == "put" for e in seen))  # type: ignore[index]
                inner.cancel_scope.cancel()
            snapshot = [r for e in seen if e[0] == "snapshot" for r in e[1]]  # type: ignore[index]
            assert len(snapshot) == 1199
            assert ["put", "after", 1, a.id] in seen
        nursery.cancel_scope.cancel()


def _hlc(m: object, key: str) -> tuple[int, int]:
    entry = m.entry(key)  # type: ignore[attr-defined]
    return entry.dot.ts.wall, entry.dot.ts.logical


async def test_large_values_dump_in_batches_that_fit_and_stream_errors_come_back_plain(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork(seed=74)
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, net)
        a = await c.start("a")
        m = await a.open_map("kv")
        for i in range(600):  # 2.4 MB in all: more than a reply may carry
            await m.put(f"k{i}", "x" * 4000)
        async with open_control("mem://a", transport=net.transport("cli")) as client:
            rows = 0
            async for batch in client.stream("map.dump", ["kv", False]):
                if not batch:
                    break
                rows += len(batch)
                await trio.sleep(0.01)  # a slow reader: held back, nothing dropped
            assert rows == 600
            with pytest.raises(ControlError, match=r"node a does not host map 'nope' \(it hosts: "):
                async for _ in client.stream("map.dump", ["nope", False]):
                    pass
        assert not a.stats()["drops"].get("control_error:map.dump")
        nursery.cancel_scope.cancel()


async def test_a_long_stream_to_a_slow_reader_loses_nothing(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    import trio_replica.ops.control_ops as control_ops

    monkeypatch.setattr(control_ops, "DUMP_BATCH", 1)  # one reply per key: 3,000 replies
    net = MemoryNetwork(seed=75)
    async with trio.open_nursery() as nursery:
        a = await Cluster(nursery, net).start("a")
        m = await a.open_map("kv")
        for i in range(3000):
            await m.put(f"k{i}", i)
        async with open_control("mem://a", transport=net.transport("cli"), timeout=30) as client:
            keys = []
            async for batch in client.stream("map.dump", ["kv", False]):
                if not batch:
                    break
                keys += [row[0] for row in batch]
                if len(keys) % 500 == 0:
                    await trio.sleep(1)  # the reader stalls now and then
            assert sorted(keys) == sorted(f"k{i}" for i in range(3000))
        nursery.cancel_scope.cancel()


async def test_a_map_request_during_a_start_waits_then_says_starting(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork(seed=72)
    config = NodeConfig(name="a", listen="mem://a")
    async with (
        open_node(config, transport=net.transport("a"), hold_control=True) as a,
        open_control("mem://a", transport=net.transport("cli"), timeout=30) as client,
    ):
        assert (await client.call("status"))["ready"] is False
        with pytest.raises(ControlError, match="is starting"):
            await client.call("map.get", ["kv", "k"])
        async with trio.open_nursery() as nursery:

            async def open_later() -> None:
                await trio.sleep(2)
                await a.open_map("kv")
                a.mark_control_ready()

            nursery.start_soon(open_later)
            # Sent while starting: served once the map is open, not refused.
            assert (await client.call("map.put", ["kv", "k", 1])) == {"ok": True}
        assert a.maps()["kv"].get("k") == 1


# --- the command line -------------------------------------------------------------------------


def test_cli_node_from_a_config_file_with_probes_dump_and_digest(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("correct horse battery staple\n")
    config_file = tmp_path / "node.toml"
    config_file.write_text(
        f'name = "a"\nlisten = "127.0.0.1:0"\nmaps = ["kv"]\nmetrics = "127.0.0.1:0"\n'
        f'secret_file = "{secret}"\n[replica]\nanti_entropy_interval = 5\n'
    )
    proc = subprocess.Popen(
        [*PY, "node", "--config", str(config_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on" in line, proc.stderr.read() if proc.stderr else line
        address = line.split()[-1]
        metrics_line = proc.stdout.readline()
        base = metrics_line.split()[-1].removesuffix("/metrics")
        with urllib.request.urlopen(f"{base}/readyz", timeout=10) as response:
            assert response.status == 200 and response.read() == b"ready\n"
        with urllib.request.urlopen(f"{base}/healthz", timeout=10) as response:
            assert response.status == 200
        auth = ["--node", address, "--secret-file", str(secret)]
        for i in range(3):
            put = subprocess.run(
                [*PY, "put", *auth, "kv", f"k{i}", json.dumps({"n": i})],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert put.returncode == 0, put.stderr
        dump = subprocess.run(
            [*PY, "dump", *auth, "kv"], capture_output=True, text=True, timeout=30
        )
        assert dump.returncode == 0, dump.stderr
        rows = [json.loads(line) for line in dump.stdout.splitlines()]
        assert sorted(r["key"] for r in rows) == ["k0", "k1", "k2"]
        assert all(r["writer"] == "a" and "." in r["hlc"] for r in rows)
        digest = subprocess.run(
            [*PY, "digest", *auth, "kv"], capture_output=True, text=True, timeout=30
        )
        assert json.loads(digest.stdout)["keys"] == 3
        meta = subprocess.run(
            [*PY, "get", "--meta", *auth, "kv", "k1"], capture_output=True, text=True, timeout=30
        )
        assert json.loads(meta.stdout)["value"] == {"n": 1}
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0


def test_cli_refuses_a_bad_setting_with_its_name() -> None:
    out = subprocess.run(
        [*PY, "node", "--set", "membership.rejoin_intervall=5"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2 and "membership.rejoin_intervall" in out.stderr


async def test_control_errors_come_out_unwrapped_and_a_closed_link_is_not_sent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork(seed=73)
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, net)
        await c.start("a")
        with pytest.raises(ControlError, match="unknown operation"):
            async with open_control("mem://a", transport=net.transport("cli")) as client:
                await client.call("no.such.op")
        async with open_control("mem://a", transport=net.transport("cli2")) as client:
            c.crash("a")
            with trio.fail_after(10):
                await client._link.closed.wait()  # the reset reaches the client's link
            with pytest.raises(ControlError, match="not sent"):
                await client.call("status")
        nursery.cancel_scope.cancel()
