"""Shared trunk stages (trunkplan.py): DNNDeployments with `sharing: backbone` whose
DNNModels share a verified trunk get one trunk stage per zone, each application's plan
runs trunk -> its own head, the trunk workload is owned by every user and routes to
each one's head. Pure parts on literals; `edgeai run-trunk` on the real digits files;
the whole on the real control plane with the stage pods' own commands as processes."""

from __future__ import annotations

import hashlib
import math
import urllib.error
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from _cluster_support import condition, dnn_model, get
from edgeai_operator.builders import DeploymentOptions, Owner, TrunkStage, trunk_children
from edgeai_operator.decide import DeploymentState, Observed, decide
from edgeai_operator.deployspec import parse_deployment
from edgeai_operator.errors import SpecError
from edgeai_operator.netpol import network_policies
from edgeai_operator.trunkcmd import cut_trunk
from edgeai_operator.trunkplan import (
    Peer,
    TrunkGroup,
    TrunkRecord,
    TrunkUser,
    peer_of,
    trunk_blocker,
    trunk_groups,
)
from test_decide import node

NS = "ns"
DIGEST = "sha256:" + "a" * 64
RECORD = TrunkRecord("digits", "t", "t", "sha256:trunk", "oci://reg/models:digits", DIGEST)
RECORDS = {"digits-parity": RECORD}
GROUP_A = "digits-trunk-zone-a-274d0c89"
GROUP_B = "digits-trunk-zone-b-f854e6ee"


NODES = [
    node("dev-a-0", "device", "zone-a", mbps=100.0, labels={"app": "cam"}),
    node("dev-a-1", "device", "zone-a", mbps=100.0),
    node("dev-b-0", "device", "zone-b", mbps=100.0),
    node("edge-a-0", "edge", "zone-a", mbps=100.0),
    node("edge-b-0", "edge", "zone-b", mbps=100.0),
    node("cloud-0", "cloud", None),
]
# cam serves digits on zone-a's camera; par serves digits-parity on every device
CAM = Peer("cam", "uid-cam", "digits", (("app", "cam"),))
PAR = Peer("par", "uid-par", "digits-parity", ())


def test_peers_of_one_trunk_compute_the_same_group_per_zone() -> None:
    from_cam = trunk_groups(CAM, [PAR], RECORDS, NODES)
    from_par = trunk_groups(PAR, [CAM], RECORDS, NODES)
    both = (TrunkUser("cam", "uid-cam", "digits"), TrunkUser("par", "uid-par", "digits-parity"))
    assert from_cam == {
        "zone-a": TrunkGroup(
            GROUP_A, "zone-a", "digits", "t", "sha256:trunk", RECORD.uri, DIGEST, both
        )
    }
    # par has devices in both zones; cam only in zone-a
    assert from_par["zone-a"] == from_cam["zone-a"]
    assert from_par["zone-b"].name == GROUP_B
    assert from_par["zone-b"].users == (TrunkUser("par", "uid-par", "digits-parity"),)
    assert from_cam["zone-a"].routes(NS) == {
        "digits": "http://cam-edge-zone-a.ns.svc:8080",
        "digits-parity": "http://par-edge-zone-a.ns.svc:8080",
    }


def test_what_shares_no_trunk() -> None:
    # a model no verified trunk names, a base whose record is gone, no deployment
    assert trunk_groups(Peer("x", "u", "other", ()), [CAM, PAR], RECORDS, NODES) == {}
    assert trunk_groups(CAM, [PAR], {}, NODES) == {}
    assert trunk_groups(None, [CAM, PAR], RECORDS, NODES) == {}
    # a trunk tensor named otherwise than the base's: the head could not read it
    renamed = {"digits-parity": TrunkRecord("digits", "mine", "t", "d", "u", DIGEST)}
    assert trunk_groups(PAR, [CAM], renamed, NODES) == {}
    # another trunk of the same base (another cut) is another group
    other = TrunkRecord("digits", "u2", "u2", "sha256:other", RECORD.uri, DIGEST)
    groups = trunk_groups(
        PAR,
        [CAM, Peer("ter", "uid-ter", "digits-tercile", ())],
        {**RECORDS, "digits-tercile": other},
        NODES,
    )
    assert [u.deployment for u in groups["zone-a"].users] == ["cam", "par"]
    # a zone whose edge server is not usable has no trunk stage
    down = [
        n if n.spec.name != "edge-a-0" else node("edge-a-0", "edge", "zone-a", ready=False)
        for n in NODES
    ]
    assert set(trunk_groups(PAR, [CAM], RECORDS, down)) == {"zone-b"}


