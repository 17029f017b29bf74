"""A kubelet and a kube-proxy for kwok pods, as far as the cluster tests need them.

kwok simulates a pod's lifecycle without running anything. `ProcessKubelet` runs each
selected pod's own container args (`edgeai run-stage ...`, or a trainer's `python -m
edgeai_worker.training ...`) as a real process on the pod's IP (kwok hands them out from
127.244.0.0/16, all loopback), with the plan ConfigMap and the Secrets (stage
certificates, an entry token) the pod mounts written to local directories and each
emptyDir volume a directory of its own per pod (mount paths in the args are rewritten
to those, the deepest mount first), and stops the process (SIGTERM, as a kubelet does) once
the pod is being deleted. As a kubelet does, it first runs the pod's init containers
(`edgeai fetch ...`) one after the other with their exact args, each to exit 0 before
the next starts; one that fails is run again on a later pass, after a back-off that
doubles, and the main container does not start until all have succeeded. A failed node's
kubelet stops reporting but its containers keep running: so does a process here, until
its pod is deleted. kwok marks a pod Ready on a timer; the kubelet here runs the pod's
own readinessProbe against its process and writes the outcome to the pod's Ready
condition, so only processes that answer count as endpoints (a container without a probe
is Ready while its process runs). A process that exits as its pod's restartPolicy lets
it stay down (0 under OnFailure, any code under Never) ends the pod as a kubelet reports it: phase
Succeeded or Failed, the container's exit code, and as its termination message the file
the container wrote at its terminationMessagePath (an argument naming that path is
pointed at a file of the pod's own).

`ServiceProxy` does what kube-proxy does for the namespace's Services: each Service
gets a loopback address (the next one of 127.245.0.0/16 that no other proxy on the
machine holds), and each connection to it goes to one Ready endpoint of the Service
(round robin), as kube-proxy's iptables rules do; with none it closes the
connection, as kube-proxy's reject rule does. The endpoints are the ones the
endpoint-slice controller would list: the Service's selected pods whose Ready condition
is True and that are not being deleted, at the pod port its targetPort names. The proxy
works them out from the pods itself because the API server refuses EndpointSlices with
loopback addresses ("may not be in the loopback range"), so the controller never
publishes these pods. A pod's `--next` (and a trainer's `--aggregator`, each URL of
its comma-separated `--peers`, and the URL of a trunk's `--route=MODEL=URL`) names a
Service by its DNS name, which nothing here
resolves: the kubelet rewrites that host to the Service's loopback address.

Both follow the API server through watches (`Informer`).
"""

from __future__ import annotations

import asyncio
import base64
import errno
import itertools
import json
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

from _cluster_support import Namespace

Obj = dict[str, Any]


class Informer:
    """The objects of one kind in one namespace, kept current by a list and a watch on
    the API server in a thread; `on_change(objects)` runs after every change."""

    def __init__(
        self,
        ns: Namespace,
        list_fn: Callable[[client.ApiClient], Callable[..., Any]],
        selector: str = "",
        on_change: Callable[[dict[str, Obj]], None] | None = None,
    ) -> None:
        self.api = config.new_client_from_config(config_file=str(ns.cluster.kubeconfig))
        self.list = list_fn(self.api)
        self.namespace, self.selector, self.on_change = ns.name, selector, on_change
        self.objects: dict[str, Obj] = {}
        self.synced = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Informer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)
        self.api.close()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(dict(self.objects))

    def _run(self) -> None:
        version = ""
        while not self._stop.is_set():
            if not version:
                resp = self.list(
                    self.namespace, label_selector=self.selector, _preload_content=False
                )
                listed = json.loads(resp.data)
                self.objects = {o["metadata"]["name"]: o for o in listed["items"]}
                version = listed["metadata"]["resourceVersion"]
                self._changed()
                self.synced.set()
            try:
                version = self._watch(version)
            except ApiException as exc:
                if exc.status != 410:
                    raise
                version = ""  # the version expired: list afresh

    def _watch(self, version: str) -> str:
        """Applies watch events from `version` on; returns the version to go on from."""
        # A short server-side timeout: the loop sees `stop` within it.
        for event in watch.Watch().stream(
            self.list,
            self.namespace,
            label_selector=self.selector,
            resource_version=version,
            timeout_seconds=2,
            allow_watch_bookmarks=True,
        ):
            obj = event["raw_object"]
            version = obj["metadata"]["resourceVersion"]
            if event["type"] == "DELETED":
                self.objects.pop(obj["metadata"]["name"], None)
            elif event["type"] != "BOOKMARK":
                self.objects[obj["metadata"]["name"]] = obj
            if event["type"] != "BOOKMARK":
                self._changed()
            if self._stop.is_set():
                break
        return version


