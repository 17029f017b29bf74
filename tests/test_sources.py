"""Model sources against real servers: an HTTP server on loopback, a directory standing
as a mounted claim, ConfigMaps on the real control plane, and `edgeai fetch` as the
process a stage pod's init container runs."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from _cluster_support import Namespace, apply, wait_for
from _model_server import ModelServer, Reply, ServerCert, make_ca
from edgeai_operator import oci
from edgeai_operator.errors import SpecError
from edgeai_operator.localcluster import free_port
from edgeai_operator.localregistry import LocalRegistry
from edgeai_operator.sources import (
    FetchError,
    RetryPolicy,
    Source,
    fetch,
    parse_source,
)

FIELD = "spec.source.uri"
SHA_FIELD = "spec.source.sha256"
# short waits, recorded instead of slept
FAST_RETRY = RetryPolicy(attempts=3, base_delay_s=0.25, max_delay_s=0.4)


def _user_model() -> bytes:
    """A user's model, not from the zoo: y = x @ W + b with fixed weights."""
    rng = np.random.default_rng(7)
    weight = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "W")
    bias = numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["y"]),
        ],
        "user_model",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        initializer=[weight, bias],
    )
    # IR version 10: what the installed onnxruntime reads (onnx.helper writes newer)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.checker.check_model(model)
    return model.SerializeToString()


MODEL = _user_model()
MODEL_SHA256 = hashlib.sha256(MODEL).hexdigest()
WRONG_SHA256 = hashlib.sha256(b"another model").hexdigest()


@pytest.fixture
def server() -> Iterator[ModelServer]:
    srv = ModelServer()
    yield srv
    srv.stop()


def _http(url: str, sha256: str | None = MODEL_SHA256) -> Source:
    return parse_source(url, sha256=sha256, field=FIELD)


def _fetch_fast(source: Source, dest: Path, sleeps: list[float]) -> Any:
    return fetch(source, dest, retry=FAST_RETRY, sleep=sleeps.append, timeout_s=10)


