"""Shape the kind cluster's device -> edge and edge -> cloud links with `tc`, and measure them.

    python hack/kind/links.py KUBECONFIG KUBECTL shape [--set NODE=MBPS ...]
    python hack/kind/links.py KUBECONFIG KUBECTL measure [--annotate] [--bytes N]

`shape`: on each device and edge node container, an `htb` root qdisc on `eth0` with one
class at the node's uplink rate (`edgeai.dev/uplink-mbps-measured` when set, else
`edgeai.dev/uplink-mbps`; `--set` overrides a node) and an unshaped default class; `u32`
filters send to the shaped class what leaves for the next tier up: a device's traffic to
its zone's edge nodes and to the cloud nodes, an edge node's traffic to the cloud nodes
(each by node IP and pod CIDR, since pod traffic between nodes is routed via node IPs).
Everything else (the control plane, the node's own zone peers) is not shaped. The root qdisc
is deleted and built again, so running it again gives the same state. RTT is not shaped: this
kernel has no `netem`.

`measure`: for each shaped link, sends `--bytes` from a socket in the lower node's network
namespace to one in the upper node's (both run by this machine's Python under `nsenter`),
and prints the throughput. `--annotate` writes it as `edgeai.dev/uplink-mbps-measured` on
the lower node, which the operator prefers over the declared rate: that node change makes
it replan. The operator itself measures no link.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass

UPLINK = "edgeai.dev/uplink-mbps"
MEASURED = f"{UPLINK}-measured"
TIER = "edgeai.dev/tier"
ZONE = "topology.kubernetes.io/zone"
SINK_PORT = 47999
SHAPED_CLASS = "1:10"


@dataclass(frozen=True)
class Node:
    name: str
    tier: str
    zone: str | None
    ip: str
    pod_cidr: str
    uplink_mbps: float | None


@dataclass(frozen=True)
class Link:
    lower: Node
    uppers: tuple[Node, ...]
    mbps: float


def read_nodes(kubeconfig: str, kubectl: str) -> list[Node]:
    raw = subprocess.check_output(
        [kubectl, f"--kubeconfig={kubeconfig}", "get", "nodes", "-o", "json"]
    )
    nodes = []
    for item in json.loads(raw)["items"]:
        meta, labels = item["metadata"], item["metadata"].get("labels", {})
        if TIER not in labels:
            continue
        annotations = meta.get("annotations", {})
        rate = annotations.get(MEASURED, annotations.get(UPLINK))
        ip = next(a["address"] for a in item["status"]["addresses"] if a["type"] == "InternalIP")
        nodes.append(
            Node(
                name=meta["name"],
                tier=labels[TIER],
                zone=labels.get(ZONE),
                ip=ip,
                pod_cidr=item["spec"].get("podCIDR", ""),
                uplink_mbps=None if rate is None else float(rate),
            )
        )
    return nodes


def links(nodes: list[Node], overrides: dict[str, float]) -> list[Link]:
    """Each device's and edge node's uplink to the tier(s) above it."""
    clouds = tuple(n for n in nodes if n.tier == "cloud")
    out = []
    for node in nodes:
        if node.tier == "device":
            uppers = tuple(n for n in nodes if n.tier == "edge" and n.zone == node.zone) + clouds
        elif node.tier == "edge":
            uppers = clouds
        else:
            continue
        mbps = overrides.get(node.name, node.uplink_mbps)
        if mbps is None or not uppers:
            continue
        out.append(Link(node, uppers, mbps))
    return out


def _burst_bytes(mbps: float) -> int:
    # About 5 ms of traffic, and at least a few full frames, so the rate holds for the
    # tensors a stage sends without starving htb at high rates.
    return max(15000, int(mbps * 1e6 / 8 * 0.005))


def tc_commands(link: Link) -> list[list[str]]:
    """The root qdisc deleted (there may be none) and built again: the same state however
    often it runs (htb refuses `replace` of an existing root)."""
    rate = f"{link.mbps:g}mbit"
    burst = str(_burst_bytes(link.mbps))
    dev = ["dev", "eth0"]
    commands = [
        ["tc", "qdisc", "del", *dev, "root"],
        ["tc", "qdisc", "add", *dev, "root", "handle", "1:", "htb", "default", "99"],
        ["tc", "class", "add", *dev, "parent", "1:", "classid", SHAPED_CLASS, "htb",
         "rate", rate, "ceil", rate, "burst", burst, "cburst", burst],
        ["tc", "class", "add", *dev, "parent", "1:", "classid", "1:99", "htb", "rate", "10gbit"],
    ]  # fmt: skip
    for upper in link.uppers:
        for dst in (f"{upper.ip}/32", upper.pod_cidr):
            if dst:
                commands.append(
                    ["tc", "filter", "add", *dev, "parent", "1:", "protocol", "ip", "prio", "1",
                     "u32", "match", "ip", "dst", dst, "flowid", SHAPED_CLASS]
                )  # fmt: skip
    return commands


def shape(link: Link) -> None:
    for command in tc_commands(link):
        done = subprocess.run(
            ["docker", "exec", link.lower.name, *command], capture_output=True, text=True
        )
        # Deleting the root of a fresh interface has nothing to delete; all else must work.
        if done.returncode != 0 and command[1:3] != ["qdisc", "del"]:
            raise RuntimeError(f"{link.lower.name}: {' '.join(command)}: {done.stderr.strip()}")


RATE_UNITS = {"bit": 1e-6, "Kbit": 1e-3, "Mbit": 1.0, "Gbit": 1e3}


def shaped_rate_mbps(node: str) -> float | None:
    """The rate of the shaped class on a node's eth0, as tc reports it (None: unshaped).
    Text, not `tc -j`: iproute2 6.1 prints htb classes as text even with -j."""
    done = subprocess.run(
        ["docker", "exec", node, "tc", "class", "show", "dev", "eth0"],
        capture_output=True,
        text=True,
    )
    match = re.search(
        rf"class htb {SHAPED_CLASS} .*? rate ([\d.]+)(bit|Kbit|Mbit|Gbit)", done.stdout
    )
    return None if match is None else float(match.group(1)) * RATE_UNITS[match.group(2)]


def _netns(container: str) -> str:
    pid = subprocess.check_output(
        ["docker", "inspect", "-f", "{{.State.Pid}}", container], text=True
    )
    return f"/proc/{pid.strip()}/ns/net"


SINK = f"""
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", {SINK_PORT})); s.listen(1); print("ready", flush=True)
c, _ = s.accept(); n = 0
while chunk := c.recv(1 << 16):
    n += len(chunk)
