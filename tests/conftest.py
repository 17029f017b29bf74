"""Shared fixtures. `cluster` is a real control plane on loopback with kwok nodes from
hack/topology.yaml, started once per session and torn down with every process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeai_operator.localcluster import DEFAULT_TOPOLOGY, LocalCluster, _alive
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
