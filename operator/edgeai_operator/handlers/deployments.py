"""DNNDeployment: one daemon per object runs reconcile passes (reconcile.py) when the
spec, its model or a node changes, and every `resync_s` seconds otherwise."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import kopf

from edgeai_operator import API_GROUP, API_VERSION, k8s
from edgeai_operator.context import OperatorContext, context_of
from edgeai_operator.decide import DeploymentState, Event, released_priority_class
from edgeai_operator.deployspec import parse_deployment
from edgeai_operator.errors import SpecError
from edgeai_operator.handlers.nodes import all_nodes
from edgeai_operator.planning import NodeState
from edgeai_operator.reconcile import reconcile
from edgeai_operator.trunkplan import Peer, TrunkRecord, peer_of
from edgeai_operator.writer import KubeWriter

# how long the PriorityClass release waits for a pass in flight before kopf retries it
PASS_WAIT_S = 60.0


@kopf.on.event(API_GROUP, API_VERSION, "dnndeployments")
async def spec_changed(
    type: str | None,
    name: str,
    namespace: str | None,
    meta: kopf.Meta,
    body: kopf.Body,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    """A new generation (a spec change) wakes the daemon. An event handler, not an
    update handler: it keeps no last-handled state in the object, so kopf writes
    nothing to a DNNDeployment but its finalizer. Every event also updates the
    deployment's trunk peer entry (a change wakes the namespace's peers)."""
    ctx = context_of(memo)
    key = (namespace or "", name)
    if type == "DELETED":
        ctx.generations.pop(key, None)
        ctx.set_peer(*key, None)
        return
    ctx.set_peer(*key, _peer(body))
    generation = meta.get("generation")
    if ctx.generations.get(key) != generation:
        ctx.generations[key] = generation
        ctx.wakeups.wake(*key)


def _peer(body: kopf.Body) -> Peer | None:
    """The deployment as a trunk peer (trunkplan.py); None for a spec that is invalid
    or cannot share a trunk, and once it is being deleted."""
    meta = body.get("metadata", {})
    try:
        spec = parse_deployment(_snapshot(body))
    except SpecError:
        return None
    return peer_of(spec, str(meta.get("uid")), bool(meta.get("deletionTimestamp")))


def _priority(body: kopf.Body) -> int:
    value = body.get("spec", {}).get("priority") or 0
    return value if isinstance(value, int) else 0


@kopf.index(API_GROUP, API_VERSION, "dnndeployments")
def priority_users(
    name: str, namespace: str | None, body: kopf.Body, **_: Any
) -> dict[int, tuple[str, str]] | None:
    """The deployments of each spec.priority, so that the last one to go takes the
    shared PriorityClass with it."""
    priority = _priority(body)
    return {priority: (namespace or "default", name)} if priority > 0 else None


def _live(key: tuple[str, str]) -> bool:
    """Whether the deployment exists and is not being deleted. Asked of the API server:
    deployments deleted together are all still indexed when their daemons stop."""
    obj = k8s.get(f"{API_GROUP}/{API_VERSION}", "DNNDeployment", key[1], key[0])
    return obj is not None and not obj["metadata"].get("deletionTimestamp")


async def _release_priority_class(
    key: tuple[str, str], priority: int, users: Any, logger: kopf.Logger
) -> None:
    others = [user for user in users.get(priority, ()) if user != key]
    live = [user for user in others if await asyncio.to_thread(_live, user)]
    released = released_priority_class(key, priority, live)
    if released is None:
        return
    if await asyncio.to_thread(k8s.delete, "scheduling.k8s.io/v1", "PriorityClass", released, None):
        logger.info(f"deleted PriorityClass {released}: no DNNDeployment uses it")


def _snapshot(body: kopf.Body) -> dict[str, Any]:
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": dict(body.get("metadata", {})),
        "spec": dict(body.get("spec", {})),
        "status": dict(body.get("status", {})),
    }


async def _pass(
    ctx: OperatorContext,
    body: kopf.Body,
    state: DeploymentState,
    profiles: list[dict[str, Any]] | None,
    nodes: list[NodeState],
    logger: kopf.Logger,
    trunk_records: dict[str, TrunkRecord],
) -> DeploymentState:
    """One reconcile pass in a thread; its Events are posted here (kopf knows the
    object). A pass that raised keeps the old state: the next pass retries."""
    events: list[Event] = []
    started = time.monotonic()
    try:
        decision = await asyncio.to_thread(
            reconcile,
            _snapshot(body),
            profiles,
            nodes,
            state,
            KubeWriter(events.append),
            ctx.cache,
            image=ctx.settings.worker_image,
            node_epoch=ctx.nodes.epoch,
            peers=sorted(ctx.peers.get(str(body["metadata"]["namespace"]), {}).values(), key=str),
            trunk_records=trunk_records,
        )
        state = decision.state
        ctx.metrics.inc("edgeai_operator_applies_total", len(decision.applies))
        ctx.metrics.inc("edgeai_operator_scale_events_total", len(decision.scales))
    except Exception as exc:  # keep the daemon alive
        ctx.metrics.inc("edgeai_operator_reconcile_errors_total")
        logger.exception(f"reconcile failed: {exc}")
        events.append(Event("Warning", "ReconcileFailed", str(exc)[:1000]))
    ctx.metrics.inc("edgeai_operator_reconciles_total")
    ctx.metrics.observe_reconcile(time.monotonic() - started)
    for event in events:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)
    return state


async def _woken(wake: asyncio.Event, stopped: kopf.DaemonStopped, timeout_s: float) -> bool:
    """Waits for a wake-up, a stop or the timeout; True on a wake-up. Waiting on the
    stop too lets a deleted deployment's daemon end at once instead of being cancelled."""
    waits = {
        asyncio.ensure_future(wake.wait()),
        asyncio.ensure_future(stopped.wait()),
    }
    try:
        await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiting in waits:
            waiting.cancel()
    return wake.is_set() and not stopped


