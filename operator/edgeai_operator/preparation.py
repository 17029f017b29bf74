"""A DNNModel's preparation Job: what the operator creates for each generation and how
it turns the Job's outcome into `DNNModel.status`.

The operator itself never loads a model: for each generation it runs `edgeai prepare`
(the worker image) as a Job. The Job fetches the source, checks it, builds and profiles
the variants, stores each artefact (`spec.artifacts.uri`, or the operator's default)
and writes its `PrepareResult`, or its error, as JSON into a ConfigMap the operator
created beside the Job (`data.result` / `data.error`): a result is larger than the
4096 bytes a termination message holds.

Each tick of `preparation_pass`:
- no Job for this attempt yet and its time has come: create the ConfigMap and the Job
  (and, once per namespace, the ServiceAccount and Role the Job runs as);
- the ConfigMap holds a result: status gets the source digest, the artefacts, the
  variants, one profile per ready variant (with its artefact) and the analytic tier
  estimates; `Fetched` and `Prepared` turn True;
- the ConfigMap holds an error: a source that could not be fetched (`Fetched=False`,
  with the URI and the error) is tried again after a backoff (10 s, doubling, at most
  5 min); a model that does not fit the spec (`Prepared=False`) is final for this
  generation, since the same spec would fail the same way;
- the Job failed or finished without writing either: retried like a fetch failure.

Profiles, artefacts and variants of an earlier generation stay in status until a later
one is prepared, so deployments keep serving what they serve.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from edgeai_operator.conditions import set_condition
from edgeai_operator.modelspec import ModelSpec
from edgeai_operator.podsecurity import restricted
from edgeai_operator.profiling import finished_conditions, model_owner, tier_estimates
from edgeai_operator.topology import NodeSpec

JOB_LABEL = "edgeai.dev/job"
JOB_KIND = "prepare"
SERVICE_ACCOUNT = "edgeai-prepare"
RESULT_KEY = "result"
ERROR_KEY = "error"
BACKOFF_BASE_S = 10.0
BACKOFF_MAX_S = 300.0
# Where a pvc:// source or destination's claim is mounted in the Job's pod.
PVC_ROOT = "/mnt/pvc"
# Where a preparation pod mounts the operator's CA bundle ConfigMap (`--ca-bundle`).
CA_BUNDLE_DIR = "/etc/edgeai/ca"
_MANAGED = {"app.kubernetes.io/managed-by": "edgeai-operator"}


def job_name(model: str, generation: int | None, attempt: int) -> str:
    """The Job (and its result ConfigMap) of one attempt; model names are at most 40
    characters (the CRD's rule), so this stays within 63."""
    return f"{model}-prepare-{generation or 0}-{attempt}"


def backoff_s(attempt: int) -> float:
    """The wait after failed attempt `attempt` (1-based) before the next one."""
    return float(min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (attempt - 1)))


def _labels(model: str, generation: int | None) -> dict[str, str]:
    return {
        **_MANAGED,
        JOB_LABEL: JOB_KIND,
        "edgeai.dev/model": model,
        "edgeai.dev/generation": str(generation or 0),
    }


def _input_args(spec: ModelSpec) -> list[str]:
    return [f"--input={i.name}={','.join(str(d) for d in i.shape)}:{i.dtype}" for i in spec.inputs]


def _variant_arg(variant: Any) -> str:
    request = variant.request()
    kind = f"{request.kind}:{request.sparsity:g}" if request.kind == "pruned" else request.kind
    return f"--variant={request.name}={kind}"


def _claims(uris: Sequence[str | None]) -> list[str]:
    """The claims pvc:// URIs name, each once, in order."""
    found: list[str] = []
    for uri in uris:
        if uri and uri.startswith("pvc://"):
            claim = uri.removeprefix("pvc://").split("/", 1)[0]
            if claim not in found:
                found.append(claim)
    return found


