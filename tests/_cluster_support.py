"""Small helpers shared by the tests that talk to the real control plane."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import yaml

from edgeai_operator.localcluster import LocalCluster


def wait_for(what: str, check: Callable[[], Any], timeout_s: float = 90) -> Any:
    """Polls `check` until it returns something truthy, and returns that."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what} (last: {last!r})")


def get(cluster: LocalCluster, *args: str) -> Any:
    """`kubectl get ARGS -o json`, parsed; None when the object does not exist."""
    out = cluster.kubectl("get", *args, "-o", "json", check=False)
    return json.loads(out) if out else None


def condition(obj: Any, type_: str) -> dict[str, Any]:
    conds = (obj or {}).get("status", {}).get("conditions", [])
    return next((c for c in conds if c["type"] == type_), {})


def apply(cluster: LocalCluster, *docs: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-f", "-", input_text=yaml.safe_dump_all(docs))
