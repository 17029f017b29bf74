"""Acting on a decision: the one place a reconcile pass writes to the cluster.

`ClusterWriter` is what a pass writes through (apply, delete, release a share,
patch status, emit an Event); `KubeWriter` is the API-server one the operator uses.
`act` carries out a `Decision` in a fixed order: applies first (the PriorityClass
before the stages that name it), then the deletions and releases `decide` allowed,
then status, then the Events.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from edgeai_operator import k8s
from edgeai_operator.builders import Owner
from edgeai_operator.cache import ClusterView
from edgeai_operator.decide import ChildKey, Decision, Event

EventSink = Callable[[Event], None]


class ClusterWriter(Protocol):
    def apply(self, obj: Mapping[str, Any], field_manager: str | None) -> dict[str, Any]: ...

    def delete(self, key: ChildKey, namespace: str) -> None: ...

    def release(self, key: ChildKey, namespace: str, owner: Owner) -> None: ...

    def patch_status(self, namespace: str, name: str, patch: Mapping[str, Any]) -> None: ...

    def emit(self, event: Event) -> None: ...


class KubeWriter:
    """Writes through the API server (k8s.py); Events go to `sink` (the daemon posts
    them with kopf, which knows the object they are about)."""

    def __init__(self, sink: EventSink) -> None:
        self._sink = sink

    def apply(self, obj: Mapping[str, Any], field_manager: str | None) -> dict[str, Any]:
        return k8s.apply(dict(obj), field_manager=field_manager or k8s.FIELD_MANAGER)

    def delete(self, key: ChildKey, namespace: str) -> None:
        k8s.delete(key[0], key[1], key[2], namespace)

    def release(self, key: ChildKey, namespace: str, owner: Owner) -> None:
        k8s.release_shared(key[0], key[1], key[2], namespace, owner)

    def patch_status(self, namespace: str, name: str, patch: Mapping[str, Any]) -> None:
        k8s.patch_status("dnndeployments", namespace, name, dict(patch))

    def emit(self, event: Event) -> None:
        self._sink(event)


def act(decision: Decision, writer: ClusterWriter, view: ClusterView, owner: Owner) -> None:
    """Carries out `decision`; what an apply returns is remembered by the view (a
    newer generation than the watch may have delivered yet)."""
    for item in decision.applies:
        view.remember(writer.apply(item.obj, item.field_manager))
    for key in decision.deletes:
        writer.delete(key, owner.namespace)
    for release in decision.releases:
        writer.release(release.key, owner.namespace, owner)
    if decision.status_patch is not None:
        writer.patch_status(owner.namespace, owner.name, decision.status_patch)
    for event in decision.events:
        writer.emit(event)


class KubeSecrets:
    """The stage certificates' Secrets, read and applied through the API server."""

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        return k8s.get("v1", "Secret", name, namespace)

    def apply(self, obj: dict[str, Any]) -> None:
        k8s.apply(obj)