def prepare_args(spec: ModelSpec, *, model_name: str, artifacts_uri: str, result: str) -> list[str]:
    """The `edgeai prepare` arguments for `spec`; `result` is NAMESPACE/CONFIGMAP."""
    args = [
        "prepare",
        f"--source={spec.source.uri}",
        *_input_args(spec),
        f"--artifacts={artifacts_uri}",
        f"--model-name={model_name}",
        f"--result-configmap={result}",
        f"--pvc-root={PVC_ROOT}",
    ]
    if spec.source.sha256:
        args.append(f"--sha256={spec.source.sha256}")
    args += [_variant_arg(v) for v in spec.variants if v.name != "fp32"]
    args += [f"--{'train-exit' if e.train else 'exit'}={e.output}={e.after}" for e in spec.exits]
    args += [
        f"--small-model={m.uri}" + (f",sha256={m.sha256}" if m.sha256 else "")
        for m in spec.small_models
    ]
    for option, ref in (("calibration", spec.calibration), ("data", spec.data)):
        if ref is not None:
            args.append(f"--{option}={ref.uri}")
            if ref.sha256:
                args.append(f"--{option}-sha256={ref.sha256}")
    return args


def result_configmap(model: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The empty ConfigMap the Job writes its result into, owned by the DNNModel."""
    meta = model["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": meta["namespace"],
            "labels": _labels(meta["name"], meta.get("generation")),
            "ownerReferences": [model_owner(model)],
        },
    }


def access(namespace: str) -> list[dict[str, Any]]:
    """The ServiceAccount the preparation Jobs of `namespace` run as, allowed to read a
    configmap:// source and to write the result ConfigMap, and nothing else."""
    meta = {"name": SERVICE_ACCOUNT, "namespace": namespace, "labels": dict(_MANAGED)}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": meta,
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["configmaps"],
                    "verbs": ["get", "create", "patch"],
                }
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": meta,
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": SERVICE_ACCOUNT,
            },
            "subjects": [
                {"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": namespace}
            ],
        },
    ]


def preparation_job(
    model: Mapping[str, Any],
    spec: ModelSpec,
    name: str,
    *,
    image: str,
    artifacts_uri: str,
    ca_bundle_configmap: str | None = None,
) -> dict[str, Any]:
    """The Job of one preparation attempt. It prefers cloud, then edge nodes (building
    variants is the heaviest step) and mounts every claim a pvc:// URI names, and the
    ConfigMap `ca_bundle_configmap` (when given; optional, so one missing from the
    namespace mounts empty) whose CAs https sources are checked against too."""
    meta = model["metadata"]
    lbls = _labels(meta["name"], meta.get("generation"))
    refs = [spec.source.uri, artifacts_uri]
    refs += [r.uri for r in (spec.calibration, spec.data) if r is not None]
    claims = _claims(refs)
    container: dict[str, Any] = {
        "name": "prepare",
        "image": image,
        "command": ["edgeai"],
        "args": prepare_args(
            spec,
            model_name=meta["name"],
            artifacts_uri=artifacts_uri,
            result=f"{meta['namespace']}/{name}",
        ),
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [
            {"name": f"claim-{i}", "mountPath": f"{PVC_ROOT}/{c}"} for i, c in enumerate(claims)
        ]
        + [{"name": "work", "mountPath": "/tmp"}],
    }
    volumes: list[dict[str, Any]] = [
        {"name": f"claim-{i}", "persistentVolumeClaim": {"claimName": c}}
        for i, c in enumerate(claims)
    ] + [{"name": "work", "emptyDir": {}}]
    if ca_bundle_configmap is not None:
        container["args"].append(f"--ca-bundle={CA_BUNDLE_DIR}")
        container["volumeMounts"].append(
            {"name": "ca-bundle", "mountPath": CA_BUNDLE_DIR, "readOnly": True}
        )
        volumes.append(
            {"name": "ca-bundle", "configMap": {"name": ca_bundle_configmap, "optional": True}}
        )
    preferred = [
        {
            "weight": weight,
            "preference": {
                "matchExpressions": [{"key": "edgeai.dev/tier", "operator": "In", "values": [tier]}]
            },
        }
        for tier, weight in (("cloud", 100), ("edge", 50))
    ]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": meta["namespace"],
            "labels": lbls,
            "ownerReferences": [model_owner(model)],
        },
        "spec": {
            "backoffLimit": 0,
            "ttlSecondsAfterFinished": 3600,
            "template": {
                "metadata": {"labels": lbls},
                "spec": restricted(
                    {
                        "restartPolicy": "Never",
                        "serviceAccountName": SERVICE_ACCOUNT,
                        "affinity": {
                            "nodeAffinity": {
                                "preferredDuringSchedulingIgnoredDuringExecution": preferred
                            }
                        },
                        "containers": [container],
                        "volumes": volumes,
                    }
                ),
            },
        },
    }