c.sendall(str(n).encode()); c.close()
"""

SEND = """
import socket, sys, time
host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
c = socket.create_connection((host, port), timeout=120)
block = b"x" * (1 << 16); sent = 0; t0 = time.monotonic()
while sent < size:
    sent += c.send(block[: size - sent])
c.shutdown(socket.SHUT_WR); c.recv(64)
print(time.monotonic() - t0)
"""


def measure(link: Link, size_bytes: int) -> float:
    """Mbit/s from the lower node to its first upper node, through the real links."""
    upper = link.uppers[0]
    sink = subprocess.Popen(
        ["nsenter", f"--net={_netns(upper.name)}", sys.executable, "-c", SINK],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert sink.stdout is not None
        if sink.stdout.readline().strip() != "ready":
            raise RuntimeError(f"no sink in {upper.name}'s network namespace")
        seconds = float(
            subprocess.check_output(
                [
                    "nsenter",
                    f"--net={_netns(link.lower.name)}",
                    sys.executable,
                    "-c",
                    SEND,
                    upper.ip,
                    str(SINK_PORT),
                    str(size_bytes),
                ],
                text=True,
                timeout=300,
            )
        )
    finally:
        sink.wait(timeout=30)
    return size_bytes * 8 / seconds / 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("kubeconfig")
    parser.add_argument("kubectl")
    sub = parser.add_subparsers(dest="command", required=True)
    shape_p = sub.add_parser("shape", help="apply the uplink rates with tc")
    shape_p.add_argument("--set", action="append", default=[], metavar="NODE=MBPS")
    measure_p = sub.add_parser("measure", help="measure each shaped link's throughput")
    measure_p.add_argument("--bytes", type=int, default=2_000_000)
    measure_p.add_argument("--annotate", action="store_true")
    measure_p.add_argument("--node", help="measure only this node's uplink")
    args = parser.parse_args(argv)

    nodes = read_nodes(args.kubeconfig, args.kubectl)
    overrides: dict[str, float] = {}
    for item in getattr(args, "set", []):
        name, _, value = item.partition("=")
        try:
            overrides[name] = float(value)
        except ValueError:
            parser.error(
                f"--set {item!r}: expected NODE=MBPS with MBPS a number, e.g. edgeai-worker=5"
            )
        if name not in {n.name for n in nodes} or overrides[name] <= 0:
            parser.error(
                f"--set {item!r}: NODE must be one of {sorted(n.name for n in nodes)}, MBPS > 0"
            )
    result = []
    for link in links(nodes, overrides):
        if getattr(args, "node", None) not in (None, link.lower.name):
            continue
        entry: dict[str, object] = {
            "node": link.lower.name,
            "tier": link.lower.tier,
            "to": [u.name for u in link.uppers],
            "mbps": link.mbps,
        }
        if args.command == "shape":
            shape(link)
            entry["tcRateMbps"] = shaped_rate_mbps(link.lower.name)
        else:
            started = time.monotonic()
            mbps = measure(link, args.bytes)
            entry.update(measuredMbps=round(mbps, 2), seconds=round(time.monotonic() - started, 2))
            if args.annotate:
                subprocess.run(
                    [
                        args.kubectl,
                        f"--kubeconfig={args.kubeconfig}",
                        "annotate",
                        "--overwrite",
                        "node",
                        link.lower.name,
                        f"{MEASURED}={mbps:.2f}",
                    ],
                    check=True,
                    capture_output=True,
                )
        result.append(entry)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
