"""`make e2e-kind`: the operator and its stage pods as real pods on the kind cluster.

    python hack/kind/e2e.py [--out docs/results/e2e-kind.json] [--conditions TEXT]
                            [--keep-cluster] [--cold-build-times FILE]

In order, each step timed and recorded (a step that fails is recorded with its error and
the run goes on where the later steps do not depend on it; the exit status is 1 when any
step failed):

 1. build: hack/kind/host.sh, hack/images/build.sh, hack/kind/node-image.sh (each
    reuses what is cached), then hack/kind/up.sh (kind create cluster, annotations,
    images loaded); image sizes;
 2. links: hack/kind/links.py shapes device -> edge and edge -> cloud with tc to the
    nodes' declared uplinks and measures each link's throughput;
 3. helm install of charts/edgeai-operator (images never pulled, artefacts on a
    hostPath volume every node shares); the operator's ServiceAccount must not be
    allowed everything;
 4. the samples of examples/ (digits): DNNModel Prepared, DNNDeployment Available;
 5. inference from this machine through `kubectl port-forward` to a zone-a device pod,
    OIP v2 JSON and binary, checked against onnxruntime run here on the very file the
    pods fetched; client latency p50/p95 and the status p95 (the pods' /metrics);
 6. a tighter SLO under load: replicas up; the SLO back and no load: replicas down;
 7. a link change: links.py shapes zone-a's device uplink down and writes the measured
    rate as `edgeai.dev/uplink-mbps-measured`; does the plan change;
 8. `docker stop` of zone-a's edge node under continuous traffic: requests lost and the
    time until requests are served again; the node is started again;
 9. a device node moved to zone-b: zone-a released, zone-b's DaemonSet covers it;
10. helm upgrade (a changed value reaches the operator pods);
11. delete the DNNDeployment and DNNModel: every child gone; helm uninstall: nothing of
    the release left (RBAC, Services, ConfigMaps, peering objects);
12. kind delete cluster (unless --keep-cluster).

Writes the measurements to --out (docs/results/e2e-kind.json, rendered into README.md by
bench/render_numbers.py).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import platform
import re
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CACHE = Path(os.environ.get("EDGEAI_CACHE", Path.home() / ".cache" / "edgeai"))
CLUSTER = os.environ.get("EDGEAI_KIND_CLUSTER", "edgeai")
KUBECONFIG = CACHE / f"kind-{CLUSTER}.kubeconfig"
K8S_BIN = CACHE / "k8s-v1.34.4" / "bin"
KIND = CACHE / "kind-v1.34.4" / "bin" / "kind"
ARTIFACTS_HOST = CACHE / f"kind-{CLUSTER}-artifacts"
ARTIFACTS_IN_NODE = "/mnt/edgeai-artifacts"
RELEASE = "edgeai-operator"
OPERATOR_NS = "edgeai-system"
NS = "edgeai-e2e"
SAMPLE = "digits-reader"  # examples/digits-deployment.yaml
LINK_MODEL, LINK_DEPLOYMENT = "alexnet", "alexnet-link"  # the link-change step's
# The sample with the device tier left out: on hack/topology.yaml the sample's own plan
# is device-only (digits is tiny), so this one carries the steps that need stage pods
# beyond the device (an edge stage, replaced by a cloud one when the edge node is lost).
DEPLOYMENT = "digits-offload"
MODEL = "digits"
WORKER_PORT = 8080
STAGE_TLS_PORT = 8443
IMAGES = ("edgeai-operator:0.1.0", "edgeai-worker:0.1.0", "edgeai/kind-node:v1.34.4")
TRAINER_IMAGE = "edgeai-trainer:0.1.0"
TRAINED = "digits-trained"  # the training step's DNNModel and DNNDeployment
TIER, ZONE = "edgeai.dev/tier", "topology.kubernetes.io/zone"


def log(message: str) -> None:
    print(
        f"[e2e-kind {datetime.now().strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True
    )


def run(*argv: str | Path, timeout: float = 600, check: bool = True, **kw: Any) -> str:
    done = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=timeout, check=False, **kw
    )
    if check and done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(map(str, argv))} -> {done.returncode}: {done.stderr[-2000:]}"
        )
    return str(done.stdout)


def kubectl(*args: str, timeout: float = 120, check: bool = True, **kw: Any) -> str:
    return run(
        K8S_BIN / "kubectl", f"--kubeconfig={KUBECONFIG}", *args, timeout=timeout, check=check, **kw
    )


def get(*args: str) -> Any:
    return json.loads(kubectl("get", *args, "-o", "json"))


def patch_deployment(name: str, patch: dict[str, Any], *, check: bool = True) -> None:
    """A merge patch of DNNDeployment `name` in the e2e namespace."""
    kubectl(
        "patch", "dnndeployment", name, "-n", NS, "--type=merge", "-p", json.dumps(patch),
        check=check,
    )  # fmt: skip


def operator_log(keep: Callable[[str], bool], tail: int, limit: int) -> str:
    """The last `limit` characters of the operator pods' lines (the last `tail` of each,
    prefixed with the pod) that `keep` selects; empty when the log cannot be read."""
    text = kubectl(
        "logs", "-n", OPERATOR_NS, "-l", f"app.kubernetes.io/instance={RELEASE}",
        f"--tail={tail}", "--prefix", check=False,
    )  # fmt: skip
    return "\n".join(line for line in text.splitlines() if keep(line))[-limit:]


def helm(*args: str, timeout: float = 600) -> str:
    return run(K8S_BIN / "helm", f"--kubeconfig={KUBECONFIG}", *args, timeout=timeout)


def wait_for(
    what: str, check: Callable[[], Any], timeout_s: float, every_s: float = 1.0
) -> tuple[Any, float]:
    """(first truthy result of `check`, seconds it took); raises naming `what` on timeout."""
    t0 = time.monotonic()
    last_error = ""
    while time.monotonic() - t0 < timeout_s:
        try:
            result = check()
        except Exception as error:
            result, last_error = None, str(error)[-300:]
        if result:
            return result, time.monotonic() - t0
        time.sleep(every_s)
    raise TimeoutError(f"{what}: not within {timeout_s:.0f} s {last_error}")


def condition(obj: dict[str, Any], type_: str) -> str | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return str(c.get("status"))
    return None


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


# --- OIP v2 client ------------------------------------------------------------------------


def digits_input(seed: int) -> list[float]:
    return [((seed * 31 + i * 7) % 17) / 16.0 for i in range(64)]


def infer_json(base: str, model: str, data: list[float], timeout: float = 10) -> list[float]:
    response = infer_json_response(base, model, data, timeout)
    return [float(v) for v in response["outputs"][0]["data"]]


def infer_json_response(
    base: str, model: str, data: list[float], timeout: float = 10
) -> dict[str, Any]:
    body = {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": data}]}
    request = urllib.request.Request(
        f"{base}/v2/models/{model}/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        parsed: dict[str, Any] = json.loads(response.read())
    return parsed


def infer_binary(base: str, model: str, data: list[float], timeout: float = 10) -> list[float]:
    """The binary extension: a JSON header then the raw FP32 bytes, binary outputs asked."""
    raw = struct.pack(f"<{len(data)}f", *data)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, 1, 8, 8],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    request = urllib.request.Request(
        f"{base}/v2/models/{model}/infer",
        data=header + raw,
        headers={
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(len(header)),
        },
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        length = int(response.headers["Inference-Header-Content-Length"])
        payload = response.read()
    out_header = json.loads(payload[:length])
    output = out_header["outputs"][0]
    size = int(output["parameters"]["binary_data_size"])
    blob = payload[length : length + size]
    if output["datatype"] != "FP32" or "data" in output:
        raise RuntimeError(f"expected a binary FP32 output, got {output}")
    return list(struct.unpack(f"<{size // 4}f", blob))


@contextlib.contextmanager
def port_forward(target: str, namespace: str) -> Iterator[str]:
    forward = subprocess.Popen(
        [
            str(K8S_BIN / "kubectl"),
            f"--kubeconfig={KUBECONFIG}",
            "-n",
            namespace,
            "port-forward",
            target,
            f":{WORKER_PORT}",
            "--address=127.0.0.1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert forward.stdout is not None
        line = forward.stdout.readline()
        match = re.search(r"127\.0\.0\.1:(\d+)", line)
        if not match:
            raise RuntimeError(
                f"port-forward {target}: {line} {forward.stderr.read() if forward.stderr else ''}"
            )
        yield f"http://127.0.0.1:{match.group(1)}"
    finally:
        forward.terminate()
        forward.wait(timeout=10)


PSS_LABEL = "pod-security.kubernetes.io/enforce"


def _privileged_pod_refused() -> str:
    """A privileged pod in the samples' namespace, dry-run on the server: the admission
    error that shows `restricted` is enforced (raises if the pod was admitted)."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "e2e-privileged", "namespace": NS},
        "spec": {
            "containers": [
                {
                    "name": "c",
                    "image": "edgeai-worker:0.1.0",
                    "securityContext": {"privileged": True},
                }
            ]
        },
    }
    try:
        kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(pod))
    except RuntimeError as err:  # kubectl's own error: "<command> -> <rc>: <stderr>"
        stderr = str(err).split(": ", 1)[-1].strip()
        if "violates PodSecurity" in stderr:
            return stderr.splitlines()[0][:200]
        raise RuntimeError(f"the privileged pod failed otherwise in {NS}: {stderr}") from err
    raise RuntimeError(f"a privileged pod was not refused in {NS}")


