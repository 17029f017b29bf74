"""Corpus benchmark: published ONNX models that pip packages ship, through graph
analysis, planning and the plan's stages as worker processes. Writes JSON (`--out`,
default `docs/results/corpus.json`, which `make docs-numbers` renders into
`docs/architecture.md`) and prints the same table.

    python bench/corpus/run.py [--repeats 3] [--out FILE]

The corpus (`corpus_models`): every `.onnx` of rapidocr-onnxruntime (an OCR
detector, recogniser and direction classifier exported from PaddlePaddle) and of
silero-vad (voice-activity detectors with a recurrent state, `If` nodes, one in
half precision), and onnx's own light real-model set (its backend test data). For
each model, at the input shapes (and values) in `INPUTS` where it leaves them free:

- graph analysis time (`graph.analyze` + `graph.graph_cut_points`: shape inference,
  symbolic inference and the measured run where needed), median of `--repeats`;
- nodes (ONNX nodes and compute nodes), inputs/outputs, cuts and the largest cut's
  bytes;
- the split `edgeai plan` chooses with the default topology (device 8 GFLOPS, edge
  150, cloud 1500; the device's uplink 10 Mbit/s, 15 ms), computing from FLOPs
  (`--compute analytic`: the same on every machine);
- the largest absolute difference between the answer of that plan's stages, run as
  worker processes, and onnxruntime on the whole model; and the same for three
  stages (device, edge, cloud) split at the inner cuts a third and two thirds of
  the way, as most planned splits keep such small models on one tier; and over
  every cut tensor, the segments between all cuts chained in onnxruntime against
  the whole model with those tensors exposed, relative to each tensor's largest
  magnitude where it is above 1 (onnx's light models have constant weights: their final outputs are
  constant, their activations are not, and reach 1e24).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from edgeai_operator.deployspec import parse_deployment
from edgeai_operator.localworkers import answer_once
from edgeai_operator.plandoc import PlanDocument, PlanStage
from edgeai_operator.problem import build_problem, graph_profile, plan_document, solve
from edgeai_operator.topology import load_topology
from edgeai_worker import graph

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
TOPOLOGY = ROOT / "hack" / "topology.yaml"
sys.path.insert(0, str(HERE.parent))  # the renderer beside the benches prints the table

import render_numbers  # noqa: E402

# The packages whose shipped models make the corpus, and where under each they lie.
PACKAGES = {
    "rapidocr_onnxruntime": "models/*.onnx",
    "silero_vad": "data/*.onnx",
    "onnx": "backend/test/data/light/*.onnx",
}
# Sizes for the dimensions a model leaves free, and values for inputs it branches on
# (silero-vad's sample rate picks its 16 kHz branch; 512 samples is its 16 kHz chunk).
# A free first dimension is the batch, profiled at 1 (silero_vad_16k_sequence's
# sequence_length too: it needs nothing here).
_VAD = {"input": [1, 512], "state": [2, 1, 128]}
INPUTS: dict[str, tuple[dict[str, list[int]], dict[str, float]]] = {
    "ch_PP-OCRv4_det_infer": ({"x": [1, 3, 640, 640]}, {}),
    "ch_PP-OCRv4_rec_infer": ({"x": [1, 3, 48, 320]}, {}),
    "ch_ppocr_mobile_v2.0_cls_infer": ({"x": [1, 3, 48, 192]}, {}),
    "silero_vad": (_VAD, {"sr": 16000}),
    "silero_vad_16k_op15": (_VAD, {"sr": 16000}),
    "silero_vad_op18_ifless": (_VAD, {"sr": 16000}),
    "silero_vad_half": (_VAD, {}),
}


@dataclass(frozen=True)
class CorpusModel:
    package: str
    path: Path
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    input_values: dict[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.stem


def corpus_models() -> list[CorpusModel]:
    """Every model of the corpus packages, sorted by package and name; a package that
    is not installed is an ImportError (they are the `dev` extra)."""
    found: list[CorpusModel] = []
    for package, pattern in PACKAGES.items():
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise ImportError(f"{package} is not installed (pip install -e '.[dev]')")
        for path in sorted(Path(spec.origin).parent.glob(pattern)):
            shapes, values = INPUTS.get(path.stem, ({}, {}))
            found.append(CorpusModel(package, path, dict(shapes), dict(values)))
    return found


def sample(model: onnx.ModelProto, entry: CorpusModel) -> dict[str, np.ndarray]:
    shapes = graph.concrete_input_shapes(model, entry.input_shapes)
    return graph.sample_feed(model, shapes, 0, entry.input_values)


def whole_model(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [np.asarray(r) for r in session.run(None, feeds)]


def measure(entry: CorpusModel, repeats: int, workdir: Path) -> dict[str, Any]:
    model = onnx.load(entry.path)
    feeds = sample(model, entry)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        dag = graph.analyze(model, entry.input_shapes, feeds)
        cuts = graph.graph_cut_points(dag)
        times.append(time.perf_counter() - started)
    inputs = [{"name": n, "shape": list(s)} for n, s in dag.input_shapes.items()]
    profile = graph_profile(
        entry.path,
        model=entry.name,
        variant="fp32",
        input_spec=inputs[0],
        inputs=inputs,
        feeds=feeds,
    )
    spec = parse_deployment(
        {
            "apiVersion": "edgeai.dev/v1alpha1",
            "kind": "DNNDeployment",
            "metadata": {"name": "corpus"},
            "spec": {"modelRef": {"name": "corpus"}, "placement": {"adaptiveSplit": False}},
        }
    )
    problem, context = build_problem(
        spec, [profile], load_topology(str(TOPOLOGY)), zone=None, method="analytic"
    )
    plan = plan_document(spec, [profile], solve(spec, problem), context, "analytic")
    expected = whole_model(entry.path, feeds)
    diff = served_diff(plan, entry, feeds, expected, workdir / "planned")
    three = three_stages(plan, cuts)
    forced = served_diff(three, entry, feeds, expected, workdir / "forced") if three else None
    every_cut, spread = cut_diff(model, cuts, feeds)
    return {
        "package": entry.package,
        "model": entry.name,
        "onnxNodes": len(model.graph.node),
        "computeNodes": len(dag.nodes),
        "inputs": len(dag.inputs),
        "outputs": len(dag.outputs),
        "inputShapes": {n: list(s) for n, s in dag.input_shapes.items()},
        "cuts": len(cuts),
        "largestCutBytes": max(c.size_bytes for c in cuts),
        "analysisS": round(statistics.median(times), 4),
        "split": plan.split,
        "predictedMs": plan.predicted_latency_ms,
        "maxAbsDiff": diff,
        "threeStageMaxAbsDiff": forced,
        "cutsMaxRelDiff": every_cut,
        "cutMaxStd": spread,
    }


def _relative(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max(1, max |want|): absolute for tensors of magnitude up to
    1, relative beyond (activations deep in onnx's light models reach 1e24)."""
    want64 = want.astype(np.float64)
    scale = max(1.0, float(np.abs(want64).max()))
    return float(np.abs(got.astype(np.float64) - want64).max()) / scale


