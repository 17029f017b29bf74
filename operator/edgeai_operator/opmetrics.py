"""The operator's own /metrics (Prometheus text): reconcile passes, their duration,
failures, applied objects, scale decisions and deployments managed.

One `OperatorMetrics` per operator process, kept in its `OperatorContext`; passes run
in threads, so every update takes the lock.
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter

from aiohttp import web

_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_HELP = {
    "edgeai_operator_reconciles_total": "DNNDeployment reconcile passes.",
    "edgeai_operator_reconcile_errors_total": "Reconcile passes that raised.",
    "edgeai_operator_applies_total": "Child objects server-side applied.",
    "edgeai_operator_scale_events_total": "Autoscaler replica changes.",
    "edgeai_operator_models_profiled_total": "DNNModel profiles computed.",
}


class OperatorMetrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: Counter[str] = Counter()
        self._hist = [0] * (len(_BUCKETS_S) + 1)
        self._hist_sum = 0.0
        self._deployments = 0

    def inc(self, name: str, value: int = 1) -> None:
        if name not in _HELP:
            raise ValueError(f"unknown counter {name!r}; known: {', '.join(_HELP)}")
        with self._lock:
            self._counters[name] += value

    def observe_reconcile(self, seconds: float) -> None:
        with self._lock:
            self._hist[bisect.bisect_left(_BUCKETS_S, seconds)] += 1
            self._hist_sum += seconds

    def deployment_started(self) -> None:
        with self._lock:
            self._deployments += 1

    def deployment_stopped(self) -> None:
        with self._lock:
            self._deployments -= 1

    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            for name, help_text in _HELP.items():
                lines += [
                    f"# HELP {name} {help_text}",
                    f"# TYPE {name} counter",
                    f"{name} {self._counters[name]:g}",
                ]
            lines += [
                "# HELP edgeai_operator_deployments DNNDeployments with a running daemon.",
                "# TYPE edgeai_operator_deployments gauge",
                f"edgeai_operator_deployments {self._deployments}",
            ]
            name = "edgeai_operator_reconcile_seconds"
            lines += [f"# HELP {name} Duration of one reconcile pass.", f"# TYPE {name} histogram"]
            running = 0
            for bound, count in zip(_BUCKETS_S, self._hist, strict=False):
                running += count
                lines.append(f'{name}_bucket{{le="{bound}"}} {running}')
            running += self._hist[-1]
            lines += [
                f'{name}_bucket{{le="+Inf"}} {running}',
                f"{name}_sum {self._hist_sum:g}",
                f"{name}_count {running}",
            ]
        return "\n".join(lines) + "\n"


async def start_server(port: int, metrics: OperatorMetrics) -> web.AppRunner:
    async def serve(_: web.Request) -> web.Response:
        return web.Response(text=metrics.render(), content_type="text/plain", charset="utf-8")

    app = web.Application()
    app.router.add_get("/metrics", serve)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", port).start()
    return runner