# ---------------------------------------------------------------------------
# Reading the outcome


@dataclass(frozen=True)
class Outcome:
    """What one attempt came to. `kind`: `prepared` (data = the PrepareResult dict),
    `fetch` (the source could not be fetched: retried), `spec` (the model does not fit
    the spec: final), `graph` (the model loads but its graph cannot be profiled or
    partitioned: final), `job` (the Job failed or wrote nothing: retried) or `running`."""

    kind: str
    message: str = ""
    data: Mapping[str, Any] | None = None
    field: str = ""


def outcome(configmap: Mapping[str, Any] | None, job: Mapping[str, Any] | None) -> Outcome:
    """The attempt's outcome from its result ConfigMap and its Job (either may be
    missing); a written result or error wins over the Job's state."""
    data = (configmap or {}).get("data") or {}
    if data.get(RESULT_KEY):
        try:
            return Outcome("prepared", data=json.loads(data[RESULT_KEY]))
        except ValueError as exc:
            return Outcome("job", f"the preparation Job wrote an unreadable result: {exc}")
    if data.get(ERROR_KEY):
        try:
            error = json.loads(data[ERROR_KEY])
            kind = error.get("kind") if error.get("kind") in ("fetch", "graph") else "spec"
            return Outcome(kind, str(error.get("message", "")), field=str(error.get("field", "")))
        except (ValueError, AttributeError) as exc:
            return Outcome("job", f"the preparation Job wrote an unreadable error: {exc}")
    if job is None:
        return Outcome("running")
    done = finished_conditions(job)
    if "Failed" in done:
        failed = done["Failed"]
        return Outcome(
            "job",
            f"the preparation Job {job['metadata']['name']} failed without a result: "
            f"{failed.get('reason')}: {failed.get('message')}",
        )
    if "Complete" in done:
        return Outcome(
            "job",
            f"the preparation Job {job['metadata']['name']} finished without writing its result",
        )
    return Outcome("running")


def _profile_of(variant: Mapping[str, Any]) -> dict[str, Any]:
    profile = dict(variant["profile"])
    profile["variant"] = variant["name"]
    profile["build"] = variant["kind"]
    profile["artifact"] = dict(variant["artifact"])
    if variant.get("accuracy") is not None:
        profile["accuracy"] = variant["accuracy"]
    return profile


