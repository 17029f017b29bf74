"""Three network namespaces (device, edge, cloud) on a path joined by veth pairs, links
shaped with `tc tbf`, and a CPU quota per tier (cgroup v1 `cpu` controller) or, for a
tier with a `slowdown`, onnxruntime slowed by that factor in its Python processes
(`slowcpu.py`), so the device computes slower than the edge and the cloud on one host.

    device 10.210.1.1 <-veth-> 10.210.1.2 edge 10.210.2.1 <-veth-> 10.210.2.2 cloud
"""

from __future__ import annotations

import contextlib
import shlex
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "eai"
TIERS = ("device", "edge", "cloud")
CGROUP_ROOT = Path("/sys/fs/cgroup/cpu")
SLOWCPU = Path(__file__).resolve().parent / "slowcpu.py"
CPU_PERIOD_US = 4_000  # short period (1 ms quota per 4 ms at 0.25 CPU): throttling in small slices


@dataclass(frozen=True)
class TierSpec:
    name: str
    cpus: float | None  # CPU quota in cores; None: unlimited
    threads: int
    slowdown: float = 1.0  # onnxruntime runs take this many times their CPU time

    def describe(self) -> str:
        slower = f" onnxruntime {self.slowdown:g}x slower" if self.slowdown != 1 else ""
        return f"{self.cpus or 'all'} CPU x{self.threads} thread{slower}"


@dataclass
class Topology:
    tiers: dict[str, TierSpec]
    uplink_mbps: float = 10.0
    backhaul_mbps: float = 100.0
    cgroups: bool = False
    created: list[str] = field(default_factory=list)

    # Addresses.
    device_ip = "10.210.1.1"
    edge_down_ip = "10.210.1.2"
    edge_up_ip = "10.210.2.1"
    cloud_ip = "10.210.2.2"

    @staticmethod
    def ns(tier: str) -> str:
        return f"{PREFIX}-{tier}"

    def cgroup(self, tier: str) -> Path:
        return CGROUP_ROOT / f"{PREFIX}-bench-{tier}"

    def wrap(self, tier: str, argv: Sequence[str], *, limit_cpu: bool = True) -> list[str]:
        """A command line that runs `argv` in the tier's namespace (and CPU cgroup; a
        Python program, at the tier's slowdown). `limit_cpu=False`: neither."""
        slowdown = self.tiers[tier].slowdown
        if limit_cpu and slowdown != 1.0 and argv[0] == sys.executable:
            argv = [argv[0], str(SLOWCPU), f"{slowdown:g}", *argv[1:]]
        inner = ["ip", "netns", "exec", self.ns(tier), *argv]
        if not self.cgroups or not limit_cpu:
            return inner
        procs = self.cgroup(tier) / "cgroup.procs"
        script = f"echo $$ > {shlex.quote(str(procs))} && exec {shlex.join(inner)}"
        return ["sh", "-c", script]


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, capture_output=True, text=True)


def _burst_bytes(mbps: float) -> int:
    # About 2 ms of traffic, at least two full frames: small enough that the rate holds
    # for the tensors we send, large enough for tbf at high rates.
    return max(3200, int(mbps * 1e6 / 8 * 0.002))


def shape(dev: str, ns: str, mbps: float) -> None:
    _run(
        "ip",
        "netns",
        "exec",
        ns,
        "tc",
        "qdisc",
        "replace",
        "dev",
        dev,
        "root",
        "tbf",
        "rate",
        f"{mbps}mbit",
        "burst",
        str(_burst_bytes(mbps)),
        "latency",
        "400ms",
    )


def set_uplink(topo: Topology, mbps: float) -> None:
    """Shape the device<->edge link both ways."""
    shape("up0", Topology.ns("device"), mbps)
    shape("down0", Topology.ns("edge"), mbps)
    topo.uplink_mbps = mbps


def teardown(topo: Topology | None = None) -> None:
    for tier in TIERS:
        _run("ip", "netns", "del", Topology.ns(tier), check=False)
        group = CGROUP_ROOT / f"{PREFIX}-bench-{tier}"
        if group.exists():
            with contextlib.suppress(OSError):
                for pid in (group / "cgroup.procs").read_text().split():
                    (CGROUP_ROOT / "cgroup.procs").write_text(pid)
            with contextlib.suppress(OSError):
                group.rmdir()


@contextlib.contextmanager
def topology(
    tiers: dict[str, TierSpec], uplink_mbps: float, backhaul_mbps: float
) -> Iterator[Topology]:
    teardown()  # leftovers of an interrupted run
    topo = Topology(tiers, uplink_mbps, backhaul_mbps)
    try:
        for tier in TIERS:
            _run("ip", "netns", "add", Topology.ns(tier))
            _run("ip", "netns", "exec", Topology.ns(tier), "ip", "link", "set", "lo", "up")
        links = [
            ("up0", "device", topo.device_ip, "down0", "edge", topo.edge_down_ip),
            ("up1", "edge", topo.edge_up_ip, "down1", "cloud", topo.cloud_ip),
        ]
        for a, a_tier, a_ip, b, b_tier, b_ip in links:
            _run(
                "ip",
                "link",
                "add",
                a,
                "netns",
                Topology.ns(a_tier),
                "type",
                "veth",
                "peer",
                "name",
                b,
                "netns",
                Topology.ns(b_tier),
            )
            for dev, tier, ip in ((a, a_tier, a_ip), (b, b_tier, b_ip)):
                ns = Topology.ns(tier)
                _run("ip", "netns", "exec", ns, "ip", "addr", "add", f"{ip}/24", "dev", dev)
                _run("ip", "netns", "exec", ns, "ip", "link", "set", dev, "up")
        set_uplink(topo, uplink_mbps)
        shape("up1", Topology.ns("edge"), backhaul_mbps)
        shape("down1", Topology.ns("cloud"), backhaul_mbps)
        topo.cgroups = CGROUP_ROOT.is_dir()
        if topo.cgroups:
            for tier, spec in tiers.items():
                group = topo.cgroup(tier)
                group.mkdir(exist_ok=True)
                (group / "cpu.cfs_period_us").write_text(str(CPU_PERIOD_US))
                quota = -1 if spec.cpus is None else int(spec.cpus * CPU_PERIOD_US)
                (group / "cpu.cfs_quota_us").write_text(str(quota))
        else:
            print("note: no cgroup v1 cpu controller; tiers run at the same speed", file=sys.stderr)
        yield topo
    finally:
        teardown(topo)
