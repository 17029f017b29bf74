"""The images as `make images` builds them from this tree (hack/images/build.sh runs
first and rebuilds what changed), checked: version label and tag, the non-root user,
size goals, `edgeai --help`, which ML runtimes each image can import, no build-time CA
left behind, and a worker container serving OIP v2."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from _image_support import (
    INFER_BODY,
    INFER_EXPECTED,
    MODEL_NAME,
    OPERATOR_IMAGE,
    SERVE_TINY_MODEL,
    VERSION,
    WORKER_IMAGE,
    WORKER_PORT,
    build_images,
    docker_unavailable,
)

pytestmark = [pytest.mark.docker, pytest.mark.slow]

# Size goals (MB, as `docker image ls` counts them: 10^6 bytes, base layer included).
SIZE_GOAL_MB = {OPERATOR_IMAGE: 250, WORKER_IMAGE: 400}


@pytest.fixture(scope="module", autouse=True)
def _images() -> None:
    reason = docker_unavailable()
    if reason:
        pytest.skip(reason)
    assert build_images() == [OPERATOR_IMAGE, WORKER_IMAGE]


def run(image: str, *argv: str, entrypoint: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = ["docker", "run", "--rm", "--network", "none"]
    if entrypoint is not None:
        cmd += ["--entrypoint", entrypoint]
    return subprocess.run([*cmd, image, *argv], capture_output=True, text=True, timeout=120)


def inspect(image: str) -> dict:
    out = subprocess.run(["docker", "image", "inspect", image], capture_output=True, text=True)
    return json.loads(out.stdout)[0]


@pytest.mark.parametrize("image", [OPERATOR_IMAGE, WORKER_IMAGE])
def test_labelled_with_the_version_and_run_as_non_root(image: str) -> None:
    config = inspect(image)["Config"]
    assert config["Labels"]["org.opencontainers.image.version"] == VERSION
    assert config["User"] == "10001:10001"
    assert run(image, "-u", entrypoint="id").stdout.strip() == "10001"


@pytest.mark.parametrize("image", [OPERATOR_IMAGE, WORKER_IMAGE])
def test_within_the_size_goal(image: str) -> None:
    size_mb = inspect(image)["Size"] / 1e6
    assert size_mb <= SIZE_GOAL_MB[image], f"{image} is {size_mb:.0f} MB"


@pytest.mark.parametrize("image", [OPERATOR_IMAGE, WORKER_IMAGE])
def test_edgeai_help_lists_the_pod_commands(image: str) -> None:
    out = run(image, "--help")
    assert out.returncode == 0, out.stderr
    for command in ("run-stage", "fetch", "prepare", "operator"):
        assert command in out.stdout


FIND_MODULES = (
    "import importlib.util, sys; "
    "print(' '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m)))"
)
ML_RUNTIMES = ("torch", "onnxruntime", "sklearn", "onnx")


def test_operator_image_has_no_ml_runtime() -> None:
    out = run(
        OPERATOR_IMAGE, "-c", FIND_MODULES, *ML_RUNTIMES, "kopf", "kubernetes", entrypoint="python"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["kopf", "kubernetes"]


def test_worker_image_has_onnxruntime_and_no_torch() -> None:
    out = run(WORKER_IMAGE, "-c", FIND_MODULES, *ML_RUNTIMES, entrypoint="python")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["onnxruntime", "onnx"]
    # and the packages the images pruned from (kubernetes/aio) still import
    out = run(
        WORKER_IMAGE, "-c", "import kopf, kubernetes.client, onnxruntime", entrypoint="python"
    )
    assert out.returncode == 0, out.stderr


def test_worker_image_prepares_the_digits_zoo_model_without_torch() -> None:
    """The worker image ships digits_cnn's exports, variants and the digits split
    (hack/images/build.sh builds them with the host's torch): a `zoo: digits_cnn` model
    and its variants are served and measured with neither torch nor scikit-learn, and
    another zoo model is refused with what to do instead."""
    script = (
        "from edgeai_worker import variants, zoo; "
        "print(zoo.export_onnx('digits_cnn', trained=True).parent); "
        "print(' '.join(f'{variants.onnx_accuracy(variants.variant_path(\"digits_cnn\", v)):.3f}'"
        " for v in variants.VARIANT_NAMES)); "
        "zoo.export_onnx('resnet18')"
    )
    out = run(WORKER_IMAGE, "-c", script, entrypoint="python")
    lines = out.stdout.split("\n")
    assert lines[0] == "/opt/edgeai/cache/zoo", out.stderr
    accuracies = [float(a) for a in lines[1].split()]
    assert len(accuracies) == 5, out.stderr
    assert min(accuracies) >= 0.85, accuracies
    # the very files the host builds, measured on the same split
    from edgeai_worker import variants

    host = [
        round(variants.onnx_accuracy(variants.variant_path("digits_cnn", v)), 3)
        for v in variants.VARIANT_NAMES
    ]
    assert accuracies == host
    assert out.returncode != 0
    assert "zoo model resnet18 (random weights) is not in the cache" in out.stderr
    assert "spec.source.uri" in out.stderr


@pytest.mark.parametrize("image", [OPERATOR_IMAGE, WORKER_IMAGE])
def test_kubernetes_client_runs_from_bytecode_only(image: str) -> None:
    """The images keep kubernetes' generated client as bytecode only (hack/images/build.sh):
    it still imports, builds and serialises API objects."""
    script = (
        "import pathlib, kubernetes.client as c; "
        "root = pathlib.Path(c.__file__).parent; "
        "pod = c.ApiClient().sanitize_for_serialization("
        "c.V1Pod(metadata=c.V1ObjectMeta(name='p', labels={'a': 'b'}))); "
        "print(len(list(root.rglob('*.py'))), len(list(root.rglob('*.pyc'))), pod['metadata'])"
    )
    out = run(image, "-c", script, entrypoint="python")
    assert out.returncode == 0, out.stderr
    sources, compiled, metadata = out.stdout.split(" ", 2)
    assert sources == "0"
    assert int(compiled) > 500
    assert metadata.strip() == "{'labels': {'a': 'b'}, 'name': 'p'}"


@pytest.mark.parametrize("image", [OPERATOR_IMAGE, WORKER_IMAGE])
def test_no_build_time_ca_left_in_the_image(image: str) -> None:
    bundle = run(image, "/etc/ssl/certs/ca-certificates.crt", entrypoint="cat").stdout
    assert "BEGIN CERTIFICATE" in bundle  # Debian's public CAs stay
    assert run(image, "/tmp/build-ca.pem", entrypoint="ls").returncode != 0
    host_cas = sorted(Path("/usr/local/share/ca-certificates").glob("*.crt"))
    for ca in host_cas:
        body = "".join(line for line in ca.read_text().splitlines() if "CERTIFICATE" not in line)
        assert body[:200] not in bundle.replace("\n", ""), f"{ca} is in {image}'s CA bundle"


def test_worker_container_serves_oip_v2() -> None:
    name = f"edgeai-image-test-{int(time.time())}"
    started = subprocess.run(
        ["docker", "run", "-d", "--rm", "--network", "none", "--name", name,
         "--entrypoint", SERVE_TINY_MODEL[0], WORKER_IMAGE, *SERVE_TINY_MODEL[1:]],
        capture_output=True, text=True,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    base = f"http://127.0.0.1:{WORKER_PORT}"
    probe = (
        "import sys, urllib.request as u; "
        "r = u.urlopen(u.Request(sys.argv[1], data=sys.argv[2].encode() or None, "
        "headers={'Content-Type': 'application/json'}), timeout=5); "
        "print(r.status); print(r.read().decode())"
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            ready = subprocess.run(
                ["docker", "exec", name, "python", "-c", probe, f"{base}/v2/health/ready", ""],
                capture_output=True, text=True,
            )  # fmt: skip
            if ready.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(1)
        logs = subprocess.run(["docker", "logs", name], capture_output=True, text=True)
        assert ready.returncode == 0, ready.stderr + logs.stderr
        assert ready.stdout.split()[0] == "200"
        infer = subprocess.run(
            ["docker", "exec", name, "python", "-c", probe,
             f"{base}/v2/models/{MODEL_NAME}/infer", INFER_BODY],
            capture_output=True, text=True,
        )  # fmt: skip
        assert infer.returncode == 0, infer.stderr
        response = json.loads(infer.stdout.split("\n", 1)[1])
        assert response["outputs"][0]["data"] == INFER_EXPECTED
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)


TRAINER_IMAGE = f"edgeai-trainer:{VERSION}"


def test_trainer_image_runs_the_training_module_with_torch() -> None:
    """edgeai-trainer (`make image-trainer`, not part of `make images`: torch from PyPI
    brings its CUDA libraries, several GB): non-root, labelled, and its training module
    starts and trains a step of torch on the CPU."""
    if subprocess.run(
        ["docker", "image", "inspect", TRAINER_IMAGE], capture_output=True
    ).returncode:
        pytest.skip(f"{TRAINER_IMAGE} not built (make image-trainer)")
    config = inspect(TRAINER_IMAGE)["Config"]
    assert config["Labels"]["org.opencontainers.image.version"] == VERSION
    assert config["User"] == "10001:10001"
    out = run(TRAINER_IMAGE, "-m", "edgeai_worker.training", "--help", entrypoint="python")
    assert out.returncode == 0, out.stderr
    assert "aggregator" in out.stdout
    step = (
        "import torch; m = torch.nn.Linear(64, 10); x = torch.randn(32, 64); "
        "y = torch.randint(0, 10, (32,)); o = torch.optim.SGD(m.parameters(), lr=0.1); "
        "l0 = torch.nn.functional.cross_entropy(m(x), y); l0.backward(); o.step(); "
        "l1 = torch.nn.functional.cross_entropy(m(x), y); print(float(l0) > float(l1))"
    )
    trained = run(TRAINER_IMAGE, "-c", step, entrypoint="python")
    assert trained.stdout.strip() == "True", trained.stderr
    # a worker's data: scikit-learn's digits (scipy under it), split as the job says
    data = (
        "from edgeai_worker.training.data import held_out; x, y = held_out(); "
        "print(x.shape[0], len(set(y.tolist())))"
    )
    loaded = run(TRAINER_IMAGE, "-c", data, entrypoint="python")
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.split()[1] == "10"
