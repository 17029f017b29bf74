"""The homomorphic head (spec.privacy.homomorphicHead, edgeai_worker.he): digits_cnn's
last dense layer evaluated by a real edge worker on a real device worker's CKKS
ciphertexts, the spec and plan, and the planner's price for it."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import onnx
import pytest
import tenseal as ts
from aiohttp import web

from _bench_modules import load_script
from _worker_support import free_port, workers
from edgeai_operator.deployspec import parse_deployment
from edgeai_operator.errors import SpecError
from edgeai_operator.partitions import stage_settings
from edgeai_operator.plandoc import PlanDocument
from edgeai_operator.planning import NodeState, plan_zones
from edgeai_operator.problem import analytic_profile, he_cost_table, he_head_cost
from edgeai_operator.topology import NodeSpec
from edgeai_worker import he, zoo
from edgeai_worker.graph import Partitioner
from edgeai_worker.protocol import HEADER_LENGTH, Tensor, decode_request

HEAD_CUT = "/classifier/classifier.2/Relu_output_0"  # the input of digits_cnn's last Gemm


def _plan() -> PlanDocument:
    """What the planner makes of the homomorphic head for digits_cnn on a small zone."""
    profiles = [analytic_profile("digits_cnn")]
    return plan_zones(parse_deployment(_deployment(HE)), profiles, NODES).plans["zone-a"]


def _plain_logits(x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    model = onnx.load(str(zoo.export_onnx("digits_cnn", trained=True)))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input": x})
    return np.asarray(logits)


def test_the_plan_carries_the_homomorphic_head_and_gives_both_stages_the_setting(
    tmp_path: Path,
) -> None:
    plan = _plan()
    again = PlanDocument.from_dict(plan.to_dict())
    assert again.homomorphic_head
    assert plan.to_dict()["privacy"]["homomorphicHead"] is True
    kw: dict[str, Any] = {"plan_path": tmp_path / "plan.yaml", "workdir": tmp_path, "host": "h"}
    device = stage_settings(plan, 0, port=1, **kw)
    edge = stage_settings(plan, 1, port=2, **kw)
    assert device["homomorphic_head"] is True
    assert edge["homomorphic_head"] is True
    (partition,) = edge["partitions"]
    head = he.DenseHead.from_onnx(Path(partition))
    assert (head.input_name, head.output_name) == (HEAD_CUT, "output")
    assert head.weight.shape == (10, 64)
    plain = PlanDocument.from_dict({**plan.to_dict(), "privacy": {}})
    assert "homomorphic_head" not in stage_settings(plain, 0, port=1, **kw)


def test_a_head_that_is_not_one_dense_layer_is_refused(tmp_path: Path) -> None:
    model = onnx.load(str(zoo.export_onnx("digits_cnn", trained=True)))
    part = Partitioner(model).extract(("/classifier/classifier.0/Flatten_output_0",), ("output",))
    onnx.save(part, str(tmp_path / "two.onnx"))
    with pytest.raises(he.HeadError, match=r"one dense layer .*\['Gemm', 'Relu', 'Gemm'\]"):
        he.DenseHead.from_onnx(tmp_path / "two.onnx")


def test_the_edge_refuses_a_context_with_the_secret_key_and_keeps_public_ones(
    tmp_path: Path,
) -> None:
    model = onnx.load(str(zoo.export_onnx("digits_cnn", trained=True)))
    onnx.save(Partitioner(model).extract((HEAD_CUT,), ("output",)), str(tmp_path / "h.onnx"))
    evaluator = he.HeadEvaluator(he.DenseHead.from_onnx(tmp_path / "h.onnx"))
    keys = he.DeviceKeys()
    key, context = evaluator.context(keys.public_context)
    assert key == keys.context_digest
    assert not context.is_private()
    assert evaluator.context(key.encode())[0] == key
    with pytest.raises(KeyError):
        evaluator.context(b"0" * he.DIGEST_LENGTH)
    private = ts.context(
        ts.SCHEME_TYPE.CKKS,
        poly_modulus_degree=he.POLY_MODULUS_DEGREE,
        coeff_mod_bit_sizes=list(he.COEFF_MOD_BIT_SIZES),
    )
    private.generate_galois_keys()
    with pytest.raises(he.HeadError, match="secret key"):
        evaluator.context(private.serialize(save_secret_key=True))


class RecordingProxy:
    """An HTTP hop between the device worker and the edge: records what the device
    sends and passes it on to `target` (switchable, as a Service to another replica)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.requests: list[tuple[bytes, str | None, int]] = []  # body, header length, status
        self.app = web.Application(client_max_size=256 * 1024 * 1024)
        self.app.router.add_route("*", "/{tail:.*}", self._pass)

    async def _pass(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() in ("content-type", HEADER_LENGTH.lower(), "idempotency-key")
        }
        async with (
            aiohttp.ClientSession() as session,
            session.request(
                request.method,
                self.target + request.path_qs,
                data=io.BytesIO(body),
                headers=headers,
            ) as resp,
        ):
            answer = await resp.read()
            if request.path.endswith("/infer"):
                length = request.headers.get(HEADER_LENGTH)
                self.requests.append((body, length, resp.status))
            kept = {
                k: v
                for k, v in resp.headers.items()
                if k.lower().startswith(("content-type", "x-", "inference-"))
            }
            return web.Response(status=resp.status, body=answer, headers=kept)

    def sent(self, i: int) -> dict[str, Tensor]:
        body, length, _ = self.requests[i]
        request = decode_request(body, None if length is None else int(length))
        return {t.name: t for t in request.inputs}


