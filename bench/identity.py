"""What node keys cost: handshakes and signed broadcasts, with the raw websocket beside them.

A script, not a test: ``.venv/bin/python bench/identity.py`` (``./dev bench identity``).
This module owns the figures of issue 17:

* ``crypto``: one Ed25519 signature, one verification and one HMAC-SHA256 of a handshake
  transcript, in microseconds (the pieces a handshake adds up);
* ``handshake_memory``: node handshakes (both sides, this process) over the memory
  transport: microseconds each and handshakes per second of one core, CPU time;
* ``websocket``: sequential connections over websockets on 127.0.0.1: a raw connect plus
  one echoed frame, against a connect plus the node handshake (both ends here), p50 and
  the ratio;
* ``broadcast``: signing and verifying one broadcast of 100 B and 1 KiB, and 3,000
  broadcasts from one node of a 4-node cluster on the memory network (real clock), with
  signatures off (trust ``secret``) and on (an allow-list, signed and required): the rate
  each way and the ratio; then the same with 3,000 puts into a replicated map (each entry
  signed by its writer as well as its broadcast).

Results: one JSON document on stdout and in ``bench/results/identity_<date>.json``, a
Markdown summary beside it.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs
import trio
from common import percentiles_ms, run_header, write_results
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from trio_replica import NodeConfig
from trio_replica.core.messages import Peer, Role
from trio_replica.localcluster import run_node, wait_for_views
from trio_replica.runtime.handshake import Credentials, handshake_as_dialer, handshake_as_listener
from trio_replica.runtime.identity import (
    IdentityConfig,
    format_key,
    gossip_signer,
    public_bytes,
    sign_gossip,
)
from trio_replica.transports.base import Connection
from trio_replica.transports.memory import MemoryNetwork
from trio_replica.transports.websocket import WebsocketTransport

RESULTS = Path(__file__).resolve().parent / "results"


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _per_call_us(fn: Any, count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        fn()
    return round((time.perf_counter() - start) / count * 1e6, 2)


def crypto() -> dict[str, float]:
    key = Ed25519PrivateKey.generate()
    pub = public_bytes(key)
    transcript = secrets.token_bytes(400)
    signature = key.sign(transcript)
    from trio_replica.runtime.identity import verify

    return {
        "ed25519_sign_us": _per_call_us(lambda: key.sign(transcript), 5000),
        "ed25519_verify_us": _per_call_us(lambda: verify(pub, signature, transcript), 5000),
        "hmac_sha256_us": _per_call_us(
            lambda: hmac.new(b"s" * 32, transcript, hashlib.sha256).digest(), 20000
        ),
    }


def _creds(name: str, address: str) -> Credentials:
    return Credentials("bench", b"s" * 32, Peer(name, address))


async def handshake_memory(count: int = 2000) -> dict[str, Any]:
    net = MemoryNetwork(seed=1)
    listener = _creds("l", "mem://l")
    dialer = _creds("d", "mem://d")

    async def serve(conn: Connection) -> None:
        await handshake_as_listener(conn, listener, timeout=5, accept=lambda hello: None)
        await conn.receive()  # until the dialer closes

    async with trio.open_nursery() as nursery:
        await nursery.start(net.transport("l").serve, "mem://l", serve)
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(count):
            async with net.transport("d").open_connection("mem://l", timeout=5) as conn:
                await handshake_as_dialer(conn, dialer, role=Role.NODE, timeout=5)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        nursery.cancel_scope.cancel()
    return {
        "handshakes": count,
        "us_per_handshake_cpu": round(cpu / count * 1e6, 1),
        "us_per_handshake_wall": round(wall / count * 1e6, 1),
        "handshakes_per_s_per_core": round(count / cpu),
    }


async def websocket(count: int = 300) -> dict[str, Any]:
    transport = WebsocketTransport()
    listener = _creds("l", "ws://127.0.0.1:1")

    async def echo(conn: Connection) -> None:
        await conn.send(await conn.receive())
        await conn.receive()

    async def node(conn: Connection) -> None:
        await handshake_as_listener(conn, listener, timeout=5, accept=lambda hello: None)
        await conn.receive()

    out: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        for name, handler in (("raw", echo), ("handshake", node)):
            address = await nursery.start(transport.serve, "ws://127.0.0.1:0", handler)
            dialer = _creds("d", "ws://127.0.0.1:2")
            samples = []
            for _ in range(count):
                start = time.perf_counter()
                async with transport.open_connection(address, timeout=5) as conn:
                    if name == "raw":
                        await conn.send(b"x" * 100)
                        await conn.receive()
                    else:
                        await handshake_as_dialer(conn, dialer, role=Role.NODE, timeout=5)
                    samples.append(time.perf_counter() - start)
            out[name] = percentiles_ms(samples)
        nursery.cancel_scope.cancel()
    out["ratio_p50"] = round(out["handshake"]["p50_ms"] / out["raw"]["p50_ms"], 2)
    return out


async def _broadcast_rate(signed: bool, count: int, maps: bool = False) -> float:
    keys = {f"n{i}": Ed25519PrivateKey.generate() for i in range(4)}
    with tempfile.TemporaryDirectory() as allowlist:
        lines = [f"{name} {format_key(public_bytes(key))}\n" for name, key in keys.items()]
        (Path(allowlist) / "bench.keys").write_text("".join(lines))
        return await _rate(signed, count, keys, Path(allowlist), maps)


async def _rate(
    signed: bool, count: int, keys: dict[str, Ed25519PrivateKey], allowlist: Path, maps: bool
) -> float:
    net = MemoryNetwork(seed=3)
    base = NodeConfig(name="x", secret=b"s" * 32)
    async with trio.open_nursery() as nursery:
        nodes = []
        for i in range(4):
            name = f"n{i}"
            identity = IdentityConfig(
                trust="allowlist" if signed else "secret",
                allowlist=allowlist if signed else None,
                key=keys[name],
                sign_broadcasts=signed,
                require_signatures=signed,
            )
            config = attrs.evolve(
                base,
                name=name,
                listen=f"mem://{name}",
                seeds=("mem://n0",) if i else (),
                identity=identity,
            )
            node = await nursery.start(
                run_node, config, net.transport(name), trio.CancelScope(), trio.Event()
            )
            nodes.append(node)
        with trio.fail_after(60):
            await wait_for_views(nodes)
        if maps:
            return await _put_rate(nodes, count, nursery)
        received = [0] * len(nodes)
        done = trio.Event()

        async def count_at(i: int, task_status: trio.TaskStatus[None]) -> None:
            async with nodes[i].subscribe("b") as feed:
                task_status.started()
                async for _ in feed:
                    received[i] += 1
                    if all(r >= count for r in received[1:]):
                        done.set()

        for i in range(1, len(nodes)):
            await nursery.start(count_at, i)
        start = time.perf_counter()
        for seq in range(count):
            await nodes[0].broadcast("b", {"seq": seq, "pad": b"x" * 80})
        with trio.fail_after(120):
            await done.wait()
        elapsed = time.perf_counter() - start
        nursery.cancel_scope.cancel()
    return count / elapsed


async def _put_rate(nodes: list[Any], count: int, nursery: trio.Nursery) -> float:
    """Puts per second from the first node until every node holds them all."""
    replicas = [await node.open_map("m") for node in nodes]
    start = time.perf_counter()
    for seq in range(count):
        await replicas[0].put(seq, {"pad": b"x" * 80})
    with trio.fail_after(120):
        while not all(len(m) == count for m in replicas):  # noqa: ASYNC110
            await trio.sleep(0.005)
    elapsed = time.perf_counter() - start
    nursery.cancel_scope.cancel()
    return count / elapsed


async def broadcast(count: int = 3000) -> dict[str, Any]:
    key = Ed25519PrivateKey.generate()
    out: dict[str, Any] = {}
    for size in (100, 1024):
        payload = b"x" * size
        signature = sign_gossip(key, "origin", 1, 2, "tag", payload)
        out[f"sign_{size}B_us"] = _per_call_us(
            lambda p=payload: sign_gossip(key, "origin", 1, 2, "tag", p), 3000
        )
        out[f"verify_{size}B_us"] = _per_call_us(
            lambda p=payload, s=signature: gossip_signer(s, "origin", 1, 2, "tag", p), 3000
        )
    for key, what, maps in (("cluster", "broadcasts", False), ("map_puts", "puts", True)):
        plain = await _broadcast_rate(False, count, maps=maps)
        signed = await _broadcast_rate(True, count, maps=maps)
        out[key] = {
            "nodes": 4,
            what: count,
            "unsigned_per_s": round(plain),
            "signed_per_s": round(signed),
            "ratio": round(signed / plain, 2),
        }
    return out


async def main() -> None:
    result = run_header("identity")
    log("crypto...")
    result["crypto"] = crypto()
    log("handshakes over the memory transport...")
    result["handshake_memory"] = await handshake_memory()
    log("websocket connects vs node handshakes...")
    result["websocket"] = await websocket()
    log("broadcasts signed and not...")
    result["broadcast"] = await broadcast()
    c, h, w, b = (
        result["crypto"],
        result["handshake_memory"],
        result["websocket"],
        result["broadcast"],
    )
    summary = "\n".join(
        [
            f"# Node keys: what they cost ({result['date']})",
            "",
            f"- Ed25519 sign {c['ed25519_sign_us']} us, verify {c['ed25519_verify_us']} us, "
            f"HMAC-SHA256 {c['hmac_sha256_us']} us",
            f"- node handshake, both sides, memory transport: {h['us_per_handshake_cpu']} us "
            f"CPU, {h['handshakes_per_s_per_core']} handshakes/s per core",
            f"- websocket on 127.0.0.1, connect + handshake p50 {w['handshake']['p50_ms']} ms "
            f"vs raw connect + echo p50 {w['raw']['p50_ms']} ms: {w['ratio_p50']}x",
            f"- signing a 100 B broadcast {b['sign_100B_us']} us, verifying "
            f"{b['verify_100B_us']} us (1 KiB: {b['sign_1024B_us']} / {b['verify_1024B_us']})",
            f"- 4 nodes, {b['cluster']['broadcasts']} broadcasts: {b['cluster']['unsigned_per_s']}"
            f"/s unsigned, {b['cluster']['signed_per_s']}/s signed and required "
            f"({b['cluster']['ratio']}x)",
            f"- 4 nodes, {b['map_puts']['puts']} map puts (entries signed too): "
            f"{b['map_puts']['unsigned_per_s']}/s unsigned, {b['map_puts']['signed_per_s']}/s "
            f"signed and required ({b['map_puts']['ratio']}x)",
        ]
    )
    stem = RESULTS / f"identity_{datetime.date.today().isoformat()}"
    write_results(stem, result, summary)
    print(json.dumps(result, indent=1))
    log(summary)


if __name__ == "__main__":
    trio.run(main)
