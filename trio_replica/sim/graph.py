"""Graph metrics over the overlay that the simulated nodes' active views form.

This module owns `active_graph` (the live nodes' active views of a `Simulator`, as a
directed graph) and the measures the HyParView paper reports on it (section 5.2):
connectivity and components, asymmetric links, clustering coefficient (and the triangles it
rests on), average shortest path and in-degree distribution.
"""

from __future__ import annotations

import random
from collections import Counter, deque

from .overlay import Simulator

__all__ = [
    "Graph",
    "active_graph",
    "asymmetric_links",
    "average_shortest_path",
    "clustering_coefficient",
    "components",
    "in_degree_distribution",
    "is_connected",
    "triangles",
]

Graph = dict[str, set[str]]


def active_graph(sim: Simulator) -> Graph:
    """Directed graph of the live nodes' active views (edges to crashed nodes left out).

    Its nodes are in id order: sums over them (the clustering coefficient) must not take
    their order from the hash seed, which changes the last bits of a float between runs.
    """
    alive = {node.id for node in sim.alive_nodes()}
    return {
        node_id: {peer.id for peer in sim.nodes[node_id].hyparview.active if peer.id in alive}
        for node_id in sorted(alive)
    }


def _undirected(graph: Graph) -> Graph:
    result: Graph = {node: set(peers) for node, peers in graph.items()}
    for node, peers in graph.items():
        for peer in peers:
            result.setdefault(peer, set()).add(node)
    return result


def components(graph: Graph) -> list[set[str]]:
    """Connected components of the graph taken as undirected, largest first."""
    undirected = _undirected(graph)
    seen: set[str] = set()
    result: list[set[str]] = []
    for start in undirected:
        if start in seen:
            continue
        component = {start}
        queue = deque([start])
        while queue:
            for peer in undirected[queue.popleft()]:
                if peer not in component:
                    component.add(peer)
                    queue.append(peer)
        seen |= component
        result.append(component)
    result.sort(key=len, reverse=True)
    return result


def is_connected(graph: Graph) -> bool:
    return len(components(graph)) <= 1


def asymmetric_links(graph: Graph) -> list[tuple[str, str]]:
    """Edges a -> b whose reverse b -> a is missing (both ends in the graph)."""
    return sorted(
        (a, b) for a, peers in graph.items() for b in peers if b in graph and a not in graph[b]
    )


def clustering_coefficient(graph: Graph) -> float:
    """Average local clustering coefficient of the undirected graph (paper, section 5.2)."""
    undirected = _undirected(graph)
    total = 0.0
    for peers in undirected.values():
        k = len(peers)
        if k < 2:
            continue
        links = sum(1 for a in peers for b in undirected[a] if b in peers) / 2
        total += links / (k * (k - 1) / 2)
    return total / len(undirected) if undirected else 0.0


def triangles(graph: Graph) -> int:
    """Triangles of the undirected graph. At 10,000 nodes of degree 5 the clustering
    coefficient counts a few dozen of them (a random 5-regular graph has (5 - 1)^3 / 6,
    about 10.7, on average, whatever its size): this says how many it rests on."""
    undirected = _undirected(graph)
    count = 0
    for node, peers in undirected.items():
        for a in peers:
            if a > node:
                count += sum(1 for b in undirected[a] if b > a and b in peers)
    return count


def average_shortest_path(
    graph: Graph, *, sources: int | None = None, rng: random.Random | None = None
) -> float:
    """Mean hop count between reachable pairs (BFS from all, or `sources` sampled, nodes)."""
    undirected = _undirected(graph)
    nodes = sorted(undirected)
    if sources is not None and sources < len(nodes):
        nodes = (rng or random.Random(0)).sample(nodes, sources)
    total = 0
    pairs = 0
    for start in nodes:
        dist = {start: 0}
        queue = deque([start])
        while queue:
            current = queue.popleft()
            for peer in undirected[current]:
                if peer not in dist:
                    dist[peer] = dist[current] + 1
                    queue.append(peer)
        total += sum(dist.values())
        pairs += len(dist) - 1
    return total / pairs if pairs else 0.0


def in_degree_distribution(graph: Graph) -> dict[int, int]:
    """Number of nodes per in-degree (how many active views hold the node)."""
    indegree = dict.fromkeys(graph, 0)
    for peers in graph.values():
        for peer in peers:
            if peer in indegree:
                indegree[peer] += 1
    return dict(sorted(Counter(indegree.values()).items()))
