"""The Helm chart as users install it: `helm lint`, the values schema refusing bad values
by name, what `helm template` renders for default and non-default values, every
rendered manifest accepted by the real API server (server-side dry run, strict field
validation), least-privilege RBAC checked with `kubectl auth can-i` as the chart's
ServiceAccount, and the operator run as that ServiceAccount preparing and serving a
model without one request refused."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from _cluster_support import Namespace, condition, get, wait_for
from edgeai_operator.localcluster import REPO_ROOT, LocalCluster, ensure_binaries, free_port
from edgeai_operator.localregistry import LocalRegistry

CHART = REPO_ROOT / "charts" / "edgeai-operator"
RELEASE = "edgeai"


@pytest.fixture(scope="module")
def helm() -> str:
    return str(ensure_binaries("helm") / "helm")


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=120, check=False)


def values_file(tmp_path: Path, values: dict[str, Any]) -> str:
    path = tmp_path / f"values-{len(list(tmp_path.glob('values-*')))}.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def render(
    helm: str,
    tmp_path: Path,
    values: dict[str, Any] | None = None,
    namespace: str = "edgeai-system",
) -> list[dict[str, Any]]:
    args = ["template", RELEASE, str(CHART), "--namespace", namespace]
    if values:
        args += ["--values", values_file(tmp_path, values)]
    done = run_helm(helm, *args)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def rules_of(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for d in docs if d["kind"] in ("Role", "ClusterRole") for r in d["rules"]]


NON_DEFAULT: dict[str, Any] = {
    "image": {"repository": "registry.example/edgeai-operator", "tag": "0.1.0-rc1"},
    "workerImage": "registry.example/edgeai-worker:0.1.0-rc1",
    "trainerImage": "registry.example/edgeai-trainer:0.1.0-rc1",
    "replicas": 3,
    "watchNamespaces": ["team-a", "team-b"],
    "resyncSeconds": 30,
    "artifactsUri": "oci://registry.example/edgeai-models",
    "caBundleConfigMap": "team-cas",
    "logFormat": "plain",
    "metrics": {"service": {"enabled": True, "port": 9100}},
}


def test_helm_lint_passes_with_default_and_non_default_values(helm: str, tmp_path: Path) -> None:
    for extra in ([], ["--values", values_file(tmp_path, NON_DEFAULT)]):
        done = run_helm(helm, "lint", "--strict", str(CHART), *extra)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "1 chart(s) linted, 0 chart(s) failed" in done.stdout


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"replicas": 0}, "replicas"),
        ({"replicas": "two"}, "replicas"),
        ({"logFormat": "xml"}, "logFormat"),
        ({"artifactsUri": "ftp://models.example/x"}, "artifactsUri"),
        ({"artifactsUri": "oci://registry.example/models:v1"}, "artifactsUri"),
        ({"caBundleConfigMap": "Team_CAs"}, "caBundleConfigMap"),
        ({"watchNamespaces": ["Team-A"]}, "watchNamespaces"),
        ({"image": {"repository": "", "tag": "1"}}, "image.repository"),
        ({"replica": 2}, "replica"),  # a misspelt key is refused, not ignored
        ({"metrics": {"serviceMonitor": {"interval": "often"}}}, "interval"),
    ],
)
def test_the_values_schema_refuses_bad_values_by_name(
    helm: str, tmp_path: Path, values: dict[str, Any], named: str
) -> None:
    done = run_helm(
        helm, "template", RELEASE, str(CHART), "--values", values_file(tmp_path, values)
    )
    assert done.returncode != 0
    assert "values don't meet the specifications of the schema" in done.stderr
    assert named.split(".")[-1] in done.stderr, done.stderr


def test_defaults_render_a_cluster_wide_operator_that_cannot_list_secrets(
    helm: str, tmp_path: Path
) -> None:
    docs = render(helm, tmp_path)
    (deployment,) = by_kind(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["serviceAccountName"] == RELEASE
    assert container["image"] == "edgeai-operator:0.1.0"
    assert "--peering=edgeai" in container["args"]
    assert not any(a.startswith("--namespace") for a in container["args"])
    assert {"name": "EDGEAI_WORKER_IMAGE", "value": "edgeai-worker:0.1.0"} in container["env"]
    assert {"name": "EDGEAI_TRAINER_IMAGE", "value": "edgeai-trainer:0.1.0"} in container["env"]
    assert not any(e["name"] == "EDGEAI_ARTIFACTS_URI" for e in container["env"])
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["resources"]["requests"] == {"cpu": "100m", "memory": "256Mi"}
    assert [d["metadata"]["name"] for d in by_kind(docs, "ClusterRole")] == [
        "edgeai-cluster",
        "edgeai",
    ]
    assert by_kind(docs, "Role") == []
    assert [d["metadata"]["name"] for d in by_kind(docs, "ClusterKopfPeering")] == ["edgeai"]
    (service,) = by_kind(docs, "Service")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 8090, "targetPort": "metrics"}]
    assert by_kind(docs, "ServiceMonitor") == []
    for rule in rules_of(docs):
        # the stage certificates it issues: read back by name, never listed or watched
        if "secrets" in rule["resources"]:
            assert rule["resources"] == ["secrets"]
            assert rule["verbs"] == ["get", "create", "patch"]
        assert "*" not in rule["resources"] + rule["verbs"] + rule["apiGroups"]


def test_watched_namespaces_get_roles_there_and_nothing_cluster_wide(
    helm: str, tmp_path: Path
) -> None:
    docs = render(helm, tmp_path, NON_DEFAULT)
    (deployment,) = by_kind(docs, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "registry.example/edgeai-operator:0.1.0-rc1"
    assert deployment["spec"]["replicas"] == 3
    args = container["args"]
    assert [a for a in args if a.startswith("--namespace")] == [
        "--namespace=team-a",
        "--namespace=team-b",
    ]
    assert "--log-format=plain" in args
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env == {
        "EDGEAI_WORKER_IMAGE": "registry.example/edgeai-worker:0.1.0-rc1",
        "EDGEAI_TRAINER_IMAGE": "registry.example/edgeai-trainer:0.1.0-rc1",
        "EDGEAI_RESYNC_SECONDS": "30",
        "EDGEAI_ARTIFACTS_URI": "oci://registry.example/edgeai-models",
        "EDGEAI_CA_BUNDLE_CONFIGMAP": "team-cas",
    }
    # only cluster-scoped kinds stay in a ClusterRole; the rest are Roles per namespace
    (cluster_role,) = by_kind(docs, "ClusterRole")
    assert cluster_role["metadata"]["name"] == "edgeai-cluster"
    cluster_resources = {r for rule in cluster_role["rules"] for r in rule["resources"]}
    assert cluster_resources == {
        "nodes",
        "namespaces",
        "customresourcedefinitions",
        "priorityclasses",
    }
    roles = by_kind(docs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    bindings = by_kind(docs, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for binding in bindings:
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": RELEASE, "namespace": "edgeai-system"}
        ]
    peerings = by_kind(docs, "KopfPeering")
    assert sorted(p["metadata"]["namespace"] for p in peerings) == ["team-a", "team-b"]
    assert by_kind(docs, "ClusterKopfPeering") == []
    (service,) = by_kind(docs, "Service")
    assert service["spec"]["ports"][0]["port"] == 9100


def test_a_service_monitor_selects_the_metrics_service(helm: str, tmp_path: Path) -> None:
    docs = render(
        helm,
        tmp_path,
        {
            "metrics": {
                "serviceMonitor": {"enabled": True, "interval": "15s", "labels": {"team": "ml"}}
            }
        },
    )
    (monitor,) = by_kind(docs, "ServiceMonitor")
    (service,) = by_kind(docs, "Service")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"] == [
        {"port": "metrics", "path": "/metrics", "interval": "15s"}
    ]
    assert monitor["metadata"]["labels"]["team"] == "ml"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["edgeai-system"]}
    off = render(helm, tmp_path, {"metrics": {"service": {"enabled": False}}})
    assert by_kind(off, "Service") == []


# --- against the real API server -------------------------------------------------------


@pytest.fixture
def namespaces(cluster: LocalCluster) -> Iterator[list[str]]:
    """The release namespace and two it may watch, fresh for the test."""
    suffix = os.urandom(3).hex()
    names = [f"edgeai-system-{suffix}", f"team-a-{suffix}", f"team-b-{suffix}"]
    for name in names:
        cluster.kubectl("create", "namespace", name)
    wait_for(
        "default service accounts",
        lambda: all(get(Namespace(cluster, n), "serviceaccount", "default") for n in names),
        30,
    )
    yield names
    for name in names:
        cluster.kubectl("delete", "namespace", name, "--wait=false")


def rendered_text(
    helm: str, tmp_path: Path, namespace: str, values: dict[str, Any], *, release: str
) -> str:
    done = run_helm(
        helm,
        "template",
        release,
        str(CHART),
        "--namespace",
        namespace,
        "--values",
        values_file(tmp_path, values),
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.cluster
def test_every_rendered_manifest_passes_the_api_servers_strict_validation(
    cluster: LocalCluster, helm: str, namespaces: list[str], tmp_path: Path
) -> None:
    release_ns, team_a, team_b = namespaces
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CHART / "crds"))
    for values in ({}, {**NON_DEFAULT, "watchNamespaces": [team_a, team_b]}):
        text = rendered_text(helm, tmp_path, release_ns, values, release=f"v{os.urandom(2).hex()}")
        out = cluster.kubectl(
            "apply", "--dry-run=server", "--validate=strict", "-f", "-", input_text=text
        )
        docs = [d for d in yaml.safe_load_all(text) if d]
        lines = out.splitlines()
        assert len(lines) == len(docs), out
        assert all(line.endswith("(server dry run)") for line in lines), out
    # and what the API server refuses, it names: a field the schema does not know
    bad = text.replace("serviceAccountName:", "serviceAccount_Name:", 1)
    refused = subprocess.run(
        [
            cluster.binary("kubectl"),
            "--kubeconfig",
            str(cluster.kubeconfig),
            "apply",
            "--dry-run=server",
            "--validate=strict",
            "-f",
            "-",
        ],
        input=bad,
        capture_output=True,
        text=True,
        check=False,
    )
    assert refused.returncode != 0
    assert 'unknown field "spec.template.spec.serviceAccount_Name"' in refused.stderr


@contextlib.contextmanager
def chart_rbac(
    cluster: LocalCluster, helm: str, tmp_path: Path, release_ns: str, watched: str
) -> Iterator[tuple[str, list[str]]]:
    """The chart's objects but its Deployment (kwok would run no process of it), applied
    for a fresh release watching `watched`; yields the release and its operator args.
    The cluster-scoped ones are deleted afterwards (the namespaces go with the test)."""
    release = f"r{os.urandom(2).hex()}"
    values = {"watchNamespaces": [watched], "replicas": 1}
    text = rendered_text(helm, tmp_path, release_ns, values, release=release)
    docs = [d for d in yaml.safe_load_all(text) if d]
    objs = [d for d in docs if d["kind"] != "Deployment"]
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    try:
        cluster.kubectl("apply", "-f", "-", input_text=yaml.safe_dump_all(objs))
        yield release, deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    finally:
        for d in objs:
            if d["kind"] in ("ClusterRole", "ClusterRoleBinding"):
                cluster.kubectl("delete", d["kind"].lower(), d["metadata"]["name"], check=False)


def can_i(cluster: LocalCluster, sa: str, *what: str) -> bool:
    out = cluster.kubectl("auth", "can-i", f"--as={sa}", *what, check=False).strip()
    return out == "yes"


@pytest.mark.cluster
def test_the_operators_service_account_may_do_its_job_and_nothing_else(
    cluster: LocalCluster, helm: str, namespaces: list[str], tmp_path: Path
) -> None:
    release_ns, team_a, team_b = namespaces
    with chart_rbac(cluster, helm, tmp_path, release_ns, team_a) as (release, _):
        sa = f"system:serviceaccount:{release_ns}:{release}"
        # what its job needs, in the namespace it watches
        for verb, resource in (
            ("create", "deployments.apps"),
            ("create", "jobs.batch"),
            ("patch", "dnndeployments.edgeai.dev/status"),
            ("create", "rolebindings.rbac.authorization.k8s.io"),
            ("watch", "pods"),
            ("create", "pods"),
            ("create", "poddisruptionbudgets.policy"),
            ("patch", "dnntrainingjobs.edgeai.dev/status"),
            # the stage certificates it issues, read back by name; stage NetworkPolicies
            ("create", "secrets"),
            ("get", "secrets/edgeai-demo-stage-ca"),
            ("patch", "secrets"),
            ("create", "networkpolicies.networking.k8s.io"),
            ("delete", "networkpolicies.networking.k8s.io"),
        ):
            assert can_i(cluster, sa, verb, resource, "-n", team_a), (verb, resource)
        assert can_i(cluster, sa, "list", "nodes")
        # and nothing more: no listing, watching, changing or deleting other Secrets,
        # no Secret in another namespace, nothing in other namespaces
        for args in (
            ("list", "secrets", "-n", team_a),
            ("watch", "secrets", "-n", team_a),
            ("update", "secrets", "-n", team_a),
            ("delete", "secrets", "-n", team_a),
            ("get", "secrets", "-n", team_b),
            ("create", "secrets", "-n", team_b),
            ("create", "pods", "--subresource=exec", "-n", team_a),
            ("list", "secrets", "--all-namespaces"),
            ("create", "deployments.apps", "-n", team_b),
            ("get", "configmaps", "-n", team_b),
            ("delete", "nodes"),
            ("create", "clusterroles.rbac.authorization.k8s.io"),
        ):
            assert not can_i(cluster, sa, *args), args


def token_kubeconfig(cluster: LocalCluster, namespace: str, account: str, path: Path) -> Path:
    token = cluster.kubectl("create", "token", account, "-n", namespace, "--duration=1h").strip()
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    cluster_entry = admin["clusters"][0]
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [cluster_entry],
        "users": [{"name": account, "user": {"token": token}}],
        "contexts": [
            {"name": account, "context": {"cluster": cluster_entry["name"], "user": account}}
        ],
        "current-context": account,
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.cluster
@pytest.mark.timeout(900)
def test_the_operator_as_the_charts_service_account_prepares_and_serves(
    cluster: LocalCluster,
    registry: LocalRegistry,
    helm: str,
    namespaces: list[str],
    tmp_path: Path,
) -> None:
    """The chart's RBAC is enough: the operator, holding only the chart's ServiceAccount
    token, prepares a model (its Job, ServiceAccount, Role, RoleBinding) and rolls out a
    deployment in the namespace it watches, and the API server refuses it nothing."""
    release_ns, team_a, _ = namespaces
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CHART / "crds"))
    log = tmp_path / "operator.log"
    proc: subprocess.Popen[bytes] | None = None
    with chart_rbac(cluster, helm, tmp_path, release_ns, team_a) as (release, args):
        operator_args = [a for a in args if not a.startswith(("--liveness", "--metrics-port"))]
        kubeconfig = token_kubeconfig(cluster, release_ns, release, tmp_path / "sa.kubeconfig")
        try:
            with log.open("wb") as out:
                proc = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "edgeai_operator.cli",
                        "operator",
                        *operator_args,
                        f"--metrics-port={free_port()}",
                    ],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env={
                        **os.environ,
                        "KUBECONFIG": str(kubeconfig),
                        "EDGEAI_PROFILE_POLL_SECONDS": "2",
                        "EDGEAI_RESYNC_SECONDS": "3",
                        "EDGEAI_ARTIFACTS_URI": f"oci://{registry.address}/edgeai-models",
                    },
                    start_new_session=True,
                )
            # the repository's examples, as a user applies them
            ns = Namespace(cluster, team_a)
            for example in ("digits-model.yaml", "digits-deployment.yaml"):
                ns.kubectl("apply", "-f", str(REPO_ROOT / "examples" / example))
            wait_for(
                "digits-reader Available",
                lambda: (
                    condition(get(ns, "dnnd", "digits-reader"), "Available").get("status") == "True"
                ),
                300,
            )
            model = get(ns, "dnnm", "digits")
            assert condition(model, "Prepared")["status"] == "True"
            assert model["status"]["variantNames"] == "fp32,int8,pruned-50"
            assert get(ns, "serviceaccount", "edgeai-prepare")
        finally:
            if proc is not None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    refused = [entry for entry in lines if "Forbidden" in json.dumps(entry)]
    assert lines, log.read_text()[-2000:]
    assert refused == [], refused[:3]


def objects_of(cluster: LocalCluster, release: str, namespaces: list[str]) -> list[str]:
    """Every object labelled as the release's, in `namespaces` and cluster-wide."""
    selector = f"app.kubernetes.io/instance={release}"
    kinds = "deployments,services,serviceaccounts,roles,rolebindings,kopfpeerings"
    found: list[str] = []
    for ns in namespaces:
        out = cluster.kubectl("get", kinds, "-n", ns, "-l", selector, "-o", "name")
        found += [f"{ns}/{line}" for line in out.split()]
    out = cluster.kubectl(
        "get", "clusterroles,clusterrolebindings,clusterkopfpeerings", "-l", selector, "-o", "name"
    )
    return found + out.split()


