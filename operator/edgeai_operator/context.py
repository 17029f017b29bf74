"""The operator process's state, in one object kept in kopf's `memo`.

`Settings` are read once at start-up from the environment and the `edgeai operator`
flags. `OperatorContext` holds what the handlers share: the settings, the watch
cache of stage workloads and pods, the daemons' wake-up signals, the node
tracker (which node changes matter for placement) and the operator's own metrics.
Handlers reach it through the `memo` kopf passes them (`context_of(memo)`).
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edgeai_operator.builders import DEFAULT_IMAGE
from edgeai_operator.cache import WatchCache
from edgeai_operator.errors import SpecError
from edgeai_operator.opmetrics import OperatorMetrics
from edgeai_operator.planning import NodeState
from edgeai_operator.trainingbuild import DEFAULT_TRAINER_IMAGE
from edgeai_operator.trunkplan import Peer

MEMO_KEY = "edgeai"


def _seconds(environ: Mapping[str, str], name: str, default: float) -> float:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise SpecError(name, f"must be a positive number of seconds, got {raw!r}", "e.g. 10")
    return value


def _artifacts(uri: str | None) -> str | None:
    """EDGEAI_ARTIFACTS_URI checked as spec.artifacts.uri is (the operator refuses to
    start with one no Job could write to)."""
    if uri is not None:
        from edgeai_operator.modelspec import check_artifacts_uri

        check_artifacts_uri(uri, field="EDGEAI_ARTIFACTS_URI")
    return uri


_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def _configmap_name(name: str | None, variable: str) -> str | None:
    if name is not None and (len(name) > 253 or not _DNS_SUBDOMAIN.fullmatch(name)):
        raise SpecError(variable, f"{name!r} is not a ConfigMap name", "a DNS-1123 subdomain")
    return name


@dataclass(frozen=True)
class Settings:
    """How this operator process runs (environment variables, then flags)."""

    worker_image: str = DEFAULT_IMAGE  # EDGEAI_WORKER_IMAGE: stage pods and profiling Jobs
    # EDGEAI_TRAINER_IMAGE: a DNNTrainingJob's aggregator and worker pods
    trainer_image: str = DEFAULT_TRAINER_IMAGE
    resync_s: float = 10.0  # EDGEAI_RESYNC_SECONDS: a daemon's pass when nothing woke it
    debounce_s: float = 0.5  # EDGEAI_DEBOUNCE_SECONDS: a wake-up waits for its burst
    profile_poll_s: float = 5.0  # EDGEAI_PROFILE_POLL_SECONDS: model Jobs are read
    # EDGEAI_ARTIFACTS_URI: where prepared models go when spec.artifacts.uri is unset
    artifacts_uri: str | None = None
    # EDGEAI_CA_BUNDLE_CONFIGMAP: a ConfigMap (in each model's namespace) of extra CAs
    # the preparation Jobs trust for https sources
    ca_bundle_configmap: str | None = None
    metrics_port: int | None = None  # --metrics-port

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, metrics_port: int | None = None
    ) -> Settings:
        env = os.environ if environ is None else environ
        return cls(
            worker_image=env.get("EDGEAI_WORKER_IMAGE") or DEFAULT_IMAGE,
            trainer_image=env.get("EDGEAI_TRAINER_IMAGE") or DEFAULT_TRAINER_IMAGE,
            resync_s=_seconds(env, "EDGEAI_RESYNC_SECONDS", cls.resync_s),
            debounce_s=_seconds(env, "EDGEAI_DEBOUNCE_SECONDS", cls.debounce_s),
            profile_poll_s=_seconds(env, "EDGEAI_PROFILE_POLL_SECONDS", cls.profile_poll_s),
            artifacts_uri=_artifacts(env.get("EDGEAI_ARTIFACTS_URI") or None),
            ca_bundle_configmap=_configmap_name(
                env.get("EDGEAI_CA_BUNDLE_CONFIGMAP") or None, "EDGEAI_CA_BUNDLE_CONFIGMAP"
            ),
            metrics_port=metrics_port,
        )


class Wakeups:
    """Wake-up signals of the per-deployment daemons (spec, model or node changes)."""

    def __init__(self) -> None:
        self._events: dict[tuple[str, str], asyncio.Event] = {}
        # namespace/name of a deployment -> the DNNModel it references
        self._model_of: dict[tuple[str, str], tuple[str, str]] = {}

    def event_for(self, namespace: str, name: str) -> asyncio.Event:
        return self._events.setdefault((namespace, name), asyncio.Event())

    def forget(self, namespace: str, name: str) -> None:
        self._events.pop((namespace, name), None)
        self._model_of.pop((namespace, name), None)

    def track_model(self, namespace: str, name: str, model: str) -> None:
        self._model_of[(namespace, name)] = (namespace, model)

    def wake(self, namespace: str, name: str) -> None:
        event = self._events.get((namespace, name))
        if event is not None:
            event.set()

    def wake_all(self) -> None:
        for event in self._events.values():
            event.set()

    def wake_model_users(self, namespace: str, model: str) -> None:
        for key, ref in self._model_of.items():
            if ref == (namespace, model):
                self.wake(*key)


@dataclass
class NodeTracker:
    """Counts placement-relevant node changes (the epoch): a plan computed at one
    epoch stays valid until the next; heartbeats alone do not move it."""

    epoch: int = 0
    seen: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    listed: tuple[int, list[NodeState]] | None = None

    def changed(self, name: str, fingerprint: tuple[Any, ...] | None) -> bool:
        """Records a node's placement-relevant state (None: deleted); True when it moved."""
        if fingerprint is None:
            self.seen.pop(name, None)
        elif self.seen.get(name) == fingerprint:
            return False
        else:
            self.seen[name] = fingerprint
        self.epoch += 1
        return True

    def nodes(self, stores: Any) -> list[NodeState]:
        """Every indexed node (`stores`: the kopf index's values); one list per epoch."""
        if self.listed is None or self.listed[0] != self.epoch:
            self.listed = (self.epoch, [state for store in stores for state in store])
        return self.listed[1]


