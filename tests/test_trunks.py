"""Shared trunks: head models fine-tuned on digits_cnn's frozen trunk share its graph up
to the trunk tensor (by digest) and nothing after; `spec.base` is parsed naming the
field and checked by the preparation against the base's digests; a trunk stage serves
two applications over real sockets with each application's own full-model outputs,
running the trunk once for a pair of requests on one input."""

from __future__ import annotations

import copy
import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import onnx
import pytest

from _cluster_support import Namespace, apply, condition, dnn_model, get, wait_for
from _worker_support import Worker, extract, free_port, run_onnx, wait_ready, workers
from edgeai_operator.errors import SpecError
from edgeai_operator.modelspec import BaseRef, parse_model_spec
from edgeai_operator.preparation import check_base, detect_trunk
from edgeai_worker import trunks, zoo
from edgeai_worker.graph import prefix_digests
from edgeai_worker.protocol import (
    HEADER_LENGTH,
    InferRequest,
    Tensor,
    decode_response,
    encode_request,
    parse_header_length,
)

SPEC: dict[str, Any] = {
    "source": {"uri": "pvc://models/digits-parity.onnx"},
    "input": {"name": "input", "shape": [1, 1, 8, 8], "dtype": "FP32"},
    "base": {"modelRef": {"name": "digits"}, "sharedUpTo": trunks.TRUNK_TENSOR},
}


def _cuts(model: onnx.ModelProto) -> list[list[str]]:
    return [["input"], *([n.output[0]] for n in model.graph.node)]


def test_heads_share_the_trunk_by_digest_and_nothing_after() -> None:
    base = onnx.load(str(zoo.export_onnx("digits_cnn", trained=True)))
    cuts = _cuts(base)
    trunk_end = cuts.index([trunks.TRUNK_TENSOR])
    ours = prefix_digests(base, cuts)
    for task in trunks.TASKS:
        head = onnx.load(str(trunks.digits_head(task)))
        assert _cuts(head) == cuts  # the same graph and tensor names
        theirs = prefix_digests(head, cuts)
        # up to the trunk and the weightless Flatten after it: the same computation
        assert theirs[: trunk_end + 2] == ours[: trunk_end + 2]
        # from the first retrained layer on: another computation
        assert all(
            a != b for a, b in zip(theirs[trunk_end + 2 :], ours[trunk_end + 2 :], strict=True)
        )
        assert trunks.head_accuracy(task) >= 0.95


def test_a_digest_sees_initializer_bytes_not_names() -> None:
    base = onnx.load(str(zoo.export_onnx("digits_cnn", trained=True)))
    cuts = _cuts(base)
    renamed = copy.deepcopy(base)
    for init in renamed.graph.initializer:
        old = init.name
        init.name = f"w_{old}"
        for node in renamed.graph.node:
            node.input[:] = [f"w_{old}" if t == old else t for t in node.input]
    assert prefix_digests(renamed, cuts) == prefix_digests(base, cuts)
    nudged = copy.deepcopy(base)
    first_conv_weight = nudged.graph.node[0].input[1]
    init = next(i for i in nudged.graph.initializer if i.name == first_conv_weight)
    array = onnx.numpy_helper.to_array(init).copy()
    array.flat[0] = np.nextafter(array.flat[0], np.float32(1))
    init.CopyFrom(onnx.numpy_helper.from_array(array, init.name))
    # one ulp of one weight of the first layer changes every digest after the input
    changed = prefix_digests(nudged, cuts)
    assert changed[0] == prefix_digests(base, cuts)[0]
    assert all(a != b for a, b in zip(changed[1:], prefix_digests(base, cuts)[1:], strict=True))


def test_spec_base_is_parsed() -> None:
    assert parse_model_spec(SPEC).base == BaseRef("digits", trunks.TRUNK_TENSOR)
    assert parse_model_spec({k: v for k, v in SPEC.items() if k != "base"}).base is None


