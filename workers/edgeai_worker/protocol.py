"""Open Inference Protocol v2 (KServe/Triton) REST codec, with the binary tensor data
extension.

Wire format, as KServe's "Open Inference Protocol" and Triton's `binary_tensor_data`
extension specify it:

* A JSON-only body is a UTF-8 JSON object. Tensor `data` is row-major, flat or nested.
* With binary data, the body is the JSON header followed by the raw tensors. The HTTP
  header `Inference-Header-Content-Length` gives the JSON header's length in bytes; each
  binary tensor carries `parameters.binary_data_size` and its bytes follow in the order
  the tensors appear in the JSON. BYTES elements are each a 4-byte little-endian length
  followed by the bytes; BOOL is one byte per element; numbers are little-endian.
* A request asks for binary outputs with `parameters.binary_data_output: true` (all
  outputs) or a per-output `parameters.binary_data` (which wins for that output).

The codec is pure: it turns bytes into `InferRequest`/`InferResponse` and back, and
raises `ProtocolError` (a 400 with a message naming the problem) on anything malformed.

JSON goes through orjson (numeric arrays are written straight from numpy) unless
`set_json_codec("stdlib")` chose Python's `json` module, the slower path it replaced
(kept to measure the two side by side). A body the fast path rejects is read again on
the replaced one, which decides, so what is accepted, and every error message, is the
same on both paths.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import orjson

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_CONTENT_TYPE = "application/octet-stream"
JSON_CONTENT_TYPE = "application/json"

# OIP datatype -> numpy dtype, little-endian as the protocol requires.
DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(np.object_),
}
ACCEPTED_DATATYPES = ", ".join(DATATYPES)

Array = npt.NDArray[Any]
JsonObject = dict[str, Any]

JSON_CODECS = ("orjson", "stdlib")
_json_codec = "orjson"


def set_json_codec(name: str) -> None:
    """Choose the JSON path of this process: `orjson` (the default) or `stdlib`."""
    global _json_codec
    if name not in JSON_CODECS:
        raise ValueError(f"json_codec {name!r} is not one of {', '.join(JSON_CODECS)}")
    _json_codec = name


def json_codec() -> str:
    return _json_codec


class ProtocolError(ValueError):
    """A request or response that does not follow the protocol; `status` is the HTTP code."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Tensor:
    """One named tensor as it travels in a request or response."""

    name: str
    array: Array
    datatype: str
    parameters: JsonObject = field(default_factory=dict)

    @property
    def shape(self) -> list[int]:
        return list(self.array.shape)

    @classmethod
    def from_numpy(cls, name: str, array: Array, datatype: str | None = None) -> Tensor:
        return cls(name, array, datatype or datatype_of(array))


@dataclass
class RequestedOutput:
    name: str
    binary: bool | None = None  # None: follow the request's `binary_data_output`
    parameters: JsonObject = field(default_factory=dict)


@dataclass
class InferRequest:
    inputs: list[Tensor]
    id: str | None = None
    outputs: list[RequestedOutput] | None = None
    parameters: JsonObject = field(default_factory=dict)

    def binary_output(self, name: str) -> bool:
        """Whether output `name` goes back as binary data."""
        default = bool(self.parameters.get("binary_data_output", False))
        for requested in self.outputs or []:
            if requested.name == name and requested.binary is not None:
                return requested.binary
        return default


@dataclass
class InferResponse:
    model_name: str
    outputs: list[Tensor]
    model_version: str | None = None
    id: str | None = None
    parameters: JsonObject = field(default_factory=dict)


# numpy dtype string ("<f4", "|u1", ...) -> OIP datatype, for the common exact matches
_DATATYPE_OF_DTYPE = {dtype.str: name for name, dtype in DATATYPES.items() if name != "BYTES"}


def datatype_of(array: Array) -> str:
    """The OIP datatype of a numpy array."""
    known = _DATATYPE_OF_DTYPE.get(array.dtype.str)
    if known is not None:
        return known
    if array.dtype == np.object_ or array.dtype.kind in "SU":
        return "BYTES"
    for name, dtype in DATATYPES.items():
        if name != "BYTES" and array.dtype == dtype:
            return name
    if array.dtype.kind in "biuf":  # big-endian or platform aliases of a known type
        for name, dtype in DATATYPES.items():
            if name != "BYTES" and array.dtype.newbyteorder("<") == dtype:
                return name
    raise ProtocolError(f"numpy dtype {array.dtype} has no OIP datatype", status=500)


