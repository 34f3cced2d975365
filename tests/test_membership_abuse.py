"""A member that abuses membership messages: the eclipse of issue 17, on a live node.

The attacker holds the cluster secret and links to the victim as a node, then sends 300
FORWARD_JOINs with time to live 0 and 200 SHUFFLEs, all naming made-up nodes at addresses
of its choosing. Before deviations 10-12 this replaced the victim's whole active view and
made it open hundreds of connections to those addresses.
"""

from __future__ import annotations

import trio
import trio.testing

from trio_replica.core.messages import ForwardJoin, Join, Peer, Role, Shuffle
from trio_replica.core.wire import encode_frame
from trio_replica.node import Node
from trio_replica.runtime.handshake import Credentials, handshake_as_dialer
from trio_replica.transports.memory import MemoryNetwork

from .harness import Cluster, overlay_ok, wait_until


def _honest(victim: Node, honest: set[str]) -> int:
    return len({p.id for p in victim.active_view()} & honest)


async def test_a_flood_of_forward_joins_and_shuffles_cannot_eclipse_a_node(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork(seed=17)
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, net)
        victim = await c.start("victim")
        others = await c.start_many([f"h{i}" for i in range(7)], victim)
        with trio.fail_after(120):
            await wait_until(
                lambda: (
                    overlay_ok([victim, *others], min_active=2) and len(victim.active_view()) >= 4
                )
            )
        # Let the joins settle: the measure is the attack, not the overlay forming.
        await trio.sleep(30)
        honest = {node.id for node in others}
        dials_before = sum(victim.stats()["dial_failures"].values())
        lowest = _honest(victim, honest)
        async with net.transport("evil").open_connection(victim.address, timeout=5) as conn:
            creds = Credentials("trio-replica", b"", Peer("evil", "mem://evil"))
            await handshake_as_dialer(conn, creds, role=Role.NODE, timeout=5)
            await conn.send(encode_frame([Join()]))
            with trio.fail_after(10):
                await wait_until(lambda: "evil" in {p.id for p in victim.active_view()})
            fakes = [Peer(f"fake{i}", f"mem://fake{i}") for i in range(500)]
            start = trio.current_time()
            for chunk in range(0, 300, 50):
                await conn.send(
                    encode_frame([ForwardJoin(p, 0) for p in fakes[chunk : chunk + 50]])
                )
            for i in range(200):
                peers = tuple(fakes[300 + (i * 8 + j) % 200] for j in range(8))
                await conn.send(encode_frame([Shuffle(Peer("evil", "mem://evil"), 0, peers, i)]))
            # An address with a path of the attacker's choosing is refused at decoding:
            # a node is only ever dialed at its root.
            rejected = victim.stats()["rejected"].get("field", 0)
            await conn.send(encode_frame([ForwardJoin(Peer("p", "ws://10.9.9.9:80/admin"), 0)]))
            # Watch the victim for a minute while it digests that.
            while trio.current_time() - start < 60:
                lowest = min(lowest, _honest(victim, honest))
                await trio.sleep(0.1)
            elapsed = trio.current_time() - start
        stats = victim.stats()
        core = victim.runtime.membership.core.stats
        assert stats["rejected"].get("field", 0) == rejected + 1
        assert lowest >= 3, f"the victim kept {lowest} honest neighbours"
        assert core.replacements_refused >= 290
        # Dials stay under the documented budget: link.dial_burst + link.dial_rate * time.
        link = victim.config.link
        dials = sum(stats["dial_failures"].values()) - dials_before
        assert dials <= link.dial_burst + link.dial_rate * elapsed
        # Nothing of what the attacker taught stays in the views for long.
        with trio.fail_after(120):
            await wait_until(
                lambda: (
                    not {p.id for p in victim.active_view()} - honest
                    and _honest(victim, honest) >= 4
                )
            )
        nursery.cancel_scope.cancel()
