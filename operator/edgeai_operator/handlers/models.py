"""DNNModel: profile the graph and variants, publish per-tier estimates in status."""

from __future__ import annotations

import asyncio
from typing import Any

import kopf

from edgeai_operator import API_GROUP, API_VERSION, opmetrics
from edgeai_operator.conditions import set_condition
from edgeai_operator.errors import SpecError
from edgeai_operator.handlers import wakeups
from edgeai_operator.handlers.nodes import all_nodes
from edgeai_operator.planning import NodeState
from edgeai_operator.profiling import model_status


@kopf.on.resume(API_GROUP, API_VERSION, "dnnmodels")
@kopf.on.create(API_GROUP, API_VERSION, "dnnmodels")
@kopf.on.update(API_GROUP, API_VERSION, "dnnmodels", field="spec")
async def profile_model(
    spec: kopf.Spec,
    status: kopf.Status,
    meta: kopf.Meta,
    name: str,
    namespace: str | None,
    patch: kopf.Patch,
    body: kopf.Body,
    logger: kopf.Logger,
    **kwargs: Any,
) -> None:
    node_index: kopf.Index[str, NodeState] = kwargs["node_index"]
    generation = meta.get("generation")
    namespace = namespace or "default"
    if status.get("observedGeneration") == generation and status.get("profiles"):
        return  # resumed with an up-to-date profile
    nodes = [n.spec for n in all_nodes(node_index)]
    conditions = list(status.get("conditions") or [])
    try:
        result = await asyncio.to_thread(model_status, dict(spec), nodes)
    except SpecError as exc:
        patch.status["conditions"] = set_condition(
            conditions, "Profiled", False, "InvalidSpec", str(exc), generation
        )
        patch.status["observedGeneration"] = generation
        raise kopf.PermanentError(str(exc)) from exc
    tiers = ", ".join(f"{t} {v['totalMs']:.2f} ms" for t, v in result["tiers"].items())
    message = f"{result['cuts']} cuts, {result['flops'] / 1e6:.1f} MFLOPs; {tiers}"
    opmetrics.inc("edgeai_operator_models_profiled_total")
    patch.status.update(result)
    patch.status["observedGeneration"] = generation
    patch.status["conditions"] = set_condition(
        conditions, "Profiled", True, "AnalyticEstimate", message, generation
    )
    logger.info(f"profiled {name}: {message}")
    kopf.info(body, reason="Profiled", message=message)


@kopf.index(API_GROUP, API_VERSION, "dnnmodels")
def model_index(
    name: str, namespace: str | None, status: kopf.Status, **_: Any
) -> dict[tuple[str, str], list[dict[str, Any]]] | None:
    profiles = status.get("profiles")
    if not profiles or namespace is None:
        return None
    # The index sees the profile land: deployments waiting for it can plan now.
    wakeups.wake_model_users(namespace, name)
    return {(namespace, name): [dict(p) for p in profiles]}
