"""Compressed digits variants: measured held-out accuracy and size."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgeai_worker import graph, variants, zoo


@pytest.fixture(scope="module")
def rows() -> dict[str, dict[str, object]]:
    return {r["name"]: r for r in variants.digits_variants()}


def test_every_variant_is_measured(rows: dict[str, dict[str, object]]) -> None:
    assert set(rows) == set(variants.VARIANT_NAMES)
    _, _, _, y_test = zoo.digits_split()
    for row in rows.values():
        accuracy = float(row["accuracy"])  # type: ignore[arg-type]
        # accuracies are counts over the held-out split, not made-up numbers
        assert round(accuracy * len(y_test)) == pytest.approx(accuracy * len(y_test), abs=0.3)


def test_variants_trade_size_for_little_accuracy(rows: dict[str, dict[str, object]]) -> None:
    def get(name: str, key: str) -> float:
        return float(rows[name][key])  # type: ignore[arg-type]

    assert get("fp32", "accuracy") >= 0.95
    for name in ("int8-dynamic", "int8-static"):
        assert get(name, "accuracy") >= get("fp32", "accuracy") - 0.02
        assert get(name, "sizeBytes") < get("fp32", "sizeBytes") / 2
    assert get("pruned-50", "nonzeroParameters") <= 0.55 * get("pruned-50", "parameters")
    assert get("pruned-50", "compressedBytes") < 0.75 * get("fp32", "compressedBytes")
    assert get("pruned-50", "accuracy") >= 0.93
    assert get("distilled", "parameters") < get("fp32", "parameters") / 10
    assert get("distilled", "accuracy") >= 0.9


def test_quantized_models_hold_int8_ops() -> None:
    static = onnx.load(variants.variant_path("digits_cnn", "int8-static"))
    dynamic = onnx.load(variants.variant_path("digits_cnn", "int8-dynamic"))
    assert "QuantizeLinear" in {n.op_type for n in static.graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} & {n.op_type for n in dynamic.graph.node}


def test_a_quantized_variant_partitions_like_the_original() -> None:
    """Without graph optimizations the QDQ partitions are the model exactly. With them,
    onnxruntime fuses DequantizeLinear-Conv-QuantizeLinear into int8 kernels and a cut
    inside such a group can move the int8 rounding by one step: predictions agree."""
    model = onnx.load(variants.variant_path("digits_cnn", "int8-static"))
    cuts = graph.cut_points(model)
    assert len(cuts) >= 3
    _, _, x_test, _ = zoo.digits_split()
    x = x_test[:64]

    def run(
        m: onnx.ModelProto, feeds: dict[str, np.ndarray], optimize: bool
    ) -> dict[str, np.ndarray]:
        options = ort.SessionOptions()
        if not optimize:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(
            m.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        out = session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})
        return dict(zip([o.name for o in session.get_outputs()], out, strict=True))

    partitioner = graph.Partitioner(model)
    for optimize in (False, True):
        full = run(model, {"input": x}, optimize)["output"]
        for cut in cuts[1:-1]:
            middle = run(partitioner.extract(["input"], cut.tensors), {"input": x}, optimize)
            out = run(partitioner.extract(cut.tensors, ["output"]), middle, optimize)["output"]
            if optimize:
                agree = float((out.argmax(axis=1) == full.argmax(axis=1)).mean())
                assert agree >= 0.95, (cut, agree)
            else:
                assert float(np.abs(out - full).max()) <= 1e-5, cut


def test_magnitude_pruning_zeroes_the_smallest_half() -> None:
    import torch

    torch.manual_seed(0)
    first, second = torch.nn.Linear(20, 30), torch.nn.Linear(30, 10)
    layers = torch.nn.Sequential(first, second)

    def magnitudes() -> torch.Tensor:
        return torch.cat(
            [first.weight.detach().abs().flatten(), second.weight.detach().abs().flatten()]
        )

    before = magnitudes()
    zeros = variants.prune_magnitude(layers, 0.5)
    after = magnitudes()
    assert zeros == before.numel() // 2
    # one global threshold: every survivor was larger than every pruned weight
    assert before[after > 0].min() > before[after == 0].max()
    with pytest.raises(ValueError, match="unknown variant"):
        variants.variant_path("digits_cnn", "int4")
