"""A real Kubernetes control plane on loopback, with kwok simulating the nodes.

etcd, kube-apiserver, kube-controller-manager and kube-scheduler are the real
binaries built by `hack/build-binaries.sh`; kwok simulates kubelets (node heartbeats
and pod lifecycles) for nodes created from a topology file. Used by `edgeai cluster
up|down`, `make cluster-up` and the test fixture in `tests/conftest.py`.

Every process runs in its own session and is recorded in `<workdir>/pids.json`, so a
different process (`edgeai cluster down`) can stop what `edgeai cluster up` started.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from edgeai_operator.preparation import JOB_KIND, JOB_LABEL
from edgeai_operator.topology import KWOK_ANNOTATION, Topology, load_topology

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_WORKDIR = REPO_ROOT / ".cluster"
DEFAULT_TOPOLOGY = REPO_ROOT / "hack" / "topology.yaml"
BUILD_SCRIPT = REPO_ROOT / "hack" / "build-binaries.sh"
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
SERVICE_CIDR = "10.96.0.0/16"
# Pod IPs kwok hands out are loopback addresses: nothing on this machine ever sends
# traffic to a private range, and a test can serve a pod's IP with a real process
# (127.0.0.0/8 is all local on Linux).
POD_CIDR = "127.244.0.0/16"
# kwok stock stages: node initialisation, lease heartbeats, the general pod lifecycle,
# and the node-not-ready chaos stage (kwok keeps renewing a node's lease as long as it
# runs, so a single node fails by this stage's label, see `fail_node`).
NODE_FAILURE_LABEL = "node-not-ready.stage.kwok.x-k8s.io"
KWOK_STAGES = (
    "node/fast/node-initialize.yaml",
    "node/chaos/node-not-ready.yaml",
    "node/heartbeat-with-lease/node-heartbeat-with-lease.yaml",
    "pod/general/pod-create.yaml",
    "pod/general/pod-init-container-running.yaml",
    "pod/general/pod-init-container-completed.yaml",
    "pod/general/pod-ready.yaml",
    "pod/general/pod-complete.yaml",
    "pod/general/pod-delete.yaml",
)


def _stage_text(path: Path) -> str:
    """A stock kwok stage; pod-complete leaves the pods of preparation Jobs alone, since
    `jobrunner` runs them and reports how they ended."""
    text = path.read_text()
    if path.name != "pod-complete.yaml":
        return text
    stage = yaml.safe_load(text)
    stage["spec"]["selector"]["matchExpressions"].append(
        {"key": f'.metadata.labels["{JOB_LABEL}"]', "operator": "NotIn", "values": [JOB_KIND]}
    )
    return str(yaml.safe_dump(stage, sort_keys=False))


def log(message: str) -> None:
    print(f"[cluster {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def ensure_binaries(*groups: str) -> Path:
    """Builds or reuses the pinned binaries (only `groups` of hack/build-binaries.sh when
    given); returns their directory. EDGEAI_BIN_DIR names a prepared one instead."""
    override = os.environ.get("EDGEAI_BIN_DIR")
    if override:
        return Path(override)
    out = subprocess.run(
        ["bash", str(BUILD_SCRIPT), *groups], check=True, stdout=subprocess.PIPE, text=True
    ).stdout
    return Path(out.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Ports:
    etcd_client: int = field(default_factory=free_port)
    etcd_peer: int = field(default_factory=free_port)
    apiserver: int = field(default_factory=free_port)
    controller_manager: int = field(default_factory=free_port)
    scheduler: int = field(default_factory=free_port)
    kwok: int = field(default_factory=free_port)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def write_pki(pki: Path) -> None:
    """A CA, the apiserver's serving cert, an admin client cert and the service-account keys."""
    pki.mkdir(parents=True, exist_ok=True)
    if (pki / "operator.crt").exists():
        return
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "3650",
        "-subj",
        "/CN=edgeai-local-ca",
        cwd=pki,
    )
    sans = (
        "subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,"
        "DNS:kubernetes.default,DNS:kubernetes.default.svc,"
        "DNS:kubernetes.default.svc.cluster.local"
    )
    for name, subject, ext in (
        ("apiserver", "/CN=kube-apiserver", sans),
        ("admin", "/O=system:masters/CN=edgeai-admin", "extendedKeyUsage=clientAuth"),
        # The operator's own identity, so audit logs can tell its requests apart.
        ("operator", "/O=system:masters/CN=edgeai-operator", "extendedKeyUsage=clientAuth"),
    ):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            subject,
            cwd=pki,
        )
        (pki / f"{name}.ext").write_text(ext + "\n")
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.crt",
            "-days",
            "3650",
            "-extfile",
            f"{name}.ext",
            cwd=pki,
        )
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)


