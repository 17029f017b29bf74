"""What a reconcile pass reads about its stages: workloads and their pods.

`WatchCache` (a `ClusterView`) is filled by the operator's watches
(handlers/workloads.py) — the informer pattern:
a pass that only observes costs no API request, which is what lets one operator keep
hundreds of DNNDeployments without loading the control plane it shares with them.
Workloads are found by the DNNDeployments they serve; one the watch has not delivered
yet (just created, say) is not there, and a pass counts it as not available. The two
listings a pass rarely needs (the children of a deployment after an operator
restart, the shared stages it owns) go to the API server (`LiveListings`).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any, Protocol

from edgeai_operator import k8s


class ClusterView(Protocol):
    def pods(self, namespace: str, label: str, value: str) -> list[dict[str, Any]]: ...

    def workloads_of(self, namespace: str, deployment: str) -> list[dict[str, Any]]: ...

    def owned_children(self, namespace: str, deployment: str) -> list[tuple[str, str, str]]: ...

    def shared_children_of(self, namespace: str, uid: str) -> list[tuple[str, str, str]]: ...

    def remember(self, obj: Mapping[str, Any]) -> None: ...


class ChildListings(Protocol):
    def owned_children(self, namespace: str, deployment: str) -> list[tuple[str, str, str]]: ...

    def shared_children_of(self, namespace: str, uid: str) -> list[tuple[str, str, str]]: ...


class LiveListings:
    """The two listings, each an API request."""

    def owned_children(self, namespace: str, deployment: str) -> list[tuple[str, str, str]]:
        return list(k8s.owned_children(namespace, deployment))

    def shared_children_of(self, namespace: str, uid: str) -> list[tuple[str, str, str]]:
        return list(k8s.shared_children_of(namespace, uid))


DEPLOYMENT_LABEL = "edgeai.dev/deployment"
SHARED_LABEL = "edgeai.dev/shared"


def owner_names(body: Mapping[str, Any]) -> set[str]:
    """The DNNDeployments a workload serves: its deployment label, and every
    DNNDeployment among its ownerReferences (a shared stage lists each user)."""
    meta = body.get("metadata") or {}
    refs = meta.get("ownerReferences") or meta.get("owner_references") or []
    names = {str(r.get("name")) for r in refs if r.get("kind") == "DNNDeployment"}
    label = (meta.get("labels") or {}).get(DEPLOYMENT_LABEL)
    if label:
        names.add(str(label))
    return names


def _slim(body: Mapping[str, Any], spec_keys: tuple[str, ...]) -> dict[str, Any]:
    """The parts a pass reads, so the cache holds kilobytes, not pod templates."""
    meta = dict(body.get("metadata") or {})
    if "ownerReferences" not in meta and "owner_references" in meta:
        meta["ownerReferences"] = meta["owner_references"]  # the client's snake_case
    spec = body.get("spec") or {}
    return {
        "apiVersion": body.get("apiVersion") or body.get("api_version"),
        "kind": body.get("kind"),
        "metadata": {
            k: meta.get(k)
            for k in (
                "name",
                "namespace",
                "generation",
                "labels",
                "annotations",
                "ownerReferences",
                "deletionTimestamp",
            )
        },
        "spec": {k: spec.get(k) for k in spec_keys if k in spec},
        "status": dict(body.get("status") or {}),
    }


class WatchCache:
    """Workloads and pods as the watches last delivered them (thread-safe: passes run
    in threads, the watches on the event loop)."""

    def __init__(self, listings: ChildListings | None = None) -> None:
        self._lock = threading.Lock()
        self._workloads: dict[tuple[str, str, str], dict[str, Any]] = {}
        self._pods: dict[tuple[str, str], dict[str, Any]] = {}
        # (namespace, label, value) -> names of the pods carrying it
        self._pods_by_label: dict[tuple[str, str, str], set[str]] = {}
        # (namespace, DNNDeployment) -> (kind, name) of the workloads serving it
        self._workloads_by_owner: dict[tuple[str, str], set[tuple[str, str]]] = {}
        self._listings = listings or LiveListings()

    # -- fed by the watches -------------------------------------------------------
    def put_workload(self, body: Mapping[str, Any]) -> dict[str, Any] | None:
        """Stores the workload; returns what was stored before (None if nothing)."""
        slim = _slim(body, ("replicas",))
        meta = slim["metadata"]
        key = (str(meta["namespace"]), str(slim["kind"]), str(meta["name"]))
        with self._lock:
            old = self._workloads.get(key)
            # A watch event older than what an apply returned must not win.
            if old is not None and _generation(old) > _generation(slim):
                return old
            self._unindex_workload(key)
            self._workloads[key] = slim
            for owner in owner_names(slim):
                self._workloads_by_owner.setdefault((key[0], owner), set()).add(key[1:])
            return old

    def drop_workload(self, namespace: str, kind: str, name: str) -> None:
        with self._lock:
            self._unindex_workload((namespace, kind, name))
            self._workloads.pop((namespace, kind, name), None)

    def _unindex_workload(self, key: tuple[str, str, str]) -> None:
        for owner in owner_names(self._workloads.get(key) or {}):
            keys = self._workloads_by_owner.get((key[0], owner))
            if keys is not None:
                keys.discard(key[1:])
                if not keys:
                    del self._workloads_by_owner[(key[0], owner)]

    def put_pod(self, body: Mapping[str, Any]) -> None:
        slim = _slim(body, ())
        meta = slim["metadata"]
        namespace, name = str(meta["namespace"]), str(meta["name"])
        with self._lock:
            self._unindex_pod(namespace, name)
            self._pods[(namespace, name)] = slim
            for label, value in (meta.get("labels") or {}).items():
                self._pods_by_label.setdefault((namespace, label, value), set()).add(name)

    def drop_pod(self, namespace: str, name: str) -> None:
        with self._lock:
            self._unindex_pod(namespace, name)
            self._pods.pop((namespace, name), None)

    def _unindex_pod(self, namespace: str, name: str) -> None:
        old = self._pods.get((namespace, name))
        for label, value in ((old or {}).get("metadata", {}).get("labels") or {}).items():
            names = self._pods_by_label.get((namespace, label, value))
            if names is not None:
                names.discard(name)
                if not names:
                    del self._pods_by_label[(namespace, label, value)]

    # -- read by the passes -------------------------------------------------------
    def pods(self, namespace: str, label: str, value: str) -> list[dict[str, Any]]:
        with self._lock:
            names = sorted(self._pods_by_label.get((namespace, label, value), ()))
            return [self._pods[(namespace, name)] for name in names]

    def workloads_of(self, namespace: str, deployment: str) -> list[dict[str, Any]]:
        with self._lock:
            keys = sorted(self._workloads_by_owner.get((namespace, deployment), ()))
            return [self._workloads[(namespace, kind, name)] for kind, name in keys]

    def owned_children(self, namespace: str, deployment: str) -> list[tuple[str, str, str]]:
        return self._listings.owned_children(namespace, deployment)

    def shared_children_of(self, namespace: str, uid: str) -> list[tuple[str, str, str]]:
        return self._listings.shared_children_of(namespace, uid)

    def remember(self, obj: Mapping[str, Any]) -> None:
        """Records what an apply returned (a newer generation than the watch may have
        delivered yet)."""
        if obj.get("kind") in ("Deployment", "DaemonSet"):
            self.put_workload(obj)  # nothing to compare with: the watch wakes owners

    def sizes(self) -> tuple[int, int]:
        with self._lock:
            return len(self._workloads), len(self._pods)


def _generation(obj: Mapping[str, Any]) -> int:
    return int((obj.get("metadata") or {}).get("generation") or 0)