@pytest.mark.cluster
def test_helm_install_upgrade_and_uninstall_on_the_real_api_server(
    cluster: LocalCluster, helm: str, namespaces: list[str], tmp_path: Path
) -> None:
    release_ns, team_a, team_b = namespaces
    release = f"r{os.urandom(2).hex()}"
    kube = ["--kubeconfig", str(cluster.kubeconfig), "--namespace", release_ns]
    values = values_file(tmp_path, {"watchNamespaces": [team_a, team_b]})
    installed = run_helm(
        helm, "install", release, str(CHART), *kube, "--values", values, "--wait=false"
    )
    assert installed.returncode == 0, installed.stderr
    notes = installed.stdout.split("NOTES:", 1)[1]
    assert f"kubectl -n {release_ns} get pods -l app.kubernetes.io/instance={release}" in notes
    assert f"watching the namespaces {team_a}, {team_b}" in notes
    assert "edgeai.dev/tier=device" in notes
    assert "No artifactsUri is set" in notes
    assert f"port-forward svc/{release}-metrics 8090" in notes
    everything = objects_of(cluster, release, namespaces)
    assert f"{team_a}/role.rbac.authorization.k8s.io/{release}" in everything
    assert f"{team_b}/kopfpeering.kopf.dev/{release}" in everything
    assert f"clusterrole.rbac.authorization.k8s.io/{release}-cluster" in everything

    upgraded = run_helm(
        helm,
        "upgrade",
        release,
        str(CHART),
        *kube,
        "--values",
        values,
        "--set",
        "replicas=1,artifactsUri=oci://registry.example/edgeai-models",
    )
    assert upgraded.returncode == 0, upgraded.stderr
    assert "No artifactsUri is set" not in upgraded.stdout
    deployment = get(Namespace(cluster, release_ns), "deployment", release)
    assert deployment["spec"]["replicas"] == 1
    env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "EDGEAI_ARTIFACTS_URI", "value": "oci://registry.example/edgeai-models"} in env
    # one replica needs no peering: the upgrade removed both
    assert not any("kopfpeering" in o for o in objects_of(cluster, release, namespaces))

    removed = run_helm(helm, "uninstall", release, *kube, "--wait")
    assert removed.returncode == 0, removed.stderr
    assert objects_of(cluster, release, namespaces) == []
    listed = run_helm(helm, "list", *kube, "-q")
    assert release not in listed.stdout.split()
