"""DNNDeployment: one daemon per object runs reconcile passes (reconcile.py) when the
spec, its model or a node changes, and every RESYNC_S seconds otherwise."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from typing import Any

import kopf

from edgeai_operator import API_GROUP, API_VERSION, opmetrics
from edgeai_operator.builders import DEFAULT_IMAGE
from edgeai_operator.handlers import nodes, wakeups
from edgeai_operator.handlers.nodes import all_nodes
from edgeai_operator.handlers.workloads import CACHE
from edgeai_operator.planning import NodeState
from edgeai_operator.reconcile import DeploymentState, reconcile

RESYNC_S = float(os.environ.get("EDGEAI_RESYNC_SECONDS", "10"))
# A wake-up waits this long for the rest of its burst (a rollout's status updates, a
# node change waking every daemon), so one pass answers them all.
DEBOUNCE_S = float(os.environ.get("EDGEAI_DEBOUNCE_SECONDS", "0.5"))


_generations: dict[tuple[str, str], Any] = {}


@kopf.on.event(API_GROUP, API_VERSION, "dnndeployments")
async def spec_changed(
    type: str | None, name: str, namespace: str | None, meta: kopf.Meta, **_: Any
) -> None:
    """A new generation (a spec change) wakes the daemon. An event handler, not an
    update handler: it keeps no last-handled state in the object, so kopf writes
    nothing to a DNNDeployment but its finalizer."""
    key = (namespace or "", name)
    if type == "DELETED":
        _generations.pop(key, None)
        return
    generation = meta.get("generation")
    if _generations.get(key) != generation:
        _generations[key] = generation
        wakeups.wake(*key)


@kopf.daemon(API_GROUP, API_VERSION, "dnndeployments", cancellation_timeout=10)
async def run_deployment(
    name: str,
    namespace: str | None,
    body: kopf.Body,
    stopped: kopf.DaemonStopped,
    logger: kopf.Logger,
    **kwargs: Any,
) -> None:
    # kopf passes each index as a keyword named after its function.
    node_index: kopf.Index[str, NodeState] = kwargs["node_index"]
    model_index: kopf.Index[tuple[str, str], list[dict[str, Any]]] = kwargs["model_index"]
    namespace = namespace or "default"  # DNNDeployment is namespaced
    state = DeploymentState()
    wake = wakeups.event_for(namespace, name)
    image = os.environ.get("EDGEAI_WORKER_IMAGE", DEFAULT_IMAGE)
    opmetrics.deployments += 1
    try:
        while not stopped:
            wake.clear()
            snapshot = {
                "apiVersion": body.get("apiVersion"),
                "kind": body.get("kind"),
                "metadata": dict(body.get("metadata", {})),
                "spec": dict(body.get("spec", {})),
                "status": dict(body.get("status", {})),
            }
            spec: dict[str, Any] = snapshot["spec"] or {}
            model = str((spec.get("modelRef") or {}).get("name", ""))
            wakeups.track_model(namespace, name, model)
            store = model_index.get((namespace, model))
            profiles = next(iter(store), None) if store is not None else None
            events: list[tuple[str, str, str]] = []

            def emit(type_: str, reason: str, message: str, sink: list[Any] = events) -> None:
                sink.append((type_, reason, message))

            started = time.monotonic()
            try:
                await asyncio.to_thread(
                    reconcile,
                    snapshot,
                    profiles,
                    all_nodes(node_index),
                    state,
                    emit,
                    image=image,
                    view=CACHE,
                    node_epoch=nodes.epoch(),
                )
            except Exception as exc:  # keep the daemon alive; the next pass retries
                opmetrics.inc("edgeai_operator_reconcile_errors_total")
                logger.exception(f"reconcile of {namespace}/{name} failed: {exc}")
                events.append(("Warning", "ReconcileFailed", str(exc)[:1000]))
            opmetrics.inc("edgeai_operator_reconciles_total")
            opmetrics.observe_reconcile(time.monotonic() - started)
            for type_, reason, message in events:
                kopf.event(body, type=type_, reason=reason, message=message)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout=RESYNC_S)
                await asyncio.sleep(DEBOUNCE_S)
    finally:
        opmetrics.deployments -= 1
        wakeups.forget(namespace, name)
