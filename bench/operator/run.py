"""Operator at scale on the real control plane: N DNNDeployments over M kwok nodes.

    python bench/operator/run.py [--deployments 500] [--zones 10] [--devices-per-zone 92]

Prints, measured in one run, and writes as JSON (`--out`, default
`docs/results/operator.json`, which `make docs-numbers` renders into the docs):
- the same child objects created directly (no operator): time until every pod Runs;
- through the operator (DNNDeployment CRs): apply-to-Available p50/p99 per CR, time
  until every pod Runs, and that time / the direct one (goal <= 1.2);
- the operator's peak RSS (VmHWM) and API requests/s (apiserver_request_total, the
  whole cluster and the operator's own user agent).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from edgeai_operator.builders import DeploymentOptions, Owner, build_children
from edgeai_operator.deployspec import parse_deployment
from edgeai_operator.localcluster import REPO_ROOT, LocalCluster
from edgeai_operator.localregistry import LocalRegistry, registry_binary
from edgeai_operator.modelspec import parse_model_spec
from edgeai_operator.planning import NodeState, plan_zones
from edgeai_operator.preparation import prepared_status
from edgeai_operator.prepare import PrepareRequest, prepare
from edgeai_operator.topology import NodeSpec, Topology

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the renderer beside the benches
import render_numbers

USER_AGENT = "edgeai-operator"


def topology(
    zones: int,
    devices_per_zone: int,
    edges_per_zone: int,
    clouds: int,
    fleets: int,
    uplink_mbps: float,
) -> Topology:
    nodes: list[NodeSpec] = []
    device_capacity = {"cpu": "4", "memory": "4Gi", "pods": "20"}
    for z in range(zones):
        zone = f"zone-{z}"
        for i in range(devices_per_zone):
            n = z * devices_per_zone + i
            # devices of one fleet share a zone: fleet k holds devices k, k + zones, ...
            nodes.append(
                NodeSpec(
                    name=f"device-{zone}-{i}",
                    tier="device",
                    zone=zone,
                    capacity=device_capacity,
                    gflops=8,
                    uplink_mbps=uplink_mbps,
                    uplink_rtt_ms=15,
                    power_watts=4,
                    labels={"fleet": f"f{(i * zones + z) % fleets}", "bench": str(n)},
                )
            )
        for i in range(edges_per_zone):
            nodes.append(
                NodeSpec(
                    name=f"edge-{zone}-{i}",
                    tier="edge",
                    zone=zone,
                    capacity={"cpu": "64", "memory": "256Gi", "pods": "250"},
                    gflops=150,
                    uplink_mbps=100,
                    uplink_rtt_ms=25,
                    power_watts=120,
                )
            )
    for i in range(clouds):
        nodes.append(
            NodeSpec(
                name=f"cloud-{i}",
                tier="cloud",
                zone=None,
                capacity={"cpu": "96", "memory": "512Gi", "pods": "500"},
                gflops=1500,
                uplink_mbps=None,
                uplink_rtt_ms=None,
                power_watts=400,
            )
        )
    return Topology(nodes=tuple(nodes))


def deployment(name: str, namespace: str, fleet: str) -> dict[str, Any]:
    return {
        "apiVersion": "edgeai.dev/v1alpha1",
        "kind": "DNNDeployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "modelRef": {"name": "model"},
            "slo": {"latencyP95Ms": 200},
            "devices": {"nodeSelector": {"fleet": fleet}},
            "placement": {"tiers": ["device", "edge", "cloud"]},
        },
    }


def apply_docs(cluster: LocalCluster, docs: list[dict[str, Any]], chunk: int = 200) -> None:
    for i in range(0, len(docs), chunk):
        cluster.kubectl(
            "apply",
            "--server-side",
            "--force-conflicts",
            "-f",
            "-",
            input_text=yaml.safe_dump_all(docs[i : i + chunk]),
        )


def get_raw(cluster: LocalCluster, path: str) -> bytes:
    """GET an API path as the admin (cheaper to poll with than a kubectl process)."""
    ctx = ssl.create_default_context(cafile=str(cluster.pki / "ca.crt"))
    ctx.load_cert_chain(str(cluster.pki / "admin.crt"), str(cluster.pki / "admin.key"))
    with urllib.request.urlopen(f"{cluster.server}{path}", context=ctx, timeout=60) as resp:
        return resp.read()  # type: ignore[no-any-return]


def get_json(cluster: LocalCluster, path: str) -> Any:
    return json.loads(get_raw(cluster, path))


def pods_running(cluster: LocalCluster, namespace: str) -> tuple[int, int]:
    # stage pods only (the operator's profiling Job pods complete and stay)
    path = f"/api/v1/namespaces/{namespace}/pods?labelSelector=edgeai.dev%2Fdeployment"
    items = get_json(cluster, path)["items"]
    running = sum(1 for p in items if p.get("status", {}).get("phase") == "Running")
    return running, len(items)


def wait_pods(
    cluster: LocalCluster, namespace: str, expected: int, t0: float, timeout_s: float
) -> float:
    while time.monotonic() - t0 < timeout_s:
        running, total = pods_running(cluster, namespace)
        if running >= expected and total == running:
            return time.monotonic() - t0
        time.sleep(1)
    raise RuntimeError(f"{namespace}: pods not Running after {timeout_s:.0f}s")


def workloads_available(cluster: LocalCluster, namespace: str) -> tuple[int, int]:
    """(workloads whose status says every replica is available, workloads)."""
    done = total = 0
    for kind in ("daemonsets", "deployments"):
        for item in get_json(cluster, f"/apis/apps/v1/namespaces/{namespace}/{kind}")["items"]:
            st, total = item.get("status") or {}, total + 1
            if kind == "daemonsets":
                want, have = st.get("desiredNumberScheduled") or 0, st.get("numberAvailable") or 0
            else:
                want, have = item["spec"].get("replicas") or 0, st.get("availableReplicas") or 0
            current = (st.get("observedGeneration") or 0) >= item["metadata"]["generation"]
            done += int(current and want > 0 and have >= want)
    return done, total


def wait_workloads_available(
    cluster: LocalCluster, namespace: str, t0: float, timeout_s: float
) -> float:
    while time.monotonic() - t0 < timeout_s:
        done, total = workloads_available(cluster, namespace)
        if total and done == total:
            return time.monotonic() - t0
        time.sleep(1)
    raise RuntimeError(f"{namespace}: workloads not available after {timeout_s:.0f}s")


def local_status(
    spec: dict[str, Any], nodes: list[NodeSpec], artifacts_uri: str, workdir: Path
) -> dict[str, Any]:
    """The DNNModel status the operator writes once the preparation Job of `spec` is
    done: the Job's program (`prepare`) run here, its artefact pushed to `artifacts_uri`."""
    model = parse_model_spec(spec)
    request = PrepareRequest(
        source_uri=model.source.uri,
        inputs=(model.input,),
        artifacts_uri=artifacts_uri,
        model_name="model",
    )
    result = prepare(request, workdir)
    status, _ = prepared_status(result.to_dict(), nodes, "model-prepare-1-1")
    return status