def is_ready(pod: Obj) -> bool:
    """The pod's Ready condition is True and it is not being deleted."""
    conds = pod.get("status", {}).get("conditions") or []
    return not pod["metadata"].get("deletionTimestamp") and any(
        c["type"] == "Ready" and c["status"] == "True" for c in conds
    )


class ServiceProxy:
    """kube-proxy for one namespace's Services, on loopback addresses 127.245.x.y."""

    def __init__(self, ns: Namespace) -> None:
        self.ns = ns
        self.addresses: dict[str, str] = {}  # Service name -> its loopback address
        self.rejected = 0  # connections closed for want of a Ready endpoint
        self._endpoints: dict[str, dict[str, list[tuple[str, int]]]] = {}
        self._rotation = itertools.count()
        self._last_address = 0  # the last loopback address tried for a Service
        self._loop = asyncio.new_event_loop()
        self._servers: list[asyncio.Server] = []
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._services = Informer(ns, lambda a: client.CoreV1Api(a).list_namespaced_service)
        self._services.on_change = self._on_services
        self._pods = Informer(ns, lambda a: client.CoreV1Api(a).list_namespaced_pod)
        self._pods.on_change = lambda _: self._update_endpoints()

    def __enter__(self) -> ServiceProxy:
        self._thread.start()
        self._services.start()
        self._pods.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._services.stop()
        self._pods.stop()
        for server in self._servers:
            self._loop.call_soon_threadsafe(server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()  # its self-pipe sockets, else left for the garbage collector

    def url(self, url: str) -> str | None:
        """`url` with a Service's DNS name replaced by its address; None if unknown yet."""
        parts = urlsplit(url)
        host = parts.hostname or ""
        name, _, rest = host.partition(".")
        if rest not in ("", f"{self.ns.name}.svc", f"{self.ns.name}.svc.cluster.local"):
            return url
        if name not in self.addresses:
            return None
        netloc = self.addresses[name] + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))

    def _on_services(self, services: dict[str, Obj]) -> None:
        for name, svc in services.items():
            if name not in self.addresses:
                self.addresses[name] = self._bind(name, svc["spec"]["ports"])
        self._update_endpoints()

    def _bind(self, service: str, ports: list[Obj]) -> str:
        """The next loopback address where every port of the Service listens; one that
        another proxy on this machine holds (another test run's cluster) is skipped."""
        while True:
            self._last_address += 1
            n = self._last_address
            address = f"127.245.{n // 250}.{n % 250 + 1}"
            servers: list[asyncio.Server] = []
            try:
                for port in ports:
                    started = asyncio.run_coroutine_threadsafe(
                        self._listen(service, address, port["port"], port.get("name", "")),
                        self._loop,
                    )
                    servers.append(started.result(timeout=10))
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                for server in servers:
                    self._loop.call_soon_threadsafe(server.close)
                continue
            self._servers += servers
            return address

    def _update_endpoints(self) -> None:
        """Each Service's Ready endpoints by port name, as the endpoint-slice controller
        computes them: selected pods, Ready and not being deleted, with an IP."""
        pods = list(self._pods.objects.values())
        endpoints: dict[str, dict[str, list[tuple[str, int]]]] = {}
        for name, svc in list(self._services.objects.items()):
            selector = svc["spec"].get("selector") or {}
            by_port = endpoints.setdefault(name, {})
            for port in svc["spec"]["ports"]:
                targets = by_port.setdefault(port.get("name", ""), [])
                for pod in pods:
                    labels = pod["metadata"].get("labels") or {}
                    ip = pod.get("status", {}).get("podIP")
                    if not selector or not ip or not is_ready(pod):
                        continue
                    if all(labels.get(k) == v for k, v in selector.items()):
                        targets.append((ip, _target_port(pod, port)))
        self._endpoints = endpoints

    async def _listen(self, service: str, address: str, port: int, port_name: str) -> Any:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            targets = self._endpoints.get(service, {}).get(port_name, [])
            if not targets:
                self.rejected += 1
                writer.close()
                return
            ip, target_port = targets[next(self._rotation) % len(targets)]
            try:
                up_reader, up_writer = await asyncio.open_connection(ip, target_port)
            except OSError:
                writer.close()  # the endpoint's process is gone: the client sees a reset
                return
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

        return await asyncio.start_server(handle, address, port)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


