"""Pure builders: a DNNDeployment and its per-zone plans -> the child objects.

Every object the operator creates for a deployment is built here as a plain dict and
unit-tested as a literal (`tests/test_builders.py`); `k8s.apply` writes them. Naming:

- ConfigMap `<name>-plan`: `plan-<zone>.yaml` per zone (the Plan documents workers read)
- DaemonSet `<name>-device-<zone>`: the entry stage on the selected device nodes of a zone
- Deployment + Service `<name>-edge-<zone>`: the edge stage next to those devices
- Deployment + Service `<name>-cloud` (`<name>-cloud-<zone>` when zones' cloud stages
  differ): the cloud stage
- with `spec.sharing: backbone`, an edge stage that ends the plan is a *shared* stage
  instead: ConfigMap + Deployment + Service `<model>-shared-edge-<zone>-<hash>`, where
  the hash covers what the stage pods run (model, variant, the stages up to the edge,
  the adaptive-split alternatives, the PriorityClass); every DNNDeployment with the
  same hash uses the same workload. Each user applies it under its own field manager
  with an ownerReference to itself (`controller: false`) and its wanted replicas in
  the annotation `replicas.edgeai.dev/<deployment>`, so server-side apply merges the
  owner list and the garbage collector deletes the workload with its last user.

A stage a plan leaves empty gets no workload, except the device entry, which then
forwards the raw input (nothing runs on the device). When the plan's model is a
prepared artefact (`model.uri`), each pod that runs layers fetches it first: an init
container `fetch` (`edgeai fetch`, digest-verified) writes it into an emptyDir at
/var/lib/edgeai/model, which the worker reads with `--model-file`, and the artefact's
digest is a pod template annotation, so a new artefact rolls the pods. Edge/cloud
Deployments roll with `maxSurge: 1, maxUnavailable: 0`, so a moved or resized stage is
make-before-break.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import yaml

from edgeai_operator import API_GROUP, API_VERSION, TIER_LABEL, ZONE_LABEL
from edgeai_operator.plandoc import ModelIdentity, PlanDocument, PlanStage
from edgeai_operator.podsecurity import restricted

WORKER_PORT = 8080
# the OIP v2 gRPC endpoint of stage pods whose deployment forwards over gRPC
GRPC_PORT = 8081
MANAGED_BY = {"app.kubernetes.io/managed-by": "edgeai-operator"}
DEFAULT_IMAGE = "edgeai-worker:0.1.0"
# Where a stage pod's init container puts the planned artefact, and under what name.
MODEL_DIR = "/var/lib/edgeai/model"
MODEL_FILE_NAME = "model.onnx"
# The labelled rows a user's model's reusing stage calibrates on, beside the model.
REUSE_DATA_FILE = "reuse-data.npz"
# Where the init container mounts the claim of a pvc:// artefact (edgeai fetch --pvc-root).
PVC_ROOT = "/mnt/pvc"
MODEL_DIGEST_ANNOTATION = "edgeai.dev/model-digest"
DEREGISTER_S = 5  # a stage pod's preStop wait before SIGTERM (endpoints catch up)


@dataclass(frozen=True)
class Owner:
    """The DNNDeployment the children belong to."""

    name: str
    namespace: str
    uid: str

    def reference(self, *, controller: bool = True) -> dict[str, Any]:
        return {
            "apiVersion": f"{API_GROUP}/{API_VERSION}",
            "kind": "DNNDeployment",
            "name": self.name,
            "uid": self.uid,
            "controller": controller,
            "blockOwnerDeletion": True,
        }

    @property
    def field_manager(self) -> str:
        """The field manager of this owner's share of a shared workload."""
        return f"edgeai-operator.{self.name}"


