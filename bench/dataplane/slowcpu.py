"""Runs a Python program as it would run on a device whose CPU computes onnxruntime
`factor` times slower than this host (needs nothing but onnxruntime).

    python slowcpu.py FACTOR -m MODULE [ARGS...]
    python slowcpu.py FACTOR SCRIPT [ARGS...]

Every `InferenceSession.run` in the program takes `factor` times the CPU time the
calling thread spent in it: after the run, the thread sleeps until that much time has
passed since the run began. With one intra-op thread onnxruntime computes in the
calling thread, so that is the run's whole compute; the bench gives its device tier one
thread. The device's compute then neither takes CPU from the edge and cloud tiers it
shares this host with (a real device has its own) nor meets the bursts of a CFS quota
(cgroup v1 `cpu.cfs_quota_us` lets a group that was idle run past its quota, so a
quota-limited stage computes faster when served than when profiled back to back; see
docs/dataplane.md). Everything else in the program (HTTP, encoding) runs at host speed.
"""

from __future__ import annotations

import runpy
import sys
import time
from typing import Any

import onnxruntime as ort


def slow_down(factor: float) -> None:
    """Make every onnxruntime run in this process take `factor` x its CPU time."""
    if not factor >= 1.0:
        raise SystemExit(f"slowcpu: FACTOR must be a number >= 1, got {factor}")
    original = ort.InferenceSession.run

    def run(self: ort.InferenceSession, *args: Any, **kwargs: Any) -> Any:
        started, cpu = time.perf_counter(), time.thread_time()
        result = original(self, *args, **kwargs)
        spent = time.thread_time() - cpu
        time.sleep(max(0.0, started + factor * spent - time.perf_counter()))
        return result

    ort.InferenceSession.run = run  # type: ignore[method-assign]


def main(argv: list[str]) -> None:
    if len(argv) < 2 or (argv[1] == "-m" and len(argv) < 3):
        raise SystemExit(__doc__)
    try:
        factor = float(argv[0])
    except ValueError:
        raise SystemExit(f"slowcpu: FACTOR must be a number >= 1, got {argv[0]!r}") from None
    slow_down(factor)
    if argv[1] == "-m":
        sys.argv = [argv[2], *argv[3:]]
        runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
    else:
        sys.argv = argv[1:]
        runpy.run_path(argv[1], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
