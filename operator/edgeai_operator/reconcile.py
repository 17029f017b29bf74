"""One reconcile pass of a DNNDeployment: observe, decide (decide.py), act (writer.py).

Called by the deployment's daemon (handlers/deployments.py) whenever the spec, the
model, a node or a child changes, and every few seconds otherwise. Observing reads
the watch cache (no API request in the steady state) and scrapes the stage pods'
/metrics at most every SCRAPE_INTERVAL_S; deciding is pure; acting writes only what
changed: children whose desired form changed, status when it changed, Events for
decisions that changed (a new split, a moved stage, a scale step).
"""

from __future__ import annotations

import datetime
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from edgeai_operator.autoscaler import Scrape, parse_metrics
from edgeai_operator.builders import BACKBONE_LABEL, WORKER_PORT, Owner
from edgeai_operator.cache import ClusterView
from edgeai_operator.decide import (
    Decision,
    DeploymentState,
    Observed,
    decide,
)
from edgeai_operator.planning import NodeState
from edgeai_operator.stagetls import SecretStore, keep_certificates, stage_certs
from edgeai_operator.trunkplan import Peer, TrunkRecord
from edgeai_operator.writer import ClusterWriter, KubeSecrets, act

Scraper = Callable[[str], str | None]  # pod IP -> its /metrics text, None if unreachable
# Passes woken in a burst (a rollout's status updates) scrape the stages at most this often.
SCRAPE_INTERVAL_S = 2.0
# A pod that did not answer its last scrapes (not serving yet, unreachable) is tried
# again after 2, 4, ... up to this many seconds, not on every pass.
SCRAPE_BACKOFF_MAX_S = 30.0


def read_pod(ip: str, port: int, path: str, timeout_s: float = 1.0) -> bytes | None:
    """GET http://<pod IP>:<port><path>; None when the pod does not answer 200 in time
    (the operator reads its pods' own endpoints this way: stage /metrics, training
    /status and the trained model)."""
    try:
        with urllib.request.urlopen(f"http://{ip}:{port}{path}", timeout=timeout_s) as resp:
            return resp.read()  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return None


def scrape_pod(ip: str) -> str | None:
    """GET http://<pod IP>:8080/metrics, a short timeout: a slow pod is a missing sample."""
    body = read_pod(ip, WORKER_PORT, "/metrics")
    return None if body is None else body.decode()


def observe(
    body: Mapping[str, Any],
    profiles: Sequence[Mapping[str, Any]] | None,
    nodes: Sequence[NodeState],
    state: DeploymentState,
    view: ClusterView,
    *,
    image: str,
    scrape: Scraper,
    now: float,
    node_epoch: int | None,
    peers: Sequence[Peer] = (),
    trunk_records: Mapping[str, TrunkRecord] | None = None,
) -> tuple[Observed, DeploymentState]:
    """What the pass decides from; the state comes back with the scrape bookkeeping."""
    meta = body["metadata"]
    name, namespace = str(meta["name"]), str(meta["namespace"])
    workloads = view.workloads_of(namespace, name)
    pods = view.pods(namespace, "edgeai.dev/deployment", name)
    for shared in sorted({b for w in workloads if (b := _backbone(w))}):
        pods += view.pods(namespace, BACKBONE_LABEL, shared)
    scrapes: dict[str, Scrape] | None = None
    if now - state.last_scrape >= SCRAPE_INTERVAL_S:
        scrapes, backoff = scrape_pods(pods, state.scrape_backoff, scrape, now)
        state = replace(state, last_scrape=now, scrape_backoff=backoff)
    recovering = not state.applied_digest and bool(body.get("status"))
    observed = Observed(
        body=body,
        profiles=profiles,
        nodes=nodes,
        image=image,
        now=now,
        workloads={(str(w["kind"]), str(w["metadata"]["name"])): w for w in workloads},
        pods=pods,
        scrapes=scrapes,
        node_epoch=node_epoch,
        owned=frozenset(view.owned_children(namespace, name)) if recovering else None,
        shares_in_use=frozenset(view.shared_children_of(namespace, str(meta.get("uid"))))
        if state.list_shares
        else None,
        peers=peers,
        trunk_records=trunk_records or {},
    )
    return observed, state


def _backbone(workload: Mapping[str, Any]) -> str | None:
    return ((workload.get("metadata") or {}).get("labels") or {}).get(BACKBONE_LABEL)


def scrape_pods(
    pods: Sequence[Mapping[str, Any]],
    backoff: Mapping[tuple[str, str], tuple[int, float]],
    scrape: Scraper,
    now: float,
) -> tuple[dict[str, Scrape], dict[tuple[str, str], tuple[int, float]]]:
    """Each Running pod's parsed /metrics (pod name -> Scrape) and the new back-off:
    a pod that does not answer is tried again after 2, 4, ... SCRAPE_BACKOFF_MAX_S s."""
    out: dict[str, Scrape] = {}
    live: dict[tuple[str, str], tuple[int, float]] = {}
    for pod in pods:
        meta, status = pod["metadata"], pod.get("status") or {}
        ip = status.get("podIP")
        if meta.get("deletionTimestamp") or status.get("phase") != "Running" or not ip:
            continue
        key = (str(meta["name"]), str(ip))
        failures, retry_at = backoff.get(key, (0, now))
        if now < retry_at:
            live[key] = (failures, retry_at)
            continue
        text = scrape(str(ip))
        if text is None:
            live[key] = (failures + 1, now + min(SCRAPE_BACKOFF_MAX_S, 2.0 ** (failures + 1)))
            continue
        out[key[0]] = parse_metrics(text)
    return out, live


def reconcile(
    body: Mapping[str, Any],
    profiles: Sequence[Mapping[str, Any]] | None,
    nodes: Sequence[NodeState],
    state: DeploymentState,
    writer: ClusterWriter,
    view: ClusterView,
    *,
    image: str,
    scrape: Scraper = scrape_pod,
    now: Callable[[], float] = time.monotonic,
    node_epoch: int | None = None,
    secrets: SecretStore | None = None,
    peers: Sequence[Peer] = (),
    trunk_records: Mapping[str, TrunkRecord] | None = None,
) -> Decision:
    """One pass: observe, decide, act. Returns the decision; its `state` is what the
    next pass starts from (the caller keeps it only once the pass has acted)."""
    observed, state = observe(
        body,
        profiles,
        nodes,
        state,
        view,
        image=image,
        scrape=scrape,
        now=now(),
        node_epoch=node_epoch,
        peers=peers,
        trunk_records=trunk_records,
    )
    decision = decide(observed, state)
    meta = body["metadata"]
    owner = Owner(name=meta["name"], namespace=meta["namespace"], uid=str(meta.get("uid")))
    # the certificates first: the stage pods mount them
    _keep_certificates(
        decision, owner, secrets or KubeSecrets(), datetime.datetime.now(datetime.UTC)
    )
    act(decision, writer, view, owner)
    return decision


def _keep_certificates(
    decision: Decision, owner: Owner, store: SecretStore, now: datetime.datetime
) -> None:
    """Issues the stage certificates the children about to be applied mount, and renews
    them when due; a pass that applies nothing before then touches no Secret."""
    state = decision.state
    applied = [a.obj for a in decision.applies]
    if applied:
        stages = stage_certs(owner, applied)
    elif state.tls_recheck is not None and now >= state.tls_recheck:
        stages = state.tls_stages
    else:
        return
    state.tls_recheck = keep_certificates(owner, stages, store, now)
    state.tls_stages = stages