def _body(name: str, model: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "edgeai.dev/v1alpha1",
        "kind": "DNNDeployment",
        "metadata": {"name": name, "namespace": NS, "uid": f"uid-{name}", "generation": 1},
        "spec": {
            "modelRef": {"name": model},
            "slo": {"latencyP95Ms": 400},
            "placement": {"tiers": ["device", "edge"]},
            "sharing": "backbone",
            "security": {"stageTLS": "disabled"},
            **spec,
        },
        "status": {},
    }


def test_a_peer_is_a_backbone_deployment_the_trunk_can_serve_as_is() -> None:
    spec = parse_deployment(_body("par", "digits-parity"))
    assert peer_of(spec, "uid-par", False) == PAR
    assert peer_of(spec, "uid-par", True) is None  # being deleted
    plain = parse_deployment(_body("par", "digits-parity", sharing="none"))
    assert peer_of(plain, "uid-par", False) is None
    private = parse_deployment(_body("par", "m", privacy={"rawInputStaysOnDevice": True}))
    assert trunk_blocker(private) == (
        "spec.privacy.rawInputStaysOnDevice: the trunk stage takes the raw input"
    )
    assert peer_of(private, "uid-par", False) is None
    device_only = parse_deployment(_body("par", "m", placement={"tiers": ["device"]}))
    assert trunk_blocker(device_only) == "spec.placement.tiers: the trunk stage runs on the edge"


# digits' shape: input -> t (the trunk, most FLOPs) -> output
PROFILE: dict[str, Any] = {
    "kind": "Profile",
    "model": "digits-parity",
    "variant": "fp32",
    "input": {"name": "input", "shape": [1, 1, 8, 8], "dtype": "FP32"},
    "host": {},
    "artifact": {"uri": "oci://reg/models:parity", "digest": "sha256:" + "b" * 64},
    "cuts": [
        {"index": 0, "tensors": ["input"], "sizeBytes": 256, "position": 0},
        {"index": 1, "tensors": ["t"], "sizeBytes": 2048, "position": 1},
        {"index": 2, "tensors": ["output"], "sizeBytes": 8, "position": 2},
    ],
    "segments": [
        {"index": 0, "positions": "0-0", "flops": 600_000},
        {"index": 1, "positions": "1-1", "flops": 200_000},
    ],
}


def _decide(peers: list[Peer]) -> tuple[Any, dict[tuple[str, str], dict[str, Any]]]:
    observed = Observed(
        body=_body("par", "digits-parity"),
        profiles=[PROFILE],
        nodes=NODES,
        image="img:1",
        now=0.0,
        peers=peers,
        trunk_records=RECORDS,
    )
    decision = decide(observed, DeploymentState())
    return decision, {(a.obj["kind"], a.obj["metadata"]["name"]): a.obj for a in decision.applies}


