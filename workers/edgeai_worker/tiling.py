"""Input-wise (spatial) partitioning of a conv prefix, DeepThings-style fused tiles.

The prefix (a chain of Conv/MaxPool/AveragePool and element-wise layers) is cut into a
grid of output tiles. For each tile the input region that feeds it (its receptive field,
the "halo") is cropped, aligned to the prefix's total stride so the crop's output grid
lines up with the full output, and run through the unchanged prefix on a peer worker.
Rows and columns whose receptive field reaches past the crop are discarded; the rest are
exact, so the stitched result equals the unsplit prefix's output.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper

from edgeai_worker.chain import Forwarder
from edgeai_worker.protocol import Array, InferRequest, Tensor

WINDOW_OPS = frozenset({"Conv", "MaxPool", "AveragePool"})
# Ops that act on each position on its own (or per channel), so tiles need no halo.
POINTWISE_OPS = frozenset(
    {
        "Relu", "LeakyRelu", "Clip", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu",
        "Selu", "Softplus", "PRelu", "BatchNormalization", "Identity", "Dropout", "Mul",
        "Add", "Sub", "Div", "Cast",
    }
)  # fmt: skip


class TilingError(ValueError):
    """The model cannot be tiled as asked; the message names the layer or setting."""


@dataclass(frozen=True)
class Window:
    """One sliding-window layer along one axis."""

    kernel: int  # effective extent, dilation included
    stride: int
    pad_begin: int
    pad_end: int

    def output_size(self, size: int) -> int:
        return (size + self.pad_begin + self.pad_end - self.kernel) // self.stride + 1


@dataclass(frozen=True)
class AxisGeometry:
    """The windows of the prefix along one spatial axis, first layer first."""

    windows: tuple[Window, ...]

    @property
    def stride(self) -> int:
        return math.prod(w.stride for w in self.windows)

    @property
    def field(self) -> int:
        """Receptive field of one output position, in input positions."""
        field, jump = 1, 1
        for w in self.windows:
            field += (w.kernel - 1) * jump
            jump *= w.stride
        return field

    @property
    def offset(self) -> int:
        """Input position of output 0's receptive field start, negated (total padding)."""
        offset, jump = 0, 1
        for w in self.windows:
            offset += w.pad_begin * jump
            jump *= w.stride
        return offset

    def output_size(self, size: int) -> int:
        for w in self.windows:
            size = w.output_size(size)
        return size

    def input_span(self, out_begin: int, out_end: int, size: int) -> tuple[int, int]:
        """The aligned input crop [a, b) from which outputs [out_begin, out_end) are exact."""
        need_begin = out_begin * self.stride - self.offset
        need_end = (out_end - 1) * self.stride - self.offset + self.field
        begin = max(0, need_begin) // self.stride * self.stride
        return begin, min(size, need_end)


def _ints(node: onnx.NodeProto, name: str, default: Sequence[int]) -> list[int]:
    for attr in node.attribute:
        if attr.name == name:
            return list(helper.get_attribute_value(attr))
    return list(default)


def prefix_geometry(model: onnx.ModelProto) -> tuple[AxisGeometry, AxisGeometry]:
    """Height and width geometry of a conv prefix; TilingError if it is not tileable."""
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    inputs = [i.name for i in graph.input if i.name not in initializers]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise TilingError("a tiled prefix needs exactly one input and one output tensor")
    current = inputs[0]
    rows: list[Window] = []
    cols: list[Window] = []
    for node in graph.node:
        activations = [t for t in node.input if t and t not in initializers]
        if node.op_type == "Constant":
            initializers.update(node.output)
            continue
        if activations != [current]:
            raise TilingError(
                f"layer '{node.name or node.op_type}' ({node.op_type}) reads {activations}: "
                "only a chain of layers can be tiled (no branches or residual joins)"
            )
        if node.op_type in WINDOW_OPS:
            kernel = _ints(node, "kernel_shape", [])
            if len(kernel) != 2:
                raise TilingError(f"layer '{node.name}' is not a 2-D {node.op_type}")
            if _ints(node, "ceil_mode", [0]) != [0]:
                raise TilingError(f"layer '{node.name}' uses ceil_mode")
            for attr in node.attribute:
                if attr.name == "auto_pad" and attr.s not in (b"NOTSET", b"VALID"):
                    raise TilingError(f"layer '{node.name}' uses auto_pad {attr.s.decode()}")
            strides = _ints(node, "strides", [1, 1])
            pads = _ints(node, "pads", [0, 0, 0, 0])
            dilations = _ints(node, "dilations", [1, 1])
            for axis, windows in ((0, rows), (1, cols)):
                extent = dilations[axis] * (kernel[axis] - 1) + 1
                windows.append(Window(extent, strides[axis], pads[axis], pads[axis + 2]))
        elif node.op_type not in POINTWISE_OPS:
            raise TilingError(
                f"layer '{node.name or node.op_type}' ({node.op_type}) mixes positions; "
                f"a tiled prefix may hold {', '.join(sorted(WINDOW_OPS))} and point-wise layers"
            )
        current = node.output[0]
    if current != graph.output[0].name:
        raise TilingError("the prefix's output is not the end of its layer chain")
    if not rows:
        raise TilingError("the prefix has no Conv or pooling layer to tile")
    return AxisGeometry(tuple(rows)), AxisGeometry(tuple(cols))