def prepared_status(
    result: Mapping[str, Any], nodes: Sequence[NodeSpec], job: str
) -> tuple[dict[str, Any], str]:
    """Status fields from a `PrepareResult` dict, and a one-line summary."""
    variants = list(result["variants"])
    ready = [v for v in variants if v.get("ready")]
    profiles = [_profile_of(v) for v in ready]
    fp32 = next(p for p in profiles if p["build"] == "fp32")
    reports = [
        {
            key: v[key]
            for key in ("name", "kind", "ready", "message", "accuracy", "artifact")
            if v.get(key) is not None
        }
        for v in variants
    ]
    for report, variant in zip(reports, variants, strict=True):
        if variant.get("artifact"):
            report["sizeBytes"] = variant["artifact"]["sizeBytes"]
    tiers = tier_estimates(fp32, nodes)
    for tier in tiers.values():  # this generation's profiling Jobs report afresh
        tier.update(dict.fromkeys(("job", "jobResult", "node", "hostGflops", "message")))
    flops = sum(int(s["flops"]) for s in fp32["segments"])
    status: dict[str, Any] = {
        "source": {**dict(result["source"]), "sizeBytes": result["sizeBytes"]},
        "inputs": list(result["inputs"]),
        "outputs": list(result["outputs"]),
        "artifacts": [{"variant": v["name"], **dict(v["artifact"])} for v in ready],
        "variants": reports,
        "variantNames": ",".join(v["name"] for v in ready),
        "profiles": profiles,
        "cuts": len(fp32["cuts"]),
        "flops": flops,
        "tiers": tiers,
    }
    summary = (
        f"{len(ready)}/{len(variants)} variants ready ({status['variantNames']}) by Job {job}; "
        f"source {result['source']['digest'][:19]}..., {len(fp32['cuts'])} cuts, "
        f"{flops / 1e6:.1f} MFLOPs"
    )
    return status, summary