def test_a_plan_through_the_trunk_builds_trunk_head_and_entry() -> None:
    decision, applied = _decide([CAM, PAR])
    trunk = applied[("Deployment", GROUP_A)]
    args = trunk["spec"]["template"]["spec"]["containers"][0]["args"]
    assert [a for a in args if a.startswith("--route=")] == [
        "--route=digits=http://cam-edge-zone-a.ns.svc:8080",
        "--route=digits-parity=http://par-edge-zone-a.ns.svc:8080",
    ]
    assert trunk["metadata"]["ownerReferences"][0]["uid"] == "uid-par"
    assert ("Service", GROUP_A) in applied
    # the head: this deployment's own edge stage, the layers after the trunk
    head = applied[("Deployment", "par-edge-zone-a")]["spec"]["template"]["spec"]
    assert head["containers"][0]["args"][:3] == [
        "run-stage",
        "--plan=/etc/edgeai/plan-zone-a.yaml",
        "--stage=1",
    ]
    # the device entry forwards the raw input to the trunk
    entry = applied[("DaemonSet", "par-device-zone-a")]["spec"]["template"]["spec"]
    assert entry["containers"][0]["args"][:2] == [
        "run-stage",
        "--plan=/etc/edgeai/plan-zone-a.yaml",
    ]
    assert "--stage=-1" in entry["containers"][0]["args"]
    assert f"--next=http://{GROUP_A}.ns.svc:8080" in entry["containers"][0]["args"]
    # no edge stage of its own runs the whole model in zone-a
    assert ("Deployment", GROUP_B) in applied  # zone-b: par alone on its trunk
    zones = decision.status["plan"]["zones"]
    assert zones["zone-a"]["trunk"] == GROUP_A
    assert zones["zone-a"]["split"] == "edge:0-0 > edge:1-1"
    assert zones["zone-b"]["trunk"] == GROUP_B
    plan = applied[("ConfigMap", "par-plan")]["data"]["plan-zone-a.yaml"]
    assert f"workload: {GROUP_A}" in plan
    assert decision.status["replicas"].split() == [
        f"{GROUP_A}:0/0",
        f"{GROUP_B}:0/0",
        "device-zone-a:0/0",
        "device-zone-b:0/0",
        "edge-zone-a:0/0",
        "edge-zone-b:0/0",
    ]


def test_the_trunk_plan_splits_the_edge_compute_by_flops() -> None:
    decision, _ = _decide([CAM, PAR])
    stages = decision.status["plan"]["stages"]
    assert [(s["tier"], s["inputs"], s["outputs"]) for s in stages] == [
        ("edge", ["input"], ["t"]),
        ("edge", ["t"], ["output"]),
    ]
    trunk_ms, head_ms = stages[0]["computeMs"], stages[1]["computeMs"]
    assert trunk_ms == pytest.approx(3 * head_ms, rel=1e-3)  # 600k vs 200k FLOPs


def test_the_trunk_scales_on_its_own_pods_which_carry_every_users_load() -> None:
    from edgeai_operator.autoscaler import Scrape

    pod = {
        "metadata": {
            "name": f"{GROUP_A}-x",
            "labels": {"edgeai.dev/backbone": GROUP_A, "edgeai.dev/tier": "edge"},
        },
        "status": {"phase": "Running", "podIP": "127.244.0.9"},
    }
    state = DeploymentState()
    decisions = []
    for i, now in enumerate((100.0, 103.0)):
        n = 100.0 * i  # every request so far took between 2.5 and 5 s
        scrape = Scrape(buckets={2.5: 0.0, 5.0: n, 10.0: n, math.inf: n}, in_flight=0.0)
        observed = Observed(
            body=_body("par", "digits-parity"),
            profiles=[PROFILE],
            nodes=NODES,
            image="img:1",
            now=now,
            pods=[pod],
            scrapes={f"{GROUP_A}-x": scrape},
            peers=[CAM, PAR],
            trunk_records=RECORDS,
        )
        decision = decide(observed, state)
        state = decision.state
        decisions.append(decision)
    scales = [(s.workload, s.from_replicas, s.to_replicas) for d in decisions for s in d.scales]
    assert scales == [(GROUP_A, 1, 2)]
    trunk = next(a.obj for a in decisions[-1].applies if a.obj["metadata"]["name"] == GROUP_A)
    assert trunk["metadata"]["annotations"] == {"replicas.edgeai.dev/par": "2"}
    assert trunk["spec"]["replicas"] == 2
    stages = decisions[-1].status["observed"]["stages"]
    # its target: the SLO (400 ms) less the device -> edge transfer (5 ms RTT and more)
    (uplink,) = decisions[-1].status["plan"]["transfers"]
    assert (uplink["from"], uplink["to"]) == ("device", "edge")
    assert uplink["ms"] > 5
    assert stages[GROUP_A]["targetMs"] == round(400 - uplink["ms"], 2)


