"""The local cluster's kubelet for preparation pods: the command it runs for a pod."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from edgeai_operator.jobrunner import command


def pod(args: list[str], program: list[str] | None = None) -> dict[str, Any]:
    container = {"name": "prepare", "command": program or ["edgeai"], "args": args}
    return {"spec": {"containers": [container]}}


def test_mount_paths_in_arguments_become_local_directories(tmp_path: Path) -> None:
    argv = command(
        pod(
            [
                "prepare",
                "--source=pvc://models/net.onnx",
                "--pvc-root=/mnt/pvc",
                "--ca-bundle=/etc/edgeai/ca",
                "--data=/etc/edgeai/cafe/x.npz",  # shares a prefix, is no mount: unchanged
                "--calibration=/etc/edgeai/ca/inputs.npz",
            ]
        ),
        tmp_path / "pvc",
        {"/etc/edgeai/ca": tmp_path / "pod" / "ca-bundle"},
    )
    assert argv == [
        sys.executable,
        "-m",
        "edgeai_operator.cli",
        "prepare",
        "--source=pvc://models/net.onnx",
        f"--pvc-root={tmp_path / 'pvc'}",
        f"--ca-bundle={tmp_path / 'pod' / 'ca-bundle'}",
        "--data=/etc/edgeai/cafe/x.npz",
        f"--calibration={tmp_path / 'pod' / 'ca-bundle'}/inputs.npz",
    ]


def test_only_edgeai_commands_run(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="only edgeai commands run here"):
        command(pod(["-c", "echo"], program=["sh"]), tmp_path)