# ---------------------------------------------------------------------------- tensors


def _shape(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) for d in value
    ):
        raise ProtocolError(f"{where}.shape must be a list of integers, got {value!r:.80}")
    if any(d < 0 for d in value):
        raise ProtocolError(f"{where}.shape has a negative dimension: {value}")
    return list(value)


def _element_count(shape: Sequence[int]) -> int:
    return math.prod(shape) if shape else 1


def _flatten(data: Any) -> list[Any]:
    """Row-major flattening of nested lists (OIP allows flat or nested `data`)."""
    if not isinstance(data, list):
        return [data]
    if not data or not isinstance(data[0], list):
        return data
    flat: list[Any] = []
    stack: list[Any] = [iter(data)]
    while stack:
        try:
            item = next(stack[-1])
        except StopIteration:
            stack.pop()
            continue
        if isinstance(item, list):
            stack.append(iter(item))
        else:
            flat.append(item)
    return flat


_JSON_KINDS: dict[str, set[type]] = {
    "BOOL": {bool},
    "FP16": {int, float},
    "FP32": {int, float},
    "FP64": {int, float},
}


def _elements_fit(flat: list[Any], datatype: str) -> bool:
    """Whether JSON elements have the datatype's kind (bools for BOOL, numbers for FP,
    integers otherwise; a bool is never a number)."""
    if _json_codec == "orjson":
        # The set of the elements' exact types: JSON values are exactly bool, int,
        # float, str, list, dict or None, so this is isinstance at C speed.
        return set(map(type, flat)) <= _JSON_KINDS.get(datatype, {int})
    # the replaced path, element by element
    if datatype == "BOOL":
        return all(isinstance(v, bool) for v in flat)
    if datatype.startswith("FP"):
        return all(isinstance(v, int | float) and not isinstance(v, bool) for v in flat)
    return all(isinstance(v, int) and not isinstance(v, bool) for v in flat)


def _json_elements_to_array(flat: list[Any], datatype: str, shape: list[int], where: str) -> Array:
    if datatype == "BYTES":
        items = np.empty(len(flat), dtype=np.object_)
        for i, item in enumerate(flat):
            if isinstance(item, str):
                items[i] = item.encode("utf-8")
            elif isinstance(item, bytes):
                items[i] = item
            else:
                raise ProtocolError(f"{where}: BYTES data must be strings, got {item!r:.40}")
        return items.reshape(shape)
    if not _elements_fit(flat, datatype):
        kind = {"BOOL": "true/false"}.get(
            datatype, "numbers" if datatype[:2] == "FP" else "integers"
        )
        raise ProtocolError(f"{where}: {datatype} data must be {kind}")
    dtype = DATATYPES[datatype]
    try:
        array = np.array(flat, dtype=dtype) if flat else np.empty(0, dtype=dtype)
    except OverflowError as exc:
        raise ProtocolError(f"{where}: a value is out of range for {datatype}") from exc
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if flat and (min(flat) < info.min or max(flat) > info.max):
            raise ProtocolError(f"{where}: a value is out of range for {datatype}")
    return array.reshape(shape)