@dataclass(frozen=True)
class Workload:
    """One stage workload: which tier, zone, plan stage index and replica count."""

    tier: str
    zone: str | None
    stage: int
    plan_key: str  # the ConfigMap key of the plan this workload serves
    replicas: int = 1
    next_service: str | None = None
    model: ModelIdentity | None = None  # that plan's model: its artefact is fetched
    # the device answers alone when the next stage cannot (spec.placement.fallback)
    fallback: bool = False
    upstream_tiers: tuple[str, ...] = ()  # the tiers that forward to this stage
    # (uri, digest) of the labelled rows this stage calibrates result reuse on (the
    # first stage after the device of a user's model with spec.offload.reuse)
    reuse_data: tuple[str, str] | None = None
    # (uri, digest) of the small models a user's model's device stage cascades from
    cascade_models: tuple[tuple[str, str], ...] = ()

    @property
    def extra_files(self) -> list[tuple[tuple[str, str], str, str, str]]:
        """What the pods fetch beside the model: (artefact, init container, file name,
        the worker's flag)."""
        extras = [
            (m, f"fetch-cascade-{i}", f"cascade-{i}.onnx", "--cascade-model")
            for i, m in enumerate(self.cascade_models)
        ]
        if self.reuse_data is not None:
            extras.append((self.reuse_data, "fetch-reuse-data", REUSE_DATA_FILE, "--reuse-data"))
        return extras

    @property
    def artifact(self) -> tuple[str, str] | None:
        """(uri, sha256 digest) of the artefact the pods fetch: the plan's model when it
        is a prepared artefact and the stage runs layers (the device entry of a plan
        with none only forwards, unless it is the fallback)."""
        model = self.model
        if model is None or model.uri is None or model.digest is None:
            return None
        if self.stage < 0 and not self.fallback:
            return None
        return model.uri, model.digest


@dataclass(frozen=True)
class DeploymentOptions:
    image: str = DEFAULT_IMAGE
    device_selector: Mapping[str, str] = field(default_factory=dict)
    # (node, tier, zone) of nodes stages must leave; each workload avoids its own tier's
    excluded_nodes: Sequence[tuple[str, str, str | None]] = ()
    priority_class: str | None = None
    cpu_request: str = "500m"
    memory_request: str = "512Mi"
    # spec.placement.transport: with grpc, stage pods also serve gRPC (their Services
    # expose it) and forward over it, except a device stage (its uplink probe is HTTP)
    transport: str = "http"
    # spec.security: stages talk over mutual TLS; the entry's bearer token (Secret, key)
    # and the CA (Secret, key) its clients' certificates must chain to
    stage_tls: bool = False
    entry_token: tuple[str, str] | None = None
    entry_client_ca: tuple[str, str] | None = None


def labels(owner: Owner, tier: str, stage: int | None, zone: str | None) -> dict[str, str]:
    out = {
        **MANAGED_BY,
        "app.kubernetes.io/name": "edgeai-worker",
        "app.kubernetes.io/instance": owner.name,
        "edgeai.dev/deployment": owner.name,
        "edgeai.dev/tier": tier,
    }
    if stage is not None:
        out["edgeai.dev/stage"] = str(stage) if stage >= 0 else "entry"
    if zone is not None:
        out["edgeai.dev/zone"] = zone
    return out


def dns_label(text: str) -> str:
    """`text` if it fits a DNS label (Service names, label values: 63 characters);
    otherwise its first 54 characters and a hash of the whole, still unique."""
    if len(text) <= 63:
        return text
    return f"{text[:54].rstrip('-.')}-{_hash(text, 8)}"


def workload_name(owner: Owner, tier: str, zone: str | None) -> str:
    return dns_label(f"{owner.name}-{tier}-{zone}" if zone else f"{owner.name}-{tier}")


def _metadata(owner: Owner, name: str, lbls: Mapping[str, str]) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": dict(lbls),
        "ownerReferences": [owner.reference()],
    }


# libyaml's emitter when PyYAML has it (its wheels do): ~20x the pure-Python one.
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def _yaml(obj: Mapping[str, Any]) -> str:
    return yaml.dump(dict(obj), Dumper=_DUMPER, sort_keys=False)


def _hash(obj: Any, length: int) -> str:
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def plan_configmap(owner: Owner, plans: Mapping[str, PlanDocument]) -> dict[str, Any]:
    data = {key: _yaml(plan.to_dict()) for key, plan in sorted(plans.items())}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(owner, f"{owner.name}-plan", labels(owner, "plan", None, None)),
        "data": data,
    }


# What a plan records about itself that no stage reads (the SLO it was planned for, its
# predictions, the solver, the measured tiers and links): a change to these alone, such
# as a new spec.slo that keeps the split, leaves the pods running.
_DESCRIPTIVE_PLAN_KEYS = frozenset(
    {
        "objective",
        "feasible",
        "reason",
        "predictedLatencyMs",
        "objectiveValue",
        "deviceEnergyMj",
        "cloudCost",
        "slo",
        "transfers",
        "servingMs",
        "compute",
        "solver",
        "tiers",
        "links",
    }
)
_DESCRIPTIVE_STAGE_KEYS = frozenset({"computeMs"})
_DESCRIPTIVE_ALTERNATIVE_KEYS = frozenset({"predictedLatencyMs", "atMbps", "meetsSlo"})


