"""A small Prometheus text-format registry (counters, gauges, histograms with labels).

The worker exports a handful of series; a dependency for that is not worth its weight.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

Labels = tuple[tuple[str, str], ...]

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def _labels(labels: Labels, extra: str = "") -> str:
    parts = [f'{k}="{v}"' for k, v in labels]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


@dataclass
class _Metric:
    name: str
    help: str
    kind: str
    values: dict[Labels, float] = field(default_factory=dict)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]
        lines += [f"{self.name}{_labels(k)} {_number(v)}" for k, v in sorted(self.values.items())]
        return lines


class Counter(_Metric):
    def __init__(self, name: str, help: str) -> None:
        super().__init__(name, help, "counter")

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        self.values[key] = self.values.get(key, 0.0) + amount

    def get(self, **labels: str) -> float:
        return self.values.get(tuple(sorted(labels.items())), 0.0)


class Gauge(_Metric):
    def __init__(self, name: str, help: str) -> None:
        super().__init__(name, help, "gauge")

    def set(self, value: float, **labels: str) -> None:
        self.values[tuple(sorted(labels.items()))] = value

    def add(self, amount: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        self.values[key] = self.values.get(key, 0.0) + amount


class Histogram(_Metric):
    def __init__(self, name: str, help: str, buckets: Sequence[float]) -> None:
        super().__init__(name, help, "histogram")
        self.buckets = tuple(buckets)
        self.counts: dict[Labels, list[int]] = {}
        self.sums: dict[Labels, float] = {}

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        counts = self.counts.setdefault(key, [0] * (len(self.buckets) + 1))
        counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sums[key] = self.sums.get(key, 0.0) + value

    def count(self, **labels: str) -> int:
        return sum(self.counts.get(tuple(sorted(labels.items())), []))

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for key, counts in sorted(self.counts.items()):
            running = 0
            for bound, n in zip([*self.buckets, math.inf], counts, strict=True):
                running += n
                le = 'le="' + _number(bound) + '"'
                lines.append(f"{self.name}_bucket{_labels(key, le)} {running}")
            lines.append(f"{self.name}_sum{_labels(key)} {_number(self.sums[key])}")
            lines.append(f"{self.name}_count{_labels(key)} {running}")
        return lines


class WorkerMetrics:
    """The series one worker exports on /metrics."""

    def __init__(self) -> None:
        self.stage_latency = Histogram(
            "edgeai_stage_latency_seconds",
            "Time from receiving a request to answering it, this stage and those after it.",
            LATENCY_BUCKETS_S,
        )
        self.compute_latency = Histogram(
            "edgeai_stage_compute_seconds",
            "onnxruntime time of one (batched) run of this stage's partition.",
            LATENCY_BUCKETS_S,
        )
        self.compute_cpu = Counter(
            "edgeai_stage_compute_cpu_seconds_total",
            "CPU seconds of onnxruntime runs of this stage's partitions (no waits).",
        )
        self.requests = Counter("edgeai_requests_total", "Inference requests by HTTP status.")
        self.queue_depth = Gauge("edgeai_queue_depth", "Requests waiting for the runtime.")
        self.in_flight = Gauge("edgeai_in_flight_requests", "Requests being served.")
        self.bytes_in = Counter("edgeai_bytes_in_total", "Request body bytes received.")
        self.bytes_out = Counter("edgeai_bytes_out_total", "Response body bytes sent.")
        self.forward_bytes = Counter("edgeai_forward_bytes_total", "Bytes sent to the next stage.")
        self.forward_retries = Counter(
            "edgeai_forward_retries_total", "Forwards retried on another replica."
        )
        self.skipped_frames = Counter(
            "edgeai_skipped_frames_total", "Frames answered from the previous result (unchanged)."
        )
        self.frames = Counter("edgeai_frames_total", "Frames seen by the device stage.")
        self.skip_rate = Gauge("edgeai_skip_rate", "Skipped frames / frames seen.")
        self.batch_size = Histogram(
            "edgeai_batch_size", "Requests per onnxruntime run.", BATCH_BUCKETS
        )
        self.uplink_mbps = Gauge("edgeai_uplink_mbps", "Measured uplink to the next stage.")
        self.split = Counter("edgeai_split_choice_total", "Device split chosen, by option.")
        self.fallbacks = Counter(
            "edgeai_fallback_answers_total",
            "Requests the device answered with the whole model, by why the next stage did not"
            " (failed, late, cooldown).",
        )
        self.deduplicated = Counter(
            "edgeai_deduplicated_requests_total", "Retried requests answered without rerunning."
        )
        self.auth_failures = Counter(
            "edgeai_auth_failures_total",
            "Requests refused before the model: "
            "missing-token, wrong-token, missing-cert, peer, plain.",
        )
        self.tls_refusals = Counter(
            "edgeai_tls_handshake_failures_total",
            "Handshakes the TLS port refused: untrusted, expired, no-certificate, plain-text, "
            "other.",
        )
        self.tls_reloads = Counter("edgeai_tls_reloads_total", "Stage certificates loaded anew.")
        # Per-input offloading (edgeai_worker.offload): exits, escalations, reuse, and
        # accuracy on requests that carry a label.
        self.exit_answers = Counter(
            "edgeai_exit_answers_total", "Requests answered here by an early exit or cascade."
        )
        self.escalations = Counter(
            "edgeai_escalations_total", "Requests passed on: no exit here was confident."
        )
        self.exit_rate = Gauge("edgeai_exit_rate", "Exit answers / requests decided, by exit.")
        self.escalation_rate = Gauge("edgeai_escalation_rate", "Escalations / requests decided.")
        self.reuse_lookups = Counter("edgeai_reuse_lookups_total", "Result-reuse cache lookups.")
        self.reuse_hits = Counter("edgeai_reuse_hits_total", "Requests answered from the cache.")
        self.reuse_hit_rate = Gauge("edgeai_reuse_hit_rate", "Reuse hits / lookups.")
        self.reuse_entries = Gauge("edgeai_reuse_entries", "Entries in the result-reuse cache.")
        self.labelled = Counter("edgeai_labelled_requests_total", "Rows that carried a label.")
        self.labelled_correct = Counter(
            "edgeai_labelled_correct_total", "Labelled rows whose answer's top-1 was the label."
        )
        self.labelled_accuracy = Gauge(
            "edgeai_labelled_accuracy", "Top-1 accuracy on labelled requests."
        )

    def render(self) -> str:
        lines: list[str] = []
        for metric in vars(self).values():
            if isinstance(metric, _Metric):
                lines += metric.render()
        return "\n".join(lines) + "\n"
