"""Input-wise partitioning: a conv prefix cut into tiles with halos, run on peer worker
processes, stitched; the result equals the unsplit model's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from _worker_support import build_conv_chain, extract, free_port, run_onnx, workers
from edgeai_worker.tiling import (
    TiledPrefix,
    TilingError,
    make_spatially_dynamic,
    plan_tiles,
    prefix_geometry,
)


def _pool_chain(path: Path) -> Path:
    """Conv(5x5, pad 2) -> MaxPool(3, stride 2, pad 1) -> Conv(3x3, stride 2, dilation 2,
    asymmetric pads) -> Relu: windows of every kind the tiler handles."""
    rng = np.random.default_rng(5)
    w0 = rng.standard_normal((4, 3, 5, 5)).astype(np.float32) * 0.2
    w1 = rng.standard_normal((6, 4, 3, 3)).astype(np.float32) * 0.2
    nodes = [
        helper.make_node("Conv", ["input", "w0"], ["c0"], kernel_shape=[5, 5], pads=[2, 2, 2, 2]),
        helper.make_node(
            "MaxPool", ["c0"], ["p0"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]
        ),
        helper.make_node(
            "Conv",
            ["p0", "w1"],
            ["c1"],
            kernel_shape=[3, 3],
            strides=[2, 2],
            dilations=[2, 2],
            pads=[2, 1, 1, 2],
        ),
        helper.make_node("Relu", ["c1"], ["features"]),
    ]
    graph = helper.make_graph(
        nodes,
        "pool_chain",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 6, "h", "w"])],
        [numpy_helper.from_array(w0, "w0"), numpy_helper.from_array(w1, "w1")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _peer(path: Path, port: int) -> dict[str, object]:
    return {"model_name": "prefix", "port": port, "partitions": [str(path)], "tier": "device"}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("grid", "hw"), [((2, 2), (32, 32)), ((3, 2), (37, 29)), ((1, 4), (23, 64))]
)
async def test_tiles_on_peers_equal_the_unsplit_prefix(
    tmp_path: Path, grid: tuple[int, int], hw: tuple[int, int]
) -> None:
    prefix = _pool_chain(tmp_path / "prefix.onnx")
    x = np.random.default_rng(0).standard_normal((1, 3, *hw)).astype(np.float32)
    expected = run_onnx(prefix, {"input": x})[0]
    ports = [free_port(), free_port()]
    with workers(tmp_path, *(_peer(prefix, p) for p in ports)) as peers:
        async with TiledPrefix(
            onnx.load(str(prefix)), [w.url for w in peers], "prefix", grid
        ) as tiled:
            stitched = await tiled.run(x)
    assert stitched.shape == expected.shape
    np.testing.assert_allclose(stitched, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
async def test_tiled_prefix_then_suffix_equals_the_full_model(tmp_path: Path) -> None:
    """A fixed-size model: its conv prefix is made spatially dynamic, tiled over three
    peers, and the stitched features go through the rest of the model."""
    model = build_conv_chain(tmp_path / "chain.onnx", strides=(2, 1, 2), hw=40)
    prefix = extract(model.path, ["input"], ["relu2"], tmp_path / "prefix.onnx")
    suffix = extract(model.path, ["relu2"], ["output"], tmp_path / "suffix.onnx")
    dynamic = make_spatially_dynamic(onnx.load(str(prefix)))
    onnx.save(dynamic, str(tmp_path / "prefix_dynamic.onnx"))
    x = np.random.default_rng(1).standard_normal(model.input_shape).astype(np.float32)
    ports = [free_port() for _ in range(3)]
    peers = [_peer(tmp_path / "prefix_dynamic.onnx", p) for p in ports]
    with workers(tmp_path, *peers) as started:
        async with TiledPrefix(dynamic, [w.url for w in started], "prefix", (3, 3)) as tiled:
            features = await tiled.run(x)
    np.testing.assert_allclose(features, run_onnx(prefix, {"input": x})[0], rtol=1e-5, atol=1e-5)
    output = run_onnx(suffix, {"relu2": features})[0]
    np.testing.assert_allclose(output, run_onnx(model.path, {"input": x})[0], rtol=1e-5, atol=1e-5)


def test_halo_and_alignment_of_planned_tiles(tmp_path: Path) -> None:
    rows, cols = prefix_geometry(onnx.load(str(_pool_chain(tmp_path / "p.onnx"))))
    assert rows.stride == 4
    # 5x5 conv (4) + 3-wide pool (2) + dilated 3-wide conv at jump 2 (2*2*2=8): 1+4+2+8.
    assert rows.field == 15
    tiles, (out_h, out_w) = plan_tiles((rows, cols), 32, 32, (2, 2))
    assert (out_h, out_w) == (8, 8)
    assert len(tiles) == 4
    for tile in tiles:
        assert tile.in_rows[0] % 4 == 0
        assert tile.in_cols[0] % 4 == 0
    # Tiles cover the output exactly once, and interior crops reach past the tile (halo).
    covered = np.zeros((out_h, out_w), int)
    for tile in tiles:
        covered[tile.out_rows[0] : tile.out_rows[1], tile.out_cols[0] : tile.out_cols[1]] += 1
    assert (covered == 1).all()
    top_left = tiles[0]
    assert top_left.in_rows == (0, min(32, (4 - 1) * 4 - rows.offset + rows.field))
    assert top_left.in_rows[1] > 16


def test_untileable_prefixes_are_refused(tmp_path: Path) -> None:
    model = build_conv_chain(tmp_path / "chain.onnx")
    with pytest.raises(TilingError, match=r"GlobalAveragePool\) mixes positions"):
        prefix_geometry(onnx.load(str(model.path)))
    residual = helper.make_graph(
        [
            helper.make_node("Conv", ["input", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
            helper.make_node("Add", ["c", "input"], ["out"]),
        ],
        "residual",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 1, 8, 8])],
        [numpy_helper.from_array(np.ones((1, 1, 3, 3), np.float32), "w")],
    )
    with pytest.raises(TilingError, match="only a chain of layers can be tiled"):
        prefix_geometry(helper.make_model(residual))


@pytest.mark.slow
async def test_stage_runs_its_prefix_tiled_on_peers(tmp_path: Path) -> None:
    """A stage configured with tile peers: the client sends the full input to it, the
    conv prefix runs as 2x2 tiles on two peer processes, the stage finishes the model."""
    import aiohttp

    model = build_conv_chain(tmp_path / "chain.onnx", strides=(2, 2, 1), hw=48)
    prefix = extract(model.path, ["input"], ["relu2"], tmp_path / "prefix.onnx")
    suffix = extract(model.path, ["relu2"], ["output"], tmp_path / "suffix.onnx")
    onnx.save(make_spatially_dynamic(onnx.load(str(prefix))), str(tmp_path / "dyn.onnx"))
    peers = [_peer(tmp_path / "dyn.onnx", free_port()) for _ in range(2)]
    for peer in peers:
        peer["model_name"] = "chain"
    stage = {
        "model_name": "chain", "tier": "edge", "partitions": [str(suffix)],
        "tile_prefix": str(tmp_path / "dyn.onnx"), "tile_grid": [2, 2],
        "tile_peers": [f"http://127.0.0.1:{p['port']}" for p in peers],
    }  # fmt: skip
    x = np.random.default_rng(2).standard_normal(model.input_shape).astype(np.float32)
    request = {
        "inputs": [
            {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.tolist()}
        ]
    }
    with workers(tmp_path, stage, *peers) as (entry, *peer_workers):
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{entry.url}/v2/models/chain/infer", json=request) as resp:
                body = await resp.json()
                assert resp.status == 200, body
            served = []
            for peer in peer_workers:
                async with session.get(f"{peer.url}/metrics") as resp:
                    text = await resp.text()
                served += [
                    line for line in text.splitlines() if 'requests_total{code="200"' in line
                ]
            bad = dict(request, inputs=[dict(request["inputs"][0], name="pixels")])
            async with session.post(f"{entry.url}/v2/models/chain/infer", json=bad) as resp:
                assert resp.status == 400
                assert "(accepted: input)" in (await resp.json())["error"]
    out = body["outputs"][0]
    np.testing.assert_allclose(
        np.array(out["data"], np.float32).reshape(out["shape"]),
        run_onnx(model.path, {"input": x})[0],
        rtol=1e-5,
        atol=1e-5,
    )
    # Four tiles over two peers: each peer ran two.
    assert sorted(float(line.split()[-1]) for line in served) == [2.0, 2.0]
