"""Minimum s-t cut by Dinic's max-flow, iterative (graphs can be thousands deep)."""

from __future__ import annotations

from collections import deque

INF = float("inf")
_EPS = 1e-12


class FlowNetwork:
    def __init__(self, size: int) -> None:
        self.adj: list[list[int]] = [[] for _ in range(size)]
        self.to: list[int] = []
        self.cap: list[float] = []

    @property
    def size(self) -> int:
        return len(self.adj)

    def add_node(self) -> int:
        self.adj.append([])
        return len(self.adj) - 1

    def add_edge(self, u: int, v: int, capacity: float) -> None:
        """Edge `e` and its residual twin `e ^ 1`."""
        if capacity <= 0 or u == v:
            return
        e = len(self.to)
        self.to += (v, u)
        self.cap += (capacity, 0.0)
        self.adj[u].append(e)
        self.adj[v].append(e + 1)

    def _levels(self, s: int, t: int) -> list[int] | None:
        adj, to, cap = self.adj, self.to, self.cap
        level = [-1] * len(adj)
        level[s] = 0
        queue = deque([s])
        while queue:
            u = queue.popleft()
            next_level = level[u] + 1
            for e in adj[u]:
                v = to[e]
                if level[v] < 0 and cap[e] > _EPS:
                    level[v] = next_level
                    if v == t:
                        return level  # nodes at t's depth or deeper cannot help
                    queue.append(v)
        return None

    def min_cut(self, s: int, t: int) -> tuple[float, list[bool]]:
        """(cut value, source side flags). The value is INF if every cut is infinite."""
        adj, to, cap = self.adj, self.to, self.cap
        flow = 0.0
        while True:
            level = self._levels(s, t)
            if level is None:
                break
            depth = level[t]
            current = [0] * len(adj)
            while True:
                # one augmenting path in the level graph, iteratively
                path: list[int] = []
                u = s
                while u != t:
                    edges = adj[u]
                    i = current[u]
                    want = level[u] + 1
                    while i < len(edges):
                        e = edges[i]
                        v = to[e]
                        if cap[e] > _EPS and level[v] == want and (want < depth or v == t):
                            break
                        i += 1
                    current[u] = i
                    if i == len(edges):
                        if not path:
                            break
                        level[u] = -1  # dead end: prune it and step back
                        u = to[path.pop() ^ 1]
                        continue
                    e = edges[i]
                    path.append(e)
                    u = to[e]
                if u != t:
                    break
                pushed = min(cap[e] for e in path)
                if pushed == INF:
                    return INF, [False] * len(adj)
                for e in path:
                    cap[e] -= pushed
                    cap[e ^ 1] += pushed
                flow += pushed
        side = [False] * len(adj)
        side[s] = True
        queue = deque([s])
        while queue:
            u = queue.popleft()
            for e in adj[u]:
                v = to[e]
                if not side[v] and cap[e] > _EPS:
                    side[v] = True
                    queue.append(v)
        return flow, side
