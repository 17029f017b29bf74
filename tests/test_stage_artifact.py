"""Stage pods load exactly the planned artefact, without a cluster: a user's ONNX model
(built with onnx.helper) is prepared into a pvc:// destination, the operator's planning
names the artefact in the plan, and the stage pods' own commands (`edgeai fetch` in the
init container, then `edgeai run-stage --model-file`), taken from the objects the
builders make, run as processes on loopback and answer OIP v2 requests."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from _cluster_support import json_infer_body
from _worker_support import Worker, free_port, run_onnx, wait_ready
from edgeai_operator import builders
from edgeai_operator.builders import DeploymentOptions, Owner, build_children
from edgeai_operator.deployspec import parse_deployment
from edgeai_operator.files import file_sha256
from edgeai_operator.modelspec import InputSpec
from edgeai_operator.plandoc import PlanDocument
from edgeai_operator.planning import NodeState, plan_zones
from edgeai_operator.prepare import ArtifactRef, PrepareRequest, PrepareResult, prepare
from edgeai_operator.topology import NodeSpec

OWNER = Owner(name="net", namespace="default", uid="u-1")
INPUT = InputSpec("x", (1, 4096), "FP32")


def user_model() -> bytes:
    """MatMul(4096x4) -> Relu -> MatMul(4x256) -> Relu -> MatMul(256x256) -> Relu ->
    MatMul(256x3), fixed random weights: a wide input the first layer shrinks, then the
    heavy layers."""
    rng = np.random.default_rng(11)
    shapes = {"w1": (4096, 4), "w2": (4, 256), "w3": (256, 256), "w4": (256, 3)}
    weights = [
        numpy_helper.from_array(
            (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32), name
        )
        for name, shape in shapes.items()
    ]
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h1"]),
            helper.make_node("Relu", ["h1"], ["r1"]),
            helper.make_node("MatMul", ["r1", "w2"], ["h2"]),
            helper.make_node("Relu", ["h2"], ["r2"]),
            helper.make_node("MatMul", ["r2", "w3"], ["h3"]),
            helper.make_node("Relu", ["h3"], ["r3"]),
            helper.make_node("MatMul", ["r3", "w4"], ["y"]),
        ],
        "user_chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4096])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        weights,
    )
    # IR version 10: what the installed onnxruntime reads (onnx.helper writes newer)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.checker.check_model(model)
    serialized: bytes = model.SerializeToString()
    return serialized


def _node(name: str, tier: str, gflops: float, mbps: float | None) -> NodeState:
    labels = {"edgeai.dev/tier": tier, "topology.kubernetes.io/zone": "zone-a"}
    spec = NodeSpec(name, tier, "zone-a", {}, gflops, mbps, 1.0, None, labels)
    return NodeState(spec, ready=True, schedulable=True)


# A slow device with a slow uplink: the raw input costs too much to send and the heavy
# layers too much to run on the device, so the plan splits the model after its first
# layer (each stage cuts its partition from the artefact).
NODES = [_node("phone", "device", 0.01, 1.0), _node("gateway", "edge", 200.0, None)]


def _edgeai(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeai_operator.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, PrepareResult]:
    """(the user's original file, the pvc root, the preparation's result)."""
    root = tmp_path_factory.mktemp("artefact")
    pvc_root = root / "pvc"
    (pvc_root / "uploads").mkdir(parents=True)
    original = pvc_root / "uploads" / "net.onnx"
    original.write_bytes(user_model())
    request = PrepareRequest(
        source_uri="pvc://uploads/net.onnx",
        inputs=(INPUT,),
        artifacts_uri="pvc://models/prepared",
    )
    result = prepare(request, root / "work", pvc_root=pvc_root)
    assert result.variant("fp32").ready, result.variant("fp32").message
    return original, pvc_root, result


def _artifact(result: PrepareResult) -> ArtifactRef:
    artifact = result.variant("fp32").artifact
    assert artifact is not None
    return artifact


def _plan(result: PrepareResult) -> PlanDocument:
    """The zone's plan as the operator makes it from the variant's profile, which the
    operator copies into DNNModel.status.profiles[] with the artefact beside it."""
    fp32 = result.variant("fp32")
    assert fp32.profile is not None
    assert fp32.artifact is not None
    profile = {**fp32.profile, "artifact": fp32.artifact.to_dict(), "build": fp32.kind}
    body = {
        "apiVersion": "edgeai.dev/v1alpha1",
        "kind": "DNNDeployment",
        "metadata": {"name": "net", "namespace": "default"},
        "spec": {"modelRef": {"name": "net"}, "placement": {"tiers": ["device", "edge"]}},
    }
    return plan_zones(parse_deployment(body), [profile], NODES).plans["zone-a"]


def _pods(plan: PlanDocument, transport: str = "http") -> list[dict[str, Any]]:
    """The pod specs of the zone's stage workloads, in stage order."""
    children = build_children(OWNER, {"zone-a": plan}, {}, DeploymentOptions(transport=transport))
    pods = [
        c["spec"]["template"]["spec"] for c in children if c["kind"] in ("Deployment", "DaemonSet")
    ]

    def stage(pod: dict[str, Any]) -> int:
        args = pod["containers"][0]["args"]
        return int(next(a for a in args if a.startswith("--stage=")).removeprefix("--stage="))

    return sorted(pods, key=stage)