def entry_nodeport(deployment: str, zone: str) -> str:
    """A NodePort Service in front of a zone's device pods, reached from this machine at
    the zone's device node (on the `kind` bridge): unlike a port-forward, it follows the
    DaemonSet when the operator replaces its pods."""
    name = f"e2e-{deployment}-entry-{zone}"
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "type": "NodePort",
            "selector": {
                "edgeai.dev/deployment": deployment,
                "edgeai.dev/tier": "device",
                "edgeai.dev/zone": zone,
            },
            "ports": [{"port": WORKER_PORT, "targetPort": WORKER_PORT}],
        },
    }
    kubectl("apply", "-f", "-", input=json.dumps(service))
    port = get("service", name, "-n", NS)["spec"]["ports"][0]["nodePort"]
    node = get("node", _node("device", zone))
    ip = next(a["address"] for a in node["status"]["addresses"] if a["type"] == "InternalIP")
    base = f"http://{ip}:{port}"
    # A new Service's node port is refused until kube-proxy has written its rules: load
    # started before that would count the proxy's start-up as lost requests.
    wait_for(f"{name} answering at {base}", lambda: _ready(base), 60, 0.5)
    return base


def _ready(base: str) -> bool:
    with urllib.request.urlopen(f"{base}/v2/health/ready", timeout=5) as resp:
        return bool(resp.status == 200)


