"""Latency-driven autoscaling of edge and cloud stages (pure: no I/O).

Inputs are scrapes of the stage pods' own `/metrics` (Prometheus text): the
`edgeai_stage_latency_seconds` histogram (time from a request reaching the stage to
its answer, this stage and those after it) and `edgeai_in_flight_requests`.

Each stage has a latency target: the SLO minus what the plan spends before the stage
(upstream compute and transfers), so stages that meet their targets meet the SLO.
Two windows, as in Knative's autoscaler:

- stable window (default 60 s): p95 over it above the target scales up by one step
  (`ceil(replicas * p95 / target)`, at most doubling); p95 below half the target,
  with no scale-up for `scale_down_delay_s`, scales down by one;
- panic window (default 6 s): p95 over it above `panic_threshold` x target scales
  up at once and holds off any scale-down for a stable window.

No traffic over the stable window scales to `min_replicas`.
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from edgeai_operator.plandoc import PlanDocument

LATENCY_METRIC = "edgeai_stage_latency_seconds"
IN_FLIGHT_METRIC = "edgeai_in_flight_requests"
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_LE = re.compile(r'le="([^"]+)"')


@dataclass(frozen=True)
class Scrape:
    """One pod's histogram (cumulative count per upper bound) and gauges at a time."""

    buckets: Mapping[float, float]
    in_flight: float
    # per-input offloading counters (OFFLOAD_COUNTERS), summed over their labels
    offload: Mapping[str, float] = field(default_factory=dict)


# what a stage with per-input offloading counts (edgeai_worker.metrics)
OFFLOAD_COUNTERS = (
    "edgeai_exit_answers_total",
    "edgeai_escalations_total",
    "edgeai_reuse_lookups_total",
    "edgeai_reuse_hits_total",
    "edgeai_labelled_requests_total",
    "edgeai_labelled_correct_total",
)


def offload_observed(scrapes: Sequence[Scrape]) -> dict[str, float]:
    """`status.observed.offload` from stage pods' counters since they started: the
    share of decided requests answered by an exit or the cascade and escalated, the
    reuse cache's hit rate, and the accuracy on labelled requests. Empty when no pod
    counts any of them."""
    total = {name: sum(s.offload.get(name, 0.0) for s in scrapes) for name in OFFLOAD_COUNTERS}
    answered, escalated = total["edgeai_exit_answers_total"], total["edgeai_escalations_total"]
    lookups, labelled = total["edgeai_reuse_lookups_total"], total["edgeai_labelled_requests_total"]
    observed: dict[str, float] = {}
    if answered + escalated:
        observed["exitRate"] = round(answered / (answered + escalated), 4)
        observed["escalationRate"] = round(escalated / (answered + escalated), 4)
    if lookups:
        observed["reuseHitRate"] = round(total["edgeai_reuse_hits_total"] / lookups, 4)
    if labelled:
        observed["labelledRequests"] = labelled
        observed["labelledAccuracy"] = round(total["edgeai_labelled_correct_total"] / labelled, 4)
    return observed


def parse_metrics(text: str) -> Scrape:
    buckets: dict[float, float] = {}
    offload: dict[str, float] = {}
    in_flight = 0.0
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if not match:
            continue
        name, labels, value = match.group(1), match.group(2) or "", float(match.group(3))
        if name == f"{LATENCY_METRIC}_bucket":
            le = _LE.search(labels)
            if le:
                bound = math.inf if le.group(1) == "+Inf" else float(le.group(1))
                buckets[bound] = buckets.get(bound, 0.0) + value
        elif name == IN_FLIGHT_METRIC:
            in_flight += value
        elif name in OFFLOAD_COUNTERS:
            offload[name] = offload.get(name, 0.0) + value
    return Scrape(buckets=buckets, in_flight=in_flight, offload=offload)


def quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """histogram_quantile over cumulative bucket counts (seconds); None without data."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    total = buckets[bounds[-1]]
    rank = q * total
    previous_bound, previous_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return previous_bound
            span = count - previous_count
            fraction = (rank - previous_count) / span if span > 0 else 1.0
            return previous_bound + (bound - previous_bound) * fraction
        previous_bound, previous_count = bound, count
    return previous_bound


def _minus(a: Mapping[float, float], b: Mapping[float, float]) -> dict[float, float]:
    return {k: max(0.0, v - b.get(k, 0.0)) for k, v in a.items()}


@dataclass
class PodHistory:
    """Scrapes of one pod over time; a restarted pod (counters fell) starts afresh."""

    samples: deque[tuple[float, Scrape]] = field(default_factory=deque)

    def add(self, now: float, scrape: Scrape, keep_s: float) -> None:
        if self.samples:
            last = self.samples[-1][1].buckets
            if any(scrape.buckets.get(k, 0.0) < v for k, v in last.items()):
                self.samples.clear()
        self.samples.append((now, scrape))
        while self.samples and now - self.samples[0][0] > keep_s:
            self.samples.popleft()

    def delta(self, now: float, window_s: float) -> dict[float, float]:
        if len(self.samples) < 2:
            return {}
        newest = self.samples[-1][1].buckets
        # The last sample taken at or before the window's start, so the delta covers
        # the whole window (the oldest one while history is shorter than the window).
        base = self.samples[0][1].buckets
        for t, sample in list(self.samples)[:-1]:
            if now - t < window_s:
                break
            base = sample.buckets
        return _minus(newest, base)


@dataclass(frozen=True)
class ScalePolicy:
    min_replicas: int = 1
    max_replicas: int = 8
    target_ms: float = 100.0
    stable_window_s: float = 60.0
    panic_window_s: float = 6.0
    panic_threshold: float = 2.0
    scale_down_delay_s: float = 30.0


@dataclass
class StageScaler:
    """Autoscaling state of one stage workload (a Deployment)."""

    policy: ScalePolicy
    pods: dict[str, PodHistory] = field(default_factory=dict)
    panic_until: float = 0.0
    last_scale_up: float = -math.inf
    last_decision: str = ""

    @property
    def keep_s(self) -> float:
        # Twice the stable window: "no request for a whole window" needs a sample
        # at least a window old, whatever the scrape interval.
        return 2 * self.policy.stable_window_s

    def observe(self, now: float, scrapes: Mapping[str, Scrape]) -> None:
        for pod in set(self.pods) - set(scrapes):
            # A pod that missed a scrape keeps its history; one gone for long is dropped.
            samples = self.pods[pod].samples
            if not samples or now - samples[-1][0] > self.keep_s:
                del self.pods[pod]
        for pod, scrape in scrapes.items():
            self.pods.setdefault(pod, PodHistory()).add(now, scrape, self.keep_s)

    def window(self, now: float, window_s: float) -> dict[float, float]:
        total: dict[float, float] = {}
        for history in self.pods.values():
            for k, v in history.delta(now, window_s).items():
                total[k] = total.get(k, 0.0) + v
        return total

    def p95_ms(self, now: float, window_s: float) -> float | None:
        value = quantile(0.95, self.window(now, window_s))
        return None if value is None else value * 1000.0

    def requests(self, now: float, window_s: float) -> float:
        window = self.window(now, window_s)
        return window.get(math.inf, max(window.values(), default=0.0))

    def decide(self, now: float, replicas: int) -> tuple[int, str]:
        """(desired replicas, the reason in words with the numbers)."""
        p = self.policy
        stable = self.p95_ms(now, p.stable_window_s)
        panic = self.p95_ms(now, p.panic_window_s)
        target = p.target_ms

        def clamp(n: int) -> int:
            return max(p.min_replicas, min(p.max_replicas, n))

        if replicas < p.min_replicas or replicas > p.max_replicas:
            return clamp(
                replicas
            ), f"replicas {replicas} outside [{p.min_replicas}, {p.max_replicas}]"
        if panic is not None and panic > p.panic_threshold * target:
            self.panic_until = now + p.stable_window_s
            want = clamp(min(2 * replicas, math.ceil(replicas * panic / target)))
            if want > replicas:
                self.last_scale_up = now
            return want, (
                f"panic: p95 {panic:.1f} ms over the last {p.panic_window_s:g} s is above "
                f"{p.panic_threshold:g}x the stage target {target:.1f} ms"
            )
        if stable is None:
            # Scraped for a whole stable window, and not one request in it.
            idle = bool(self.pods) and all(
                h.samples and now - h.samples[0][0] >= p.stable_window_s for h in self.pods.values()
            )
            if idle and now >= self.panic_until and replicas > p.min_replicas:
                return p.min_replicas, f"no requests in {p.stable_window_s:g} s"
            return replicas, "no latency samples"
        if stable > target:
            want = clamp(
                min(2 * replicas, max(replicas + 1, math.ceil(replicas * stable / target)))
            )
            if want > replicas:
                self.last_scale_up = now
            return want, (
                f"p95 {stable:.1f} ms over {p.stable_window_s:g} s above the stage target "
                f"{target:.1f} ms"
            )
        calm = stable < 0.5 * target
        if (
            calm
            and now >= self.panic_until
            and now - self.last_scale_up >= p.scale_down_delay_s
            and replicas > p.min_replicas
        ):
            return replicas - 1, (
                f"p95 {stable:.1f} ms over {p.stable_window_s:g} s is under half the stage "
                f"target {target:.1f} ms"
            )
        return replicas, f"p95 {stable:.1f} ms within the stage target {target:.1f} ms"


def stage_targets(plan: PlanDocument, slo_ms: float) -> dict[str, float]:
    """Per tier: the SLO minus what the plan spends before the stage starts (earlier
    stages' compute and serving overheads, transfers up to this stage)."""
    spent = 0.0
    out: dict[str, float] = {}
    transfer_ms = {t.to_tier: t.ms for t in plan.transfers}
    for stage in plan.stages:
        spent += transfer_ms.get(stage.tier, 0.0)
        out[stage.tier] = max(slo_ms - spent, 1.0)
        # what the stage costs the request: its layers and its fixed serving overhead
        spent += stage.compute_ms + plan.serving_ms.get(stage.tier, 0.0)
    return out
