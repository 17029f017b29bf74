"""Model artefacts pushed to and pulled from a real OCI registry (CNCF distribution on
loopback, the `registry` fixture): digests as hashlib computes them, the registry's
own error codes in the errors, and references checked before anything is sent."""

from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.request
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from _worker_support import run_onnx
from edgeai_operator.errors import SpecError
from edgeai_operator.localcluster import free_port
from edgeai_operator.localregistry import LocalRegistry
from edgeai_operator.oci import (
    ONNX_MEDIA_TYPE,
    FetchError,
    OciRef,
    PushError,
    parse_reference,
    pull,
    push,
)

pytestmark = pytest.mark.registry


def tiny_model(path: Path, seed: int) -> Path:
    """y = x @ W + b, W and b drawn from `seed` so each test pushes its own bytes."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["y"]),
        ],
        "matmul_add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def sha256_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def repo_name(request: pytest.FixtureRequest) -> str:
    """A repository of the test's own, so tests share the registry but no artefacts."""
    slug = "".join(c if c.isalnum() else "-" for c in request.node.name.lower()).strip("-")
    return f"models/{slug[:40].strip('-')}-{os.urandom(3).hex()}"


def test_push_then_pull_by_tag_and_by_digest(
    registry: LocalRegistry, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    model = tiny_model(tmp_path / "matmul_add.onnx", seed=1)
    model_bytes = model.read_bytes()
    repo = repo_name(request)
    tag_uri = f"oci://{registry.address}/{repo}:v1"

    layer_digest = push(model, tag_uri)
    assert layer_digest == sha256_of(model_bytes)

    # The manifest as the registry serves it, read without the client under test.
    req = urllib.request.Request(
        f"http://{registry.address}/v2/{repo}/manifests/v1",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
    )
    with urllib.request.urlopen(req) as resp:
        manifest_bytes = resp.read()
        served_digest = resp.headers["Docker-Content-Digest"]
    manifest_digest = sha256_of(manifest_bytes)
    assert served_digest == manifest_digest
    manifest = json.loads(manifest_bytes)
    assert [(la["mediaType"], la["digest"], la["size"]) for la in manifest["layers"]] == [
        (ONNX_MEDIA_TYPE, layer_digest, len(model_bytes))
    ]
    assert manifest["layers"][0]["annotations"] == {
        "org.opencontainers.image.title": "matmul_add.onnx"
    }

    by_tag = pull(tag_uri, tmp_path / "by-tag")
    assert by_tag.path == tmp_path / "by-tag" / "matmul_add.onnx"
    assert by_tag.path.read_bytes() == model_bytes
    assert (by_tag.layer_digest, by_tag.manifest_digest, by_tag.size_bytes) == (
        layer_digest,
        manifest_digest,
        len(model_bytes),
    )

    digest_uri = f"oci://{registry.address}/{repo}@{manifest_digest}"
    by_digest = pull(digest_uri, tmp_path / "by-digest")
    assert by_digest.path.read_bytes() == model_bytes
    assert (by_digest.layer_digest, by_digest.manifest_digest, by_digest.size_bytes) == (
        layer_digest,
        manifest_digest,
        len(model_bytes),
    )
    # Nothing but the model is left beside it (no partial download).
    assert sorted(p.name for p in (tmp_path / "by-digest").iterdir()) == ["matmul_add.onnx"]

    # The pulled file is a model the runtime loads and computes with as the original.
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    (expected,) = run_onnx(model, {"x": x})
    (got,) = run_onnx(by_digest.path, {"x": x})
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(
    "reference", [":v2", "@" + sha256_of(b"no such manifest")], ids=["tag", "digest"]
)
def test_pull_missing_tag_or_digest_names_the_registry_answer(
    registry: LocalRegistry, tmp_path: Path, request: pytest.FixtureRequest, reference: str
) -> None:
    repo = repo_name(request)
    push(tiny_model(tmp_path / "m.onnx", seed=2), f"oci://{registry.address}/{repo}:v1")
    uri = f"oci://{registry.address}/{repo}{reference}"
    with pytest.raises(FetchError) as err:
        pull(uri, tmp_path / "out")
    assert err.value.uri == uri
    assert str(err.value).startswith(f"{uri}: ")
    # The registry's answer, and what the repository does hold.
    assert err.value.problem == (
        "manifest request answered HTTP 404 MANIFEST_UNKNOWN: manifest unknown; "
        f"repository {repo} has tags: v1"
    )
    assert not (tmp_path / "out").exists()


def test_pull_unknown_repository_names_the_registry_answer(
    registry: LocalRegistry, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    repo = repo_name(request)
    uri = f"oci://{registry.address}/{repo}:v1"
    with pytest.raises(FetchError) as err:
        pull(uri, tmp_path)
    assert err.value.uri == uri
    # The registry's own words: the manifest is unknown, and so is the repository.
    assert err.value.problem == (
        "manifest request answered HTTP 404 MANIFEST_UNKNOWN: manifest unknown; "
        f"repository {repo}: tags list answered HTTP 404 NAME_UNKNOWN: "
        "repository name not known to registry"
    )
    assert list(tmp_path.iterdir()) == []


def test_corrupted_layer_is_refused_and_leaves_no_file(
    registry: LocalRegistry, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    model = tiny_model(tmp_path / "m.onnx", seed=4)
    uri = f"oci://{registry.address}/{repo_name(request)}:v1"
    layer_digest = push(model, uri)
    # Same length, one byte flipped, in the registry's own storage: the registry
    # serves it as the blob, and only the client's check can notice.
    blob = registry.blob_path(layer_digest)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))

    dest = tmp_path / "out"
    with pytest.raises(FetchError) as err:
        pull(uri, dest)
    assert err.value.problem == (
        f"layer digest mismatch: the manifest names {layer_digest}, "
        f"the bytes received hash to {sha256_of(bytes(data))}"
    )
    assert list(dest.iterdir()) == []


def test_registry_down_fails_fast_naming_the_address(tmp_path: Path) -> None:
    port = free_port()  # bound and released: nothing listens there
    uri = f"oci://127.0.0.1:{port}/models/net:v1"
    t0 = time.monotonic()
    with pytest.raises(FetchError) as err:
        pull(uri, tmp_path)
    assert time.monotonic() - t0 < 5
    assert err.value.uri == uri
    assert f"registry 127.0.0.1:{port} unreachable at http://127.0.0.1:{port}/v2/" in str(err.value)
    assert "Connection refused" in err.value.problem

    with pytest.raises(PushError) as push_err:
        push(tiny_model(tmp_path / "m.onnx", seed=5), uri)
    assert "Connection refused" in push_err.value.problem


def test_plain_http_only_for_loopback_unless_insecure(tmp_path: Path) -> None:
    """A registry that is not on loopback is asked over HTTPS: the probe URL says so.
    0.0.0.0 is not loopback, and connecting to it reaches this machine, where
    nothing listens on the port, so no network is involved."""
    port = free_port()
    uri = f"oci://0.0.0.0:{port}/models/net:v1"
    with pytest.raises(FetchError) as err:
        pull(uri, tmp_path)
    assert f"https://0.0.0.0:{port}/v2/" in err.value.problem
    with pytest.raises(FetchError) as err:
        pull(uri, tmp_path, insecure=True)
    assert f"http://0.0.0.0:{port}/v2/" in err.value.problem


def test_push_needs_a_tag(registry: LocalRegistry, tmp_path: Path) -> None:
    uri = f"oci://{registry.address}/models/net@{sha256_of(b'x')}"
    with pytest.raises(SpecError, match="names a digest; a push needs a tag"):
        push(tiny_model(tmp_path / "m.onnx", seed=6), uri)


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        (
            "oci://registry.local:5000/team/models/net:v1.2",
            OciRef("registry.local:5000", "team/models/net", tag="v1.2"),
        ),
        (
            "oci://127.0.0.1:5000/net@sha256:" + "a" * 64,
            OciRef("127.0.0.1:5000", "net", digest="sha256:" + "a" * 64),
        ),
        ("oci://localhost/models.v1/net:latest", OciRef("localhost", "models.v1/net", "latest")),
        ("oci://[::1]:5000/net:v1", OciRef("[::1]:5000", "net", tag="v1")),
    ],
)
def test_parse_reference_accepts(uri: str, expected: OciRef) -> None:
    ref = parse_reference(uri)
    assert ref == expected
    assert ref.uri == uri