def _without(doc: Mapping[str, Any], keys: frozenset[str]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k not in keys}


def plan_hash(plan: PlanDocument) -> str:
    """Changes when what the stages run changes; in the pod template so such a plan
    rolls the pods (and only such a plan)."""
    doc = _without(plan.to_dict(), _DESCRIPTIVE_PLAN_KEYS)
    doc["stages"] = [_without(s, _DESCRIPTIVE_STAGE_KEYS) for s in doc["stages"]]
    doc["alternatives"] = [_without(a, _DESCRIPTIVE_ALTERNATIVE_KEYS) for a in doc["alternatives"]]
    return _hash(doc, 16)


def _affinity(
    tier: str,
    zone: str | None,
    excluded: Sequence[tuple[str, str, str | None]],
    extra: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    exprs: list[dict[str, Any]] = [{"key": TIER_LABEL, "operator": "In", "values": [tier]}]
    if zone is not None:
        exprs.append({"key": ZONE_LABEL, "operator": "In", "values": [zone]})
    for key, value in sorted((extra or {}).items()):
        if key != TIER_LABEL:
            exprs.append({"key": key, "operator": "In", "values": [value]})
    avoid = sorted(n for n, t, z in excluded if t == tier and (zone is None or z == zone))
    if avoid:
        exprs.append({"key": "kubernetes.io/hostname", "operator": "NotIn", "values": avoid})
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": exprs}]
            }
        }
    }


def _pod_spec(
    owner: Owner,
    w: Workload,
    opts: DeploymentOptions,
    affinity: dict[str, Any],
    configmap: str | None = None,
) -> dict[str, Any]:
    args = [
        "run-stage",
        f"--plan=/etc/edgeai/{w.plan_key}",
        f"--stage={w.stage}",
        f"--port={WORKER_PORT}",
        "--host=0.0.0.0",
    ]
    ports = [{"name": "http", "containerPort": WORKER_PORT}]
    if opts.transport == "grpc":
        args.append(f"--grpc-port={GRPC_PORT}")
        ports.append({"name": "grpc", "containerPort": GRPC_PORT})
    if w.next_service:
        host = f"{w.next_service}.{owner.namespace}.svc"
        if opts.transport == "grpc" and w.tier != "device":
            args.append(f"--next=grpc://{host}:{GRPC_PORT}")
        else:
            args.append(f"--next=http://{host}:{WORKER_PORT}")
    mounts = [{"name": "plan", "mountPath": "/etc/edgeai", "readOnly": True}]
    volumes: list[dict[str, Any]] = [
        {"name": "plan", "configMap": {"name": configmap or f"{owner.name}-plan"}}
    ]
    _secure_stage(owner, w, opts, args, ports, mounts, volumes)
    return _worker_pod(args, ports, mounts, volumes, affinity, opts, w.artifact, w.extra_files)


def _worker_pod(
    args: list[str],
    ports: list[dict[str, Any]],
    mounts: list[dict[str, Any]],
    volumes: list[dict[str, Any]],
    affinity: dict[str, Any],
    opts: DeploymentOptions,
    artifact: tuple[str, str] | None,
    extras: Sequence[tuple[tuple[str, str], str, str, str]] = (),
) -> dict[str, Any]:
    """The pod spec of a worker running `edgeai ARGS`; with an artefact, an init
    container fetches it and the worker reads it with `--model-file`; each of `extras`
    (`Workload.extra_files`: a user's model's small models, its reuse rows) is fetched
    beside it by one more and passed with its flag."""
    if artifact is not None or extras:
        mounts.append({"name": "model", "mountPath": MODEL_DIR, "readOnly": True})
        volumes.append({"name": "model", "emptyDir": {}})
    if artifact is not None:
        args.append(f"--model-file={MODEL_DIR}/{MODEL_FILE_NAME}")
    args += [f"{flag}={MODEL_DIR}/{file_name}" for _, _, file_name, flag in extras]
    probe = {"httpGet": {"path": "/v2/health/ready", "port": "http"}, "periodSeconds": 5}
    spec: dict[str, Any] = {
        "affinity": affinity,
        "containers": [
            {
                "name": "worker",
                "image": opts.image,
                "command": ["edgeai"],
                "args": args,
                "ports": ports,
                "readinessProbe": probe,
                "livenessProbe": {
                    "httpGet": {"path": "/v2/health/live", "port": "http"},
                    "periodSeconds": 10,
                },
                "resources": {"requests": {"cpu": opts.cpu_request, "memory": opts.memory_request}},
                "volumeMounts": mounts,
                # A terminating pod keeps serving while Services take it out of their
                # endpoints (kube-proxy syncs asynchronously); only then does SIGTERM
                # close its listener. Without this, a rollout refused connections.
                "lifecycle": {"preStop": {"sleep": {"seconds": DEREGISTER_S}}},
            }
        ],
        "volumes": volumes,
        # The preStop wait, then draining in-flight requests (the worker's shutdown grace).
        "terminationGracePeriodSeconds": DEREGISTER_S + 10,
    }
    inits = [_fetch_container(artifact, opts, volumes)] if artifact is not None else []
    inits += [
        _fetch_container(extra, opts, volumes, name, file_name)
        for extra, name, file_name, _ in extras
    ]
    if inits:
        spec["initContainers"] = inits
    if opts.priority_class:
        spec["priorityClassName"] = opts.priority_class
    return restricted(spec)