def test_trunk_children_literal() -> None:
    trunk = TrunkStage(
        GROUP_A,
        "zone-a",
        "digits",
        "t",
        "oci://reg/models:digits",
        DIGEST,
        (("digits", "http://cam-edge-zone-a.ns.svc:8080"),),
    )
    opts = DeploymentOptions(image="img:1", priority_class="edgeai-priority-5")
    deployment, service = trunk_children(Owner("cam", NS, "uid-cam"), trunk, 2, opts)
    labels = {
        "app.kubernetes.io/managed-by": "edgeai-operator",
        "app.kubernetes.io/name": "edgeai-worker",
        "app.kubernetes.io/instance": GROUP_A,
        "edgeai.dev/shared": "true",
        "edgeai.dev/backbone": GROUP_A,
        "edgeai.dev/model": "digits",
        "edgeai.dev/tier": "edge",
        "edgeai.dev/zone": "zone-a",
        "edgeai.dev/stage": "trunk",
    }
    owner = {
        "apiVersion": "edgeai.dev/v1alpha1",
        "kind": "DNNDeployment",
        "name": "cam",
        "uid": "uid-cam",
        "controller": False,
        "blockOwnerDeletion": True,
    }
    assert deployment["metadata"] == {
        "name": GROUP_A,
        "namespace": NS,
        "labels": labels,
        "ownerReferences": [owner],
        "annotations": {"replicas.edgeai.dev/cam": "2"},
    }
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["selector"] == {"matchLabels": {"edgeai.dev/backbone": GROUP_A}}
    template = deployment["spec"]["template"]
    assert template["metadata"] == {
        "labels": labels,
        "annotations": {"edgeai.dev/model-digest": DIGEST},
    }
    pod = template["spec"]
    assert pod["containers"][0]["args"] == [
        "run-trunk",
        "--upto=t",
        f"--digest={DIGEST}",
        "--port=8080",
        "--host=0.0.0.0",
        "--route=digits=http://cam-edge-zone-a.ns.svc:8080",
        "--model-file=/var/lib/edgeai/model/model.onnx",
    ]
    assert pod["initContainers"][0]["args"] == [
        "fetch",
        "oci://reg/models:digits",
        "--sha256=" + "a" * 64,
        "--out=/var/lib/edgeai/model",
        "--file-name=model.onnx",
        "--pvc-root=/mnt/pvc",
    ]
    assert pod["volumes"] == [{"name": "model", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}]
    assert "priorityClassName" not in pod  # it serves every user, of any priority
    assert service == {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": GROUP_A,
            "namespace": NS,
            "labels": labels,
            "ownerReferences": [owner],
        },
        "spec": {
            "selector": {"edgeai.dev/backbone": GROUP_A},
            "ports": [{"name": "http", "port": 8080, "targetPort": "http"}],
        },
    }


def test_the_head_admits_the_trunk_and_the_entry_reaches_it() -> None:
    _, applied = _decide([CAM, PAR])
    children = list(applied.values())
    policies = {
        p["metadata"]["name"]: p["spec"]
        for p in network_policies(Owner("par", NS, "uid-par"), children)
    }
    assert GROUP_A not in policies  # shared: no policy of one user
    assert policies["par-edge-zone-a"]["ingress"][0] == {
        "from": [{"podSelector": {"matchLabels": {"edgeai.dev/backbone": GROUP_A}}}],
        "ports": [{"protocol": "TCP", "port": 8080}],
    }
    assert policies["par-device-zone-a"]["egress"][0] == {
        "to": [{"podSelector": {"matchLabels": {"edgeai.dev/backbone": GROUP_A}}}],
        "ports": [{"protocol": "TCP", "port": 8080}],
    }


