"""Open Inference Protocol v2 gRPC codec: `ModelInferRequest`/`ModelInferResponse`
messages to and from the worker's `InferRequest`/`InferResponse`.

Inputs come as `raw_input_contents` (one entry per input, the binary layout of the
REST extension) or as typed `contents`; outputs always go back as
`raw_output_contents`, as Triton's server answers. Every check of the REST codec
applies, with the same messages, and raises `ProtocolError`.

The worker's own calls (the server's ModelInfer, the forwarder, the bench's client)
read and write messages on the wire themselves (`parse_infer_request`,
`serialize_infer_response`, `serialize_infer_request`, `parse_infer_response`): the
raw contents stay views of the received bytes and go out joined once from the arrays,
where protobuf would copy each tensor three times (into the message, out of it, into
the serialized string). Only the small rest of the message goes through protobuf.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf.message import Message

from edgeai_worker import grpc_predict_v2_pb2 as pb
from edgeai_worker.protocol import (
    ACCEPTED_DATATYPES,
    DATATYPES,
    InferRequest,
    InferResponse,
    JsonObject,
    ProtocolError,
    RequestedOutput,
    Tensor,
    _bytes_to_array,
    _element_count,
    _shape,
    _tensor_buffer,
)

# datatype -> the InferTensorContents field its typed elements travel in
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

_INT64_MAX = (1 << 63) - 1


def parameters_of(message: Mapping[str, pb.InferParameter]) -> JsonObject:
    """A parameters map as plain values."""
    values: JsonObject = {}
    for key, parameter in message.items():
        kind = parameter.WhichOneof("parameter_choice")
        if kind is not None:
            values[key] = getattr(parameter, kind)
    return values


def set_parameters(target: MutableMapping[str, pb.InferParameter], values: JsonObject) -> None:
    """Write plain values into a parameters map (nested values go as their text)."""
    for key, value in values.items():
        parameter = target[key]
        if isinstance(value, bool):
            parameter.bool_param = value
        elif isinstance(value, int):
            if value > _INT64_MAX:
                parameter.uint64_param = value
            else:
                parameter.int64_param = value
        elif isinstance(value, float):
            parameter.double_param = value
        else:
            parameter.string_param = str(value)


def _typed_contents(
    contents: pb.InferTensorContents, datatype: str, shape: list[int], where: str
) -> Any:
    if datatype not in CONTENTS_FIELD:
        raise ProtocolError(
            f"{where}: {datatype} has no typed contents field; send it in raw_input_contents"
        )
    field = CONTENTS_FIELD[datatype]
    values: Sequence[Any] = getattr(contents, field)
    count = _element_count(shape)
    if len(values) != count:
        raise ProtocolError(
            f"{where}: data has {len(values)} elements but shape {shape} needs {count} "
            f"({datatype} elements go in contents.{field})"
        )
    if datatype == "BYTES":
        items = np.empty(count, dtype=np.object_)
        items[:] = list(values)
        return items.reshape(shape)
    dtype = DATATYPES[datatype]
    if dtype.kind in "iu" and values and dtype.itemsize < 4:
        info = np.iinfo(dtype)
        if min(values) < info.min or max(values) > info.max:
            raise ProtocolError(f"{where}: a value is out of range for {datatype}")
    return np.array(values, dtype=dtype).reshape(shape)


def _tensor(message: Any, kind: str, index: int, raw: bytes | memoryview | None) -> Tensor:
    """One tensor of `inputs` or `outputs` (`kind`), from its raw contents when the
    message has them, else from its typed contents."""
    where = f"{kind}[{index}]"
    if not message.name:
        raise ProtocolError(f"{where}.name must be a non-empty string")
    where = f"{where} '{message.name}'"
    datatype = message.datatype
    if datatype not in DATATYPES:
        raise ProtocolError(f"{where}: datatype {datatype!r} is not one of {ACCEPTED_DATATYPES}")
    shape = _shape(list(message.shape), where)
    if raw is not None:
        raw_name = f"raw_{kind[:-1]}_contents[{index}]"
        array = _bytes_to_array(raw, datatype, shape, where, raw_name)
    else:
        array = _typed_contents(message.contents, datatype, shape, where)
    return Tensor(message.name, array, datatype, parameters_of(message.parameters))


def _tensors(messages: Sequence[Any], raw: Sequence[bytes | memoryview], kind: str) -> list[Tensor]:
    """The tensors of `inputs` or `outputs`; `raw` holds one entry per tensor, or none."""
    if raw and len(raw) != len(messages):
        raise ProtocolError(
            f"raw_{kind[:-1]}_contents has {len(raw)} entries but the message has "
            f"{len(messages)} {kind} (accepted: one entry per tensor, in order, or none)"
        )
    tensors: list[Tensor] = []
    names: set[str] = set()
    for i, message in enumerate(messages):
        tensor = _tensor(message, kind, i, raw[i] if raw else None)
        if tensor.name in names:
            raise ProtocolError(f"{kind}[{i}]: tensor name '{tensor.name}' appears twice")
        names.add(tensor.name)
        tensors.append(tensor)
    return tensors


def decode_infer_request(
    message: pb.ModelInferRequest, raw: Sequence[bytes | memoryview] | None = None
) -> InferRequest:
    """The request a `ModelInferRequest` carries (model name and version are the
    caller's to check); `raw`: its raw input contents when they were taken off the
    wire apart from the message (`parse_infer_request`)."""
    if not message.inputs:
        raise ProtocolError("'inputs' is empty")
    contents = message.raw_input_contents if raw is None else raw
    inputs = _tensors(message.inputs, contents, "inputs")
    outputs: list[RequestedOutput] | None = None
    if message.outputs:
        outputs = [
            RequestedOutput(o.name, None, parameters_of(o.parameters)) for o in message.outputs
        ]
    return InferRequest(inputs, message.id or None, outputs, parameters_of(message.parameters))


def _request_header(
    request: InferRequest, model_name: str, model_version: str
) -> pb.ModelInferRequest:
    """A `ModelInferRequest` with everything but the raw input contents."""
    message = pb.ModelInferRequest(
        model_name=model_name, model_version=model_version, id=request.id or ""
    )
    set_parameters(message.parameters, request.parameters)
    for tensor in request.inputs:
        entry = message.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        set_parameters(entry.parameters, tensor.parameters)
    for requested in request.outputs or []:
        output = message.outputs.add(name=requested.name)
        set_parameters(output.parameters, requested.parameters)
    return message


def _response_header(response: InferResponse) -> pb.ModelInferResponse:
    """A `ModelInferResponse` with everything but the raw output contents."""
    message = pb.ModelInferResponse(
        model_name=response.model_name,
        model_version=response.model_version or "",
        id=response.id or "",
    )
    set_parameters(message.parameters, response.parameters)
    for tensor in response.outputs:
        entry = message.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        set_parameters(
            entry.parameters,
            {k: v for k, v in tensor.parameters.items() if k != "binary_data_size"},
        )
    return message


def encode_infer_request(
    request: InferRequest, model_name: str, model_version: str = ""
) -> pb.ModelInferRequest:
    """A `ModelInferRequest` with every input as raw contents."""
    message = _request_header(request, model_name, model_version)
    for tensor in request.inputs:
        message.raw_input_contents.append(bytes(_tensor_buffer(tensor.array, tensor.datatype)))
    return message


def encode_infer_response(response: InferResponse) -> pb.ModelInferResponse:
    """A `ModelInferResponse` with every output as raw contents."""
    message = _response_header(response)
    for tensor in response.outputs:
        message.raw_output_contents.append(bytes(_tensor_buffer(tensor.array, tensor.datatype)))
    return message


def decode_infer_response(
    message: pb.ModelInferResponse, raw: Sequence[bytes | memoryview] | None = None
) -> InferResponse:
    """The response a `ModelInferResponse` carries (raw or typed outputs); `raw` as
    for `decode_infer_request`."""
    contents = message.raw_output_contents if raw is None else raw
    outputs = _tensors(message.outputs, contents, "outputs")
    return InferResponse(
        message.model_name,
        outputs,
        message.model_version or None,
        message.id or None,
        parameters_of(message.parameters),
    )


def tensor_metadata(
    items: Sequence[Mapping[str, Any]],
) -> list[pb.ModelMetadataResponse.TensorMetadata]:
    """REST metadata entries ({name, datatype, shape}) as gRPC `TensorMetadata`."""
    return [
        pb.ModelMetadataResponse.TensorMetadata(
            name=str(item["name"]), datatype=str(item["datatype"]), shape=list(item["shape"])
        )
        for item in items
    ]


# ---------------------------------------------------------------- on the wire
# Field numbers of `raw_input_contents` in ModelInferRequest and of
# `raw_output_contents` in ModelInferResponse (grpc_predict_v2.proto).
RAW_INPUT_FIELD = 7
RAW_OUTPUT_FIELD = 6
_LENGTH_DELIMITED = 2
_RAW_FIELD_NAMES = {RAW_INPUT_FIELD: "raw_input_contents", RAW_OUTPUT_FIELD: "raw_output_contents"}
# Below this many bytes protobuf's own copies cost less than splitting in Python.
WIRE_PATH_MIN_BYTES = 32 * 1024


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(data: memoryview, offset: int) -> tuple[int, int]:
    """The varint at `offset` and the offset after it; ValueError past the end."""
    value = shift = 0
    while True:
        if offset >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, offset
        shift += 7


def _split(data: bytes, field: int) -> tuple[bytes, list[memoryview]]:
    """The top-level fields of a serialized message other than `field` (serialized
    again, one join of the spans around it), and the entries of `field` (a repeated
    bytes field) as views of `data`. ValueError for what is not a well-formed message."""
    view = memoryview(data)
    rest: list[memoryview] = []
    entries: list[memoryview] = []
    kept_from = offset = 0
    while offset < len(view):
        start = offset
        tag, offset = _read_varint(view, offset)
        wire_type = tag & 7
        if wire_type == 0:
            _, offset = _read_varint(view, offset)
        elif wire_type == 1:
            offset += 8
        elif wire_type == 5:
            offset += 4
        elif wire_type == _LENGTH_DELIMITED:
            length, offset = _read_varint(view, offset)
            if tag >> 3 == field:
                if offset + length > len(view):
                    raise ValueError("truncated field")
                rest.append(view[kept_from:start])
                entries.append(view[offset : offset + length])
                kept_from = offset + length
            offset += length
        else:
            raise ValueError(f"wire type {wire_type}")
        if offset > len(view):
            raise ValueError("truncated field")
    rest.append(view[kept_from:])
    return b"".join(rest), entries


def _join(header: Message, field: int, buffers: Sequence[bytes | memoryview]) -> bytes:
    """`header` serialized, then each buffer as an entry of the repeated bytes
    `field`: one copy of each buffer, into the bytes that go to the socket."""
    if sum(memoryview(b).nbytes for b in buffers) < WIRE_PATH_MIN_BYTES:
        getattr(header, _RAW_FIELD_NAMES[field]).extend(bytes(b) for b in buffers)
        small: bytes = header.SerializeToString()
        return small
    tag = _varint(field << 3 | _LENGTH_DELIMITED)
    parts: list[bytes | memoryview] = [header.SerializeToString()]
    for buffer in buffers:
        parts += [tag, _varint(memoryview(buffer).nbytes), buffer]
    return b"".join(parts)


@dataclass(frozen=True)
class WireRequest:
    """A received `ModelInferRequest`: the message without its raw input contents,
    those as views of the received bytes, and the size it had on the wire."""

    message: pb.ModelInferRequest
    raw: Sequence[bytes | memoryview]
    size_bytes: int

    def decode(self) -> InferRequest:
        return decode_infer_request(self.message, self.raw)


def parse_infer_request(data: bytes) -> WireRequest:
    """A serialized `ModelInferRequest` (a server's request deserializer). What the
    fast path cannot split goes to protobuf whole, which raises as it always did."""
    try:
        if len(data) < WIRE_PATH_MIN_BYTES:
            raise ValueError("small")
        rest, raw = _split(data, RAW_INPUT_FIELD)
    except ValueError:
        message = pb.ModelInferRequest.FromString(data)
        return WireRequest(message, message.raw_input_contents, len(data))
    return WireRequest(pb.ModelInferRequest.FromString(rest), raw, len(data))


def parse_infer_response(data: bytes) -> InferResponse:
    """A serialized `ModelInferResponse`, decoded (raw outputs stay views of `data`)."""
    try:
        if len(data) < WIRE_PATH_MIN_BYTES:
            raise ValueError("small")
        rest, raw = _split(data, RAW_OUTPUT_FIELD)
    except ValueError:
        return decode_infer_response(pb.ModelInferResponse.FromString(data))
    return decode_infer_response(pb.ModelInferResponse.FromString(rest), raw)


def serialize_infer_request(
    request: InferRequest, model_name: str, model_version: str = ""
) -> bytes:
    """`encode_infer_request(...).SerializeToString()`, each tensor copied once."""
    header = _request_header(request, model_name, model_version)
    buffers = [_tensor_buffer(t.array, t.datatype) for t in request.inputs]
    return _join(header, RAW_INPUT_FIELD, buffers)


def serialize_infer_response(response: InferResponse) -> bytes:
    """`encode_infer_response(...).SerializeToString()`, each tensor copied once."""
    buffers = [_tensor_buffer(t.array, t.datatype) for t in response.outputs]
    return _join(_response_header(response), RAW_OUTPUT_FIELD, buffers)
