"""A DNNModel's status from its preparation: one graph profile per ready variant with its
accuracy and artefact (so the cluster's planning picks a variant for
`slo.minAccuracy` and its stage pods load exactly that file), `spec.input` checked
against the model's own input, and an operator that never loads a model itself."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from edgeai_operator.deployspec import parse_deployment
from edgeai_operator.errors import SpecError
from edgeai_operator.localcluster import DEFAULT_TOPOLOGY
from edgeai_operator.modelspec import parse_model_spec
from edgeai_operator.plandoc import PlanDocument
from edgeai_operator.planning import NodeState, plan_zones
from edgeai_operator.preparation import prepared_status
from edgeai_operator.prepare import PrepareRequest, prepare
from edgeai_operator.topology import load_topology

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


def _prepared(spec: dict[str, Any], root: Path) -> dict[str, Any]:
    """What the operator writes to status once the preparation Job of `spec` is done:
    the Job's program (`prepare`) run here, its artefacts on a claim under `root`."""
    model = parse_model_spec(spec)
    request = PrepareRequest(
        source_uri=model.source.uri,
        inputs=(model.input,),
        artifacts_uri="pvc://models/digits",
        variants=tuple(v.request() for v in model.variants if v.name != "fp32"),
        model_name="digits",
    )
    result = prepare(request, root / "work", pvc_root=root / "pvc")
    status, _ = prepared_status(result.to_dict(), NODES, "digits-prepare-1-1")
    return status


@pytest.fixture(scope="module")
def status(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _prepared(SPEC, tmp_path_factory.mktemp("digits"))


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


def test_every_ready_variant_has_its_own_profile_accuracy_and_artifact(
    status: dict[str, Any],
) -> None:
    reports = {r["name"]: r for r in status["variants"]}
    profiles = {p["variant"]: p for p in status["profiles"]}
    assert list(profiles) == ["fp32", "int8", "pruned-50", "small"]
    for name, profile in profiles.items():
        assert reports[name]["ready"]
        assert profile["accuracy"] == reports[name]["accuracy"]
        assert 0.5 < profile["accuracy"] <= 1.0
        assert profile["model"] == "digits"
        assert len(profile["segments"]) == len(profile["cuts"]) - 1
        assert profile["artifact"]["digest"].startswith("sha256:")
        assert profile["artifact"]["uri"].startswith("pvc://models/digits/digits-")
    assert [profiles[n]["build"] for n in ("int8", "pruned-50", "small")] == [
        "int8-dynamic",
        "pruned",
        "distilled",
    ]
    # each profile is its own graph's: quantizing adds cut points, the student is smaller
    fp32_flops = sum(s["flops"] for s in profiles["fp32"]["segments"])
    assert len(profiles["int8"]["cuts"]) != len(profiles["fp32"]["cuts"])
    assert sum(s["flops"] for s in profiles["small"]["segments"]) < fp32_flops / 10
    assert status["variantNames"] == "fp32,int8,pruned-50,small"
    # the trained digits network: the zoo's held-out accuracy, not a random one's
    assert profiles["fp32"]["accuracy"] > 0.9


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
    # the stage pods load the artefact the chosen variant was built and profiled from
    plan = PlanDocument.from_dict(next(iter(zones.plans.values())).to_dict())
    small = next(p for p in status["profiles"] if p["variant"] == "small")
    assert (plan.model.uri, plan.model.digest) == (
        small["artifact"]["uri"],
        small["artifact"]["digest"],
    )
    assert plan.model.zoo is None
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
    field: str, value: Any, expected: str, tmp_path: Path
) -> None:
    spec = {**SPEC, "variants": [], "input": {**INPUT, field: value}}
    with pytest.raises(SpecError) as caught:
        _prepared(spec, tmp_path)
    assert caught.value.field == f"spec.input.{field}"
    assert expected in str(caught.value)
    assert not (tmp_path / "pvc").exists()  # nothing was stored


def test_the_batch_dimension_takes_any_size(status: dict[str, Any], tmp_path: Path) -> None:
    batched = _prepared(
        {**SPEC, "variants": [], "input": {**INPUT, "shape": [32, 1, 8, 8]}}, tmp_path
    )
    assert batched["profiles"][0]["cuts"] == status["profiles"][0]["cuts"]


def test_the_operator_never_loads_torch_scikit_learn_or_onnxruntime() -> None:
    """Every module `edgeai operator` loads, handlers and all: models are fetched,
    built and measured by preparation Jobs in the worker image, never here."""
    script = textwrap.dedent(
        """
        import sys
        import edgeai_operator.main, edgeai_operator.handlers
        from edgeai_operator import preparation, profiling, reconcile, planning
        from edgeai_worker.offload import exits  # planning's calibration of exit shares
        heavy = sorted(m for m in ("torch", "sklearn", "onnxruntime", "onnx") if m in sys.modules)
        print(",".join(heavy))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300
    )
    assert out.stdout.strip() == ""
