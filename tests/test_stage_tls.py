"""Mutual TLS between stages and the entry's bearer token, with real worker processes on
loopback and certificates issued by the operator's own code (stagetls.py): a chain over
mTLS, on HTTP and on gRPC, answers as the chain over plain HTTP does; peers without a
certificate, with one from another deployment's CA, an expired one or another stage's
identity are refused (on the HTTP TLS port and on the gRPC port) while the real upstream
keeps being served; renewed certificates are picked up under continuous traffic without
losing a request, over either transport; the entry refuses a missing or wrong token (a
stock tritonclient with custom headers) before the model and counts it; an entry taking
client certificates of a CA serves a stock tritonclient over TLS with one, answers 401
without one and ends the handshake for another CA's or an expired one."""

from __future__ import annotations

import asyncio
import datetime
import http.client
import itertools
import json
import socket
import ssl
import subprocess
import sys
import textwrap
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import numpy as np
import pytest
from cryptography import x509

from _worker_support import (
    ChainModel,
    build_conv_chain,
    extract,
    free_port,
    run_onnx,
    wait_until,
    workers,
)
from edgeai_operator.builders import STAGE_TLS_NAME, Owner, stage_identity
from edgeai_operator.stagetls import issue_ca, issue_stage
from edgeai_worker import grpc_predict_v2_pb2 as pb
from edgeai_worker.config import ConfigError, WorkerConfig, load_config
from edgeai_worker.protocol import HEADER_LENGTH
from edgeai_worker.security import StageTLS

pytestmark = pytest.mark.slow

OWNER = Owner(name="cam", namespace="vision", uid="u-1")
OTHER = Owner(name="door", namespace="vision", uid="u-2")
DEVICE = stage_identity(OWNER, "device")
EDGE = stage_identity(OWNER, "edge")
CLOUD = stage_identity(OWNER, "cloud")


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass(frozen=True)
class CA:
    cert: bytes
    key: bytes

    def write(
        self,
        directory: Path,
        identity: str,
        lifetime: datetime.timedelta = datetime.timedelta(hours=1),
        now: datetime.datetime | None = None,
    ) -> Path:
        """A stage certificate for `identity` written as the operator's Secret holds it
        (each file replaced whole, as the kubelet swaps a Secret volume)."""
        cert, key = issue_stage(self.cert, self.key, identity, now or _now(), lifetime)
        directory.mkdir(parents=True, exist_ok=True)
        for name, data in (("tls.key", key), ("tls.crt", cert), ("ca.crt", self.cert)):
            tmp = directory / f".{name}.new"
            tmp.write_bytes(data)
            tmp.replace(directory / name)
        return directory


@dataclass(frozen=True)
class Peers:
    """Certificate directories: the chain's device and edge, the other deployment's
    device, a stage of ours that is not upstream of the edge (the cloud), and our
    device's certificate that has expired."""

    device: Path
    edge: Path
    foreign: Path
    sideways: Path
    expired: Path

    def refused(self, trust: bytes) -> list[tuple[str, Path | None, bytes | None]]:
        """(what, client certificate directory, CA trusted) of the handshakes the
        stage refuses."""
        return [
            ("no certificate", None, trust),
            ("another deployment's CA", self.foreign, trust),
            ("an expired certificate", self.expired, trust),
        ]

    @classmethod
    def write(cls, ca: CA, tmp: Path) -> Peers:
        other = CA(*issue_ca(OTHER, _now()))
        return cls(
            ca.write(tmp / "device", DEVICE),
            ca.write(tmp / "edge", EDGE),
            other.write(tmp / "foreign", stage_identity(OTHER, "device")),
            ca.write(tmp / "cloud", CLOUD),
            ca.write(
                tmp / "expired",
                DEVICE,
                lifetime=datetime.timedelta(minutes=1),
                now=_now() - datetime.timedelta(hours=1),
            ),
        )


