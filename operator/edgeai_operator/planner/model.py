"""The planning problem as plain data, and the cost model every solver agrees on.

A model is a DAG of compute nodes (for a chain: the segments between the cuts of
`graph.cut_points`) with per-tier compute times, joined by tensors with byte sizes. The network is
a path of tiers starting at the device, where requests enter and answers return:
`path = (device, edge, cloud)` with one `Link` per hop. An assignment maps each
node to a tier index on that path; data only flows up, so along every DAG edge the
tier never decreases. Equivalently, `I_k = {v : tier(v) <= k}` is a nested chain of
downward-closed node sets (ideals), and hop `k` carries exactly the tensors that
cross `I_k`.

Cost of an assignment (what `evaluate` computes; solvers must agree with it):

- compute: `sum_v ms[tier(v)][v]`, stages run one after the other for a request;
- hop `k` is used iff some node runs above tier `k`; then it costs
  `rtt_ms + (up_bytes + down_bytes) * 8 / (mbps * 1000)` ms, where up_bytes are the
  tensors crossing `I_k` (the raw input counts as produced on the device) and
  down_bytes the model outputs produced above tier `k` (the answer returns the same
  way). An empty middle stage forwards its input unchanged.
- serving: every tier the request passes through pays that tier's fixed per-request
  serving overhead `serving_ms[tier]` once (receiving and decoding the request, the
  hand-off to the runtime, encoding and sending the answer, measured with a tiny model
  by `edgeai profile`). The request enters at the device, so the device always pays
  it, and tier `k + 1` pays it iff hop `k` is used (an empty middle stage forwards,
  and pays it too). A tier that forwards (hop `k` used) also pays `forwarding_ms[tier]`
  (encoding the tensors for the next stage, sending them, taking its answer back).
  Both have a per-byte part as well, `serving_ms_per_mb[tier]` and
  `forwarding_ms_per_mb[tier]` (ms per 10^6 bytes): a tier pays it on the bytes it
  receives (the raw input for the device, hop `k`'s up_bytes for tier `k + 1`) and,
  when it forwards, on the bytes it passes on (hop `k`'s up_bytes for tier `k`).
  Tiers absent from these mappings pay 0.
- latency = compute + serving + transfers (one request, no overlap between stages).
- deviceEnergy (mJ) = (device compute + serving) ms x computeWatts + hop-0 upload ms x
  txWatts + hop-0 download ms x rxWatts + every other ms of the request x idleWatts.
- cloudCost = sum over tiers of (compute + serving) ms x costPerMs[tier] (transfers are
  free).

Tier `k + 1`'s serving overhead and tier `k`'s forwarding overhead are paid exactly
when hop `k`'s RTT is, so solvers treat them as part of that hop's fixed cost
(weighted as compute of their tiers); their per-byte parts scale with hop `k`'s
up_bytes exactly as its upload time does, so solvers add them to that hop's cost per
uploaded byte (`Problem.hop_byte_cost`). The device's per-byte serving on the raw
input is the same for every assignment of a variant.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

OBJECTIVES = ("latency", "deviceEnergy", "cloudCost")
TIER_ORDER = ("device", "edge", "cloud")


@dataclass(frozen=True)
class Link:
    """One hop of the network path, from a tier to the next one up."""

    mbps: float
    rtt_ms: float

    def ms_per_byte(self) -> float:
        return 8.0 / (self.mbps * 1000.0)


@dataclass(frozen=True)
class PowerModel:
    """Device power draw in watts (W x ms = mJ)."""

    compute_w: float = 4.0
    tx_w: float = 1.5
    rx_w: float = 1.0
    idle_w: float = 0.3


@dataclass(frozen=True)
class Tensor:
    """A tensor (or a bundle of tensors crossing one chain cut) between nodes.
    `producer` is -1 for the model input, which is on the device."""

    names: tuple[str, ...]
    size_bytes: int
    producer: int
    consumers: tuple[int, ...]
    is_output: bool = False


@dataclass(frozen=True)
class LayerGraph:
    """Compute nodes in topological order with per-tier times, and their tensors."""

    node_ms: Mapping[str, tuple[float, ...]]
    tensors: tuple[Tensor, ...]
    labels: tuple[str, ...] = ()

    @staticmethod
    def chain(
        segment_ms: Mapping[str, Sequence[float]],
        cut_bytes: Sequence[int],
        cut_tensors: Sequence[Sequence[str]] | None = None,
    ) -> LayerGraph:
        """A chain: segment `i` reads cut `i` and writes cut `i + 1`; cut 0 is the model
        input and the last cut the output."""
        n = len(cut_bytes) - 1
        names = cut_tensors or [(f"cut{i}",) for i in range(n + 1)]
        tensors = tuple(
            Tensor(tuple(names[i]), int(cut_bytes[i]), i - 1, (i,) if i < n else (), i == n)
            for i in range(n + 1)
        )
        return LayerGraph({t: tuple(float(v) for v in ms) for t, ms in segment_ms.items()}, tensors)

    @property
    def size(self) -> int:
        return len(next(iter(self.node_ms.values()))) if self.node_ms else 0

    @functools.cached_property
    def is_chain(self) -> bool:
        n = self.size
        return len(self.tensors) == n + 1 and all(
            t.producer == i - 1
            and t.consumers == ((i,) if i < n else ())
            and t.is_output == (i == n)
            for i, t in enumerate(self.tensors)
        )

    @functools.cached_property
    def predecessors(self) -> tuple[tuple[int, ...], ...]:
        preds: list[set[int]] = [set() for _ in range(self.size)]
        for t in self.tensors:
            if t.producer >= 0:
                for c in t.consumers:
                    preds[c].add(t.producer)
        return tuple(tuple(sorted(p)) for p in preds)

    def validate(self, tiers: Sequence[str]) -> None:
        n = self.size
        for tier in tiers:
            ms = self.node_ms.get(tier)
            if ms is None:
                raise ValueError(f"no compute profile for tier {tier!r}")
            if len(ms) != n:
                raise ValueError(f"tier {tier!r} profiles {len(ms)} nodes, expected {n}")
            if any(not (v >= 0) for v in ms):
                raise ValueError(f"tier {tier!r} has a negative or NaN compute time")
        for t in self.tensors:
            if t.size_bytes < 0:
                raise ValueError(f"tensor {t.names} has a negative size")
            if not -1 <= t.producer < n or any(not t.producer < c < n for c in t.consumers):
                raise ValueError(f"tensor {t.names} breaks the topological order")


@dataclass(frozen=True)
class Variant:
    """One version of the model (fp32, int8, pruned, distilled) with its own profile."""

    name: str
    graph: LayerGraph
    accuracy: float | None = None


@dataclass(frozen=True)
class Problem:
    variants: tuple[Variant, ...]
    path: tuple[str, ...] = TIER_ORDER
    links: tuple[Link, ...] = ()
    allowed: frozenset[str] = frozenset(TIER_ORDER)
    objective: str = "latency"
    slo_latency_ms: float | None = None
    slo_throughput_rps: float | None = None
    raw_input_stays_on_device: bool = False
    min_accuracy: float | None = None
    power: PowerModel = PowerModel()
    cost_per_ms: Mapping[str, float] = field(default_factory=lambda: {"cloud": 1.0})
    # tier -> fixed per-request serving and forwarding overheads in ms (see the module
    # docstring)
    serving_ms: Mapping[str, float] = field(default_factory=dict)
    forwarding_ms: Mapping[str, float] = field(default_factory=dict)
    # tier -> their per-byte parts, in ms per 10^6 bytes received / forwarded
    serving_ms_per_mb: Mapping[str, float] = field(default_factory=dict)
    forwarding_ms_per_mb: Mapping[str, float] = field(default_factory=dict)

    def serving(self, k: int) -> float:
        """The serving overhead of the `k`-th tier on the path."""
        return float(self.serving_ms.get(self.path[k], 0.0))

    def forwarding(self, k: int) -> float:
        """The forwarding overhead of the `k`-th tier on the path."""
        return float(self.forwarding_ms.get(self.path[k], 0.0))

    def serving_per_byte(self, k: int) -> float:
        """The per-byte serving overhead (ms per byte received) of the `k`-th tier."""
        return float(self.serving_ms_per_mb.get(self.path[k], 0.0)) / 1e6

    def forwarding_per_byte(self, k: int) -> float:
        """The per-byte forwarding overhead (ms per byte passed on) of the `k`-th tier."""
        return float(self.forwarding_ms_per_mb.get(self.path[k], 0.0)) / 1e6

    def device_serving(self, graph: LayerGraph) -> float:
        """The device's serving overhead, fixed and on the raw input: every assignment
        of `graph` pays it."""
        raw = sum(t.size_bytes for t in graph.tensors if t.producer < 0)
        return self.serving(0) + self.serving_per_byte(0) * raw

    def hop_byte_cost(self, k: int, w: Weights) -> float:
        """What each byte uploaded over hop `k` costs under `w`: its transfer time, and
        the per-byte forwarding overhead of the tier below and serving overhead of the
        tier above."""
        return (
            w.up[k] * self.links[k].ms_per_byte()
            + w.compute[k] * self.forwarding_per_byte(k)
            + w.compute[k + 1] * self.serving_per_byte(k + 1)
        )

    def fixed_hop_cost(self, k: int, w: Weights) -> float:
        """What using hop `k` costs under `w` whatever it carries: its RTT, the
        forwarding overhead of the tier below and the serving overhead of the tier
        above."""
        return (
            w.rtt[k] * self.links[k].rtt_ms
            + w.compute[k] * self.forwarding(k)
            + w.compute[k + 1] * self.serving(k + 1)
        )

    def validate(self) -> None:
        if not self.path or self.path[0] != "device":
            raise ValueError(f"the network path must start at the device, got {self.path}")
        if len(set(self.path)) != len(self.path):
            raise ValueError(f"tiers repeat on the path {self.path}")
        if len(self.links) != len(self.path) - 1:
            raise ValueError(f"{len(self.path)} tiers need {len(self.path) - 1} links")
        for link in self.links:
            if not (link.mbps > 0 and link.rtt_ms >= 0):
                raise ValueError(f"bad link {link}")
        for what, overheads in (
            ("serving", self.serving_ms),
            ("forwarding", self.forwarding_ms),
            ("per-MB serving", self.serving_ms_per_mb),
            ("per-MB forwarding", self.forwarding_ms_per_mb),
        ):
            for tier, ms in overheads.items():
                if not (0 <= ms < float("inf")):
                    raise ValueError(f"bad {what} overhead {ms!r} ms for tier {tier!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}")
        if not self.allowed & set(self.path):
            raise ValueError("no allowed tier is on the path")
        if not self.variants:
            raise ValueError("no model variant to plan")
        for v in self.variants:
            v.graph.validate([t for t in self.path if t in self.allowed])


@dataclass(frozen=True)
class Weights:
    """Linear cost weights of one criterion: per tier per compute-ms, and per hop per
    upload-ms, download-ms and RTT-ms."""

    compute: tuple[float, ...]
    up: tuple[float, ...]
    down: tuple[float, ...]
    rtt: tuple[float, ...]


def weights(problem: Problem, criterion: str) -> Weights:
    hops = len(problem.path) - 1
    if criterion == "latency":
        return Weights((1.0,) * len(problem.path), (1.0,) * hops, (1.0,) * hops, (1.0,) * hops)
    if criterion == "deviceEnergy":
        p = problem.power
        compute = (p.compute_w,) + (p.idle_w,) * (len(problem.path) - 1)
        up = tuple(p.tx_w if k == 0 else p.idle_w for k in range(hops))
        down = tuple(p.rx_w if k == 0 else p.idle_w for k in range(hops))
        return Weights(compute, up, down, (p.idle_w,) * hops)
    if criterion == "cloudCost":
        compute = tuple(float(problem.cost_per_ms.get(t, 0.0)) for t in problem.path)
        return Weights(compute, (0.0,) * hops, (0.0,) * hops, (0.0,) * hops)
    raise ValueError(f"unknown objective {criterion!r}")


@dataclass(frozen=True)
class Evaluation:
    """Everything a plan is judged by, for one assignment."""

    tiers: tuple[int, ...]  # tier index on the path, per node
    compute_ms: tuple[float, ...]  # per tier on the path
    hop_used: tuple[bool, ...]
    up_bytes: tuple[int, ...]  # per hop
    down_bytes: tuple[int, ...]
    hop_ms: tuple[float, ...]
    latency_ms: float
    device_energy_mj: float
    cloud_cost: float
    device_busy_ms: float  # the device stage's per-request occupancy (compute or upload)
    # overhead (serving, and forwarding where it forwards; fixed and per byte) per tier
    # on the path; 0 where the request never goes
    serving_ms: tuple[float, ...] = ()

    def value(self, objective: str) -> float:
        return {
            "latency": self.latency_ms,
            "deviceEnergy": self.device_energy_mj,
            "cloudCost": self.cloud_cost,
        }[objective]


def _weighted(
    w: Weights,
    compute: Sequence[float],
    up_ms: Sequence[float],
    down_ms: Sequence[float],
    rtt_ms: Sequence[float],
) -> float:
    total = sum(a * b for a, b in zip(w.compute, compute, strict=True))
    for k in range(len(up_ms)):
        total += w.up[k] * up_ms[k] + w.down[k] * down_ms[k] + w.rtt[k] * rtt_ms[k]
    return total


def evaluate(problem: Problem, graph: LayerGraph, tiers: Sequence[int]) -> Evaluation:
    """The cost model (see the module docstring) for an assignment of nodes to tiers."""
    path = problem.path
    n = graph.size
    if len(tiers) != n:
        raise ValueError(f"assignment has {len(tiers)} entries for {n} nodes")
    compute = [0.0] * len(path)
    for v, k in enumerate(tiers):
        compute[k] += graph.node_ms[path[k]][v]
    top = max(tiers, default=0)
    hops = len(path) - 1
    used = tuple(k < top for k in range(hops))
    up = [0] * hops
    down = [0] * hops
    for t in graph.tensors:
        src = 0 if t.producer < 0 else tiers[t.producer]
        dst = max((tiers[c] for c in t.consumers), default=src)
        for k in range(src, dst):
            up[k] += t.size_bytes
        if t.is_output:
            for k in range(src):
                down[k] += t.size_bytes
    up_ms = [up[k] * problem.links[k].ms_per_byte() if used[k] else 0.0 for k in range(hops)]
    down_ms = [down[k] * problem.links[k].ms_per_byte() if used[k] else 0.0 for k in range(hops)]
    rtt_ms = [problem.links[k].rtt_ms if used[k] else 0.0 for k in range(hops)]
    hop_ms = tuple(up_ms[k] + down_ms[k] + rtt_ms[k] for k in range(hops))
    serving = tuple(
        (problem.device_serving(graph) if k == 0 else 0.0)
        + (
            problem.serving(k) + problem.serving_per_byte(k) * up[k - 1]
            if k > 0 and used[k - 1]
            else 0.0
        )
        + (
            problem.forwarding(k) + problem.forwarding_per_byte(k) * up[k]
            if k < hops and used[k]
            else 0.0
        )
        for k in range(len(path))
    )
    busy_tiers = [c + o for c, o in zip(compute, serving, strict=True)]
    latency = sum(busy_tiers) + sum(hop_ms)
    energy = _weighted(weights(problem, "deviceEnergy"), busy_tiers, up_ms, down_ms, rtt_ms)
    cost = _weighted(weights(problem, "cloudCost"), busy_tiers, up_ms, down_ms, rtt_ms)
    busy = max(busy_tiers[0], up_ms[0] if hops else 0.0)
    return Evaluation(
        tuple(tiers),
        tuple(compute),
        used,
        tuple(up),
        tuple(down),
        hop_ms,
        latency,
        energy,
        cost,
        busy,
        serving,
    )


def feasible(problem: Problem, graph: LayerGraph, ev: Evaluation) -> bool:
    """Constraints an assignment must meet (the SLO, placement, privacy)."""
    allowed = {k for k, t in enumerate(problem.path) if t in problem.allowed}
    if any(k not in allowed for k in ev.tiers):
        return False
    for t in graph.tensors:
        src = 0 if t.producer < 0 else ev.tiers[t.producer]
        if any(ev.tiers[c] < src for c in t.consumers):
            return False  # data would flow down the path
        if (
            problem.raw_input_stays_on_device
            and t.producer < 0
            and src != max((ev.tiers[c] for c in t.consumers), default=0)
        ):
            return False
    if problem.slo_latency_ms is not None and ev.latency_ms > problem.slo_latency_ms + 1e-9:
        return False
    return not (
        problem.slo_throughput_rps is not None
        and ev.device_busy_ms > 1000.0 / problem.slo_throughput_rps + 1e-9
    )