class _PodPaths:
    """A pod's mount paths as local directories, as a kubelet would mount them."""

    def __init__(self, pod_dir: Path, plan_yaml: str, pvc_root: Path) -> None:
        (pod_dir / "plan").mkdir(parents=True, exist_ok=True)
        (pod_dir / "plan" / "plan-zone-a.yaml").write_text(plan_yaml)
        self.mounts = {
            "/etc/edgeai": pod_dir / "plan",
            builders.MODEL_DIR: pod_dir / "model",
            builders.PVC_ROOT: pvc_root,
        }

    def local(self, args: list[str]) -> list[str]:
        out = []
        for arg in args:
            for mount, path in self.mounts.items():
                arg = arg.replace(f"={mount}", f"={path}", 1)
            out.append(arg)
        return out


def _run_stages(
    tmp_path: Path,
    plan: PlanDocument,
    pvc_root: Path,
    workers: list[Worker],
    transport: str = "http",
    grpc_targets: list[str] | None = None,
) -> str:
    """Runs each stage pod's init container, then its worker, last stage first (each
    forwards to the next one's URL, over gRPC where the pod's `--next` says so);
    returns the entry's URL. The gRPC address of each pod that serves gRPC is appended
    to `grpc_targets`."""
    plan_yaml = yaml.safe_dump(plan.to_dict(), sort_keys=False)
    next_url: str | None = None
    next_grpc: str | None = None
    for i, pod in reversed(list(enumerate(_pods(plan, transport)))):
        paths = _PodPaths(tmp_path / f"pod{i}", plan_yaml, pvc_root)
        for init in pod.get("initContainers", []):
            assert init["command"] == ["edgeai"]
            fetched = _edgeai(*paths.local(init["args"]))
            assert fetched.returncode == 0, fetched.stderr
        port = free_port()
        grpc_port = free_port()
        serves_grpc = False
        args = []
        for arg in paths.local(pod["containers"][0]["args"]):
            flag, _, value = arg.partition("=")
            if flag == "--port":
                arg = f"--port={port}"
            elif flag == "--host":
                arg = "--host=127.0.0.1"
            elif flag == "--grpc-port":
                arg = f"--grpc-port={grpc_port}"
                serves_grpc = True
            elif flag == "--next" and value.startswith("grpc://"):
                assert next_grpc is not None
                arg = f"--next=grpc://{next_grpc}"
            elif flag == "--next":
                assert next_url is not None
                arg = f"--next={next_url}"
            args.append(arg)
        log = tmp_path / f"pod{i}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "edgeai_operator.cli", *args, f"--workdir={tmp_path}/w{i}"],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        worker = Worker(process, f"http://127.0.0.1:{port}", log)
        workers.append(worker)
        wait_ready(worker.url, process, timeout_s=120)
        next_url = worker.url
        next_grpc = f"127.0.0.1:{grpc_port}" if serves_grpc else None
        if serves_grpc and grpc_targets is not None:
            grpc_targets.append(next_grpc)
    assert next_url is not None
    return next_url


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


