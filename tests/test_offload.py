"""Per-input offloading: confidence rules and calibration on literals, the reuse cache's
bounds and digest isolation, the settings' errors; then the digits exits and cascade
(trained with torch) served by real worker processes on loopback: accuracy on held-out
digits at or above the calibration target, escalations carrying the right tensors,
reuse answering repeats."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from _worker_support import free_port, labelled_infer, metric_value, run_onnx, workers
from edgeai_worker.config import ConfigError, load_config
from edgeai_worker.offload.gate import NEVER, calibrate_thresholds, confidence
from edgeai_worker.offload.reuse import ReuseCache, calibrate_distance
from edgeai_worker.offload.settings import OffloadSettings, OffloadSettingsError

TARGET = 0.97


# ---------------------------------------------------------------- rules, calibration


def test_confidence_rules_on_literals() -> None:
    sure = np.array([[10.0, 0.0, 0.0]])
    unsure = np.array([[1.0, 1.0, 1.0]])
    assert confidence(sure, "maxProb")[0] == pytest.approx(1 / (1 + 2 * np.exp(-10)))
    assert confidence(unsure, "maxProb")[0] == pytest.approx(1 / 3)
    assert confidence(unsure, "entropy")[0] == pytest.approx(0.0, abs=1e-9)
    assert confidence(sure, "entropy")[0] > 0.99
    other_class = np.array([[0.0, 10.0, 0.0]])
    assert confidence(sure, "disagreement", other_class)[0] == 0.0
    assert confidence(sure, "disagreement", sure)[0] == confidence(sure, "maxProb")[0]
    with pytest.raises(ValueError, match="disagreement rule needs"):
        confidence(sure, "disagreement")
    with pytest.raises(ValueError, match="accepted: maxProb, entropy, disagreement"):
        confidence(sure, "margin")


def test_calibration_opens_an_exit_only_as_far_as_the_target_allows() -> None:
    # exit right on its 6 most confident samples, wrong on the 2 least; final always right
    conf = np.array([0.99, 0.95, 0.9, 0.85, 0.8, 0.7, 0.4, 0.3])
    correct = np.array([1, 1, 1, 1, 1, 1, 0, 0], dtype=bool)
    final = np.ones(8, dtype=bool)
    full = calibrate_thresholds([conf], [correct], final, 1.0)
    assert full.thresholds == (0.7,)
    assert full.exit_rates == (0.75,)
    assert full.accuracy == 1.0
    loose = calibrate_thresholds([conf], [correct], final, 7 / 8)
    assert loose.thresholds == (0.4,)
    assert loose.accuracy == 7 / 8
    # a target the final classifier misses keeps the exit closed
    closed = calibrate_thresholds([conf], [correct], np.zeros(8, dtype=bool), 0.9)
    assert closed.thresholds == (NEVER,)
    assert closed.exit_rates == (0.0,)


# ---------------------------------------------------------------------- reuse cache


def test_reuse_never_crosses_model_digests() -> None:
    cache: ReuseCache[str] = ReuseCache(capacity=4, max_distance=0.5)
    key = np.arange(8, dtype=np.float32)
    cache.insert("sha256:aaa", key, "answer of model a")
    assert cache.lookup("sha256:bbb", key) is None
    found = cache.lookup("sha256:aaa", key + 0.1)
    assert found is not None
    assert found[0] == "answer of model a"
    assert found[1] == pytest.approx(0.1, abs=1e-6)
    assert cache.lookup("sha256:aaa", key + 0.6) is None  # beyond the threshold
    assert (cache.lookups, cache.hits) == (3, 1)


def test_reuse_is_bounded_and_evicts_the_least_recently_used() -> None:
    cache: ReuseCache[int] = ReuseCache(capacity=3, max_distance=0.0)
    keys = [np.full(4, float(i)) for i in range(5)]
    cache.insert("d", keys[0], 0)
    cache.insert("d", keys[1], 1)
    cache.insert("d", keys[2], 2)
    assert cache.lookup("d", keys[0]) == (0, 0.0)  # 0 is now the most recent
    for i in (3, 4):
        cache.insert("other" if i == 4 else "d", keys[i], i)
        assert len(cache) <= 3
    assert len(cache) == 3
    assert cache.lookup("d", keys[1]) is None  # evicted first (least recently used)
    assert cache.lookup("d", keys[2]) is None
    assert cache.lookup("d", keys[0]) == (0, 0.0)
    assert cache.lookup("d", keys[3]) == (3, 0.0)
    assert cache.digests() == {"d", "other"}
    with pytest.raises(ValueError, match="capacity must be at least 1"):
        ReuseCache(0, 1.0)


def test_reuse_distance_calibration_keeps_the_accuracy_loss_bound() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(10, 16))
    labels = [i % 10 for i in range(200)]
    keys = [centres[y] + rng.normal(scale=0.05, size=16) for y in labels]
    # an easily confused pair: class 9 lies next to class 8
    keys = [
        k if y != 9 else centres[8] + 0.2 + rng.normal(scale=0.05, size=16)
        for k, y in zip(keys, labels, strict=True)
    ]
    calibration = calibrate_distance(keys, labels, labels, capacity=64, max_accuracy_loss=0.0)
    assert calibration.accuracy_loss == 0.0
    assert calibration.hit_rate > 0.5
    loose = calibrate_distance(keys, labels, labels, capacity=64, max_accuracy_loss=0.2)
    assert loose.max_distance >= calibration.max_distance
    assert loose.accuracy_loss <= 0.2


def test_the_operator_reads_a_workers_offload_counters() -> None:
    from edgeai_operator.autoscaler import offload_observed, parse_metrics
    from edgeai_worker.metrics import WorkerMetrics

    metrics = WorkerMetrics()
    metrics.exit_answers.inc(3, stage="0", exit="exit_0")
    metrics.exit_answers.inc(1, stage="0", exit="cascade")
    metrics.escalations.inc(1, stage="0")
    metrics.labelled.inc(5, stage="0")
    metrics.labelled_correct.inc(4, stage="0")
    scrape = parse_metrics(metrics.render())
    assert scrape.offload["edgeai_exit_answers_total"] == 4
    assert offload_observed([scrape]) == {
        "exitRate": 0.8,
        "escalationRate": 0.2,
        "labelledRequests": 5.0,
        "labelledAccuracy": 0.8,
    }


# ----------------------------------------------------------------------- settings


def test_offload_settings_errors_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(OffloadSettingsError, match=r"offload.rule: unknown rule 'top5'"):
        OffloadSettings.from_dict({"rule": "top5"})
    with pytest.raises(OffloadSettingsError, match=r"offload.cascadeModels: the disagreement"):
        OffloadSettings.from_dict({"rule": "disagreement", "cascadeModels": ["a.onnx"]})
    with pytest.raises(OffloadSettingsError, match=r"offload.exits\[0\].threshold: 2.0"):
        OffloadSettings.from_dict({"exits": [{"output": "exit_0", "threshold": 2}]})
    with pytest.raises(OffloadSettingsError, match=r"unknown field\(s\) \['cache'\]"):
        OffloadSettings.from_dict({"cache": 3})
    settings = OffloadSettings.from_dict(
        {"exits": [{"output": "exit_0", "threshold": 0.5}], "reuseEntries": 8}, tmp_path
    )
    assert OffloadSettings.from_dict(settings.to_dict()) == settings
    config_file = tmp_path / "worker.json"
    config_file.write_text(json.dumps({"offload": {"rule": "top5"}}))
    with pytest.raises(ConfigError, match=r"^offload.rule: unknown rule") as info:
        load_config(config_file, environ={})
    assert info.value.field_name == "offload.rule"


# --------------------------------------------------- digits exits and cascade, served


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    from edgeai_worker.offload.build import build_digits_offload

    workdir = tmp_path_factory.mktemp("offload")
    return workdir, build_digits_offload(workdir, TARGET, progress=False)


def _output(body: dict[str, Any]) -> np.ndarray:
    (output,) = body["outputs"]
    assert output["name"] == "output"
    return np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("rule", ["maxProb", "entropy"])
def test_early_exits_hold_the_target_and_forward_features(
    digits: tuple[Path, dict[str, Any]], rule: str, tmp_path: Path
) -> None:
    from edgeai_worker.offload.build import validation_split

    workdir, calibration = digits
    thresholds = calibration[rule]["exitThresholds"]
    _, _, x_ho, y_ho = validation_split()
    exits_out = run_onnx(workdir / "exits.onnx", {"input": x_ho})
    full_out = run_onnx(workdir / "full.onnx", {"input": x_ho})[0]
    edge_port = free_port()
    edge = {
        "model_name": "digits",
        "tier": "edge",
        "stage_index": 1,
        "port": edge_port,
        "partitions": [str(workdir / "edge-from-features.onnx")],
    }
    device = {
        "model_name": "digits",
        "tier": "device",
        "partitions": [str(workdir / "device-exits.onnx")],
        "next_urls": [f"http://127.0.0.1:{edge_port}"],
        "offload": {
            "rule": rule,
            "exits": [{"output": f"exit_{k}", "threshold": t} for k, t in enumerate(thresholds)],
        },
    }
    answered: dict[str, int] = {}
    with workers(tmp_path, device, edge) as (dev, nxt):
        for i, (x, y) in enumerate(zip(x_ho, y_ho, strict=True)):
            body = labelled_infer(dev.url, x[None], int(y))
            which = body["parameters"]["edgeai_exit"]
            answered[which] = answered.get(which, 0) + 1
            got = _output(body)[0]
            if which == "final":
                # escalated: the edge ran the backbone's rest on features_1, exactly
                np.testing.assert_allclose(got, full_out[i], rtol=1e-4, atol=1e-4)
            else:
                k = int(which.removeprefix("exit_"))
                np.testing.assert_allclose(got, exits_out[1 + k][i], rtol=1e-5, atol=1e-5)
        accuracy = metric_value(dev.url, "edgeai_labelled_accuracy")
        escalated = metric_value(dev.url, "edgeai_escalations_total")
        forwarded = metric_value(nxt.url, "edgeai_requests_total", code="200")
        exit_rate = metric_value(dev.url, "edgeai_exit_rate", exit="exit_0")
    assert accuracy >= TARGET
    assert answered.get("final", 0) == escalated == forwarded
    assert answered.get("exit_0", 0) > 0.5 * len(y_ho)  # most digits leave at the first exit
    assert exit_rate == pytest.approx(answered["exit_0"] / len(y_ho))


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("rule", ["maxProb", "disagreement"])
def test_cascade_holds_the_target_and_escalates_the_raw_input(
    digits: tuple[Path, dict[str, Any]], rule: str, tmp_path: Path
) -> None:
    from edgeai_worker.offload.build import validation_split

    workdir, calibration = digits
    _, _, x_ho, y_ho = validation_split()
    small_out = run_onnx(workdir / "small.onnx", {"input": x_ho})[0]
    full_out = run_onnx(workdir / "full.onnx", {"input": x_ho})[0]
    smalls = ["small.onnx", "small2.onnx"] if rule == "disagreement" else ["small.onnx"]
    edge_port = free_port()
    edge = {
        "model_name": "digits",
        "tier": "edge",
        "stage_index": 1,
        "port": edge_port,
        "partitions": [str(workdir / "full.onnx")],
        "offload": {"reuseEntries": 64, "reuseMaxDistance": 0.0},
    }
    device = {
        "model_name": "digits",
        "tier": "device",
        "next_urls": [f"http://127.0.0.1:{edge_port}"],
        "offload": {
            "rule": rule,
            "cascadeModels": [str(workdir / m) for m in smalls],
            "cascadeThreshold": calibration[rule]["cascadeThreshold"],
        },
    }
    answered: dict[str, int] = {}
    with workers(tmp_path, device, edge) as (dev, nxt):
        for i, (x, y) in enumerate(zip(x_ho, y_ho, strict=True)):
            body = labelled_infer(dev.url, x[None], int(y))
            which = body["parameters"]["edgeai_exit"]
            answered[which] = answered.get(which, 0) + 1
            expected = small_out[i] if which == "cascade" else full_out[i]
            np.testing.assert_allclose(_output(body)[0], expected, rtol=1e-4, atol=1e-4)
        # an escalated input again: the edge answers it from its cache, the same answer
        escalated_rows = [
            i
            for i in range(len(y_ho))
            if labelled_infer(dev.url, x_ho[i][None])["parameters"]["edgeai_exit"] == "final"
        ][:3]
        repeats = [labelled_infer(dev.url, x_ho[i][None]) for i in escalated_rows]
        accuracy = metric_value(dev.url, "edgeai_labelled_accuracy")
        hits = metric_value(nxt.url, "edgeai_reuse_hits_total")
        entries = metric_value(nxt.url, "edgeai_reuse_entries")
    assert accuracy >= TARGET
    assert 0 < answered.get("final", 0) < 0.2 * len(y_ho)
    assert escalated_rows, "no input escalated"
    for i, body in zip(escalated_rows, repeats, strict=True):
        assert body["parameters"]["edgeai_reused"] is True
        np.testing.assert_allclose(_output(body)[0], full_out[i], rtol=1e-4, atol=1e-4)
    assert hits >= 2 * len(escalated_rows)  # the rescan and the repeats
    assert entries <= 64


# ------------------------------------------------- spec.offload -> plan -> stage workers


def _deployment(offload: Any, tiers: list[str] | None = None, adaptive: bool = False) -> Any:
    from edgeai_operator.deployspec import parse_deployment

    spec: dict[str, Any] = {"model": {"zoo": "digits_cnn"}, "offload": offload}
    if tiers is not None:
        spec["placement"] = {"tiers": tiers}
    if adaptive:
        spec["placement"] = {**spec.get("placement", {}), "adaptiveSplit": True}
    return parse_deployment(
        {"apiVersion": "edgeai.dev/v1alpha1", "kind": "DNNDeployment",
         "metadata": {"name": "d"}, "spec": spec}
    )  # fmt: skip


def test_spec_offload_is_read_and_its_errors_name_the_field() -> None:
    from edgeai_operator.errors import SpecError

    spec = _deployment(
        {"cascade": {"rule": "entropy", "targetAccuracy": 0.96}, "reuse": {"maxEntries": 32}}
    )
    assert spec.offload is not None
    assert (spec.offload.cascade_rule, spec.offload.target_accuracy) == ("entropy", 0.96)
    assert (spec.offload.reuse_entries, spec.offload.reuse_max_accuracy_loss) == (32, 0.005)
    assert spec.offload.exits_rule is None
    exits = _deployment({"exits": {"rule": "entropy", "targetAccuracy": 0.95}}).offload
    assert exits is not None
    assert (exits.exits_rule, exits.exits_target_accuracy, exits.cascade_rule) == (
        "entropy",
        0.95,
        None,
    )
    refused = [
        (
            {"exits": {"rule": "disagreement", "targetAccuracy": 0.9}},
            None,
            "spec.offload.exits.rule",
        ),
        ({"exits": {}}, None, "spec.offload.exits.targetAccuracy"),
        ({"exits": {"targetAccuracy": 0.9, "at": 1}}, None, "spec.offload.exits"),
        (
            {
                "exits": {"targetAccuracy": 0.9},
                "cascade": {"rule": "entropy", "targetAccuracy": 0.9},
            },
            None,
            "spec.offload.exits.rule",
        ),
        ({"cascade": {"targetAccuracy": 0.9}}, ["edge", "cloud"], "spec.offload.cascade"),
        ({"reuse": {}}, ["device"], "spec.offload.reuse"),
        ({"cascade": {"rule": "vote", "targetAccuracy": 0.9}}, None, "spec.offload.cascade.rule"),
        ({"cascade": {}}, None, "spec.offload.cascade.targetAccuracy"),
        ({"cascade": {"targetAccuracy": 1.5}}, None, "spec.offload.cascade.targetAccuracy"),
        ({"reuse": {"maxEntries": 0}}, None, "spec.offload.reuse.maxEntries"),
        ({"reuse": {"maxAccuracyLoss": 0.5}}, None, "spec.offload.reuse.maxAccuracyLoss"),
        ({"cache": {}}, None, "spec.offload"),
        ({}, None, "spec.offload"),
    ]
    for offload, tiers, field in refused:
        with pytest.raises(SpecError) as info:
            _deployment(offload, tiers)
        assert str(info.value).startswith(field + ":"), (offload, str(info.value))
    with pytest.raises(SpecError, match=r"^spec.offload.exits: .*adaptive split"):
        _deployment({"exits": {"targetAccuracy": 0.9}}, adaptive=True)


RELU_1 = "/features/features.1/Relu_output_0"  # digits_cnn's first ReLU, exit_0's input


def _offload_plan(
    offload: dict[str, Any], zoo_name: str = "digits_cnn", device_layers: bool = False
) -> Any:
    from edgeai_operator.plandoc import PlanDocument

    if device_layers:  # the device runs the first convolution and ReLU, the edge the rest
        stages = [
            {"index": 0, "tier": "device", "layers": "0-1",
             "inputs": ["input"], "outputs": [RELU_1]},
            {"index": 1, "tier": "edge", "layers": "2-8",
             "inputs": [RELU_1], "outputs": ["output"]},
        ]  # fmt: skip
        return PlanDocument.from_dict(
            {**_offload_plan(offload, zoo_name).to_dict(), "stages": stages}
        )
    return PlanDocument.from_dict(
        {
            "kind": "Plan",
            "model": {
                "zoo": zoo_name,
                "trained": zoo_name == "digits_cnn",
                "input": {"name": "input", "shape": [1, 1, 8, 8], "dtype": "FP32"},
            },
            "stages": [
                {
                    "index": 0,
                    "tier": "device",
                    "layers": "",
                    "inputs": ["input"],
                    "outputs": ["input"],
                },
                {
                    "index": 1,
                    "tier": "edge",
                    "layers": "0-6",
                    "inputs": ["input"],
                    "outputs": ["output"],
                },
            ],
            "offload": offload,
        }
    )


def test_the_plan_carries_offload_and_refuses_models_without_exits(tmp_path: Path) -> None:
    from edgeai_operator.errors import SpecError
    from edgeai_operator.partitions import offload_settings

    section = {
        "cascade": {"rule": "disagreement", "targetAccuracy": 0.97},
        "reuse": {"maxEntries": 64, "maxAccuracyLoss": 0.01},
    }
    plan = _offload_plan(section)
    assert plan.offload is not None
    assert plan.to_dict()["offload"] == section
    assert type(plan).from_dict(plan.to_dict()) == plan
    other = _offload_plan(section, "mobilenet_v2")
    with pytest.raises(SpecError, match=r"^spec.offload: .*not model 'mobilenet_v2'"):
        offload_settings(other, 0, tmp_path)
    assert offload_settings(_offload_plan({"reuse": {"maxEntries": 8}}), 0, tmp_path) == {}
    with_exits = {
        "exits": {"rule": "entropy", "targetAccuracy": 0.95},
        "exitShares": {"exit_0": 0.9, "exit_1": 0.05, "final": 0.05},
    }
    plan = _offload_plan(with_exits)
    assert plan.offload.exits_rule == "entropy"
    assert plan.offload.exit_shares == with_exits["exitShares"]
    assert plan.to_dict()["offload"] == with_exits
    assert type(plan).from_dict(plan.to_dict()) == plan
    with pytest.raises(SpecError, match=r"^plan.offload.exits.targetAccuracy: "):
        type(plan).from_dict({**plan.to_dict(), "offload": {"exits": {"rule": "maxProb"}}})
    with pytest.raises(SpecError, match=r"^spec.offload: .*not model 'mobilenet_v2'"):
        offload_settings(_offload_plan(with_exits, "mobilenet_v2"), 0, tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_plan_with_offload_runs_the_cascade_and_the_reuse(tmp_path: Path) -> None:
    from edgeai_operator.localworkers import start_local
    from edgeai_operator.partitions import build_partitions, model_file
    from edgeai_worker.offload.build import validation_split

    plan = _offload_plan(
        {
            "cascade": {"rule": "maxProb", "targetAccuracy": TARGET},
            "reuse": {"maxEntries": 128, "maxAccuracyLoss": 0.0},
        }
    )
    model = model_file(plan, tmp_path)
    specs = build_partitions(plan.stages, plan.alternatives, model, tmp_path)
    run = start_local(plan, specs, tmp_path, model_path=model)
    _, _, x_ho, y_ho = validation_split()
    try:
        answers = [
            labelled_infer(run.entry_url, x[None], int(y), run.model_name)
            for x, y in zip(x_ho, y_ho, strict=True)
        ]
        escalated = [i for i, a in enumerate(answers) if a["parameters"]["edgeai_exit"] == "final"]
        assert escalated, "no input escalated"
        again = labelled_infer(run.entry_url, x_ho[escalated[0]][None], model=run.model_name)
        accuracy = metric_value(run.entry_url, "edgeai_labelled_accuracy")
        reuse_entries = metric_value(run.urls[1][0], "edgeai_reuse_entries")
        reuse_hits = metric_value(run.urls[1][0], "edgeai_reuse_hits_total")
    finally:
        run.stop()
    exits = {a["parameters"]["edgeai_exit"] for a in answers}
    assert exits == {"cascade", "final"}
    assert len(escalated) < 0.2 * len(answers)
    assert accuracy >= TARGET
    assert again["parameters"]["edgeai_reused"] is True
    assert again["outputs"][0]["data"] == answers[escalated[0]]["outputs"][0]["data"]
    # every escalation reached the edge once, and was stored or answered from the cache
    assert reuse_entries + reuse_hits == len(escalated) + 1
    assert reuse_entries <= 128


# ------------------------------------------- spec.offload.exits: stages cut with exits


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_plan_with_exits_answers_at_the_stage_computing_each_exit(tmp_path: Path) -> None:
    """The plan's cuts apply to digits_cnn with its prebuilt exit heads grafted on: the
    device (first ReLU) computes exit_0, the edge exit_1; each answers when confident,
    and an escalation reaches the model's own output unchanged."""
    import onnx

    from edgeai_operator.localworkers import start_local
    from edgeai_operator.partitions import (
        build_partitions,
        exit_heads,
        model_file,
        offload_settings,
    )
    from edgeai_worker.offload.build import validation_split

    plan = _offload_plan(
        {"exits": {"rule": "maxProb", "targetAccuracy": TARGET}}, device_layers=True
    )
    model = model_file(plan, tmp_path)
    specs = build_partitions(
        plan.stages, plan.alternatives, model, tmp_path, exits=exit_heads(plan)
    )
    device_outputs = [o.name for o in onnx.load(str(specs[0].partitions[0])).graph.output]
    edge_outputs = [o.name for o in onnx.load(str(specs[1].partitions[0])).graph.output]
    assert device_outputs == [RELU_1, "exit_0"]
    assert edge_outputs == ["output", "exit_1"]
    device_exits = offload_settings(plan, 0, tmp_path, model)["offload"]["exits"]
    edge_exits = offload_settings(plan, 1, tmp_path, model)["offload"]["exits"]
    assert [e["output"] for e in device_exits] == ["exit_0"]
    assert [e["output"] for e in edge_exits] == ["exit_1"]
    _, _, x_ho, y_ho = validation_split()
    full_out = run_onnx(model, {"input": x_ho})[0]
    run = start_local(plan, specs, tmp_path, model_path=model)
    try:
        answers = [
            labelled_infer(run.entry_url, x[None], int(y), run.model_name)
            for x, y in zip(x_ho, y_ho, strict=True)
        ]
        accuracy = metric_value(run.entry_url, "edgeai_labelled_accuracy")
        edge_requests = metric_value(run.urls[1][0], "edgeai_requests_total", code="200")
    finally:
        run.stop()
    which = [a["parameters"]["edgeai_exit"] for a in answers]
    assert accuracy >= TARGET
    assert which.count("exit_0") > 0.5 * len(which)  # most digits leave on the device
    assert edge_requests == len(which) - which.count("exit_0")
    finals = [i for i, w in enumerate(which) if w == "final"]
    for i in finals:
        np.testing.assert_allclose(_output(answers[i])[0], full_out[i], rtol=1e-4, atol=1e-4)
    assert set(which) <= {"exit_0", "exit_1", "final"}


