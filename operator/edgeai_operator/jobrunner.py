"""The kubelet of a local cluster's preparation pods.

kwok simulates pod lifecycles without running anything; a DNNModel's preparation Job
must really run, since its output (the prepared artefacts and the result ConfigMap) is
what the operator plans and serves from. The local cluster's kwok therefore leaves pods
labelled `edgeai.dev/job=prepare` running (`localcluster` drops them from its
pod-complete stage), and this process does what a kubelet does for them: once kwok
reports a pod Running it runs the pod's container (`edgeai prepare ...`, its exact
args) as a local process with the cluster's kubeconfig, and when the process exits
writes the container's termination (exit code, reason, message) and the pod's phase,
from which the Job controller completes or fails the Job. A pod deleted while its
process runs has the process stopped. Claims (`/mnt/pvc/CLAIM` mounts) map to
directories under `<workdir>/pvc`; a ConfigMap volume is written (its keys as files) to a
directory of the pod's own, empty when an `optional` ConfigMap does not exist, and an
argument naming its mount path is pointed there.

Run by `LocalCluster.start()` as `python -m edgeai_operator.jobrunner`.
"""

from __future__ import annotations

import argparse
import datetime
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from kubernetes import client, config

from edgeai_operator.preparation import JOB_KIND, JOB_LABEL, PVC_ROOT

# The most of a failed process's output kept as its termination message, as a kubelet
# keeps at most 4096 bytes (FallbackToLogsOnError).
_MESSAGE_BYTES = 4096
_POLL_S = 0.5
Pod = dict[str, Any]


@dataclass
class _Running:
    proc: subprocess.Popen[bytes]
    log: Path
    started: str


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _local_arg(arg: str, mounts: dict[str, Path]) -> str:
    """`--flag=PATH` with PATH under a mount path of `mounts` pointed at its local dir."""
    flag, eq, value = arg.partition("=")
    for mount_path, local in mounts.items():
        if eq and (value == mount_path or value.startswith(mount_path + "/")):
            return f"{flag}={local}{value[len(mount_path) :]}"
    return arg


def command(pod: Pod, pvc_dir: Path, mounts: dict[str, Path] | None = None) -> list[str]:
    """The local command of the pod's container: `edgeai` as this interpreter's module,
    the claim root mapped to `pvc_dir` and arguments under the mount paths of `mounts`
    (mount path -> local directory) to their local directories."""
    container = pod["spec"]["containers"][0]
    program = list(container.get("command") or [])
    if program[:1] != ["edgeai"]:
        raise ValueError(f"runs {program!r}: only edgeai commands run here")
    local = {PVC_ROOT: pvc_dir, **(mounts or {})}
    args = [_local_arg(a, local) for a in container.get("args") or []]
    return [sys.executable, "-m", "edgeai_operator.cli", *program[1:], *args]


