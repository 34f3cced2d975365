"""The replica core in the simulator (simreplica.py): real cores, real maps, virtual time.
Replicas split by a partition converge after the heal, hosts find each other through
non-hosts, removals happen once, and a run is the same for the same seed."""

from __future__ import annotations

from trio_replica.core.events import DownReason, NodeRemoved
from trio_replica.core.hyparview import HyParViewConfig
from trio_replica.sim.graph import active_graph, is_connected
from trio_replica.sim.overlay import DriverConfig, Simulator
from trio_replica.sim.replica import (
    REPLICA,
    ReplicaLayer,
    bytes_sent,
    converged,
    digests,
    replica_stack,
    write,
)

from .test_replication_core import filled


def cluster(n: int, seed: int, *, hosts: set[str] | None = None, keys: int = 200) -> Simulator:
    state = filled(keys)
    hv = HyParViewConfig()
    sim = Simulator(
        seed,
        hyparview=hv,
        driver=DriverConfig(rejoin="seeds"),
        stack_factory=replica_stack(hv, initial=lambda _: state.copy(), hosts=hosts),
    )
    for i in range(n):
        sim.add_node(f"n{i}", ["n0", f"n{n // 2}"], at=i * 0.01)
    sim.run(30)
    return sim


def layer(sim: Simulator, node_id: str) -> ReplicaLayer:
    found = sim.nodes[node_id].stack.layers[REPLICA]
    assert isinstance(found, ReplicaLayer)
    return found


def run_until(sim: Simulator, done: object, limit: float) -> float:
    """Run in steps of 1 s until `done()`; the virtual seconds it took (fails at `limit`)."""
    start = sim.now
    while not done():  # type: ignore[operator]
        assert sim.now - start < limit, f"not done after {limit} s"
        sim.run_for(1.0)
    return sim.now - start


def partition_and_heal(seed: int) -> tuple[float, int]:
    sim = cluster(60, seed)
    assert converged(sim)
    left = {f"n{i}" for i in range(30)}
    sim.partition([left])
    sim.run_for(10)
    for j in range(5):
        write(sim, f"n{j}", f"left-{j}", j)
        write(sim, f"n{30 + j}", f"right-{j}", j)
    sim.run_for(30)
    assert len(digests(sim)) == 2  # each side holds its own writes only
    before = sum(bytes_sent(sim).values())
    sim.heal()
    # The overlay merging again is membership's part (the seeds' re-join check); from
    # then on, the repair is the replica core's.
    run_until(sim, lambda: is_connected(active_graph(sim)), 120)
    took = run_until(sim, lambda: converged(sim), 120)
    assert layer(sim, "n59").map.get("left-4") == 4 and layer(sim, "n0").map.get("right-0") == 0
    return took, sum(bytes_sent(sim).values()) - before


def test_replicas_split_by_a_partition_converge_after_the_heal_within_a_period() -> None:
    took, moved = partition_and_heal(seed=3)
    # Anti-entropy every 30 s; follow-ups spread a repair faster than one period per hop:
    # within one period of the overlay merging (seeds 1-10: 8-20 s).
    assert took <= 30
    # 60 replicas of 200 keys: a full-state repair would move 60 copies (about 6 KB each).
    assert moved < 60 * 6_000


def test_a_run_is_the_same_for_the_same_seed() -> None:
    assert partition_and_heal(seed=5) == partition_and_heal(seed=5)


def test_hosts_sync_with_each_other_even_when_no_neighbour_hosts() -> None:
    hosts = {"n3", "n17", "n29"}
    sim = cluster(30, 7, hosts=hosts)
    for node_id, node in sim.nodes.items():
        assert (REPLICA in node.stack.layers) == (node_id in hosts)
    # A write that reached one host only (its delta lost): anti-entropy between the hosts,
    # wherever they sit in the overlay, must bring it to the others.
    layer(sim, "n17").local_write("quiet", 1, sim.now)
    run_until(sim, lambda: all(layer(sim, h).map.get("quiet") == 1 for h in hosts), 90)
    for h in hosts:  # nothing was sent to a non-host
        assert set(layer(sim, h).sent_to) <= hosts - {h}


def test_a_removed_node_is_removed_on_every_host() -> None:
    sim = cluster(20, 9)
    sim.crash(["n5"])
    sim.run_for(10)
    for node in sim.alive_nodes():
        sim.emit(node.id, NodeRemoved("n5", DownReason.FAILED))
    sim.run_for(1)
    for node in sim.alive_nodes():
        assert layer(sim, node.id).removed == ["n5"]
