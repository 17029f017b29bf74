"""What the image and kind tests share: the image names, whether Docker answers, and a
worker command that serves a tiny ONNX model it writes itself (Relu on 4 floats), so a
container or pod needs no volume, no registry and no plan to serve OIP v2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
VERSION = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
OPERATOR_IMAGE = f"edgeai-operator:{VERSION}"
WORKER_IMAGE = f"edgeai-worker:{VERSION}"
WORKER_PORT = 8080
MODEL_NAME = "tiny-relu"

_WRITE_MODEL = (
    "import onnx; from onnx import helper as h, TensorProto as T; "
    "x = h.make_tensor_value_info('x', T.FLOAT, [None, 4]); "
    "y = h.make_tensor_value_info('y', T.FLOAT, [None, 4]); "
    "g = h.make_graph([h.make_node('Relu', ['x'], ['y'])], 'tiny', [x], [y]); "
    "m = h.make_model(g, opset_imports=[h.make_opsetid('', 17)]); m.ir_version = 9; "
    "onnx.save(m, '/tmp/tiny.onnx')"
)
# argv for a container of the worker image (its entrypoint is `edgeai`, so override it).
SERVE_TINY_MODEL = [
    "sh",
    "-c",
    f'python -c "{_WRITE_MODEL}" && exec python -m edgeai_worker --partition /tmp/tiny.onnx '
    f"--model-name {MODEL_NAME} --tier cloud --host 0.0.0.0 --port {WORKER_PORT}",
]
INFER_BODY = json.dumps(
    {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [-1.0, 2.0, -3.0, 4.0]}]}
)
INFER_EXPECTED = [0.0, 2.0, 0.0, 4.0]


def docker_unavailable() -> str | None:
    """Why Docker cannot be used here, or None when its daemon answers."""
    if shutil.which("docker") is None:
        return "no docker CLI on PATH (hack/kind/host.sh installs Docker)"
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    if info.returncode != 0:
        return "dockerd is not running (hack/kind/host.sh starts it)"
    if os.geteuid() != 0:
        return "building the images needs root (debootstrap, chroot)"
    return None


def build_images() -> list[str]:
    """The images as the sources in this tree build them: hack/images/build.sh, which
    rebuilds an image whose recorded inputs changed and otherwise only checks them
    (about a second). Tests so never judge an image an older tree built."""
    built = subprocess.run(
        ["bash", str(REPO_ROOT / "hack/images/build.sh")],
        capture_output=True,
        text=True,
        timeout=3600,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert built.returncode == 0, f"hack/images/build.sh failed:\n{built.stderr[-3000:]}"
    return built.stdout.split()[-2:]
