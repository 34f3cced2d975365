"""A multi-host fault test: N nodes in N Linux network namespaces, writers on every host,
kill -9, partitions, isolation and flapping links; then what Jepsen checks (issue 15).

    sudo .venv/bin/python bench/chaos.py [--hosts 5] [--minutes 10] [--seed 1]

Needs root and ``ip netns`` with veth pairs (bridges, iptables and netem are not needed):
elsewhere it says so and exits 0 without testing anything. Results:
``bench/results/chaos_<hosts>x<minutes>m.json`` and ``.md``.

The network. Host i is namespace ``trc<run>-<i>`` with the address 10.99.<run>.<i> on its
loopback; every pair of hosts has its own veth pair and a route to the other's address
through it, so cutting a pair's link (``ip link set ... down``) cuts exactly that pair. A
management veth from this process's namespace to each host (never cut) carries the
control connections of the writers and of the checks; the nodes never learn those
addresses (they advertise 10.99.<run>.<i>).

The nodes are the README's command: ``python -m trio_replica node --listen 0.0.0.0:7000
--advertise 10.99.<run>.<i>:7000 --join <every host> --secret-file ... --map kv
--data-dir ...``, run with ``ip netns exec``, persistent (SQLite), anti-entropy every 5 s.

The writers: one long-lived control connection per host (`trio_replica.open_control`),
each writing its own keys (``h<i>-<n>``, value n) and deleting every fifth key it wrote
before, paced; each operation is logged as acknowledged, failed (the node said no, or the
connection was refused: not applied) or unknown (no answer in time: maybe applied).

The faults, one after another, each followed by a heal and a measured convergence (the
writers pause; the time until every live node's map digest is the same): kill -9 of one
node (restarted 5-20 s later), of two including the first seed, a partition into two
random groups (20-75 s), the isolation of one host, a flapping link (down and up every
2 s for 20 s).

The checks, at the end, every node up and converged: every map identical (digest, and
every entry with its writer and HLC: last-writer-wins decided the same everywhere); no
acknowledged write lost (a key whose put was acknowledged and that no delete touched is
on every node); no delete undone (a key whose delete was acknowledged is absent
everywhere). Each key has one writer here, so which write wins is not in question; the
unit and property tests cover the merge rule.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import trio

from trio_replica import ControlError, open_control

RESULTS = Path(__file__).resolve().parent / "results"
PORT = 7000
MAP = "kv"


def netns_available() -> str | None:
    """None if this machine can run the test, else why not."""
    if os.geteuid() != 0:
        return "needs root (ip netns)"
    if shutil.which("ip") is None:
        return "needs the ip command (iproute2)"
    name = f"trc-probe-{os.getpid()}"
    probe = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"ip netns does not work here: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


def _ip(*args: str) -> None:
    out = subprocess.run(["ip", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {out.stderr.strip()}")


@attrs.define
class Network:
    """Namespaces, the full mesh of veth pairs, the management links."""

    hosts: int
    run: int = attrs.field(factory=lambda: os.getpid() % 200 + 20)
    links: dict[tuple[int, int], tuple[str, str]] = attrs.Factory(dict)

    def ns(self, i: int) -> str:
        return f"trc{self.run}-{i}"

    def address(self, i: int) -> str:
        return f"10.99.{self.run}.{i + 1}"

    def management(self, i: int) -> str:
        return f"10.97.{self.run}.{4 * i + 2}"

    def build(self) -> None:
        for i in range(self.hosts):
            _ip("netns", "add", self.ns(i))
            _ip("-n", self.ns(i), "link", "set", "lo", "up")
            _ip("-n", self.ns(i), "addr", "add", f"{self.address(i)}/32", "dev", "lo")
            # The management link: this namespace <-> host i, never cut.
            outer, inner = f"trm{self.run}x{i}", "mgmt"
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner, "netns", self.ns(i))
            _ip("addr", "add", f"10.97.{self.run}.{4 * i + 1}/30", "dev", outer)
            _ip("link", "set", outer, "up")
            _ip("-n", self.ns(i), "addr", "add", f"{self.management(i)}/30", "dev", inner)
            _ip("-n", self.ns(i), "link", "set", inner, "up")
        pairs = itertools.combinations(range(self.hosts), 2)
        for k, (i, j) in enumerate(pairs):
            a, b = f"p{i}x{j}", f"p{j}x{i}"
            _ip("link", "add", a, "netns", self.ns(i), "type", "veth", "peer", "name", b)
            _ip("link", "set", b, "netns", self.ns(j))
            _ip("-n", self.ns(i), "addr", "add", f"10.98.{k}.1/30", "dev", a)
            _ip("-n", self.ns(j), "addr", "add", f"10.98.{k}.2/30", "dev", b)
            _ip("-n", self.ns(i), "link", "set", a, "up")
            _ip("-n", self.ns(j), "link", "set", b, "up")
            _ip("-n", self.ns(i), "route", "add", f"{self.address(j)}/32", "via", f"10.98.{k}.2")
            _ip("-n", self.ns(j), "route", "add", f"{self.address(i)}/32", "via", f"10.98.{k}.1")
            self.links[(i, j)] = (a, b)

    def set_pair(self, i: int, j: int, up: bool) -> None:
        a, b = self.links[(min(i, j), max(i, j))]
        first, second = (i, j) if i < j else (j, i)
        state = "up" if up else "down"
        _ip("-n", self.ns(first), "link", "set", a, state)
        _ip("-n", self.ns(second), "link", "set", b, state)
        if up:  # a link brought up loses its routes: put them back
            k = list(self.links).index((first, second))
            for ns, dest, via in (
                (self.ns(first), self.address(second), f"10.98.{k}.2"),
                (self.ns(second), self.address(first), f"10.98.{k}.1"),
            ):
                subprocess.run(
                    ["ip", "-n", ns, "route", "replace", f"{dest}/32", "via", via],
                    capture_output=True,
                )

    def partition(self, groups: list[set[int]]) -> None:
        side = {h: g for g, members in enumerate(groups) for h in members}
        for i, j in self.links:
            self.set_pair(i, j, side.get(i) == side.get(j))

    def heal(self) -> None:
        for i, j in self.links:
            self.set_pair(i, j, True)

    def teardown(self) -> None:
        for i in range(self.hosts):
            subprocess.run(["ip", "netns", "del", self.ns(i)], capture_output=True)
            subprocess.run(["ip", "link", "del", f"trm{self.run}x{i}"], capture_output=True)


@attrs.define
class Nodes:
    """The node processes, one per namespace."""

    net: Network
    workdir: Path
    secret: Path
    procs: dict[int, subprocess.Popen[bytes]] = attrs.Factory(dict)

    def start(self, i: int) -> None:
        net = self.net
        seeds = [f"{net.address(j)}:{PORT}" for j in range(net.hosts)]
        cmd = [
            "ip", "netns", "exec", net.ns(i), sys.executable, "-m", "trio_replica", "node",
            "--name", f"h{i}", "--listen", f"0.0.0.0:{PORT}",
            "--advertise", f"{net.address(i)}:{PORT}", "--secret-file", str(self.secret),
            "--map", MAP, "--data-dir", str(self.workdir / f"h{i}"),
            "--set", "replica.anti_entropy_interval=5", "--log-level", "INFO",
        ]  # fmt: skip
        for seed in seeds:
            cmd += ["--join", seed]
        log = open(self.workdir / f"h{i}.log", "ab")  # noqa: SIM115 - the child keeps it
        self.procs[i] = subprocess.Popen(cmd, stdout=log, stderr=log, cwd=Path.cwd())
        log.close()

    def kill(self, i: int) -> None:
        proc = self.procs.pop(i, None)
        if proc is not None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)

    def stop_all(self) -> None:
        for i in list(self.procs):
            proc = self.procs.pop(i)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()

    def alive(self) -> list[int]:
        return sorted(i for i, p in self.procs.items() if p.poll() is None)


@attrs.define
class Op:
    writer: int
    kind: str  # put / delete
    key: str
    result: str  # ok / failed / unknown
    at: float


@attrs.define
class Gate:
    """Writers pass while `open` is set; replaced by a fresh event to pause them."""

    open: trio.Event = attrs.Factory(trio.Event)


@contextlib.asynccontextmanager
async def control(net: Network, i: int, secret: bytes) -> AsyncIterator[Any]:
    async with open_control(f"ws://{net.management(i)}:{PORT}", secret=secret, timeout=5.0) as c:
        yield c


#: Per writer, how many times its control connection was lost and opened again.
reconnects: dict[int, int] = {}


async def writer(
    net: Network, i: int, secret: bytes, ops: list[Op], gate: Gate, stop: trio.Event
) -> None:
    """One long-lived connection to host i; reconnects while the node is down."""
    rng = random.Random(i)
    n = 0
    acked: list[str] = []
    t0 = time.monotonic()
    while not stop.is_set():
        try:
            async with control(net, i, secret) as client:
                while not stop.is_set():
                    await gate.open.wait()
                    if acked and n % 5 == 4:
                        kind, key = "delete", acked.pop(rng.randrange(len(acked)))
                        args: list[Any] = [MAP, key]
                    else:
                        kind, key = "put", f"h{i}-{n}"
                        args = [MAP, key, n]
                    n += 1
                    try:
                        await client.call(f"map.{kind}", args)
                        result = "ok"
                    except ControlError as exc:
                        # No answer in time, or the link dropped: maybe applied.
                        text = str(exc)
                        result = (
                            "unknown" if ("no answer" in text or "closed" in text) else "failed"
                        )
                    ops.append(Op(i, kind, key, result, time.monotonic() - t0))
                    if result == "ok" and kind == "put":
                        acked.append(key)
                    if result != "ok":
                        break  # reconnect
                    await trio.sleep(0.05)
        except (ControlError, OSError) as exc:
            # The node is down or cut off from us: the connection is tried again.
            reconnects[i] = reconnects.get(i, 0) + 1
            print(f"[chaos] writer {i}: {exc}; reconnecting", file=sys.stderr, flush=True)
        await trio.sleep(0.5)


async def digests(net: Network, hosts: list[int], secret: bytes) -> dict[int, str | None]:
    out: dict[int, str | None] = {}

    async def one(i: int) -> None:
        try:
            with trio.fail_after(5):
                async with control(net, i, secret) as client:
                    out[i] = (await client.call("map.digest", [MAP]))["digest"]
        except (ControlError, OSError, trio.TooSlowError):
            out[i] = None

    async with trio.open_nursery() as nursery:
        for i in hosts:
            nursery.start_soon(one, i)
    return out


async def converge(net: Network, nodes: Nodes, secret: bytes, limit: float) -> float | None:
    """Seconds until every live node reports the same digest twice in a row (None: never)."""
    start = time.monotonic()
    last: str | None = None
    while time.monotonic() - start < limit:
        seen = await digests(net, nodes.alive(), secret)
        values = set(seen.values())
        if len(values) == 1 and None not in values:
            (value,) = values
            if value == last:
                return round(time.monotonic() - start, 1)
            last = value
        else:
            last = None
        await trio.sleep(0.5)
    return None


async def dump(net: Network, i: int, secret: bytes) -> dict[str, list[Any]]:
    rows: dict[str, list[Any]] = {}
    with trio.fail_after(120):
        async with control(net, i, secret) as client:
            await _read_dump(client, rows)
    return rows


async def _read_dump(client: Any, rows: dict[str, list[Any]]) -> None:
    async for batch in client.stream("map.dump", [MAP, True]):
        if not batch:
            break
        for row in batch:
            rows[row[0]] = row


def check(ops: list[Op], maps: dict[int, dict[str, list[Any]]]) -> dict[str, Any]:
    """What Jepsen checks, on the final maps (module docstring)."""
    first = next(iter(maps.values()))
    identical = all(m == first for m in maps.values())
    put_ok = {op.key for op in ops if op.kind == "put" and op.result == "ok"}
    touched = {op.key for op in ops if op.kind == "delete" and op.result != "failed"}
    deleted_ok = {op.key for op in ops if op.kind == "delete" and op.result == "ok"}
    lost = []
    resurrected = []
    for host, rows in maps.items():
        for key in put_ok - touched:
            row = rows.get(key)
            if row is None or row[5]:
                lost.append([host, key])
        for key in deleted_ok:
            row = rows.get(key)
            if row is not None and not row[5]:
                resurrected.append([host, key])
    return {
        "identical_on_every_node": identical,
        "acknowledged_puts": len(put_ok),
        "acknowledged_deletes": len(deleted_ok),
        "lost_acknowledged_writes": lost[:50],
        "lost_count": len(lost),
        "resurrected_deletes": resurrected[:50],
        "resurrected_count": len(resurrected),
        "operations": {
            result: sum(1 for op in ops if op.result == result)
            for result in ("ok", "failed", "unknown")
        },
        "keys_on_first_node": sum(1 for row in first.values() if not row[5]),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    net = Network(args.hosts)
    workdir = Path(tempfile.mkdtemp(prefix="trio-replica-chaos-"))
    secret_path = workdir / "secret"
    secret_path.write_text("chaos test cluster secret, not for production\n")
    secret = secret_path.read_bytes().strip()
    nodes = Nodes(net, workdir, secret_path)
    faults: list[dict[str, Any]] = []
    ops: list[Op] = []
    result: dict[str, Any] = {"hosts": args.hosts, "minutes": args.minutes, "seed": args.seed}
    try:
        net.build()
        for i in range(args.hosts):
            nodes.start(i)
        with trio.fail_after(60):
            while await converge(net, nodes, secret, 5) is None:
                pass
        gate, stop = Gate(), trio.Event()
        gate.open.set()
        async with trio.open_nursery() as nursery:
            for i in range(args.hosts):
                nursery.start_soon(writer, net, i, secret, ops, gate, stop)
            deadline = time.monotonic() + args.minutes * 60
            kinds = ["kill", "kill_two", "partition", "isolate", "flap"]
            while time.monotonic() < deadline:
                kind = kinds[len(faults) % len(kinds)] if len(faults) < 5 else rng.choice(kinds)
                fault: dict[str, Any] = {"kind": kind, "at": round(time.monotonic(), 1)}
                await trio.sleep(rng.uniform(3, 8))  # writes flow before the fault
                if kind in ("kill", "kill_two"):
                    victims = [rng.randrange(args.hosts)]
                    if kind == "kill_two":
                        victims = [0, rng.randrange(1, args.hosts)]  # the first seed too
                    for v in victims:
                        nodes.kill(v)
                    await trio.sleep(rng.uniform(5, 20))
                    for v in victims:
                        nodes.start(v)
                    fault["hosts"] = victims
                elif kind in ("partition", "isolate"):
                    hosts = list(range(args.hosts))
                    rng.shuffle(hosts)
                    cut = 1 if kind == "isolate" else rng.randrange(1, args.hosts // 2 + 1)
                    groups = [set(hosts[:cut]), set(hosts[cut:])]
                    net.partition(groups)
                    fault["groups"] = [sorted(g) for g in groups]
                    await trio.sleep(rng.uniform(20, 75))
                    net.heal()
                else:
                    i, j = rng.sample(range(args.hosts), 2)
                    for _ in range(5):
                        net.set_pair(i, j, False)
                        await trio.sleep(2)
                        net.set_pair(i, j, True)
                        await trio.sleep(2)
                    fault["pair"] = [i, j]
                # The writers finish the operation in hand and wait: convergence is
                # measured on a map that stops changing.
                gate.open = trio.Event()
                await trio.sleep(1)
                fault["converged_after_s"] = await converge(net, nodes, secret, 120)
                faults.append(fault)
                print(f"[chaos] {fault}", file=sys.stderr, flush=True)
                gate.open.set()
            stop.set()
            gate.open.set()
            nursery.cancel_scope.cancel()
        net.heal()
        result["not_running_before_the_end"] = [
            i for i in range(args.hosts) if i not in nodes.alive()
        ]
        for i in result["not_running_before_the_end"]:
            nodes.start(i)
        result["final_converged_after_s"] = await converge(net, nodes, secret, 180)
        maps = {i: await dump(net, i, secret) for i in range(args.hosts)}
        result["faults"] = faults
        result["checks"] = check(ops, maps)
        result["writer_reconnects"] = dict(reconnects)
    finally:
        nodes.stop_all()
        net.teardown()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            result["workdir"] = str(workdir)
    return result


def markdown(result: dict[str, Any]) -> str:
    checks = result["checks"]
    lines = [
        f"# chaos: {result['hosts']} hosts, {result['minutes']} minutes, seed {result['seed']}",
        "",
        f"- operations: {checks['operations']}; acknowledged puts {checks['acknowledged_puts']},"
        f" deletes {checks['acknowledged_deletes']}",
        f"- lost acknowledged writes: {checks['lost_count']}; resurrected deletes:"
        f" {checks['resurrected_count']}; maps identical: {checks['identical_on_every_node']}",
        f"- final convergence: {result['final_converged_after_s']} s",
        "",
        "| fault | detail | converged after heal (s) |",
        "|---|---|---|",
    ]
    for f in result["faults"]:
        detail = f.get("hosts") or f.get("groups") or f.get("pair")
        lines.append(f"| {f['kind']} | {detail} | {f['converged_after_s']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hosts", type=int, default=5)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the data and logs directory")
    parser.add_argument("--out", type=Path, help="write the JSON here (default: bench/results)")
    args = parser.parse_args(argv)
    # SIGTERM as Ctrl-C: the namespaces and the nodes are cleaned up on the way out.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    why = netns_available()
    if why is not None:
        print(f"chaos test skipped: {why}", file=sys.stderr)
        return 0
    if args.hosts < 3:
        parser.error("--hosts must be at least 3")
    result = trio.run(run, args)
    result["date"] = datetime.datetime.now().isoformat(timespec="seconds")
    stem = f"chaos_{args.hosts}x{args.minutes:g}m"
    out = args.out or RESULTS / f"{stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    checks = result["checks"]
    ok = (
        checks["identical_on_every_node"]
        and not checks["lost_count"]
        and not checks["resurrected_count"]
        and result["final_converged_after_s"] is not None
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
