"""Homomorphic evaluation of a model's last dense layer (CKKS, TenSEAL).

The device holds the secret key. It runs the layers up to the head, encrypts the
features, and sends the ciphertexts upstream with its *public* context (public,
relinearisation and Galois keys, never the secret key); the next stage computes the
dense layer `y = W x + b` on the ciphertexts and answers ciphertext logits, which only
the device can decrypt. ReLU and other non-polynomial activations cannot be evaluated
exactly under CKKS, so the head is one dense layer (an ONNX `Gemm`); the layers before
it, non-linear ones included, run in plaintext on the device.

Packing (one ciphertext per sample): for a head of `n` inputs and `m` outputs, with `B`
the largest power of two such that `n * B` slots fit (`block_for`; `m <= B`), the
device writes feature `i` into slots `i*B .. i*B+B-1`.
The edge multiplies slot `i*B + j` by `W[j, i]` (one plaintext multiplication), sums
the `n` blocks with log2(n) rotations (TenSEAL's im2col convolution with an all-ones
kernel, which costs a second level) and adds the bias: slot `j` holds `y[j]`. This
needs two multiplicative levels: `N = 8192` with moduli 60-40-40-60 bits (200 of the
218 bits that keep 128-bit security at that degree), scale 2^40.

On the wire (the Open Inference Protocol's BYTES tensors, binary form):

- request: the cut tensor's name, shape `[batch]`, each element one serialized
  ciphertext; and `CONTEXT_TENSOR`, shape `[1]`: the serialized public context, or its
  sha256 (64 hex characters) once this edge has it;
- answer: the head's output name, shape `[batch]`, ciphertext logits, and the response
  parameter `OUTPUT_SIZE_PARAMETER` (`m`);
- an edge that does not know the digest (restarted, another replica) answers 428 with
  `UNKNOWN_CONTEXT` in its message; the device sends the whole context again.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

POLY_MODULUS_DEGREE = 8192
COEFF_MOD_BIT_SIZES = (60, 40, 40, 60)
SCALE_BITS = 40
SLOTS = POLY_MODULUS_DEGREE // 2
CONTEXT_TENSOR = "edgeai_he_context"
OUTPUT_SIZE_PARAMETER = "edgeai_he_output_size"
UNKNOWN_CONTEXT = "unknown homomorphic context"
DIGEST_LENGTH = 64  # sha256, hex


class HeadError(ValueError):
    """A model part that cannot be evaluated homomorphically, or a malformed ciphertext
    request; the message says what was found and what is accepted."""


def _tenseal() -> Any:
    import tenseal

    return tenseal


def block_for(inputs: int) -> int:
    """Slots per feature: the largest power of two `B` with `inputs * B` slots in one
    ciphertext (both sides derive it from the feature count alone)."""
    block = 1
    while inputs * block * 2 <= SLOTS:
        block *= 2
    return block


@dataclass(frozen=True)
class DenseHead:
    """`output = weight @ input + bias` for one sample (weight: outputs x inputs)."""

    input_name: str
    output_name: str
    weight: np.ndarray
    bias: np.ndarray

    @property
    def inputs(self) -> int:
        return int(self.weight.shape[1])

    @property
    def outputs(self) -> int:
        return int(self.weight.shape[0])

    @classmethod
    def from_onnx(cls, path: Path) -> DenseHead:
        """The dense layer of an ONNX partition holding exactly one `Gemm` node with
        constant weights (what the stage after the device runs)."""
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(path))
        ops = [node.op_type for node in model.graph.node]
        if ops != ["Gemm"]:
            raise HeadError(
                f"the homomorphic head must be one dense layer (an ONNX Gemm), but "
                f"{path.name} holds {ops} (accepted: a cut right before the model's last "
                "Gemm, in the fp32 variant)"
            )
        (node,) = model.graph.node
        constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attributes.get("transA", 0) or node.input[1] not in constants:
            raise HeadError(
                f"the Gemm of {path.name} multiplies two computed tensors (accepted: "
                "computed input times constant weights)"
            )
        b = constants[node.input[1]].astype(np.float64)
        weight = b if attributes.get("transB", 0) else b.T
        weight = float(attributes.get("alpha", 1.0)) * weight
        bias = np.zeros(weight.shape[0])
        if len(node.input) > 2 and node.input[2]:
            if node.input[2] not in constants:
                raise HeadError(f"the Gemm bias of {path.name} is computed (accepted: constant)")
            bias = bias + float(attributes.get("beta", 1.0)) * constants[node.input[2]]
        head = cls(node.input[0], node.output[0], weight, bias)
        if head.inputs > SLOTS or head.outputs > block_for(head.inputs):
            raise HeadError(
                f"a dense layer of {head.inputs} inputs x {head.outputs} outputs does not fit "
                f"one ciphertext of {SLOTS} slots (accepted: inputs x outputs rounded up to "
                f"powers of two at most {SLOTS})"
            )
        return head

    def plain(self, features: np.ndarray) -> np.ndarray:
        """The same layer in plaintext, (batch, inputs) -> (batch, outputs)."""
        out: np.ndarray = features.reshape(len(features), -1) @ self.weight.T + self.bias
        return out


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class DeviceKeys:
    """The device's side: a CKKS key pair made at start; encrypts features, decrypts
    logits. `public_context` is what leaves the device."""

    def __init__(self) -> None:
        ts = _tenseal()
        context = ts.context(
            ts.SCHEME_TYPE.CKKS,
            poly_modulus_degree=POLY_MODULUS_DEGREE,
            coeff_mod_bit_sizes=list(COEFF_MOD_BIT_SIZES),
        )
        context.global_scale = 2.0**SCALE_BITS
        context.generate_galois_keys()
        self._context = context
        public = context.copy()
        public.make_context_public()
        self.public_context: bytes = public.serialize(
            save_public_key=True,
            save_secret_key=False,
            save_galois_keys=True,
            save_relin_keys=True,
        )
        self.context_digest = digest(self.public_context)

    def encrypt(self, features: np.ndarray) -> list[bytes]:
        """One ciphertext per sample of `features` (batch first)."""
        ts = _tenseal()
        rows = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
        block = block_for(rows.shape[1])
        return [
            ts.ckks_vector(self._context, np.repeat(row, block).tolist()).serialize()
            for row in rows
        ]

    def decrypt(self, ciphertexts: Sequence[bytes], outputs: int) -> np.ndarray:
        """The logits, (batch, outputs) float32."""
        ts = _tenseal()
        rows = [
            ts.ckks_vector_from(self._context, bytes(c)).decrypt()[:outputs] for c in ciphertexts
        ]
        return np.asarray(rows, dtype=np.float32).reshape(len(rows), outputs)


class HeadEvaluator:
    """The edge's side: the dense head on ciphertexts, with the public contexts of the
    devices it serves (a bounded map keyed by their sha256)."""

    def __init__(self, head: DenseHead, max_contexts: int = 64) -> None:
        self.head = head
        self._max = max_contexts
        self._contexts: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        block = block_for(head.inputs)
        weights = np.zeros((head.inputs, block))
        weights[:, : head.outputs] = head.weight.T
        self._weights = weights.reshape(-1).tolist()
        self._ones = [[1.0] * head.inputs]
        self._bias = np.pad(head.bias, (0, block - head.outputs)).tolist()
        self._block = block

    def context(self, data: bytes) -> tuple[str, Any]:
        """The context a request names: its digest, or the serialized public context
        itself (loaded and kept). Raises KeyError for an unknown digest and HeadError for
        a context that is not a public CKKS context."""
        if len(data) == DIGEST_LENGTH:
            key = data.decode("ascii", "replace")
            with self._lock:
                found = self._contexts.get(key)
                if found is None:
                    raise KeyError(key)
                self._contexts.move_to_end(key)
                return key, found
        key = digest(data)
        try:
            context = _tenseal().context_from(data)
        except Exception as exc:
            raise HeadError(
                f"{CONTEXT_TENSOR}: not a serialized TenSEAL context ({type(exc).__name__})"
            ) from None
        if context.is_private():
            raise HeadError(
                f"{CONTEXT_TENSOR}: the context holds a secret key, which must never leave "
                "the device (accepted: a public context)"
            )
        if not context.has_galois_keys():
            raise HeadError(f"{CONTEXT_TENSOR}: the context has no Galois keys (accepted: with)")
        with self._lock:
            self._contexts[key] = context
            while len(self._contexts) > self._max:
                self._contexts.popitem(last=False)
        return key, context

    def evaluate(self, context: Any, ciphertexts: Sequence[bytes]) -> list[bytes]:
        """The head's ciphertext logits, one per input ciphertext."""
        ts = _tenseal()
        out = []
        expected = self.head.inputs * self._block
        for i, data in enumerate(ciphertexts):
            try:
                vector = ts.ckks_vector_from(context, bytes(data))
            except Exception as exc:
                raise HeadError(
                    f"input '{self.head.input_name}'[{i}]: not a CKKS ciphertext of this "
                    f"context ({type(exc).__name__})"
                ) from None
            if vector.size() != expected:
                raise HeadError(
                    f"input '{self.head.input_name}'[{i}]: {vector.size()} slots (accepted: "
                    f"{expected}, {self.head.inputs} features x {self._block})"
                )
            result = vector.mul(self._weights).conv2d_im2col(self._ones, self._block)
            out.append(result.add(self._bias).serialize())
        return out


@dataclass(frozen=True)
class Timing:
    """Milliseconds of one request's three steps, and its bytes each way."""

    encrypt_ms: float
    evaluate_ms: float
    decrypt_ms: float
    up_bytes: int
    down_bytes: int


def timed_round(
    keys: DeviceKeys, evaluator: HeadEvaluator, features: np.ndarray, context: Any
) -> tuple[np.ndarray, Timing]:
    """One sample through encrypt, evaluate and decrypt in this process (the bench's
    per-step clock; the served path times the same calls in two processes)."""
    started = time.perf_counter()
    (up,) = keys.encrypt(features[None])
    encrypted = time.perf_counter()
    (down,) = evaluator.evaluate(context, [up])
    evaluated = time.perf_counter()
    logits = keys.decrypt([down], evaluator.head.outputs)
    done = time.perf_counter()
    return logits[0], Timing(
        (encrypted - started) * 1e3,
        (evaluated - encrypted) * 1e3,
        (done - evaluated) * 1e3,
        len(up),
        len(down),
    )
