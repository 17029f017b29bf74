"""Preparing models and what stage pods fetch, on the real control plane.

    python bench/models/run.py [--out docs/results/models.json]

Starts a local cluster (kwok nodes from hack/topology.yaml, the preparation pods run
as real processes), a real OCI registry and a real HTTP server on loopback, and the
operator. Then, measured in one run:
- for each DNNModel (a user's file over http and the same from oci with an int8
  variant; the zoo's digits_cnn with all four variant kinds): the time from
  `kubectl apply` to `Prepared=True`, and how many variants became ready;
- for a device -> edge deployment of each: every stage pod's init container is run
  from its exact command (`edgeai fetch ...`) and the bytes it wrote counted, and the
  partition files the pod's stage cuts from that artefact (`edgeai run-stage`'s
  `stage_settings`) are summed: whole artefact fetched vs the layers the stage runs.

Writes JSON (`--out`, default `docs/results/models.json`, rendered into the README by
`make docs-numbers`).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

from edgeai_operator import oci
from edgeai_operator.localcluster import DEFAULT_TOPOLOGY, REPO_ROOT, LocalCluster, free_port
from edgeai_operator.localregistry import LocalRegistry, registry_binary
from edgeai_operator.partitions import load_plan, stage_settings
from edgeai_operator.topology import load_topology

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the renderer beside the benches
import render_numbers

DEVICE = "device-zone-a-0"
PREPARE_TIMEOUT_S = 600.0


class _QuietFiles(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def serve_directory(root: Path) -> tuple[ThreadingHTTPServer, str]:
    """A real HTTP server on loopback serving the files under `root`."""
    server = ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietFiles, directory=str(root))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def wait(what: str, check: Callable[[], Any], timeout_s: float, last: Any = None) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.5)
    raise SystemExit(f"timed out after {timeout_s:.0f}s waiting for {what} (last seen: {last})")


def get(cluster: LocalCluster, ns: str, *what: str) -> Any:
    out = cluster.kubectl("get", "-n", ns, *what, "-o", "json", check=False)
    return json.loads(out) if out else None


def condition(obj: Any, type_: str) -> dict[str, Any]:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return dict(cond)
    return {}


def apply(cluster: LocalCluster, ns: str, *objs: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", ns, "-f", "-", input_text=yaml.safe_dump_all(objs))


def dnn_model(name: str, source: dict[str, Any], inputs: dict[str, Any], **spec: Any) -> Any:
    return {
        "apiVersion": "edgeai.dev/v1alpha1",
        "kind": "DNNModel",
        "metadata": {"name": name},
        "spec": {"source": source, "input": inputs, **spec},
    }


def deployment(name: str, model: str, min_accuracy: float | None) -> dict[str, Any]:
    """Raw input stays on the (slow) device: the device runs a prefix, the edge the rest."""
    slo: dict[str, Any] = {"latencyP95Ms": 500}
    if min_accuracy is not None:
        slo["minAccuracy"] = min_accuracy
    return {
        "apiVersion": "edgeai.dev/v1alpha1",
        "kind": "DNNDeployment",
        "metadata": {"name": name},
        "spec": {
            "modelRef": {"name": model},
            "slo": slo,
            "devices": {"nodeSelector": {"kubernetes.io/hostname": DEVICE}},
            "placement": {"tiers": ["device", "edge"]},
            "privacy": {"rawInputStaysOnDevice": True},
            "autoscaling": {"minReplicas": 1, "maxReplicas": 1},
        },
    }


def prepare_time(cluster: LocalCluster, ns: str, model: dict[str, Any]) -> dict[str, Any]:
    name = model["metadata"]["name"]
    started = time.monotonic()
    apply(cluster, ns, model)

    def prepared() -> Any:
        obj = get(cluster, ns, "dnnm", name)
        cond = condition(obj, "Prepared")
        generation = (obj or {}).get("metadata", {}).get("generation")
        done = cond.get("status") == "True" and cond.get("observedGeneration") == generation
        return done and obj

    obj = wait(f"DNNModel {name} Prepared", prepared, PREPARE_TIMEOUT_S)
    elapsed = time.monotonic() - started
    status = obj["status"]
    variants = status.get("variants") or []
    row = {
        "model": name,
        "source": model["spec"]["source"].get("uri") or f"zoo://{model['spec']['source']['zoo']}",
        "variantsRequested": 1 + len(model["spec"].get("variants") or []),
        "variantsReady": sum(1 for v in variants if v.get("ready")),
        "applyToPreparedS": round(elapsed, 2),
        "artifactBytes": {a["variant"]: a["sizeBytes"] for a in status.get("artifacts") or []},
    }
    print(
        f"{name}: {row['variantsReady']}/{row['variantsRequested']} variants ready, "
        f"apply -> Prepared {elapsed:.1f}s",
        flush=True,
    )
    return row


def _arg(args: list[str], flag: str) -> str:
    return next(a.split("=", 1)[1] for a in args if a.startswith(f"{flag}="))


def pod_bytes(cluster: LocalCluster, ns: str, pod: dict[str, Any], work: Path) -> dict[str, Any]:
    """Runs the pod's init container (`edgeai fetch ...`, its exact args with the model
    emptyDir made local) and cuts its stage's partitions from what it wrote."""
    name = pod["metadata"]["name"]
    local = work / name
    (local / "model").mkdir(parents=True)
    (local / "partitions").mkdir()
    main = pod["spec"]["containers"][0]
    stage = int(_arg(main["args"], "--stage"))
    fetched_bytes = 0
    model_path = None
    for init in pod["spec"].get("initContainers") or []:
        out_dir = _arg(init["args"], "--out")
        args = [a.replace(out_dir, str(local / "model")) for a in init["args"]]
        subprocess.run(
            [sys.executable, "-m", "edgeai_operator.cli", *args],
            check=True,
            capture_output=True,
            env={**os.environ, "KUBECONFIG": str(cluster.kubeconfig)},
        )
        fetched_bytes = sum(f.stat().st_size for f in (local / "model").iterdir())
        model_path = local / "model" / Path(_arg(main["args"], "--model-file")).name
    plan_volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "plan")
    plan_key = Path(_arg(main["args"], "--plan")).name
    plan_text = get(cluster, ns, "configmap", plan_volume["configMap"]["name"])["data"][plan_key]
    plan_path = local / plan_key
    plan_path.write_text(plan_text)
    plan = load_plan(plan_path, "--plan")
    settings = stage_settings(
        plan,
        stage,
        plan_path=plan_path,
        workdir=local / "partitions",
        host="127.0.0.1",
        port=0,
        model_path=model_path,
    )
    partition_bytes = sum(Path(p).stat().st_size for p in settings["partitions"])
    row = {
        "deployment": pod["metadata"]["labels"]["edgeai.dev/deployment"],
        "tier": settings["tier"],
        "stage": stage,
        "variant": plan.model.variant or "fp32",
        "fetchedBytes": fetched_bytes,
        "partitionBytes": partition_bytes,
        "partitions": len(settings["partitions"]),
    }
    print(
        f"  pod {name} ({row['tier']}, stage {stage}, {row['variant']}): fetched "
        f"{fetched_bytes} B, its {row['partitions']} partition file(s) {partition_bytes} B",
        flush=True,
    )
    return row


