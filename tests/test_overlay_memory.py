"""200 nodes on the in-memory network (virtual time): the overlay forms and survives 50% loss."""

from __future__ import annotations

import random

import trio
import trio.testing

from trio_replica.transports.memory import MemoryNetwork

from .harness import Cluster, full_views, overlay_ok, wait_until

N = 200


async def test_200_nodes_form_an_overlay_and_heal_after_half_crash(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork(seed=7, latency=0.002)
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, net)
        seed = await c.start("n000")
        for i in range(1, N):
            await c.start(f"n{i:03d}", [seed.address])
        size = seed.config.membership.active_size
        with trio.fail_after(120):
            await wait_until(lambda: overlay_ok(c.live()) and full_views(c.live(), size) >= 0.9)
        formed = full_views(c.live(), size)
        print(f"\n{N} nodes: overlay connected and symmetric, {formed:.0%} of active views full")

        victims = random.Random(1).sample(sorted(c.nodes), N // 2)
        for name in victims:
            c.crash(name)
        crashed_at = trio.current_time()
        shuffle = seed.config.membership.shuffle_interval
        # Survivors split into groups that share no passive entry merge only when a node
        # holding a live seed runs its periodic rejoin (3 runs in 40 needed it).
        with trio.fail_after(seed.config.membership.rejoin_interval + 5 * shuffle):
            await wait_until(lambda: overlay_ok(c.live(), min_active=2), poll=0.25)
        healed = trio.current_time() - crashed_at
        print(
            f"after crashing {len(victims)} nodes at once: survivors connected again in "
            f"{healed:.1f} s of virtual time ({healed / shuffle:.1f} shuffle periods), "
            f"{full_views(c.live(), size):.0%} of active views full"
        )
        nursery.cancel_scope.cancel()