_NO_TORCH = """
import importlib.abc, sys
class _Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this process")
        return None
sys.meta_path.insert(0, _Blocked())
"""

_SERVE_WITHOUT_TORCH = """
import json, sys
from pathlib import Path
import numpy as np
from edgeai_operator.plandoc import PlanDocument
from edgeai_operator.partitions import build_partitions, exit_heads, model_file, offload_settings
from edgeai_worker.offload.build import validation_split
from edgeai_worker.runtime import Partition
try:
    import torch
except ImportError as exc:
    blocked = str(exc)
else:
    sys.exit("torch was importable")
work = Path(sys.argv[1])
plan = PlanDocument.from_dict(json.loads((work / "plan.json").read_text()))
model = model_file(plan, work)
specs = build_partitions(plan.stages, plan.alternatives, model, work, exits=exit_heads(plan))
settings = [offload_settings(plan, i, work, model) for i in range(len(plan.stages))]
_, _, x, _ = validation_split()
partition = Partition(specs[0].partitions[0], 1)
partition.load()
out = partition.run({"input": x[:8]})
print(json.dumps({"blocked": blocked, "settings": settings, "deviceOutputs": sorted(out),
                  "torch": "torch" in sys.modules}))
"""


@pytest.mark.slow
def test_offload_stages_start_without_torch_from_the_prebuilt_files(tmp_path: Path) -> None:
    """A process where `import torch` fails (as in the worker image) cuts a plan with
    exits, cascade and reuse into stages and gets their settings from the prebuilt
    files, and the device partition runs with its exit."""
    import os
    import subprocess
    import sys

    from edgeai_worker.offload.build import prebuild_offload

    prebuild_offload(progress=False)  # the image build's step (torch, in this process)
    section = {
        "exits": {"rule": "maxProb", "targetAccuracy": TARGET},
        "cascade": {"rule": "maxProb", "targetAccuracy": TARGET},
        "reuse": {"maxEntries": 64, "maxAccuracyLoss": 0.01},
    }
    plan = _offload_plan(section, device_layers=True)
    (tmp_path / "plan.json").write_text(json.dumps(plan.to_dict()))
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_NO_TORCH)
    (tmp_path / "serve.py").write_text(_SERVE_WITHOUT_TORCH)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *sys.path])}
    done = subprocess.run(
        [sys.executable, str(tmp_path / "serve.py"), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["blocked"] == "torch is blocked in this process"
    assert result["torch"] is False
    device, edge = (s["offload"] for s in result["settings"])
    assert [e["output"] for e in device["exits"]] == ["exit_0"]
    assert 0.0 < device["exits"][0]["threshold"] <= 1.0
    assert device["cascadeModels"]
    assert 0.0 < device["cascadeThreshold"] <= 1.01
    assert [e["output"] for e in edge["exits"]] == ["exit_1"]
    assert edge["reuseEntries"] == 64
    assert edge["reuseMaxDistance"] >= 0.0
    assert result["deviceOutputs"] == sorted([RELU_1, "exit_0"])


# ------------------------------------- planning with the exit shares (offloadplan)


# A chain whose first segment keeps the raw input's size: without exits the edge runs
# everything (uploading the input costs what uploading the first segment's output
# does, and the edge computes faster); with an exit after that segment answering 96 %
# of validation inputs, the device runs it and most inputs never leave.
def _chain_profile(cut_bytes: list[int], flops: list[int]) -> dict[str, Any]:
    names = ["input", *(f"t{i}" for i in range(1, len(cut_bytes) - 1)), "output"]
    tensor = {"name": "input", "shape": [1, 3, 224, 224], "dtype": "FP32"}
    return {
        **dict(kind="Profile", model="digits_cnn", variant="fp32", input=tensor, host={}),
        "cuts": [
            {"index": i, "tensors": [n], "sizeBytes": b, "position": i}
            for i, (n, b) in enumerate(zip(names, cut_bytes, strict=True))
        ],
        "segments": [
            {"index": i, "positions": f"{i}-{i}", "flops": f} for i, f in enumerate(flops)
        ],
    }


EXIT_PROFILE = _chain_profile([602112, 602112, 40], [20_000_000, 2_000_000_000])
# 25 validation inputs: the exit is right on 24 of them (confidence 0.9), wrong on one
# (0.3); the model is right on all. For 0.97 the threshold is 0.9: 24/25 leave.
SECTION: dict[str, Any] = {
    "exits": [{"output": "exit_0", "after": "t1", "logitsBytes": 40, "headFlops": 1000}],
    "cascade": {"flops": [1_000_000, 500_000]},
    "validation": {
        "final_correct": [1] * 25,
        "exits_correct": [[1] * 24 + [0]],
        "exits_maxProb": [[0.9] * 24 + [0.3]],
        "exits_entropy": [[0.8] * 24 + [0.2]],
        "cascade_correct": [1] * 20 + [0] * 5,
        "cascade_maxProb": [0.95] * 20 + [0.5] * 5,
        "cascade_entropy": [0.9] * 20 + [0.4] * 5,
        "cascade_disagreement": [0.95] * 20 + [0.0] * 5,
    },
}


def _planned(offload: dict[str, Any] | None, section: dict[str, Any] | None = SECTION) -> Any:
    from edgeai_operator.deployspec import parse_deployment
    from edgeai_operator.planning import NodeState, plan_zones
    from edgeai_operator.topology import NodeSpec

    def node(name: str, tier: str, gflops: float, mbps: float | None) -> NodeState:
        labels = {"edgeai.dev/tier": tier, "topology.kubernetes.io/zone": "zone-a"}
        return NodeState(
            NodeSpec(name, tier, "zone-a", {}, gflops, mbps, 1.0, None, labels), True, True
        )

    spec: dict[str, Any] = {
        "modelRef": {"name": "digits"},
        "slo": {"latencyP95Ms": 100},
        "placement": {"tiers": ["device", "edge"]},
    }
    if offload is not None:
        spec["offload"] = offload
    body = {"apiVersion": "edgeai.dev/v1alpha1", "kind": "DNNDeployment",
            "metadata": {"name": "cam"}, "spec": spec}  # fmt: skip
    profile = {**EXIT_PROFILE, **({"offload": section} if section else {})}
    nodes = [node("phone", "device", 2.0, 100.0), node("gateway", "edge", 200.0, None)]
    return plan_zones(parse_deployment(body), [profile], nodes).plans["zone-a"]


def test_exit_shares_change_the_chosen_split_and_its_p95() -> None:
    from edgeai_operator.plandoc import PlanDocument

    plain = _planned(None)
    exits = _planned({"exits": {"rule": "maxProb", "targetAccuracy": 0.97}})
    assert plain.split == "edge:0-1"
    assert plain.offload is None
    assert exits.split == "device:0 > edge:1"
    assert exits.offload.exit_shares == {"exit_0": 0.96, "final": 0.04}
    # device: 20 MFLOPs at 2 GFLOPS = 10 ms (+ the head's 0.0005 ms) answers 96 %: the
    # p95 of the mix; the 4 % that go on upload 602112 B at 100 Mbit/s (48.2 ms)
    assert exits.predicted_latency_ms == pytest.approx(10.0005, abs=1e-3)
    assert plain.predicted_latency_ms > 55.0  # upload 48.2 + edge 10.1 + RTT 1
    expected_mean = 0.96 * 10.0005 + 0.04 * (10.0 + 48.17 + 10.0 + 1.0 + 0.0032)
    assert exits.objective_value == pytest.approx(expected_mean, rel=1e-3)
    assert exits.to_dict()["offload"]["exitShares"] == {"exit_0": 0.96, "final": 0.04}
    assert PlanDocument.from_dict(exits.to_dict()) == exits
    # no calibration in the profile: planned without exits, nothing expected
    unknown = _planned({"exits": {"rule": "maxProb", "targetAccuracy": 0.97}}, section=None)
    assert unknown.split == "edge:0-1"
    assert unknown.offload.exit_shares == {}


def test_a_cascade_is_planned_on_the_device_with_its_escalation_rate() -> None:
    # 20 of 25 validation inputs are answered by the small model at 0.95 (all right);
    # for 0.8 the threshold is 0.5 (20 right + 5 wrong = 0.8): everything stays on the
    # device; for 0.97, 0.95: 5 of 25 (0.2) escalate, the raw input to the edge
    lenient = _planned({"cascade": {"rule": "maxProb", "targetAccuracy": 0.8}})
    strict = _planned({"cascade": {"rule": "maxProb", "targetAccuracy": 0.97}})
    assert lenient.offload.exit_shares == {"cascade": 1.0, "final": 0.0}
    assert strict.offload.exit_shares == {"cascade": 0.8, "final": 0.2}
    assert strict.split == "edge:0-1"  # the escalations go up whole, as without a cascade
    # 1 MFLOPs at 2 GFLOPS on the device answers 80 %; p95 is an escalation's latency
    assert strict.predicted_latency_ms == pytest.approx(
        _planned(None).predicted_latency_ms + 0.5, abs=1e-3
    )
    assert lenient.predicted_latency_ms == pytest.approx(0.5, abs=1e-3)


def test_grafting_refuses_heads_built_for_another_backbone(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    from edgeai_worker.offload.build import prebuild_offload
    from edgeai_worker.offload.exits import graft_exits, read_heads

    heads = read_heads(prebuild_offload(progress=False))
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4])
    other = helper.make_model(
        helper.make_graph([helper.make_node("Relu", ["input"], ["output"])], "g", [x], [y])
    )
    with pytest.raises(ValueError, match=r"exit 'exit_0': the model computes no tensor '/features"):
        graft_exits(other, heads)
    taken = onnx.ModelProto()
    taken.CopyFrom(other)
    taken.graph.node[0].output[0] = RELU_1
    taken.graph.node.append(helper.make_node("Relu", [RELU_1], ["exit_0"]))
    with pytest.raises(ValueError, match=r"exit 'exit_0': the model already has a tensor"):
        graft_exits(taken, heads[:1])
