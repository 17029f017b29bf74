"""`make demo`: from a fresh machine to a DNN served across device, edge and cloud pods.

    python hack/kind/demo.py [--out docs/results/demo.txt] [--requests N]

Builds what is missing (host set-up, the images, the offline kind node image; each step
shows its progress and reuses its cache), brings up the kind cluster, shapes its links,
installs the chart, deploys the digits sample with its SLO next to a device-only and a
cloud-only deployment of the same model, sends the same requests to each through its
zone-a device pod, and prints the plan, `kubectl get edgeai` and p50/p95 against the SLO.
Everything printed after the set-up is also written to --out (JSON, `transcript`),
which README.md shows (bench/render_numbers.py). The cluster stays up: the last
lines say how to look around and how to tear it down.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import e2e  # the e2e's cluster helpers, from this folder
import yaml

SAMPLE = e2e.SAMPLE
COMPARED = {
    "device-only": ("digits-device-only", ["device"]),
    "cloud-only": ("digits-cloud-only", ["cloud"]),
}


class Tee(io.TextIOBase):
    def __init__(self, *streams: io.TextIOBase | Any) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
            stream.flush()
        return len(text)


def say(text: str = "") -> None:
    print(text, flush=True)


@contextlib.contextmanager
def section(title: str) -> Iterator[None]:
    say(f"\n== {title}")
    t0 = time.monotonic()
    yield
    say(f"   ({time.monotonic() - t0:.0f} s)")


def set_up() -> None:
    """host, images, node image, cluster: the scripts' own progress lines go to the terminal."""
    env = {**os.environ, "PYTHON": sys.executable}
    for title, argv in (
        ("host: Docker, the kind network, guards", [e2e.HERE / "host.sh"]),
        ("images: edgeai-operator, edgeai-worker", [e2e.REPO / "hack" / "images" / "build.sh"]),
        ("kind node image (first time: Go builds, several minutes)", [e2e.HERE / "node-image.sh"]),
        ("kind cluster: 6 nodes shaped like hack/topology.yaml", [e2e.HERE / "up.sh"]),
    ):
        with section(title):
            subprocess.run([str(a) for a in argv], check=True, env=env, stdout=subprocess.DEVNULL)


def wait_available(name: str) -> None:
    e2e.wait_for(
        f"DNNDeployment {name} Available",
        lambda: e2e.condition(e2e.get("dnndeployment", name, "-n", e2e.NS), "Available") == "True",
        600,
        2,
    )


def latencies(deployment: str, requests: int) -> dict[str, Any]:
    pods = e2e.get(
        "pods",
        "-n",
        e2e.NS,
        "-l",
        f"edgeai.dev/deployment={deployment},edgeai.dev/tier=device,edgeai.dev/zone=zone-a",
    )["items"]
    pod = sorted(p["metadata"]["name"] for p in pods if p["status"].get("phase") == "Running")[0]
    cm = e2e.get("configmap", f"{deployment}-plan", "-n", e2e.NS)
    model = yaml.safe_load(cm["data"]["plan-zone-a.yaml"])["model"]["name"]
    ms = []
    with e2e.port_forward(f"pod/{pod}", e2e.NS) as base:
        e2e.wait_for("first answer", lambda: e2e.infer_json(base, model, e2e.digits_input(0)), 60)
        for seed in range(requests):
            t0 = time.monotonic()
            e2e.infer_json(base, model, e2e.digits_input(seed))
            ms.append((time.monotonic() - t0) * 1000)
    return {"p50": e2e.percentile(ms, 0.5), "p95": e2e.percentile(ms, 0.95)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=e2e.REPO / "docs" / "results" / "demo.json")
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("needs root (it installs Docker and runs the kind cluster)")
    t_start = time.monotonic()
    say("edgeai-operator demo: a kind cluster on this machine, offline once built")
    set_up()
    transcript = io.StringIO()
    date = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    sys.stdout = Tee(sys.__stdout__, transcript)
    try:
        run_demo(args.requests)
    finally:
        sys.stdout = sys.__stdout__
    report = {"date": date, "command": "make demo", "transcript": transcript.getvalue()}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    say(f"\ndemo done in {time.monotonic() - t_start:.0f} s; transcript: {args.out}")
    return 0


