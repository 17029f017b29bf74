"""Security on the real control plane: in a namespace whose Pod Security admission
enforces `restricted`, the API server admits every pod the operator creates
(preparation and profiling Jobs' pods, device DaemonSets', edge and cloud Deployments'
pods, training aggregator and workers), while it refuses a pod without those settings;
each deployment's stage certificates and NetworkPolicies are created and owned by it;
and the stage pods' own commands, run as processes with the Secrets they mount, serve
the chain over mutual TLS with the entry's bearer token, or with the entry taking only
client certificates of the CA the spec names."""

from __future__ import annotations

import base64
import datetime
import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from _cluster_support import Namespace, apply, condition, get, json_infer_body, wait_for
from _process_kubelet import ProcessKubelet, ServiceProxy
from conftest import OperatorProcess
from edgeai_operator.builders import Owner
from edgeai_operator.localcluster import REPO_ROOT, ClusterError
from edgeai_operator.stagetls import issue_ca, issue_stage

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

TOKEN = "camera-clients-token"


def _deployment(name: str, tiers: list[str], **security: Any) -> dict[str, Any]:
    return {
        "apiVersion": "edgeai.dev/v1alpha1",
        "kind": "DNNDeployment",
        "metadata": {"name": name},
        "spec": {
            "modelRef": {"name": "digits"},
            "slo": {"latencyP95Ms": 500},
            "devices": {"nodeSelector": {"app": "camera", "topology.kubernetes.io/zone": "zone-a"}},
            "placement": {"tiers": tiers},
            "security": security,
        },
    }


def _training_job() -> dict[str, Any]:
    return {
        "apiVersion": "edgeai.dev/v1alpha1",
        "kind": "DNNTrainingJob",
        "metadata": {"name": "digits-fl"},
        "spec": {
            "model": {"zoo": "digits_cnn"},
            "workers": {"nodeSelector": {"app": "camera"}, "count": 2},
            "algorithm": {"mode": "fedavg", "localSteps": 2, "learningRate": 0.1},
            "stop": {"targetAccuracy": 0.9, "maxRounds": 3},
        },
    }