class Traffic:
    """Requests back to back from `workers` threads until stopped; every outcome kept."""

    def __init__(self, base: str, model: str, workers: int = 1, timeout_s: float = 5.0) -> None:
        self.base, self.model, self.workers, self.timeout_s = base, model, workers, timeout_s
        self.outcomes: list[tuple[float, float, bool]] = []  # (start, seconds, ok)
        # starts of the requests the device answered alone (parameters.edgeai_fallback)
        self.fallback_starts: set[float] = set()
        self.errors: list[tuple[float, str]] = []  # (start, what the client saw)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def _loop(self, index: int) -> None:
        seed = index * 100_000
        while not self._stop.is_set():
            seed += 1
            t0 = time.monotonic()
            fallback = False
            try:
                response = infer_json_response(
                    self.base, self.model, digits_input(seed), timeout=self.timeout_s
                )
                ok = len(response["outputs"][0]["data"]) > 0
                fallback = "edgeai_fallback" in response.get("parameters", {})
            except (OSError, urllib.error.URLError, ValueError, KeyError) as error:
                ok = False
                detail = error.read()[:300] if isinstance(error, urllib.error.HTTPError) else b""
                with self._lock:
                    self.errors.append((t0, f"{error!r} {detail.decode(errors='replace')}"[:400]))
            with self._lock:
                self.outcomes.append((t0, time.monotonic() - t0, ok))
                if fallback:
                    self.fallback_starts.add(t0)
            if not ok:
                time.sleep(0.2)

    def __enter__(self) -> Traffic:
        for i in range(self.workers):
            thread = threading.Thread(target=self._loop, args=(i,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.timeout_s + 5)

    def summary(self) -> dict[str, Any]:
        with self._lock:
            outcomes = list(self.outcomes)
            errors = sorted({error for _, error in self.errors})
        ok_ms = [s * 1000 for _, s, ok in outcomes if ok]
        return {
            "requests": len(outcomes),
            "failed": sum(1 for *_, ok in outcomes if not ok),
            "p50Ms": _round(percentile(ok_ms, 0.5)),
            "p95Ms": _round(percentile(ok_ms, 0.95)),
            "distinctErrors": errors[:5],  # what the client saw, up to 5 kinds
        }


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


# --- the run ------------------------------------------------------------------------------


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.report: dict[str, Any] = {
            "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "command": "make e2e-kind",
            "host": {"cpus": os.cpu_count(), "kernel": platform.release()},
            "conditions": args.conditions,
            "loadAverageAtStart": round(os.getloadavg()[0], 2),
            "steps": {},
            "failures": [],
        }
        self.t_start = time.monotonic()

    def step(self, name: str, fn: Callable[[], dict[str, Any]]) -> bool:
        log(f"step {name}")
        t0 = time.monotonic()
        entry: dict[str, Any]
        try:
            entry = {"ok": True, **fn()}
        except Exception as error:
            entry = {"ok": False, "error": f"{type(error).__name__}: {error}"[-1500:]}
            self.report["failures"].append(name)
            log(f"step {name} FAILED: {entry['error']}\n{traceback.format_exc()}")
        entry["seconds"] = round(time.monotonic() - t0, 1)
        self.report["steps"][name] = entry
        log(f"step {name}: {json.dumps(entry)[:600]}")
        self.save()
        return bool(entry["ok"])

    def save(self) -> None:
        self.report["elapsedS"] = round(time.monotonic() - self.t_start, 1)
        self.args.out.write_text(json.dumps(self.report, indent=2) + "\n")

    # 1 ------------------------------------------------------------------------------------
    def build(self) -> dict[str, Any]:
        python = sys.executable
        env = {**os.environ, "PYTHON": python}
        had = {image: _image_exists(image) for image in IMAGES}
        times: dict[str, float] = {}
        for name, argv in (
            ("host", [HERE / "host.sh"]),
            ("images", [REPO / "hack" / "images" / "build.sh"]),
            ("nodeImage", [HERE / "node-image.sh"]),
        ):
            t0 = time.monotonic()
            run(*argv, timeout=3600, env=env)
            times[name] = round(time.monotonic() - t0, 1)
        existed = bool(run(KIND, "get", "clusters", check=False).split().count(CLUSTER))
        t0 = time.monotonic()
        done = subprocess.run(
            [str(HERE / "up.sh")], capture_output=True, text=True, timeout=1800, env=env, check=True
        )
        times["up"] = round(time.monotonic() - t0, 1)
        for key, pattern in (
            ("kindCreate", r"kind create cluster took (\d+)s"),
            ("kindLoad", r"loaded .* into every node in (\d+)s"),
        ):
            match = re.search(pattern, done.stderr)
            if match:
                times[key] = float(match.group(1))
        sizes = {
            image: int(run("docker", "image", "inspect", "-f", "{{.Size}}", image))
            for image in IMAGES
        }
        result: dict[str, Any] = {
            "cache": "warm" if all(had.values()) else "cold",
            "clusterExisted": existed,
            "stepSeconds": times,
            "imageSizeBytes": sizes,
        }
        if self.args.cold_build_times:
            result["coldBuild"] = _read_times(self.args.cold_build_times)
        return result

    # 2 ------------------------------------------------------------------------------------
    def links(self) -> dict[str, Any]:
        base: list[str | Path] = [
            sys.executable,
            HERE / "links.py",
            KUBECONFIG,
            K8S_BIN / "kubectl",
        ]
        shaped = json.loads(run(*base, "shape"))
        for link in shaped:
            if (
                link["tcRateMbps"] is None
                or abs(link["tcRateMbps"] - link["mbps"]) > 0.05 * link["mbps"]
            ):
                raise RuntimeError(
                    f"tc on {link['node']} reports {link['tcRateMbps']}, wanted {link['mbps']}"
                )
        measured = json.loads(run(*base, "measure", "--bytes", "1500000", timeout=900))
        return {
            "links": [
                {**s, **{k: m[k] for k in ("measuredMbps",)}}
                for s, m in zip(shaped, measured, strict=True)
            ]
        }

    # 3 ------------------------------------------------------------------------------------
    def helm_install(self) -> dict[str, Any]:
        kubectl("create", "namespace", NS, check=False)
        # the API server itself holds every pod of the samples to the restricted standard
        kubectl("label", "namespace", NS, f"{PSS_LABEL}=restricted", "--overwrite")
        refused = _privileged_pod_refused()
        kubectl("apply", "-f", "-", input=_artifact_store())
        t0 = time.monotonic()
        helm(
            "install",
            RELEASE,
            str(REPO / "charts" / "edgeai-operator"),
            "--namespace",
            OPERATOR_NS,
            "--create-namespace",
            "--set",
            "image.pullPolicy=Never",
            "--set",
            "artifactsUri=pvc://edgeai-artifacts/models",
            "--wait",
            "--timeout",
            "5m",
        )
        helm_s = time.monotonic() - t0
        _, ready_s = wait_for("operator pods Ready", _operator_pods_ready, 300, 1)
        # Ready once is not enough (a container that exits at start-up is Running for a
        # moment): still Ready, with no restart, a while later.
        time.sleep(15)
        if not _operator_pods_ready():
            raise RuntimeError(f"operator pods not Ready 15 s after they were: {_operator_pods()}")
        pods = get("pods", "-n", OPERATOR_NS, "-l", f"app.kubernetes.io/instance={RELEASE}")[
            "items"
        ]
        accounts = sorted({p["spec"]["serviceAccountName"] for p in pods})
        phases = sorted({p["status"]["phase"] for p in pods})
        sa = f"system:serviceaccount:{OPERATOR_NS}:{RELEASE}"
        everything = kubectl(
            "auth", "can-i", "*", "*", "--all-namespaces", f"--as={sa}", check=False
        ).strip()
        # it reads a Secret by name (those it creates, those a spec names), never lists
        secrets = kubectl(
            "auth", "can-i", "list", "secrets", "-n", NS, f"--as={sa}", check=False
        ).strip()
        if accounts != [RELEASE] or phases != ["Running"] or everything != "no" or secrets != "no":
            raise RuntimeError(
                f"operator pods: accounts {accounts}, phases {phases}, can-i '*': {everything},"
                f" can-i list secrets: {secrets}"
            )
        return {
            "helmInstallS": round(helm_s, 1),
            "podsReadyS": round(helm_s + ready_s, 1),
            "securityContext": pods[0]["spec"].get("securityContext"),
            "operatorPods": len(pods),
            "serviceAccount": accounts[0],
            "canDoEverything": everything,
            "canListSecrets": secrets,
            "namespacePodSecurity": get("namespace", NS)["metadata"]["labels"][PSS_LABEL],
            "privilegedPodRefused": refused,
        }

    # 4 ------------------------------------------------------------------------------------
    def samples(self) -> dict[str, Any]:
        t0 = time.monotonic()
        for sample in ("digits-model.yaml", "digits-deployment.yaml"):
            kubectl("apply", "-n", NS, "-f", str(REPO / "examples" / sample))
        kubectl(
            "apply",
            "-n",
            NS,
            "-f",
            "-",
            input=deployment_manifest(DEPLOYMENT, ["edge", "cloud"], fallback="device"),
        )
        zoo_outcome = _zoo_source_outcome()
        if zoo_outcome["prepared"] is not True:
            # the worker image ships digits_cnn's files: the sample must prepare as it is
            raise RuntimeError(f"the sample's zoo source failed on the pods: {zoo_outcome}")
        _, prepared_s = wait_for(
            "DNNModel Prepared",
            lambda: condition(get("dnnmodel", MODEL, "-n", NS), "Prepared") == "True",
            600,
            2,
        )
        _, available_s = wait_for(
            "DNNDeployment Available",
            lambda: condition(get("dnndeployment", DEPLOYMENT, "-n", NS), "Available") == "True",
            600,
            2,
        )
        wait_for(
            "the sample DNNDeployment Available",
            lambda: condition(get("dnndeployment", SAMPLE, "-n", NS), "Available") == "True",
            300,
            2,
        )
        status = get("dnndeployment", DEPLOYMENT, "-n", NS)["status"]
        return {
            "zooSource": zoo_outcome,
            "source": get("dnnmodel", MODEL, "-n", NS)["spec"]["source"],
            "sampleSplit": get("dnndeployment", SAMPLE, "-n", NS)["status"].get("split"),
            "preparedS": round(prepared_s, 1),
            "availableS": round(time.monotonic() - t0, 1),
            "availableAfterPreparedS": round(available_s, 1),
            "split": status.get("split"),
            "plan": _plan_summary(status),
            "pods": _stage_pods(),
        }

    # 5 ------------------------------------------------------------------------------------
    def inference(self) -> dict[str, Any]:
        pod = _device_pod("zone-a")
        plan = _zone_plan("zone-a")
        model = plan["model"]["name"]
        with port_forward(f"pod/{pod}", NS) as base:
            first, first_s = wait_for(
                "first inference", lambda: infer_json(base, model, digits_input(1)), 120, 1
            )
            json_out = infer_json(base, model, digits_input(2))
            binary_out = infer_binary(base, model, digits_input(2))
            reference = _reference_output(plan, digits_input(2))
            if reference is not None:
                worst = max(abs(a - b) for a, b in zip(json_out, reference, strict=True))
                if worst > 1e-3:
                    raise RuntimeError(f"served output differs from onnxruntime here by {worst}")
            if max(abs(a - b) for a, b in zip(json_out, binary_out, strict=True)) > 1e-6:
                raise RuntimeError(f"JSON {json_out} and binary {binary_out} outputs differ")
            latencies = []
            for seed in range(200):
                t0 = time.monotonic()
                infer_json(base, model, digits_input(seed))
                latencies.append((time.monotonic() - t0) * 1000)
            binary_ms = []
            for seed in range(50):
                t0 = time.monotonic()
                infer_binary(base, model, digits_input(seed))
                binary_ms.append((time.monotonic() - t0) * 1000)
        observed, _ = wait_for(
            "status.observed.p95LatencyMs",
            lambda: (
                (get("dnndeployment", DEPLOYMENT, "-n", NS)["status"].get("observed") or {}).get(
                    "p95LatencyMs"
                )
                and get("dnndeployment", DEPLOYMENT, "-n", NS)["status"]["observed"]
            ),
            60,
            2,
        )
        slo = get("dnndeployment", DEPLOYMENT, "-n", NS)["spec"]["slo"]["latencyP95Ms"]
        return {
            "model": model,
            "devicePod": pod,
            "outputsAgree": True,
            "checkedAgainstOnnxruntime": reference is not None,
            "firstInferenceS": round(first_s, 2),
            "outputLength": len(first),
            "clientJson": {
                "requests": 200,
                "p50Ms": _round(percentile(latencies, 0.5)),
                "p95Ms": _round(percentile(latencies, 0.95)),
            },
            "clientBinary": {
                "requests": 50,
                "p50Ms": _round(percentile(binary_ms, 0.5)),
                "p95Ms": _round(percentile(binary_ms, 0.95)),
            },
            "statusObserved": observed,
            "sloP95Ms": slo,
        }

    # 5b -----------------------------------------------------------------------------------
    def network_policy(self) -> dict[str, Any]:
        """The operator's NetworkPolicies enforced (hack/kind/netpol in the CNI DaemonSet):
        a pod of the namespace that is no stage reaches the device entry (its pod
        address) but neither of
        the edge stage's ports (its data port is the device stage's, its HTTP port the
        operator's), while the device stage reaches the same data port."""
        edge = f"{DEPLOYMENT}-edge-zone-a"
        policies = sorted(
            p["metadata"]["name"]
            for p in get("networkpolicies", "-n", NS, "-l", f"edgeai.dev/deployment={DEPLOYMENT}")[
                "items"
            ]
        )
        if edge not in policies:
            raise RuntimeError(f"no NetworkPolicy {edge} among {policies}")
        device = _device_pod("zone-a")
        entry = get("pod", device, "-n", NS)["status"]["podIP"]  # the device stage's pod
        targets = [
            ["entry:8080", entry, WORKER_PORT],
            ["edge:8443", edge, STAGE_TLS_PORT],
            ["edge:8080", edge, WORKER_PORT],
        ]
        probe = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "e2e-netpol-probe", "namespace": NS},
            "spec": {
                "restartPolicy": "Never",
                "securityContext": {
                    "runAsNonRoot": True,
                    "runAsUser": 10001,
                    "seccompProfile": {"type": "RuntimeDefault"},
                },
                "containers": [
                    {
                        "name": "probe",
                        "image": "edgeai-worker:0.1.0",
                        "imagePullPolicy": "Never",
                        "command": ["python", "-c", CONNECT_PROBE, json.dumps(targets)],
                        "securityContext": {
                            "allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"]},
                        },
                    }
                ],
            },
        }
        kubectl("delete", "pod", "e2e-netpol-probe", "-n", NS, "--ignore-not-found", "--wait=true")
        kubectl("apply", "-f", "-", input=json.dumps(probe))
        try:
            wait_for(
                "the probe pod done",
                lambda: (
                    get("pod", "e2e-netpol-probe", "-n", NS)["status"].get("phase")
                    in ("Succeeded", "Failed")
                ),
                120,
                1,
            )
            logs = kubectl("logs", "e2e-netpol-probe", "-n", NS)
            seen = json.loads(logs.strip().splitlines()[-1])
        finally:
            kubectl("delete", "pod", "e2e-netpol-probe", "-n", NS, "--wait=false", check=False)
        from_device = json.loads(
            kubectl(
                "exec",
                "-n",
                NS,
                device,
                "--",
                "python",
                "-c",
                CONNECT_PROBE,
                json.dumps([["edge:8443", edge, STAGE_TLS_PORT]]),
            )
            .strip()
            .splitlines()[-1]
        )
        want = {"entry:8080": "connected", "edge:8443": "timeout", "edge:8080": "timeout"}
        if seen != want or from_device != {"edge:8443": "connected"}:
            raise RuntimeError(
                f"another pod saw {seen} (want {want}); the device stage saw {from_device}"
            )
        return {
            "policies": policies,
            "fromAnotherPod": seen,
            "fromTheDeviceStage": from_device,
        }

    # 6 ------------------------------------------------------------------------------------
    def scale(self) -> dict[str, Any]:
        before = _replicas()
        original = get("dnndeployment", DEPLOYMENT, "-n", NS)["spec"]
        tight = {
            "spec": {
                "slo": {"latencyP95Ms": 1},
                "autoscaling": {"stableWindowSeconds": 10, "scaleDownDelaySeconds": 10},
            }
        }
        model = _zone_plan("zone-a")["model"]["name"]
        result: dict[str, Any] = {"replicasBefore": before}
        device_pods = _device_pod_uids()
        base = entry_nodeport(DEPLOYMENT, "zone-a")
        with Traffic(base, model, workers=4) as load:
            patch_deployment(DEPLOYMENT, tight)
            try:
                up, up_s = wait_for(
                    "a scale-up", lambda: _scaled(before, _replicas(), up=True), 180, 2
                )
            except TimeoutError as error:
                # what the operator saw and what the clients got, for the report; the
                # SLO back as it was for the steps after this one
                try:
                    status = get("dnndeployment", DEPLOYMENT, "-n", NS).get("status") or {}
                    seen = json.dumps({k: status.get(k) for k in ("observed", "replicas")})
                except Exception as exc:  # the timeout is the finding; keep its message
                    seen = f"(not read: {exc})"
                said = operator_log(
                    lambda line: any(w in line for w in (DEPLOYMENT, "Traceback", "Error")),
                    tail=400,
                    limit=2500,
                )
                patch_deployment(DEPLOYMENT, {"spec": {"slo": original["slo"]}}, check=False)
                raise TimeoutError(
                    f"{error}; status {seen[:1500]}; load {load.summary()}; "
                    f"the operator's log on {DEPLOYMENT}:\n{said}"
                ) from None
            result.update(replicasUp=up, scaleUpS=round(up_s, 1), load=load.summary())
        # The new SLO keeps the split: the device pods keep running (a plan that only
        # records another SLO does not roll them), and no request fails while the edge
        # stage scales.
        result["devicePodsKept"] = _device_pod_uids() == device_pods
        restore = {
            "spec": {
                "slo": original["slo"],
                "autoscaling": {"stableWindowSeconds": 10, "scaleDownDelaySeconds": 10},
            }
        }
        patch_deployment(DEPLOYMENT, restore)
        peak = _replicas()

        def back_down() -> dict[str, int] | None:
            now = _replicas()
            scaled_down = _scaled(peak, now, up=False)
            at_most_before = all(count <= before.get(name, count) for name, count in now.items())
            return now if scaled_down and at_most_before else None

        down, down_s = wait_for("the scale-down to the replicas before", back_down, 300, 3)
        result.update(replicasPeak=peak, replicasDown=down, scaleDownS=round(down_s, 1))
        if not result["devicePodsKept"] or result["load"]["failed"]:
            raise RuntimeError(f"the SLO change disturbed serving: {result}")
        return result

    # 7 ------------------------------------------------------------------------------------
    def link_change(self) -> dict[str, Any]:
        """digits is too small for the link to matter (its input is 256 bytes), so this
        step deploys alexnet_like (a 602 KB input, 0.7 GFLOP) on every tier, then shapes
        zone-a's device link up to `fast_mbps` and back, measuring it each time as the
        operator sees it (`edgeai.dev/uplink-mbps-measured`), and waits for the replans."""
        device = _node("device", "zone-a")
        base: list[str | Path] = [
            sys.executable,
            HERE / "links.py",
            KUBECONFIG,
            K8S_BIN / "kubectl",
        ]
        model = {
            "apiVersion": "edgeai.dev/v1alpha1",
            "kind": "DNNModel",
            "metadata": {"name": LINK_MODEL, "namespace": NS},
            "spec": {
                "source": {"uri": zoo_file_uri("alexnet_like")},
                "input": {"name": "input", "shape": [1, 3, 224, 224], "dtype": "FP32"},
            },
        }
        deployment = {
            "apiVersion": "edgeai.dev/v1alpha1",
            "kind": "DNNDeployment",
            "metadata": {"name": LINK_DEPLOYMENT, "namespace": NS},
            "spec": {
                "modelRef": {"name": LINK_MODEL},
                "slo": {"latencyP95Ms": 2000},
                "devices": {"nodeSelector": {"app": "camera"}},
                "placement": {"tiers": ["device", "edge", "cloud"], "adaptiveSplit": False},
                "autoscaling": {"minReplicas": 1, "maxReplicas": 1},
            },
        }
        kubectl(
            "apply",
            "-f",
            "-",
            input=json.dumps({"kind": "List", "apiVersion": "v1", "items": [model, deployment]}),
        )
        try:
            _, available_s = wait_for(
                f"{LINK_DEPLOYMENT} Available",
                lambda: (
                    condition(get("dnndeployment", LINK_DEPLOYMENT, "-n", NS), "Available")
                    == "True"
                ),
                600,
                2,
            )
            declared = _zone_split(LINK_DEPLOYMENT, "zone-a")
            fast_mbps = 200.0
            run(*base, "shape", "--set", f"{device}={fast_mbps:g}")
            fast = json.loads(
                run(*base, "measure", "--annotate", "--node", device, "--bytes", "4000000")
            )[0]
            changed = self._replan(declared, lambda now: now != declared)
            # Back to the declared rate: drop the measurement and shape from the declaration.
            kubectl("annotate", "node", device, "edgeai.dev/uplink-mbps-measured-")
            run(*base, "shape")
            back = self._replan(
                changed["split"] if changed else declared, lambda now: now == declared
            )
            return {
                "model": "alexnet_like",
                "node": device,
                "availableS": round(available_s, 1),
                "declaredMbps": _node_uplink(device),
                "planDeclared": declared,
                "shapedMbps": fast_mbps,
                "measuredMbps": fast["measuredMbps"],
                "replanned": changed is not None,
                **(
                    {"replanS": changed["seconds"], "planAfter": changed["split"]}
                    if changed
                    else {}
                ),
                "backToDeclared": back is not None,
                **({"backS": back["seconds"]} if back else {}),
            }
        finally:
            kubectl(
                "delete", "dnndeployment", LINK_DEPLOYMENT, "-n", NS, "--timeout=120s", check=False
            )
            kubectl("delete", "dnnmodel", LINK_MODEL, "-n", NS, "--timeout=120s", check=False)

    @staticmethod
    def _replan(before: str, done: Callable[[str], bool]) -> dict[str, Any] | None:
        """zone-a's split once `done(split)` holds (within 120 s), or None."""
        try:
            split, seconds = wait_for(
                f"{LINK_DEPLOYMENT}'s zone-a plan to change from {before}",
                lambda: now if done(now := _zone_split(LINK_DEPLOYMENT, "zone-a")) else None,
                120,
                2,
            )
        except TimeoutError:
            return None
        return {"split": split, "seconds": round(seconds, 1)}

    # 8 ------------------------------------------------------------------------------------
    def edge_stop(self) -> dict[str, Any]:
        edge = _node("edge", "zone-a")
        model = _zone_plan("zone-a")["model"]["name"]
        base = entry_nodeport(DEPLOYMENT, "zone-a")
        with Traffic(base, model, workers=1, timeout_s=3) as traffic:
            time.sleep(5)
            t_stop = time.monotonic()
            run("docker", "stop", edge)
            stopped_s = time.monotonic() - t_stop

            t_down = time.monotonic()  # the node container has stopped

            def chain_again() -> tuple[float] | None:
                """(seconds from the node's stop to the first of 20 answers in a row from
                the chain, not from the device alone), once there are 20"""
                streak: list[float] = []
                for start, _, ok in [o for o in traffic.outcomes if o[0] >= t_down]:
                    by_chain = ok and start not in traffic.fallback_starts
                    streak = [*streak, start] if by_chain else []
                    if len(streak) >= 20:
                        return (streak[0] - t_down,)
                return None

            # the device answers alone (spec.placement.fallback: device) until the
            # operator has moved the edge stage and the chain answers again
            (chain_s,), _ = wait_for(
                "the chain serving again after the edge node stopped", chain_again, 300, 2
            )
            time.sleep(3)
            summary = traffic.summary()
            after_stop = [o for o in traffic.outcomes if o[0] >= t_stop]
            lost = sum(1 for _, _, ok in after_stop if not ok)
            last_failure = max((s for s, _, ok in after_stop if not ok), default=None)
            again = 0.0 if last_failure is None else last_failure - t_stop
            fallback_answers = sum(1 for s in traffic.fallback_starts if s >= t_stop)
        node_ready = condition(get("node", edge), "Ready")
        run("docker", "start", edge)
        wait_for(
            "the edge node Ready again",
            lambda: condition(get("node", edge), "Ready") == "True",
            180,
            3,
        )
        # A restarted node container has a new network namespace: shape its link again.
        run(sys.executable, HERE / "links.py", KUBECONFIG, K8S_BIN / "kubectl", "shape")
        return {
            "node": edge,
            "dockerStopS": round(stopped_s, 1),
            "lostRequests": lost,
            "servedAgainAfterS": _round(again, 1),
            "answeredByDeviceAlone": fallback_answers,
            "chainAgainAfterS": _round(chain_s, 1),
            "errors": [
                {"afterStopS": _round(start - t_stop, 1), "error": text}
                for start, text in traffic.errors
                if start >= t_stop
            ][:10],
            "traffic": summary,
            "nodeReadyWhenServedAgain": node_ready,
            "planAfter": _plan_summary(get("dnndeployment", DEPLOYMENT, "-n", NS)["status"]),
        }

    # 9 ------------------------------------------------------------------------------------
    def zone_move(self) -> dict[str, Any]:
        device = _node("device", "zone-a")
        kubectl("label", "node", device, f"{ZONE}=zone-b", "--overwrite")

        def moved() -> bool:
            names = {
                d["metadata"]["name"]: d
                for d in get("daemonsets", "-n", NS, "-l", f"edgeai.dev/deployment={DEPLOYMENT}")[
                    "items"
                ]
            }
            b = names.get(f"{DEPLOYMENT}-device-zone-b")
            return (
                f"{DEPLOYMENT}-device-zone-a" not in names
                and b is not None
                and b["status"].get("numberReady") == 2
            )

        _, moved_s = wait_for("the device in zone-b's DaemonSet, zone-a released", moved, 180, 2)
        kubectl("label", "node", device, f"{ZONE}=zone-a", "--overwrite")
        _, back_s = wait_for(
            "zone-a's DaemonSet back",
            lambda: any(
                d["metadata"]["name"] == f"{DEPLOYMENT}-device-zone-a"
                and d["status"].get("numberReady") == 1
                for d in get("daemonsets", "-n", NS)["items"]
            ),
            180,
            2,
        )
        return {"node": device, "movedS": round(moved_s, 1), "movedBackS": round(back_s, 1)}

    # 10 -----------------------------------------------------------------------------------
    def helm_upgrade(self) -> dict[str, Any]:
        t0 = time.monotonic()
        helm(
            "upgrade",
            RELEASE,
            str(REPO / "charts" / "edgeai-operator"),
            "--namespace",
            OPERATOR_NS,
            "--reuse-values",
            "--set",
            "resyncSeconds=15",
            "--wait",
            "--timeout",
            "5m",
        )
        upgraded_s = time.monotonic() - t0
        pods = get("pods", "-n", OPERATOR_NS, "-l", f"app.kubernetes.io/instance={RELEASE}")[
            "items"
        ]
        values = {
            env["value"]
            for p in pods
            if p["metadata"].get("deletionTimestamp") is None
            for env in p["spec"]["containers"][0]["env"]
            if env["name"] == "EDGEAI_RESYNC_SECONDS"
        }
        if values != {"15"}:
            raise RuntimeError(
                f"EDGEAI_RESYNC_SECONDS in the operator pods after the upgrade: {values}"
            )
        # The new replicas take over through kopf's peering (one pauses in favour of the
        # other): the deployments that existed before must still be reconciled, so a spec
        # change on each is observed (status.observedGeneration) by the operator now active.
        for name in (DEPLOYMENT, SAMPLE):
            slo = get("dnndeployment", name, "-n", NS)["spec"]["slo"]
            patch_deployment(name, {"spec": {"slo": {"latencyP95Ms": slo["latencyP95Ms"] + 1}}})

        def observed() -> bool:
            for name in (DEPLOYMENT, SAMPLE):
                obj = get("dnndeployment", name, "-n", NS)
                seen = (obj.get("status") or {}).get("observedGeneration") or 0
                if seen < obj["metadata"]["generation"]:
                    return False
            return True

        _, observed_s = wait_for("the spec changes observed after the upgrade", observed, 120, 1)
        return {
            "upgradeS": round(upgraded_s, 1),
            "specChangeObservedS": round(observed_s, 1),
            "revision": json.loads(helm("status", RELEASE, "-n", OPERATOR_NS, "-o", "json"))[
                "version"
            ],
        }

    # 10b ----------------------------------------------------------------------------------
    def training(self) -> dict[str, Any]:
        """examples/digits-training.yaml on real pods, one worker per camera device (both
        zones) and the aggregator on an edge node: trained to its target, the exported
        model scored here on the held-out digits, then prepared by a DNNModel and served by
        a DNNDeployment whose answers equal onnxruntime's on that file. The trainer image
        (torch) goes only to the nodes that run training pods: it is several GB."""
        env = {**os.environ, "PYTHON": sys.executable}
        t0 = time.monotonic()
        run(REPO / "hack" / "images" / "build.sh", "trainer", timeout=3600, env=env)
        build_s = time.monotonic() - t0
        size = int(run("docker", "image", "inspect", "-f", "{{.Size}}", TRAINER_IMAGE))
        devices = sorted(
            n["metadata"]["name"] for n in get("nodes", "-l", f"{TIER}=device,app=camera")["items"]
        )
        edges = sorted(n["metadata"]["name"] for n in get("nodes", "-l", f"{TIER}=edge")["items"])
        t0 = time.monotonic()
        targets = devices + edges[:1]
        image_id = run("docker", "image", "inspect", "-f", "{{.Id}}", TRAINER_IMAGE).strip()
        for node in targets:
            if not _has_image(node, image_id):
                _load_trainer(node)
        load_s = time.monotonic() - t0

        job = yaml.safe_load((REPO / "examples" / "digits-training.yaml").read_text())
        name = job["metadata"]["name"]
        job["spec"]["workers"]["count"] = len(devices)
        t0 = time.monotonic()
        kubectl("apply", "-n", NS, "-f", "-", input=yaml.safe_dump(job))

        def finished() -> dict[str, Any] | None:
            found = get("dnntrainingjob", name, "-n", NS)
            return (
                found if found.get("status", {}).get("phase") in ("Succeeded", "Failed") else None
            )

        done, train_s = wait_for("the training job Succeeded or Failed", finished, 1200, 3)
        status = done["status"]
        if status["phase"] != "Succeeded":
            raise RuntimeError(f"the training job failed: {status}")
        placement = status.get("placement") or {}
        exported = Path(tempfile.mkdtemp()) / "trained.onnx"
        data = get("configmap", f"{name}-model", "-n", NS)["binaryData"]["model.onnx"]
        exported.write_bytes(base64.b64decode(data))
        from edgeai_worker.variants import onnx_accuracy

        scored = onnx_accuracy(exported)

        model = {
            "apiVersion": "edgeai.dev/v1alpha1",
            "kind": "DNNModel",
            "metadata": {"name": TRAINED},
            "spec": {
                "source": {"uri": status["model"]},
                "input": {"name": "input", "shape": [1, 1, 8, 8], "dtype": "FP32"},
            },
        }
        serving = yaml.safe_load(deployment_manifest(TRAINED, ["device", "edge"]))
        serving["spec"]["modelRef"]["name"] = TRAINED
        t0 = time.monotonic()
        kubectl("apply", "-n", NS, "-f", "-", input=yaml.safe_dump_all([model, serving]))
        wait_for(
            "the trained model's DNNDeployment Available",
            lambda: condition(get("dnndeployment", TRAINED, "-n", NS), "Available") == "True",
            600,
            2,
        )
        base = entry_nodeport(TRAINED, "zone-a")
        import numpy as np
        import onnxruntime as ort

        session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
        worst = 0.0
        for seed in range(8):
            x = digits_input(seed)
            got = infer_json(base, TRAINED, x)
            (want,) = session.run(None, {"input": np.asarray(x, np.float32).reshape(1, 1, 8, 8)})
            worst = max(worst, float(np.max(np.abs(np.asarray(got) - want.reshape(-1)))))
        if worst > 1e-4:
            raise RuntimeError(f"the served trained model differs from its file by {worst}")
        served_s = time.monotonic() - t0
        for kind, obj in (
            ("dnndeployment", TRAINED),
            ("dnnmodel", TRAINED),
            ("dnntrainingjob", name),
        ):
            kubectl("delete", kind, obj, "-n", NS, "--cascade=foreground", "--timeout=180s")
        kubectl("delete", "service", f"e2e-{TRAINED}-entry-zone-a", "-n", NS)
        return {
            "trainerImageBytes": size,
            "trainerBuildS": round(build_s, 1),
            "trainerLoadS": round(load_s, 1),
            "trainerNodes": targets,
            "mode": status.get("mode") or job["spec"]["algorithm"]["mode"],
            "workers": len(devices),
            "placement": placement,
            "trainS": round(train_s, 1),
            "rounds": status.get("round"),
            "accuracy": status.get("accuracy"),
            "heldOutAccuracyHere": round(scored, 4),
            "uplinkBytes": status.get("uplinkBytes"),
            "compressionRatio": status.get("compressionRatio"),
            "model": status.get("model"),
            "servedMaxAbsDiff": worst,
            "servedAfterS": round(served_s, 1),
        }

    # 11 -----------------------------------------------------------------------------------
    def cleanup(self) -> dict[str, Any]:
        t0 = time.monotonic()
        kubectl("delete", "dnndeployment", DEPLOYMENT, SAMPLE, "-n", NS, "--wait=true", timeout=180)
        # The deployments' children (the DNNModel's preparation Jobs stay until it goes).
        children = "app.kubernetes.io/managed-by=edgeai-operator,edgeai.dev/deployment"

        def gone() -> bool:
            left = get("deployments,daemonsets,services,configmaps,pods", "-n", NS, "-l", children)[
                "items"
            ]
            return not left

        _, children_s = wait_for("the deployment's children gone", gone, 180, 2)
        kubectl("delete", "dnnmodel", MODEL, "-n", NS, "--wait=true", timeout=180)
        kubectl("delete", "services", "-n", NS, "--all", "--wait=true", timeout=120)
        # The last DNNDeployment of a priority takes its PriorityClass with it; should it
        # not, the operator's own words on it go into the error (the cluster goes after).
        pc_left = get("priorityclasses", "-l", "app.kubernetes.io/managed-by=edgeai-operator")
        operator_said = ""
        if pc_left["items"]:
            words = ("PriorityClass", "priority", "Traceback", "paus", "resum")
            operator_said = operator_log(
                lambda line: any(w in line for w in words), tail=4000, limit=3000
            )
        t1 = time.monotonic()
        helm("uninstall", RELEASE, "--namespace", OPERATOR_NS, "--wait", "--timeout", "3m")
        uninstall_s = time.monotonic() - t1
        selector = f"app.kubernetes.io/instance={RELEASE}"

        def left() -> dict[str, list[str]]:
            return {
                "namespaced": [
                    f"{o['kind']}/{o['metadata']['name']}"
                    for o in get(
                        "all,configmaps,serviceaccounts,roles,rolebindings,leases",
                        "-n",
                        OPERATOR_NS,
                        "-l",
                        selector,
                    )["items"]
                ],
                "clusterScoped": [
                    f"{o['kind']}/{o['metadata']['name']}"
                    for o in get(
                        "clusterroles,clusterrolebindings,clusterkopfpeerings", "-l", selector
                    )["items"]
                ],
                "customResources": [
                    f"{o['kind']}/{o['metadata']['name']}"
                    for o in get("dnndeployments,dnnmodels", "-A")["items"]
                ],
                "stagePods": [
                    o["metadata"]["name"]
                    for o in get(
                        "pods", "-A", "-l", "app.kubernetes.io/managed-by=edgeai-operator"
                    )["items"]
                ],
                "priorityClasses": [
                    o["metadata"]["name"]
                    for o in get(
                        "priorityclasses", "-l", "app.kubernetes.io/managed-by=edgeai-operator"
                    )["items"]
                ],
            }

        # The release's pods take their grace period to go after `helm uninstall --wait`.
        with contextlib.suppress(TimeoutError):
            wait_for("nothing of ours left", lambda: not any(left().values()), 90, 3)
        leftovers = left()
        crds = sorted(
            o["metadata"]["name"]
            for o in get("crds")["items"]
            if o["metadata"]["name"].endswith("edgeai.dev")
        )
        if any(leftovers.values()):
            raise RuntimeError(f"left behind: {leftovers}; the operator said:\n{operator_said}")
        return {
            "childrenGoneS": round(children_s, 1),
            "deleteS": round(t1 - t0, 1),
            "uninstallS": round(uninstall_s, 1),
            "leftovers": leftovers,
            "crdsKept": crds,
        }

    # 12 -----------------------------------------------------------------------------------
    def delete_cluster(self) -> dict[str, Any]:
        t0 = time.monotonic()
        run(HERE / "down.sh", timeout=300)
        return {"kindDeleteS": round(time.monotonic() - t0, 1)}


