"""hack/kind/links.py: which node's uplink is shaped towards which nodes, the tc commands,
and (marker kind, on the cluster `make kind-up` creates) the shaped links' real rates."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _bench_modules import load_script

REPO = Path(__file__).resolve().parent.parent
links = load_script(REPO / "hack" / "kind" / "links.py", "kind_links")

DEVICE_A = links.Node("w1", "device", "zone-a", "172.18.0.3", "10.244.1.0/24", 10.0)
EDGE_A = links.Node("w2", "edge", "zone-a", "172.18.0.4", "10.244.2.0/24", 100.0)
DEVICE_B = links.Node("w3", "device", "zone-b", "172.18.0.5", "10.244.3.0/24", 10.0)
EDGE_B = links.Node("w4", "edge", "zone-b", "172.18.0.6", "10.244.4.0/24", 100.0)
CLOUD = links.Node("w5", "cloud", None, "172.18.0.7", "10.244.5.0/24", None)
NODES = [DEVICE_A, EDGE_A, DEVICE_B, EDGE_B, CLOUD]


def test_devices_shape_towards_their_zones_edge_and_the_cloud_edges_towards_the_cloud() -> None:
    by_node = {link.lower.name: link for link in links.links(NODES, {})}
    assert set(by_node) == {"w1", "w2", "w3", "w4"}
    assert by_node["w1"].uppers == (EDGE_A, CLOUD)
    assert by_node["w3"].uppers == (EDGE_B, CLOUD)
    assert by_node["w2"].uppers == (CLOUD,)
    assert by_node["w4"].uppers == (CLOUD,)
    assert [by_node[n].mbps for n in ("w1", "w2", "w3", "w4")] == [10.0, 100.0, 10.0, 100.0]


def test_an_override_changes_only_its_node() -> None:
    rates = {link.lower.name: link.mbps for link in links.links(NODES, {"w1": 0.5})}
    assert rates == {"w1": 0.5, "w2": 100.0, "w3": 10.0, "w4": 100.0}


def test_a_node_without_a_declared_uplink_is_not_shaped() -> None:
    silent = links.Node("w6", "device", "zone-a", "172.18.0.8", "10.244.6.0/24", None)
    assert "w6" not in {link.lower.name for link in links.links([*NODES, silent], {})}


def test_tc_commands_rebuild_the_root_and_filter_by_node_ip_and_pod_cidr() -> None:
    link = links.Link(DEVICE_A, (EDGE_A, CLOUD), 10.0)
    commands = [" ".join(c) for c in links.tc_commands(link)]
    assert commands[:2] == [
        "tc qdisc del dev eth0 root",
        "tc qdisc add dev eth0 root handle 1: htb default 99",
    ]
    assert commands[2] == (
        "tc class add dev eth0 parent 1: classid 1:10 htb rate 10mbit ceil 10mbit "
        "burst 15000 cburst 15000"
    )
    filters = [c.split(" match ip dst ")[1] for c in commands if " u32 " in c]
    assert filters == [
        "172.18.0.4/32 flowid 1:10",
        "10.244.2.0/24 flowid 1:10",
        "172.18.0.7/32 flowid 1:10",
        "10.244.5.0/24 flowid 1:10",
    ]


def test_a_bad_override_names_the_flag_and_what_is_accepted(tmp_path: Path) -> None:
    kubectl = tmp_path / "kubectl"
    kubectl.write_text("#!/bin/sh\necho '{\"items\": []}'\n")
    kubectl.chmod(0o755)
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "hack" / "kind" / "links.py"),
            "kc",
            str(kubectl),
            "shape",
            "--set",
            "w1=fast",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert "--set 'w1=fast': expected NODE=MBPS with MBPS a number" in done.stderr


CACHE = Path(os.environ.get("EDGEAI_CACHE", Path.home() / ".cache" / "edgeai"))
KUBECONFIG = CACHE / "kind-edgeai.kubeconfig"
KUBECTL = CACHE / "k8s-v1.34.4" / "bin" / "kubectl"


@pytest.mark.kind
@pytest.mark.slow
def test_shaped_links_carry_about_their_declared_rate() -> None:
    ping = (
        subprocess.run(
            [str(KUBECTL), f"--kubeconfig={KUBECONFIG}", "get", "--raw=/readyz"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if KUBECTL.exists() and KUBECONFIG.exists()
        else None
    )
    if ping is None or ping.returncode != 0 or os.geteuid() != 0:
        pytest.skip("needs root and the kind cluster make kind-up creates")
    script = [
        sys.executable,
        str(REPO / "hack" / "kind" / "links.py"),
        str(KUBECONFIG),
        str(KUBECTL),
    ]
    shaped = json.loads(subprocess.check_output([*script, "shape"], text=True))
    assert {link["tier"] for link in shaped} == {"device", "edge"}
    for link in shaped:
        assert link["tcRateMbps"] == pytest.approx(link["mbps"], rel=0.05)
    measured = json.loads(
        subprocess.check_output([*script, "measure", "--bytes", "1000000"], text=True, timeout=600)
    )
    for link in measured:
        # Rate-limited, and not starved: the transfer runs at most a little above the
        # shaped rate (htb's burst) and at more than half of it.
        assert 0.5 * link["mbps"] < link["measuredMbps"] < 1.3 * link["mbps"], link