@kopf.daemon(API_GROUP, API_VERSION, "dnndeployments", cancellation_timeout=10)
async def run_deployment(
    name: str,
    namespace: str | None,
    body: kopf.Body,
    stopped: kopf.DaemonStopped,
    logger: kopf.Logger,
    memo: kopf.Memo,
    **kwargs: Any,
) -> None:
    # kopf passes each index as a keyword named after its function.
    node_index: kopf.Index[str, NodeState] = kwargs["node_index"]
    model_index: kopf.Index[tuple[str, str], list[dict[str, Any]]] = kwargs["model_index"]
    model_trunks: kopf.Index[tuple[str, str], TrunkRecord] = kwargs["model_trunks"]
    ctx = context_of(memo)
    namespace = namespace or "default"  # DNNDeployment is namespaced
    state = DeploymentState()
    wake = ctx.wakeups.event_for(namespace, name)
    ctx.metrics.deployment_started()
    running: asyncio.Task[DeploymentState] | None = None
    try:
        while not stopped:
            wake.clear()
            model = str((body.get("spec", {}).get("modelRef") or {}).get("name", ""))
            ctx.wakeups.track_model(namespace, name, model)
            store = model_index.get((namespace, model))
            profiles = next(iter(store), None) if store is not None else None
            nodes = all_nodes(memo, node_index)
            records = {
                key[1]: record
                for key, found in model_trunks.items()
                if key[0] == namespace
                for record in found
            }
            # Shielded: a stop cannot interrupt a pass's thread, which would go on
            # applying children (the PriorityClass among them) after the release by
            # release_priority_class, which awaits the pass registered here.
            running = asyncio.ensure_future(
                _pass(ctx, body, state, profiles, nodes, logger, records)
            )
            ctx.passes[(namespace, name)] = running
            state = await asyncio.shield(running)
            if await _woken(wake, stopped, ctx.settings.resync_s):
                await asyncio.sleep(ctx.settings.debounce_s)
    finally:
        ctx.metrics.deployment_stopped()
        ctx.wakeups.forget(namespace, name)
        if running is not None and not running.done():
            await asyncio.wait({running})
        if ctx.passes.get((namespace, name)) is running:
            del ctx.passes[(namespace, name)]


@kopf.on.delete(API_GROUP, API_VERSION, "dnndeployments", backoff=2, retries=10)
async def release_priority_class(
    name: str,
    namespace: str | None,
    body: kopf.Body,
    logger: kopf.Logger,
    memo: kopf.Memo,
    **kwargs: Any,
) -> None:
    """Deletes the deployment's PriorityClass when no other live deployment uses it.
    A handler of its own, retried by kopf, not the daemon's exit: a daemon stopped by
    a peering pause is not running when the deployment is deleted. kopf signals the
    daemon to stop before this runs; its pass in flight (which may apply the class)
    is awaited first."""
    key = (namespace or "default", name)
    running = context_of(memo).passes.get(key)
    if running is not None and not running.done():
        done, _ = await asyncio.wait({running}, timeout=PASS_WAIT_S)
        if not done:
            raise kopf.TemporaryError(
                f"a reconcile pass of {key[0]}/{key[1]} is still running after "
                f"{PASS_WAIT_S:.0f} s; releasing its PriorityClass after it",
                delay=2,
            )
    await _release_priority_class(key, _priority(body), kwargs["priority_users"], logger)
