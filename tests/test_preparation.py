"""The preparation Job's decisions (`preparation.step`), without a cluster: what a tick
creates, how a written result or error becomes status, backoff and retries."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeai_operator import preparation
from edgeai_operator.modelspec import InputSpec, parse_model_spec
from edgeai_operator.prepare import PrepareRequest, VariantRequest, prepare
from edgeai_operator.topology import NodeSpec

NODES = [
    NodeSpec(
        name="edge-0",
        tier="edge",
        zone=None,
        capacity={"cpu": "4"},
        gflops=20.0,
        uplink_mbps=None,
        uplink_rtt_ms=None,
        power_watts=None,
    )
]
DEFAULT = "oci://127.0.0.1:5000/edgeai-models"
NOW_S = 1_800_000_000.0


def body(spec: dict[str, Any], generation: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": "edgeai.dev/v1alpha1",
        "metadata": {"name": "net", "namespace": "team", "uid": "u-1", "generation": generation},
        "spec": spec,
    }


SPEC: dict[str, Any] = {
    "source": {"uri": "https://models.example/net.onnx", "sha256": "ab" * 32},
    "input": {"name": "x", "shape": [1, 4], "dtype": "FP32"},
    "variants": [{"name": "small", "quantize": {"mode": "dynamic"}}],
}


def tick(
    model: dict[str, Any],
    status: dict[str, Any],
    observed: dict[str, Any] | None = None,
    *,
    now_s: float = NOW_S,
    artifacts: str | None = DEFAULT,
    ca_bundle_configmap: str | None = None,
) -> preparation.Step:
    return preparation.step(
        model,
        parse_model_spec(model["spec"]),
        status,
        observed or {"job": None, "configmap": None},
        NODES,
        image="edgeai/worker:test",
        artifacts_uri=artifacts,
        now_s=now_s,
        ca_bundle_configmap=ca_bundle_configmap,
    )


def condition(status: Any, type_: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == type_)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386, as the API server applies a status patch: None removes a key, a
    mapping merges into a mapping, anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def merged(status: dict[str, Any], step: preparation.Step) -> dict[str, Any]:
    assert step.status is not None
    result: dict[str, Any] = merge_patch(status, step.status)
    return result


def test_first_tick_creates_the_job_its_result_configmap_and_access() -> None:
    step = tick(body(SPEC), {})
    kinds = [o["kind"] for o in step.create]
    assert kinds == ["ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Job"]
    job = step.create[-1]
    assert job["metadata"]["name"] == "net-prepare-1-1"
    assert job["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    pod = job["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == preparation.SERVICE_ACCOUNT
    args = pod["containers"][0]["args"]
    assert args[0] == "prepare"
    assert "--source=https://models.example/net.onnx" in args
    assert f"--sha256={'ab' * 32}" in args
    assert "--input=x=1,4:FP32" in args
    assert "--variant=small=int8-dynamic" in args
    assert f"--artifacts={DEFAULT}" in args
    assert "--result-configmap=team/net-prepare-1-1" in args
    assert job["spec"]["template"]["metadata"]["labels"][preparation.JOB_LABEL] == "prepare"
    assert step.create[3]["metadata"]["name"] == "net-prepare-1-1"
    assert condition(step.status, "Prepared")["reason"] == "Preparing"
    # the Role lets the Job read configmap:// sources and write its result, no more
    role = step.create[1]
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "create", "patch"]}
    ]


def test_the_operators_ca_bundle_configmap_is_mounted_optional_and_trusted() -> None:
    plain = tick(body(SPEC), {}).create[-1]["spec"]["template"]["spec"]
    assert not any(a.startswith("--ca-bundle") for a in plain["containers"][0]["args"])
    assert not any("configMap" in v for v in plain["volumes"])

    pod = tick(body(SPEC), {}, ca_bundle_configmap="team-cas").create[-1]["spec"]["template"][
        "spec"
    ]
    container = pod["containers"][0]
    assert f"--ca-bundle={preparation.CA_BUNDLE_DIR}" in container["args"]
    assert {"name": "ca-bundle", "mountPath": "/etc/edgeai/ca", "readOnly": True} in container[
        "volumeMounts"
    ]
    # optional: a namespace without the ConfigMap still runs its Jobs (system CAs only)
    assert {"name": "ca-bundle", "configMap": {"name": "team-cas", "optional": True}} in pod[
        "volumes"
    ]


def test_spec_artifacts_win_over_the_default_and_claims_are_mounted() -> None:
    spec = {
        **SPEC,
        "source": {"uri": "pvc://models/team/net.onnx"},
        "artifacts": {"uri": "pvc://prepared/net"},
        "calibration": {"uri": "configmap://calib/inputs.npz"},
        "variants": [{"name": "q", "quantize": {"mode": "static"}}],
    }
    model = body(spec)
    step = preparation.step(
        model,
        parse_model_spec(spec),
        {},
        {"job": None, "configmap": None},
        NODES,
        image="i",
        artifacts_uri=parse_model_spec(spec).artifacts_uri or DEFAULT,
        now_s=NOW_S,
    )
    pod = step.create[-1]["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert "--artifacts=pvc://prepared/net" in args
    assert "--calibration=configmap://calib/inputs.npz" in args
    assert "--variant=q=int8-static" in args
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {"models", "prepared"}
    mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert {"/mnt/pvc/models", "/mnt/pvc/prepared"} <= mounts


def test_without_any_artifact_store_the_model_is_refused_by_name() -> None:
    step = tick(body(SPEC), {}, artifacts=None)
    assert step.create == ()
    prepared = condition(step.status, "Prepared")
    assert prepared["status"] == "False"
    assert prepared["reason"] == "NoArtifactStore"
    assert "spec.artifacts.uri" in prepared["message"]
    assert "EDGEAI_ARTIFACTS_URI" in prepared["message"]


def _tiny_model(path: Path) -> None:
    weight = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.save(model, str(path))


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A real PrepareResult: fp32 and int8-dynamic of a small model, stored on a claim."""
    root = tmp_path_factory.mktemp("prep")
    (root / "pvc" / "models").mkdir(parents=True)
    _tiny_model(root / "pvc" / "models" / "net.onnx")
    request = PrepareRequest(
        source_uri="pvc://models/net.onnx",
        inputs=(InputSpec("x", (1, 4), "FP32"),),
        artifacts_uri="pvc://models/prepared",
        variants=(VariantRequest("small", "int8-dynamic"),),
        model_name="net",
    )
    return prepare(request, root / "work", pvc_root=root / "pvc").to_dict()