@dataclass
class OperatorContext:
    settings: Settings = field(default_factory=Settings)
    cache: WatchCache = field(default_factory=WatchCache)
    wakeups: Wakeups = field(default_factory=Wakeups)
    nodes: NodeTracker = field(default_factory=NodeTracker)
    metrics: OperatorMetrics = field(default_factory=OperatorMetrics)
    # the last generation of each DNNDeployment whose change woke its daemon
    generations: dict[tuple[str, str], Any] = field(default_factory=dict)
    # namespace -> name -> the DNNDeployments that may share a trunk (trunkplan.Peer)
    peers: dict[str, dict[str, Peer]] = field(default_factory=dict)
    # (namespace, name) -> the reconcile pass a DNNDeployment's daemon is running
    passes: dict[tuple[str, str], asyncio.Future[Any]] = field(default_factory=dict)

    def set_peer(self, namespace: str, name: str, peer: Peer | None) -> None:
        """Records a deployment's trunk peer entry (None: it is none, or gone); a change
        wakes the namespace's peers, whose trunk routes and members it may change."""
        known = self.peers.setdefault(namespace, {})
        if known.get(name) == peer:
            return
        woken = set(known)
        if peer is None:
            known.pop(name, None)
        else:
            known[name] = peer
        for other in sorted(woken | set(known)):
            self.wakeups.wake(namespace, other)


def context_of(memo: Any) -> OperatorContext:
    """The context `edgeai operator` put in kopf's memo."""
    ctx = memo.get(MEMO_KEY) if isinstance(memo, Mapping) else None
    if not isinstance(ctx, OperatorContext):
        raise RuntimeError("the operator context is missing from kopf's memo")
    return ctx
