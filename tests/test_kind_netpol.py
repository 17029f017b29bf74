"""hack/kind/netpol: the NetworkPolicy enforcer of the offline kind cluster's CNI.

Its Go unit tests (selectors, policy types, the rules of each peer and port), and its
rules applied by iptables in network namespaces laid out like a kind node with the
ptp CNI (each pod a namespace with a /32, routed by the node through its FORWARD
chain): allowed connections open, others are dropped, and a change of the policies
is applied."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NETPOL = REPO / "hack" / "kind" / "netpol"
PREFIX = "eainp"
NODE_IP = "10.251.0.1"
PODS = {"device": "10.251.1.2", "edge": "10.251.1.3", "stranger": "10.251.1.4"}

GO = shutil.which("go")
needs_go = pytest.mark.skipif(GO is None, reason="needs Go")


@needs_go
def test_go_unit_tests() -> None:
    result = subprocess.run(
        [str(GO), "test", "-count=1", "./..."],
        cwd=NETPOL,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def sh(*argv: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(argv)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=check)


@pytest.fixture(scope="module")
def enforcer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if GO is None or os.geteuid() != 0 or shutil.which("iptables-restore") is None:
        pytest.skip("needs Go, root and iptables")
    out = tmp_path_factory.mktemp("netpol") / "edgeai-netpol"
    subprocess.run([str(GO), "build", "-o", str(out), "."], cwd=NETPOL, check=True, timeout=600)
    return out


@pytest.fixture(scope="module")
def node() -> Iterator[str]:
    """A node namespace routing three pod namespaces, as the ptp CNI does."""
    node_ns = f"{PREFIX}-node"
    created: list[str] = []
    try:
        sh("ip", "netns", "add", node_ns)
        created.append(node_ns)
        sh("ip", "link", "set", "lo", "up", ns=node_ns)
        sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=node_ns)
        for i, (pod, ip) in enumerate(PODS.items()):
            pod_ns = f"{PREFIX}-{pod}"
            sh("ip", "netns", "add", pod_ns)
            created.append(pod_ns)
            host, inner = f"{PREFIX}h{i}", f"{PREFIX}p{i}"
            sh(
                "ip",
                "link",
                "add",
                host,
                "netns",
                node_ns,
                "type",
                "veth",
                "peer",
                "name",
                inner,
                "netns",
                pod_ns,
            )
            sh("ip", "addr", "add", f"{NODE_IP}/32", "dev", host, ns=node_ns)
            sh("ip", "link", "set", host, "up", ns=node_ns)
            sh("ip", "route", "add", f"{ip}/32", "dev", host, ns=node_ns)
            sh("ip", "addr", "add", f"{ip}/32", "dev", inner, ns=pod_ns)
            sh("ip", "link", "set", inner, "up", ns=pod_ns)
            sh("ip", "link", "set", "lo", "up", ns=pod_ns)
            sh("ip", "route", "add", f"{NODE_IP}/32", "dev", inner, ns=pod_ns)
            sh("ip", "route", "add", "default", "via", NODE_IP, "dev", inner, ns=pod_ns)
        yield node_ns
    finally:
        for ns in reversed(created):
            sh("ip", "netns", "del", ns, check=False)


@contextlib.contextmanager
def listening(pod: str, ports: list[int]) -> Iterator[None]:
    """TCP servers in the pod's namespace that answer each connection with b"ok"."""
    code = (
        "import socket, sys, threading\n"
        "def serve(port):\n"
        "    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        "    s.bind(('0.0.0.0', port)); s.listen(16)\n"
        "    while True:\n"
        "        c, _ = s.accept(); c.sendall(b'ok'); c.close()\n"
        "for p in sys.argv[1:]:\n"
        "    threading.Thread(target=serve, args=(int(p),), daemon=True).start()\n"
        "print('ready', flush=True); sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        ["ip", "netns", "exec", f"{PREFIX}-{pod}", sys.executable, "-c", code, *map(str, ports)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        yield
    finally:
        proc.kill()
        proc.communicate()


def connects(src: str, dst: str, port: int) -> bool:
    """Whether `src` gets the answer of `dst`'s server on `port` within 1.5 s."""
    code = (
        "import socket, sys\n"
        "try:\n"
        "    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.5)\n"
        "    print(s.recv(2).decode())\n"
        "except OSError as e:\n"
        "    print('refused' if isinstance(e, ConnectionRefusedError) else 'timeout')\n"
    )
    out = sh(sys.executable, "-c", code, PODS[dst], str(port), ns=f"{PREFIX}-{src}").stdout
    assert out.strip() in ("ok", "timeout"), out  # a dropped packet times out
    return out.strip() == "ok"


def pod(name: str, labels: dict[str, str], ports: list[dict[str, object]] | None = None) -> dict:
    return {
        "metadata": {"name": name, "namespace": "apps", "labels": labels},
        "spec": {"nodeName": "n1", "containers": [{"ports": ports or []}]},
        "status": {"podIP": PODS[name], "phase": "Running"},
    }


CLUSTER = {
    "Namespaces": [
        {"metadata": {"name": "apps", "labels": {"kubernetes.io/metadata.name": "apps"}}}
    ],
    "Pods": [
        pod("device", {"stage": "device"}),
        pod("edge", {"stage": "edge"}, [{"name": "tls", "containerPort": 8443}]),
        pod("stranger", {"stage": "other"}),
    ],
    # the edge stage as the operator writes it: its data port from the device stage
    # only; egress to the device's 8080 only
    "Policies": [
        {
            "metadata": {"name": "edge", "namespace": "apps"},
            "spec": {
                "podSelector": {"matchLabels": {"stage": "edge"}},
                "policyTypes": ["Ingress", "Egress"],
                "ingress": [
                    {
                        "from": [{"podSelector": {"matchLabels": {"stage": "device"}}}],
                        "ports": [{"protocol": "TCP", "port": "tls"}],
                    }
                ],
                "egress": [
                    {
                        "to": [{"podSelector": {"matchLabels": {"stage": "device"}}}],
                        "ports": [{"protocol": "TCP", "port": 8080}],
                    }
                ],
            },
        }
    ],
}


def apply(enforcer: Path, node_ns: str, cluster: dict, tmp_path: Path) -> None:
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(cluster))
    sh(str(enforcer), "--node", "n1", "--cluster-file", str(path), ns=node_ns)