def test_a_written_result_becomes_status_with_each_variants_artifact(
    result: dict[str, Any],
) -> None:
    started = tick(body(SPEC), {})
    status = merged({}, started)
    configmap = {"data": {preparation.RESULT_KEY: json.dumps(result)}}
    step = tick(body(SPEC), status, {"job": {"metadata": {"name": "x"}}, "configmap": configmap})
    assert step.create == ()
    assert step.status is not None
    assert step.status["observedGeneration"] == 1
    assert condition(step.status, "Prepared")["status"] == "True"
    assert condition(step.status, "Fetched")["status"] == "True"
    assert step.status["source"]["digest"] == result["source"]["digest"]
    variants = {v["name"]: v for v in result["variants"]}
    profiles = {p["variant"]: p for p in step.status["profiles"]}
    assert set(profiles) == {"fp32", "small"}
    for name, profile in profiles.items():
        assert profile["artifact"] == variants[name]["artifact"]
        assert profile["build"] == variants[name]["kind"]
        assert profile["cuts"] == variants[name]["profile"]["cuts"]
    artifacts = {a["variant"]: a["digest"] for a in step.status["artifacts"]}
    assert artifacts == {n: v["artifact"]["digest"] for n, v in variants.items()}
    assert step.status["variantNames"] == "fp32,small"
    assert step.status["tiers"]["edge"]["source"] == "analytic"
    # done: later ticks do nothing
    assert tick(body(SPEC), merged(status, step)) == preparation.Step()


def test_a_generation_that_shares_no_trunk_drops_the_last_ones_record(
    result: dict[str, Any],
) -> None:
    # generation 1 shared another model's trunk; generation 2 neither names a base nor
    # computes any peer's graph: the old record (the other model's trunk artefact and
    # digest) must not stay, or the deployment would keep routing through that trunk
    stale = {"model": "digits", "sharedUpTo": "t", "digest": "sha256:old", "detected": True}
    status = merged({"trunk": stale}, tick(body(SPEC, generation=2), {"trunk": stale}))
    configmap = {"data": {preparation.RESULT_KEY: json.dumps(result)}}
    observed = {"job": None, "configmap": configmap, "peers": []}
    status = merged(status, tick(body(SPEC, generation=2), status, observed))
    assert condition(status, "Prepared")["status"] == "True"
    assert "trunk" not in status