def _target_port(pod: Obj, service_port: Obj) -> int:
    """The pod port a Service port's targetPort names (a number, or a container port's
    name; unset means the Service port's own number)."""
    target = service_port.get("targetPort", service_port["port"])
    if isinstance(target, int):
        return target
    ports = [p for c in pod["spec"]["containers"] for p in c.get("ports") or []]
    return int(next(p["containerPort"] for p in ports if p.get("name") == target))


def _probe_ok(pod: Obj, ip: str) -> bool:
    container = pod["spec"]["containers"][0]
    probe = container["readinessProbe"]["httpGet"]
    port = probe["port"]
    if isinstance(port, str):  # a named container port
        port = next(p["containerPort"] for p in container["ports"] if p.get("name") == port)
    try:
        with urllib.request.urlopen(f"http://{ip}:{port}{probe['path']}", timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


# A failed init container's first back-off before it runs again, and the longest.
INIT_BACKOFF_S = 0.5
INIT_BACKOFF_MAX_S = 10.0


class _InitState:
    """Where a pod's init containers are: the next to run, the one running, and when a
    failed one may run again."""

    def __init__(self) -> None:
        self.done = 0  # init containers that exited 0
        self.running: subprocess.Popen[bytes] | None = None
        self.failures = 0
        self.retry_at = 0.0  # time.monotonic() before which a failed one waits
        self.volumes: dict[str, Path] | None = None  # made local once, for every container


class ProcessKubelet:
    """Runs the selected pods of one namespace as real processes on their pod IPs."""

    def __init__(
        self, ns: Namespace, selector: str, workdir: Path, proxy: ServiceProxy | None = None
    ) -> None:
        self.ns, self.workdir, self.proxy = ns, workdir, proxy
        self.procs: dict[str, tuple[str, subprocess.Popen[bytes]]] = {}
        self.serving: dict[str, bool] = {}  # pod name -> its process passes the probe
        self._reported: dict[str, bool] = {}  # pod name -> Ready written to the API
        self._failed_probes: dict[str, int] = {}  # pod name -> probes failed in a row
        self._stopping: list[threading.Thread] = []
        self._inits: dict[str, _InitState] = {}  # pod name -> its init containers
        self._exited: set[str] = set()  # pods whose ending was reported
        self._pods = Informer(ns, lambda a: client.CoreV1Api(a).list_namespaced_pod, selector)
        self._core = client.CoreV1Api(self._pods.api)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    @property
    def ready(self) -> list[str]:
        """IPs of the pods whose processes pass their readiness probe."""
        return [self.procs[n][0] for n, ok in list(self.serving.items()) if ok and n in self.procs]

    def entry_ip(self, tiers: tuple[str, ...] = ("device", "edge")) -> str | None:
        """The IP of a pod of the first of `tiers` (the chain's entry) that is Ready
        with its process serving, once a pod of every other tier serves too; None
        until then."""
        serving: dict[str, list[Obj]] = {}
        for name, pod in list(self._pods.objects.items()):
            if self.serving.get(name) and name in self.procs:
                serving.setdefault(pod["metadata"]["labels"]["edgeai.dev/tier"], []).append(pod)
        if not all(serving.get(t) for t in tiers):
            return None
        entry = next((p for p in serving[tiers[0]] if is_ready(p)), None)
        return None if entry is None else self.procs[entry["metadata"]["name"]][0]

    def __enter__(self) -> ProcessKubelet:
        self._pods.start()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self._pods.stop()
        for name in list(self.procs):
            self._kill(name)
        for name in list(self._inits):
            self._stop_init(name)
        for thread in self._stopping:
            thread.join(timeout=30)

    def _loop(self) -> None:
        self._pods.synced.wait(30)
        while not self._stop.is_set():
            pods = dict(self._pods.objects)
            for name, pod in pods.items():
                ip = pod.get("status", {}).get("podIP")
                if ip and not pod["metadata"].get("deletionTimestamp") and name not in self.procs:
                    self._start(name, ip, pod)
            for name in list(self._inits):
                current = pods.get(name)
                if name not in self.procs and (
                    current is None or current["metadata"].get("deletionTimestamp")
                ):
                    self._stop_init(name)
            for name in list(self.procs):
                pod = pods.get(name)
                if pod is None or pod["metadata"].get("deletionTimestamp"):
                    self._kill(name)
                elif name in self._exited:
                    continue  # its ending is reported: nothing left to probe
                elif self.procs[name][1].poll() is None or not self._report_exit(name, pod):
                    self._probe(name, pod)
            # The probe period: each pass probes every process once.
            self._stop.wait(0.2)

    def _volumes(self, name: str, pod: Obj) -> dict[str, Path] | None:
        """Each configMap and secret volume (their keys written as files) and emptyDir
        volume of the pod as a local directory, by volume name; None while a Secret the
        pod mounts does not exist yet (a kubelet waits for it too)."""
        local: dict[str, Path] = {}
        for volume in pod["spec"].get("volumes", []):
            path = self.workdir / name / volume["name"]
            if "secret" in volume:
                try:
                    secret = self._core.read_namespaced_secret(
                        volume["secret"]["secretName"], self.ns.name
                    )
                except ApiException as exc:
                    if exc.status == 404:
                        return None
                    raise
                data = {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}
                items = volume["secret"].get("items")
                files = {i["path"]: data[i["key"]] for i in items} if items else data
                path.mkdir(parents=True, exist_ok=True)
                for key, raw in files.items():
                    (path / key).write_bytes(raw)
                local[volume["name"]] = path
            elif "configMap" in volume:
                cm = self._core.read_namespaced_config_map(
                    volume["configMap"]["name"], self.ns.name
                )
                path.mkdir(parents=True, exist_ok=True)
                for key, text in (cm.data or {}).items():
                    (path / key).write_text(text)
                local[volume["name"]] = path
            elif "emptyDir" in volume:
                path.mkdir(parents=True, exist_ok=True)
                local[volume["name"]] = path
        return local

    def _args(
        self, name: str, ip: str, container: Obj, volumes: dict[str, Path]
    ) -> list[str] | None:
        """The container's args with its mount paths made local, `--host` the pod IP and
        `--next` the Service's address; None while that Service is unknown."""
        local = {
            m["mountPath"]: volumes[m["name"]]
            for m in container.get("volumeMounts", [])
            if m["name"] in volumes
        }
        args: list[str] = []
        termination_path = container.get("terminationMessagePath", "/dev/termination-log")
        for arg in container["args"]:
            flag, _, value = arg.partition("=")
            if value == termination_path:
                # a local path already (under /tmp, which the pod may also mount)
                args.append(f"{flag}={self._termination_log(name, container)}")
                continue
            if flag == "--host":
                value = ip
            elif flag in ("--next", "--aggregator", "--peers", "--route"):
                if self.proxy is None:
                    raise AssertionError(f"pod {name} reaches {value}: give the kubelet a proxy")
                # a trunk's route is MODEL=URL
                model, _, value = value.partition("=") if flag == "--route" else ("", "", value)
                urls = [self.proxy.url(url) for url in value.split(",")]
                if None in urls:
                    return None  # a Service is not known yet: try on the next pass
                value = ",".join(u for u in urls if u is not None)
                value = f"{model}={value}" if model else value
            # the deepest mount holding the path, as nested mounts resolve
            for mount, path in sorted(local.items(), key=lambda m: -len(m[0])):
                if value == mount or value.startswith(mount + "/"):
                    value = str(path) + value[len(mount) :]
                    break
            args.append(f"{flag}={value}" if value else arg)
        return args

    def _command(self, container: Obj) -> list[str]:
        # the image's `edgeai` entry point is this interpreter's edgeai_operator.cli;
        # a trainer's `python -m edgeai_worker.training` is this interpreter's module
        command = container.get("command", ["edgeai"])
        if command == ["edgeai"]:
            return [sys.executable, "-m", "edgeai_operator.cli"]
        if command[:2] == ["python", "-m"] and len(command) == 3:
            return [sys.executable, "-m", command[2]]
        raise AssertionError(f"cannot run {command}: only edgeai or python -m MODULE")

    def _init_done(self, name: str, ip: str, pod: Obj, state: _InitState) -> bool:
        """Advances the pod's init containers by what has happened since the last pass;
        True once every one has exited 0."""
        inits = pod["spec"].get("initContainers") or []
        assert state.volumes is not None
        volumes = state.volumes
        while state.done < len(inits):
            if state.running is None:
                if time.monotonic() < state.retry_at:
                    return False
                container = inits[state.done]
                args = self._args(name, ip, container, volumes)
                if args is None:
                    return False
                log = self.workdir / f"{name}.{container['name']}.log"
                with log.open("ab") as out:
                    state.running = subprocess.Popen(
                        [*self._command(container), *args], stdout=out, stderr=subprocess.STDOUT
                    )
            code = state.running.poll()
            if code is None:
                return False
            state.running = None
            if code != 0:
                state.failures += 1
                delay_s = min(INIT_BACKOFF_MAX_S, INIT_BACKOFF_S * 2 ** (state.failures - 1))
                state.retry_at = time.monotonic() + delay_s
                return False
            state.done += 1
        return True

    def _start(self, name: str, ip: str, pod: Obj) -> None:
        state = self._inits.setdefault(name, _InitState())
        if state.volumes is None:
            state.volumes = self._volumes(name, pod)
            if state.volumes is None:
                return  # a Secret it mounts is not there yet: on a later pass
        if not self._init_done(name, ip, pod, state):
            return
        container = pod["spec"]["containers"][0]
        args = self._args(name, ip, container, state.volumes)
        if args is None:
            return
        if container.get("command", ["edgeai"]) == ["edgeai"]:
            args.append(f"--workdir={self.workdir / name / 'work'}")
        with (self.workdir / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(
                [*self._command(container), *args],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.procs[name] = (ip, proc)

    def _stop_init(self, name: str) -> None:
        state = self._inits.pop(name)
        if state.running is not None and state.running.poll() is None:
            state.running.terminate()
            state.running.wait(timeout=30)

    def _probe(self, name: str, pod: Obj) -> None:
        ip, proc = self.procs[name]
        # Like a kubelet, a Ready process turns unready only after failureThreshold
        # probes in a row fail (a busy worker may miss one probe's timeout); a container
        # without a probe is Ready while its process runs.
        probe = pod["spec"]["containers"][0].get("readinessProbe")
        threshold = (probe or {}).get("failureThreshold", 3)
        if probe is None:
            ok = proc.poll() is None
        elif _probe_ok(pod, ip):
            self._failed_probes[name] = 0
            ok = True
        else:
            self._failed_probes[name] = self._failed_probes.get(name, 0) + 1
            ok = self.serving.get(name, False) and self._failed_probes[name] < threshold
        self.serving[name] = ok
        # Like a kubelet, write only what changed, and only once the container runs
        # (kwok's pod-ready stage); a failed node's pods are left as the node
        # controller marked them, since this process's result did not change.
        if pod["status"].get("phase") != "Running" or self._reported.get(name) == ok:
            return
        status = "True" if ok else "False"
        self._core.patch_namespaced_pod_status(
            name,
            self.ns.name,
            {
                "status": {
                    "conditions": [
                        {"type": "Ready", "status": status},
                        {"type": "ContainersReady", "status": status},
                    ]
                }
            },
            _content_type="application/strategic-merge-patch+json",
        )
        self._reported[name] = ok

    def _termination_log(self, name: str, container: Obj) -> Path:
        """The local file standing for the container's terminationMessagePath."""
        del container  # one container per pod here
        return self.workdir / name / "termination-log"

    def _report_exit(self, name: str, pod: Obj) -> bool:
        """A container that exited as its restartPolicy lets it stay down (0 under
        OnFailure or Never, anything under Never) ends its pod, as a kubelet reports it:
        the pod's phase and the container's termination. Other exits are not restarted
        here; False leaves them to the probe."""
        code = self.procs[name][1].returncode
        policy = pod["spec"].get("restartPolicy", "Always")
        if policy == "Always" or (code != 0 and policy == "OnFailure"):
            return False
        container = pod["spec"]["containers"][0]
        terminated: Obj = {"exitCode": code, "reason": "Completed" if code == 0 else "Error"}
        log = self._termination_log(name, container)
        if log.exists():  # as a kubelet keeps it: at most 4096 bytes
            terminated["message"] = log.read_text()[-4096:]
        self._core.patch_namespaced_pod_status(
            name,
            self.ns.name,
            {
                "status": {
                    "phase": "Succeeded" if code == 0 else "Failed",
                    "conditions": [
                        {"type": "Ready", "status": "False"},
                        {"type": "ContainersReady", "status": "False"},
                    ],
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
            },
        )
        self._exited.add(name)
        self.serving[name] = False
        return True

    def _kill(self, name: str) -> None:
        self._inits.pop(name, None)
        self._exited.discard(name)
        _, proc = self.procs.pop(name)
        self.serving.pop(name, None)
        self._failed_probes.pop(name, None)
        proc.terminate()
        # The worker drains its requests before it exits; do not hold up the loop.
        thread = threading.Thread(target=proc.wait, kwargs={"timeout": 30}, daemon=True)
        thread.start()
        self._stopping.append(thread)
