"""The OIP v2 codec: every datatype in JSON and binary form, both directions, and the
errors malformed bodies get."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from edgeai_worker.protocol import (
    DATATYPES,
    HEADER_LENGTH,
    InferRequest,
    InferResponse,
    ProtocolError,
    RequestedOutput,
    Tensor,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    parse_header_length,
    tensor_bytes,
)

SAMPLES: dict[str, np.ndarray] = {
    "BOOL": np.array([[True, False, True], [False, False, True]]),
    "UINT8": np.array([[0, 255, 7], [1, 2, 3]], dtype=np.uint8),
    "UINT16": np.array([[0, 65535, 7], [1, 2, 3]], dtype=np.uint16),
    "UINT32": np.array([[0, 2**32 - 1, 7], [1, 2, 3]], dtype=np.uint32),
    "UINT64": np.array([[0, 2**64 - 1, 7], [1, 2, 3]], dtype=np.uint64),
    "INT8": np.array([[-128, 127, 0], [1, -2, 3]], dtype=np.int8),
    "INT16": np.array([[-32768, 32767, 0], [1, -2, 3]], dtype=np.int16),
    "INT32": np.array([[-(2**31), 2**31 - 1, 0], [1, -2, 3]], dtype=np.int32),
    "INT64": np.array([[-(2**63), 2**63 - 1, 0], [1, -2, 3]], dtype=np.int64),
    "FP16": np.array([[0.5, -1.25, 65504.0], [1e-3, 2.0, -3.0]], dtype=np.float16),
    "FP32": np.array([[0.1, -1.5, 3.4e38], [1e-30, 2.0, -3.0]], dtype=np.float32),
    "FP64": np.array([[0.1, -1.5, 1e300], [1e-300, 2.0, -3.0]], dtype=np.float64),
    "BYTES": np.array(
        [[b"hello", b"", "wörld".encode()], [b"a", b"bc", b"\xff\x00"]], dtype=object
    ),
}


def _json_safe(datatype: str, array: np.ndarray) -> np.ndarray:
    # Non-UTF-8 bytes cannot travel in JSON; the binary form carries them.
    if datatype == "BYTES":
        return np.array([[b"hello", b"", "wörld".encode()], [b"a", b"bc", b"x"]], dtype=object)
    return array


@pytest.mark.parametrize("datatype", list(DATATYPES))
@pytest.mark.parametrize("binary", [False, True])
def test_request_round_trip_every_datatype(datatype: str, binary: bool) -> None:
    array = SAMPLES[datatype] if binary else _json_safe(datatype, SAMPLES[datatype])
    request = InferRequest([Tensor("x", array, datatype)], id="r-1")
    body, headers = encode_request(request, binary=binary)
    assert (HEADER_LENGTH in headers) is binary
    length = parse_header_length(headers.get(HEADER_LENGTH), len(body))
    decoded = decode_request(body, length)
    assert decoded.id == "r-1"
    (tensor,) = decoded.inputs
    assert tensor.datatype == datatype
    assert tensor.shape == [2, 3]
    if datatype == "BYTES":
        assert tensor.array.tolist() == array.tolist()
    else:
        assert tensor.array.dtype == DATATYPES[datatype]
        np.testing.assert_array_equal(tensor.array, array)


@pytest.mark.parametrize("datatype", list(DATATYPES))
def test_response_outputs_binary_or_json_as_requested(datatype: str) -> None:
    array = _json_safe(datatype, SAMPLES[datatype])
    response = InferResponse("m", [Tensor("a", array, datatype), Tensor("b", array, datatype)], "1")
    request = InferRequest(
        [Tensor("x", np.zeros(1, np.float32), "FP32")],
        outputs=[RequestedOutput("a", binary=True), RequestedOutput("b")],
    )
    body, headers = encode_response(response, request)
    header = json.loads(body[: int(headers[HEADER_LENGTH])])
    a, b = header["outputs"]
    assert "data" not in a
    assert a["parameters"]["binary_data_size"] == len(tensor_bytes(array, datatype))
    assert b["shape"] == [2, 3]
    assert len(b["data"]) == 6  # JSON output data is flattened row-major
    decoded = decode_response(body, int(headers[HEADER_LENGTH]))
    for tensor in decoded.outputs:
        assert tensor.array.tolist() == array.tolist()


def test_binary_data_output_applies_to_all_and_per_output_flag_wins() -> None:
    x = Tensor("x", np.zeros(1, np.float32), "FP32")
    request = InferRequest(
        [x],
        outputs=[RequestedOutput("b", binary=False)],
        parameters={"binary_data_output": True},
    )
    assert request.binary_output("a") is True
    assert request.binary_output("b") is False
    plain = InferRequest([x])
    assert plain.binary_output("a") is False


def test_bytes_binary_layout_is_length_prefixed_little_endian() -> None:
    raw = tensor_bytes(np.array([b"ab", b"", b"xyz"], dtype=object), "BYTES")
    assert (
        raw == struct.pack("<I", 2) + b"ab" + struct.pack("<I", 0) + struct.pack("<I", 3) + b"xyz"
    )


def test_numbers_are_little_endian_row_major() -> None:
    array = np.array([[1, 2], [3, 4]], dtype=">i4")  # big-endian in memory
    assert tensor_bytes(array, "INT32") == struct.pack("<4i", 1, 2, 3, 4)


def test_nested_and_flat_json_data_are_the_same_tensor() -> None:
    flat = {"inputs": [{"name": "x", "shape": [2, 2], "datatype": "INT32", "data": [1, 2, 3, 4]}]}
    nested = {
        "inputs": [{"name": "x", "shape": [2, 2], "datatype": "INT32", "data": [[1, 2], [3, 4]]}]
    }
    a = decode_request(json.dumps(flat).encode(), None).inputs[0].array
    b = decode_request(json.dumps(nested).encode(), None).inputs[0].array
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, [[1, 2], [3, 4]])


def test_mixed_json_and_binary_inputs_in_one_request() -> None:
    raw = np.arange(6, dtype=np.float32).tobytes()
    header = json.dumps(
        {
            "id": "7",
            "inputs": [
                {"name": "j", "shape": [2], "datatype": "INT64", "data": [5, 6]},
                {
                    "name": "b",
                    "shape": [2, 3],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                },
            ],
            "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
        }
    ).encode()
    request = decode_request(header + raw, len(header))
    assert [t.name for t in request.inputs] == ["j", "b"]
    np.testing.assert_array_equal(request.inputs[1].array, np.arange(6).reshape(2, 3))
    assert request.binary_output("y") is True


BAD_BODIES: list[tuple[bytes, int | None, str]] = [
    (b"not json", None, "not valid JSON"),
    (b"[1, 2]", None, "must be an object"),
    (b"{}", None, "no 'inputs'"),
    (b'{"inputs": []}', None, "'inputs' is empty"),
    (
        b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP8", "data": [1, 2]}]}',
        None,
        "datatype 'FP8' is not one of",
    ),
    (
        b'{"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2]}]}',
        None,
        "data has 2 elements but shape [3] needs 3",
    ),
    (
        b'{"inputs": [{"name": "x", "shape": [-1], "datatype": "FP32", "data": [1]}]}',
        None,
        "negative dimension",
    ),
    (
        b'{"inputs": [{"name": "x", "shape": "2", "datatype": "FP32", "data": [1, 2]}]}',
        None,
        "shape must be a list of integers",
    ),
    (
        b'{"inputs": [{"name": "x", "shape": [1], "datatype": "UINT8", "data": [300]}]}',
        None,
        "out of range for UINT8",
    ),
    (
        b'{"inputs": [{"name": "x", "shape": [1], "datatype": "BOOL", "data": [1]}]}',
        None,
        "BOOL data must be true/false",
    ),
    (
        b'{"inputs": [{"name": "x", "shape": [1], "datatype": "INT32", "data": [1.5]}]}',
        None,
        "INT32 data must be integers",
    ),
    (
        b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32"}]}',
        None,
        "neither data nor parameters.binary_data_size",
    ),
    (
        b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]},'
        b' {"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}',
        None,
        "appears twice",
    ),
    (
        b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32",'
        b' "parameters": {"binary_data_size": 4}}]}',
        None,
        "no Inference-Header-Content-Length",
    ),
]


@pytest.mark.parametrize(("body", "length", "message"), BAD_BODIES)
def test_malformed_requests_name_the_problem(body: bytes, length: int | None, message: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_request(body, length)
    assert message in str(info.value)
    assert info.value.status == 400


def _binary_request(size_claimed: int, payload: bytes) -> tuple[bytes, int]:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [2],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": size_claimed},
                }
            ]
        }
    ).encode()
    return header + payload, len(header)


def test_binary_size_past_end_of_body() -> None:
    body, length = _binary_request(16, bytes(8))
    with pytest.raises(ProtocolError, match="runs past the end of the body"):
        decode_request(body, length)


def test_binary_size_not_matching_shape() -> None:
    body, length = _binary_request(4, bytes(4))
    with pytest.raises(ProtocolError, match="needs 8"):
        decode_request(body, length)


def test_unclaimed_trailing_bytes() -> None:
    body, length = _binary_request(8, bytes(12))
    with pytest.raises(ProtocolError, match="4 bytes after the JSON header are not claimed"):
        decode_request(body, length)


@pytest.mark.parametrize(("value", "message"), [("abc", "must be an integer"), ("999", "body has")])
def test_bad_header_length(value: str, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        parse_header_length(value, 10)


def test_header_length_that_cuts_json_short() -> None:
    body, length = _binary_request(8, bytes(8))
    with pytest.raises(ProtocolError, match="not valid JSON"):
        decode_request(body, length - 3)


def test_truncated_bytes_element() -> None:
    raw = struct.pack("<I", 10) + b"abc"
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "s",
                    "shape": [1],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        }
    ).encode()
    with pytest.raises(ProtocolError, match="runs past the binary data"):
        decode_request(header + raw, len(header))


def test_non_utf8_bytes_output_needs_binary() -> None:
    response = InferResponse("m", [Tensor("s", np.array([b"\xff"], dtype=object), "BYTES")])
    with pytest.raises(ProtocolError, match="request it with binary_data"):
        encode_response(response, None)
