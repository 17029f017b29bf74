"""A real OCI registry on this machine (tests, benches, the local run): CNCF
distribution's `registry serve`, built by hack/build-binaries.sh, on a free loopback port
with its storage in a directory of its own."""

from __future__ import annotations

import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from edgeai_operator.localcluster import ensure_binaries, free_port, stop_pids

STARTUP_TIMEOUT_S = 30.0


def registry_binary() -> Path:
    """Builds or reuses the pinned registry; EDGEAI_BIN_DIR names a prepared bin dir."""
    return ensure_binaries("registry") / "registry"


class LocalRegistry:
    """`registry serve` on 127.0.0.1; `address` (`127.0.0.1:PORT`) is ready once
    start() returns, `storage` is the filesystem driver's root."""

    def __init__(self, workdir: Path, binary: Path) -> None:
        self.workdir = workdir
        self.binary = binary
        self.storage = workdir / "storage"
        self.log = workdir / "registry.log"
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def config(self) -> str:
        # Deletion on so tests can remove what they pushed; no auth, plain HTTP on
        # loopback only; the debug and metrics listeners stay off.
        return (
            "version: 0.1\n"
            "log: {level: info, formatter: text}\n"
            "storage:\n"
            f"  filesystem: {{rootdirectory: {self.storage}}}\n"
            "  delete: {enabled: true}\n"
            "http:\n"
            f"  addr: {self.address}\n"
        )

    def start(self) -> None:
        self.storage.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "config.yml"
        config.write_text(self.config())
        # Traces and metrics exporters default to an OTLP endpoint on localhost.
        env = {**os.environ, "OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "none"}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [str(self.binary), "serve", str(config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"registry exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}"
                )
            try:
                with urllib.request.urlopen(f"http://{self.address}/v2/", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"registry not answering GET /v2/ on {self.address} after "
                    f"{STARTUP_TIMEOUT_S:.0f}s: {self.log.read_text()[-2000:]}"
                )
            time.sleep(0.1)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_pids({"registry": proc.pid})
            proc.wait()

    def blob_path(self, digest: str) -> Path:
        """Where the filesystem driver keeps a blob's bytes (distribution's layout)."""
        algorithm, hex_digest = digest.split(":", 1)
        return (
            self.storage
            / "docker/registry/v2/blobs"
            / algorithm
            / hex_digest[:2]
            / hex_digest
            / "data"
        )
