"""Open Inference Protocol v2 gRPC codec: `ModelInferRequest`/`ModelInferResponse`
messages to and from the worker's `InferRequest`/`InferResponse`.

Inputs come as `raw_input_contents` (one entry per input, the binary layout of the
REST extension) or as typed `contents`; outputs always go back as
`raw_output_contents`, as Triton's server answers. Every check of the REST codec
applies, with the same messages, and raises `ProtocolError`.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

import numpy as np

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


def _tensor(message: Any, kind: str, index: int, raw: bytes | None) -> Tensor:
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


def _tensors(messages: Sequence[Any], raw: Sequence[bytes], kind: str) -> list[Tensor]:
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


def decode_infer_request(message: pb.ModelInferRequest) -> InferRequest:
    """The request a `ModelInferRequest` carries (model name and version are the
    caller's to check)."""
    if not message.inputs:
        raise ProtocolError("'inputs' is empty")
    inputs = _tensors(message.inputs, message.raw_input_contents, "inputs")
    outputs: list[RequestedOutput] | None = None
    if message.outputs:
        outputs = [
            RequestedOutput(o.name, None, parameters_of(o.parameters)) for o in message.outputs
        ]
    return InferRequest(inputs, message.id or None, outputs, parameters_of(message.parameters))


def encode_infer_request(
    request: InferRequest, model_name: str, model_version: str = ""
) -> pb.ModelInferRequest:
    """A `ModelInferRequest` with every input as raw contents (what a stage forwards)."""
    message = pb.ModelInferRequest(
        model_name=model_name, model_version=model_version, id=request.id or ""
    )
    set_parameters(message.parameters, request.parameters)
    for tensor in request.inputs:
        entry = message.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        set_parameters(entry.parameters, tensor.parameters)
        message.raw_input_contents.append(bytes(_tensor_buffer(tensor.array, tensor.datatype)))
    for requested in request.outputs or []:
        output = message.outputs.add(name=requested.name)
        set_parameters(output.parameters, requested.parameters)
    return message


def encode_infer_response(response: InferResponse) -> pb.ModelInferResponse:
    """A `ModelInferResponse` with every output as raw contents."""
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
        message.raw_output_contents.append(bytes(_tensor_buffer(tensor.array, tensor.datatype)))
    return message


def decode_infer_response(message: pb.ModelInferResponse) -> InferResponse:
    """The response a `ModelInferResponse` carries (raw or typed outputs)."""
    outputs = _tensors(message.outputs, message.raw_output_contents, "outputs")
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