def test_a_fetch_error_is_retried_after_a_doubling_backoff() -> None:
    status = merged({}, tick(body(SPEC), {}))
    error = {
        "kind": "fetch",
        "field": "spec.source.uri",
        "message": "cannot fetch https://models.example/net.onnx: HTTP 404 Not Found",
    }
    configmap = {"data": {preparation.ERROR_KEY: json.dumps(error)}}
    failed = tick(body(SPEC), status, {"job": None, "configmap": configmap})
    status = merged(status, failed)
    fetched = condition(status, "Fetched")
    assert fetched["status"] == "False"
    assert fetched["reason"] == "FetchFailed"
    assert "HTTP 404" in fetched["message"]
    assert "net.onnx" in fetched["message"]
    assert "retrying in 10 s" in fetched["message"]
    assert status["preparation"]["attempt"] == 2
    assert failed.events[0][1] == "PreparationFailed"
    # before the backoff has passed, nothing; after it, attempt 2's Job
    assert tick(body(SPEC), status, now_s=NOW_S + 5) == preparation.Step()
    again = tick(body(SPEC), status, now_s=NOW_S + 11)
    assert again.create[-1]["metadata"]["name"] == "net-prepare-1-2"
    assert preparation.backoff_s(2) == 20
    assert preparation.backoff_s(20) == preparation.BACKOFF_MAX_S


def test_a_model_that_does_not_fit_the_spec_is_final_for_its_generation() -> None:
    status = merged({}, tick(body(SPEC), {}))
    error = {
        "kind": "spec",
        "field": "spec.input",
        "message": "spec.input: declares 1 input(s) (x) but the model has 2",
    }
    configmap = {"data": {preparation.ERROR_KEY: json.dumps(error)}}
    step = tick(body(SPEC), status, {"job": None, "configmap": configmap})
    status = merged(status, step)
    prepared = condition(status, "Prepared")
    assert prepared["reason"] == "InvalidModel"
    assert "has 2" in prepared["message"]
    assert status["observedGeneration"] == 1
    assert tick(body(SPEC), status) == preparation.Step()
    # a new generation starts over at attempt 1
    again = tick(body(SPEC, generation=2), status)
    assert again.create[-1]["metadata"]["name"] == "net-prepare-2-1"


def test_a_graph_the_planner_cannot_handle_is_profiled_false_and_final() -> None:
    status = merged({}, tick(body(SPEC), {}))
    error = {
        "kind": "graph",
        "field": "spec.source.uri",
        "message": "model output 'pieces' is a sequence_type, not a tensor: "
        "stages exchange tensors only",
    }
    configmap = {"data": {preparation.ERROR_KEY: json.dumps(error)}}
    step = tick(body(SPEC), status, {"job": None, "configmap": configmap})
    assert step.events[0][:2] == ("Warning", "ProfilingFailed")
    status = merged(status, step)
    profiled = condition(status, "Profiled")
    assert (profiled["status"], profiled["reason"]) == ("False", "UnsupportedGraph")
    assert profiled["message"].startswith("model output 'pieces' is a sequence_type")
    assert condition(status, "Prepared")["reason"] == "UnsupportedGraph"
    assert condition(status, "Fetched")["status"] == "True"
    assert status["observedGeneration"] == 1
    assert tick(body(SPEC), status) == preparation.Step(), "final: no retry"


def test_a_job_that_ends_without_writing_is_retried_and_a_running_one_waited_for() -> None:
    status = merged({}, tick(body(SPEC), {}))
    job: dict[str, Any] = {"metadata": {"name": "net-prepare-1-1"}, "status": {}}
    assert tick(body(SPEC), status, {"job": job, "configmap": {"data": {}}}) == preparation.Step()
    job["status"] = {
        "conditions": [
            {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "x"}
        ]
    }
    step = tick(body(SPEC), status, {"job": job, "configmap": {"data": {}}})
    prepared = condition(merged(status, step), "Prepared")
    assert prepared["reason"] == "Retrying"
    assert "BackoffLimitExceeded" in prepared["message"]
    assert merged(status, step)["preparation"]["attempt"] == 2


def test_a_new_generation_after_a_prepared_one_starts_its_own_job(
    result: dict[str, Any],
) -> None:
    status = merged({}, tick(body(SPEC), {}))
    configmap = {"data": {preparation.RESULT_KEY: json.dumps(result)}}
    status = merged(status, tick(body(SPEC), status, {"job": None, "configmap": configmap}))
    assert status["preparation"]["done"] is True
    # the user changes the spec: generation 2 gets its own Job, and its start clears
    # generation 1's `done` from status, or no later tick would look at it again
    started = tick(body(SPEC, generation=2), status)
    assert started.create[-1]["metadata"]["name"] == "net-prepare-2-1"
    status = merged(status, started)
    assert "done" not in status["preparation"]
    assert preparation.current_job(body(SPEC, generation=2), status) == "net-prepare-2-1"
    # until it reports, the last good generation's profiles stay
    assert {p["variant"] for p in status["profiles"]} == {"fp32", "small"}