# Stage TLS and entry authentication (securityspec.py, stagetls.py, edgeai_worker.security)
TLS_PORT = 8443
TLS_DIR = "/etc/edgeai-tls"  # not under the plan ConfigMap's read-only mount
ENTRY_TOKEN_DIR = "/etc/edgeai-entry"
ENTRY_CLIENT_CA_DIR = "/etc/edgeai-entry-ca"


# The DNS SAN every stage certificate carries (edgeai_worker.security.STAGE_TLS_NAME):
# the name a gRPC forwarder checks the next stage's certificate against, since gRPC
# checks a host name where the HTTP forwarder checks only the deployment's CA.
STAGE_TLS_NAME = "edgeai-stage"


def stage_identity(owner: Owner, tier: str) -> str:
    """The URI SAN of a stage's certificate (edgeai_worker.security.stage_identity)."""
    return f"edgeai://{owner.namespace}/{owner.name}/{tier}"


def tls_secret_name(owner: Owner, tier: str) -> str:
    """The Secret holding a stage's certificate, key and the deployment's CA."""
    return dns_label(f"{owner.name}-{tier}-tls")


def _secure_stage(
    owner: Owner,
    w: Workload,
    opts: DeploymentOptions,
    args: list[str],
    ports: list[dict[str, Any]],
    mounts: list[dict[str, Any]],
    volumes: list[dict[str, Any]],
) -> None:
    """With stage TLS: the stage's certificate Secret mounted, inference from the
    upstream stages over mutual TLS on TLS_PORT (and on GRPC_PORT, with gRPC
    transport; not for the device entry, which serves its clients), forwarding to the
    next stage's TLS port (HTTP) or to its gRPC port over mutual TLS (`grpcs://`).
    With an entry token: the Secret's key mounted where the entry stage reads it. With
    an entry client CA: the device entry serves its clients on TLS_PORT too, taking
    certificates of that CA (the Secret's key mounted as ca.crt)."""
    if opts.stage_tls:
        volumes.append(
            {"name": "stage-tls", "secret": {"secretName": tls_secret_name(owner, w.tier)}}
        )
        mounts.append({"name": "stage-tls", "mountPath": TLS_DIR, "readOnly": True})
        args.append(f"--tls-dir={TLS_DIR}")
        if w.tier != "device":
            args.append(f"--tls-port={TLS_PORT}")
            args += [f"--tls-peer={stage_identity(owner, t)}" for t in w.upstream_tiers]
            ports.append({"name": "https", "containerPort": TLS_PORT})
        elif opts.entry_client_ca is not None:
            secret, key = opts.entry_client_ca
            volumes.append(
                {
                    "name": "entry-client-ca",
                    "secret": {"secretName": secret, "items": [{"key": key, "path": "ca.crt"}]},
                }
            )
            mounts.append(
                {"name": "entry-client-ca", "mountPath": ENTRY_CLIENT_CA_DIR, "readOnly": True}
            )
            args += [f"--tls-port={TLS_PORT}", f"--entry-client-ca={ENTRY_CLIENT_CA_DIR}/ca.crt"]
            ports.append({"name": "https", "containerPort": TLS_PORT})
        for i, arg in enumerate(args):
            if arg.startswith("--next=http://"):
                host = arg.removeprefix("--next=http://").rsplit(":", 1)[0]
                args[i] = f"--next=https://{host}:{TLS_PORT}"
            elif arg.startswith("--next=grpc://"):
                # the next stage's gRPC port takes mutual TLS only (it has a TLS port)
                args[i] = arg.replace("--next=grpc://", "--next=grpcs://", 1)
    if opts.entry_token is not None and w.tier == "device":
        secret, key = opts.entry_token
        volumes.append(
            {
                "name": "entry-token",
                "secret": {"secretName": secret, "items": [{"key": key, "path": "token"}]},
            }
        )
        mounts.append({"name": "entry-token", "mountPath": ENTRY_TOKEN_DIR, "readOnly": True})
        args.append(f"--entry-token-file={ENTRY_TOKEN_DIR}/token")