@pytest.mark.parametrize(
    ("base", "field"),
    [
        ("digits", "spec.base"),
        ({"sharedUpTo": "t"}, "spec.base.modelRef"),
        ({"modelRef": {"name": "Digits"}, "sharedUpTo": "t"}, "spec.base.modelRef.name"),
        ({"modelRef": {"name": "d" * 41}, "sharedUpTo": "t"}, "spec.base.modelRef.name"),
        ({"modelRef": {"name": "digits"}}, "spec.base.sharedUpTo"),
        ({"modelRef": {"name": "digits"}, "sharedUpTo": ""}, "spec.base.sharedUpTo"),
        ({"modelRef": {"name": "digits"}, "sharedUpTo": "t", "cut": 3}, "spec.base"),
        ({"modelRef": {"name": "digits", "kind": "x"}, "sharedUpTo": "t"}, "spec.base.modelRef"),
    ],
)
def test_a_bad_base_is_refused_naming_the_field(base: Any, field: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_model_spec({**SPEC, "base": base})
    assert caught.value.field == field, caught.value


def _profile(digests: list[str], tensors: list[str]) -> dict[str, Any]:
    cuts = [
        {"index": i, "tensors": [t], "sizeBytes": 4, "position": i} for i, t in enumerate(tensors)
    ]
    segments = [
        {"index": i, "positions": f"{i}-{i}", "flops": 10 * (i + 1)}
        for i in range(len(tensors) - 1)
    ]
    return {"cuts": cuts, "segments": segments, "prefixDigests": digests}


def _result(digests: list[str]) -> dict[str, Any]:
    profile = _profile(digests, ["input", "a", "trunk", "output"])
    return {"variants": [{"name": "fp32", "kind": "fp32", "ready": True, "profile": profile}]}


def _base(digests: list[str], *, prepared: bool = True) -> dict[str, Any]:
    profile = _profile(digests, ["input", "x", "y", "z", "logits"])
    profile.update(build="fp32", artifact={"uri": "pvc://m/digits.onnx", "digest": "sha256:ab"})
    condition = {
        "type": "Prepared",
        "status": "True" if prepared else "False",
        "observedGeneration": 2,
    }
    return {
        "metadata": {"name": "digits", "generation": 2},
        "status": {"profiles": [profile], "conditions": [condition]},
    }


SPEC_T = parse_model_spec({**SPEC, "base": {"modelRef": {"name": "digits"}, "sharedUpTo": "trunk"}})


def test_the_preparation_accepts_a_trunk_the_base_computes() -> None:
    verdict, trunk = check_base(
        "parity", SPEC_T, _result(["i", "a", "T", "o1"]), _base(["i", "x", "y", "T", "o2"])
    )
    assert verdict == "ok"
    assert trunk == {
        "model": "digits",
        "sharedUpTo": "trunk",
        "baseTensor": "z",
        "cut": 2,
        "digest": "T",
        "baseArtifact": {"uri": "pvc://m/digits.onnx", "digest": "sha256:ab"},
        "trunkFlops": 10 + 20,
        "headFlops": 30,
    }


def test_the_preparation_refuses_a_wrong_claim_naming_spec_base() -> None:
    verdict, message = check_base(
        "parity", SPEC_T, _result(["i", "a", "T", "o1"]), _base(["i", "x", "y", "U", "o2"])
    )
    assert verdict == "mismatch"
    assert message.startswith(
        "spec.base: this model's graph up to 'trunk' is not the graph of DNNModel digits"
    )
    no_cut = parse_model_spec(
        {**SPEC, "base": {"modelRef": {"name": "digits"}, "sharedUpTo": "nope"}}
    )
    verdict, message = check_base(
        "parity", no_cut, _result(["i", "a", "T", "o1"]), _base(["i", "T"])
    )
    assert verdict == "mismatch"
    assert (
        message == "spec.base.sharedUpTo: 'nope' is not a single-tensor cut of this model's graph "
        "(its cuts: a, trunk)"
    )
    verdict, message = check_base("digits", SPEC_T, _result(["i"]), _base(["i"]))
    assert (verdict, message) == ("mismatch", "spec.base.modelRef.name names this DNNModel itself")


def test_the_preparation_waits_for_the_base() -> None:
    result = _result(["i", "a", "T", "o1"])
    assert check_base("parity", SPEC_T, result, None) == (
        "wait",
        "spec.base.modelRef.name: waiting for DNNModel digits (not found)",
    )
    assert check_base("parity", SPEC_T, result, _base(["T"], prepared=False)) == (
        "wait",
        "spec.base.modelRef.name: waiting for DNNModel digits to be Prepared",
    )


def _peer(name: str, digests: list[str], **status: Any) -> dict[str, Any]:
    base = _base(digests)
    base["metadata"]["name"] = name
    base["status"].update(status)
    return base


def test_the_preparation_detects_a_trunk_without_spec_base() -> None:
    # input, a, trunk, output: "a" and "trunk" computed as another model's cuts; the
    # deepest one counts, and of two bases as deep the first by name
    result = _result(["i", "A", "T", "o1"])
    others = [
        _peer("zeta", ["i", "A", "x", "T", "o2"]),
        _peer("alpha", ["i", "A", "T", "y", "o3"]),
        _peer("shallow", ["i", "A", "q", "r", "o4"]),
    ]
    trunk = detect_trunk("parity", result, others)
    assert trunk == {
        "model": "alpha",
        "sharedUpTo": "trunk",
        "baseTensor": "y",
        "cut": 2,
        "digest": "T",
        "baseArtifact": {"uri": "pvc://m/digits.onnx", "digest": "sha256:ab"},
        "trunkFlops": 10 + 20,
        "headFlops": 30,
        "detected": True,
    }
    # only the shallow one shares: its cut
    assert detect_trunk("parity", result, [others[2]])["sharedUpTo"] == "a"  # type: ignore[index]


def test_what_the_detection_does_not_take() -> None:
    result = _result(["i", "A", "T", "o1"])
    # the input alone and the whole model are no trunk; the model itself, a model not
    # Prepared, and one that shares a trunk itself are no base
    assert detect_trunk("parity", result, [_peer("same-input", ["i", "u", "v", "w", "o1"])]) is None
    assert detect_trunk("parity", result, [_peer("parity", ["i", "A", "T", "y", "o1"])]) is None
    unprepared = _peer("digits", ["i", "A", "T", "y", "o1"])
    unprepared["status"]["conditions"][0]["status"] = "False"
    assert detect_trunk("parity", result, [unprepared]) is None
    sharing = _peer("digits", ["i", "A", "T", "y", "o1"], trunk={"model": "parity"})
    assert detect_trunk("parity", result, [sharing]) is None
    no_digests = _peer("digits", ["i", "A", "T", "y", "o1"])
    del no_digests["status"]["profiles"][0]["prefixDigests"]
    assert detect_trunk("parity", result, [no_digests]) is None


# ---------------------------------------------------------------------------
# The trunk stage over real sockets


def _request(x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    request = InferRequest([Tensor.from_numpy("input", x)], parameters={"binary_data_output": True})
    return encode_request(request)


async def _infer(session: aiohttp.ClientSession, url: str, model: str, x: np.ndarray) -> np.ndarray:
    body, headers = _request(x)
    async with session.post(f"{url}/v2/models/{model}/infer", data=body, headers=headers) as resp:
        data = await resp.read()
        assert resp.status == 200, data
        length = parse_header_length(resp.headers.get(HEADER_LENGTH), len(data))
    response = decode_response(data, length)
    assert response.model_name == model
    return response.outputs[0].array


def _metric(text: str, series: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(series))


def start_trunk(tmp: Path, trunk: Path, routes: dict[str, str]) -> Worker:
    port = free_port()
    log = tmp / f"trunk-{port}.log"
    args = [f"--route={m}={u}" for m, u in routes.items()]
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "edgeai_worker.trunkstage",
                f"--trunk={trunk}",
                f"--port={port}",
                *args,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(os.environ),
        )
    worker = Worker(process, f"http://127.0.0.1:{port}", log)
    wait_ready(worker.url, process)
    return worker


@pytest.mark.slow
async def test_a_trunk_stage_serves_two_applications_with_their_own_outputs(tmp_path: Path) -> None:
    full = {
        "digits": zoo.export_onnx("digits_cnn", trained=True),
        "parity": trunks.digits_head("parity"),
    }
    trunk = extract(full["digits"], ["input"], [trunks.TRUNK_TENSOR], tmp_path / "trunk.onnx")
    heads = {
        m: extract(p, [trunks.TRUNK_TENSOR], ["output"], tmp_path / f"head-{m}.onnx")
        for m, p in full.items()
    }
    settings = [
        {
            "model_name": m,
            "partitions": [str(p)],
            "tier": "edge",
            "stage_index": 1,
            "port": free_port(),
        }
        for m, p in heads.items()
    ]
    _, _, x_test, _ = zoo.digits_split()
    with workers(tmp_path, *settings) as started:
        routes = {str(s["model_name"]): w.url for s, w in zip(settings, started, strict=True)}
        served = start_trunk(tmp_path, trunk, routes)
        try:
            async with aiohttp.ClientSession() as session:
                for i in range(8):
                    x = x_test[i : i + 1]
                    for model in ("digits", "parity"):
                        out = await _infer(session, served.url, model, x)
                        np.testing.assert_allclose(
                            out, run_onnx(full[model], {"input": x})[0], rtol=1e-5, atol=1e-5
                        )
                async with session.get(f"{served.url}/metrics") as resp:
                    text = await resp.text()
                # 8 inputs, each asked of both applications: the trunk ran once per input
                assert _metric(text, "edgeai_trunk_runs_total") == 8
                assert _metric(text, "edgeai_trunk_reused_total") == 8
                assert _metric(text, "edgeai_stage_compute_cpu_seconds_total") > 0
                # the autoscaler's series: each of the 16 requests, trunk and head
                assert _metric(text, "edgeai_stage_latency_seconds_count") == 16
                assert _metric(text, "edgeai_in_flight_requests") == 0
                for head in started:
                    async with session.get(f"{head.url}/metrics") as resp:
                        cpu_s = _metric(await resp.text(), "edgeai_stage_compute_cpu_seconds_total")
                    assert cpu_s > 0
                async with session.get(f"{served.url}/v2/models/parity/ready") as resp:
                    assert resp.status == 200
                async with session.get(f"{served.url}/v2/models/tercile/ready") as resp:
                    assert resp.status == 404
                async with session.post(
                    f"{served.url}/v2/models/tercile/infer", json={"inputs": []}
                ) as resp:
                    assert resp.status == 404
                    assert (await resp.json())[
                        "error"
                    ] == "model 'tercile' is not served here (accepted: digits, parity)"
        finally:
            served.stop()


# ---------------------------------------------------------------------------
# The bench's rendering, on a literal report


def _entry(sep: tuple[float, ...], shared: tuple[float, ...]) -> dict[str, Any]:
    keys = ("flopsPerPair", "computeCpuMsPerPair", "computeMsPerPair", "cpuMsPerPair")
    summary = {
        name: {**dict(zip(keys, values, strict=True)), "identicalTop1": True, "maxAbsDiff": 0.0}
        for name, values in (("separate", sep), ("shared", shared))
    }
    ratios = {k: summary["shared"][k] / summary["separate"][k] for k in keys}
    return {"summary": summary, "ratios": ratios}


def test_the_trunk_numbers_render_met_and_unmet_goals() -> None:
    from _bench_modules import load_script

    bench = load_script(Path(__file__).resolve().parents[1] / "bench/trunks/run.py", "trunks_run")
    rn = bench.render_numbers
    report = {
        "date": "2026-12-02",
        "conditions": "idle",
        "pairs": 400,
        "rounds": 3,
        "goal": 0.6,
        "batches": {
            "1": _entry((1000.0, 0.1, 0.2, 1.0), (500.0, 0.2, 0.3, 3.0)),
            "16": _entry((16000.0, 0.5, 0.4, 2.0), (8000.0, 0.25, 0.2, 4.0)),
        },
    }
    assert rn.trunks_goal(report) == (
        "Goal: shared-trunk edge compute per pair of requests <= 0.6x two separate deployments "
        "(2026-12-02, by digits per request). In FLOPs: 0.500x at 1, 0.500x at 16 (met at 1, "
        "16). In onnxruntime CPU time: 2.000x at 1, 0.500x at 16 (met at 16). In the stages' "
        "measured compute time: 1.500x at 1, 0.500x at 16 (met at 16). "
        "In edge process CPU time: 3.000x at 1, 2.000x at 16 (not met)."
    )
    # the onnxruntime runs alone in one process, where the bench measured them
    report["batches"]["1"]["inProcess"] = {
        "separateCpuMsPerPair": 0.08,
        "sharedCpuMsPerPair": 0.08,
        "ratio": 1.0,
    }
    report["batches"]["16"]["inProcess"] = {
        "separateCpuMsPerPair": 0.4,
        "sharedCpuMsPerPair": 0.2,
        "ratio": 0.5,
    }
    assert rn.trunks_goal(report).endswith(
        " The same onnxruntime runs alone in one process (no HTTP, no other process between "
        "calls; separate / shared CPU ms per pair): 1.000x at 1 (0.080 / 0.080 ms), 0.500x at "
        "16 (0.400 / 0.200 ms) (met at 16)."
    )
    table = rn.trunks_table(report).splitlines()
    assert table[2] == (
        "| 1 | 1,000 / 500 | 0.500 | 0.100 / 0.200 | 2.000 | 0.200 / 0.300 | 1.500 "
        "| 1.00 / 3.00 | 3.000 |"
    )
    assert table[-1].startswith("2026-12-02, 400 pairs of requests x 3 rounds (medians)")
    assert "answers identical to each application's full model (largest difference 0)" in table[-1]


# ---------------------------------------------------------------------------
# Against the real control plane: preparation Jobs check the claim


def _prepared_condition(ns: Namespace, name: str, status: str) -> Any:
    def holds() -> Any:
        obj = get(ns, "dnnm", name)
        cond = condition(obj, "Prepared")
        generation = (obj or {}).get("metadata", {}).get("generation")
        return cond.get("observedGeneration") == generation and cond.get("status") == status and obj

    return wait_for(f"DNNModel {name} Prepared={status}", holds, 300)


@pytest.mark.cluster
@pytest.mark.slow
def test_the_preparation_verifies_a_declared_trunk(ns: Namespace, operator: Any) -> None:
    sources = {}
    for task in trunks.TASKS:
        path = trunks.digits_head(task)
        ns.kubectl("create", "configmap", f"{task}-onnx", f"--from-file=model.onnx={path}")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        sources[task] = {"uri": f"configmap://{task}-onnx/model.onnx", "sha256": digest}
    gemm = "/classifier/classifier.1/Gemm_output_0"
    apply(
        ns,
        # applied first: waits for its base, which is applied after it
        dnn_model(
            "digits-parity",
            sources["parity"],
            base={"modelRef": {"name": "digits"}, "sharedUpTo": trunks.TRUNK_TENSOR},
        ),
        # claims more than it shares: its first Gemm was trained anew
        dnn_model(
            "digits-tercile",
            sources["tercile"],
            base={"modelRef": {"name": "digits"}, "sharedUpTo": gemm},
        ),
    )

    def waiting() -> Any:
        cond = condition(get(ns, "dnnm", "digits-parity"), "Prepared")
        return cond.get("reason") == "WaitingForBase" and cond

    cond = wait_for("digits-parity waiting for its base", waiting, 300)
    assert cond["message"] == "spec.base.modelRef.name: waiting for DNNModel digits (not found)"
    apply(ns, dnn_model("digits", {"zoo": "digits_cnn"}))
    base = _prepared_condition(ns, "digits", "True")
    parity = _prepared_condition(ns, "digits-parity", "True")
    base_profile = next(p for p in base["status"]["profiles"] if p["variant"] == "fp32")
    at = [c["tensors"] for c in base_profile["cuts"]].index([trunks.TRUNK_TENSOR])
    trunk = parity["status"]["trunk"]
    assert trunk["model"] == "digits"
    assert trunk["sharedUpTo"] == trunks.TRUNK_TENSOR
    assert trunk["baseTensor"] == trunks.TRUNK_TENSOR
    assert trunk["digest"] == base_profile["prefixDigests"][at]
    assert trunk["baseArtifact"] == base_profile["artifact"]
    assert trunk["trunkFlops"] > 4 * trunk["headFlops"] > 0
    assert "shares DNNModel digits's trunk" in condition(parity, "Prepared")["message"]
    tercile = _prepared_condition(ns, "digits-tercile", "False")
    cond = condition(tercile, "Prepared")
    assert cond["reason"] == "BaseMismatch"
    assert cond["message"].startswith(
        f"spec.base: this model's graph up to '{gemm}' is not the graph of DNNModel digits "
        "up to any of its cuts"
    )
    assert "trunk" not in tercile["status"]