def make_spatially_dynamic(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose input and output height/width are symbolic, so it runs on crops."""
    dynamic = onnx.ModelProto()
    dynamic.CopyFrom(model)
    del dynamic.graph.value_info[:]
    for value, prefix in ((dynamic.graph.input[0], "in"), (dynamic.graph.output[0], "out")):
        dims = value.type.tensor_type.shape.dim
        if len(dims) != 4:
            raise TilingError(f"tensor '{value.name}' is not NCHW")
        for axis, label in ((0, "N"), (2, f"{prefix}_h"), (3, f"{prefix}_w")):
            dims[axis].Clear()
            dims[axis].dim_param = label
    return dynamic


@dataclass(frozen=True)
class Tile:
    """Output rows/columns [begin, end) of one tile and the input crop that feeds it."""

    out_rows: tuple[int, int]
    out_cols: tuple[int, int]
    in_rows: tuple[int, int]
    in_cols: tuple[int, int]
    stride_rows: int
    stride_cols: int

    @property
    def keep_rows(self) -> slice:
        """The crop's output rows that belong to this tile (the rest is halo)."""
        first = self.out_rows[0] - self.in_rows[0] // self.stride_rows
        return slice(first, first + self.out_rows[1] - self.out_rows[0])

    @property
    def keep_cols(self) -> slice:
        first = self.out_cols[0] - self.in_cols[0] // self.stride_cols
        return slice(first, first + self.out_cols[1] - self.out_cols[0])


def _ranges(total: int, parts: int) -> list[tuple[int, int]]:
    bounds = [round(i * total / parts) for i in range(parts + 1)]
    return [(a, b) for a, b in itertools.pairwise(bounds) if b > a]


def plan_tiles(
    geometry: tuple[AxisGeometry, AxisGeometry], height: int, width: int, grid: tuple[int, int]
) -> tuple[list[Tile], tuple[int, int]]:
    """The tiles of a `grid` (rows, columns) split and the full output's height, width."""
    rows_geo, cols_geo = geometry
    out_h, out_w = rows_geo.output_size(height), cols_geo.output_size(width)
    if out_h < 1 or out_w < 1:
        raise TilingError(f"a {height}x{width} input is too small for this prefix")
    if grid[0] < 1 or grid[1] < 1:
        raise TilingError(f"grid {grid} must have at least one row and one column")
    tiles = [
        Tile(
            (r0, r1),
            (c0, c1),
            rows_geo.input_span(r0, r1, height),
            cols_geo.input_span(c0, c1, width),
            rows_geo.stride,
            cols_geo.stride,
        )
        for r0, r1 in _ranges(out_h, grid[0])
        for c0, c1 in _ranges(out_w, grid[1])
    ]
    return tiles, (out_h, out_w)


class TiledPrefix:
    """Runs a conv prefix as tiles on peer workers (OIP v2) and stitches the result."""

    def __init__(
        self,
        model: onnx.ModelProto,
        peers: Sequence[str],
        model_name: str,
        grid: tuple[int, int] = (2, 2),
        *,
        timeout_s: float = 30.0,
    ) -> None:
        self.geometry = prefix_geometry(model)
        self.input_name = model.graph.input[0].name
        self.output_name = model.graph.output[0].name
        self.grid = grid
        # Tiles rotate over the peers; a failed peer's tile is retried on another.
        self.forwarder = Forwarder(
            peers, model_name, stage_index=-1, timeout_s=timeout_s, attempts=max(2, len(peers))
        )

    async def __aenter__(self) -> TiledPrefix:
        await self.forwarder.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.forwarder.close()

    async def run(self, x: Array, request_id: str = "tile") -> Array:
        if x.ndim != 4:
            raise TilingError(f"input must be NCHW, got shape {list(x.shape)}")
        tiles, (out_h, out_w) = plan_tiles(self.geometry, x.shape[2], x.shape[3], self.grid)

        async def one(index: int, tile: Tile) -> Array:
            crop = np.ascontiguousarray(
                x[:, :, tile.in_rows[0] : tile.in_rows[1], tile.in_cols[0] : tile.in_cols[1]]
            )
            request = InferRequest(
                [Tensor.from_numpy(self.input_name, crop)],
                id=f"{request_id}/tile{index}",
                parameters={"binary_data_output": True},
            )
            result = await self.forwarder.infer(request)
            (out,) = [t for t in result.response.outputs if t.name == self.output_name]
            return out.array[:, :, tile.keep_rows, tile.keep_cols]

        pieces = await asyncio.gather(*(one(i, t) for i, t in enumerate(tiles)))
        first = pieces[0]
        stitched = np.empty((first.shape[0], first.shape[1], out_h, out_w), dtype=first.dtype)
        for tile, piece in zip(tiles, pieces, strict=True):
            stitched[
                :, :, tile.out_rows[0] : tile.out_rows[1], tile.out_cols[0] : tile.out_cols[1]
            ] = piece
        return stitched
