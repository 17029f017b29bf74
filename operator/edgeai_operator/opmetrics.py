"""The operator's own /metrics (Prometheus text): reconcile passes, their duration,
failures, applied objects, scale decisions and deployments managed."""

from __future__ import annotations

import bisect
import threading
from collections import Counter

from aiohttp import web

_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_lock = threading.Lock()
_counters: Counter[str] = Counter()
_hist = [0] * (len(_BUCKETS_S) + 1)
_hist_sum = 0.0
deployments = 0


def inc(name: str, value: float = 1.0) -> None:
    with _lock:
        _counters[name] += value  # type: ignore[assignment]


def observe_reconcile(seconds: float) -> None:
    global _hist_sum
    with _lock:
        _hist[bisect.bisect_left(_BUCKETS_S, seconds)] += 1
        _hist_sum += seconds


_HELP = {
    "edgeai_operator_reconciles_total": "DNNDeployment reconcile passes.",
    "edgeai_operator_reconcile_errors_total": "Reconcile passes that raised.",
    "edgeai_operator_applies_total": "Child objects server-side applied.",
    "edgeai_operator_scale_events_total": "Autoscaler replica changes.",
    "edgeai_operator_models_profiled_total": "DNNModel profiles computed.",
}


def render() -> str:
    lines: list[str] = []
    with _lock:
        for name, help_text in _HELP.items():
            lines += [
                f"# HELP {name} {help_text}",
                f"# TYPE {name} counter",
                f"{name} {_counters[name]:g}",
            ]
        lines += [
            "# HELP edgeai_operator_deployments DNNDeployments with a running daemon.",
            "# TYPE edgeai_operator_deployments gauge",
            f"edgeai_operator_deployments {deployments}",
        ]
        name = "edgeai_operator_reconcile_seconds"
        lines += [f"# HELP {name} Duration of one reconcile pass.", f"# TYPE {name} histogram"]
        running = 0
        for bound, count in zip(_BUCKETS_S, _hist, strict=False):
            running += count
            lines.append(f'{name}_bucket{{le="{bound}"}} {running}')
        running += _hist[-1]
        lines += [
            f'{name}_bucket{{le="+Inf"}} {running}',
            f"{name}_sum {_hist_sum:g}",
            f"{name}_count {running}",
        ]
    return "\n".join(lines) + "\n"


async def start_server(port: int) -> web.AppRunner:
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text=render(), content_type="text/plain", charset="utf-8")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", port).start()
    return runner
