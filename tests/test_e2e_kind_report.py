"""What bench/render_numbers.py shows of hack/kind/e2e.py's report: each step's numbers,
and a failed or missing step as a failure with its error, never as a number."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from _bench_modules import load_script

ROOT = Path(__file__).resolve().parent.parent
rn = load_script(ROOT / "bench" / "render_numbers.py", "render_numbers_e2e")

REPORT: dict[str, Any] = {
    "date": "2026-12-02T12:00:00Z",
    "command": "make e2e-kind",
    "host": {"cpus": 2},
    "conditions": "quiet",
    "loadAverageAtStart": 1.5,
    "elapsedS": 600.0,
    "failures": ["edgeStop"],
    "steps": {
        "build": {
            "ok": True,
            "coldBuild": {"host": 32.6, "images": 282.8, "nodeImage": 907.9},
            "stepSeconds": {
                "host": 0.4,
                "images": 1.2,
                "nodeImage": 2.0,
                "up": 150.0,
                "kindLoad": 101.0,
            },
            "imageSizeBytes": {"edgeai-worker:0.1.0": 394_000_000},
        },
        "links": {
            "ok": True,
            "links": [
                {
                    "node": "w1",
                    "tier": "device",
                    "mbps": 10.0,
                    "tcRateMbps": 10.0,
                    "measuredMbps": 9.7,
                }
            ],
        },
        "helmInstall": {
            "ok": True,
            "podsReadyS": 21.3,
            "operatorPods": 2,
            "serviceAccount": "edgeai-operator",
            "canDoEverything": "no",
        },
        "edgeStop": {"ok": False, "error": "TimeoutError: requests served again: not within 300 s"},
    },
}


def test_build_table_has_the_fresh_machine_and_this_runs_times() -> None:
    text = rn.e2e_kind_build(REPORT)
    assert "| hack/kind/node-image.sh (Go builds, component images, node image) | 908 | 2 |" in text
    assert "| kind create cluster (6 nodes) | - | - |" in text
    assert "`edgeai-worker:0.1.0` 394 MB" in text


def test_results_show_numbers_of_passed_steps_and_errors_of_failed_or_missing_ones() -> None:
    text = rn.e2e_kind_results(REPORT)
    assert "Failed steps: edgeStop." in text
    assert "device w1: 10 -> 10 -> 9.7" in text
    assert "21.3 s (2 pods, ServiceAccount `edgeai-operator`, can-i '*' '*': no)" in text
    assert "failed: TimeoutError: requests served again: not within 300 s" in text
    assert "| inference | not run |" in text
    assert "| kind delete cluster | not run |" in text
