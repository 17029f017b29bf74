"""Update compression with error feedback, and the bytes it puts on the wire.

An update is one flat float32 vector (every parameter of the model, concatenated).
`Compressor.compress` returns the encoded payload and what the receiver will decode
from it; with error feedback the difference is kept and added to the next update
(EF-SGD), so what compression drops is delayed, not lost.

Payloads (little-endian):
- none: float32[n]
- topk / threshold: uint32 k, indices (uint16 when n <= 65536, else uint32), float32[k]
- int8: per block of BLOCK elements a float32 scale (max |v|), then int8[n] (v/scale*127)
- qsgd: per block of QSGD_BUCKET a float32 max |v|, then 4-bit levels (-7..7, stochastic
  rounding, so unbiased) two to a byte
- sign: per block of BLOCK a float32 mean |v|, then one bit per element (1 = >= 0)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from edgeai_worker.training.spec import CompressionSpec

if TYPE_CHECKING:
    from numpy.typing import NDArray

    Vector = NDArray[np.float32]

BLOCK = 1024
QSGD_BUCKET = 512
QSGD_LEVELS = 7


class CompressionError(ValueError):
    """A payload that does not decode to a vector of the expected length."""


def as_vector(values: Any) -> Vector:
    """`values` as a float32 vector (numpy's arithmetic is typed loosely)."""
    out: Vector = np.asarray(values, dtype=np.float32)
    return out


def _blocks(n: int, block: int) -> int:
    return (n + block - 1) // block


def _index_dtype(n: int) -> np.dtype[np.unsignedinteger]:
    return np.dtype("<u2") if n <= 1 << 16 else np.dtype("<u4")


def _block_reduce(values: Vector, block: int, how: str) -> NDArray[np.float32]:
    padded = np.zeros(_blocks(len(values), block) * block, dtype=np.float32)
    padded[: len(values)] = np.abs(values)
    rows = padded.reshape(-1, block)
    if how == "max":
        return as_vector(rows.max(axis=1))
    counts = np.full(rows.shape[0], block, dtype=np.float32)
    counts[-1] = len(values) - block * (rows.shape[0] - 1)
    return as_vector(rows.sum(axis=1) / counts)


def encode(kind: str, values: Vector, ratio: float, rng: np.random.Generator) -> bytes:
    """`values` compressed as `kind` (one of spec.COMPRESSIONS)."""
    n = len(values)
    if kind == "none":
        return values.astype("<f4").tobytes()
    if kind in ("topk", "threshold"):
        magnitude = np.abs(values)
        if kind == "topk":
            k = max(1, round(ratio * n))
            index = np.argpartition(magnitude, n - k)[n - k :]
        else:
            index = np.flatnonzero(magnitude >= ratio * float(magnitude.max(initial=0.0)))
        index = np.sort(index)
        return bytes(
            np.uint32(len(index)).astype("<u4").tobytes()
            + index.astype(_index_dtype(n)).tobytes()
            + values[index].astype("<f4").tobytes()
        )
    if kind == "int8":
        scale = _block_reduce(values, BLOCK, "max")
        per = np.repeat(np.where(scale > 0, scale, 1.0), BLOCK)[:n]
        q = np.clip(np.rint(values / per * 127.0), -127, 127).astype(np.int8)
        return bytes(scale.astype("<f4").tobytes() + q.tobytes())
    if kind == "qsgd":
        scale = _block_reduce(values, QSGD_BUCKET, "max")
        per = np.repeat(np.where(scale > 0, scale, 1.0), QSGD_BUCKET)[:n]
        level = np.abs(values) / per * QSGD_LEVELS
        low = np.floor(level)
        level = low + (rng.random(n) < (level - low))
        signed = (np.sign(values) * level).astype(np.int8) + QSGD_LEVELS  # 0..14
        if n % 2:
            signed = np.append(signed, np.int8(QSGD_LEVELS))
        nibbles = signed.astype(np.uint8).reshape(-1, 2)
        packed = (nibbles[:, 0] | (nibbles[:, 1] << 4)).astype(np.uint8)
        return bytes(scale.astype("<f4").tobytes() + packed.tobytes())
    if kind == "sign":
        scale = _block_reduce(values, BLOCK, "mean")
        return scale.astype("<f4").tobytes() + np.packbits(values >= 0).tobytes()
    raise CompressionError(f"unknown compression kind {kind!r}")


def decode(kind: str, payload: bytes, n: int) -> Vector:
    """The vector of length `n` a payload of `kind` stands for."""
    try:
        return _decode(kind, payload, n)
    except (ValueError, IndexError) as err:
        raise CompressionError(
            f"{kind} payload of {len(payload)} bytes for {n} values: {err}"
        ) from err


def _decode(kind: str, payload: bytes, n: int) -> Vector:
    buf = memoryview(payload)
    if kind == "none":
        if len(payload) != 4 * n:
            raise ValueError("wrong length")
        return np.frombuffer(buf, dtype="<f4").astype(np.float32)
    if kind in ("topk", "threshold"):
        k = int(np.frombuffer(buf[:4], dtype="<u4")[0])
        idt = _index_dtype(n)
        end = 4 + k * idt.itemsize
        if len(payload) != end + 4 * k:
            raise ValueError("wrong length")
        index = np.frombuffer(buf[4:end], dtype=idt).astype(np.int64)
        out = np.zeros(n, dtype=np.float32)
        out[index] = np.frombuffer(buf[end:], dtype="<f4")
        return out
    if kind in ("int8", "qsgd"):
        block = BLOCK if kind == "int8" else QSGD_BUCKET
        nb = _blocks(n, block)
        scale = np.frombuffer(buf[: 4 * nb], dtype="<f4")
        per = np.repeat(scale, block)[:n]
        if kind == "int8":
            if len(payload) != 4 * nb + n:
                raise ValueError("wrong length")
            q = np.frombuffer(buf[4 * nb :], dtype=np.int8).astype(np.float32)
            return as_vector(q / 127.0 * per)
        if len(payload) != 4 * nb + (n + 1) // 2:
            raise ValueError("wrong length")
        packed = np.frombuffer(buf[4 * nb :], dtype=np.uint8)
        levels = np.stack([packed & 0x0F, packed >> 4], axis=1).reshape(-1)[:n]
        return as_vector((levels.astype(np.float32) - QSGD_LEVELS) / QSGD_LEVELS * per)
    if kind == "sign":
        nb = _blocks(n, BLOCK)
        if len(payload) != 4 * nb + (n + 7) // 8:
            raise ValueError("wrong length")
        scale = np.frombuffer(buf[: 4 * nb], dtype="<f4")
        bits = np.unpackbits(np.frombuffer(buf[4 * nb :], dtype=np.uint8))[:n]
        return as_vector(np.where(bits == 1, 1.0, -1.0) * np.repeat(scale, BLOCK)[:n])
    raise ValueError(f"unknown compression kind {kind!r}")


class Compressor:
    """One sender's compressor; with error feedback it keeps the residual between calls."""

    def __init__(self, spec: CompressionSpec, n: int, seed: int) -> None:
        self.spec = spec
        self.n = n
        self.residual = np.zeros(n, dtype=np.float32)
        self._rng = np.random.default_rng(seed)

    @property
    def error_feedback(self) -> bool:
        return self.spec.error_feedback and self.spec.kind != "none"

    def compress(self, update: Vector) -> tuple[bytes, Vector]:
        """(payload, what the receiver decodes). Updates the residual."""
        target = update + self.residual if self.error_feedback else update
        payload = encode(self.spec.kind, target.astype(np.float32), self.spec.ratio, self._rng)
        sent = decode(self.spec.kind, payload, self.n)
        if self.error_feedback:
            self.residual = (target - sent).astype(np.float32)
        return payload, sent