def kubeconfig_dict(server: str, pki: Path, user: str = "admin") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "edgeai-local",
                "cluster": {"server": server, "certificate-authority": str(pki / "ca.crt")},
            }
        ],
        "users": [
            {
                "name": "edgeai-admin",
                "user": {
                    "client-certificate": str(pki / f"{user}.crt"),
                    "client-key": str(pki / f"{user}.key"),
                },
            }
        ],
        "contexts": [
            {"name": "edgeai-local", "context": {"cluster": "edgeai-local", "user": "edgeai-admin"}}
        ],
        "current-context": "edgeai-local",
    }


class ClusterError(RuntimeError):
    pass


class LocalCluster:
    """Starts and stops the control plane; `kubeconfig` is ready once `start()` returns."""

    def __init__(
        self,
        workdir: Path = DEFAULT_WORKDIR,
        *,
        bin_dir: Path | None = None,
        node_monitor_grace_period_s: int = 40,
        apiserver_args: tuple[str, ...] = (),
    ) -> None:
        self.workdir = workdir
        self.bin_dir = bin_dir or ensure_binaries()
        self.pki = workdir / "pki"
        self.kubeconfig = workdir / "kubeconfig"
        # Same cluster, the operator's client certificate (user edgeai-operator).
        self.operator_kubeconfig = workdir / "operator.kubeconfig"
        self.apiserver_args = apiserver_args
        self.logs = workdir / "logs"
        self.pid_file = workdir / "pids.json"
        self.ports = Ports()
        self.node_monitor_grace_period_s = node_monitor_grace_period_s
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports.apiserver}"

    def binary(self, name: str) -> str:
        path = self.bin_dir / name
        if not path.exists():
            raise ClusterError(f"{path} missing: run hack/build-binaries.sh")
        return str(path)

    def kubectl(self, *args: str, input_text: str | None = None, check: bool = True) -> str:
        result = subprocess.run(
            [self.binary("kubectl"), "--kubeconfig", str(self.kubeconfig), *args],
            input=input_text,
            capture_output=True,
            text=True,
            check=False,
        )
        if check and result.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def _spawn(self, name: str, args: list[str], program: list[str] | None = None) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        out = (self.logs / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(
            [*(program or [self.binary(name)]), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        out.close()
        self.pid_file.write_text(json.dumps({n: p.pid for n, p in self.procs.items()}))

    def _wait(self, name: str, check: Any, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None:
                tail = (self.logs / f"{name}.log").read_text(errors="replace")[-3000:]
                raise ClusterError(f"{name} exited with {proc.returncode}:\n{tail}")
            with contextlib.suppress(OSError, urllib.error.URLError, ssl.SSLError):
                if check():
                    return
            time.sleep(0.2)
        raise ClusterError(f"{name} not healthy after {timeout_s:.0f}s; see {self.logs}")

    def _https_ok(self, port: int, path: str, *, client_cert: bool) -> bool:
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        if client_cert:
            ctx.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
        else:  # controller-manager and scheduler serve self-signed certs
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        with urllib.request.urlopen(
            f"https://127.0.0.1:{port}{path}", context=ctx, timeout=2
        ) as resp:
            return bool(resp.status == 200)

    def start(self, topology: Topology | None = None) -> None:
        t0 = time.monotonic()
        if self.pid_file.exists() and any(_alive(p) for p in _read_pids(self.pid_file).values()):
            raise ClusterError(
                f"a cluster is already running from {self.workdir}; run `edgeai cluster down` first"
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Every `up` is a fresh cluster: state from an earlier run would clash with
        # the topology's nodes.
        shutil.rmtree(self.workdir / "etcd-data", ignore_errors=True)
        write_pki(self.pki)
        self.kubeconfig.write_text(yaml.safe_dump(kubeconfig_dict(self.server, self.pki)))
        self.operator_kubeconfig.write_text(
            yaml.safe_dump(kubeconfig_dict(self.server, self.pki, "operator"))
        )
        try:
            self._start_components()
            if topology is not None:
                self.create_nodes(topology)
        except BaseException:
            self.stop()
            raise
        log(f"control plane ready in {time.monotonic() - t0:.1f}s; KUBECONFIG={self.kubeconfig}")

    def _start_components(self) -> None:
        p, pki, data = self.ports, self.pki, self.workdir / "etcd-data"
        self._spawn(
            "etcd",
            [
                "--name=edgeai",
                f"--data-dir={data}",
                "--log-level=warn",
                "--unsafe-no-fsync",
                f"--listen-client-urls=http://127.0.0.1:{p.etcd_client}",
                f"--advertise-client-urls=http://127.0.0.1:{p.etcd_client}",
                f"--listen-peer-urls=http://127.0.0.1:{p.etcd_peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{p.etcd_peer}",
                f"--initial-cluster=edgeai=http://127.0.0.1:{p.etcd_peer}",
            ],
        )
        self._wait(
            "etcd",
            lambda: (
                urllib.request.urlopen(f"http://127.0.0.1:{p.etcd_client}/health", timeout=2).status
                == 200
            ),
            30,
        )
        log("etcd healthy")
        self._spawn(
            "kube-apiserver",
            [
                f"--etcd-servers=http://127.0.0.1:{p.etcd_client}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={p.apiserver}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--authorization-mode=RBAC",
                "--allow-privileged=true",
                "--endpoint-reconciler-type=none",
                "--profiling=false",
                "--v=1",
                *self.apiserver_args,
            ],
        )
        self._wait(
            "kube-apiserver", lambda: self._https_ok(p.apiserver, "/readyz", client_cert=True), 90
        )
        log("kube-apiserver ready")
        kc = str(self.kubeconfig)
        self._spawn(
            "kube-controller-manager",
            [
                f"--kubeconfig={kc}",
                f"--authentication-kubeconfig={kc}",
                f"--authorization-kubeconfig={kc}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={p.controller_manager}",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={pki / 'ca.crt'}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--node-monitor-period=2s",
                f"--node-monitor-grace-period={self.node_monitor_grace_period_s}s",
                f"--node-startup-grace-period={self.node_monitor_grace_period_s}s",
                "--profiling=false",
                "--v=1",
            ],
        )
        self._spawn(
            "kube-scheduler",
            [
                f"--kubeconfig={kc}",
                f"--authentication-kubeconfig={kc}",
                f"--authorization-kubeconfig={kc}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={p.scheduler}",
                "--v=1",
            ],
        )
        stages = self.workdir / "kwok-stages.yaml"
        stage_root = self.bin_dir.parent / "kwok-stages"
        stages.write_text("\n---\n".join(_stage_text(stage_root / s) for s in KWOK_STAGES))
        self._spawn(
            "kwok",
            [
                f"--kubeconfig={kc}",
                f"--config={stages}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={KWOK_ANNOTATION}=fake",
                f"--server-address=127.0.0.1:{p.kwok}",
                "--node-ip=127.0.0.1",
                f"--cidr={POD_CIDR}",
                # kwok renews leases well within this; the grace period (>= it) decides
                # how late a renewal may be before the node counts as NotReady.
                f"--node-lease-duration-seconds={min(self.node_monitor_grace_period_s, 40)}",
            ],
        )
        self._wait(
            "kube-controller-manager",
            lambda: self._https_ok(p.controller_manager, "/healthz", client_cert=False),
            60,
        )
        self._wait(
            "kube-scheduler", lambda: self._https_ok(p.scheduler, "/healthz", client_cert=False), 60
        )
        # The service-account controller makes `default` in each namespace; pods need it.
        self._wait(
            "kube-controller-manager",
            lambda: (
                self.kubectl("get", "serviceaccount", "default", "-n", "default", check=False) != ""
            ),
            60,
        )
        # kwok leaves preparation pods running: this runs them (see jobrunner)
        self._spawn(
            "job-runner",
            [f"--kubeconfig={kc}", f"--workdir={self.workdir / 'job-runner'}"],
            program=[sys.executable, "-m", "edgeai_operator.jobrunner"],
        )
        log("controller-manager, scheduler, kwok and the job runner running")

    def create_nodes(self, topology: Topology, *, timeout_s: float = 60) -> None:
        nodes = [n.manifest() for n in topology.nodes]
        self.kubectl(
            "create",
            "-f",
            "-",
            input_text=yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": nodes}),
        )
        self._wait(
            "kwok", lambda: self.ready_nodes() >= {n.name for n in topology.nodes}, timeout_s
        )
        log(f"{len(nodes)} kwok nodes Ready")

    def fail_node(self, name: str, reason: str = "NodeFailed") -> None:
        """kwok reports the node `Ready=False` (its chaos stage) until `recover_node`."""
        self.kubectl(
            "annotate", "--overwrite", "node", name, f"{NODE_FAILURE_LABEL}/reason={reason}"
        )
        self.kubectl("label", "--overwrite", "node", name, f"{NODE_FAILURE_LABEL}=true")

    def recover_node(self, name: str) -> None:
        """kwok's node-initialize stage makes the node Ready again."""
        self.kubectl("label", "node", name, f"{NODE_FAILURE_LABEL}-")

    def ready_nodes(self) -> set[str]:
        items = json.loads(self.kubectl("get", "nodes", "-o", "json"))["items"]
        return {
            n["metadata"]["name"]
            for n in items
            if any(
                c["type"] == "Ready" and c["status"] == "True"
                for c in n.get("status", {}).get("conditions", [])
            )
        }

    def stop(self) -> None:
        pids = {n: p.pid for n, p in self.procs.items()}
        if not pids and self.pid_file.exists():
            pids = _read_pids(self.pid_file)
        stop_pids(pids)
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1)
        self.procs.clear()
        self.pid_file.unlink(missing_ok=True)


def _read_pids(path: Path) -> dict[str, int]:
    data = json.loads(path.read_text())
    return {str(k): int(v) for k, v in data.items()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie we own is dead for our purposes; reap it if it is our child.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def stop_pids(pids: dict[str, int], *, timeout_s: float = 15) -> None:
    """SIGTERM each process group in reverse start order, SIGKILL what is left."""
    for name in reversed(list(pids)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pids[name], signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(_alive(p) for p in pids.values()):
        time.sleep(0.1)
    for name, pid in pids.items():
        if _alive(pid):
            log(f"{name} (pid {pid}) ignored SIGTERM; killing")
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)


def _cmd_up(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir)
    topology = load_topology(args.topology)
    cluster = LocalCluster(workdir)
    cluster.start(topology)
    # The processes belong to their own sessions and outlive this command.
    cluster.procs.clear()
    print(f"export KUBECONFIG={cluster.kubeconfig}")
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    pid_file = Path(args.workdir) / "pids.json"
    if not pid_file.exists():
        log(f"no cluster recorded in {args.workdir}")
        return 0
    pids = _read_pids(pid_file)
    stop_pids(pids)
    left = [n for n, p in pids.items() if _alive(p)]
    if left:
        log(f"still running: {left}")
        return 1
    pid_file.unlink()
    log(f"stopped {', '.join(pids)}")
    return 0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "cluster",
        help="a local control plane (etcd, apiserver, controller-manager, "
        "scheduler) with kwok nodes from a topology file",
    )
    sub = parser.add_subparsers(dest="cluster_command", required=True, metavar="ACTION")
    up = sub.add_parser("up", help="start it and create the topology's nodes")
    up.add_argument("--topology", default=str(DEFAULT_TOPOLOGY), help="topology YAML")
    up.add_argument("--workdir", default=str(DEFAULT_WORKDIR), help="state, logs, kubeconfig")
    up.set_defaults(func=_cmd_up)
    down = sub.add_parser("down", help="stop every process `cluster up` started")
    down.add_argument("--workdir", default=str(DEFAULT_WORKDIR))
    down.set_defaults(func=_cmd_down)