def test_http_fetch_writes_the_exact_bytes(server: ModelServer, tmp_path: Path) -> None:
    server.replies["/models/user.onnx"] = [Reply(200, MODEL)]
    fetched = fetch(_http(f"{server.base_url}/models/user.onnx"), tmp_path / "out")
    assert fetched.path == tmp_path / "out" / "user.onnx"
    assert fetched.path.read_bytes() == MODEL
    assert (fetched.sha256, fetched.size_bytes) == (MODEL_SHA256, len(MODEL))
    assert fetched.uri == f"{server.base_url}/models/user.onnx"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["user.onnx"]
    # the file is the model the user built: onnxruntime loads and runs it
    session = ort.InferenceSession(str(fetched.path), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": np.ones((2, 4), np.float32)})
    assert y.shape == (2, 3)


def test_http_sha256_mismatch_leaves_no_file(server: ModelServer, tmp_path: Path) -> None:
    server.replies["/user.onnx"] = [Reply(200, MODEL)]
    sleeps: list[float] = []
    with pytest.raises(FetchError) as err:
        _fetch_fast(_http(f"{server.base_url}/user.onnx", WRONG_SHA256), tmp_path, sleeps)
    message = str(err.value)
    assert f"{server.base_url}/user.onnx" in message
    assert f"expected {WRONG_SHA256}, got {MODEL_SHA256}" in message
    assert list(tmp_path.iterdir()) == []
    # a wrong digest is not a transient failure: one request, no retry
    assert (server.hits["/user.onnx"], sleeps) == (1, [])


def test_a_mismatch_keeps_an_earlier_good_file(server: ModelServer, tmp_path: Path) -> None:
    """A refetch that fails never disturbs the file already there under the final name."""
    server.replies["/user.onnx"] = [Reply(200, MODEL), Reply(200, b"tampered")]
    fetch(_http(f"{server.base_url}/user.onnx"), tmp_path)
    with pytest.raises(FetchError, match="sha256 mismatch"):
        fetch(_http(f"{server.base_url}/user.onnx"), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["user.onnx"]
    assert (tmp_path / "user.onnx").read_bytes() == MODEL


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_http_without_sha256_is_refused_naming_the_field(scheme: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_source(f"{scheme}://models.example/user.onnx", sha256=None, field=FIELD)
    assert err.value.field == SHA_FIELD
    assert "a sha256 is required" in str(err.value)
    assert f"{scheme}://models.example/user.onnx" in str(err.value)


@pytest.mark.parametrize("bad", ["abc", "sha256:" + "0" * 63, "g" * 64, "md5:" + "0" * 64])
def test_a_malformed_sha256_is_refused_naming_its_field(bad: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_source("pvc://models/user.onnx", sha256=bad, field=FIELD)
    assert err.value.field == SHA_FIELD
    assert "64 hexadecimal digits" in str(err.value)


def test_sha256_may_carry_its_algorithm_prefix_and_capitals() -> None:
    source = parse_source(
        "pvc://models/user.onnx", sha256=f"sha256:{MODEL_SHA256.upper()}", field=FIELD
    )
    assert source.expect_sha256 == MODEL_SHA256


def test_http_404_names_the_status_and_is_not_retried(server: ModelServer, tmp_path: Path) -> None:
    sleeps: list[float] = []
    with pytest.raises(FetchError) as err:
        _fetch_fast(_http(f"{server.base_url}/missing.onnx"), tmp_path, sleeps)
    assert str(err.value) == f"cannot fetch {server.base_url}/missing.onnx: HTTP 404 Not Found"
    assert (server.hits["/missing.onnx"], sleeps) == (1, [])
    assert list(tmp_path.iterdir()) == []


def test_http_500_is_retried_the_configured_number_of_times(
    server: ModelServer, tmp_path: Path
) -> None:
    server.replies["/user.onnx"] = [Reply(500, b"boom")]
    sleeps: list[float] = []
    with pytest.raises(FetchError) as err:
        _fetch_fast(_http(f"{server.base_url}/user.onnx"), tmp_path, sleeps)
    assert str(err.value) == (
        f"cannot fetch {server.base_url}/user.onnx: HTTP 500 Internal Server Error "
        "(after 3 attempts)"
    )
    assert server.hits["/user.onnx"] == 3
    assert sleeps == [0.25, 0.4]  # 0.25, then 0.5 capped at 0.4
    assert list(tmp_path.iterdir()) == []


def test_transient_failures_then_success(server: ModelServer, tmp_path: Path) -> None:
    server.replies["/user.onnx"] = [
        Reply(503, b"busy"),
        Reply(429, b"slow down"),
        Reply(200, MODEL),
    ]
    sleeps: list[float] = []
    fetched = _fetch_fast(_http(f"{server.base_url}/user.onnx"), tmp_path, sleeps)
    assert fetched.path.read_bytes() == MODEL
    assert (server.hits["/user.onnx"], sleeps) == (3, [0.25, 0.4])


def test_a_body_cut_short_is_retried(server: ModelServer, tmp_path: Path) -> None:
    server.replies["/user.onnx"] = [
        Reply(200, MODEL[:100], promised_bytes=len(MODEL)),
        Reply(200, MODEL),
    ]
    sleeps: list[float] = []
    fetched = _fetch_fast(_http(f"{server.base_url}/user.onnx"), tmp_path, sleeps)
    assert fetched.path.read_bytes() == MODEL
    assert (server.hits["/user.onnx"], sleeps) == (2, [0.25])
    assert [p.name for p in tmp_path.iterdir()] == ["user.onnx"]


def test_connection_refused_is_retried_then_named(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/user.onnx"  # nothing listens there
    sleeps: list[float] = []
    with pytest.raises(FetchError) as err:
        _fetch_fast(_http(url), tmp_path, sleeps)
    assert str(err.value).startswith(f"cannot fetch {url}: ")
    assert "Connection refused" in str(err.value)
    assert "(after 3 attempts)" in str(err.value)
    assert sleeps == [0.25, 0.4]
    assert list(tmp_path.iterdir()) == []


def test_retry_policy_backs_off_exponentially_up_to_the_cap() -> None:
    assert RetryPolicy(attempts=6, base_delay_s=0.5, max_delay_s=3).delays_s() == [
        0.5,
        1.0,
        2.0,
        3.0,
        3.0,
    ]
    assert RetryPolicy(attempts=1).delays_s() == []
    with pytest.raises(SpecError, match="attempts"):
        RetryPolicy(attempts=0)
    with pytest.raises(SpecError, match="negative"):
        RetryPolicy(base_delay_s=-1)


def test_pvc_copies_the_file_from_the_mounted_claim(tmp_path: Path) -> None:
    root = tmp_path / "mnt"
    (root / "models" / "team-a").mkdir(parents=True)
    (root / "models" / "team-a" / "user.onnx").write_bytes(MODEL)
    source = parse_source("pvc://models/team-a/user.onnx", sha256=None, field=FIELD)
    assert (source.location, source.path) == ("models", "team-a/user.onnx")
    fetched = fetch(source, tmp_path / "out", pvc_root=root)
    assert fetched.path == tmp_path / "out" / "user.onnx"
    assert fetched.path.read_bytes() == MODEL
    assert (fetched.sha256, fetched.size_bytes) == (MODEL_SHA256, len(MODEL))


def test_pvc_missing_file_or_claim_is_a_clear_error(tmp_path: Path) -> None:
    root = tmp_path / "mnt"
    (root / "models").mkdir(parents=True)
    missing = parse_source("pvc://models/nope.onnx", sha256=None, field=FIELD)
    with pytest.raises(FetchError) as err:
        fetch(missing, tmp_path / "out", pvc_root=root)
    assert str(err.value) == (
        f"cannot fetch pvc://models/nope.onnx: {root}/models/nope.onnx: no such file"
    )
    unmounted = parse_source("pvc://other/user.onnx", sha256=None, field=FIELD)
    with pytest.raises(FetchError, match="the claim is not mounted there"):
        fetch(unmounted, tmp_path / "out", pvc_root=root)
    assert list((tmp_path / "out").iterdir()) == []


def test_pvc_expected_sha256_mismatch_leaves_no_file(tmp_path: Path) -> None:
    (tmp_path / "mnt" / "models").mkdir(parents=True)
    (tmp_path / "mnt" / "models" / "user.onnx").write_bytes(MODEL)
    source = parse_source("pvc://models/user.onnx", sha256=WRONG_SHA256, field=FIELD)
    with pytest.raises(FetchError, match=f"expected {WRONG_SHA256}, got {MODEL_SHA256}"):
        fetch(source, tmp_path / "out", pvc_root=tmp_path / "mnt")
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize(
    ("uri", "accepted"),
    [
        ("s3://bucket/model.onnx", "zoo://NAME"),
        ("model.onnx", "pvc://CLAIM/PATH"),
        ("/data/model.onnx", "configmap://NAME/KEY"),
        ("file:///data/model.onnx", "oci://REGISTRY/REPO:TAG"),
        ("zoo://", "digits_cnn"),
        ("zoo://imagenet_giant", "mobilenet_v2"),
        ("zoo://digits_cnn/extra", "digits_cnn"),
        ("https://", "https://HOST[:PORT]/PATH"),
        ("https://models.example", "https://HOST[:PORT]/PATH"),
        ("http:///user.onnx", "http://HOST[:PORT]/PATH"),
        ("https://models.example:99999/user.onnx", "1-65535"),
        ("pvc://", "pvc://CLAIM/PATH"),
        ("pvc://models", "pvc://CLAIM/PATH"),
        ("pvc://Models/user.onnx", "DNS subdomain"),
        ("pvc://models_a/user.onnx", "DNS subdomain"),
        ("pvc://models/", "relative path"),
        ("pvc://models//etc/passwd", "relative path"),
        ("pvc://models/../secrets/key", "relative path"),
        ("pvc://models/a/../../b.onnx", "relative path"),
        ("pvc://models/./user.onnx", "relative path"),
        ("configmap://", "configmap://NAME/KEY"),
        ("configmap://model", "configmap://NAME/KEY"),
        ("configmap://-model/net.onnx", "DNS subdomain"),
        ("configmap://model/", "KEY of letters"),
        ("configmap://model/dir/net.onnx", "KEY of letters"),
        ("configmap://model/..", "KEY of letters"),
        ("configmap://model/net onnx", "KEY of letters"),
        ("oci://", "oci://REGISTRY[:PORT]/REPOSITORY:TAG"),
        ("oci://127.0.0.1:5000/models/user", "REPOSITORY@sha256"),
        ("oci://127.0.0.1:5000/Models/user:v1", "REPOSITORY:TAG"),
        ("oci://127.0.0.1:5000/models/user@sha256:abc", "REPOSITORY@sha256"),
    ],
)
def test_malformed_uris_are_refused_naming_the_field(uri: str, accepted: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_source(uri, sha256=MODEL_SHA256, field=FIELD)
    assert err.value.field == FIELD
    message = str(err.value)
    assert message.startswith(f"{FIELD}: ")
    assert accepted in (err.value.accepted or "")
    if uri:
        assert repr(uri) in message


def test_well_formed_uris_parse() -> None:
    def parsed(uri: str) -> tuple[str, str, str]:
        source = parse_source(uri, sha256=MODEL_SHA256, field=FIELD)
        return source.scheme, source.location, source.path

    assert parsed("zoo://digits_cnn") == ("zoo", "digits_cnn", "")
    assert parsed("https://h.example:8443/a/b.onnx?v=2") == (
        "https",
        "https://h.example:8443/a/b.onnx?v=2",
        "",
    )
    assert parsed("pvc://models.team-a/v1/net.onnx") == ("pvc", "models.team-a", "v1/net.onnx")
    assert parsed("configmap://digits/model_v1.onnx") == ("configmap", "digits", "model_v1.onnx")


def _edgeai(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeai_operator.cli", "fetch", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_edgeai_fetch_prints_one_json_line(server: ModelServer, tmp_path: Path) -> None:
    server.replies["/user.onnx"] = [Reply(200, MODEL)]
    url = f"{server.base_url}/user.onnx"
    done = _edgeai(url, "--out", str(tmp_path / "model"), "--sha256", MODEL_SHA256)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "uri": url,
        "path": str(tmp_path / "model" / "user.onnx"),
        "sha256": MODEL_SHA256,
        "sizeBytes": len(MODEL),
    }
    assert done.stdout.count("\n") == 1
    assert (tmp_path / "model" / "user.onnx").read_bytes() == MODEL


def test_edgeai_fetch_fails_with_exit_code_and_message(server: ModelServer, tmp_path: Path) -> None:
    server.replies["/user.onnx"] = [Reply(200, MODEL)]
    url = f"{server.base_url}/user.onnx"
    out = tmp_path / "model"

    mismatch = _edgeai(url, "--out", str(out), "--sha256", WRONG_SHA256)
    assert (mismatch.returncode, mismatch.stdout) == (1, "")
    assert mismatch.stderr.strip() == (
        f"error: cannot fetch {url}: sha256 mismatch: expected {WRONG_SHA256}, "
        f"got {MODEL_SHA256} ({len(MODEL)} bytes); nothing was kept"
    )
    assert list(out.iterdir()) == []

    no_digest = _edgeai(url, "--out", str(out))
    assert no_digest.returncode == 2
    assert no_digest.stderr.startswith("error: --sha256: a sha256 is required for the http source")

    malformed = _edgeai("ftp://models.example/user.onnx", "--out", str(out))
    assert malformed.returncode == 2
    assert malformed.stderr.startswith(
        "error: URI: 'ftp://models.example/user.onnx' is not a model source URI (accepted: zoo://"
    )


@pytest.fixture(scope="module")
def server_cert(tmp_path_factory: pytest.TempPathFactory) -> ServerCert:
    return make_ca(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_server(server_cert: ServerCert) -> Iterator[ModelServer]:
    srv = ModelServer(tls=server_cert)
    yield srv
    srv.stop()


def test_https_trusts_the_ca_bundle_given_as_a_file_or_a_directory(
    tls_server: ModelServer, server_cert: ServerCert, tmp_path: Path
) -> None:
    url = tls_server.serve("/user.onnx", MODEL)
    assert url.startswith("https://127.0.0.1:")
    by_file = fetch(_http(url), tmp_path / "a", ca_bundle=server_cert.ca)
    assert by_file.path.read_bytes() == MODEL
    # a mounted ConfigMap: every *.crt / *.pem key is a CA, anything else is not read
    mounted = tmp_path / "ca"
    mounted.mkdir()
    (mounted / "team-ca.crt").write_bytes(server_cert.ca.read_bytes())
    (mounted / "README").write_text("not a certificate")
    by_dir = fetch(_http(url), tmp_path / "b", ca_bundle=mounted)
    assert (by_dir.sha256, by_dir.path.read_bytes()) == (MODEL_SHA256, MODEL)
    assert tls_server.hits["/user.onnx"] == 2


def test_https_with_an_untrusted_certificate_fails_at_once_and_says_how_to_trust_it(
    tls_server: ModelServer, server_cert: ServerCert, tmp_path: Path
) -> None:
    url = tls_server.serve("/user.onnx", MODEL)
    empty = tmp_path / "ca"  # an optional ConfigMap that does not exist mounts empty
    empty.mkdir()
    for bundle in (None, empty):
        sleeps: list[float] = []
        with pytest.raises(FetchError) as err:
            fetch(
                _http(url),
                tmp_path / "out",
                ca_bundle=bundle,
                retry=FAST_RETRY,
                sleep=sleeps.append,
                timeout_s=10,
            )
        message = str(err.value)
        assert message.startswith(f"cannot fetch {url}: TLS certificate verify failed: ")
        assert "--ca-bundle" in message
        assert "EDGEAI_CA_BUNDLE_CONFIGMAP" in message
        # no retry: the certificate is as untrusted a moment later
        assert sleeps == []
        assert list((tmp_path / "out").iterdir()) == []
    # the handshake failed (once per fetch), so the server never read a request
    wait_for("both handshakes to end", lambda: tls_server.broken_connections == 2, 10)
    assert tls_server.hits["/user.onnx"] == 0


def test_a_ca_bundle_that_is_missing_or_holds_no_certificate_is_refused(
    tmp_path: Path,
) -> None:
    source = _http("https://models.example/user.onnx")
    with pytest.raises(SpecError) as err:
        fetch(source, tmp_path / "out", ca_bundle=tmp_path / "nowhere.crt")
    assert err.value.field == "--ca-bundle"
    assert "does not exist" in str(err.value)
    junk = tmp_path / "junk.pem"
    junk.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    with pytest.raises(SpecError) as err:
        fetch(source, tmp_path / "out", ca_bundle=junk)
    assert err.value.field == "--ca-bundle"
    assert "holds no readable certificate" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_edgeai_fetch_ca_bundle_flag(
    tls_server: ModelServer, server_cert: ServerCert, tmp_path: Path
) -> None:
    url = tls_server.serve("/user.onnx", MODEL)
    refused = _edgeai(url, "--out", str(tmp_path / "a"), "--sha256", MODEL_SHA256)
    assert refused.returncode == 1
    assert "TLS certificate verify failed" in refused.stderr
    done = _edgeai(
        url,
        "--out",
        str(tmp_path / "b"),
        "--sha256",
        MODEL_SHA256,
        "--ca-bundle",
        str(server_cert.ca),
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["sha256"] == MODEL_SHA256
    missing = _edgeai(
        url, "--out", str(tmp_path / "c"), "--sha256", MODEL_SHA256, "--ca-bundle", "/nowhere"
    )
    assert missing.returncode == 2
    assert missing.stderr.startswith("error: --ca-bundle: '/nowhere' does not exist")


def _configmap(name: str, binary: dict[str, bytes], data: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name},
        "data": data,
        "binaryData": {k: base64.b64encode(v).decode() for k, v in binary.items()},
    }


@pytest.mark.cluster
def test_configmap_binary_data_through_the_api(ns: Namespace, tmp_path: Path) -> None:
    apply(ns, _configmap("user-model", {"net.onnx": MODEL}, {"readme.txt": "a text key"}))
    env = {"KUBECONFIG": str(ns.cluster.kubeconfig)}
    out = tmp_path / "model"

    done = _edgeai(
        "configmap://user-model/net.onnx",
        "--out",
        str(out),
        "--namespace",
        ns.name,
        "--sha256",
        MODEL_SHA256,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "uri": "configmap://user-model/net.onnx",
        "path": str(out / "net.onnx"),
        "sha256": MODEL_SHA256,
        "sizeBytes": len(MODEL),
    }
    assert (out / "net.onnx").read_bytes() == MODEL

    def failure(uri: str) -> str:
        failed = _edgeai(uri, "--out", str(tmp_path / "other"), "--namespace", ns.name, env=env)
        assert (failed.returncode, failed.stdout) == (1, "")
        return failed.stderr.strip()

    assert failure("configmap://user-model/other.onnx") == (
        "error: cannot fetch configmap://user-model/other.onnx: ConfigMap user-model has no "
        f"binaryData key 'other.onnx' (binaryData keys: net.onnx) (namespace {ns.name})"
    )
    assert "it is in data, which holds text" in failure("configmap://user-model/readme.txt")
    assert failure("configmap://no-such-map/net.onnx") == (
        "error: cannot fetch configmap://no-such-map/net.onnx: ConfigMap no-such-map not found "
        f"(namespace {ns.name})"
    )
    assert not (tmp_path / "other").exists() or list((tmp_path / "other").iterdir()) == []


@pytest.mark.slow
def test_zoo_exports_the_trained_digits_cnn(tmp_path: Path) -> None:
    from edgeai_worker import zoo

    fetched = fetch(parse_source("zoo://digits_cnn", sha256=None, field=FIELD), tmp_path)
    assert fetched.path == tmp_path / "digits_cnn.onnx"
    expected = zoo.export_onnx("digits_cnn", trained=True).read_bytes()
    assert fetched.path.read_bytes() == expected
    assert fetched.sha256 == hashlib.sha256(expected).hexdigest()


@pytest.mark.registry
def test_oci_round_trip_through_sources(registry: LocalRegistry, tmp_path: Path) -> None:
    (tmp_path / "user.onnx").write_bytes(MODEL)
    tag_uri = f"oci://{registry.address}/models/user-source:v1"
    layer_digest = oci.push(tmp_path / "user.onnx", tag_uri)
    assert layer_digest == f"sha256:{MODEL_SHA256}"

    by_tag = fetch(parse_source(tag_uri, sha256=MODEL_SHA256, field=FIELD), tmp_path / "tag")
    assert by_tag.path.read_bytes() == MODEL
    assert (by_tag.sha256, by_tag.size_bytes, by_tag.uri) == (MODEL_SHA256, len(MODEL), tag_uri)

    # the digest pinned by the user is checked against the artefact, and nothing is kept
    pinned_wrong = parse_source(tag_uri, sha256=WRONG_SHA256, field=FIELD)
    with pytest.raises(FetchError, match=f"expected {WRONG_SHA256}, the artefact's layer"):
        fetch(pinned_wrong, tmp_path / "wrong")
    assert list((tmp_path / "wrong").iterdir()) == []

    missing_uri = f"oci://{registry.address}/models/user-source:no-such-tag"
    missing = _edgeai(missing_uri, "--out", str(tmp_path / "missing"))
    assert (missing.returncode, missing.stdout) == (1, "")
    assert missing.stderr.startswith(f"error: cannot fetch {missing_uri}: ")
    assert "HTTP 404" in missing.stderr
    assert "MANIFEST_UNKNOWN" in missing.stderr


def test_edgeai_fetch_reads_a_claim_under_pvc_root_and_bounds_each_wait(tmp_path: Path) -> None:
    claim = tmp_path / "mounts" / "models"
    (claim / "v1").mkdir(parents=True)
    (claim / "v1" / "net.onnx").write_bytes(MODEL)
    out = tmp_path / "model"
    done = _edgeai(
        "pvc://models/v1/net.onnx", "--out", str(out), "--pvc-root", str(tmp_path / "mounts")
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["sha256"] == MODEL_SHA256
    # A server that accepts and never answers: each wait ends at --timeout-seconds.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/user.onnx"
        stalled = _edgeai(
            url, "--out", str(out), "--sha256", MODEL_SHA256, "--timeout-seconds", "0.2"
        )
    assert stalled.returncode == 1
    assert "timed out" in stalled.stderr