def deployment_pods(
    cluster: LocalCluster, ns: str, model: str, min_accuracy: float | None, work: Path
) -> list[Any]:
    name = f"{model}-app"
    apply(cluster, ns, deployment(name, model, min_accuracy))

    last: dict[str, Any] = {}

    def split() -> Any:
        obj = get(cluster, ns, "dnnd", name)
        last["status"] = (obj or {}).get("status")
        text = ((obj or {}).get("status") or {}).get("split", "")
        ok = condition(obj, "Available").get("status") == "True"
        return ok and "device" in text and "edge" in text and obj

    obj = wait(f"{name}: a device and an edge stage", split, 300, last)
    print(f"{name}: split {obj['status']['split']}", flush=True)
    pods = get(cluster, ns, "pods", "-l", f"edgeai.dev/deployment={name}")["items"]
    return [pod_bytes(cluster, ns, p, work) for p in pods if p["spec"].get("initContainers")]


def user_model() -> Path:
    """A user's file: MobileNetV2 as exported once from torch (random weights; only its
    graph and size matter here)."""
    from edgeai_worker import zoo

    return zoo.export_onnx("mobilenet_v2", trained=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    render_numbers.add_result_arguments(parser, "models.json")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix="edgeai-bench-models-"))
    started = time.monotonic()
    cluster = LocalCluster(work / "cluster")
    registry = LocalRegistry(work / "registry", registry_binary())
    operator: subprocess.Popen[bytes] | None = None
    files = work / "files"
    files.mkdir()
    try:
        cluster.start(load_topology(DEFAULT_TOPOLOGY))
        registry.start()
        for crd in sorted((REPO_ROOT / "crds").glob("*.yaml")):
            cluster.kubectl("apply", "--server-side", "-f", str(crd))
        cluster.kubectl("wait", "--for=condition=Established", "crd", "--all")
        operator = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "edgeai_operator.cli",
                "operator",
                f"--metrics-port={free_port()}",
            ],
            stdout=(work / "operator.log").open("wb"),
            stderr=subprocess.STDOUT,
            env={
                **os.environ,
                "KUBECONFIG": str(cluster.operator_kubeconfig),
                "EDGEAI_PROFILE_POLL_SECONDS": "1",
                "EDGEAI_ARTIFACTS_URI": f"oci://{registry.address}/edgeai-models",
            },
            start_new_session=True,
        )
        ns = "bench"
        cluster.kubectl("create", "namespace", ns)
        wait("service account", lambda: get(cluster, ns, "serviceaccount", "default"), 60)
        cluster.kubectl("annotate", "--overwrite", "node", DEVICE, "edgeai.dev/gflops=0.005")
        cluster.kubectl("annotate", "--overwrite", "node", DEVICE, "edgeai.dev/uplink-mbps=300")

        source = user_model()
        (files / "mobilenet.onnx").write_bytes(source.read_bytes())
        digest = hashlib.sha256(source.read_bytes()).hexdigest()
        server, base_url = serve_directory(files)
        oci_uri = f"oci://{registry.address}/users/mobilenet:v1"
        oci.push(source, oci_uri)
        image = {"name": "input", "shape": [1, 3, 224, 224], "dtype": "FP32"}
        int8 = [{"name": "int8", "quantize": {"mode": "dynamic"}}]
        models = [
            dnn_model(
                "mobilenet-http",
                {"uri": f"{base_url}/mobilenet.onnx", "sha256": digest},
                image,
                variants=int8,
            ),
            dnn_model("mobilenet-oci", {"uri": oci_uri}, image, variants=int8),
            dnn_model(
                "digits",
                {"zoo": "digits_cnn"},
                {"name": "input", "shape": [1, 1, 8, 8], "dtype": "FP32"},
                variants=[
                    {"name": "int8-static", "quantize": {"mode": "static"}},
                    {"name": "int8-dynamic", "quantize": {"mode": "dynamic"}},
                    {"name": "pruned", "prune": {"sparsity": 0.5}},
                    {"name": "small", "distill": {}},
                ],
            ),
        ]
        prepared = [prepare_time(cluster, ns, m) for m in models]
        pods: list[Any] = []
        # digits under a minAccuracy its distilled student misses: int8 splits
        for model, floor in (("mobilenet-http", None), ("digits", 0.97)):
            pods += deployment_pods(cluster, ns, model, floor, work / "pods")
        server.shutdown()
    finally:
        if operator is not None:
            os.killpg(operator.pid, signal.SIGTERM)
            operator.wait(timeout=30)
        registry.stop()
        cluster.stop()
    report = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "command": "python bench/models/run.py",
        "cpus": os.cpu_count(),
        "conditions": args.conditions,
        "elapsedS": round(time.monotonic() - started, 1),
        "models": prepared,
        "pods": pods,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