async def _infer(session: aiohttp.ClientSession, url: str, x: np.ndarray) -> np.ndarray:
    body = {
        "inputs": [
            {
                "name": "input",
                "shape": list(x.shape),
                "datatype": "FP32",
                "data": x.ravel().tolist(),
            }
        ]
    }
    async with session.post(f"{url}/v2/models/digits_cnn/infer", json=body) as r:
        assert r.status == 200, await r.text()
        out = (await r.json())["outputs"][0]
    return np.asarray(out["data"], np.float32).reshape(out["shape"])


@pytest.mark.slow
async def test_the_encrypted_chain_agrees_with_the_plaintext_head_on_held_out_digits(
    tmp_path: Path,
) -> None:
    """A device worker and two edge workers (processes, OIP v2 over loopback HTTP, a
    recording proxy as the device's next stage): the edge computes digits_cnn's last
    dense layer on ciphertexts; what crosses is ciphertexts and a public context; the
    device's decrypted argmax agrees with the plaintext model's on at least 0.99 of the
    held-out digits; a second replica that has not seen the context gets it again."""
    plan = _plan()
    kw: dict[str, Any] = {"plan_path": tmp_path / "plan.yaml", "workdir": tmp_path}
    kw["host"] = "127.0.0.1"
    edges = [stage_settings(plan, 1, port=free_port(), **kw) for _ in range(2)]
    proxy_port = free_port()
    device = stage_settings(
        plan, 0, port=free_port(), next_urls=[f"http://127.0.0.1:{proxy_port}"], **kw
    )
    device["uplink_mbps"] = 100.0  # no probes through the proxy
    _, _, x_test, y_test = zoo.digits_split()
    x, y = x_test[:120], y_test[:120]
    expected = _plain_logits(x)
    with workers(tmp_path, *edges) as (edge_a, edge_b):
        proxy = RecordingProxy(edge_a.url)
        runner = web.AppRunner(proxy.app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", proxy_port).start()
        try:
            with workers(tmp_path, device) as (entry,):
                async with aiohttp.ClientSession() as session:
                    logits = [await _infer(session, entry.url, x[i : i + 40]) for i in (0, 40)]
                    proxy.target = edge_b.url  # another replica: it has not seen the context
                    logits.append(await _infer(session, entry.url, x[80:]))
                    # the edge refuses features it cannot read, naming what it takes
                    plain = {"name": HEAD_CUT, "shape": [1, 64], "datatype": "FP32"}
                    body = {"inputs": [plain | {"data": [0.0] * 64}]}
                    url = f"{edge_a.url}/v2/models/digits_cnn/infer"
                    async with session.post(url, json=body) as r:
                        assert r.status == 400
                        assert "not BYTES" in (await r.json())["error"]
        finally:
            await runner.cleanup()
    # whole context, digest, digest; the new replica: digest refused (428), whole again
    assert [status for _, _, status in proxy.requests] == [200, 200, 428, 200]
    sizes = [len(proxy.sent(i)[he.CONTEXT_TENSOR].array[0]) for i in range(4)]
    assert sizes[1] == sizes[2] == he.DIGEST_LENGTH
    assert sizes[0] == sizes[3] > 1_000_000
    context = ts.context_from(bytes(proxy.sent(0)[he.CONTEXT_TENSOR].array[0]))
    assert not context.is_private()
    assert not context.has_secret_key()
    features = proxy.sent(0)[HEAD_CUT]
    assert features.datatype == "BYTES"
    assert features.array.shape == (40,)
    assert set(proxy.sent(0)) == {HEAD_CUT, he.CONTEXT_TENSOR}  # nothing else goes up
    got = np.concatenate(logits)
    assert got.shape == expected.shape == (len(x), 10)
    agreement = float((got.argmax(axis=1) == expected.argmax(axis=1)).mean())
    assert agreement >= 0.99, agreement
    assert float(np.abs(got - expected).max()) < 1e-2
    assert float((got.argmax(axis=1) == y).mean()) >= 0.95


# --- the spec ---------------------------------------------------------------------------


def _deployment(privacy: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "edgeai.dev/v1alpha1",
        "kind": "DNNDeployment",
        "metadata": {"name": "cam", "namespace": "default"},
        "spec": {
            "modelRef": {"name": "digits"},
            "slo": {"latencyP95Ms": 500},
            "placement": spec.pop("placement", {"tiers": ["device", "edge"]}),
            "privacy": privacy,
            **spec,
        },
    }


HE = {"homomorphicHead": {"enabled": True}}


def test_the_homomorphic_head_is_parsed() -> None:
    assert parse_deployment(_deployment(HE)).homomorphic_head
    assert not parse_deployment(
        _deployment({"homomorphicHead": {"enabled": False}})
    ).homomorphic_head
    assert not parse_deployment(_deployment({})).homomorphic_head


@pytest.mark.parametrize(
    ("privacy", "spec", "says"),
    [
        ({"homomorphicHead": {"enabled": "yes"}}, {}, "spec.privacy.homomorphicHead.enabled"),
        ({"homomorphicHead": {"layers": 2}}, {}, "spec.privacy.homomorphicHead: unknown"),
        (HE, {"placement": {"tiers": ["edge", "cloud"]}}, "needs the device"),
        (HE, {"placement": {"tiers": ["device"]}}, "a tier above it"),
        (HE, {"placement": {"partitioning": "none"}}, "partitioning: none"),
        (HE, {"placement": {"adaptiveSplit": True}}, "adaptiveSplit"),
        (HE | {"noiseTraining": True, "featureNoiseStd": 0.5}, {}, "noiseTraining"),
        (HE, {"sharing": "backbone", "security": {"stageTLS": "disabled"}}, "backbone"),
        (HE, {"offload": {"reuse": {"maxEntries": 10}}}, "spec.offload"),
    ],
)
def test_what_the_homomorphic_head_cannot_serve_with_is_refused_naming_the_field(
    privacy: dict[str, Any], spec: dict[str, Any], says: str
) -> None:
    with pytest.raises(SpecError, match=r"spec\.privacy\.homomorphicHead") as caught:
        parse_deployment(_deployment(privacy, **spec))
    assert says in str(caught.value)


# --- the plan ---------------------------------------------------------------------------


def _node(name: str, tier: str, gflops: float, mbps: float | None) -> NodeState:
    labels = {"edgeai.dev/tier": tier, "topology.kubernetes.io/zone": "zone-a"}
    return NodeState(
        NodeSpec(name, tier, "zone-a", {}, gflops, mbps, 5.0, None, labels), True, True
    )


NODES = [_node("phone", "device", 2.0, 20.0), _node("gateway", "edge", 200.0, None)]


def test_the_field_moves_the_last_layer_to_the_edge_priced_as_measured() -> None:
    profiles = [analytic_profile("digits_cnn")]
    plain = plan_zones(parse_deployment(_deployment({})), profiles, NODES).plans["zone-a"]
    encrypted = plan_zones(parse_deployment(_deployment(HE)), profiles, NODES).plans["zone-a"]
    # digits_cnn is small enough that the device runs it all; the head moves to the edge
    assert plain.split == "device:0-8"
    assert encrypted.split == "device:0-7 > edge:8"
    assert encrypted.homomorphic_head
    assert encrypted.stages[1].inputs == (HEAD_CUT,)
    cost = he_head_cost(64, 10)
    (transfer,) = encrypted.transfers
    assert (transfer.bytes, transfer.return_bytes) == (cost["upBytes"], cost["downBytes"])
    host = float(he_cost_table()["hostGflops"])
    device_ms = (
        sum(float(s["flops"]) / (2.0 * 1e6) for s in profiles[0]["segments"][:8])
        + (cost["encryptMs"] + cost["decryptMs"]) * host / 2.0
    )
    edge_ms = cost["evaluateMs"] * host / 200.0
    link_ms = 5.0 + (cost["upBytes"] + cost["downBytes"]) * 8 / (20.0 * 1000)
    assert encrypted.stages[0].compute_ms == pytest.approx(device_ms, abs=1e-3)
    assert encrypted.stages[1].compute_ms == pytest.approx(edge_ms, abs=1e-3)
    assert encrypted.predicted_latency_ms == pytest.approx(device_ms + edge_ms + link_ms, abs=1e-2)
    assert (encrypted.predicted_latency_ms or 0) > (plain.predicted_latency_ms or 0)


def test_a_head_of_a_shape_without_measured_costs_is_refused_naming_the_field() -> None:
    profile = analytic_profile("digits_cnn")
    profile["cuts"][-1]["sizeBytes"] = 4 * 12  # a 12-class head
    zones = plan_zones(parse_deployment(_deployment(HE)), [profile], NODES)
    assert "zone-a" not in zones.plans
    assert "spec.privacy.homomorphicHead" in zones.unplanned["zone-a"]
    assert "64 -> 10" in zones.unplanned["zone-a"]


# --- the bench's numbers ----------------------------------------------------------------

BENCH = load_script(Path(__file__).resolve().parents[1] / "bench/privacy/run.py", "privacy_he")


def test_the_bench_prices_the_head_and_renders_it_side_by_side() -> None:
    section = {
        "date": "2026-12-02",
        "conditions": "idle",
        "inputs": 64,
        "outputs": 10,
        "samples": 450,
        "scheme": {"polyModulusDegree": 8192, "coeffModBitSizes": [60, 40, 40, 60]}
        | {"scaleBits": 40},
        "hostGflops": 20.0,
        "keygenMs": 3000.0,
        "contextBytes": 35_000_000,
        "plain": {"headMs": 0.1, "upBytes": 256, "downBytes": 40, "accuracy": 0.98},
        "he": {"encryptMs": 30.0, "evaluateMs": 45.0, "decryptMs": 1.0, "upBytes": 332_800}
        | {"downBytes": 131_200, "accuracy": 0.98, "agreement": 1.0, "maxAbsError": 2e-5},
        "served": {"requests": 100, "split": "device:0-7 > edge:8", "plainMs": 10.0}
        | {"heMs": 110.0, "heFirstMs": 3000.0, "agreement": 1.0},
    }
    cost = BENCH.he_cost(section, "2026-12-02")
    assert cost["hostGflops"] == 20.0
    assert cost["heads"] == [
        {"inputs": 64, "outputs": 10, "encryptMs": 30.0, "evaluateMs": 45.0}
        | {"decryptMs": 1.0, "upBytes": 332_800, "downBytes": 131_200}
    ]
    text = BENCH.render_numbers.privacy_he({"homomorphicHead": section})
    lines = text.splitlines()
    assert lines[2] == "| plaintext (onnxruntime) | - | 0.100 | - | 0.100 | 256 | 40 | 0.9800 | 1 |"
    assert lines[3] == (
        "| CKKS (TenSEAL) | 30.0 | 45.0 | 1.00 | 76.0 | 332,800 | 131,200 | 0.9800 | 1.0000 |"
    )
    assert "760x the time, 1,300x the bytes up and 3,280x down" in text
    assert "p50 10.0 ms in plaintext, 110.0 ms with the homomorphic head (11.0x)" in text