def _pods(ns: Namespace, selector: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = get(ns, "pods", "-l", selector)["items"]
    return items


def _available(ns: Namespace, name: str) -> Any:
    obj = get(ns, "dnnd", name)
    return obj if condition(obj, "Available").get("status") == "True" else None


def _owned_by(obj: dict[str, Any], kind: str, name: str) -> bool:
    refs = obj["metadata"].get("ownerReferences") or []
    return any(r["kind"] == kind and r["name"] == name and r.get("controller") for r in refs)


@pytest.fixture
def restricted_ns(ns: Namespace) -> Namespace:
    ns.cluster.kubectl(
        "label",
        "namespace",
        ns.name,
        "pod-security.kubernetes.io/enforce=restricted",
        "pod-security.kubernetes.io/enforce-version=latest",
    )
    return ns


def test_every_pod_the_operator_creates_is_admitted_under_restricted(
    restricted_ns: Namespace, operator: OperatorProcess
) -> None:
    ns = restricted_ns
    # the admission check is on: a pod without the restricted settings is refused
    with pytest.raises(ClusterError) as refused:
        ns.kubectl("run", "plain", "--image=edgeai-worker:0.1.0", "--restart=Never")
    assert 'violates PodSecurity "restricted:latest"' in str(refused.value)
    assert get(ns, "pod", "plain") is None

    docs = list(yaml.safe_load_all((REPO_ROOT / "examples/digits-model.yaml").read_text()))
    apply(ns, *docs, _deployment("on-edge", ["edge"]), _deployment("on-cloud", ["cloud"]))
    apply(ns, _training_job())

    training = "edgeai.dev/training-job=digits-fl,edgeai.dev/training-role"
    kinds = {
        "preparation Job": "edgeai.dev/job=prepare",
        "device DaemonSet": "edgeai.dev/deployment=on-edge,edgeai.dev/tier=device",
        "edge Deployment": "edgeai.dev/deployment=on-edge,edgeai.dev/tier=edge",
        "cloud Deployment": "edgeai.dev/deployment=on-cloud,edgeai.dev/tier=cloud",
        "training aggregator": f"{training}=aggregator",
        "training worker": f"{training}=worker",
    }
    for what, selector in kinds.items():
        pods = wait_for(f"a {what} pod", lambda s=selector: _pods(ns, s), 240)
        for pod in pods:
            assert pod["spec"]["securityContext"]["runAsNonRoot"] is True, what
    # the zoo model is profiled per tier by Jobs, once it is prepared (a timer's tick)
    profile_jobs = wait_for(
        "the zoo model's profiling Jobs",
        lambda: [j for j in get(ns, "jobs")["items"] if "-profile-" in j["metadata"]["name"]],
        240,
    )
    for job in profile_jobs:
        name = job["metadata"]["name"]
        wait_for(f"{name}'s pod", lambda n=name: _pods(ns, f"batch.kubernetes.io/job-name={n}"))
    events = get(ns, "events")["items"]
    failed = [e["message"] for e in events if e["reason"] in ("FailedCreate", "ReconcileFailed")]
    assert failed == []

    # the stage certificates and NetworkPolicies, owned by their deployment
    wait_for("on-edge Available", lambda: _available(ns, "on-edge"), 240)
    for name in ("on-edge-stage-ca", "on-edge-device-tls", "on-edge-edge-tls"):
        secret = get(ns, "secret", name)
        assert secret is not None, name
        assert _owned_by(secret, "DNNDeployment", "on-edge"), name
    tls = get(ns, "secret", "on-edge-edge-tls")["data"]
    ca = get(ns, "secret", "on-edge-stage-ca")["data"]
    assert tls["ca.crt"] == ca["ca.crt"]
    assert sorted(tls) == ["ca.crt", "tls.crt", "tls.key"]
    policies = {
        p["metadata"]["name"]: p
        for p in get(ns, "networkpolicies", "-l", "edgeai.dev/deployment=on-edge")["items"]
    }
    assert sorted(policies) == ["on-edge-device-zone-a", "on-edge-edge-zone-a"]
    edge_policy = policies["on-edge-edge-zone-a"]
    assert _owned_by(edge_policy, "DNNDeployment", "on-edge")
    assert edge_policy["spec"]["ingress"][0] == {
        "from": [
            {
                "podSelector": {
                    "matchLabels": {
                        "edgeai.dev/deployment": "on-edge",
                        "edgeai.dev/tier": "device",
                        "edgeai.dev/zone": "zone-a",
                    }
                }
            }
        ],
        "ports": [{"protocol": "TCP", "port": 8443}],
    }


def _infer(
    url: str, x: np.ndarray, token: str | None, context: ssl.SSLContext | None = None
) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(
        f"{url}/v2/models/digits/infer", data=json_infer_body(x), headers=headers
    )
    try:
        with urllib.request.urlopen(req, timeout=60, context=context) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_stage_pods_serve_over_mtls_with_the_entry_token(
    ns: Namespace, operator: OperatorProcess, tmp_path: Path
) -> None:
    """The pods' own commands, with the Secrets the operator issued mounted: the device
    entry asks for the token and forwards to the edge over mutual TLS."""
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "camera-clients"},
        "data": {"token": base64.b64encode(TOKEN.encode()).decode()},
    }
    docs = list(yaml.safe_load_all((REPO_ROOT / "examples/digits-model.yaml").read_text()))
    auth = {"bearerTokenSecret": {"name": "camera-clients"}}
    apply(ns, secret, *docs, _deployment("guarded", ["edge"], entryAuth=auth))
    wait_for("guarded Available", lambda: _available(ns, "guarded"), 240)
    device = get(ns, "daemonset", "guarded-device-zone-a")["spec"]["template"]["spec"]
    args = device["containers"][0]["args"]
    assert "--next=https://guarded-edge-zone-a." + ns.name + ".svc:8443" in args
    selector = "edgeai.dev/deployment=guarded,edgeai.dev/zone=zone-a"
    x = np.random.default_rng(0).standard_normal((1, 1, 8, 8)).astype(np.float32)
    with ServiceProxy(ns) as proxy, ProcessKubelet(ns, selector, tmp_path, proxy) as kubelet:
        ip = wait_for("device and edge processes serving", kubelet.entry_ip, 180)
        url = f"http://{ip}:8080"
        status, body = _infer(url, x, None)
        assert status == 401, body
        status, body = _infer(url, x, "wrong")
        assert status == 403, body
        status, body = _infer(url, x, TOKEN)
        assert status == 200, body
        out = body["outputs"][0]
        assert out["shape"] == [1, 10]
        assert np.isfinite(np.asarray(out["data"], dtype=np.float32)).all()
        edge_ip = next(
            kubelet.procs[p["metadata"]["name"]][0]
            for p in _pods(ns, selector + ",edgeai.dev/tier=edge")
            if p["metadata"]["name"] in kubelet.procs
        )
        with urllib.request.urlopen(f"http://{edge_ip}:8080/metrics", timeout=5) as resp:
            edge_metrics = resp.read().decode()
    # the edge (stage 0; the device entry runs no layer) ran it once, over its TLS port:
    # inference on its plain port is refused
    assert 'edgeai_requests_total{code="200",stage="0"} 1' in edge_metrics.splitlines()


