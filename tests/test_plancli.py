"""`edgeai plan` and `edgeai profile` end to end: the plan YAML the workers read, that
its stages really reproduce the model, and errors that name the bad field."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml

from edgeai_operator import cli
from edgeai_operator.plandoc import PLAN_VERSION, PlanDocument
from edgeai_worker import graph, zoo

TOPOLOGY = Path(__file__).resolve().parents[1] / "hack" / "topology.yaml"


def _manifest(tmp_path: Path, spec: dict[str, Any], name: str = "dep.yaml") -> Path:
    doc = {
        "apiVersion": "edgeai.dev/v1alpha1",
        "kind": "DNNDeployment",
        "metadata": {"name": "camera-detector"},
        "spec": spec,
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return path


def _topology(tmp_path: Path, device_mbps: float, *, edge: bool = True) -> Path:
    data = yaml.safe_load(TOPOLOGY.read_text())
    groups = []
    for group in data["nodeGroups"]:
        if group["tier"] == "device":
            group["uplinkMbps"] = device_mbps
        if group["tier"] == "edge" and not edge:
            continue
        groups.append(group)
    data["nodeGroups"] = groups
    path = tmp_path / f"topology-{device_mbps}-{edge}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _plan(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    code = cli.main(["plan", *args, "-o", "yaml"])
    out = capsys.readouterr().out
    return code, yaml.safe_load(out)


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    out = session.run(None, {n: feeds[n] for n in names})
    return dict(zip([o.name for o in session.get_outputs()], out, strict=True))


def test_plan_yaml_has_the_worker_contract_and_its_stages_reproduce_the_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = _manifest(
        tmp_path,
        {
            "model": {"zoo": "alexnet_like"},
            "slo": {"latencyP95Ms": 200},
            "placement": {"adaptiveSplit": True},
        },
    )
    code, plan = _plan(capsys, "-f", str(manifest), "--topology", str(_topology(tmp_path, 40)))
    assert code == 0
    assert plan["kind"] == "Plan"
    assert plan["version"] == PLAN_VERSION
    # what `edgeai plan` saves is what stages and run-local read back, unchanged
    assert PlanDocument.from_dict(plan).to_dict() == plan
    assert plan["preprocessing"] == {"skipUnchangedThreshold": 0.0}
    assert plan["priority"] == 0
    assert plan["feasible"] is True
    assert plan["reason"] == ""
    assert plan["model"] == {
        "zoo": "alexnet_like",
        "variant": "fp32",
        "input": {"name": "input", "shape": [1, 3, 224, 224], "dtype": "FP32"},
    }
    assert plan["objective"] == "latency"
    assert plan["slo"] == {"latencyP95Ms": 200}
    stages = plan["stages"]
    assert len(stages) >= 2, "40 Mbps to the edge splits alexnet"
    assert [s["index"] for s in stages] == list(range(len(stages)))
    assert stages[0]["inputs"] == ["input"]
    assert stages[-1]["outputs"] == ["output"]
    for a, b in itertools.pairwise(stages):
        assert a["outputs"] == b["inputs"]
    total = (
        sum(s["computeMs"] for s in stages)
        + sum(t["ms"] for t in plan["transfers"])
        + sum(plan["servingMs"].values())
    )
    assert plan["predictedLatencyMs"] == pytest.approx(total, abs=1e-3)
    assert len(plan["transfers"]) == len(stages) - 1 or stages[0]["tier"] != "device"
    assert plan["alternatives"][0]["minMbps"] == 0
    # the stages, run as standalone partitions one after another, are the model
    model = onnx.load(zoo.export_onnx("alexnet_like"))
    x = zoo.example_input("alexnet_like", seed=2)
    feeds = {"input": x}
    for stage in stages:
        feeds.update(_run(graph.extract_partition(model, stage["inputs"], stage["outputs"]), feeds))
    full = _run(model, {"input": x})["output"]
    assert float(np.abs(feeds["output"] - full).max()) <= 1e-5


def test_table_output_and_bandwidth_moves_the_split(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = _manifest(
        tmp_path, {"model": {"zoo": "vgg_like"}, "placement": {"adaptiveSplit": True}}
    )
    device_layers = []
    for mbps in (1, 50, 1000):
        code, plan = _plan(
            capsys, "-f", str(manifest), "--topology", str(_topology(tmp_path, mbps, edge=False))
        )
        assert code == 0
        device = [s for s in plan["stages"] if s["tier"] == "device"]
        count = 0
        if device:
            low, high = device[0]["layers"].split("-")
            count = int(high) - int(low) + 1
        device_layers.append(count)
    assert device_layers[0] > device_layers[-1]
    assert device_layers == sorted(device_layers, reverse=True)
    assert cli.main(["plan", "-f", str(manifest), "--topology", str(TOPOLOGY)]) == 0
    table = capsys.readouterr().out
    assert "STAGE  TIER" in table
    assert "predicted latency" in table
    assert "adaptive split" in table


def test_privacy_and_binary_offloading(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fast = str(_topology(tmp_path, 1000))
    private = _manifest(
        tmp_path,
        {"model": {"zoo": "alexnet_like"}, "privacy": {"rawInputStaysOnDevice": True}},
        "p.yaml",
    )
    _, plan = _plan(capsys, "-f", str(private), "--topology", fast)
    assert plan["stages"][0]["tier"] == "device"
    assert plan["transfers"][0]["bytes"] < 602112
    binary = _manifest(
        tmp_path,
        {"model": {"zoo": "alexnet_like"}, "placement": {"partitioning": "none"}},
        "b.yaml",
    )
    _, plan = _plan(capsys, "-f", str(binary), "--topology", fast)
    assert len(plan["stages"]) == 1
    assert plan["stages"][0]["layers"] == "0-18"


def test_infeasible_slo_exits_1_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = _manifest(tmp_path, {"modelRef": {"name": "resnet18"}, "slo": {"latencyP95Ms": 0.5}})
    code, plan = _plan(capsys, "-f", str(manifest), "--topology", str(TOPOLOGY))
    assert code == 1
    assert plan["feasible"] is False
    assert "latencyP95Ms=0.5 cannot be met" in plan["reason"]
    assert plan["stages"] == []


def test_profile_then_plan_with_measured_compute(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    saved = tmp_path / "profile.json"
    assert (
        cli.main(["profile", "digits_cnn", "--repeats", "3", "-o", "json", "--save", str(saved)])
        == 0
    )
    captured = capsys.readouterr()
    profile = json.loads(captured.out)
    assert "[edgeai profile]" in captured.err  # progress goes to stderr
    assert profile["kind"] == "Profile"
    assert profile["accuracy"] >= 0.95
    assert len(profile["segments"]) == len(profile["cuts"]) - 1
    manifest = _manifest(
        tmp_path, {"modelRef": {"name": "digits-cnn"}, "slo": {"minAccuracy": 0.9}}
    )
    code, plan = _plan(
        capsys, "-f", str(manifest), "--topology", str(TOPOLOGY), "--profile", str(saved)
    )
    assert code == 0
    assert plan["compute"]["method"] == "measured"
    assert plan["compute"]["hostGflops"] == profile["host"]["gflops"]
    measured = sum(s["measuredMs"] for s in profile["segments"])
    device_ms = plan["tiers"]["device"]["totalMs"]
    assert device_ms == pytest.approx(measured * profile["host"]["gflops"] / 8, rel=1e-3)
    # the serving overheads measured through a worker, fixed and per MB, scaled to the
    # 8 GFLOPS device like compute, are part of the prediction
    assert profile["servingMs"] > 0
    assert min(profile[k] for k in ("forwardingMs", "servingMsPerMB", "forwardingMsPerMB")) >= 0
    scale = profile["host"]["gflops"] / 8
    device = {
        key: profile[key] * scale
        for key in ("servingMs", "servingMsPerMB", "forwardingMs", "forwardingMsPerMB")
    }
    for key, ms in device.items():
        assert plan["tiers"]["device"][key] == pytest.approx(ms, rel=1e-3, abs=1e-3)
    # the device receives the raw input, and forwards what the first hop carries
    device_total = (
        device["servingMs"] + device["servingMsPerMB"] * profile["cuts"][0]["sizeBytes"] / 1e6
    )
    if len(plan["stages"]) > 1 or plan["stages"][0]["tier"] != "device":
        forwarded = plan["transfers"][0]["bytes"]
        device_total += device["forwardingMs"] + device["forwardingMsPerMB"] * forwarded / 1e6
    assert plan["servingMs"]["device"] == pytest.approx(device_total, rel=1e-3, abs=1e-3)
    total = (
        sum(s["computeMs"] for s in plan["stages"])
        + sum(t["ms"] for t in plan["transfers"])
        + sum(plan["servingMs"].values())
    )
    assert plan["predictedLatencyMs"] == pytest.approx(total, abs=1e-3)


BAD_SPECS = [
    (
        {"model": {"zoo": "alexnet_like"}, "slo": {"latencyP95Ms": -5}},
        "spec.slo.latencyP95Ms: must be a positive number, got -5",
    ),
    (
        {"model": {"zoo": "alexnet_like"}, "slo": {"latencyP95Ms": "fast"}},
        "spec.slo.latencyP95Ms: must be a number",
    ),
    (
        {"model": {"zoo": "alexnet_like"}, "slo": {"minAccuracy": 1.5}},
        "spec.slo.minAccuracy: must be at most 1",
    ),
    (
        {"model": {"zoo": "alexnet_like"}, "objective": "fastest"},
        "spec.objective: unknown value 'fastest'",
    ),
    (
        {"model": {"zoo": "alexnet_like"}, "placement": {"tiers": ["device", "moon"]}},
        "spec.placement.tiers[1]: unknown tier 'moon'",
    ),
    (
        {"model": {"zoo": "alexnet_like"}, "placement": {"partitioning": "random"}},
        "spec.placement.partitioning: unknown value 'random'",
    ),
    (
        {"model": {"zoo": "alexnet_like"}, "slo": {"latencyP99Ms": 5}},
        "spec.slo: unknown field(s) ['latencyP99Ms']",
    ),
    ({"slo": {"latencyP95Ms": 5}}, "spec.modelRef: is required"),
    ({"model": {"zoo": "lenet5"}}, "spec.model.zoo: unknown zoo model 'lenet5'"),
    (
        {"modelRef": {"name": "my-detector"}},
        "spec.modelRef.name: DNNModel 'my-detector' cannot be resolved offline",
    ),
    (
        {"model": {"zoo": "alexnet_like"}, "privacy": {"rawInputStaysOnDevice": "yes"}},
        "spec.privacy.rawInputStaysOnDevice: must be true or false",
    ),
    (
        {
            "model": {"zoo": "alexnet_like"},
            "placement": {"tiers": ["cloud"]},
            "privacy": {"rawInputStaysOnDevice": True},
        },
        "spec.privacy.rawInputStaysOnDevice: needs the device tier",
    ),
]


@pytest.mark.parametrize(("spec", "message"), BAD_SPECS)
def test_bad_manifests_name_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], spec: dict[str, Any], message: str
) -> None:
    manifest = _manifest(tmp_path, spec)
    assert cli.main(["plan", "-f", str(manifest), "--topology", str(TOPOLOGY)]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "(accepted:" in err or "DNNModel" in err


def test_bad_cli_arguments_name_the_argument(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["profile", "digits_cnn", "--repeats", "0"]) == 2
    assert "--repeats: must be a positive integer, got 0" in capsys.readouterr().err
    assert cli.main(["profile", "digits_cnn", "--idle-ms", "-5"]) == 2
    assert "--idle-ms: must be in 0-10000, got -5" in capsys.readouterr().err
    assert cli.main(["profile", "lenet5"]) == 2
    assert "MODEL: unknown model 'lenet5'" in capsys.readouterr().err
    manifest = _manifest(tmp_path, {"model": {"zoo": "alexnet_like"}})
    assert cli.main(["plan", "-f", str(tmp_path / "missing.yaml")]) == 2
    assert "-f: cannot read" in capsys.readouterr().err
    assert cli.main(["plan", "-f", str(manifest), "--profile", str(manifest)]) == 2
    assert "--profile: " in capsys.readouterr().err
    data = yaml.safe_load(TOPOLOGY.read_text())
    for group in data["nodeGroups"]:
        group.pop("uplinkMbps", None)
    no_links = tmp_path / "t.yaml"
    no_links.write_text(yaml.safe_dump(data))
    assert cli.main(["plan", "-f", str(manifest), "--topology", str(no_links)]) == 2
    assert "nodeGroups[device].uplinkMbps: is required for planning" in capsys.readouterr().err
    assert cli.main(["plan", "-f", str(manifest), "--zone", "zone-x"]) == 2
    assert "--zone: unknown zone 'zone-x'" in capsys.readouterr().err


@pytest.mark.parametrize("mbps", [5, 40])
def test_node_granularity_plans_the_dag_and_never_loses_to_segments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mbps: float
) -> None:
    manifest = _manifest(tmp_path, {"model": {"zoo": "resnet18"}})
    topology = str(_topology(tmp_path, mbps))
    _, by_segments = _plan(capsys, "-f", str(manifest), "--topology", topology)
    _, by_nodes = _plan(
        capsys, "-f", str(manifest), "--topology", topology, "--granularity", "nodes"
    )
    assert by_nodes["granularity"] == "nodes"
    assert by_nodes["solver"]["method"] == "mincut"
    # every segment split is also a node split with the same cost, so the DAG plan is
    # at least as fast
    assert by_nodes["predictedLatencyMs"] <= by_segments["predictedLatencyMs"] + 1e-6
    model = onnx.load(zoo.export_onnx("resnet18"))
    x = zoo.example_input("resnet18", seed=4)
    feeds = {"input": x}
    for stage in by_nodes["stages"]:
        feeds.update(_run(graph.extract_partition(model, stage["inputs"], stage["outputs"]), feeds))
    full = _run(model, {"input": x})["output"]
    assert float(np.abs(feeds["output"] - full).max()) <= 1e-5


def test_a_full_manifest_parses_into_planning_fields() -> None:
    from edgeai_operator.deployspec import parse_deployment

    spec = parse_deployment(
        {
            "apiVersion": "edgeai.dev/v1alpha1",
            "kind": "DNNDeployment",
            "metadata": {"name": "camera-detector"},
            "spec": {
                "model": {"zoo": "digits_cnn", "variant": "int8-static"},
                "slo": {"latencyP95Ms": 80, "throughputRps": 20, "minAccuracy": 0.95},
                "objective": "deviceEnergy",
                "placement": {
                    "tiers": ["device", "edge"],
                    "partitioning": "none",
                    "adaptiveSplit": False,
                },
                "privacy": {"rawInputStaysOnDevice": True, "featureNoiseStd": 0.05},
                "power": {"computeWatts": 3, "txWatts": 2, "rxWatts": 1, "idleWatts": 0.2},
                "cost": {"edgePerMs": 0.1, "cloudPerMs": 2},
                "devices": {"nodeSelector": {"app": "camera"}},  # not planning's business
            },
        }
    )
    assert (spec.name, spec.zoo, spec.variant, spec.model_ref) == (
        "camera-detector",
        "digits_cnn",
        "int8-static",
        None,
    )
    assert spec.slo_dict() == {"latencyP95Ms": 80.0, "throughputRps": 20.0, "minAccuracy": 0.95}
    assert spec.objective == "deviceEnergy"
    assert spec.tiers == ("device", "edge")
    assert spec.partitioning == "none"
    assert spec.adaptive_split is False
    assert spec.raw_input_stays_on_device is True
    assert spec.feature_noise_std == 0.05
    assert (spec.compute_watts, spec.tx_watts, spec.rx_watts, spec.idle_watts) == (
        3.0,
        2.0,
        1.0,
        0.2,
    )
    assert (spec.edge_cost_per_ms, spec.cloud_cost_per_ms) == (0.1, 2.0)


def test_accuracy_floor_picks_among_profiled_variants(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    profiles: dict[str, Path] = {}
    accuracy: dict[str, float] = {}
    for variant in ("fp32", "int8-static", "distilled"):
        path = tmp_path / f"{variant}.yaml"
        assert (
            cli.main(
                [
                    "profile",
                    "digits_cnn",
                    "--variant",
                    variant,
                    "--repeats",
                    "3",
                    "--save",
                    str(path),
                ]
            )
            == 0
        )
        capsys.readouterr()
        profiles[variant] = path
        accuracy[variant] = float(yaml.safe_load(path.read_text())["accuracy"])
    args = [arg for p in profiles.values() for arg in ("--profile", str(p))]

    def plan_for(floor: float, variant: str | None = None) -> dict[str, Any]:
        model: dict[str, Any] = {"zoo": "digits_cnn"}
        if variant:
            model["variant"] = variant
        manifest = _manifest(tmp_path, {"model": model, "slo": {"minAccuracy": floor}})
        code, plan = _plan(capsys, "-f", str(manifest), "--topology", str(TOPOLOGY), *args)
        assert code == 0
        return plan

    latency = {v: plan_for(0.5, v)["predictedLatencyMs"] for v in profiles}
    for floor in (0.5, (accuracy["distilled"] + accuracy["fp32"]) / 2):
        chosen = plan_for(floor)["model"]["variant"]
        eligible = [v for v in profiles if accuracy[v] >= floor]
        assert accuracy[chosen] >= floor
        assert latency[chosen] == min(latency[v] for v in eligible)
    assert accuracy["distilled"] < accuracy["fp32"], "the floor above excludes the student"


def test_profile_accepts_an_onnx_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = zoo.export_onnx("kws_lstm", tmp_path / "keywords.onnx")
    assert cli.main(["profile", str(path), "--repeats", "2", "-o", "json"]) == 0
    profile = json.loads(capsys.readouterr().out)
    assert profile["model"] == "keywords"
    assert profile["input"] == {"name": "input", "shape": [1, 49, 40], "dtype": "FP32"}
    assert len(profile["segments"]) == len(graph.cut_points(onnx.load(path))) - 1
    assert cli.main(["profile", str(tmp_path / "missing.onnx")]) == 2
    assert "MODEL: no such file" in capsys.readouterr().err
