"""DNNModel source, artefact and data URIs: accepted and refused samples, shared by the
parser's tests (test_modelspec, test_spec_schema) and the API server's (test_crd_validation)
so the CRD's CEL rules and `parse_model_spec` are held to the same answers."""

from __future__ import annotations

from typing import Any

DIGEST = "0123456789abcdef" * 4

# spec.source values both sides accept.
GOOD_SOURCES: list[dict[str, Any]] = [
    {"zoo": "resnet18"},
    {"uri": "zoo://kws_lstm"},
    {"uri": "https://models.example/nets/net.onnx", "sha256": DIGEST},
    {"uri": "http://127.0.0.1:8080/net.onnx?version=2", "sha256": DIGEST},
    {"uri": "pvc://models/nets/net.onnx"},
    {"uri": "configmap://small-net/model.onnx", "sha256": DIGEST},
    {"uri": "oci://registry.local:5000/models/net:v1"},
    {"uri": f"oci://[::1]:5000/models/net@sha256:{DIGEST}"},
]
# http(s) sources without a sha256: refused naming the sha256.
UNPINNED_SOURCES = ["https://models.example/net.onnx", "http://models.example/net.onnx"]
# spec.source values both sides refuse, and the field each refusal names (a refusal
# naming a field carries the refused value of that field).
BAD_SOURCES: list[tuple[str, dict[str, Any], str]] = [
    ("zoo and uri", {"zoo": "resnet18", "uri": "zoo://resnet18"}, "spec.source"),
    ("neither zoo nor uri", {"sha256": DIGEST}, "spec.source"),
    ("unknown scheme", {"uri": "ftp://models.example/net.onnx"}, "spec.source.uri"),
    ("no scheme", {"uri": "models/net.onnx"}, "spec.source.uri"),
    ("unknown zoo model", {"uri": "zoo://yolo"}, "spec.source.uri"),
    (
        "https without a file",
        {"uri": "https://models.example/", "sha256": DIGEST},
        "spec.source.uri",
    ),
    ("sha256 upper case", {"zoo": "resnet18", "sha256": DIGEST.upper()}, "spec.source.sha256"),
    ("sha256 prefixed", {"zoo": "resnet18", "sha256": f"sha256:{DIGEST}"}, "spec.source.sha256"),
    ("sha256 too short", {"zoo": "resnet18", "sha256": DIGEST[:63]}, "spec.source.sha256"),
    ("pvc without a path", {"uri": "pvc://models"}, "spec.source.uri"),
    ("pvc claim not a DNS name", {"uri": "pvc://Models_1/net.onnx"}, "spec.source.uri"),
    ("pvc path escaping", {"uri": "pvc://models/../net.onnx"}, "spec.source.uri"),
    ("configmap key with a slash", {"uri": "configmap://nets/a/b.onnx"}, "spec.source.uri"),
    ("configmap key ..", {"uri": "configmap://nets/.."}, "spec.source.uri"),
    ("oci without tag or digest", {"uri": "oci://registry.local/models/net"}, "spec.source.uri"),
    ("oci upper-case repository", {"uri": "oci://registry.local/Models:v1"}, "spec.source.uri"),
    ("oci short digest", {"uri": "oci://registry.local/net@sha256:abc"}, "spec.source.uri"),
]
GOOD_ARTIFACTS = [
    "oci://registry.local:5000/models",
    "oci://registry.local/team/models/",
    "pvc://artefacts",
    "pvc://artefacts/digits/v2",
]
BAD_ARTIFACTS = [
    "oci://registry.local:5000/models:v1",
    f"oci://registry.local:5000/models@sha256:{DIGEST}",
    "https://registry.local/models",
    "zoo://digits_cnn",
    "pvc://Artefacts/digits",
    "pvc://artefacts/../digits",
]
# spec.calibration and spec.data: the source forms but zoo://, sha256 required for http(s).
GOOD_DATA_FILES: list[dict[str, Any]] = [
    {"uri": "https://data.example/calibration.npz", "sha256": DIGEST},
    {"uri": "pvc://datasets/digits/heldout.npz"},
    {"uri": "configmap://digits-data/heldout.npz"},
    {"uri": "oci://registry.local/data/digits:heldout"},
]
BAD_DATA_FILES: list[tuple[str, dict[str, Any], str]] = [
    ("zoo", {"uri": "zoo://digits_cnn"}, "uri"),
    ("unknown scheme", {"uri": "s3://bucket/calibration.npz"}, "uri"),
    ("bad sha256", {"uri": "pvc://datasets/c.npz", "sha256": "xyz"}, "sha256"),
    ("pvc without a path", {"uri": "pvc://datasets"}, "uri"),
]

# spec.additionalInputs beside spec.input {name: input, ...}: accepted, and refused
# with the field the refusal names (and the API server's message).
_STATE = {"name": "state", "shape": [2, 1, 128], "dtype": "FP32"}
GOOD_ADDITIONAL_INPUTS: list[list[dict[str, Any]]] = [
    [_STATE],
    [_STATE, {"name": "sr", "shape": [1], "dtype": "INT64"}],
]
BAD_ADDITIONAL_INPUTS: list[tuple[str, list[dict[str, Any]], str]] = [
    (
        "named like spec.input",
        [{**_STATE, "name": "input"}],
        "spec.additionalInputs",  # the CRD's rule is on spec: it names no index
    ),
    ("a name twice", [_STATE, _STATE], "spec.additionalInputs[1]"),
    ("a free dimension", [{**_STATE, "shape": [2, 0, 128]}], "spec.additionalInputs[0].shape[1]"),
    ("no dtype", [{"name": "state", "shape": [1]}], "spec.additionalInputs[0].dtype"),
]