async def _refused_and_upstream_served(
    refused: Callable[[Path | None, bytes | None], None],
    cases: list[tuple[str, Path | None, bytes | None]],
    upstream: Callable[[], Awaitable[np.ndarray]],
    want: np.ndarray,
) -> None:
    """Each case is refused (`refused` asserts how), and after each the real upstream
    is still served."""
    for name, client_dir, trust in cases:
        refused(client_dir, trust)
        np.testing.assert_allclose(await upstream(), want, rtol=1e-4, err_msg=name)


@pytest.fixture(scope="module")
def ca() -> CA:
    return CA(*issue_ca(OWNER, _now()))


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> ChainModel:
    return build_conv_chain(tmp_path_factory.mktemp("tls") / "chain.onnx")


def _parts(model: ChainModel, tmp: Path) -> list[Path]:
    bounds = ["input", "relu1", "output"]
    return [
        extract(model.path, [a], [b], tmp / f"part{i}.onnx")
        for i, (a, b) in enumerate(itertools.pairwise(bounds))
    ]


def _chain(
    parts: list[Path], tls: tuple[Path, Path] | None, reload_s: float = 5.0
) -> tuple[dict[str, object], dict[str, object], int]:
    """Settings of a device -> edge chain; with `tls` (device dir, edge dir) the edge
    takes inference over mTLS from the device only. Returns (device, edge, edge TLS port)."""
    edge_port, tls_port = free_port(), free_port()
    edge: dict[str, object] = {
        "model_name": "chain",
        "port": edge_port,
        "partitions": [str(parts[1])],
        "tier": "edge",
        "stage_index": 1,
    }
    device: dict[str, object] = {
        "model_name": "chain",
        "partitions": [str(parts[0])],
        "tier": "device",
        "stage_index": 0,
        "uplink_mbps": 100.0,
        "next_urls": [f"http://127.0.0.1:{edge_port}"],
    }
    if tls is not None:
        edge |= {
            "tls_dir": str(tls[1]),
            "tls_port": tls_port,
            "tls_peers": [DEVICE],
            "security_reload_s": reload_s,
        }
        device |= {
            "tls_dir": str(tls[0]),
            "next_urls": [f"https://127.0.0.1:{tls_port}"],
            "security_reload_s": reload_s,
        }
    return device, edge, tls_port


def _grpc_chain(
    parts: list[Path], tls: tuple[Path, Path], reload_s: float = 5.0
) -> tuple[dict[str, object], dict[str, object], int]:
    """Settings of a device -> edge chain forwarding over gRPC with mutual TLS (the
    device's uplink is fixed, so it may forward over gRPC). Returns (device, edge, edge
    gRPC port)."""
    device, edge, _ = _chain(parts, tls, reload_s)
    grpc_port = free_port()
    edge["grpc_port"] = grpc_port
    device["next_urls"] = [f"grpcs://127.0.0.1:{grpc_port}"]
    return device, edge, grpc_port


