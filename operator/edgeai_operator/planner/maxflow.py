"""Minimum s-t cut by Dinic's max-flow, iterative (graphs can be thousands deep)."""

from __future__ import annotations

from collections import deque

INF = float("inf")


class FlowNetwork:
    def __init__(self, size: int) -> None:
        self.size = size
        self.head = [-1] * size
        self.to: list[int] = []
        self.cap: list[float] = []
        self.next: list[int] = []

    def add_node(self) -> int:
        self.head.append(-1)
        self.size += 1
        return self.size - 1

    def add_edge(self, u: int, v: int, capacity: float) -> None:
        if capacity <= 0 or u == v:
            return
        for a, b, c in ((u, v, capacity), (v, u, 0.0)):
            self.to.append(b)
            self.cap.append(c)
            self.next.append(self.head[a])
            self.head[a] = len(self.to) - 1

    def _levels(self, s: int, t: int) -> list[int] | None:
        level = [-1] * self.size
        level[s] = 0
        queue = deque([s])
        head, to, cap, nxt = self.head, self.to, self.cap, self.next
        while queue:
            u = queue.popleft()
            e = head[u]
            while e != -1:
                v = to[e]
                if cap[e] > 1e-12 and level[v] < 0:
                    level[v] = level[u] + 1
                    queue.append(v)
                e = nxt[e]
        return level if level[t] >= 0 else None

    def min_cut(self, s: int, t: int) -> tuple[float, list[bool]]:
        """(cut value, source side flags). The value is INF if every cut is infinite."""
        flow = 0.0
        to, cap, nxt = self.to, self.cap, self.next
        while True:
            level = self._levels(s, t)
            if level is None:
                break
            current = list(self.head)
            while True:
                # find one augmenting path in the level graph, iteratively
                path: list[int] = []
                u = s
                while u != t:
                    e = current[u]
                    while e != -1 and not (cap[e] > 1e-12 and level[to[e]] == level[u] + 1):
                        e = nxt[e]
                    current[u] = e
                    if e == -1:
                        if not path:
                            break
                        level[u] = -1  # dead end: prune it and step back
                        back = path.pop()
                        u = to[back ^ 1]
                        continue
                    path.append(e)
                    u = to[e]
                if u != t:
                    break
                pushed = min(cap[e] for e in path)
                if pushed == INF:
                    return INF, [False] * self.size
                for e in path:
                    cap[e] -= pushed
                    cap[e ^ 1] += pushed
                flow += pushed
        side = [False] * self.size
        side[s] = True
        queue = deque([s])
        while queue:
            u = queue.popleft()
            e = self.head[u]
            while e != -1:
                v = to[e]
                if cap[e] > 1e-12 and not side[v]:
                    side[v] = True
                    queue.append(v)
                e = nxt[e]
        return flow, side
