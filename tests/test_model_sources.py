"""A user's own ONNX model, brought from https, http, oci and configmap sources, prepared by the
operator's preparation Job, planned across a device and an edge stage and served by
stage pods started from their exact commands (init container `edgeai fetch`, then
`edgeai run-stage`): the answers equal onnxruntime's on the original file. Bad sources
and models are refused with a message naming the problem, and leave what is already
serving as it was."""

from __future__ import annotations

import hashlib
import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from _cluster_support import Namespace, apply, condition, get, wait_for
from _cluster_support import dnn_model as cluster_dnn_model
from _model_server import ModelServer, ServerCert, make_ca
from _real_graphs import sequence_output
from _serving import deployment, infer, serving_chain, slow_device
from conftest import CA_BUNDLE_CONFIGMAP, OperatorProcess
from edgeai_operator import oci
from edgeai_operator.localregistry import LocalRegistry

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]
WIDTH = 256


def user_model(path: Path, *, inputs: int = 1) -> Path:
    """An MLP exported by no framework: four MatMul+Relu layers built with onnx.helper,
    one named input `features` (or two, added together) and one output `scores`."""
    rng = np.random.default_rng(7)
    nodes, inits = [], []
    value = "features"
    graph_inputs = [helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, WIDTH])]
    if inputs == 2:
        graph_inputs.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, [1, WIDTH]))
        nodes.append(helper.make_node("Add", ["features", "extra"], ["summed"]))
        value = "summed"
    for i in range(4):
        out = WIDTH if i < 3 else 10
        weight = (rng.standard_normal((WIDTH, out)) / np.sqrt(WIDTH)).astype(np.float32)
        inits.append(numpy_helper.from_array(weight, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [value, f"w{i}"], [f"m{i}"]))
        value = f"m{i}"
        if i < 3:
            nodes.append(helper.make_node("Relu", [value], [f"r{i}"]))
            value = f"r{i}"
    nodes.append(helper.make_node("Identity", [value], ["scores"]))
    graph = helper.make_graph(
        nodes,
        "user-mlp",
        graph_inputs,
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return user_model(tmp_path_factory.mktemp("user") / "scorer.onnx")


@pytest.fixture(scope="module")
def http_server(model_file: Path) -> Iterator[str]:
    """A real HTTP server on loopback serving the model at /models/scorer.onnx."""
    server = ModelServer()
    server.serve("/models/scorer.onnx", model_file.read_bytes())
    yield server.base_url
    server.stop()


@pytest.fixture(scope="module")
def server_cert(tmp_path_factory: pytest.TempPathFactory) -> ServerCert:
    return make_ca(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def https_server(model_file: Path, server_cert: ServerCert) -> Iterator[str]:
    """The same over HTTPS, its certificate signed by a CA of the test's own."""
    server = ModelServer(tls=server_cert)
    server.serve("/models/scorer.onnx", model_file.read_bytes())
    yield server.base_url
    server.stop()


def dnn_model(name: str, source: dict[str, Any], **spec: Any) -> dict[str, Any]:
    features = {"name": "features", "shape": [1, WIDTH], "dtype": "FP32"}
    return cluster_dnn_model(name, source, features, **spec)


def prepared(ns: Namespace, name: str, timeout_s: float = 180) -> dict[str, Any]:
    def done() -> Any:
        obj = get(ns, "dnnm", name)
        cond = condition(obj, "Prepared")
        gen = (obj or {}).get("metadata", {}).get("generation")
        return cond.get("observedGeneration") == gen and cond.get("status") == "True" and obj

    result: dict[str, Any] = wait_for(f"DNNModel {name} prepared", done, timeout_s)
    return result


def model_condition(
    ns: Namespace,
    name: str,
    type_: str,
    status: str,
    reason: str | None = None,
    timeout_s: float = 120,
) -> Any:
    """The DNNModel once its condition `type_` has `status` (and `reason`, if given)."""

    def holds() -> Any:
        obj = get(ns, "dnnm", name)
        cond = condition(obj, type_)
        matches = cond.get("status") == status and reason in (None, cond.get("reason"))
        return matches and obj

    shown = f"{type_}={status}" + (f" {reason}" if reason else "")
    return wait_for(f"DNNModel {name} {shown}", holds, timeout_s)


def pod_annotations(ns: Namespace, deployment_name: str) -> dict[str, Any]:
    pods = get(ns, "pods", "-l", f"edgeai.dev/deployment={deployment_name}")["items"]
    return {p["metadata"]["name"]: p["metadata"]["annotations"] for p in pods}


def serve_and_compare(
    ns: Namespace, name: str, model: str, original: Path, tmp_path: Path
) -> dict[str, Any]:
    """Sends inputs through the deployment's chain and compares the answers with
    onnxruntime on the original file; returns the entry's model metadata."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(original), providers=["CPUExecutionProvider"])
    with serving_chain(ns, name, tmp_path) as url:
        rng = np.random.default_rng(1)
        for _ in range(5):
            x = rng.standard_normal((1, WIDTH)).astype(np.float32)
            got = infer(url, model, x)
            (want,) = session.run(None, {"features": x})
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        with urllib.request.urlopen(f"{url}/v2/models/{model}", timeout=10) as resp:
            metadata: dict[str, Any] = json.loads(resp.read())
    return metadata


def test_a_user_model_from_https_http_oci_and_configmap_serves_exactly_the_original(
    ns: Namespace,
    operator: OperatorProcess,
    registry: LocalRegistry,
    http_server: str,
    https_server: str,
    server_cert: ServerCert,
    model_file: Path,
    tmp_path: Path,
) -> None:
    digest = sha256(model_file)
    oci_uri = f"oci://{registry.address}/users/scorer:v1"
    oci.push(model_file, oci_uri)
    ns.kubectl("create", "configmap", "scorer-onnx", f"--from-file=scorer.onnx={model_file}")
    # the team's CA, in the ConfigMap the operator mounts into preparation Jobs
    ns.kubectl(
        "create", "configmap", CA_BUNDLE_CONFIGMAP, f"--from-file=team-ca.crt={server_cert.ca}"
    )
    sources = {
        "from-https": {"uri": f"{https_server}/models/scorer.onnx", "sha256": digest},
        "from-http": {"uri": f"{http_server}/models/scorer.onnx", "sha256": digest},
        "from-oci": {"uri": oci_uri},
        "from-cm": {"uri": "configmap://scorer-onnx/scorer.onnx", "sha256": digest},
    }
    with slow_device(ns):
        for name, source in sources.items():
            started = time.monotonic()
            apply(ns, dnn_model(name, source))
            obj = prepared(ns, name)
            elapsed_s = time.monotonic() - started
            status = obj["status"]
            assert status["source"]["digest"] == f"sha256:{digest}"
            assert condition(obj, "Fetched")["status"] == "True"
            (artifact,) = status["artifacts"]
            # the prepared fp32 artefact is the user's file, byte for byte
            assert artifact["digest"] == f"sha256:{digest}"
            assert artifact["uri"].startswith(
                f"oci://{registry.address}/edgeai-models:{name}-fp32-"
            )
            print(f"{name}: DNNModel applied to prepared in {elapsed_s:.1f}s")
            apply(ns, deployment(f"{name}-serve", name))
            metadata = serve_and_compare(ns, f"{name}-serve", name, model_file, tmp_path / name)
            params = metadata["parameters"]
            assert params["digest"] == f"sha256:{digest}"
            assert params["variant"] == "fp32"
            assert params["uri"] == artifact["uri"]
            ns.kubectl("delete", "dnnd", f"{name}-serve", "--wait=true", "--timeout=60s")


def test_bad_sources_and_models_are_refused_by_name_and_spare_what_serves(
    ns: Namespace,
    operator: OperatorProcess,
    registry: LocalRegistry,
    http_server: str,
    https_server: str,
    model_file: Path,
    tmp_path: Path,
) -> None:
    digest = sha256(model_file)
    good = {"uri": f"{http_server}/models/scorer.onnx", "sha256": digest}
    two_inputs = user_model(tmp_path / "two.onnx", inputs=2)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\xff\xfe not a protobuf model" * 10)
    for key, path in (("two", two_inputs), ("garbage", garbage)):
        ns.kubectl("create", "configmap", f"bad-{key}", f"--from-file=model.onnx={path}")

    # a model that serves, then gets a bad digest: the old generation keeps serving
    apply(ns, dnn_model("serving", good), deployment("serving-app", "serving"))
    before = prepared(ns, "serving")
    wait_for(
        "serving-app Available",
        lambda: condition(get(ns, "dnnd", "serving-app"), "Available").get("status") == "True",
        180,
    )
    pods_before = pod_annotations(ns, "serving-app")
    apply(ns, dnn_model("serving", {**good, "sha256": "0" * 64}))
    obj = model_condition(ns, "serving", "Fetched", "False")
    fetched = condition(obj, "Fetched")
    assert "sha256 mismatch" in fetched["message"], fetched
    assert "scorer.onnx" in fetched["message"]
    assert obj["status"]["profiles"] == before["status"]["profiles"]
    assert obj["status"]["artifacts"] == before["status"]["artifacts"]
    app = get(ns, "dnnd", "serving-app")
    assert condition(app, "Available")["status"] == "True"
    assert pod_annotations(ns, "serving-app") == pods_before

    # unreachable: Fetched=False naming the URL, then tried again after the backoff
    apply(ns, dnn_model("unreachable", {"uri": "http://127.0.0.1:9/net.onnx", "sha256": digest}))
    obj = wait_for(
        "unreachable retried",
        lambda: (
            (o := get(ns, "dnnm", "unreachable"))
            and (o.get("status", {}).get("preparation") or {}).get("attempt", 0) >= 3
            and o
        ),
        180,
    )
    fetched = condition(obj, "Fetched")
    assert fetched["status"] == "False"
    assert "http://127.0.0.1:9/net.onnx" in fetched["message"]
    assert "refused" in fetched["message"]

    # https from a server whose CA this namespace does not trust (no CA ConfigMap here)
    untrusted = {"uri": f"{https_server}/models/scorer.onnx", "sha256": digest}
    apply(ns, dnn_model("untrusted", untrusted))
    obj = model_condition(ns, "untrusted", "Fetched", "False")
    message = condition(obj, "Fetched")["message"]
    assert f"{https_server}/models/scorer.onnx" in message, message
    assert "TLS certificate verify failed" in message, message
    assert "EDGEAI_CA_BUNDLE_CONFIGMAP" in message, message

    # an oci:// tag the registry does not have
    apply(ns, dnn_model("no-tag", {"uri": f"oci://{registry.address}/users/scorer:missing"}))
    obj = model_condition(ns, "no-tag", "Fetched", "False")
    assert "users/scorer:missing" in condition(obj, "Fetched")["message"]

    # not an ONNX file, and a model with two inputs where the spec names one: final
    apply(ns, dnn_model("garbage", {"uri": "configmap://bad-garbage/model.onnx"}))
    obj = model_condition(ns, "garbage", "Prepared", "False", "InvalidModel")
    assert "is not an ONNX model onnxruntime can load" in condition(obj, "Prepared")["message"]
    apply(ns, dnn_model("two", {"uri": "configmap://bad-two/model.onnx"}))
    obj = model_condition(ns, "two", "Prepared", "False", "InvalidModel")
    message = condition(obj, "Prepared")["message"]
    assert "spec.input" in message, message
    assert "the model has 2" in message, message

    # a variant without its data: that variant is refused by name, the others ready
    apply(
        ns,
        dnn_model(
            "no-calibration",
            good,
            variants=[
                {"name": "q-static", "quantize": {"mode": "static"}},
                {"name": "q-dynamic", "quantize": {"mode": "dynamic"}},
            ],
        ),
    )
    obj = prepared(ns, "no-calibration")
    variants = {v["name"]: v for v in obj["status"]["variants"]}
    assert variants["q-static"]["ready"] is False
    assert "spec.calibration.uri" in variants["q-static"]["message"]
    assert variants["q-dynamic"]["ready"] is True
    assert obj["status"]["variantNames"] == "fp32,q-dynamic"


def test_held_out_digits_through_the_chain_score_the_accuracy_status_reports(
    ns: Namespace, operator: OperatorProcess, tmp_path: Path
) -> None:
    """fp32 alone, then int8 (static) and a distilled student under a minAccuracy the
    student misses: a slow device offloads to the edge after its first operator, and
    the int8 graph's first cut (its quantized input, 64 bytes) beats fp32's (4 KiB)."""
    from edgeai_worker import zoo

    _, _, x_test, y_test = zoo.digits_split()
    digits_input = {"name": "input", "shape": [1, 1, 8, 8], "dtype": "FP32"}
    cases = {
        "fp32": ({}, None),
        "int8": (
            {
                "variants": [
                    {"name": "int8", "quantize": {"mode": "static"}},
                    {"name": "small", "distill": {}},
                ]
            },
            0.97,
        ),
    }
    with slow_device(ns):
        for want, (variants, floor) in cases.items():
            name = f"digits-{want}"
            model = dnn_model(name, {"zoo": "digits_cnn"}, **variants)
            model["spec"]["input"] = digits_input
            app = deployment(f"{name}-app", name)
            if floor is not None:
                app["spec"]["slo"]["minAccuracy"] = floor
            apply(ns, model, app)
            status = prepared(ns, name)["status"]
            accuracy = {v["name"]: v.get("accuracy") for v in status["variants"]}
            if floor is not None:
                assert accuracy["small"] < floor <= accuracy["int8"], accuracy
            with serving_chain(ns, f"{name}-app", tmp_path / name) as url:
                row = ns.kubectl("get", "dnnd", f"{name}-app")
                correct = 0
                for x, label in zip(x_test, y_test, strict=True):
                    scores = infer(url, name, x[None], input_name="input")
                    correct += int(scores.argmax() == label)
                with urllib.request.urlopen(f"{url}/v2/models/{name}", timeout=10) as resp:
                    served = json.loads(resp.read())["parameters"]
            served_accuracy = correct / len(y_test)
            print(
                f"{name}: served variant {served['variant']}, {len(y_test)} held-out digits "
                f"through the chain: accuracy {served_accuracy:.4f}, status "
                f"{accuracy[want]:.4f}"
            )
            assert served["variant"] == want
            assert want in row.splitlines()[1].split(), row
            artifact = next(a for a in status["artifacts"] if a["variant"] == want)
            assert served["digest"] == artifact["digest"]
            assert abs(served_accuracy - accuracy[want]) <= 0.005


def test_exported_graphs_profile_at_the_declared_inputs_or_say_why_not(
    ns: Namespace, operator: OperatorProcess, registry: LocalRegistry, tmp_path: Path
) -> None:
    """A model with two inputs declared as spec.input and spec.additionalInputs is
    profiled at both; a model whose output is a sequence (onnxruntime runs it) gets
    Profiled=False, UnsupportedGraph, naming the output."""
    two = user_model(tmp_path / "two.onnx", inputs=2)
    sequence = sequence_output(tmp_path).path  # input x [N, 4]
    for key, path in (("two", two), ("sequence", sequence)):
        ns.kubectl("create", "configmap", f"exported-{key}", f"--from-file=model.onnx={path}")

    extra = {"name": "extra", "shape": [1, WIDTH], "dtype": "FP32"}
    apply(
        ns,
        dnn_model("two", {"uri": "configmap://exported-two/model.onnx"}, additionalInputs=[extra]),
    )
    profile = prepared(ns, "two")["status"]["profiles"][0]
    assert [i["name"] for i in profile["inputs"]] == ["features", "extra"]
    assert profile["cuts"][0]["tensors"] == ["features", "extra"]
    assert profile["cuts"][0]["sizeBytes"] == 2 * 4 * WIDTH

    x = {"name": "x", "shape": [1, 4], "dtype": "FP32"}
    apply(ns, dnn_model("sequence", {"uri": "configmap://exported-sequence/model.onnx"}, input=x))
    obj = wait_for(
        "DNNModel sequence prepared or refused",
        lambda: (
            (o := get(ns, "dnnm", "sequence"))
            and condition(o, "Prepared").get("reason") not in (None, "Preparing")
            and o
        ),
        180,
    )
    conditions = obj["status"]["conditions"]
    profiled = condition(obj, "Profiled")
    assert (profiled.get("status"), profiled.get("reason")) == ("False", "UnsupportedGraph"), (
        conditions
    )
    assert "model output 'pieces' is a sequence_type, not a tensor" in profiled["message"]
    assert condition(obj, "Prepared")["reason"] == "UnsupportedGraph"