def test_run_trunk_cuts_the_verified_base_up_to_the_tensor(tmp_path: Path) -> None:
    from _worker_support import run_onnx
    from edgeai_worker import trunks, zoo

    base = zoo.export_onnx("digits_cnn", trained=True)
    digest = "sha256:" + hashlib.sha256(base.read_bytes()).hexdigest()
    path = cut_trunk(base, digest, trunks.TRUNK_TENSOR, tmp_path)
    trunk = onnx.load(str(path))
    assert [o.name for o in trunk.graph.output] == [trunks.TRUNK_TENSOR]
    _, _, x_test, _ = zoo.digits_split()
    x = x_test[:4]
    # the trunk's output is what the base computes at that tensor
    full = onnx.load(str(base))
    full.graph.output.append(onnx.ValueInfoProto(name=trunks.TRUNK_TENSOR))
    probe = tmp_path / "probe.onnx"
    onnx.save(full, str(probe))
    expected = run_onnx(probe, {"input": x})[-1]
    np.testing.assert_array_equal(run_onnx(path, {"input": x})[0], expected)
    with pytest.raises(SpecError) as caught:
        cut_trunk(base, "sha256:" + "0" * 64, trunks.TRUNK_TENSOR, tmp_path)
    assert caught.value.field == "--model-file"
    with pytest.raises(SpecError) as caught:
        cut_trunk(base, digest, "no-such-tensor", tmp_path)
    assert caught.value.field == "--upto"


# ---------------------------------------------------------------------------
# Against the real control plane, the stage pods' commands run as processes

DEVICE = "device-zone-a-0"


def _application(name: str, model: str) -> dict[str, Any]:
    body = _body(name, model)
    spec = body["spec"]
    spec["slo"] = {"latencyP95Ms": 500}
    spec["devices"] = {"nodeSelector": {"kubernetes.io/hostname": DEVICE}}
    spec["autoscaling"] = {"minReplicas": 1, "maxReplicas": 1}
    return {k: body[k] for k in ("apiVersion", "kind")} | {"metadata": {"name": name}, "spec": spec}


def _args(workload: dict[str, Any]) -> list[str]:
    return list(workload["spec"]["template"]["spec"]["containers"][0]["args"])


def _trunk_workloads(ns: Any) -> list[dict[str, Any]]:
    """The namespace's trunk Deployments not being deleted."""
    items = get(ns, "deployments", "-l", "edgeai.dev/stage=trunk")["items"]
    return [d for d in items if not d["metadata"].get("deletionTimestamp")]