def _client(server_ca: bytes, tmp: Path, ca: tuple[bytes, bytes] | None) -> ssl.SSLContext:
    """A client trusting the deployment's CA (the entry's certificate), presenting a
    certificate of `ca` (none: no certificate)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # the entry's certificate names its stage as a URI
    ctx.load_verify_locations(cadata=server_ca.decode())
    if ca is not None:
        now = datetime.datetime.now(datetime.UTC)
        cert, key = issue_stage(*ca, "edgeai://apps/clients/camera", now)
        (tmp / "client.crt").write_bytes(cert)
        (tmp / "client.key").write_bytes(key)
        ctx.load_cert_chain(tmp / "client.crt", tmp / "client.key")
    return ctx


def test_the_entry_serves_only_client_certificates_of_the_named_ca(
    ns: Namespace, operator: OperatorProcess, tmp_path: Path
) -> None:
    """The pods' own commands with the clients' CA Secret mounted (the operator never
    reads it): the device entry serves its clients on 8443 and takes only certificates
    of that CA."""
    now = datetime.datetime.now(datetime.UTC)
    clients = issue_ca(Owner(name="clients", namespace="apps", uid="c-1"), now)
    strangers = issue_ca(Owner(name="strangers", namespace="apps", uid="c-2"), now)
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "camera-ca"},
        "data": {"ca.crt": base64.b64encode(clients[0]).decode()},
    }
    docs = list(yaml.safe_load_all((REPO_ROOT / "examples/digits-model.yaml").read_text()))
    auth = {"clientCASecret": {"name": "camera-ca"}}
    apply(ns, secret, *docs, _deployment("certified", ["edge"], entryAuth=auth))
    wait_for("certified Available", lambda: _available(ns, "certified"), 240)
    device = get(ns, "daemonset", "certified-device-zone-a")["spec"]["template"]["spec"]
    assert "--entry-client-ca=/etc/edgeai-entry-ca/ca.crt" in device["containers"][0]["args"]
    server_ca = base64.b64decode(get(ns, "secret", "certified-device-tls")["data"]["ca.crt"])
    selector = "edgeai.dev/deployment=certified,edgeai.dev/zone=zone-a"
    x = np.random.default_rng(1).standard_normal((1, 1, 8, 8)).astype(np.float32)
    with ServiceProxy(ns) as proxy, ProcessKubelet(ns, selector, tmp_path, proxy) as kubelet:
        ip = wait_for("device and edge processes serving", kubelet.entry_ip, 180)
        url = f"https://{ip}:8443"
        status, body = _infer(url, x, None, _client(server_ca, tmp_path, None))
        assert status == 401, body
        assert "client certificate" in body["error"]
        with pytest.raises((ssl.SSLError, ConnectionError, urllib.error.URLError)):
            _infer(url, x, None, _client(server_ca, tmp_path, strangers))
        status, body = _infer(url, x, None, _client(server_ca, tmp_path, clients))
        assert status == 200, body
        assert body["outputs"][0]["shape"] == [1, 10]
        # the plain port keeps health for probes and refuses inference
        status, body = _infer(f"http://{ip}:8080", x, None)
        assert status == 403, body
        with urllib.request.urlopen(f"http://{ip}:8080/metrics", timeout=5) as resp:
            metrics = resp.read().decode().splitlines()
    refused = [
        m for m in metrics if m.startswith('edgeai_auth_failures_total{reason="missing-cert"')
    ]
    assert [m.rsplit(" ", 1)[1] for m in refused] == ["1"], metrics