def cut_diff(
    model: onnx.ModelProto, cuts: list[graph.Cut], feeds: dict[str, np.ndarray]
) -> tuple[float, float]:
    """Every segment between consecutive cuts as its own onnxruntime session, chained
    from `feeds`, against the whole model with every cut tensor exposed as an output:
    (the largest difference over all cut tensors (`_relative`), the largest standard
    deviation among them: above 0, the comparison is not of constants alone). The
    whole model's final outputs alone can be constant (a softmax over constant
    weights, as in onnx's light models) where its activations are not."""
    names = list(dict.fromkeys(t for c in cuts for t in c.tensors if t not in feeds))
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    declared = {o.name for o in exposed.graph.output}
    exposed.graph.output.extend(
        onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in declared
    )
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        exposed.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    whole = dict(zip(names, session.run(names, feeds), strict=True))
    partitioner = graph.Partitioner(model)
    values: dict[str, np.ndarray] = dict(feeds)
    for a, b in itertools.pairwise(cuts):
        part = partitioner.extract(a.tensors, b.tensors)
        run = ort.InferenceSession(
            part.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        got = run.run(None, {i.name: values[i.name] for i in run.get_inputs()})
        values.update(zip([o.name for o in run.get_outputs()], got, strict=True))
    diff = max(_relative(values[n], whole[n]) for n in names)
    spread = max(float(np.std(whole[n].astype(np.float64))) for n in names)
    return diff, spread


def served_diff(
    plan: PlanDocument,
    entry: CorpusModel,
    feeds: dict[str, np.ndarray],
    expected: list[np.ndarray],
    workdir: Path,
) -> float:
    """The plan's stages as worker processes: the largest absolute difference between
    their answer to `feeds` and `expected` (every model output, in the model's order)."""
    workdir.mkdir()
    _, outputs = answer_once(plan, entry.path, workdir, feeds)
    names = [o.name for o in onnx.load(entry.path, load_external_data=False).graph.output]
    if [t.name for t in outputs] != names:
        raise RuntimeError(f"{entry.name}: outputs {[t.name for t in outputs]}, not {names}")
    return max(
        float(np.abs(t.array.astype(np.float64) - want.astype(np.float64)).max())
        for t, want in zip(outputs, expected, strict=True)
    )


def three_stages(plan: PlanDocument, cuts: list[graph.Cut]) -> PlanDocument | None:
    """The plan with three stages, device, edge and cloud, split at the inner cuts a
    third and two thirds of the way (None for a model with fewer than two)."""
    if len(cuts) < 4:
        return None
    picks = [cuts[0], cuts[len(cuts) // 3], cuts[max(2 * len(cuts) // 3, len(cuts) // 3 + 1)]]
    picks.append(cuts[-1])
    stages = tuple(
        PlanStage(i, tier, f"{a.index}-{b.index - 1}", a.tensors, b.tensors, None, 0.0)
        for i, (tier, (a, b)) in enumerate(
            zip(("device", "edge", "cloud"), itertools.pairwise(picks), strict=True)
        )
    )
    return replace(plan, stages=stages, transfers=(), alternatives=())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="analysis runs per model")
    parser.add_argument("--out", default=str(render_numbers.RESULTS_DIR / "corpus.json"))
    args = parser.parse_args(argv)
    started = time.monotonic()
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgeai-corpus-") as tmp:
        for i, entry in enumerate(corpus_models()):
            workdir = Path(tmp) / f"{i}-{entry.name}"
            workdir.mkdir()
            print(f"[{i + 1}] {entry.package}: {entry.name}", file=sys.stderr, flush=True)
            rows.append(measure(entry, args.repeats, workdir))
    largest = max(rows, key=lambda r: r["onnxNodes"])
    report = {
        "kind": "CorpusBench",
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "packages": {
            name: metadata.version(dist)
            for name, dist in (
                ("rapidocr_onnxruntime", "rapidocr-onnxruntime"),
                ("silero_vad", "silero-vad"),
                ("onnx", "onnx"),
            )
        },
        "topology": "hack/topology.yaml (device uplink 10 Mbit/s), compute analytic",
        "rows": rows,
        "largest": {k: largest[k] for k in ("model", "onnxNodes", "computeNodes", "analysisS")},
        "seconds": round(time.monotonic() - started, 1),
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(render_numbers.corpus_table(report))
    print(render_numbers.corpus_analysis(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
