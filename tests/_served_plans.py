"""From a model to its answer through a plan: `edgeai profile`, `edgeai plan` over the
three tiers of the default topology (the device's uplink at 10 Mbit/s), the plan's
stages as worker processes, and the answer compared with onnxruntime's on the whole
model; used by the exported-graph and the corpus tests."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import yaml

from _real_graphs import BuiltModel
from _worker_support import run_onnx
from edgeai_operator import cli
from edgeai_operator.localworkers import answer_once
from edgeai_operator.partitions import load_plan

TOLERANCE = 1e-5
TOPOLOGY = Path(__file__).resolve().parents[1] / "hack" / "topology.yaml"


def _input_flags(built: BuiltModel) -> list[str]:
    return [
        *(
            f"--input-shape={name}={','.join(str(d) for d in shape)}"
            for name, shape in built.input_shapes.items()
        ),
        *(f"--input-value={name}={value:g}" for name, value in built.input_values.items()),
    ]


def profile_cli(
    built: BuiltModel, tmp: Path, capsys: pytest.CaptureFixture[str], repeats: int = 2
) -> Path:
    """`edgeai profile` of the model at its input shapes (and values); the saved
    profile's path."""
    saved = tmp / f"{built.path.stem}-profile.json"
    code = cli.main(
        ["profile", str(built.path), *_input_flags(built), "--repeats", str(repeats),
         "--idle-ms", "0", "--serving-requests", "0", "-o", "json", "--save", str(saved)]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return saved


def plan_cli(profile: Path, tmp: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    """`edgeai plan` over the three tiers of the default topology, with the profile."""
    manifest = tmp / "deployment.yaml"
    manifest.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "edgeai.dev/v1alpha1",
                "kind": "DNNDeployment",
                "metadata": {"name": "exported"},
                "spec": {
                    "modelRef": {"name": "exported"},
                    "placement": {"tiers": ["device", "edge", "cloud"]},
                },
            }
        )
    )
    code = cli.main(
        ["plan", "-f", str(manifest), "--topology", str(TOPOLOGY), "--profile", str(profile),
         "-o", "yaml"]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    plan: dict[str, Any] = yaml.safe_load(captured.out)
    return plan


def serve_and_compare(
    plan: dict[str, Any], built: BuiltModel, feeds: dict[str, np.ndarray], tmp: Path
) -> tuple[list[int], float]:
    """Run the plan's stages as worker processes, send `feeds` to the first one, and
    check that the answer holds every model output, in the model's order, as
    onnxruntime computes it on the whole model; the stages' partition counts and the
    largest absolute difference."""
    plan = {**plan, "model": {"path": str(built.path), "input": plan["model"]["input"]}}
    plan_path = tmp / "plan.yaml"
    plan_path.write_text(yaml.safe_dump(plan))
    loaded = load_plan(plan_path)
    workdir = tmp / f"stages-{len(plan['stages'])}"
    workdir.mkdir(exist_ok=True)
    specs, outputs = answer_once(loaded, built.path, workdir, feeds)
    model = onnx.load(built.path)
    names = [o.name for o in model.graph.output]
    assert [t.name for t in outputs] == names, "every model output, in the model's order"
    expected = run_onnx(built.path, feeds)
    largest = 0.0
    for tensor, want in zip(outputs, expected, strict=True):
        assert tensor.array.shape == want.shape, tensor.name
        assert np.abs(want).max() > 0, "an all-zero output would make the comparison vacuous"
        diff = float(np.abs(tensor.array.astype(np.float64) - want).max())
        assert diff <= TOLERANCE, f"{built.path.stem} {tensor.name}: max abs diff {diff}"
        largest = max(largest, diff)
    return [len(s.partitions) for s in specs], largest


def forced_plan(plan: dict[str, Any], profile: dict[str, Any]) -> dict[str, Any]:
    """The plan with its stages replaced by three, device, edge and cloud, split at two
    inner cuts of the profile (a third and two thirds of the way)."""
    cuts = profile["cuts"]
    assert len(cuts) >= 4, "two inner cuts are needed for three stages"
    picks = [cuts[0], cuts[len(cuts) // 3], cuts[2 * len(cuts) // 3], cuts[-1]]
    if picks[1] is picks[2]:
        picks[2] = cuts[-2]
    stages = [
        {
            "index": i,
            "tier": tier,
            "layers": f"{a['position']}-{b['position'] - 1}",
            "inputs": a["tensors"],
            "outputs": b["tensors"],
        }
        for i, (tier, (a, b)) in enumerate(
            zip(("device", "edge", "cloud"), itertools.pairwise(picks), strict=True)
        )
    ]
    return {**plan, "stages": stages, "transfers": [], "alternatives": []}