def api_requests(cluster: LocalCluster) -> float:
    """Every request the apiserver served so far (its apiserver_request_total)."""
    text = get_raw(cluster, "/metrics").decode()
    return sum(
        float(m.group(1))
        for m in re.finditer(r"^apiserver_request_total\{[^}]*\} (\S+)$", text, re.M)
    )


AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived"],
    "rules": [{"level": "Metadata", "users": ["edgeai-operator"]}, {"level": "None"}],
}


def operator_requests(audit_log: Path) -> int:
    """Requests by user edgeai-operator (the operator's client certificate)."""
    if not audit_log.exists():
        return 0
    return sum(1 for line in audit_log.open() if '"stage":"ResponseComplete"' in line)


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deployments", type=int, default=500)
    parser.add_argument("--zones", type=int, default=10)
    parser.add_argument("--devices-per-zone", type=int, default=92)
    parser.add_argument("--edges-per-zone", type=int, default=6)
    parser.add_argument("--clouds", type=int, default=20)
    parser.add_argument("--resync-seconds", type=float, default=30)
    parser.add_argument(
        "--model",
        default="digits_cnn",
        help="zoo model of every deployment (digits_cnn plans device-only: DaemonSets; "
        "mobilenet_v2 at 100 Mbps adds an edge Deployment per deployment)",
    )
    parser.add_argument(
        "--uplink-mbps",
        type=float,
        default=100,
        help="device uplink; 100 Mbps puts MobileNetV2 on the edge servers",
    )
    parser.add_argument("--timeout", type=float, default=1500)
    render_numbers.add_result_arguments(parser, "operator.json")
    args = parser.parse_args()
    # SIGTERM (a stopped run) unwinds like Ctrl-C, so the cluster and operator stop.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    topo = topology(
        args.zones,
        args.devices_per_zone,
        args.edges_per_zone,
        args.clouds,
        args.deployments,
        args.uplink_mbps,
    )
    work = Path(tempfile.mkdtemp(prefix="edgeai-bench-operator-"))
    (work / "audit-policy.yaml").write_text(yaml.safe_dump(AUDIT_POLICY))
    audit_log = work / "audit.log"
    cluster = LocalCluster(
        work / "cluster",
        # 1000 kwok leases on 2 cores: renewals run late under load, and a node
        # counted NotReady would take its pods' readiness with it.
        node_monitor_grace_period_s=180,
        apiserver_args=(
            f"--audit-policy-file={work / 'audit-policy.yaml'}",
            f"--audit-log-path={audit_log}",
            "--audit-log-maxsize=0",
        ),
    )
    print(f"nodes {len(topo.nodes)}, deployments {args.deployments}", flush=True)
    cluster.start()
    operator: subprocess.Popen[bytes] | None = None
    registry = LocalRegistry(work / "registry", registry_binary())
    try:
        t0 = time.monotonic()
        cluster.create_nodes(topo, timeout_s=600)
        print(f"{len(topo.nodes)} kwok nodes Ready in {time.monotonic() - t0:.1f}s", flush=True)
        for crd in sorted((REPO_ROOT / "crds").glob("*.yaml")):
            cluster.kubectl("apply", "--server-side", "-f", str(crd))
        cluster.kubectl("wait", "--for=condition=Established", "crd", "--all")
        for ns in ("direct", "cr"):
            cluster.kubectl("create", "namespace", ns)
        wait_sa = time.monotonic()
        while (
            any(
                not cluster.kubectl("get", "sa", "default", "-n", ns, check=False)
                for ns in ("direct", "cr")
            )
            and time.monotonic() - wait_sa < 60
        ):
            time.sleep(0.5)

        # The plans the operator will make, computed here for the direct baseline.
        from edgeai_worker import zoo

        _, shape, dtype = zoo.input_spec(args.model)
        model_spec = {
            "source": {"zoo": args.model},
            "input": {"name": "input", "shape": list(shape), "dtype": dtype},
        }
        registry.start()
        artifacts_uri = f"oci://{registry.address}/edgeai-models"
        status = local_status(model_spec, list(topo.nodes), artifacts_uri, work / "prepared")
        nodes = [NodeState(n, ready=True, schedulable=True) for n in topo.nodes]
        fleets = [f"f{k}" for k in range(args.deployments)]
        children: list[dict[str, Any]] = []
        for k, fleet in enumerate(fleets):
            body = deployment(f"d{k}", "direct", fleet)
            body["metadata"]["uid"] = "direct"
            zones = plan_zones(parse_deployment(body), status["profiles"], nodes)
            owner = Owner(f"d{k}", "direct", "0")
            objs = build_children(
                owner, zones.plans, {}, DeploymentOptions(device_selector={"fleet": fleet})
            )
            for obj in objs:
                obj["metadata"].pop("ownerReferences", None)
            children += objs
        expected_pods = 0
        for k in range(args.deployments):
            fleet_devices = sum(1 for n in topo.nodes if n.labels.get("fleet") == f"f{k}")
            expected_pods += fleet_devices
        remote = sum(1 for c in children if c["kind"] == "Deployment")
        expected_pods += remote
        splits = {
            len(yaml.safe_load(text)["stages"])
            for c in children
            if c["kind"] == "ConfigMap"
            for text in c["data"].values()
        }
        print(
            f"direct: {len(children)} objects, {expected_pods} pods "
            f"({remote} edge/cloud Deployments; stages per plan {sorted(splits)})",
            flush=True,
        )
        before = api_requests(cluster)
        t0 = time.monotonic()
        apply_docs(cluster, children)
        direct_s = wait_pods(cluster, "direct", expected_pods, t0, args.timeout)
        direct_rps = (api_requests(cluster) - before) / direct_s
        print(
            f"direct: all {expected_pods} pods Running in {direct_s:.1f}s "
            f"({direct_rps:.0f} API requests/s)",
            flush=True,
        )
        # The same criterion the operator's Available condition uses: every workload's
        # controller reports its replicas available. Waiting for it here also keeps the
        # controllers' backlog of this phase out of the next one.
        direct_available_s = wait_workloads_available(cluster, "direct", t0, args.timeout)
        print(
            f"direct: every DaemonSet/Deployment reports its pods available after "
            f"{direct_available_s:.1f}s",
            flush=True,
        )

        log = work / "operator.log"
        env = {
            **os.environ,
            "KUBECONFIG": str(cluster.operator_kubeconfig),
            "EDGEAI_RESYNC_SECONDS": str(args.resync_seconds),
            "EDGEAI_ARTIFACTS_URI": artifacts_uri,
        }
        with log.open("wb") as out:
            operator = subprocess.Popen(
                [sys.executable, "-m", "edgeai_operator.cli", "operator", "--namespace", "cr"],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        model = {
            "apiVersion": "edgeai.dev/v1alpha1",
            "kind": "DNNModel",
            "metadata": {"name": "model", "namespace": "cr"},
            "spec": model_spec,
        }
        apply_docs(cluster, [model])
        while (
            cluster.kubectl(
                "get",
                "dnnm",
                "model",
                "-n",
                "cr",
                "-o",
                'jsonpath={.status.conditions[?(@.type=="Prepared")].status}',
            )
            != "True"
        ):
            time.sleep(1)
        crs = [deployment(f"d{k}", "cr", fleet) for k, fleet in enumerate(fleets)]
        before = api_requests(cluster)
        operator_before = operator_requests(audit_log)
        t0 = time.monotonic()
        applied: dict[str, float] = {}
        for i in range(0, len(crs), 100):
            apply_docs(cluster, crs[i : i + 100])
            now = time.monotonic() - t0
            for cr in crs[i : i + 100]:
                applied[cr["metadata"]["name"]] = now
        available: dict[str, float] = {}
        cr_pods_s: float | None = None
        # Pods Running and CRs Available are watched in the same loop, so neither
        # measurement waits for the other.
        while (len(available) < len(crs) or cr_pods_s is None) and (
            time.monotonic() - t0 < args.timeout
        ):
            items = get_json(cluster, "/apis/edgeai.dev/v1alpha1/namespaces/cr/dnndeployments")[
                "items"
            ]
            now = time.monotonic() - t0
            for item in items:
                conds = item.get("status", {}).get("conditions", [])
                if any(c["type"] == "Available" and c["status"] == "True" for c in conds):
                    available.setdefault(item["metadata"]["name"], now)
            if cr_pods_s is None:
                running, total = pods_running(cluster, "cr")
                if running >= expected_pods and total == running:
                    cr_pods_s = time.monotonic() - t0
            time.sleep(1)
        if cr_pods_s is None:
            raise RuntimeError(f"cr: pods not Running after {args.timeout:.0f}s")
        rollout_s = time.monotonic() - t0
        cr_rps = (api_requests(cluster) - before) / rollout_s
        cpu_rollout = cpu_seconds(operator.pid)
        op_rps = (operator_requests(audit_log) - operator_before) / rollout_s
        # Steady state: nothing changes, the daemons only resync.
        calm_t0, calm_before = time.monotonic(), operator_requests(audit_log)
        time.sleep(2 * args.resync_seconds)
        calm_s = time.monotonic() - calm_t0
        calm_rps = (operator_requests(audit_log) - calm_before) / calm_s
        calm_cpu = (cpu_seconds(operator.pid) - cpu_rollout) / calm_s
        latencies = sorted(available[n] - applied[n] for n in available)
        p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
        last = max(available.values())
        run = {
            "label": "run 1",
            "date": datetime.now(UTC).strftime("%Y-%m-%d"),
            "scale": f"{len(crs)} DNNDeployments of {args.model}, {expected_pods} stage pods "
            f"on {len(topo.nodes)} kwok nodes",
            "conditions": args.conditions,
            "deploymentsAvailable": f"{len(available)}/{len(crs)}",
            "applyToAvailableP50S": statistics.median(latencies),
            "applyToAvailableP99S": p99,
            "lastAvailableS": last,
            "directAvailableS": direct_available_s,
            "availableRatio": last / direct_available_s,
            "directPodsRunningS": direct_s,
            "operatorPodsRunningS": cr_pods_s,
            "podsRunningRatio": cr_pods_s / direct_s,
            "directRequestsPerS": direct_rps,
            "operatorPhaseRequestsPerS": cr_rps,
            "operatorRequestsPerSRollout": op_rps,
            "operatorRequestsPerSSteady": calm_rps,
            "operatorCpuSRollout": cpu_rollout,
            "operatorCpuShareSteady": calm_cpu,
            "operatorPeakRssMiB": peak_rss_mib(operator.pid),
        }
        report = {"bench": "operator", "command": " ".join(sys.argv), "runs": [run]}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print()
        print(render_numbers.operator_table(report))
        print(f"\n(written to {args.out}; make docs-numbers renders it into the docs)")
    finally:
        if operator is not None:
            os.killpg(operator.pid, signal.SIGTERM)
            operator.wait(timeout=30)
        registry.stop()
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