class JobRunner:
    def __init__(self, kubeconfig: Path, workdir: Path) -> None:
        self.kubeconfig, self.workdir = kubeconfig, workdir
        self.pvc_dir = workdir / "pvc"
        self.api = config.new_client_from_config(config_file=str(kubeconfig))
        self.core = client.CoreV1Api(self.api)
        self.running: dict[tuple[str, str], _Running] = {}
        self.finished: set[str] = set()  # pod uids

    def tick(self) -> None:
        listed = self.core.list_pod_for_all_namespaces(label_selector=f"{JOB_LABEL}={JOB_KIND}")
        pods: list[Pod] = self.api.sanitize_for_serialization(listed)["items"]
        present = set()
        for pod in pods:
            meta = pod["metadata"]
            key = (str(meta["namespace"]), str(meta["name"]))
            present.add(key)
            if meta.get("deletionTimestamp"):
                self._stop(key)
            elif (
                key not in self.running
                and meta["uid"] not in self.finished
                and (pod.get("status") or {}).get("phase") == "Running"
            ):
                self._start(key, pod)
        for key in list(self.running):
            if key not in present:
                self._stop(key)
            elif self.running[key].proc.poll() is not None:
                self._report(key)

    def _configmap_mounts(self, key: tuple[str, str], pod: Pod) -> dict[str, Path]:
        """Each ConfigMap volume the container mounts, written under the pod's own
        directory: mount path -> that directory."""
        volumes = {
            v["name"]: v["configMap"] for v in pod["spec"].get("volumes") or [] if "configMap" in v
        }
        mounts: dict[str, Path] = {}
        for mount in pod["spec"]["containers"][0].get("volumeMounts") or []:
            ref = volumes.get(mount["name"])
            if ref is None:
                continue
            local = self.workdir / f"{key[0]}-{key[1]}" / mount["name"]
            local.mkdir(parents=True, exist_ok=True)
            try:
                found = self.core.read_namespaced_config_map(ref["name"], key[0])
            except client.ApiException as exc:
                if exc.status != 404 or not ref.get("optional"):
                    raise
                found = None  # an optional ConfigMap that does not exist mounts empty
            for name, text in ((found.data or {}) if found else {}).items():
                (local / name).write_text(text)
            mounts[mount["mountPath"]] = local
        return mounts

    def _start(self, key: tuple[str, str], pod: Pod) -> None:
        log = self.workdir / f"{key[0]}-{key[1]}.log"
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        out: IO[bytes]
        with log.open("wb") as out:
            try:
                argv = command(pod, self.pvc_dir, self._configmap_mounts(key, pod))
            except ValueError as exc:
                out.write(f"{exc}\n".encode())
                argv = [sys.executable, "-c", "raise SystemExit(126)"]
            proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self.running[key] = _Running(proc, log, _now())
        print(f"{_now()} started {key[0]}/{key[1]}: pid {proc.pid}", flush=True)

    def _stop(self, key: tuple[str, str]) -> None:
        running = self.running.pop(key, None)
        if running is not None and running.proc.poll() is None:
            os.killpg(running.proc.pid, signal.SIGTERM)
            running.proc.wait()

    def _report(self, key: tuple[str, str]) -> None:
        running = self.running.pop(key)
        code = running.proc.returncode
        tail = running.log.read_bytes()[-_MESSAGE_BYTES:].decode(errors="replace")
        pod: Pod = self.api.sanitize_for_serialization(
            self.core.read_namespaced_pod(key[1], key[0])
        )
        container = pod["spec"]["containers"][0]
        terminated = {
            "exitCode": code,
            "reason": "Completed" if code == 0 else "Error",
            "startedAt": running.started,
            "finishedAt": _now(),
        }
        if code != 0:
            terminated["message"] = tail
        body = {
            "status": {
                "phase": "Succeeded" if code == 0 else "Failed",
                "containerStatuses": [
                    {
                        "name": container["name"],
                        "image": container["image"],
                        "imageID": "",
                        "ready": False,
                        "restartCount": 0,
                        "started": False,
                        "state": {"terminated": terminated},
                    }
                ],
            }
        }
        self.core.patch_namespaced_pod_status(key[1], key[0], body)
        self.finished.add(str(pod["metadata"]["uid"]))
        print(f"{_now()} {key[0]}/{key[1]} exited {code}", flush=True)

    def run(self) -> None:
        stopping = False

        def stop(*_: object) -> None:
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGTERM, stop)
        while not stopping:
            try:
                self.tick()
            except Exception as exc:  # the API server may be restarting: keep going
                print(f"{_now()} tick failed: {type(exc).__name__}: {exc}", flush=True)
            time.sleep(_POLL_S)
        for key in list(self.running):
            self._stop(key)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgeai_operator.jobrunner")
    parser.add_argument("--kubeconfig", required=True, type=Path)
    parser.add_argument("--workdir", required=True, type=Path)
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    JobRunner(args.kubeconfig, args.workdir).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
