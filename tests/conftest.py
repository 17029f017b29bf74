"""Shared fixtures. `cluster` is a real control plane on loopback with kwok nodes from
hack/topology.yaml, started once per session and torn down with every process; `ns` is
a namespace of the test's own on it, so no test sees another's objects."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from _cluster_support import Namespace, get, wait_for
from edgeai_operator.localcluster import (
    DEFAULT_TOPOLOGY,
    REPO_ROOT,
    LocalCluster,
    _alive,
    free_port,
)
from edgeai_operator.localregistry import LocalRegistry, registry_binary
from edgeai_operator.topology import load_topology


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    workdir: Path = tmp_path_factory.mktemp("cluster")
    local = LocalCluster(workdir)
    local.start(load_topology(DEFAULT_TOPOLOGY))
    pids = {name: proc.pid for name, proc in local.procs.items()}
    yield local
    local.stop()
    left = [name for name, pid in pids.items() if _alive(pid)]
    assert not left, f"control-plane processes left running: {left}"


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    """A real OCI registry (CNCF distribution) on loopback, plain HTTP, no auth, its
    storage in a temp dir; `registry.address` is `127.0.0.1:PORT`."""
    local = LocalRegistry(tmp_path_factory.mktemp("registry"), registry_binary())
    local.start()
    assert local.proc is not None
    pid = local.proc.pid
    yield local
    local.stop()
    assert not _alive(pid), f"registry process {pid} left running"


@pytest.fixture
def ns(cluster: LocalCluster, request: pytest.FixtureRequest) -> Iterator[Namespace]:
    """A fresh namespace named after the test; deleted afterwards without waiting for
    its objects to go (the operator's finalizers release them in the background)."""
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"{slug}-{os.urandom(3).hex()}"
    cluster.kubectl("create", "namespace", name)
    namespace = Namespace(cluster, name)
    # Pods are refused until the service-account controller has made `default`.
    wait_for(f"namespace {name} ready", lambda: get(namespace, "serviceaccount", "default"), 30)
    try:
        yield namespace
    finally:
        cluster.kubectl("delete", "namespace", name, "--wait=false")


CA_BUNDLE_CONFIGMAP = "edgeai-ca-bundle"


class OperatorProcess:
    """`edgeai operator` as a child process; stop() and start() again to restart it."""

    def __init__(self, cluster: LocalCluster, log: Path, artifacts_uri: str) -> None:
        self.log = log
        port = free_port()
        self.metrics_url = f"http://127.0.0.1:{port}/metrics"
        self._cmd = [
            sys.executable,
            "-m",
            "edgeai_operator.cli",
            "operator",
            "--log-format=json",
            f"--metrics-port={port}",
        ]
        self._env = {
            **os.environ,
            "KUBECONFIG": str(cluster.operator_kubeconfig),
            "EDGEAI_RESYNC_SECONDS": "3",
            "EDGEAI_PROFILE_POLL_SECONDS": "2",
            # prepared models go to the session's registry, as a cluster's would
            "EDGEAI_ARTIFACTS_URI": artifacts_uri,
            # a namespace holding this ConfigMap has its CAs trusted by its preparation Jobs
            "EDGEAI_CA_BUNDLE_CONFIGMAP": CA_BUNDLE_CONFIGMAP,
        }
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self._proc = subprocess.Popen(
                self._cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self._env,
                start_new_session=True,
            )

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="session")
def operator(
    cluster: LocalCluster, registry: LocalRegistry, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    """`edgeai operator` as a process against the session cluster, storing prepared
    models in the session registry."""
    for crd in sorted((REPO_ROOT / "crds").glob("*.yaml")):
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crd))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=30s", "crd", "--all")
    process = OperatorProcess(
        cluster,
        tmp_path_factory.mktemp("operator") / "operator.log",
        f"oci://{registry.address}/edgeai-models",
    )
    process.start()
    try:
        yield process
    finally:
        process.stop()