def _bytes_to_array(
    raw: bytes | memoryview,
    datatype: str,
    shape: list[int],
    where: str,
    size_name: str = "binary_data_size",
) -> Array:
    count = _element_count(shape)
    if datatype == "BYTES":
        items = np.empty(count, dtype=np.object_)
        view = memoryview(raw)
        offset = 0
        for i in range(count):
            if offset + 4 > len(view):
                raise ProtocolError(f"{where}: BYTES binary data ends inside element {i}")
            (length,) = struct.unpack_from("<I", view, offset)
            offset += 4
            if offset + length > len(view):
                raise ProtocolError(f"{where}: BYTES element {i} runs past the binary data")
            items[i] = bytes(view[offset : offset + length])
            offset += length
        if offset != len(view):
            raise ProtocolError(f"{where}: {len(view) - offset} extra bytes after BYTES data")
        return items.reshape(shape)
    dtype = DATATYPES[datatype]
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise ProtocolError(
            f"{where}: {size_name} is {len(raw)} bytes but shape {shape} of {datatype} "
            f"needs {expected}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def tensor_bytes(array: Array, datatype: str) -> bytes:
    """The binary form of a tensor (row-major, little-endian; BYTES length-prefixed)."""
    if datatype == "BYTES":
        parts: list[bytes] = []
        for item in array.reshape(-1):
            data = item.encode("utf-8") if isinstance(item, str) else bytes(item)
            parts.append(struct.pack("<I", len(data)))
            parts.append(data)
        return b"".join(parts)
    dtype = DATATYPES[datatype]
    return np.ascontiguousarray(array, dtype=dtype).tobytes()


def _tensor_buffer(array: Array, datatype: str) -> bytes | memoryview:
    """`tensor_bytes` without a copy where the array already has the wire layout (the
    worker writes these to the socket as they are)."""
    if datatype == "BYTES":
        return tensor_bytes(array, datatype)
    flat = np.ascontiguousarray(array, dtype=DATATYPES[datatype]).reshape(-1)
    return flat.view(np.uint8).data


def _array_to_json(array: Array, datatype: str, where: str) -> list[Any] | Array:
    if datatype == "BYTES":
        out: list[Any] = []
        for item in array.reshape(-1):
            try:
                out.append(item.decode("utf-8") if isinstance(item, bytes) else str(item))
            except UnicodeDecodeError as exc:
                raise ProtocolError(
                    f"{where}: BYTES element is not UTF-8; request it with binary_data"
                ) from exc
        return out
    if _json_codec == "orjson":
        # orjson writes a numeric array itself (OPT_SERIALIZE_NUMPY): no Python floats
        return np.ascontiguousarray(array.reshape(-1), dtype=array.dtype.newbyteorder("="))
    flat: list[Any] = array.reshape(-1).tolist()
    return flat


def _parse_tensor(
    obj: Any, where: str, binary: memoryview | None, offset: int
) -> tuple[Tensor, int]:
    """Parse one tensor; a binary one takes its bytes from `binary` at `offset`."""
    if not isinstance(obj, dict):
        raise ProtocolError(f"{where} must be an object with name, shape, datatype")
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        raise ProtocolError(f"{where}.name must be a non-empty string")
    where = f"{where} '{name}'"
    datatype = obj.get("datatype")
    if datatype not in DATATYPES:
        raise ProtocolError(f"{where}: datatype {datatype!r} is not one of {ACCEPTED_DATATYPES}")
    shape = _shape(obj.get("shape"), where)
    parameters = _parameters(obj, f"{where}.")
    clean = {k: v for k, v in parameters.items() if k != "binary_data_size"}
    size = parameters.get("binary_data_size")
    if size is not None:
        if "data" in obj:
            raise ProtocolError(f"{where} has both data and parameters.binary_data_size")
        if binary is None:
            raise ProtocolError(
                f"{where} has binary_data_size but there is no {HEADER_LENGTH} header"
            )
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ProtocolError(f"{where}: binary_data_size must be a non-negative integer")
        if offset + size > len(binary):
            raise ProtocolError(
                f"{where}: binary_data_size {size} runs past the end of the body "
                f"({len(binary) - offset} bytes left)"
            )
        array = _bytes_to_array(binary[offset : offset + size], datatype, shape, where)
        return Tensor(name, array, datatype, clean), offset + size
    if "data" not in obj:
        raise ProtocolError(f"{where} has neither data nor parameters.binary_data_size")
    flat = _flatten(obj["data"])
    count = _element_count(shape)
    if len(flat) != count:
        raise ProtocolError(
            f"{where}: data has {len(flat)} elements but shape {shape} needs {count}"
        )
    return Tensor(
        name, _json_elements_to_array(flat, datatype, shape, where), datatype, clean
    ), offset


def _parse_tensors(
    items: Any, kind: str, binary: memoryview | None, offset: int
) -> tuple[list[Tensor], int]:
    if not isinstance(items, list):
        raise ProtocolError(f"'{kind}' must be a list of tensors")
    tensors: list[Tensor] = []
    names: set[str] = set()
    for i, obj in enumerate(items):
        tensor, offset = _parse_tensor(obj, f"{kind}[{i}]", binary, offset)
        if tensor.name in names:
            raise ProtocolError(f"{kind}[{i}]: tensor name '{tensor.name}' appears twice")
        names.add(tensor.name)
        tensors.append(tensor)
    return tensors, offset


# ----------------------------------------------------------------------- split bodies


def parse_header_length(value: str | None, body_length: int) -> int | None:
    """Validate the `Inference-Header-Content-Length` header against the body."""
    if value is None:
        return None
    try:
        length = int(value.strip())
    except ValueError:
        raise ProtocolError(f"{HEADER_LENGTH} must be an integer, got {value!r:.40}") from None
    if length < 0 or length > body_length:
        raise ProtocolError(f"{HEADER_LENGTH} is {length} but the body has {body_length} bytes")
    return length


def _split_body(
    body: bytes | bytearray, header_length: int | None
) -> tuple[JsonObject, memoryview | None]:
    json_part = body if header_length is None else memoryview(body)[:header_length]
    try:
        header = _loads(json_part)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        what = "body" if header_length is None else f"first {header_length} bytes of the body"
        raise ProtocolError(f"the {what} is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("the JSON body must be an object")
    binary = None if header_length is None else memoryview(body)[header_length:]
    return header, binary


def _loads(data: bytes | bytearray | memoryview) -> Any:
    if _json_codec == "orjson":
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise ProtocolError(f"not JSON: {exc}") from None  # decode_request asks json
    return json.loads(bytes(data).decode("utf-8"))  # OIP's JSON is UTF-8


def _dumps(header: JsonObject) -> bytes:
    if _json_codec == "orjson":
        try:
            return orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY)
        except orjson.JSONEncodeError:
            pass  # an array type orjson does not write, or an integer past 64 bits
    return json.dumps(header, separators=(",", ":"), default=_as_list).encode()


def _as_list(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _check_all_binary_used(binary: memoryview | None, offset: int) -> None:
    if binary is not None and offset != len(binary):
        raise ProtocolError(
            f"{len(binary) - offset} bytes after the JSON header are not claimed by any "
            "tensor's binary_data_size"
        )


def _optional_id(header: Mapping[str, Any]) -> str | None:
    value = header.get("id")
    if value is None:
        return None
    if not isinstance(value, str):
        raise ProtocolError("'id' must be a string")
    return value


def _parameters(header: Mapping[str, Any], where: str) -> JsonObject:
    value = header.get("parameters") or {}
    if not isinstance(value, dict):
        raise ProtocolError(f"{where}parameters must be an object")
    return value


# ----------------------------------------------------------------------- requests


Decoded = TypeVar("Decoded")


def _decided_by_json(
    decode: Callable[[bytes | bytearray, int | None], Decoded],
    body: bytes | bytearray,
    header_length: int | None,
) -> Decoded:
    """`decode(body, header_length)`; a body the orjson path rejects is read again on
    the replaced path, which decides: what it accepts and the message it gives stay as
    they were (orjson refuses NaN and reads an integer past 64 bits as a float, for
    two). Only bad bodies pay for the second reading."""
    global _json_codec
    try:
        return decode(body, header_length)
    except ProtocolError:
        if _json_codec == "stdlib":
            raise
    _json_codec = "stdlib"
    try:
        return decode(body, header_length)
    finally:
        _json_codec = "orjson"


def decode_request(body: bytes | bytearray, header_length: int | None) -> InferRequest:
    """Parse an inference request body (JSON, or JSON header + binary tensors)."""
    return _decided_by_json(_decode_request, body, header_length)


def _decode_request(body: bytes | bytearray, header_length: int | None) -> InferRequest:
    header, binary = _split_body(body, header_length)
    if "inputs" not in header:
        raise ProtocolError("the request has no 'inputs'")
    inputs, offset = _parse_tensors(header["inputs"], "inputs", binary, 0)
    if not inputs:
        raise ProtocolError("'inputs' is empty")
    _check_all_binary_used(binary, offset)
    outputs: list[RequestedOutput] | None = None
    if "outputs" in header:
        raw_outputs = header["outputs"]
        if not isinstance(raw_outputs, list):
            raise ProtocolError("'outputs' must be a list of {name, parameters}")
        outputs = []
        for i, obj in enumerate(raw_outputs):
            if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
                raise ProtocolError(f"outputs[{i}] must be an object with a string name")
            params = _parameters(obj, f"outputs[{i}].")
            flag = params.get("binary_data")
            if flag is not None and not isinstance(flag, bool):
                raise ProtocolError(f"outputs[{i}].parameters.binary_data must be true/false")
            outputs.append(RequestedOutput(obj["name"], flag, params))
    parameters = _parameters(header, "")
    flag = parameters.get("binary_data_output")
    if flag is not None and not isinstance(flag, bool):
        raise ProtocolError("parameters.binary_data_output must be true/false")
    return InferRequest(inputs, _optional_id(header), outputs, parameters)


Parts = list[bytes | memoryview]


def _encode(header: JsonObject, binaries: Parts) -> tuple[Parts, dict[str, str]]:
    """The body as its parts: the JSON header, then each binary tensor's bytes (views
    of the arrays, not copies), and the HTTP headers that describe it."""
    json_bytes = _dumps(header)
    if not binaries:
        return [json_bytes], {"Content-Type": JSON_CONTENT_TYPE}
    headers = {HEADER_LENGTH: str(len(json_bytes)), "Content-Type": BINARY_CONTENT_TYPE}
    return [json_bytes, *binaries], headers


def join_parts(parts: Parts) -> bytes:
    return parts[0] if len(parts) == 1 and isinstance(parts[0], bytes) else b"".join(parts)


def _tensor_header(tensor: Tensor, binary: bool, binaries: Parts, where: str) -> JsonObject:
    obj: JsonObject = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
    params = dict(tensor.parameters)
    if binary:
        raw = _tensor_buffer(tensor.array, tensor.datatype)
        params["binary_data_size"] = len(raw)
        binaries.append(raw)
    else:
        obj["data"] = _array_to_json(tensor.array, tensor.datatype, where)
    if params:
        obj["parameters"] = params
    return obj


def encode_request(request: InferRequest, binary: bool = True) -> tuple[bytes, dict[str, str]]:
    """Serialise a request; with `binary`, every input goes as binary tensor data."""
    parts, headers = encode_request_parts(request, binary)
    return join_parts(parts), headers


def encode_request_parts(
    request: InferRequest, binary: bool = True
) -> tuple[Parts, dict[str, str]]:
    """`encode_request` as the body's parts, for writing without joining them."""
    binaries: Parts = []
    header: JsonObject = {
        "inputs": [_tensor_header(t, binary, binaries, f"input '{t.name}'") for t in request.inputs]
    }
    if request.id is not None:
        header["id"] = request.id
    if request.outputs is not None:
        header["outputs"] = []
        for out in request.outputs:
            params = dict(out.parameters)
            if out.binary is not None:
                params["binary_data"] = out.binary
            header["outputs"].append(
                {"name": out.name, **({"parameters": params} if params else {})}
            )
    if request.parameters:
        header["parameters"] = request.parameters
    return _encode(header, binaries)


# ---------------------------------------------------------------------- responses


def encode_response(
    response: InferResponse, request: InferRequest | None = None
) -> tuple[bytes, dict[str, str]]:
    """Serialise a response; outputs the request asked for in binary go as binary data."""
    parts, headers = encode_response_parts(response, request)
    return join_parts(parts), headers


def encode_response_parts(
    response: InferResponse, request: InferRequest | None = None
) -> tuple[Parts, dict[str, str]]:
    """`encode_response` as the body's parts, for writing without joining them."""
    binaries: Parts = []
    outputs = [
        _tensor_header(
            t,
            request.binary_output(t.name) if request is not None else False,
            binaries,
            f"output '{t.name}'",
        )
        for t in response.outputs
    ]
    header: JsonObject = {"model_name": response.model_name}
    if response.model_version is not None:
        header["model_version"] = response.model_version
    if response.id is not None:
        header["id"] = response.id
    if response.parameters:
        header["parameters"] = response.parameters
    header["outputs"] = outputs
    return _encode(header, binaries)


def decode_response(body: bytes | bytearray, header_length: int | None) -> InferResponse:
    """Parse an inference response body (used by the chain and by tests)."""
    return _decided_by_json(_decode_response, body, header_length)


def _decode_response(body: bytes | bytearray, header_length: int | None) -> InferResponse:
    header, binary = _split_body(body, header_length)
    if "error" in header:
        raise ProtocolError(f"the response is an error: {header['error']}")
    outputs, offset = _parse_tensors(header.get("outputs", []), "outputs", binary, 0)
    _check_all_binary_used(binary, offset)
    name = header.get("model_name")
    if not isinstance(name, str):
        raise ProtocolError("the response has no model_name")
    version = header.get("model_version")
    return InferResponse(
        name,
        outputs,
        str(version) if version is not None else None,
        _optional_id(header),
        _parameters(header, ""),
    )


def error_body(message: str) -> bytes:
    """The OIP error shape, `{"error": "..."}`."""
    return json.dumps({"error": message}).encode()