def _trunk_shared_by(ns: Any, n: int) -> Any:
    """The one trunk Deployment once it has n owners and n routes, else a falsy value."""
    items = _trunk_workloads(ns)
    if len(items) != 1:
        return None
    refs = items[0]["metadata"].get("ownerReferences", [])
    routes = [a for a in _args(items[0]) if a.startswith("--route=")]
    return len(refs) == n and len(routes) == n and items[0]


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_two_applications_share_one_trunk_stage(ns: Any, operator: Any, tmp_path: Path) -> None:
    from _cluster_support import apply, wait_for
    from _process_kubelet import ProcessKubelet, ServiceProxy
    from _serving import infer
    from _worker_support import run_onnx
    from edgeai_worker import trunks, zoo

    parity = trunks.digits_head("parity")
    ns.kubectl("create", "configmap", "parity-onnx", f"--from-file=model.onnx={parity}")
    source = {
        "uri": "configmap://parity-onnx/model.onnx",
        "sha256": hashlib.sha256(parity.read_bytes()).hexdigest(),
    }
    base = {"modelRef": {"name": "digits"}, "sharedUpTo": trunks.TRUNK_TENSOR}
    apply(
        ns,
        dnn_model("digits", {"zoo": "digits_cnn"}),
        dnn_model("digits-parity", source, base=base),
        _application("cam", "digits"),
        _application("par", "digits-parity"),
    )

    trunk = wait_for(
        "one trunk Deployment with two owners and two routes", lambda: _trunk_shared_by(ns, 2), 600
    )
    name = trunk["metadata"]["name"]
    assert name.startswith("digits-trunk-zone-a-")
    uids = {get(ns, "dnnd", n)["metadata"]["uid"]: n for n in ("cam", "par")}
    assert {r["uid"] for r in trunk["metadata"]["ownerReferences"]} == set(uids)
    assert [a for a in _args(trunk) if a.startswith("--route=")] == [
        f"--route=digits=http://cam-edge-zone-a.{ns.name}.svc:8080",
        f"--route=digits-parity=http://par-edge-zone-a.{ns.name}.svc:8080",
    ]
    assert get(ns, "service", name) is not None
    for app in ("cam", "par"):

        def planned(a: str = app) -> Any:
            obj = get(ns, "dnnd", a)
            zone = (obj or {}).get("status", {}).get("plan", {}).get("zones", {}).get("zone-a")
            return zone and zone.get("trunk") == name and obj

        obj = wait_for(f"{app}'s plan through the trunk", planned, 120)
        stages = obj["status"]["plan"]["stages"]
        assert (stages[0]["tier"], stages[0]["outputs"]) == ("edge", [trunks.TRUNK_TENSOR])
        assert (stages[1]["tier"], stages[1]["inputs"]) == ("edge", [trunks.TRUNK_TENSOR])
        assert f"{name}:" in obj["status"]["replicas"]
        entry = get(ns, "daemonset", f"{app}-device-zone-a")
        assert f"--next=http://{name}.{ns.name}.svc:8080" in _args(entry)
        head = get(ns, "deployment", f"{app}-edge-zone-a")
        assert "--stage=1" in _args(head)

    full = {"digits": zoo.export_onnx("digits_cnn", trained=True), "digits-parity": parity}
    _, _, x_test, _ = zoo.digits_split()
    selector = "app.kubernetes.io/name=edgeai-worker"
    with ServiceProxy(ns) as proxy, ProcessKubelet(ns, selector, tmp_path, proxy) as kubelet:

        def entries(routes: int) -> dict[str, str] | None:
            """Each application's entry URL, once its entry and head pods and a trunk pod
            with `routes` routes have processes that pass their probes."""
            pods = get(ns, "pods", "-l", selector)["items"]
            serving = [
                p
                for p in pods
                if kubelet.serving.get(p["metadata"]["name"])
                and not p["metadata"].get("deletionTimestamp")
            ]
            roles = [(p["metadata"]["labels"], p) for p in serving]
            trunk_ready = any(
                lbls.get("edgeai.dev/stage") == "trunk"
                and sum(a.startswith("--route=") for a in p["spec"]["containers"][0]["args"])
                == routes
                for lbls, p in roles
            )
            heads = {
                lbls.get("edgeai.dev/deployment")
                for lbls, _ in roles
                if lbls.get("edgeai.dev/stage") == "1"
            }
            urls = {
                lbls["edgeai.dev/deployment"]: f"http://{p['status']['podIP']}:8080"
                for lbls, p in roles
                if lbls.get("edgeai.dev/tier") == "device"
                and lbls["edgeai.dev/deployment"] in heads
            }
            return urls if trunk_ready and len(urls) == routes else None

        def routed(url: str, model: str, x: Any) -> Any:
            """The answer once the chain routes this model: the Service proxy may still
            send to the trunk pod the roll replaces (its routes lack the new app), which
            the entry reports as 502 for a moment."""

            def answer() -> tuple[Any] | None:
                try:
                    return (infer(url, model, x, input_name="input"),)
                except urllib.error.HTTPError as err:
                    if err.code != 502:
                        raise
                    return None

            return wait_for(f"{model} routed through the trunk", answer, 60)[0]

        urls = wait_for("entries, heads and the trunk serving", lambda: entries(2), 300)
        for app, model in (("cam", "digits"), ("par", "digits-parity")):
            for i in range(4):
                x = x_test[i : i + 1]
                got = routed(urls[app], model, x)
                want = run_onnx(full[model], {"input": x})[0]
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

        ns.kubectl("delete", "dnnd", "cam", "--timeout=60s")
        trunk = wait_for(
            "the trunk kept with one owner and one route", lambda: _trunk_shared_by(ns, 1), 180
        )
        assert trunk["metadata"]["name"] == name
        assert (
            trunk["metadata"]["ownerReferences"][0]["uid"]
            == get(ns, "dnnd", "par")["metadata"]["uid"]
        )
        assert [a for a in _args(trunk) if a.startswith("--route=")] == [
            f"--route=digits-parity=http://par-edge-zone-a.{ns.name}.svc:8080"
        ]
        urls = wait_for("par served through the rolled trunk", lambda: entries(1), 300)
        x = x_test[10:11]
        got = routed(urls["par"], "digits-parity", x)
        np.testing.assert_allclose(got, run_onnx(parity, {"input": x})[0], rtol=1e-5, atol=1e-5)

        ns.kubectl("delete", "dnnd", "par", "--timeout=60s")
        wait_for("the trunk garbage-collected", lambda: not _trunk_workloads(ns), 120)
        wait_for("its Service gone", lambda: get(ns, "service", name) is None, 60)


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_trunk_is_detected_without_spec_base_and_shared(ns: Any, operator: Any) -> None:
    """The parity application names no base: its preparation finds that its graph up to
    the trunk tensor is digits' (same ops, same weights), records it, and the two
    backbone deployments share one trunk stage as with spec.base."""
    from _cluster_support import apply, wait_for
    from edgeai_worker import trunks

    parity = trunks.digits_head("parity")
    ns.kubectl("create", "configmap", "parity-onnx", f"--from-file=model.onnx={parity}")
    source = {
        "uri": "configmap://parity-onnx/model.onnx",
        "sha256": hashlib.sha256(parity.read_bytes()).hexdigest(),
    }

    def prepared(name: str) -> Any:
        obj = get(ns, "dnnmodel", name)
        return condition(obj, "Prepared").get("status") == "True" and obj

    # the base first: the model prepared second names the one prepared first
    apply(ns, dnn_model("digits", {"zoo": "digits_cnn"}))
    digits = wait_for("digits Prepared", lambda: prepared("digits"), 300)
    assert "trunk" not in digits["status"]
    apply(ns, dnn_model("digits-parity", source))
    model = wait_for("digits-parity Prepared", lambda: prepared("digits-parity"), 300)
    trunk = model["status"]["trunk"]
    assert (trunk["model"], trunk["detected"]) == ("digits", True)
    # the deepest shared cut: the head's Flatten right after the frozen features has no
    # weights, so the graphs are still the same one cut past the trunk tensor
    profile = next(p for p in digits["status"]["profiles"] if p.get("build", "fp32") == "fp32")
    cuts = [c["tensors"] for c in profile["cuts"]]
    assert cuts.index([trunks.TRUNK_TENSOR]) + 1 == cuts.index([trunk["baseTensor"]])
    assert trunk["sharedUpTo"].endswith("Flatten_output_0"), trunk
    assert trunk["digest"] in profile["prefixDigests"]
    assert trunk["baseArtifact"] == profile["artifact"]
    prepared_message = next(
        c["message"] for c in model["status"]["conditions"] if c["type"] == "Prepared"
    )
    assert f"computes DNNModel digits's graph up to {trunk['sharedUpTo']}" in prepared_message
    # the digits model keeps no trunk of its own: nothing names the other both ways
    assert "trunk" not in get(ns, "dnnmodel", "digits")["status"]

    apply(ns, _application("cam", "digits"), _application("par", "digits-parity"))

    # each member applies the workload with its own owner reference: both owners and
    # both routes once both have applied it
    workload = wait_for(
        "one trunk Deployment with both applications", lambda: _trunk_shared_by(ns, 2), 600
    )
    assert [a for a in _args(workload) if a.startswith("--route=")] == [
        f"--route=digits=http://cam-edge-zone-a.{ns.name}.svc:8080",
        f"--route=digits-parity=http://par-edge-zone-a.{ns.name}.svc:8080",
    ]
