"""`metav1.Condition`-shaped status conditions, set idempotently.

A condition's `lastTransitionTime` only moves when its status changes, so repeated
reconciles of an unchanged object write identical status.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from typing import Any

DEPLOYMENT_CONDITIONS = ("Planned", "Available", "SLOMet", "Degraded", "Progressing")


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(
    conditions: Sequence[Mapping[str, Any]],
    type_: str,
    status: bool | None,
    reason: str,
    message: str,
    generation: int | None,
    *,
    now: str | None = None,
) -> list[dict[str, Any]]:
    """A new list with `type_` set; `status=None` means Unknown."""
    text = "Unknown" if status is None else ("True" if status else "False")
    out: list[dict[str, Any]] = []
    found = False
    for cond in conditions:
        if cond.get("type") != type_:
            out.append(dict(cond))
            continue
        found = True
        moved = cond.get("status") != text
        out.append(
            {
                "type": type_,
                "status": text,
                "reason": reason,
                "message": message,
                "observedGeneration": generation,
                "lastTransitionTime": (now or now_rfc3339())
                if moved
                else cond.get("lastTransitionTime", now or now_rfc3339()),
            }
        )
    if not found:
        out.append(
            {
                "type": type_,
                "status": text,
                "reason": reason,
                "message": message,
                "observedGeneration": generation,
                "lastTransitionTime": now or now_rfc3339(),
            }
        )
    return out


def condition(conditions: Sequence[Mapping[str, Any]], type_: str) -> Mapping[str, Any] | None:
    return next((c for c in conditions if c.get("type") == type_), None)


def is_true(conditions: Sequence[Mapping[str, Any]], type_: str) -> bool:
    cond = condition(conditions, type_)
    return cond is not None and cond.get("status") == "True"
