"""A DNNModel's status: one graph profile per ready variant with its accuracy (so the
cluster's planning picks a variant for `slo.minAccuracy`), and `spec.input` checked
against the model's own input."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from edgeai_operator.deployspec import parse_deployment
from edgeai_operator.errors import SpecError
from edgeai_operator.localcluster import DEFAULT_TOPOLOGY
from edgeai_operator.partitions import model_file
from edgeai_operator.plandoc import PlanDocument
from edgeai_operator.planning import NodeState, plan_zones
from edgeai_operator.profiling import model_status, model_status_in_child
from edgeai_operator.topology import load_topology
from edgeai_worker import variants

INPUT = {"name": "input", "shape": [1, 1, 8, 8], "dtype": "FP32"}
SPEC: dict[str, Any] = {
    "source": {"zoo": "digits_cnn"},
    "input": INPUT,
    "variants": [
        {"name": "int8", "quantize": {"mode": "dynamic"}},
        {"name": "pruned-50", "prune": {"sparsity": 0.5}},
        {"name": "small", "distill": {}},
    ],
}
NODES = load_topology(DEFAULT_TOPOLOGY).nodes


@pytest.fixture(scope="module")
def status() -> dict[str, Any]:
    return model_status(SPEC, NODES)


def _deployment(min_accuracy: float | None) -> dict[str, Any]:
    slo: dict[str, Any] = {"latencyP95Ms": 500}
    if min_accuracy is not None:
        slo["minAccuracy"] = min_accuracy
    return {
        "apiVersion": "edgeai.dev/v1alpha1",
        "kind": "DNNDeployment",
        "metadata": {"name": "reader", "namespace": "default"},
        "spec": {"modelRef": {"name": "digits"}, "slo": slo},
    }


def test_every_ready_variant_has_its_own_profile_and_accuracy(status: dict[str, Any]) -> None:
    reports = {r["name"]: r for r in status["variants"]}
    profiles = {p["variant"]: p for p in status["profiles"]}
    assert list(profiles) == ["fp32", "int8", "pruned-50", "small"]
    for name, profile in profiles.items():
        assert reports[name]["ready"]
        assert profile["accuracy"] == reports[name]["accuracy"]
        assert 0.5 < profile["accuracy"] <= 1.0
        assert profile["model"] == "digits_cnn"
        assert len(profile["segments"]) == len(profile["cuts"]) - 1
    assert [profiles[n]["build"] for n in ("int8", "pruned-50", "small")] == [
        "int8-dynamic",
        "pruned-50",
        "distilled",
    ]
    # each profile is its own graph's: quantizing adds cut points, the student is smaller
    fp32_flops = sum(s["flops"] for s in profiles["fp32"]["segments"])
    assert len(profiles["int8"]["cuts"]) != len(profiles["fp32"]["cuts"])
    assert sum(s["flops"] for s in profiles["small"]["segments"]) < fp32_flops / 10
    assert status["variantNames"] == "fp32,int8,pruned-50,small"


def test_min_accuracy_picks_among_the_profiled_variants_in_the_cluster(
    status: dict[str, Any],
) -> None:
    nodes = [NodeState(n, True, True) for n in NODES]
    accuracy = {p["variant"]: p["accuracy"] for p in status["profiles"]}
    worst = min(accuracy, key=accuracy.__getitem__)
    assert worst == "small"
    assert accuracy["small"] < max(accuracy.values())
    # the student is the fastest, so with no floor a latency plan takes it
    zones = plan_zones(parse_deployment(_deployment(None)), status["profiles"], nodes)
    assert {plan.model.variant for plan in zones.plans.values()} == {"small"}
    # the stage pods load the file the chosen variant was built and profiled from
    plan = PlanDocument.from_dict(next(iter(zones.plans.values())).to_dict())
    assert (plan.model.build, plan.model.trained) == ("distilled", True)
    assert model_file(plan, Path("plan.yaml")) == variants.variant_path("digits_cnn", "distilled")
    floor = (accuracy["small"] + max(accuracy.values())) / 2
    zones = plan_zones(parse_deployment(_deployment(floor)), status["profiles"], nodes)
    chosen = {plan.model.variant for plan in zones.plans.values()}
    assert chosen
    assert "small" not in chosen
    assert all(accuracy[v] >= floor for v in chosen)
    # a floor above every variant: no plan, and the reason names the field
    zones = plan_zones(parse_deployment(_deployment(0.999)), status["profiles"], nodes)
    assert not zones.plans
    assert zones.unplanned
    for reason in zones.unplanned.values():
        assert "spec.slo.minAccuracy" in reason


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("shape", [1, 3, 8, 8], "spec.input.shape: [1, 3, 8, 8] does not fit the model's input"),
        ("shape", [1, 1, 8], "(accepted: [batch, 1, 8, 8], a named dimension taking any size)"),
        (
            "dtype",
            "INT64",
            "spec.input.dtype: INT64 is not the model's input type (accepted: FP32)",
        ),
        ("name", "image", "spec.input.name: 'image' is not the model's input (accepted: 'input')"),
    ],
)
def test_an_input_that_does_not_fit_the_model_is_a_spec_error(
    field: str, value: Any, expected: str
) -> None:
    spec = {**SPEC, "input": {**INPUT, field: value}}
    with pytest.raises(SpecError) as caught:
        model_status(spec, NODES)
    assert caught.value.field == f"spec.input.{field}"
    assert expected in str(caught.value)


def test_the_batch_dimension_takes_any_size(status: dict[str, Any]) -> None:
    batched = model_status({**SPEC, "input": {**INPUT, "shape": [32, 1, 8, 8]}}, NODES)
    assert batched["profiles"][0]["cuts"] == status["profiles"][0]["cuts"]


def test_the_operator_profiles_in_a_child_process_and_keeps_none_of_its_libraries(
    status: dict[str, Any],
) -> None:
    """What the DNNModel handler runs: the same status, computed in a process that
    exits, so torch never enters the operator's own memory."""
    script = textwrap.dedent(
        f"""
        import json, sys
        from edgeai_operator.localcluster import DEFAULT_TOPOLOGY
        from edgeai_operator.profiling import model_status_in_child
        from edgeai_operator.topology import load_topology
        nodes = load_topology(DEFAULT_TOPOLOGY).nodes
        result = model_status_in_child(json.loads({json.dumps(json.dumps(SPEC))}), nodes)
        heavy = sorted(m for m in ("torch", "onnxruntime", "sklearn") if m in sys.modules)
        print(json.dumps({{"status": result, "heavy": heavy}}))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=600
    )
    got = json.loads(out.stdout)
    assert got["heavy"] == []
    assert got["status"] == json.loads(json.dumps(status))


def test_a_spec_error_in_the_child_names_its_field() -> None:
    bad = {**SPEC, "input": {**INPUT, "shape": [1, 3, 8, 8]}}
    with pytest.raises(SpecError) as caught:
        model_status_in_child(bad, NODES)
    assert caught.value.field == "spec.input.shape"