def _fetch_container(
    artifact: tuple[str, str],
    opts: DeploymentOptions,
    volumes: list[dict[str, Any]],
    name: str = "fetch",
    file_name: str = MODEL_FILE_NAME,
) -> dict[str, Any]:
    """The storage initializer: fetches the artefact into the model emptyDir as
    `file_name` and checks its digest (the pod's worker starts only once it has). A
    pvc:// artefact's claim is added to `volumes` (once per claim) and mounted
    read-only where `edgeai fetch` looks for claims."""
    uri, digest = artifact
    mounts: list[dict[str, Any]] = [{"name": "model", "mountPath": MODEL_DIR}]
    if uri.startswith("pvc://"):
        claim = uri.removeprefix("pvc://").split("/", 1)[0]
        source = {"claimName": claim, "readOnly": True}
        same = [v["name"] for v in volumes if v.get("persistentVolumeClaim") == source]
        volume = same[0] if same else "artifacts" if name == "fetch" else f"{name}-claim"
        if not same:
            volumes.append({"name": volume, "persistentVolumeClaim": source})
        mounts.append({"name": volume, "mountPath": f"{PVC_ROOT}/{claim}", "readOnly": True})
    return {
        "name": name,
        "image": opts.image,
        "command": ["edgeai"],
        "args": [
            "fetch",
            uri,
            f"--sha256={digest.removeprefix('sha256:')}",
            f"--out={MODEL_DIR}",
            f"--file-name={file_name}",
            f"--pvc-root={PVC_ROOT}",
        ],
        "volumeMounts": mounts,
    }


def _pod_annotations(w: Workload, plan_digest: str) -> dict[str, str]:
    """The plan's hash, and the artefact's digest when the pods fetch one: either
    changing rolls the pods."""
    annotations = {"edgeai.dev/plan-hash": plan_digest}
    if w.artifact is not None:
        annotations[MODEL_DIGEST_ANNOTATION] = w.artifact[1]
    return annotations


def _template(
    owner: Owner, w: Workload, opts: DeploymentOptions, affinity: dict[str, Any], digest: str
) -> dict[str, Any]:
    return {
        "metadata": {
            "labels": labels(owner, w.tier, w.stage, w.zone),
            "annotations": _pod_annotations(w, digest),
        },
        "spec": _pod_spec(owner, w, opts, affinity),
    }


def device_daemonset(
    owner: Owner, w: Workload, opts: DeploymentOptions, digest: str
) -> dict[str, Any]:
    lbls = labels(owner, "device", w.stage, w.zone)
    affinity = _affinity("device", w.zone, opts.excluded_nodes, opts.device_selector)
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": _metadata(owner, workload_name(owner, "device", w.zone), lbls),
        "spec": {
            "selector": {"matchLabels": _selector(lbls)},
            "updateStrategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
            },
            "template": _template(owner, w, opts, affinity, digest),
        },
    }


def stage_deployment(
    owner: Owner, w: Workload, opts: DeploymentOptions, digest: str, name: str
) -> dict[str, Any]:
    lbls = labels(owner, w.tier, w.stage, w.zone)
    affinity = _affinity(w.tier, w.zone, opts.excluded_nodes)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(owner, name, lbls),
        "spec": {
            "replicas": w.replicas,
            "selector": {"matchLabels": _selector(lbls)},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
            },
            "template": _template(owner, w, opts, affinity, digest),
        },
    }


def stage_service(
    owner: Owner, w: Workload, name: str, transport: str = "http", *, tls: bool = False
) -> dict[str, Any]:
    lbls = labels(owner, w.tier, w.stage, w.zone)
    ports = [{"name": "http", "port": WORKER_PORT, "targetPort": "http"}]
    if transport == "grpc":
        ports.append({"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc"})
    if tls:
        ports.append({"name": "https", "port": TLS_PORT, "targetPort": "https"})
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(owner, name, lbls),
        "spec": {"selector": _selector(lbls), "ports": ports},
    }