def run_demo(requests: int) -> None:
    kubectl = f"{e2e.K8S_BIN / 'kubectl'} --kubeconfig={e2e.KUBECONFIG}"
    with section("links: tc on the node containers, to the nodes' declared uplinks"):
        base = [
            sys.executable,
            str(e2e.HERE / "links.py"),
            str(e2e.KUBECONFIG),
            str(e2e.K8S_BIN / "kubectl"),
        ]
        for link in json.loads(e2e.run(*base, "shape")):
            say(
                f"   {link['node']} ({link['tier']}) -> {', '.join(link['to'])}: "
                f"{link['tcRateMbps']:g} Mbit/s"
            )
    with section("helm upgrade --install charts/edgeai-operator (namespace edgeai-system)"):
        e2e.kubectl("create", "namespace", e2e.NS, check=False)
        e2e.kubectl("apply", "-f", "-", input=e2e._artifact_store())
        e2e.helm(
            "upgrade",
            "--install",
            e2e.RELEASE,
            str(e2e.REPO / "charts" / "edgeai-operator"),
            "--namespace",
            e2e.OPERATOR_NS,
            "--create-namespace",
            "--set",
            "image.pullPolicy=Never",
            "--set",
            "artifactsUri=pvc://edgeai-artifacts/models",
            "--wait",
            "--timeout",
            "5m",
        )
        say(e2e.kubectl("get", "pods", "-n", e2e.OPERATOR_NS).rstrip())
    with section(
        f"examples/digits-*.yaml in namespace {e2e.NS}, with device-only and cloud-only twins"
    ):
        # the sample as it is: the worker image ships digits_cnn's files for its zoo source
        for sample in ("digits-model.yaml", "digits-deployment.yaml"):
            e2e.kubectl("apply", "-n", e2e.NS, "-f", str(e2e.REPO / "examples" / sample))
        say(f"   DNNModel {e2e.MODEL}: source zoo digits_cnn (files shipped in the worker image)")
        for name, tiers in COMPARED.values():
            e2e.kubectl(
                "apply", "-n", e2e.NS, "-f", "-", input=e2e.deployment_manifest(name, tiers)
            )
        for name in (SAMPLE, *(n for n, _ in COMPARED.values())):
            wait_available(name)
    with section("the plan (zone-a)"):
        status = e2e.get("dnndeployment", SAMPLE, "-n", e2e.NS)["status"]
        say(
            yaml.safe_dump(
                {"split": status.get("split"), "plan": status.get("plan")}, sort_keys=False
            ).rstrip()
        )
    with section(f"{requests} requests to each, from this machine through its zone-a device pod"):
        slo = e2e.get("dnndeployment", SAMPLE, "-n", e2e.NS)["spec"]["slo"]["latencyP95Ms"]
        rows = [("planned (examples/digits-deployment.yaml)", SAMPLE)]
        rows += [(label, name) for label, (name, _) in COMPARED.items()]
        say(f"   {'deployment':44} {'p50 ms':>8} {'p95 ms':>8}  SLO p95 {slo} ms")
        for label, name in rows:
            lat = latencies(name, requests)
            verdict = "meets" if lat["p95"] is not None and lat["p95"] <= slo else "misses"
            say(f"   {label:44} {lat['p50']:8.1f} {lat['p95']:8.1f}  {verdict} the SLO")
        say("   (client side, via kubectl port-forward; P95 below: the pods' own /metrics)")
    with section("kubectl get edgeai -n " + e2e.NS):
        say(e2e.kubectl("get", "edgeai", "-n", e2e.NS).rstrip())
    say(
        f"""
== look around
   export KUBECONFIG={e2e.KUBECONFIG}
   {e2e.K8S_BIN / "kubectl"} get nodes -L edgeai.dev/tier,topology.kubernetes.io/zone
   {e2e.K8S_BIN / "kubectl"} -n {e2e.NS} get pods -o wide
   {e2e.K8S_BIN / "kubectl"} -n {e2e.NS} describe dnndeployment {SAMPLE}  # its Events
   {e2e.K8S_BIN / "kubectl"} -n {e2e.OPERATOR_NS} logs deploy/{e2e.RELEASE}
== tear down
   make kind-down            # deletes the cluster; images and build caches stay
   ({kubectl} delete namespace {e2e.NS} removes only the demo's objects)"""
    )


if __name__ == "__main__":
    sys.exit(main())