def _operator_pods() -> list[str]:
    pods = get("pods", "-n", OPERATOR_NS, "-l", f"app.kubernetes.io/instance={RELEASE}")["items"]
    return [
        f"{p['metadata']['name']}: Ready={condition(p, 'Ready')}, restarts="
        f"{sum(c.get('restartCount', 0) for c in p['status'].get('containerStatuses', []))}"
        for p in pods
        if p["metadata"].get("deletionTimestamp") is None
    ]


def _operator_pods_ready() -> bool:
    pods = _operator_pods()
    return bool(pods) and all(p.endswith("Ready=True, restarts=0") for p in pods)


def _load_trainer(node: str) -> None:
    """Streams the trainer image into a node's containerd (as `kind load` does, without
    its tar on the host), then drops the node's blob of the image's last layer (the 5 GB
    venv): unpacked, it is needed only to unpack again, which is what containerd's CRI
    does for pulled images with discard_unpacked_layers. One node at a time: `kind load`
    into three nodes at once held the tar, three blobs and three unpacked copies, about
    35 GB, more than this machine's disk had left beside CI's environment."""
    layers = json.loads(
        run("docker", "image", "inspect", "-f", "{{json .RootFS.Layers}}", TRAINER_IMAGE)
    )
    ctr = ["docker", "exec", "-i", node, "ctr", "--namespace=k8s.io"]
    save = subprocess.Popen(["docker", "save", TRAINER_IMAGE], stdout=subprocess.PIPE)
    imported = subprocess.run(
        [*ctr, "images", "import", "--all-platforms", "--digests", "--snapshotter=overlayfs", "-"],
        stdin=save.stdout,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    assert save.stdout is not None
    save.stdout.close()
    if save.wait() != 0 or imported.returncode != 0:
        raise RuntimeError(f"loading {TRAINER_IMAGE} into {node}: {imported.stderr[-1000:]}")
    run(*ctr, "content", "rm", str(layers[-1]))


def _has_image(node: str, image_id: str) -> bool:
    """Whether a node's containerd holds this build of an image (a kept cluster has the
    trainer from an earlier run: loading several GB again is minutes)."""
    listed = run("docker", "exec", node, "crictl", "images", "--no-trunc", "-q", check=False)
    return image_id in listed.split()


def _image_exists(image: str) -> bool:
    return (
        subprocess.run(
            ["docker", "image", "inspect", image], capture_output=True, check=False
        ).returncode
        == 0
    )


def _read_times(path: Path) -> dict[str, float]:
    """`NAME rc=0 wall=SECONDS` lines (a wrapper's record of each script's wall time)."""
    times = {}
    for line in path.read_text().splitlines():
        match = re.match(r"(\w+) rc=0 wall=([\d.]+)", line)
        if match:
            times[match.group(1)] = round(float(match.group(2)), 1)
    return times


def deployment_manifest(name: str, tiers: list[str], *, fallback: str = "none") -> str:
    """examples/digits-deployment.yaml renamed, on `tiers` only, with one fixed split
    (and `fallback: device`: the device entry answers alone when the chain cannot)."""
    sample = yaml.safe_load((REPO / "examples" / "digits-deployment.yaml").read_text())
    sample["metadata"]["name"] = name
    sample["spec"]["placement"]["tiers"] = tiers
    sample["spec"]["placement"]["adaptiveSplit"] = False
    sample["spec"]["placement"]["fallback"] = fallback
    return str(yaml.safe_dump(sample))


def _zoo_source_outcome() -> dict[str, Any]:
    """The sample's `zoo:` source on real pods: Prepared, or the error of its first failed
    preparation Job (its pod's last log line)."""

    def settled() -> dict[str, Any] | None:
        if condition(get("dnnmodel", MODEL, "-n", NS), "Prepared") == "True":
            return {"prepared": True}
        for job in get("jobs", "-n", NS)["items"]:
            if job["metadata"]["name"].startswith(f"{MODEL}-prepare") and any(
                c["type"] == "Failed" and c["status"] == "True"
                for c in job["status"].get("conditions") or []
            ):
                logs = kubectl("logs", "-n", NS, f"job/{job['metadata']['name']}", check=False)
                return {"prepared": False, "error": (logs.strip().splitlines() or ["?"])[-1]}
        return None

    outcome, _ = wait_for("the zoo source prepared or failed", settled, 300, 2)
    return dict(outcome)


def zoo_file_uri(name: str) -> str:
    """A zoo model exported to ONNX here (with torch: the images have none), into the
    shared artefact folder; digits_cnn trained, the others with their seeded weights."""
    dest = ARTIFACTS_HOST / "sources" / f"{name}.onnx"
    dest.parent.mkdir(parents=True, exist_ok=True)
    run(
        sys.executable,
        "-c",
        "import sys; from edgeai_worker import zoo; "
        "zoo.export_onnx(sys.argv[1], sys.argv[2], trained=sys.argv[1] == 'digits_cnn')",
        name,
        dest,
        env={**os.environ, "PYTHONPATH": str(REPO / "workers")},
    )
    for path in (dest.parent, dest):
        os.chown(path, 10001, 10001)  # the images' user edgeai
    return f"pvc://edgeai-artifacts/sources/{name}.onnx"


def _artifact_store() -> str:
    """A hostPath PersistentVolume on the folder up.sh mounts into every node, bound to the
    claim `edgeai-artifacts` of the e2e namespace."""
    docs = [
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": "edgeai-e2e-artifacts"},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadWriteMany"],
                "storageClassName": "",
                "persistentVolumeReclaimPolicy": "Retain",
                "hostPath": {"path": ARTIFACTS_IN_NODE, "type": "Directory"},
                "claimRef": {"namespace": NS, "name": "edgeai-artifacts"},
            },
        },
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": "edgeai-artifacts", "namespace": NS},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "storageClassName": "",
                "volumeName": "edgeai-e2e-artifacts",
                "resources": {"requests": {"storage": "1Gi"}},
            },
        },
    ]
    return "\n---\n".join(yaml.safe_dump(d) for d in docs)