def _selector(lbls: Mapping[str, str]) -> dict[str, str]:
    # Selectors are immutable: never the stage index, which a replan may change.
    keys = ("edgeai.dev/deployment", "edgeai.dev/tier", "edgeai.dev/zone")
    return {k: lbls[k] for k in keys if k in lbls}


def priority_class_name(value: int) -> str:
    return f"edgeai-priority-{value}"


def priority_class(value: int) -> dict[str, Any]:
    """Cluster-scoped, shared by every deployment with this priority; the operator
    deletes it with the last DNNDeployment that uses it (handlers/deployments.py)."""
    return {
        "apiVersion": "scheduling.k8s.io/v1",
        "kind": "PriorityClass",
        "metadata": {"name": priority_class_name(value), "labels": dict(MANAGED_BY)},
        "value": value,
        "globalDefault": False,
        "preemptionPolicy": "PreemptLowerPriority",
        "description": f"edgeai-operator stages of DNNDeployments with spec.priority {value}",
    }


SHARED_LABEL = "edgeai.dev/shared"
BACKBONE_LABEL = "edgeai.dev/backbone"
REPLICAS_ANNOTATION = "replicas.edgeai.dev/"  # + deployment name: that user's wish


@dataclass(frozen=True)
class SharedStage:
    """An edge stage several DNNDeployments of a namespace can share."""

    name: str
    model: str  # the DNNModel name
    zone: str
    stage: int
    plan: PlanDocument  # the plan the shared pods read (plan.yaml)


def shared_edge(
    plan: PlanDocument, model: str, zone: str, opts: DeploymentOptions
) -> SharedStage | None:
    """The shareable edge stage of a zone's plan, or None: a plan without an edge
    stage, or whose edge stage forwards to a (per-deployment) cloud stage. The shared
    plan keeps only what the stage pods run: the model, the stages' tensors and layers,
    the adaptive-split alternatives and the request priority."""
    idx = plan.stage_index("edge")
    if idx is None or idx != len(plan.stages) - 1:
        return None
    doc = PlanDocument(
        deployment="",
        model=plan.model,
        stages=tuple(
            PlanStage(s.index, s.tier, s.layers, s.inputs, s.outputs, None, 0.0)
            for s in plan.stages
        ),
        alternatives=plan.alternatives,
        priority=plan.priority,
    )
    signature = {
        "model": model,
        "zone": zone,
        "plan": doc.to_dict(),
        "priority": opts.priority_class,
    }
    digest = _hash(signature, 8)
    name = dns_label(f"{model}-shared-edge-{zone}-{digest}")
    return SharedStage(name=name, model=model, zone=zone, stage=idx, plan=doc)


def shared_labels(shared: SharedStage) -> dict[str, str]:
    return {
        **MANAGED_BY,
        "app.kubernetes.io/name": "edgeai-worker",
        "app.kubernetes.io/instance": shared.name,
        SHARED_LABEL: "true",
        BACKBONE_LABEL: shared.name,
        "edgeai.dev/model": shared.model,
        "edgeai.dev/tier": "edge",
        "edgeai.dev/zone": shared.zone,
        "edgeai.dev/stage": str(shared.stage),
    }


def shared_children(
    owner: Owner, shared: SharedStage, replicas: int, opts: DeploymentOptions
) -> list[dict[str, Any]]:
    """ConfigMap, Deployment and Service of a shared edge stage, as `owner` applies
    them (its own ownerReference and replica wish; server-side apply merges users)."""
    lbls = shared_labels(shared)
    meta = {
        "name": shared.name,
        "namespace": owner.namespace,
        "labels": lbls,
        "ownerReferences": [owner.reference(controller=False)],
    }
    w = Workload("edge", shared.zone, shared.stage, "plan.yaml", replicas, model=shared.plan.model)
    affinity = _affinity("edge", shared.zone, opts.excluded_nodes)
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": meta,
            "data": {"plan.yaml": _yaml(shared.plan.to_dict())},
        },
        *_shared_workload(
            owner,
            meta,
            replicas,
            {"labels": lbls, "annotations": _pod_annotations(w, plan_hash(shared.plan))},
            _pod_spec(owner, w, opts, affinity, configmap=shared.name),
        ),
    ]


