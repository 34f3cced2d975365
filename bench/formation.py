"""How often a small overlay settles with a node under two neighbours.

    python bench/formation.py [--runs 100] [--nodes 20]

Each run forms `--nodes` nodes on the in-memory network (5 ms links, virtual time, a
different network seed per run), all joining through the first, and looks at the active
views after 60 s of virtual time. Before issue 13, 2% of 20-node formations left a node
with a single neighbour forever (every other view full, so its low-priority NEIGHBORs were
refused); the membership core now asks with high priority after `low_view_grace`.
"""

from __future__ import annotations

import argparse
import zlib

import trio
import trio.testing

from trio_replica import NodeConfig
from trio_replica.localcluster import run_node
from trio_replica.node import Node
from trio_replica.transports.memory import MemoryNetwork


async def one(seed: int, n: int, settle: float) -> int:
    net = MemoryNetwork(seed=seed, latency=0.005)
    nodes: list[Node] = []
    async with trio.open_nursery() as nursery:
        for i in range(n):
            name = f"n{i}"
            config = NodeConfig(
                name=name,
                listen=f"mem://{name}",
                seeds=(nodes[0].address,) if nodes else (),
                rng_seed=zlib.crc32(f"{seed}/{name}".encode()),
            )
            node = await nursery.start(
                run_node,
                config,
                net.transport(name),
                trio.CancelScope(),
                trio.Event(),
            )
            nodes.append(node)
        await trio.sleep(settle)
        smallest = min(len(node.active_view()) for node in nodes)
        nursery.cancel_scope.cancel()
    return smallest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--settle", type=float, default=60.0)
    args = parser.parse_args()
    short = 0
    for seed in range(args.runs):
        clock = trio.testing.MockClock(autojump_threshold=0)
        smallest = trio.run(one, seed, args.nodes, args.settle, clock=clock)
        if smallest < 2:
            short += 1
            print(f"seed {seed}: a node holds {smallest} neighbour(s)", flush=True)
    print(
        f"{args.nodes}-node formations with a node under 2 neighbours after "
        f"{args.settle:g} s: {short} of {args.runs}"
    )


if __name__ == "__main__":
    main()
