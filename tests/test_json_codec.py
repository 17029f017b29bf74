"""The REST codec's two JSON paths: orjson (the default) and Python's json module (the
path it replaced, selectable with the worker's `json_codec`). Both accept the same
bodies, give the same tensors and the same error messages; they differ in speed and in
how they write FP32 numbers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from aiohttp.test_utils import TestClient

from edgeai_worker import protocol
from edgeai_worker.app import create_app
from edgeai_worker.config import ConfigError, WorkerConfig, load_config
from edgeai_worker.protocol import (
    DATATYPES,
    InferRequest,
    InferResponse,
    ProtocolError,
    Tensor,
    decode_request,
    encode_request,
    encode_response,
)
from test_protocol import BAD_BODIES


@pytest.fixture
def codec() -> Iterator[None]:
    """Restore the process's JSON path after a test that switches it."""
    yield
    protocol.set_json_codec("orjson")


def _decode_error(body: bytes, length: int | None) -> str:
    with pytest.raises(ProtocolError) as info:
        decode_request(body, length)
    return str(info.value)


def _numbers(datatype: str) -> np.ndarray:
    rng = np.random.default_rng(7)
    dtype = DATATYPES[datatype]
    if datatype == "BOOL":
        return rng.integers(0, 2, (2, 3)).astype(bool)
    if dtype.kind == "f":
        return rng.standard_normal((2, 3)).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, (2, 3), dtype=dtype, endpoint=True)


@pytest.mark.usefixtures("codec")
def test_both_paths_give_the_same_messages_for_every_malformed_body() -> None:
    for body, length, _ in BAD_BODIES:
        protocol.set_json_codec("stdlib")
        stdlib = _decode_error(body, length)
        protocol.set_json_codec("orjson")
        assert _decode_error(body, length) == stdlib
    # not UTF-8, integers past 64 bits: orjson refuses, json decides as before
    for body in (
        b'{"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["\xff"]}]}',
        b'{"inputs": [{"name": "x", "shape": [1], "datatype": "INT64", "data": [1e999999]}]}',
        b'{"inputs": [{"name": "x", "shape": [1], "datatype": "INT64", '
        b'"data": [99999999999999999999]}]}',
    ):
        protocol.set_json_codec("stdlib")
        stdlib = _decode_error(body, None)
        protocol.set_json_codec("orjson")
        assert _decode_error(body, None) == stdlib, body
    assert "out of range for INT64" in stdlib
    # NaN, which json reads and orjson refuses, is read on both paths
    nan = b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [NaN, 1]}]}'
    array = decode_request(nan, None).inputs[0].array
    assert np.isnan(array[0])
    assert array[1] == 1


@pytest.mark.usefixtures("codec")
@pytest.mark.parametrize("datatype", [d for d in DATATYPES if d != "BYTES"])
def test_both_paths_round_trip_every_numeric_datatype(datatype: str) -> None:
    array = _numbers(datatype)
    request = InferRequest([Tensor.from_numpy("x", array, datatype)], id="r")
    bodies = {}
    for name in protocol.JSON_CODECS:
        protocol.set_json_codec(name)
        body, headers = encode_request(request, binary=False)
        assert headers == {"Content-Type": "application/json"}
        bodies[name] = body
        for reader in protocol.JSON_CODECS:  # each path reads what the other wrote
            protocol.set_json_codec(reader)
            decoded = decode_request(body, None).inputs[0]
            assert decoded.datatype == datatype
            np.testing.assert_array_equal(decoded.array, array)
    assert json.loads(bodies["orjson"]) == json.loads(bodies["stdlib"]) or datatype in (
        "FP16",
        "FP32",
    )


@pytest.mark.usefixtures("codec")
def test_orjson_writes_fp32_in_its_shortest_form_and_stdlib_as_doubles() -> None:
    response = InferResponse("m", [Tensor.from_numpy("y", np.array([0.1], np.float32))])
    protocol.set_json_codec("orjson")
    fast, _ = encode_response(response)
    protocol.set_json_codec("stdlib")
    slow, _ = encode_response(response)
    assert b'"data":[0.1]' in fast
    assert b'"data":[0.10000000149011612]' in slow
    assert np.float32(json.loads(fast)["outputs"][0]["data"][0]) == np.float32(
        json.loads(slow)["outputs"][0]["data"][0]
    )


@pytest.mark.usefixtures("codec")
async def test_the_worker_setting_chooses_the_path(aiohttp_client: Any, tmp_path: Any) -> None:
    assert load_config(None, {"EDGEAI_JSON_CODEC": "stdlib"}).json_codec == "stdlib"
    with pytest.raises(ConfigError) as info:
        WorkerConfig(json_codec="simdjson")
    assert "json_codec" in str(info.value)
    assert "orjson, stdlib" in str(info.value)
    for name, written in (("stdlib", b"0.10000000149011612"), ("orjson", b"0.1")):
        client: TestClient[Any, Any] = await aiohttp_client(
            create_app(WorkerConfig(model_name="m", json_codec=name))
        )
        # a stage without partitions and without a next stage answers with its input
        response = await client.post(
            "/v2/models/m/infer",
            json={"inputs": [{"name": "y", "shape": [1], "datatype": "FP32", "data": [0.1]}]},
        )
        body = await response.read()
        assert response.status == 200, body
        assert b'"data":[' + written + b"]" in body, body
        await client.close()