def test_policies_are_enforced_in_the_nodes_forward_chain(
    enforcer: Path, node: str, tmp_path: Path
) -> None:
    with (
        listening("edge", [8443, 8080]),
        listening("device", [8080, 9090]),
        listening("stranger", [8080]),
    ):
        # no policy yet: everything connects
        assert connects("stranger", "edge", 8443)
        assert connects("edge", "stranger", 8080)
        apply(enforcer, node, CLUSTER, tmp_path)
        # ingress: the device on the named data port, nobody else, no other port
        assert connects("device", "edge", 8443)
        assert not connects("stranger", "edge", 8443)
        assert not connects("device", "edge", 8080)
        # egress: to the device's 8080 only
        assert connects("edge", "device", 8080)
        assert not connects("edge", "device", 9090)
        assert not connects("edge", "stranger", 8080)
        # pods no policy selects talk freely
        assert connects("stranger", "device", 9090)
        # the policy gone: the chains go with it
        apply(enforcer, node, {**CLUSTER, "Policies": []}, tmp_path)
        assert connects("stranger", "edge", 8443)
        assert connects("edge", "stranger", 8080)
        chains = sh("iptables", "-S", ns=node).stdout
        assert "EDGEAI-NP-I-" not in chains
        assert "EDGEAI-NP-E-" not in chains


def test_the_jump_stays_first_and_bad_blocks_do_not_break_the_rules(
    enforcer: Path, node: str, tmp_path: Path
) -> None:
    """kube-proxy puts its own FORWARD jump (which accepts marked NodePort traffic) at the
    top when it finds it missing: a rule that accepts everything inserted above ours
    would let denied traffic through, so each pass puts the jump first again, once. An
    IPv6 or malformed ipBlock allows nothing here instead of failing the node's rules."""
    cluster = json.loads(json.dumps(CLUSTER))
    ingress = cluster["Policies"][0]["spec"]["ingress"]
    ingress.append({"from": [{"ipBlock": {"cidr": "fd00::/8"}}, {"ipBlock": {"cidr": "x/33"}}]})
    with listening("edge", [8443]), listening("stranger", [8080]):
        apply(enforcer, node, cluster, tmp_path)
        assert not connects("stranger", "edge", 8443)
        sh("iptables", "-I", "FORWARD", "1", "-j", "ACCEPT", ns=node)
        assert connects("stranger", "edge", 8443)  # the stand-in for kube-proxy's rule
        apply(enforcer, node, cluster, tmp_path)
        forward = sh("iptables", "-S", "FORWARD", ns=node).stdout.splitlines()
        assert forward[1] == "-A FORWARD -j EDGEAI-NP", forward
        assert forward.count("-A FORWARD -j EDGEAI-NP") == 1, forward
        assert not connects("stranger", "edge", 8443)
        assert connects("device", "edge", 8443)
        sh("iptables", "-D", "FORWARD", "-j", "ACCEPT", ns=node)
        apply(enforcer, node, {**CLUSTER, "Policies": []}, tmp_path)