def _fp32_profile(profiles: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    return next((p for p in profiles if p.get("build", "fp32") == "fp32"), None)


def _fp32_result_profile(result: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The profile of a PrepareResult's fp32 variant (None when it has none)."""
    variant = next((v for v in result["variants"] if v["kind"] == "fp32"), None)
    return variant["profile"] if variant else None


def _prepared(model: Mapping[str, Any]) -> bool:
    generation = model["metadata"].get("generation")
    return any(
        c.get("type") == "Prepared"
        and c.get("status") == "True"
        and c.get("observedGeneration") == generation
        for c in (model.get("status") or {}).get("conditions") or []
    )


def check_base(
    name: str, spec: ModelSpec, result: Mapping[str, Any], base: Mapping[str, Any] | None
) -> tuple[str, Any]:
    """Whether the prepared model `result` (a PrepareResult dict) of DNNModel `name`
    shares its trunk with `spec.base` (the base DNNModel as read, None when absent):
    ("wait", message) until the base is prepared, ("mismatch", message) when the
    claim is wrong (final for this generation), ("ok", status.trunk) when this model's
    graph up to `sharedUpTo` has the digest of a cut of the base's graph (same ops,
    same initializer bytes)."""
    assert spec.base is not None
    ref = spec.base
    if ref.model == name:
        return "mismatch", "spec.base.modelRef.name names this DNNModel itself"
    if base is None:
        return "wait", f"spec.base.modelRef.name: waiting for DNNModel {ref.model} (not found)"
    if not _prepared(base):
        return "wait", f"spec.base.modelRef.name: waiting for DNNModel {ref.model} to be Prepared"
    own = _fp32_result_profile(result)
    assert own is not None  # every preparation builds the fp32 variant
    at = [i for i, c in enumerate(own["cuts"]) if list(c["tensors"]) == [ref.shared_up_to]]
    if not at:
        offered = [c["tensors"][0] for c in own["cuts"][1:-1] if len(c["tensors"]) == 1]
        return "mismatch", (
            f"spec.base.sharedUpTo: {ref.shared_up_to!r} is not a single-tensor cut of this "
            f"model's graph (its cuts: {', '.join(offered[:12]) or 'none'})"
        )
    index = at[0]
    digest = own["prefixDigests"][index]
    theirs = _fp32_profile((base.get("status") or {}).get("profiles") or [])
    if theirs is None or "prefixDigests" not in theirs:
        return "mismatch", (
            f"spec.base: DNNModel {ref.model} has no trunk digests in its status "
            "(prepared by an older operator: change its spec to prepare it again)"
        )
    matching = [i for i, d in enumerate(theirs["prefixDigests"]) if d == digest]
    if not matching:
        return "mismatch", (
            f"spec.base: this model's graph up to {ref.shared_up_to!r} is not the graph of "
            f"DNNModel {ref.model} up to any of its cuts (ops or initializer bytes differ; "
            f"digest {digest[:19]}...)"
        )
    return "ok", _trunk_record(ref.model, own, index, theirs, matching[0])


def _trunk_record(
    base: str, own: Mapping[str, Any], index: int, theirs: Mapping[str, Any], at: int
) -> dict[str, Any]:
    """status.trunk: this model's cut `index` computes the base's cut `at`."""
    return {
        "model": base,
        "sharedUpTo": own["cuts"][index]["tensors"][0],
        "baseTensor": theirs["cuts"][at]["tensors"][0],
        "cut": index,
        "digest": own["prefixDigests"][index],
        "baseArtifact": dict(theirs["artifact"]),
        "trunkFlops": sum(int(s["flops"]) for s in own["segments"][:index]),
        "headFlops": sum(int(s["flops"]) for s in own["segments"][index:]),
    }


def detect_trunk(
    name: str, result: Mapping[str, Any], others: Sequence[Mapping[str, Any]]
) -> dict[str, Any] | None:
    """status.trunk for a DNNModel without `spec.base` (`result`: its PrepareResult)
    whose graph up to one of its single-tensor cuts, past the input and short of the
    output, has the digest of a cut of another Prepared DNNModel of the namespace
    (`others`, as read): the deepest such cut, and of equally deep ones the base whose
    name sorts first. Only a base that shares no trunk itself is taken, and the model
    prepared second names the one prepared first, so no two models name each other.
    None when nothing is shared."""
    own = _fp32_result_profile(result)
    if own is None or "prefixDigests" not in own:
        return None
    found: tuple[int, str, Mapping[str, Any], int] | None = None
    for other in sorted(others, key=lambda o: str(o["metadata"]["name"])):
        base = str(other["metadata"]["name"])
        status = other.get("status") or {}
        if base == name or not _prepared(other) or status.get("trunk"):
            continue
        theirs = _fp32_profile(status.get("profiles") or [])
        if theirs is None or "prefixDigests" not in theirs or "artifact" not in theirs:
            continue
        where = {d: i for i, d in reversed(list(enumerate(theirs["prefixDigests"])))}
        last = len(own["cuts"]) - 1
        for index in range(last - 1, 0, -1):
            at = where.get(own["prefixDigests"][index])
            single = len(own["cuts"][index]["tensors"]) == 1
            if at is not None and single and len(theirs["cuts"][at]["tensors"]) == 1:
                if found is None or index > found[0]:
                    found = (index, base, theirs, at)
                break
    if found is None:
        return None
    index, base, theirs, at = found
    return {**_trunk_record(base, own, index, theirs, at), "detected": True}


@dataclass(frozen=True)
class Step:
    """What one tick does: objects to create, the status patch, Events to post."""

    create: tuple[dict[str, Any], ...] = ()
    status: Mapping[str, Any] | None = None
    events: tuple[tuple[str, str, str], ...] = ()  # (type, reason, message)


# Every key of status.preparation: each patch names them all (None removes one), since
# a merge patch keeps the keys it does not mention, such as an earlier generation's
# `done`.
_PREPARATION_KEYS = (
    "generation",
    "attempt",
    "job",
    "done",
    "startedAt",
    "finishedAt",
    "lastJob",
    "nextAttemptAt",
)


def _preparation(prep: Mapping[str, Any]) -> dict[str, Any]:
    return {key: prep.get(key) for key in _PREPARATION_KEYS}


def _utc(now_s: float) -> str:
    return datetime.datetime.fromtimestamp(now_s, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _epoch(text: str | None) -> float:
    if not text:
        return 0.0
    stamp = datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ")
    return stamp.replace(tzinfo=datetime.UTC).timestamp()


def _current(model: Mapping[str, Any], status: Mapping[str, Any]) -> dict[str, Any]:
    """`status.preparation` for the model's generation (a fresh one at attempt 1)."""
    generation = model["metadata"].get("generation")
    prep = dict(status.get("preparation") or {})
    if prep.get("generation") != generation:
        prep = {"generation": generation, "attempt": 1}
    return prep


def current_job(model: Mapping[str, Any], status: Mapping[str, Any]) -> str | None:
    """The name of the Job (and ConfigMap) of the attempt under way, None once this
    generation's preparation is done."""
    prep = _current(model, status)
    if prep.get("done"):
        return None
    meta = model["metadata"]
    return job_name(meta["name"], meta.get("generation"), int(prep.get("attempt", 1)))


def step(
    model: Mapping[str, Any],
    spec: ModelSpec,
    status: Mapping[str, Any],
    observed: Mapping[str, Any],
    nodes: Sequence[NodeSpec],
    *,
    image: str,
    artifacts_uri: str | None,
    now_s: float,
    ca_bundle_configmap: str | None = None,
) -> Step:
    """One tick of a model's preparation, deciding only: `observed` holds the current
    attempt's `job` and `configmap` (None when absent), the `base` DNNModel of
    `spec.base`, or else the namespace's DNNModels as `peers` once the result is there
    (for `detect_trunk`). Pure: the caller creates, patches and posts what the step
    returns."""
    meta = model["metadata"]
    generation = meta.get("generation")
    conditions = list(status.get("conditions") or [])
    prep = _current(model, status)
    if prep.get("done"):
        return Step()
    attempt = int(prep.get("attempt", 1))
    name = job_name(meta["name"], generation, attempt)
    prep["job"] = name

    if artifacts_uri is None:
        message = (
            "spec.artifacts.uri is not set and the operator has no default "
            "(EDGEAI_ARTIFACTS_URI): there is nowhere to store the prepared model"
        )
        conds = set_condition(conditions, "Prepared", False, "NoArtifactStore", message, generation)
        return Step(
            status={"conditions": conds, "preparation": _preparation({**prep, "done": True})}
        )

    if observed.get("job") is None and observed.get("configmap") is None:
        if now_s < _epoch(prep.get("nextAttemptAt")):
            return Step()  # backing off
        job = preparation_job(
            model,
            spec,
            name,
            image=image,
            artifacts_uri=artifacts_uri,
            ca_bundle_configmap=ca_bundle_configmap,
        )
        message = f"attempt {attempt}: Job {name} fetches {spec.source.uri}"
        conds = set_condition(conditions, "Prepared", False, "Preparing", message, generation)
        return Step(
            create=(*access(meta["namespace"]), result_configmap(model, name), job),
            status={
                "conditions": conds,
                "preparation": _preparation({**prep, "startedAt": _utc(now_s)}),
            },
            events=(("Normal", "Preparing", message),),
        )

    found = outcome(observed.get("configmap"), observed.get("job"))
    if found.kind == "running":
        return Step()
    # what a final outcome (prepared, or a model that does not fit) writes besides
    finished = {
        "observedGeneration": generation,
        "preparation": _preparation({**prep, "done": True, "finishedAt": _utc(now_s)}),
    }
    if found.kind == "prepared":
        assert found.data is not None
        fields, summary = prepared_status(found.data, nodes, name)
        if spec.base is not None:
            verdict, detail = check_base(meta["name"], spec, found.data, observed.get("base"))
            if verdict == "wait":
                conds = set_condition(
                    conditions, "Prepared", False, "WaitingForBase", detail, generation
                )
                return Step(status={"conditions": conds})
            if verdict == "mismatch":
                message = f"{detail} (Job {name})"
                conds = set_condition(
                    conditions, "Fetched", True, "Fetched", spec.source.uri, generation
                )
                conds = set_condition(conds, "Prepared", False, "BaseMismatch", message, generation)
                return Step(
                    status={"conditions": conds, "trunk": None, **finished},
                    events=(("Warning", "PreparationFailed", message),),
                )
            fields["trunk"] = detail
            summary += (
                f"; shares DNNModel {spec.base.model}'s trunk up to {spec.base.shared_up_to} "
                f"({detail['trunkFlops'] / 1e6:.2f} MFLOPs)"
            )
        elif detected := detect_trunk(meta["name"], found.data, observed.get("peers") or []):
            fields["trunk"] = detected
            summary += (
                f"; computes DNNModel {detected['model']}'s graph up to "
                f"{detected['sharedUpTo']} (same ops and weights, detected; "
                f"{detected['trunkFlops'] / 1e6:.2f} MFLOPs)"
            )
        else:
            fields["trunk"] = None  # an earlier generation's record goes (merge patch)
        conds = set_condition(
            conditions, "Fetched", True, "Fetched", f"{spec.source.uri}: {summary}", generation
        )
        conds = set_condition(conds, "Prepared", True, "Prepared", summary, generation)
        tiers = ", ".join(f"{t} {v['totalMs']:.2f} ms" for t, v in fields["tiers"].items())
        conds = set_condition(
            conds,
            "Profiled",
            True,
            "AnalyticEstimate",
            f"{fields['cuts']} cuts, {fields['flops'] / 1e6:.1f} MFLOPs; {tiers}",
            generation,
        )
        return Step(
            status={**fields, "conditions": conds, **finished},
            events=(("Normal", "Prepared", summary),),
        )
    if found.kind == "graph":
        message = f"{found.message} (attempt {attempt}, Job {name})"
        conds = set_condition(conditions, "Fetched", True, "Fetched", spec.source.uri, generation)
        conds = set_condition(conds, "Prepared", False, "UnsupportedGraph", message, generation)
        conds = set_condition(conds, "Profiled", False, "UnsupportedGraph", message, generation)
        return Step(
            status={"conditions": conds, **finished},
            events=(("Warning", "ProfilingFailed", message),),
        )
    if found.kind == "spec":
        message = f"{found.message} (attempt {attempt}, Job {name})"
        conds = conditions
        if found.field != "spec.source.uri":
            conds = set_condition(conds, "Fetched", True, "Fetched", spec.source.uri, generation)
        conds = set_condition(conds, "Prepared", False, "InvalidModel", message, generation)
        return Step(
            status={"conditions": conds, **finished},
            events=(("Warning", "PreparationFailed", message),),
        )
    # a fetch failure or a Job that failed without a word: try again after a backoff
    wait_s = backoff_s(attempt)
    message = f"{found.message} (attempt {attempt}, Job {name}); retrying in {wait_s:g} s"
    conds = conditions
    if found.kind == "fetch":
        conds = set_condition(conds, "Fetched", False, "FetchFailed", message, generation)
    conds = set_condition(conds, "Prepared", False, "Retrying", message, generation)
    return Step(
        status={
            "conditions": conds,
            "preparation": _preparation(
                {
                    "generation": generation,
                    "attempt": attempt + 1,
                    "lastJob": name,
                    "nextAttemptAt": _utc(now_s + wait_s),
                }
            ),
        },
        events=(("Warning", "PreparationFailed", message),),
    )


__all__ = [
    "BACKOFF_BASE_S",
    "ERROR_KEY",
    "JOB_KIND",
    "JOB_LABEL",
    "RESULT_KEY",
    "SERVICE_ACCOUNT",
    "Outcome",
    "Step",
    "access",
    "backoff_s",
    "check_base",
    "current_job",
    "detect_trunk",
    "job_name",
    "outcome",
    "preparation_job",
    "prepare_args",
    "prepared_status",
    "result_configmap",
    "step",
]