def _shared_workload(
    owner: Owner,
    meta: Mapping[str, Any],
    replicas: int,
    pod_metadata: dict[str, Any],
    pod: dict[str, Any],
) -> list[dict[str, Any]]:
    """Deployment and Service of a shared stage (`meta`: its name, labels and this
    owner's reference), as `owner` applies them with its replica wish."""
    selector = {BACKBONE_LABEL: str(meta["name"])}
    return [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {
                **meta,
                "annotations": {REPLICAS_ANNOTATION + owner.name: str(replicas)},
            },
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": selector},
                "strategy": {
                    "type": "RollingUpdate",
                    "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
                },
                "template": {"metadata": pod_metadata, "spec": pod},
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": dict(meta),
            "spec": {
                "selector": selector,
                "ports": [{"name": "http", "port": WORKER_PORT, "targetPort": "http"}],
            },
        },
    ]


@dataclass(frozen=True)
class TrunkStage:
    """A zone's shared trunk stage (trunkplan.py): the base model's trunk, cut from its
    fp32 artefact up to `tensor`, and a route per application to that application's
    head Service."""

    name: str
    zone: str
    base: str  # the base DNNModel
    tensor: str
    uri: str
    digest: str
    routes: tuple[tuple[str, str], ...]  # (application model name, head URL), sorted


def trunk_children(
    owner: Owner, trunk: TrunkStage, replicas: int, opts: DeploymentOptions
) -> list[dict[str, Any]]:
    """Deployment and Service of a trunk stage, as `owner` applies them (its own
    ownerReference and replica wish, the routes of every current user; server-side
    apply merges the users' owner references)."""
    lbls = {
        **MANAGED_BY,
        "app.kubernetes.io/name": "edgeai-worker",
        "app.kubernetes.io/instance": trunk.name,
        SHARED_LABEL: "true",
        BACKBONE_LABEL: trunk.name,
        "edgeai.dev/model": trunk.base,
        "edgeai.dev/tier": "edge",
        "edgeai.dev/zone": trunk.zone,
        "edgeai.dev/stage": "trunk",
    }
    meta = {
        "name": trunk.name,
        "namespace": owner.namespace,
        "labels": lbls,
        "ownerReferences": [owner.reference(controller=False)],
    }
    args = [
        "run-trunk",
        f"--upto={trunk.tensor}",
        f"--digest={trunk.digest}",
        f"--port={WORKER_PORT}",
        "--host=0.0.0.0",
        *(f"--route={model}={url}" for model, url in trunk.routes),
    ]
    ports = [{"name": "http", "containerPort": WORKER_PORT}]
    # the trunk serves every user: no one user's PriorityClass
    pod = _worker_pod(
        args,
        ports,
        [],
        [],
        _affinity("edge", trunk.zone, opts.excluded_nodes),
        replace(opts, priority_class=None),
        (trunk.uri, trunk.digest),
    )
    pod_metadata = {"labels": lbls, "annotations": {MODEL_DIGEST_ANNOTATION: trunk.digest}}
    return _shared_workload(owner, meta, replicas, pod_metadata, pod)


def is_shared(obj: Mapping[str, Any]) -> bool:
    return (obj["metadata"].get("labels") or {}).get(SHARED_LABEL) == "true"