def _zone_plan(zone: str) -> dict[str, Any]:
    cm = get("configmap", f"{DEPLOYMENT}-plan", "-n", NS)
    return dict(yaml.safe_load(cm["data"][f"plan-{zone}.yaml"]))


def _zone_split(deployment: str, zone: str) -> str:
    """`device:0-2 > edge:3-18`: the split of the zone's plan in the plan ConfigMap."""
    cm = get("configmap", f"{deployment}-plan", "-n", NS)
    plan = yaml.safe_load(cm["data"][f"plan-{zone}.yaml"])
    return " > ".join(f"{s['tier']}:{s['layers']}" for s in plan["stages"])


def _node_uplink(node: str) -> float | None:
    value = get("node", node)["metadata"].get("annotations", {}).get("edgeai.dev/uplink-mbps")
    return None if value is None else float(value)


def _plan_summary(status: dict[str, Any]) -> Any:
    return status.get("split")


# connects to each [name, host, port] of argv[1] (3 s each) and prints what happened
CONNECT_PROBE = """
import json, socket, sys
seen = {}
for name, host, port in json.loads(sys.argv[1]):
    try:
        socket.create_connection((host, port), timeout=3).close()
        seen[name] = "connected"
    except TimeoutError:
        seen[name] = "timeout"
    except OSError as error:
        seen[name] = type(error).__name__
print(json.dumps(seen))
"""