def _body(x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    raw = x.astype("<f4").tobytes()
    header = {
        "inputs": [
            {
                "name": "input",
                "shape": list(x.shape),
                "datatype": "FP32",
                "parameters": {"binary_data_size": len(raw)},
            }
        ],
        "parameters": {"binary_data_output": True},
    }
    encoded = json.dumps(header).encode()
    return encoded + raw, {HEADER_LENGTH: str(len(encoded))}


def _decode(data: bytes, length: str) -> np.ndarray:
    header = json.loads(data[: int(length)])
    return np.frombuffer(data[int(length) :], "<f4").reshape(header["outputs"][0]["shape"])


async def _infer(session: aiohttp.ClientSession, url: str, x: np.ndarray) -> np.ndarray:
    body, headers = _body(x)
    async with session.post(f"{url}/v2/models/chain/infer", data=body, headers=headers) as resp:
        data = await resp.read()
        assert resp.status == 200, data[:300]
        return _decode(data, resp.headers[HEADER_LENGTH])


def _metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def _total(metrics: dict[str, float], name: str) -> float:
    """The sum of a metric's series, whatever their labels."""
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{"))


def _client_context(directory: Path | None, ca_cert: bytes) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=ca_cert.decode())
    if directory is not None:
        ctx.load_cert_chain(directory / "tls.crt", directory / "tls.key")
    return ctx


def _direct(port: int, ctx: ssl.SSLContext, x: np.ndarray) -> tuple[int, bytes]:
    """One inference request straight to the edge's TLS port with `ctx`'s certificate."""
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    try:
        body, headers = _body(x)
        conn.request("POST", "/v2/models/chain/infer", body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _plain_to(port: int, body: bytes, headers: dict[str, str]) -> bytes:
    """One plain-HTTP inference request to `port`."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/v2/models/chain/infer", body=body, headers=headers)
        return conn.getresponse().read()
    finally:
        conn.close()


def _grpc_direct(
    port: int, client: Path | None, ca_cert: bytes | None, x: np.ndarray, name: str = "relu1"
) -> pb.ModelInferResponse:
    """One ModelInfer call straight to the edge's gRPC port: over TLS with `client`'s
    certificate (none: no client certificate) trusting `ca_cert`, or in plain text when
    `ca_cert` is None."""
    target = f"127.0.0.1:{port}"
    if ca_cert is None:
        channel = grpc.insecure_channel(target)
    else:
        key = (client / "tls.key").read_bytes() if client is not None else None
        cert = (client / "tls.crt").read_bytes() if client is not None else None
        credentials = grpc.ssl_channel_credentials(ca_cert, key, cert)
        options = [("grpc.ssl_target_name_override", STAGE_TLS_NAME)]
        channel = grpc.secure_channel(target, credentials, options=options)
    request = pb.ModelInferRequest(model_name="chain")
    request.inputs.add(name=name, datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.astype(np.float32).tobytes())
    with channel:
        stub = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        reply: pb.ModelInferResponse = stub(request, timeout=10)
        return reply


def _server_serial(port: int, ca_cert: bytes, client: Path, alpn: bool = False) -> int:
    """The serial number of the certificate the TLS port (with `alpn`: the gRPC port)
    presents to a new connection."""
    ctx = _client_context(client, ca_cert)
    if alpn:
        ctx.set_alpn_protocols(["h2"])
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10)) as sock:
        der = sock.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def _serial(directory: Path) -> int:
    return x509.load_pem_x509_certificate((directory / "tls.crt").read_bytes()).serial_number


async def test_a_chain_over_mtls_answers_as_the_chain_over_http(
    model: ChainModel, ca: CA, tmp_path: Path
) -> None:
    parts = _parts(model, tmp_path)
    device_dir, edge_dir = ca.write(tmp_path / "device", DEVICE), ca.write(tmp_path / "edge", EDGE)
    plain_device, plain_edge, _ = _chain(parts, None)
    tls_device, tls_edge, _ = _chain(parts, (device_dir, edge_dir))
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal(model.input_shape).astype(np.float32) for _ in range(4)]
    with (
        workers(tmp_path, plain_device, plain_edge) as (plain, _),
        workers(tmp_path, tls_device, tls_edge) as (secure, secure_edge),
    ):
        async with aiohttp.ClientSession() as session:
            for x in xs:
                over_http = await _infer(session, plain.url, x)
                over_tls = await _infer(session, secure.url, x)
                np.testing.assert_array_equal(over_tls, over_http)
                np.testing.assert_allclose(
                    over_tls, run_onnx(model.path, {"input": x})[0], rtol=1e-4, atol=1e-5
                )
        # the edge ran them all, and none over its plain port
        edge = _metrics(secure_edge.url)
        assert edge['edgeai_requests_total{code="200",stage="1"}'] == len(xs)


async def test_a_chain_over_grpc_with_mtls_answers_as_onnxruntime(
    model: ChainModel, ca: CA, tmp_path: Path
) -> None:
    parts = _parts(model, tmp_path)
    device_dir, edge_dir = ca.write(tmp_path / "device", DEVICE), ca.write(tmp_path / "edge", EDGE)
    device, edge, grpc_port = _grpc_chain(parts, (device_dir, edge_dir))
    rng = np.random.default_rng(5)
    xs = [rng.standard_normal(model.input_shape).astype(np.float32) for _ in range(4)]
    with workers(tmp_path, device, edge) as (entry, edge_worker):
        async with aiohttp.ClientSession() as session:
            for x in xs:
                np.testing.assert_allclose(
                    await _infer(session, entry.url, x),
                    run_onnx(model.path, {"input": x})[0],
                    rtol=1e-4,
                    atol=1e-5,
                )
        edge_log = edge_worker.log.read_text()
        edge_metrics = _metrics(edge_worker.url)
        entry_metrics = _metrics(entry.url)
    assert f"gRPC on 127.0.0.1:{grpc_port} (mutual TLS)" in edge_log
    # the edge ran them all (its plain port takes no inference), forwarded over gRPC
    assert edge_metrics['edgeai_requests_total{code="200",stage="1"}'] == len(xs)
    assert _total(edge_metrics, "edgeai_auth_failures_total") == 0
    assert _total(entry_metrics, "edgeai_forward_bytes_total") > 0


async def test_wrong_peers_on_the_grpc_port_are_refused_and_the_upstream_keeps_being_served(
    model: ChainModel, ca: CA, tmp_path: Path
) -> None:
    parts = _parts(model, tmp_path)
    certs = Peers.write(ca, tmp_path)
    device_dir, sideways = certs.device, certs.sideways
    device, edge, grpc_port = _grpc_chain(parts, (certs.device, certs.edge))
    x = np.random.default_rng(6).standard_normal(model.input_shape).astype(np.float32)
    want = run_onnx(model.path, {"input": x})[0]
    with workers(tmp_path, device, edge) as (entry, edge_worker):
        async with aiohttp.ClientSession() as session:
            np.testing.assert_allclose(await _infer(session, entry.url, x), want, rtol=1e-4)

            def refused(client_dir: Path | None, trust: bytes | None) -> None:
                with pytest.raises(grpc.RpcError) as failed:
                    _grpc_direct(grpc_port, client_dir, trust, x)
                # the handshake fails: no call reaches the service
                assert failed.value.code() == grpc.StatusCode.UNAVAILABLE

            await _refused_and_upstream_served(
                refused,
                [("plain text", None, None), *certs.refused(ca.cert)],
                lambda: _infer(session, entry.url, x),
                want,
            )
            # a verified certificate of this deployment, but not the upstream stage's
            with pytest.raises(grpc.RpcError) as denied:
                _grpc_direct(grpc_port, sideways, ca.cert, x)
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert CLOUD in denied.value.details()
            assert DEVICE in denied.value.details()
            # the device's own certificate is served directly too (the edge's input)
            features = run_onnx(parts[0], {"input": x})[0]
            reply = _grpc_direct(grpc_port, device_dir, ca.cert, features)
            direct = np.frombuffer(reply.raw_output_contents[0], np.float32)
            np.testing.assert_allclose(direct.reshape(want.shape), want, rtol=1e-4)
            np.testing.assert_allclose(await _infer(session, entry.url, x), want, rtol=1e-4)
        metrics = _metrics(edge_worker.url)
    assert metrics['edgeai_auth_failures_total{reason="peer",stage="1"}'] == 1
    assert metrics['edgeai_requests_total{code="403",stage="1"}'] == 1
    # the device's six requests and the direct one reached the model, nothing else
    assert metrics['edgeai_requests_total{code="200",stage="1"}'] == 7
    assert _total(metrics, "edgeai_batch_size_count") == 7


async def test_wrong_peers_are_refused_and_the_real_upstream_keeps_being_served(
    model: ChainModel, ca: CA, tmp_path: Path
) -> None:
    parts = _parts(model, tmp_path)
    certs = Peers.write(ca, tmp_path)
    sideways = certs.sideways
    device, edge, tls_port = _chain(parts, (certs.device, certs.edge))
    x = np.random.default_rng(2).standard_normal(model.input_shape).astype(np.float32)
    want = run_onnx(model.path, {"input": x})[0]
    with workers(tmp_path, device, edge) as (entry, edge_worker):
        async with aiohttp.ClientSession() as session:
            np.testing.assert_allclose(await _infer(session, entry.url, x), want, rtol=1e-4)

            def refused(client_dir: Path | None, trust: bytes | None) -> None:
                assert trust is not None
                with pytest.raises((ssl.SSLError, ConnectionError)):
                    _direct(tls_port, _client_context(client_dir, trust), x)

            await _refused_and_upstream_served(
                refused, certs.refused(ca.cert), lambda: _infer(session, entry.url, x), want
            )
            # a verified certificate of this deployment, but not the upstream stage's
            status, body = _direct(tls_port, _client_context(sideways, ca.cert), x)
            assert status == 403
            assert CLOUD in json.loads(body)["error"]
            assert DEVICE in json.loads(body)["error"]
            # nor inference on the edge's plain port
            plain_body, headers = _body(x)
            async with session.post(
                f"{edge_worker.url}/v2/models/chain/infer", data=plain_body, headers=headers
            ) as resp:
                assert resp.status == 403
                assert f"mutual TLS on port {tls_port}" in (await resp.json())["error"]
            # plain HTTP sent to the TLS port
            with pytest.raises((ConnectionError, http.client.HTTPException)):
                _plain_to(tls_port, plain_body, headers)
            np.testing.assert_allclose(await _infer(session, entry.url, x), want, rtol=1e-4)
        metrics = _metrics(edge_worker.url)
        assert metrics['edgeai_auth_failures_total{reason="peer",stage="1"}'] == 1
        assert metrics['edgeai_auth_failures_total{reason="plain",stage="1"}'] == 1
        # each refused handshake counted by why: no certificate, another deployment's
        # CA, expired, plain text; the device's own handshakes are not among them
        refusals = {
            k: v for k, v in metrics.items() if k.startswith("edgeai_tls_handshake_failures_total")
        }
        assert refusals == {
            f'edgeai_tls_handshake_failures_total{{reason="{why}",stage="1"}}': 1
            for why in ("no-certificate", "untrusted", "expired", "plain-text")
        }
        # only the device's five requests reached the model
        assert metrics['edgeai_requests_total{code="200",stage="1"}'] == 5
        assert _total(metrics, "edgeai_batch_size_count") == 5


@pytest.mark.parametrize("transport", ["http", "grpc"])
async def test_renewed_certificates_are_used_under_traffic_without_losing_a_request(
    model: ChainModel, ca: CA, tmp_path: Path, transport: str
) -> None:
    """The first certificates expire a few seconds into the run; the renewed ones are
    written meanwhile, as the operator renews them well before expiry. Every request
    of the continuous traffic is answered, and after the old ones have expired new
    connections are made with the new ones (to the HTTP TLS port, or to the gRPC port
    when the chain forwards over gRPC)."""
    parts = _parts(model, tmp_path)
    # the workers start with certificates valid for an hour (starting takes long on a
    # loaded machine); once they serve, certificates that expire soon replace them
    device_dir = ca.write(tmp_path / "device", DEVICE)
    edge_dir = ca.write(tmp_path / "edge", EDGE)
    chain = _chain if transport == "http" else _grpc_chain
    device, edge, port = chain(parts, (device_dir, edge_dir), reload_s=0.5)
    alpn = transport == "grpc"
    x = np.random.default_rng(3).standard_normal(model.input_shape).astype(np.float32)
    want = run_onnx(model.path, {"input": x})[0]
    answered = 0
    with workers(tmp_path, device, edge) as (entry, edge_worker):
        short = datetime.timedelta(seconds=8)
        ca.write(device_dir, DEVICE, lifetime=short)
        ca.write(edge_dir, EDGE, lifetime=short)
        old_expiry = x509.load_pem_x509_certificate(
            (edge_dir / "tls.crt").read_bytes()
        ).not_valid_after_utc
        urls = (entry.url, edge_worker.url)
        wait_until(
            lambda: all(_total(_metrics(u), "edgeai_tls_reloads_total") == 1 for u in urls),
            "both stages loaded the short-lived certificates",
        )
        old_serial = _server_serial(port, ca.cert, device_dir, alpn)
        assert old_serial == _serial(edge_dir)
        async with aiohttp.ClientSession() as session:

            async def traffic(until: datetime.datetime) -> None:
                nonlocal answered
                while _now() < until:
                    np.testing.assert_allclose(await _infer(session, entry.url, x), want, rtol=1e-4)
                    answered += 1

            stop = old_expiry + datetime.timedelta(seconds=4)
            senders = [asyncio.create_task(traffic(stop)) for _ in range(4)]
            await asyncio.sleep(2)
            ca.write(device_dir, DEVICE)
            ca.write(edge_dir, EDGE)
            await asyncio.gather(*senders)
        assert answered > 0
        # the old certificates have expired: a new connection gets the renewed one
        assert _now() > old_expiry
        new_serial = _server_serial(port, ca.cert, device_dir, alpn)
        assert new_serial == _serial(edge_dir) != old_serial
        for url in urls:
            assert _total(_metrics(url), "edgeai_tls_reloads_total") == 2
        edge_metrics = _metrics(edge_worker.url)
        assert edge_metrics['edgeai_requests_total{code="200",stage="1"}'] == answered
        # and not one forward had to be retried
        assert _total(_metrics(entry.url), "edgeai_forward_retries_total") == 0


TRITON_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    url, path, token = sys.argv[1], sys.argv[2], sys.argv[3]
    x = np.load(path)
    client = httpclient.InferenceServerClient(url=url)
    out = {"live": client.is_server_live(), "ready": client.is_server_ready()}
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    for case, headers in (
        ("missing", None),
        ("wrong", {"Authorization": "Bearer not-the-token"}),
        ("right", {"Authorization": "Bearer " + token}),
    ):
        try:
            result = client.infer("chain", [inp], headers=headers)
            out[case] = {"output": result.as_numpy("output").tolist()}
        except InferenceServerException as exc:
            out[case] = {"status": exc.status(), "message": exc.message()}
    print(json.dumps(out))
    """
)


def _client_script(script: str, *args: str) -> dict[str, Any]:
    """Runs a stock client's `script` in a process of its own; its last line of JSON."""
    run = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    out: dict[str, Any] = json.loads(run.stdout.strip().splitlines()[-1])
    return out


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "entry" / "token"
    path.parent.mkdir()
    path.write_text("s3cret-token\n")  # a Secret's value may end with a newline
    return path


def test_the_entry_refuses_a_missing_or_wrong_token_before_the_model(
    model: ChainModel, tmp_path: Path, token_file: Path
) -> None:
    entry = {
        "model_name": "chain",
        "partitions": [str(model.path)],
        "tier": "device",
        "entry_token_file": str(token_file),
    }
    x = np.random.default_rng(4).standard_normal(model.input_shape).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    with workers(tmp_path, entry) as (worker,):
        out = _client_script(
            TRITON_SCRIPT,
            worker.url.removeprefix("http://"),
            str(tmp_path / "x.npy"),
            "s3cret-token",
        )
        metrics = _metrics(worker.url)
    # health stays open for probes
    assert out["live"] is True
    assert out["ready"] is True
    assert out["missing"]["status"] == "401"
    assert "Bearer" in out["missing"]["message"]
    assert out["wrong"]["status"] == "403"
    assert "not accepted" in out["wrong"]["message"]
    np.testing.assert_allclose(
        np.asarray(out["right"]["output"]), run_onnx(model.path, {"input": x})[0], rtol=1e-4
    )
    assert metrics['edgeai_auth_failures_total{reason="missing-token",stage="0"}'] == 1
    assert metrics['edgeai_auth_failures_total{reason="wrong-token",stage="0"}'] == 1
    assert metrics['edgeai_requests_total{code="401",stage="0"}'] == 1
    assert metrics['edgeai_requests_total{code="403",stage="0"}'] == 1
    # the model ran once: for the request with the right token
    assert _total(metrics, "edgeai_batch_size_count") == 1


TRITON_CERT_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    url, path, server_ca, cases = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    x = np.load(path)
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    out = {}
    for case, files in cases.items():
        options = {"ca_certs": server_ca}  # the entry's certificate, from the deployment's CA
        if files is not None:
            options |= {"certfile": files[0], "keyfile": files[1]}
        # insecure: no host name check (the stage certificate names its identity as a URI)
        client = httpclient.InferenceServerClient(
            url=url, ssl=True, insecure=True, ssl_options=options
        )
        try:
            out[case] = {"live": client.is_server_live()}
            result = client.infer("chain", [inp])
            out[case]["output"] = result.as_numpy("output").tolist()
        except InferenceServerException as exc:
            out[case] |= {"status": exc.status(), "message": exc.message()}
        except Exception as exc:  # refused in the TLS handshake: no HTTP answer
            out[case] = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            client.close()
    print(json.dumps(out))
    """
)


def test_the_entry_serves_only_clients_with_a_certificate_of_the_named_ca(
    model: ChainModel, ca: CA, tmp_path: Path
) -> None:
    clients = CA(*issue_ca(Owner(name="clients", namespace="apps", uid="c-1"), _now()))
    strangers = CA(*issue_ca(Owner(name="strangers", namespace="apps", uid="c-2"), _now()))
    camera = clients.write(tmp_path / "camera", "edgeai://apps/clients/camera")
    stranger = strangers.write(tmp_path / "stranger", "edgeai://apps/clients/camera")
    old = _now() - datetime.timedelta(hours=2)
    expired = clients.write(
        tmp_path / "expired", "edgeai://apps/clients/camera", datetime.timedelta(hours=1), old
    )
    tls_port = free_port()
    entry = {
        "model_name": "chain",
        "partitions": [str(model.path)],
        "tier": "device",
        "tls_dir": str(ca.write(tmp_path / "device", DEVICE)),
        "tls_port": tls_port,
        "entry_client_ca_file": str(camera / "ca.crt"),
    }
    x = np.random.default_rng(5).standard_normal(model.input_shape).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    cases = {
        "none": None,
        "other-ca": [str(stranger / "tls.crt"), str(stranger / "tls.key")],
        "expired": [str(expired / "tls.crt"), str(expired / "tls.key")],
        "right": [str(camera / "tls.crt"), str(camera / "tls.key")],
    }
    with workers(tmp_path, entry) as (worker,):
        out = _client_script(
            TRITON_CERT_SCRIPT,
            f"127.0.0.1:{tls_port}",
            str(tmp_path / "x.npy"),
            str(tmp_path / "device" / "ca.crt"),
            json.dumps(cases),
        )
        after_triton = _metrics(worker.url)
        # the same refusals seen by a plain ssl client: the server ends the connection
        alerts = {}
        for case, client_dir in (("other-ca", stranger), ("expired", expired)):
            alerts[case] = _refusal(tls_port, _client_context(client_dir, ca.cert))
        status, body = _direct(tls_port, _client_context(camera, ca.cert), x)
        assert status == 200, body[:300]
        # inference on the plain port is refused: clients come in over TLS
        status, body = _plain_infer(worker.url, x)
        metrics = _metrics(worker.url)
    assert status == 403
    assert "with a client certificate" in json.loads(body)["error"]
    # no certificate: through the handshake, health open, inference 401 with the body
    assert out["none"]["live"] is True
    assert out["none"]["status"] == "401"
    assert "client certificate" in out["none"]["message"]
    # a certificate of another CA, or an expired one: refused in the handshake, with
    # no HTTP answer at all
    for case in ("other-ca", "expired"):
        assert set(out[case]) == {"error"}, out[case]
    # (asyncio's TLS transport closes without sending the alert)
    assert all(a == "closed" or a.startswith("alert") for a in alerts.values()), alerts
    np.testing.assert_allclose(
        np.asarray(out["right"]["output"]), run_onnx(model.path, {"input": x})[0], rtol=1e-4
    )
    assert metrics['edgeai_auth_failures_total{reason="missing-cert",stage="0"}'] == 1
    assert metrics['edgeai_auth_failures_total{reason="plain",stage="0"}'] == 1
    # the refused handshakes, counted by why: tritonclient's (it tries a refused
    # connection more than once), then one more each for the ssl client's
    for why in ("untrusted", "expired"):
        series = f'edgeai_tls_handshake_failures_total{{reason="{why}",stage="0"}}'
        assert after_triton[series] >= 1
        assert metrics[series] == after_triton[series] + 1
    assert {k for k in metrics if k.startswith("edgeai_tls_handshake_failures_total")} == {
        f'edgeai_tls_handshake_failures_total{{reason="{why}",stage="0"}}'
        for why in ("untrusted", "expired")
    }
    # the model ran twice: for the two requests with the right certificate
    assert _total(metrics, "edgeai_batch_size_count") == 2


def test_the_client_ca_settings_name_the_field(ca: CA, tmp_path: Path) -> None:
    stage = ca.write(tmp_path / "device", DEVICE)
    with pytest.raises(ConfigError) as caught:
        WorkerConfig(tier="device", tls_dir=stage, entry_client_ca_file=stage / "ca.crt")
    assert caught.value.field_name == "entry_client_ca_file"
    with pytest.raises(ConfigError) as caught:
        WorkerConfig(
            tier="device",
            tls_dir=stage,
            tls_port=8443,
            tls_peers=(DEVICE,),
            entry_client_ca_file=stage / "ca.crt",
        )
    assert caught.value.field_name == "tls_peers"
    with pytest.raises(FileNotFoundError, match="entry_client_ca_file"):
        StageTLS(stage, tmp_path / "absent.crt")
    # the settings file's spelling, as `edgeai run-stage` writes it
    (tmp_path / "worker.json").write_text(
        json.dumps(
            {"tier": "device", "tlsDir": str(stage), "tlsPort": 8443, "entryClientCaFile": "ca.pem"}
        )
    )
    config = load_config(tmp_path / "worker.json")
    assert config.entry_client_ca_file == tmp_path / "ca.pem"


def _plain_infer(url: str, x: np.ndarray) -> tuple[int, bytes]:
    body, headers = _body(x)
    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=10)
    try:
        conn.request("POST", "/v2/models/chain/infer", body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _refusal(port: int, ctx: ssl.SSLContext) -> str:
    """How the server ends a connection right after the client's side of the handshake
    (in TLS 1.3 the server checks the client's certificate last): "closed", or the TLS
    alert it sent. A server that accepted the certificate sends nothing and this times
    out."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw) as sock,
    ):
        try:
            data = sock.recv(1)
        except ssl.SSLError as exc:
            return f"alert {exc.reason}"
    assert data == b"", data
    return "closed"
