"""The typed plan document: its dict form, what it refuses, and what the operator's
planning puts in it (partitioning, preprocessing, priority). No cluster needed."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from edgeai_operator.deployspec import parse_deployment
from edgeai_operator.errors import SpecError
from edgeai_operator.partitions import stage_settings
from edgeai_operator.plandoc import PLAN_VERSION, PlanDocument
from edgeai_operator.planning import NodeState, plan_zones
from edgeai_operator.topology import NodeSpec

DOC: dict[str, Any] = {
    "kind": "Plan",
    "version": PLAN_VERSION,
    "deployment": "cam",
    "zone": "zone-a",
    "model": {
        "zoo": "digits_cnn",
        "variant": "fp32",
        "input": {"name": "input", "shape": [1, 1, 8, 8], "dtype": "FP32"},
    },
    "objective": "latency",
    "feasible": True,
    "reason": "",
    "predictedLatencyMs": 12.5,
    "objectiveValue": 12.5,
    "deviceEnergyMj": 3.25,
    "cloudCost": 0.0,
    "slo": {"latencyP95Ms": 50.0},
    "stages": [
        {
            "index": 0,
            "tier": "device",
            "layers": "0-3",
            "inputs": ["input"],
            "outputs": ["t1"],
            "variant": "fp32",
            "computeMs": 4.0,
        },
        {
            "index": 1,
            "tier": "edge",
            "layers": "4-8",
            "inputs": ["t1"],
            "outputs": ["output"],
            "variant": "fp32",
            "computeMs": 1.5,
        },
    ],
    "transfers": [
        {"from": "device", "to": "edge", "bytes": 1024, "returnBytes": 40, "ms": 6.0},
    ],
    "servingMs": {"device": 0.5, "edge": 0.5},
    "alternatives": [
        {
            "minMbps": 0.0,
            "maxMbps": 2.0,
            "cutIndex": 9,
            "stages": [{"tier": "device", "layers": "0-8"}],
            "predictedLatencyMs": 9.0,
            "atMbps": 1.0,
            "meetsSlo": True,
        },
        {
            "minMbps": 2.0,
            "maxMbps": None,
            "cutIndex": 4,
            "stages": [{"tier": "device", "layers": "0-3"}, {"tier": "edge", "layers": "4-8"}],
            "predictedLatencyMs": 12.5,
            "atMbps": 10.0,
            "meetsSlo": True,
        },
    ],
    "privacy": {"rawInputStaysOnDevice": True, "featureNoiseStd": 0.05},
    "preprocessing": {"skipUnchangedThreshold": 0.02},
    "priority": 100,
    "compute": {"method": "measured", "hostGflops": 40.0, "measuredOn": {"device": "phone-1"}},
    "solver": {"method": "chain-dp", "exact": True},
    "tiers": {"device": {"gflops": 8.0, "totalMs": 7.0}, "edge": {"gflops": 150.0}},
    "links": [{"from": "device", "to": "edge", "mbps": 10.0, "rttMs": 2.0}],
}


def test_the_dict_form_round_trips_and_reads_typed() -> None:
    plan = PlanDocument.from_dict(DOC)
    assert plan.to_dict() == DOC
    assert plan.split == "device:0-3 > edge:4-8"
    assert plan.stage_index("edge") == 1
    assert plan.stage("cloud") is None
    assert plan.stage("device") == plan.stages[0]
    assert (plan.skip_unchanged_threshold, plan.priority) == (0.02, 100)
    assert (plan.raw_input_stays_on_device, plan.feature_noise_std) == (True, 0.05)
    assert plan.model.name == "digits_cnn"
    assert plan.model.input.shape == (1, 1, 8, 8)
    assert plan.alternatives[1].max_mbps is None
    assert plan.transfers[0].return_bytes == 40
    assert plan.measured_on == {"device": "phone-1"}


def test_a_hand_written_plan_needs_only_the_model_and_its_stages() -> None:
    plan = PlanDocument.from_dict(
        {
            "model": {"path": "chain.onnx", "input": {"shape": [1, 3], "dtype": "FP32"}},
            "stages": [{"tier": "device", "inputs": ["input"], "outputs": ["output"]}],
        }
    )
    assert plan.version == PLAN_VERSION
    assert plan.model.name == "chain"  # served under the file's stem
    assert plan.stages[0].index == 0
    assert (plan.priority, plan.skip_unchanged_threshold, plan.feasible) == (0, 0.0, True)
    assert plan.to_dict()["model"] == {
        "path": "chain.onnx",
        "variant": None,
        "input": {"name": "input", "shape": [1, 3], "dtype": "FP32"},
    }


def test_an_infeasible_plan_places_nothing() -> None:
    doc = {**DOC, "feasible": False, "reason": "no tier meets the SLO", "stages": []}
    doc.update(transfers=[], alternatives=[], predictedLatencyMs=None)
    plan = PlanDocument.from_dict(doc)
    assert (plan.stages, plan.split) == ((), "")
    assert plan.to_dict() == doc


def _broken(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(DOC)
    target: Any = doc
    for key in path[:-1]:
        target = target[key]
    if value is None:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return doc


@pytest.mark.parametrize(
    ("path", "value", "field", "accepted"),
    [
        (("version",), PLAN_VERSION + 1, "plan.version", "1"),
        (("version",), "one", "plan.version", "an integer"),
        (("kind",), "Profile", "plan.kind", "Plan"),
        (("stages", 1, "inputs"), "t1", "plan.stages[1].inputs", None),
        (("stages", 1, "inputs"), ["t0"], "plan.stages[1].inputs", None),
        (("stages", 0, "tier"), "fog", "plan.stages[0].tier", "device, edge, cloud"),
        (("stages",), [], "plan.stages", "a list of stages"),
        (("stages",), None, "plan.stages", None),
        (("model",), None, "plan.model", None),
        (
            ("model", "zoo"),
            None,
            "plan.model",
            "{zoo: NAME}, {path: FILE.onnx} or {uri: ARTEFACT, digest: sha256:HEX}",
        ),
        (("model", "input"), None, "plan.model.input", None),
        (("model", "input", "shape"), [1, "8"], "plan.model.input.shape", "a list of integers"),
        (("transfers", 0, "bytes"), 1.5, "plan.transfers[0].bytes", "an integer"),
        (("alternatives", 0), "fast", "plan.alternatives[0]", None),
        (("priority",), "high", "plan.priority", "an integer"),
        (("preprocessing", "skipUnchangedThreshold"), "x", None, "a number"),
        (("privacy", "rawInputStaysOnDevice"), "yes", None, "true or false"),
        (("servingMs", "edge"), "fast", "plan.servingMs.edge", "a number"),
    ],
)
def test_malformed_documents_name_the_field(
    path: tuple[Any, ...], value: Any, field: str | None, accepted: str | None
) -> None:
    with pytest.raises(SpecError) as err:
        PlanDocument.from_dict(_broken(path, value))
    expected = field or "plan." + ".".join(str(p) for p in path)
    assert err.value.field == expected
    assert err.value.accepted == accepted


ARTIFACT_URI = "oci://127.0.0.1:5000/edgeai-models:net-int8-1a2b3c4d5e6f"
ARTIFACT_DIGEST = "sha256:" + "1a2b3c4d5e6f" + "0" * 52


def test_a_model_named_by_its_artefact_round_trips() -> None:
    doc = copy.deepcopy(DOC)
    doc["model"] = {
        "name": "net",
        "uri": ARTIFACT_URI,
        "variant": "int8",
        "build": "int8-dynamic",
        "input": {"name": "x", "shape": [1, 4], "dtype": "FP32"},
        "digest": ARTIFACT_DIGEST,
    }
    plan = PlanDocument.from_dict(doc)
    assert plan.to_dict() == doc
    model = plan.model
    assert (model.uri, model.digest, model.zoo, model.path) == (
        ARTIFACT_URI,
        ARTIFACT_DIGEST,
        None,
        None,
    )
    assert (model.name, model.variant, model.trained) == ("net", "int8", False)


@pytest.mark.parametrize("digest", [None, "1a2b" * 16, "sha256:" + "AB" * 32, "sha256:abc"])
def test_an_artefact_without_its_sha256_digest_is_refused(digest: str | None) -> None:
    doc = copy.deepcopy(DOC)
    doc["model"] = {"uri": ARTIFACT_URI, "input": {"shape": [1, 4]}}
    if digest is not None:
        doc["model"]["digest"] = digest
    with pytest.raises(SpecError) as err:
        PlanDocument.from_dict(doc)
    assert err.value.field == "plan.model.digest"
    assert ARTIFACT_URI in err.value.problem
    assert err.value.accepted == "sha256: followed by 64 lowercase hexadecimal digits"


def test_errors_name_where_the_document_came_from() -> None:
    with pytest.raises(SpecError) as err:
        PlanDocument.from_dict(_broken(("stages", 1, "inputs"), ["t0"]), field="plan-zone-a.yaml")
    assert err.value.field == "plan-zone-a.yaml.stages[1].inputs"
    assert "['t0'] are not stage 0's outputs ['t1']" in str(err.value)


# ---------------------------------------------------------------------------
# The operator's planning: spec.placement.partitioning and what reaches the plan

# A chain whose first segment shrinks the raw input 600-fold and whose rest is
# heavy: over a 20 Mbps uplink the best split runs the first segment on the slow
# device and the rest on the fast edge server.
PROFILE: dict[str, Any] = {
    "kind": "Profile",
    "model": "digits_cnn",
    "variant": "fp32",
    "input": {"name": "input", "shape": [1, 3, 224, 224], "dtype": "FP32"},
    "host": {},
    "cuts": [
        {"index": 0, "tensors": ["input"], "sizeBytes": 602112, "position": 0},
        {"index": 1, "tensors": ["t1"], "sizeBytes": 1000, "position": 1},
        {"index": 2, "tensors": ["output"], "sizeBytes": 40, "position": 2},
    ],
    "segments": [
        {"index": 0, "positions": "0-0", "flops": 10_000_000},
        {"index": 1, "positions": "1-1", "flops": 2_000_000_000},
    ],
}


def _node(name: str, tier: str, gflops: float, mbps: float | None) -> NodeState:
    labels = {"edgeai.dev/tier": tier, "topology.kubernetes.io/zone": "zone-a"}
    spec = NodeSpec(name, tier, "zone-a", {}, gflops, mbps, 1.0, None, labels)
    return NodeState(spec, ready=True, schedulable=True)


NODES = [_node("phone", "device", 2.0, 20.0), _node("gateway", "edge", 200.0, None)]


def _body(placement: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "edgeai.dev/v1alpha1",
        "kind": "DNNDeployment",
        "metadata": {"name": "cam", "namespace": "default"},
        "spec": {"modelRef": {"name": "digits"}, "placement": placement, **spec},
    }


def test_partitioning_none_places_the_whole_model_on_one_tier() -> None:
    auto = plan_zones(parse_deployment(_body({"tiers": ["device", "edge"]})), [PROFILE], NODES)
    assert auto.plans["zone-a"].split == "device:0 > edge:1"
    whole = plan_zones(
        parse_deployment(_body({"tiers": ["device", "edge"], "partitioning": "none"})),
        [PROFILE],
        NODES,
    )
    plan = whole.plans["zone-a"]
    assert [(s.tier, s.layers) for s in plan.stages] == [("edge", "0-1")]
    assert plan.stages[0].inputs == ("input",)
    assert plan.stages[0].outputs == ("output",)
    # no partitioning costs latency here: that is the point of the comparison
    assert (plan.predicted_latency_ms or 0.0) > (auto.plans["zone-a"].predicted_latency_ms or 0.0)


def test_the_plan_carries_preprocessing_priority_and_privacy_from_the_spec() -> None:
    body = _body(
        {"tiers": ["device", "edge"]},
        preprocessing={"skipUnchangedThreshold": 0.03},
        priority=7,
        privacy={"featureNoiseStd": 0.1},
    )
    zones = plan_zones(parse_deployment(body), [PROFILE], NODES)
    plan = zones.plans["zone-a"]
    assert (plan.skip_unchanged_threshold, plan.priority, plan.feature_noise_std) == (
        0.03,
        7,
        0.1,
    )
    doc = plan.to_dict()
    assert doc["preprocessing"] == {"skipUnchangedThreshold": 0.03}
    assert doc["priority"] == 7
    assert doc["zone"] == "zone-a"
    assert PlanDocument.from_dict(doc) == plan


def test_stage_settings_give_the_device_entry_the_plans_device_settings(tmp_path: Path) -> None:
    remote = PlanDocument.from_dict(
        {
            **DOC,
            "stages": [
                {"tier": "edge", "layers": "0-8", "inputs": ["input"], "outputs": ["output"]}
            ],
        }
    )
    settings = stage_settings(
        remote, -1, plan_path=tmp_path / "plan.yaml", workdir=tmp_path, host="h", port=1
    )
    assert settings == {
        "model_name": "digits_cnn",
        "host": "h",
        "port": 1,
        "tier": "device",
        "stage_index": 0,
        "next_urls": [],
        "partitions": [],
        "model_digest": None,
        "model_variant": "fp32",
        "model_uri": None,
        "default_priority": 100,
        "raw_input_stays_on_device": True,
        "feature_noise_std": 0.05,
        "skip_unchanged_threshold": 0.02,
    }
    with pytest.raises(SpecError, match="--stage: 1 is out of range"):
        stage_settings(remote, 1, plan_path=tmp_path, workdir=tmp_path, host="h", port=1)


def test_a_fallback_gives_the_device_stage_the_whole_model(tmp_path: Path) -> None:
    # the device entry answers alone even where the plan leaves the device out
    body = _body({"tiers": ["edge", "cloud"], "fallback": "device", "fallbackAfterMs": 250})
    plan = plan_zones(parse_deployment(body), [PROFILE], NODES).plans["zone-a"]
    assert plan.to_dict()["fallback"] == {"tier": "device", "afterMs": 250.0}
    assert PlanDocument.from_dict(plan.to_dict()) == plan
    whole = tmp_path / "model.onnx"
    whole.write_bytes(b"not read here")
    remote = PlanDocument.from_dict(
        {
            **DOC,
            "model": {**DOC["model"], "zoo": None, "path": str(whole)},
            "fallback": {"tier": "device", "afterMs": 250},
            "stages": [
                {"tier": "edge", "layers": "0-8", "inputs": ["input"], "outputs": ["output"]}
            ],
        }
    )
    kw: dict[str, Any] = {"plan_path": tmp_path / "plan.yaml", "workdir": tmp_path, "host": "h"}
    entry = stage_settings(remote, -1, port=1, next_urls=["http://edge:8080"], **kw)
    assert (entry["fallback_model"], entry["fallback_after_ms"]) == (str(whole), 250.0)
    # nothing to fall back from without a next stage
    assert "fallback_model" not in stage_settings(remote, -1, port=1, **kw)
    without = PlanDocument.from_dict({**DOC, "model": remote.model.to_dict()})
    assert "fallback_model" not in stage_settings(
        without, -1, port=1, next_urls=["http://edge:8080"], **kw
    )
    with pytest.raises(SpecError, match=r"plan.fallback.tier: 'cloud'"):
        PlanDocument.from_dict({**DOC, "fallback": {"tier": "cloud"}})