def _device_pod(zone: str) -> str:
    pods = get(
        "pods",
        "-n",
        NS,
        "-l",
        f"edgeai.dev/deployment={DEPLOYMENT},edgeai.dev/tier=device,edgeai.dev/zone={zone}",
    )
    running = [
        p["metadata"]["name"] for p in pods["items"] if p["status"].get("phase") == "Running"
    ]
    if not running:
        raise RuntimeError(f"no Running device pod in {zone}")
    return str(sorted(running)[0])


def _device_pod_uids() -> set[str]:
    pods = get("pods", "-n", NS, "-l", f"edgeai.dev/deployment={DEPLOYMENT},edgeai.dev/tier=device")
    return {str(p["metadata"]["uid"]) for p in pods["items"]}


def _stage_pods() -> list[str]:
    pods = get("pods", "-n", NS, "-l", f"edgeai.dev/deployment={DEPLOYMENT}")["items"]
    return sorted(
        f"{p['metadata']['labels'].get('edgeai.dev/tier')}@{p['spec'].get('nodeName')}:{p['status'].get('phase')}"
        for p in pods
    )


def _replicas() -> dict[str, int]:
    deployments = get("deployments", "-n", NS, "-l", f"edgeai.dev/deployment={DEPLOYMENT}")["items"]
    return {d["metadata"]["name"]: int(d["spec"].get("replicas") or 0) for d in deployments}