def build_children(
    owner: Owner,
    plans: Mapping[str, PlanDocument],
    replicas: Mapping[str, int],
    opts: DeploymentOptions,
    default_replicas: int = 1,
    *,
    shared_model: str | None = None,
    trunks: Mapping[str, TrunkStage] | None = None,
) -> list[dict[str, Any]]:
    """Every child object for per-zone plans (`plans[zone]`).

    `replicas` maps a workload name to its current replica count (from the
    autoscaler); workloads not in it start at `default_replicas`. With
    `shared_model` (the DNNModel name of a deployment with `sharing: backbone`), a
    shareable edge stage becomes the shared workload (`shared_children`). A zone
    whose plan starts with a shared trunk (`plan.trunk`) gets the trunk workload
    (`trunks[zone]`, `trunk_children`), this deployment's head stage after it, and
    a device entry forwarding the raw input to the trunk.
    """
    children: list[dict[str, Any]] = [
        plan_configmap(owner, {f"plan-{z}.yaml": p for z, p in plans.items()})
    ]
    cloud_signatures = {s.signature for p in plans.values() if (s := p.stage("cloud"))}
    shared_cloud = len(cloud_signatures) == 1
    emitted: set[str] = set()
    for zone, plan in sorted(plans.items()):
        key = f"plan-{zone}.yaml"
        digest = plan_hash(plan)
        cloud_idx = plan.stage_index("cloud")
        cloud_name = None
        if cloud_idx is not None:
            cloud_name = workload_name(owner, "cloud", None if shared_cloud else zone)
        edge_idx = plan.stage_index("edge")
        edge_name = workload_name(owner, "edge", zone) if edge_idx is not None else None
        shared = shared_edge(plan, shared_model, zone, opts) if shared_model else None
        trunk = (trunks or {}).get(zone) if plan.trunk is not None else None
        if trunk is not None and edge_name is not None:
            trunk_replicas = replicas.get(trunk.name, default_replicas)
            children += trunk_children(owner, trunk, trunk_replicas, opts)
            head = Workload(
                "edge", zone, len(plan.stages) - 1, key, replicas.get(edge_name, default_replicas)
            )
            head = replace(head, model=plan.model, upstream_tiers=("edge",))
            children.append(stage_deployment(owner, head, opts, digest, edge_name))
            children.append(stage_service(owner, head, edge_name, opts.transport))
            entry = Workload("device", zone, -1, key, 1, trunk.name, plan.model)
            children.append(device_daemonset(owner, entry, opts, digest))
            continue
        if shared is not None:
            edge_name = shared.name
            children += shared_children(
                owner, shared, replicas.get(shared.name, default_replicas), opts
            )
        elif edge_idx is not None and edge_name is not None:
            edge_replicas = replicas.get(edge_name, default_replicas)
            w = Workload(
                "edge",
                zone,
                edge_idx,
                key,
                edge_replicas,
                cloud_name,
                plan.model,
                upstream_tiers=("device",),
                reuse_data=_reuse_data(plan, edge_idx),
            )
            children.append(stage_deployment(owner, w, opts, digest, edge_name))
            children.append(stage_service(owner, w, edge_name, opts.transport, tls=opts.stage_tls))
        if cloud_idx is not None and cloud_name is not None and cloud_name not in emitted:
            emitted.add(cloud_name)
            cz = None if shared_cloud else zone
            cloud_replicas = replicas.get(cloud_name, default_replicas)
            upstream = _cloud_upstream(plans, cloud_name, owner, shared_cloud)
            w = Workload(
                "cloud",
                cz,
                cloud_idx,
                key,
                cloud_replicas,
                model=plan.model,
                upstream_tiers=upstream,
                reuse_data=_reuse_data(plan, cloud_idx),
            )
            children.append(stage_deployment(owner, w, opts, digest, cloud_name))
            children.append(stage_service(owner, w, cloud_name, opts.transport, tls=opts.stage_tls))
        device_idx = plan.stage_index("device")
        first_remote = edge_name or cloud_name
        device_stage = device_idx if device_idx is not None else -1
        fallback = plan.fallback == "device" and first_remote is not None
        w = Workload(
            "device",
            zone,
            device_stage,
            key,
            1,
            first_remote,
            plan.model,
            fallback,
            cascade_models=_cascade_models(plan),
        )
        children.append(device_daemonset(owner, w, opts, digest))
    return children


def _cascade_models(plan: PlanDocument) -> tuple[tuple[str, str], ...]:
    """(uri, digest) of the small models a user's model's device stage cascades from
    (also an entry that runs no layers: it runs the cascade)."""
    offload = plan.offload
    if offload is None or offload.cascade_rule is None:
        return ()
    return tuple((m.uri, m.digest) for m in offload.cascade_models)


def _reuse_data(plan: PlanDocument, stage: int) -> tuple[str, str] | None:
    """(uri, digest) of the labelled rows stage `stage` calibrates its result reuse on:
    a user's model's plan with reuse data, and the first stage after the device."""
    offload = plan.offload
    if offload is None or offload.reuse_data is None or not offload.reuse_entries:
        return None
    first_up = next((i for i, s in enumerate(plan.stages) if s.tier != "device"), None)
    if stage != first_up:
        return None
    return offload.reuse_data.uri, offload.reuse_data.digest


def _cloud_upstream(
    plans: Mapping[str, PlanDocument], cloud_name: str, owner: Owner, shared_cloud: bool
) -> tuple[str, ...]:
    """The tiers that forward to a cloud stage: the stage before it in each zone's plan
    that uses it (an edge stage, or the device when the zone has no edge stage)."""
    tiers = set()
    for zone, plan in plans.items():
        if workload_name(owner, "cloud", None if shared_cloud else zone) != cloud_name:
            continue
        tiers.add("edge" if plan.stage_index("edge") is not None else "device")
    return tuple(sorted(tiers))
