"""The one place that talks to the Kubernetes API (apart from kopf itself).

Children are written with server-side apply under the field manager
`edgeai-operator`, so a reconcile is idempotent: applying the same object twice is a
no-op, and fields other managers own (the autoscaler's replicas, say) are left alone.
"""

from __future__ import annotations

import base64
import functools
import threading
from collections.abc import Iterable
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import NotFoundError

FIELD_MANAGER = "edgeai-operator"
_lock = threading.Lock()


@functools.cache
def _api_client() -> client.ApiClient:
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


@functools.cache
def _dynamic() -> DynamicClient:
    with _lock:
        return DynamicClient(_api_client())


@functools.cache
def _resource(api_version: str, kind: str) -> Any:
    # the discovery search is a scan of every API resource: once per kind is enough
    return _dynamic().resources.get(api_version=api_version, kind=kind)


def apply(obj: dict[str, Any], field_manager: str = FIELD_MANAGER) -> dict[str, Any]:
    """Server-side apply of one object (create or patch). A shared workload is applied
    by each user under its own field manager: the API server then keeps each user's
    ownerReference (a list keyed by uid) and drops it when that user applies without it."""
    meta = obj["metadata"]
    result = _resource(obj["apiVersion"], obj["kind"]).server_side_apply(
        body=obj,
        name=meta["name"],
        namespace=meta.get("namespace"),
        field_manager=field_manager,
        force_conflicts=True,
    )
    out: dict[str, Any] = result.to_dict()
    return out


def get(api_version: str, kind: str, name: str, namespace: str | None) -> dict[str, Any] | None:
    try:
        result = _resource(api_version, kind).get(name=name, namespace=namespace)
    except NotFoundError:
        return None
    out: dict[str, Any] = result.to_dict()
    return out


def list_objects(
    api_version: str, kind: str, namespace: str | None = None, label_selector: str | None = None
) -> list[dict[str, Any]]:
    result = _resource(api_version, kind).get(namespace=namespace, label_selector=label_selector)
    items: list[dict[str, Any]] = result.to_dict().get("items", [])
    return items


def delete(api_version: str, kind: str, name: str, namespace: str | None) -> bool:
    """Deletes with background propagation (the garbage collector removes dependents);
    False when it was already gone."""
    try:
        _resource(api_version, kind).delete(
            name=name, namespace=namespace, body={"propagationPolicy": "Background"}
        )
    except NotFoundError:
        return False
    return True


def owned_children(namespace: str, deployment: str) -> Iterable[tuple[str, str, str]]:
    """(apiVersion, kind, name) of every object labelled as a child of the deployment."""
    selector = f"app.kubernetes.io/managed-by=edgeai-operator,edgeai.dev/deployment={deployment}"
    for api_version, kind in CHILD_KINDS:
        for item in list_objects(api_version, kind, namespace, selector):
            yield api_version, kind, item["metadata"]["name"]


def shared_children_of(namespace: str, uid: str) -> Iterable[tuple[str, str, str]]:
    """(apiVersion, kind, name) of every shared workload object the owner `uid` uses:
    its Deployments, found with one list call, and their namesake Service and ConfigMap."""
    for item in list_objects("apps/v1", "Deployment", namespace, "edgeai.dev/shared=true"):
        meta = item["metadata"]
        refs = meta.get("owner_references") or meta.get("ownerReferences") or []
        if any(ref.get("uid") == uid for ref in refs):
            for api_version, kind in (("apps/v1", "Deployment"), ("v1", "Service")):
                yield api_version, kind, meta["name"]
            yield "v1", "ConfigMap", meta["name"]


def release_shared(api_version: str, kind: str, name: str, namespace: str, owner: Any) -> int:
    """Drops `owner`'s share of a shared workload object; returns how many users keep
    it. The last user deletes it; another applies an empty configuration under its
    field manager, which removes its ownerReference and replica wish (fields the other
    users applied too stay theirs)."""
    obj = get(api_version, kind, name, namespace)
    if obj is None:
        return 0
    meta = obj["metadata"]
    refs = meta.get("owner_references") or meta.get("ownerReferences") or []
    others = [r for r in refs if r.get("uid") != owner.uid]
    if not others:
        delete(api_version, kind, name, namespace)
        return 0
    empty = {
        "apiVersion": api_version,
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace},
    }
    apply(empty, field_manager=owner.field_manager)
    return len(others)


def read_configmap_bytes(namespace: str, name: str, key: str) -> bytes:
    """The bytes of a ConfigMap's binaryData[key]; LookupError names what is missing
    (the ConfigMap, or the key and the keys there are)."""
    core = client.CoreV1Api(_api_client())
    try:
        configmap = core.read_namespaced_config_map(name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            raise LookupError(f"ConfigMap {name} not found") from exc
        raise
    binary = configmap.binary_data or {}
    if key not in binary:
        in_data = " (it is in data, which holds text; binary files go in binaryData)"
        raise LookupError(
            f"ConfigMap {name} has no binaryData key {key!r}"
            f"{in_data if key in (configmap.data or {}) else ''}"
            f" (binaryData keys: {', '.join(sorted(binary)) or 'none'})"
        )
    # the client leaves binaryData base64-encoded, as the API sends it
    return base64.b64decode(binary[key])


CHILD_KINDS = (
    ("apps/v1", "DaemonSet"),
    ("apps/v1", "Deployment"),
    ("v1", "Service"),
    ("v1", "ConfigMap"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
)


__all__ = [
    "CHILD_KINDS",
    "FIELD_MANAGER",
    "ApiException",
    "apply",
    "delete",
    "get",
    "list_objects",
    "owned_children",
    "patch_status",
    "read_configmap_bytes",
    "release_shared",
    "shared_children_of",
]


def patch_status(plural: str, namespace: str, name: str, status: dict[str, Any]) -> None:
    """Merge-patches the status subresource of one of our custom resources."""
    from edgeai_operator import API_GROUP, API_VERSION

    custom = client.CustomObjectsApi(_api_client())
    try:
        custom.patch_namespaced_custom_object_status(
            API_GROUP, API_VERSION, namespace, plural, name, {"status": status}
        )
    except ApiException as exc:
        if exc.status != 404:  # deleted meanwhile: nothing to report on
            raise