def _scaled(before: dict[str, int], after: dict[str, int], *, up: bool) -> dict[str, int] | None:
    for name, count in after.items():
        if name in before and (count > before[name] if up else count < before[name]):
            return after
    return None


def _node(tier: str, zone: str) -> str:
    nodes = get("nodes", "-l", f"{TIER}={tier},{ZONE}={zone}")["items"]
    return str(sorted(n["metadata"]["name"] for n in nodes)[0])


def _reference_output(plan: dict[str, Any], data: list[float]) -> list[float] | None:
    """The model the pods serve, run here with onnxruntime on the very file they fetched
    (the shared artefact folder), or None when the plan names no prepared file."""
    uri = (plan.get("model") or {}).get("uri") or ""
    if not uri.startswith("pvc://"):
        return None
    path = ARTIFACTS_HOST / uri.removeprefix("pvc://").split("/", 1)[1]
    import numpy as np
    import onnxruntime as ort

    files = [path] if path.is_file() else sorted(path.rglob("*.onnx"))
    session = ort.InferenceSession(str(files[0]), providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: np.asarray(data, dtype=np.float32).reshape(1, 1, 8, 8)}
    return [float(v) for v in session.run(None, feed)[0].reshape(-1)]


# the steps after samples that a run may leave out (cleanup never)
OPTIONAL_STEPS = (
    "inference",
    "networkPolicy",
    "scale",
    "linkChange",
    "edgeStop",
    "zoneMove",
    "helmUpgrade",
    "training",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "e2e-kind.json")
    parser.add_argument("--conditions", default="not recorded (--conditions)")
    parser.add_argument(
        "--keep-cluster", action="store_true", help="leave the kind cluster running"
    )
    parser.add_argument(
        "--cold-build-times", type=Path, help="NAME rc=0 wall=S lines of a cold build"
    )
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=OPTIONAL_STEPS,
        help="leave out a step (repeatable); the report lists it under `skipped`",
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("needs root (Docker, tc and nsenter on the kind nodes)")
    e2e = Run(args)
    if not e2e.step("build", e2e.build):
        return 1
    e2e.step("links", e2e.links)
    if e2e.step("helmInstall", e2e.helm_install) and e2e.step("samples", e2e.samples):
        for name, fn in (
            ("inference", e2e.inference),
            ("networkPolicy", e2e.network_policy),
            ("scale", e2e.scale),
            ("linkChange", e2e.link_change),
            ("edgeStop", e2e.edge_stop),
            ("zoneMove", e2e.zone_move),
            ("helmUpgrade", e2e.helm_upgrade),
            ("training", e2e.training),
            ("cleanup", e2e.cleanup),
        ):
            if name in args.skip:
                e2e.report.setdefault("skipped", []).append(name)
                log(f"step {name} skipped (--skip)")
                continue
            e2e.step(name, fn)
    if not args.keep_cluster:
        e2e.step("deleteCluster", e2e.delete_cluster)
    e2e.save()
    log(f"wrote {args.out}; failed steps: {e2e.report['failures'] or 'none'}")
    return 1 if e2e.report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