def test_stage_pods_serve_the_prepared_artefact(
    tmp_path: Path, prepared: tuple[Path, Path, PrepareResult]
) -> None:
    original, pvc_root, result = prepared
    artifact = _artifact(result)
    plan = _plan(result)
    assert plan.split == "device:0 > edge:1-6"
    assert (plan.model.uri, plan.model.digest) == (artifact.uri, artifact.digest)
    assert plan.model.zoo is None
    pods = _pods(plan)
    # every pod that runs layers fetches the artefact; an entry that only forwards does not
    assert [bool(p.get("initContainers")) for p in pods] == [
        not any(a == "--stage=-1" for a in p["containers"][0]["args"]) for p in pods
    ]
    workers: list[Worker] = []
    try:
        entry = _run_stages(tmp_path, plan, pvc_root, workers)
        x = np.random.default_rng(3).standard_normal(INPUT.shape).astype(np.float32)
        request = urllib.request.Request(
            f"{entry}/v2/models/{plan.model.name}/infer",
            data=json_infer_body(x, "x"),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as resp:
            (out,) = json.loads(resp.read())["outputs"]
        expected = run_onnx(original, {"x": x})[0]
        got = np.array(out["data"], np.float32).reshape(out["shape"])
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
        for worker in workers:
            meta = _get(f"{worker.url}/v2/models/{plan.model.name}")
            assert meta["parameters"]["digest"] == artifact.digest
            assert meta["parameters"]["variant"] == "fp32"
            assert meta["parameters"]["uri"] == artifact.uri
    finally:
        for worker in workers:
            worker.stop()


def test_a_tampered_artefact_is_refused_and_never_served(
    tmp_path: Path, prepared: tuple[Path, Path, PrepareResult]
) -> None:
    _, pvc_root, result = prepared
    plan = _plan(result)
    pod = next(p for p in _pods(plan) if p.get("initContainers"))
    paths = _PodPaths(tmp_path / "pod", yaml.safe_dump(plan.to_dict()), pvc_root)
    fetched = _edgeai(*paths.local(pod["initContainers"][0]["args"]))
    assert fetched.returncode == 0, fetched.stderr
    model_file = tmp_path / "pod" / "model" / builders.MODEL_FILE_NAME
    assert json.loads(fetched.stdout)["path"] == str(model_file)
    assert file_sha256(model_file) == plan.model.digest
    data = bytearray(model_file.read_bytes())
    data[len(data) // 2] ^= 0x01
    model_file.write_bytes(bytes(data))
    tampered = file_sha256(model_file)
    worker_args = [
        a for a in paths.local(pod["containers"][0]["args"]) if not a.startswith("--next")
    ]
    port = free_port()
    refused = _edgeai(*worker_args, f"--port={port}", f"--workdir={tmp_path}/w")
    assert refused.returncode == 2
    assert str(model_file) in refused.stderr
    assert tampered in refused.stderr
    assert str(plan.model.digest) in refused.stderr
    assert "--model-file" in refused.stderr
    assert "refusing to serve" in refused.stderr
    # the same plan without the fetched file: run-stage says which option it needs
    without = [a for a in worker_args if not a.startswith("--model-file")]
    missing = _edgeai(*without, f"--port={port}", f"--workdir={tmp_path}/w")
    assert missing.returncode == 2
    assert "--model-file" in missing.stderr
    assert str(plan.model.uri) in missing.stderr


def test_fetch_names_the_file_as_asked(
    tmp_path: Path, prepared: tuple[Path, Path, PrepareResult]
) -> None:
    _, pvc_root, result = prepared
    artifact = _artifact(result)
    base = ["fetch", artifact.uri, f"--sha256={artifact.digest[7:]}", f"--pvc-root={pvc_root}"]
    default = _edgeai(*base, f"--out={tmp_path / 'a'}")
    assert default.returncode == 0, default.stderr
    # without --file-name the file keeps the artefact's own name
    assert Path(json.loads(default.stdout)["path"]).name == artifact.uri.rsplit("/", 1)[-1]
    named = _edgeai(*base, f"--out={tmp_path / 'b'}", "--file-name=model.onnx")
    assert named.returncode == 0, named.stderr
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["model.onnx"]
    assert file_sha256(tmp_path / "b" / "model.onnx") == artifact.digest
    bad = _edgeai(*base, f"--out={tmp_path / 'c'}", "--file-name=../model.onnx")
    assert bad.returncode == 2
    assert "--file-name: '../model.onnx' is not a file name" in bad.stderr


def test_stage_pods_of_a_grpc_deployment_serve_grpc(
    tmp_path: Path, prepared: tuple[Path, Path, PrepareResult]
) -> None:
    """spec.placement.transport: grpc: the pods' own commands serve the protocol over
    gRPC as well (`edgeai run-stage --grpc-port`); the device entry still forwards over
    HTTP."""
    import grpc

    from edgeai_worker import grpc_predict_v2_pb2 as pb

    original, pvc_root, result = prepared
    plan = _plan(result)
    workers: list[Worker] = []
    targets: list[str] = []
    try:
        entry = _run_stages(tmp_path, plan, pvc_root, workers, "grpc", targets)
        assert len(targets) == len(workers)
        x = np.random.default_rng(4).standard_normal(INPUT.shape).astype(np.float32)
        expected = run_onnx(original, {"x": x})[0]
        request = pb.ModelInferRequest(model_name=plan.model.name)
        request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
        request.raw_input_contents.append(x.tobytes())
        entry_target = targets[-1]  # started last: the device entry
        with grpc.insecure_channel(entry_target) as channel:
            infer = channel.unary_unary(
                "/inference.GRPCInferenceService/ModelInfer",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=pb.ModelInferResponse.FromString,
            )
            reply = infer(request, timeout=60)
        got = np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(
            reply.outputs[0].shape
        )
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
        assert entry.startswith("http://")
    finally:
        for worker in workers:
            worker.stop()
