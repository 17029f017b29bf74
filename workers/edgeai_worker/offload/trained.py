"""Exit heads trained from labelled data, without torch: a DNNModel's `spec.exits[i]`
with `train: true` names the tensor a head reads (`after`) and the output it adds
(`output`); the preparation trains the head on `spec.data` and grafts it onto the model,
which from then on is a model declaring its exits (`offload.declared`).

A head is multinomial logistic regression on the tensor, flattened (a 4-D tensor with
more than `POOL_ABOVE` values per example is first averaged over its spatial
dimensions, so the head stays small on a convolution's output): features standardised
on the training rows, full-batch gradient descent with Adam and an L2 penalty, then the
standardisation folded into the weights. In the graph it is `[GlobalAveragePool ->]
Flatten -> Gemm`, its weights named after its output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx

# A 4-D tensor with more values than this per example is pooled over H and W first.
POOL_ABOVE = 4096
# Fewer labelled examples than this cannot train a head and leave rows to calibrate it.
MIN_EXAMPLES = 20


@dataclass(frozen=True)
class TrainedHead:
    output: str
    after: str
    weight: np.ndarray  # [classes, features], float32
    bias: np.ndarray  # [classes], float32
    pooled: bool  # averaged over the spatial dimensions first
    train_accuracy: float
    trained_on: int  # training rows


def pools(shape: Sequence[int]) -> bool:
    """Whether a head on a tensor of `shape` (batch first) averages H and W first."""
    return len(shape) == 4 and int(np.prod(shape[1:])) > POOL_ABOVE


def head_features(values: np.ndarray, pooled: bool) -> np.ndarray:
    """What the head's Gemm reads of `values` (batch first), as float64 rows."""
    x = np.asarray(values, dtype=np.float64)
    if pooled:
        x = x.mean(axis=(2, 3))
    return x.reshape(len(x), -1)


def train_head(
    output: str,
    after: str,
    values: np.ndarray,
    labels: np.ndarray,
    classes: int,
    *,
    steps: int = 400,
    learning_rate: float = 0.05,
    l2: float = 1e-3,
) -> TrainedHead:
    """Softmax regression from `values` (the tensor `after`, one row per example) to
    `labels` in [0, classes)."""
    if len(values) != len(labels) or not len(labels):
        raise ValueError(f"{len(values)} feature rows for {len(labels)} labels")
    if int(labels.min()) < 0 or int(labels.max()) >= classes:
        raise ValueError(f"labels lie in [{labels.min()}, {labels.max()}], not in [0, {classes})")
    pooled = pools(values.shape)
    x = head_features(values, pooled)
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    std[std < 1e-8] = 1.0
    z = (x - mean) / std
    n, d = z.shape
    onehot = np.zeros((n, classes))
    onehot[np.arange(n), labels] = 1.0
    w = np.zeros((d, classes))
    b = np.zeros(classes)
    moments = [np.zeros_like(w), np.zeros_like(w), np.zeros_like(b), np.zeros_like(b)]
    beta1, beta2 = 0.9, 0.999
    for step in range(1, steps + 1):
        logits = z @ w + b
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        error = (p - onehot) / n
        grads = (z.T @ error + l2 * w, error.sum(axis=0))
        for k, (param, grad) in enumerate(zip((w, b), grads, strict=True)):
            m, v = moments[2 * k], moments[2 * k + 1]
            m *= beta1
            m += (1 - beta1) * grad
            v *= beta2
            v += (1 - beta2) * grad * grad
            m_hat = m / (1 - beta1**step)
            v_hat = v / (1 - beta2**step)
            param -= learning_rate * m_hat / (np.sqrt(v_hat) + 1e-8)
    # fold the standardisation in: (x - mean) / std @ w + b == x @ w' + b'
    folded = w / std[:, None]
    bias = b - mean @ folded
    predicted = (x @ folded + bias).argmax(axis=1)
    return TrainedHead(
        output=output,
        after=after,
        weight=folded.T.astype(np.float32),
        bias=bias.astype(np.float32),
        pooled=pooled,
        train_accuracy=float(np.mean(predicted == labels)),
        trained_on=n,
    )


def head_logits(head: TrainedHead, values: np.ndarray) -> np.ndarray:
    """The head's class scores on `values`, as numpy computes them (a check of the
    grafted graph)."""
    x = head_features(values, head.pooled).astype(np.float32)
    result: np.ndarray = x @ head.weight.T + head.bias
    return result


def graft_heads(model: onnx.ModelProto, heads: Sequence[TrainedHead]) -> onnx.ModelProto:
    """A copy of `model` with each head's nodes and weights added and its output
    appended to the model's outputs (float, [batch, classes]); ValueError when a name
    the head would add exists in the model."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    grafted = onnx.ModelProto()
    grafted.CopyFrom(model)
    graph = grafted.graph
    taken = {t for n in graph.node for t in [*n.input, *n.output]}
    taken |= {t.name for t in graph.initializer} | {v.name for v in graph.input}
    for head in heads:
        names = [head.output, *(f"{head.output}/{s}" for s in ("pool", "flat", "W", "B"))]
        clash = [n for n in names if n in taken]
        if clash:
            raise ValueError(f"{clash[0]!r} already names a tensor of the model")
        taken.update(names)
        source = head.after
        if head.pooled:
            graph.node.append(
                helper.make_node(
                    "GlobalAveragePool",
                    [source],
                    [f"{head.output}/pool"],
                    name=f"{head.output}/Pool",
                )
            )
            source = f"{head.output}/pool"
        graph.node.append(
            helper.make_node(
                "Flatten", [source], [f"{head.output}/flat"], name=f"{head.output}/Flatten", axis=1
            )
        )
        graph.node.append(
            helper.make_node(
                "Gemm",
                [f"{head.output}/flat", f"{head.output}/W", f"{head.output}/B"],
                [head.output],
                name=f"{head.output}/Gemm",
                transB=1,
            )
        )
        graph.initializer.extend(
            [
                numpy_helper.from_array(head.weight, f"{head.output}/W"),
                numpy_helper.from_array(head.bias, f"{head.output}/B"),
            ]
        )
        graph.output.append(
            helper.make_tensor_value_info(
                head.output, TensorProto.FLOAT, ["batch", int(head.weight.shape[0])]
            )
        )
    onnx.checker.check_model(grafted)
    return grafted
