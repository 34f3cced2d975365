"""Digest anti-entropy on a large map: bytes moved for a small difference, against a full sync.

    python bench/digest.py [--keys 1000000] [--interval 10] [--flood 2000]

Two nodes over websockets on 127.0.0.1, in this one process. Node a holds a map of
`--keys` entries (loaded straight into memory); node b opens the map and is filled by
one digest comparison: the bytes of that fill are what a full sync costs. Then each node
changes one key that the other never hears of (its delta lost, as in a partition), and
the periodic anti-entropy (`--interval` seconds, jittered +-25%) must find both: measured
are the time until both replicas hold both changes and the bytes of the digest rounds and
entry chunks sent meanwhile, as a share of the full fill. Last, with ``--flood N``, a
third connection floods a with N comparison openings that each claim an empty map
("send me everything") while b keeps writing: bytes a sends per byte the flood sent, and
how many of b's writes a applied meanwhile. Beside them, the raw websocket figure of
the same run.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cluster import RESULTS, websocket_ceiling
from cluster_nodes import quiet_logs
from common import write_results

from trio_replica import Node, NodeConfig, open_node
from trio_replica.core.ormap import Dot, Value
from trio_replica.runtime.config import ReplicaConfig
from trio_replica.stores.maps import ReplicatedMap

SYNC_KINDS = ("SyncDigest", "SyncChunk", "SyncRequest")


def progress(message: str) -> None:
    print(f"[digest] {message}", file=sys.stderr, flush=True)


def sync_bytes(*nodes: Node) -> dict[str, int]:
    out = dict.fromkeys(SYNC_KINDS, 0)
    for node in nodes:
        sent = node.stats()["bytes_sent"]
        for kind in SYNC_KINDS:
            out[kind] += sent.get(kind, 0)
    return out


def minus(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after}


def write_quietly(m: ReplicatedMap, node: Node, key: str, value: Any) -> None:
    """A write only this replica holds (its delta lost): for anti-entropy to find."""
    m._map.merge_entry(key, Value(value, Dot(node.id, node.clock.now())))


async def wait_for(predicate: Any, timeout: float) -> float:
    start = time.monotonic()
    with trio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110 - a bench's wait on two maps
            await trio.sleep(0.05)
    return round(time.monotonic() - start, 2)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {
        "keys": args.keys,
        "interval_s": args.interval,
        "date": datetime.datetime.now().isoformat(),
    }
    result["ceiling"] = await websocket_ceiling()
    replica = ReplicaConfig(anti_entropy_interval=args.interval)
    async with (
        open_node(NodeConfig(name="a", replica=replica)) as a,
        open_node(NodeConfig(name="b", seeds=(a.address,), replica=replica)) as b,
    ):
        with trio.fail_after(30):
            await b.wait_ready()
        ma = await a.open_map("big")
        progress(f"loading {args.keys:,} keys into a")
        for i in range(args.keys):
            ma._map.merge_entry(f"key-{i:07d}", Value(i, Dot("a", a.clock.now())))
            if i % 10_000 == 0:
                await trio.lowlevel.checkpoint()
        progress("b opens the map: filled by one comparison")
        before = sync_bytes(a, b)
        t0 = time.monotonic()
        mb = await b.open_map("big")
        await wait_for(lambda: len(mb) == args.keys, 600)
        assert mb.replica.uses_digest and ma.replica.uses_digest
        await wait_for(lambda: not mb.replica.core.busy(), 60)
        fill = minus(sync_bytes(a, b), before)
        result["fill"] = {"seconds": round(time.monotonic() - t0, 2), "bytes": fill}
        full = sum(fill.values())
        progress(f"filled in {result['fill']['seconds']} s, {full:,} bytes")

        progress("one change on each side that the other does not hear of")
        write_quietly(ma, a, "key-0000007", "changed on a")
        write_quietly(mb, b, "key-0500000", "changed on b")
        before = sync_bytes(a, b)
        sessions0 = ma.replica.core.digest_stats.sessions_completed + (
            mb.replica.core.digest_stats.sessions_completed
        )
        converge = await wait_for(
            lambda: (
                mb.get("key-0000007") == "changed on a" and ma.get("key-0500000") == "changed on b"
            ),
            4 * args.interval,
        )
        # The comparison that found them ends just after: count all of its bytes.
        await wait_for(lambda: not ma.replica.core.busy() and not mb.replica.core.busy(), 60)
        repair = minus(sync_bytes(a, b), before)
        moved = sum(repair.values())
        result["repair"] = {
            "converged_s": converge,
            "within_one_period": converge <= args.interval * 1.25,
            "bytes": repair,
            "share_of_full_sync": round(moved / full, 6),
            "comparisons": ma.replica.core.digest_stats.sessions_completed
            + mb.replica.core.digest_stats.sessions_completed
            - sessions0,
            "equal_after": ma._map == mb._map,
        }
        progress(
            f"converged in {converge} s; {moved:,} bytes, "
            f"{result['repair']['share_of_full_sync']:.4%} of a full sync"
        )
        if args.flood:
            result["flood"] = await flood(a, b, ma, mb, args.flood)
    return result


async def flood(a: Node, b: Node, ma: ReplicatedMap, mb: ReplicatedMap, n: int) -> dict[str, Any]:
    """A third node floods a with comparisons claiming an empty map; b keeps writing."""
    from trio_replica.core.messages import SyncDigest
    from trio_replica.core.wire import encode_message

    progress(f"flood: {n} openings asking for everything, b writing meanwhile")
    async with open_node(NodeConfig(name="flooder", seeds=(a.address,))) as f:
        with trio.fail_after(30):
            await f.wait_ready()
        sent_a0 = sum(a.stats()["bytes_sent"].values())
        flood_bytes = 0
        writes = 0
        start = time.monotonic()
        async with trio.open_nursery() as nursery:

            async def writer() -> None:
                nonlocal writes
                while True:
                    await mb.put(f"honest-{writes}", writes)
                    writes += 1
                    await trio.sleep(0.05)

            nursery.start_soon(writer)
            for session in range(n):
                message = SyncDigest("big", session, 1, (0,), (), ())
                flood_bytes += len(encode_message(message))
                await f.runtime.send_message(a.me, message)
            await trio.sleep(10)
            nursery.cancel_scope.cancel()
        elapsed = time.monotonic() - start
        await trio.sleep(2)
        applied = sum(1 for i in range(writes) if ma.get(f"honest-{i}") == i)
        sent_a = sum(a.stats()["bytes_sent"].values()) - sent_a0
        digest = ma.replica.core
        out = {
            "openings": n,
            "seconds": round(elapsed, 1),
            "flood_bytes": flood_bytes,
            "a_sent_bytes": sent_a,
            "out_per_in": round(sent_a / flood_bytes, 1),
            "rounds_refused": dict(digest.digest_stats.rounds_refused),
            "ranges_refused": digest.digest_stats.ranges_refused,
            "honest_writes": writes,
            "honest_applied_on_a": applied,
        }
        progress(f"flood: {out}")
        return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--interval", type=float, default=10.0, help="anti-entropy period, s")
    parser.add_argument("--flood", type=int, default=2000, help="flood openings (0: none)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    quiet_logs()
    result = trio.run(run, args)
    stem = args.out or RESULTS / f"digest_{args.keys}_{datetime.date.today().isoformat()}"
    write_results(stem, result)
    repair, ceiling = result["repair"], result["ceiling"]
    print(
        f"{args.keys:,} keys: full fill {sum(result['fill']['bytes'].values()):,} bytes in "
        f"{result['fill']['seconds']} s; two changes converged in {repair['converged_s']} s "
        f"(period {args.interval} s) moving {sum(repair['bytes'].values()):,} bytes "
        f"({repair['share_of_full_sync']:.4%}); flood {result.get('flood')}; raw websocket "
        f"{ceiling['messages_per_s']:,} msg/s, {ceiling['cpu_us_per_message']} us"
    )


if __name__ == "__main__":
    main()
