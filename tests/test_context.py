"""The operator process's settings and shared state (context.py), no cluster."""

from __future__ import annotations

import subprocess
import sys

import pytest

from edgeai_operator.context import (
    MEMO_KEY,
    NodeTracker,
    OperatorContext,
    Settings,
    Wakeups,
    context_of,
)
from edgeai_operator.errors import SpecError


def test_settings_come_from_the_environment_once() -> None:
    settings = Settings.from_env(
        {
            "EDGEAI_WORKER_IMAGE": "registry.local/edgeai-worker:1.2",
            "EDGEAI_TRAINER_IMAGE": "registry.local/edgeai-trainer:1.2",
            "EDGEAI_RESYNC_SECONDS": "3",
            "EDGEAI_DEBOUNCE_SECONDS": "0.25",
        },
        metrics_port=9100,
    )
    assert settings == Settings(
        worker_image="registry.local/edgeai-worker:1.2",
        trainer_image="registry.local/edgeai-trainer:1.2",
        resync_s=3.0,
        debounce_s=0.25,
        profile_poll_s=5.0,
        metrics_port=9100,
    )
    assert Settings.from_env({}) == Settings()


@pytest.mark.parametrize("value", ["0", "-1", "soon", "nan"])
def test_a_bad_interval_names_its_variable(value: str) -> None:
    with pytest.raises(SpecError, match="EDGEAI_RESYNC_SECONDS"):
        Settings.from_env({"EDGEAI_RESYNC_SECONDS": value})


def test_the_default_artifact_store_comes_from_the_environment_checked() -> None:
    uri = "oci://registry.local:5000/edgeai-models"
    assert Settings.from_env({"EDGEAI_ARTIFACTS_URI": uri}).artifacts_uri == uri
    assert Settings.from_env({}).artifacts_uri is None
    # a tagged reference could not hold one artefact per variant: refused at start-up
    with pytest.raises(SpecError) as err:
        Settings.from_env({"EDGEAI_ARTIFACTS_URI": f"{uri}:v1"})
    assert err.value.field == "EDGEAI_ARTIFACTS_URI"


def test_the_ca_bundle_configmap_comes_from_the_environment_checked() -> None:
    env = {"EDGEAI_CA_BUNDLE_CONFIGMAP": "edgeai-ca-bundle"}
    assert Settings.from_env(env).ca_bundle_configmap == "edgeai-ca-bundle"
    assert Settings.from_env({"EDGEAI_CA_BUNDLE_CONFIGMAP": ""}).ca_bundle_configmap is None
    with pytest.raises(SpecError) as err:
        Settings.from_env({"EDGEAI_CA_BUNDLE_CONFIGMAP": "Team_CAs"})
    assert err.value.field == "EDGEAI_CA_BUNDLE_CONFIGMAP"
    assert "DNS-1123 subdomain" in str(err.value)


def test_the_node_epoch_moves_only_when_placement_could() -> None:
    tracker = NodeTracker()
    assert tracker.changed("edge-0", ("labels", "Ready"))
    assert not tracker.changed("edge-0", ("labels", "Ready"))  # a heartbeat
    assert tracker.changed("edge-0", ("labels", "NotReady"))
    assert tracker.changed("edge-0", None)  # deleted
    assert tracker.epoch == 3
    first = tracker.nodes([["a"], ["b"]])
    assert tracker.nodes([["other"]]) is first  # one list per epoch
    tracker.changed("edge-1", ("x",))
    assert tracker.nodes([["other"]]) == ["other"]


def test_wakeups_reach_the_daemons_of_a_model() -> None:
    wakeups = Wakeups()
    cam, door = wakeups.event_for("ns", "cam"), wakeups.event_for("ns", "door")
    wakeups.track_model("ns", "cam", "digits")
    wakeups.track_model("ns", "door", "resnet")
    wakeups.wake_model_users("ns", "digits")
    assert cam.is_set()
    assert not door.is_set()
    wakeups.forget("ns", "cam")
    wakeups.wake_all()
    assert door.is_set()


def test_handlers_find_the_context_in_the_memo() -> None:
    ctx = OperatorContext()
    assert context_of({MEMO_KEY: ctx}) is ctx
    with pytest.raises(RuntimeError, match="memo"):
        context_of({})


def test_the_operator_metrics_count_what_passes_report() -> None:
    metrics = OperatorContext().metrics
    metrics.inc("edgeai_operator_applies_total", 3)
    metrics.inc("edgeai_operator_reconciles_total")
    metrics.observe_reconcile(0.02)
    metrics.deployment_started()
    text = metrics.render()
    assert "edgeai_operator_applies_total 3\n" in text
    assert "edgeai_operator_reconciles_total 1\n" in text
    assert 'edgeai_operator_reconcile_seconds_bucket{le="0.025"} 1\n' in text
    assert 'edgeai_operator_reconcile_seconds_bucket{le="0.01"} 0\n' in text
    assert "edgeai_operator_deployments 1\n" in text
    with pytest.raises(ValueError, match="edgeai_operator_applies_total"):
        metrics.inc("edgeai_operator_apply_total")  # a typo is an error, not a new series


def test_the_operator_process_imports_no_model_library() -> None:
    """`edgeai operator` with every handler registered: torch, scikit-learn,
    onnxruntime and onnx stay out (model work runs in child processes and Jobs)."""
    script = (
        "import sys, edgeai_operator.cli, edgeai_operator.main, edgeai_operator.handlers\n"
        "print(sorted(m for m in ('torch', 'sklearn', 'onnxruntime', 'onnx') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]"