@pytest.mark.parametrize(
    ("uri", "problem"),
    [
        ("https://registry.local/net:v1", "it must start with oci://"),
        ("registry.local/net:v1", "it must start with oci://"),
        ("oci://registry.local", "it names no registry and repository"),
        ("oci:///net:v1", "it names no registry and repository"),
        ("oci://registry.local/net", "it has neither a tag nor a digest"),
        ("oci://registry.local/net:v1@sha256:" + "a" * 64, "it has both a tag and a digest"),
        ("oci://registry.local/net@sha256:abc", "digest 'sha256:abc' is not sha256:"),
        ("oci://registry.local/net@md5:" + "a" * 32, "is not sha256: followed by 64"),
        ("oci://registry.local/Net:v1", "repository component 'Net' is not lower-case"),
        ("oci://registry.local/a//b:v1", "repository component '' is not lower-case"),
        ("oci://registry.local/net:-v1", "tag '-v1' is not 1-128 of"),
        ("oci://registry.local/:v1", "the repository is empty"),
        ("oci://reg istry/net:v1", "'reg istry' is not a registry host[:port]"),
        ("oci://registry.local:99999/net:v1", "port 99999 is out of range 1-65535"),
        ("oci://[zz::1]:5000/net:v1", "'[zz::1]:5000' is not a registry host[:port]"),
    ],
)
def test_parse_reference_refuses(uri: str, problem: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_reference(uri, field="spec.source.uri")
    message = str(err.value)
    assert message.startswith(f"spec.source.uri: {uri!r} is not an OCI reference: ")
    assert problem in message
    assert message.endswith(
        "(accepted: oci://REGISTRY[:PORT]/REPOSITORY:TAG or "
        "oci://REGISTRY[:PORT]/REPOSITORY@sha256:<64 hex>)"
    )
