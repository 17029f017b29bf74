"""NetworkPolicies for a DNNDeployment's stages (pure, tested as literals).

One NetworkPolicy per stage workload, named like it and selecting its pods:

- ingress on the data port (the port their `--next` names: the TLS port with stage TLS,
  the gRPC port with gRPC forwarding, else the HTTP port) only from the pods of the
  workloads whose `--next` is this workload's Service: a stage is reached only by its
  upstream stage;
- the entry (device) stage: ingress on the HTTP port (and the TLS port where it
  serves clients with certificates) from `entryFrom` (namespaces, CIDRs) when the spec
  lists any, from anywhere otherwise (the bearer token or client certificate still
  applies);
- every other stage: ingress on the HTTP port (health, /metrics; inference there is
  refused with stage TLS) from the operator's pods, for its scrapes;
- egress only to the next stage's pods on their data port, to DNS (port 53), and,
  when the pods fetch their artefact over the network (`oci://`, `https://`), to the
  store's port.

Kubelet probes come from the node, which NetworkPolicy implementations let through.
Shared backbone stages serve several deployments and get no policy of one of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from edgeai_operator.builders import WORKER_PORT, Owner, is_shared

OPERATOR_POD_LABELS = {"app.kubernetes.io/name": "edgeai-operator"}
DNS_PORTS = [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]


def _arg(container: Mapping[str, Any], flag: str) -> list[str]:
    return [a.split("=", 1)[1] for a in container.get("args", []) if a.startswith(flag + "=")]


def _store_port(uri: str) -> int | None:
    """The port an init container's artefact fetch connects to; None for local ones."""
    parts = urlsplit(uri)
    if parts.scheme == "https":
        return parts.port or 443
    if parts.scheme == "http":
        return parts.port or 80
    if parts.scheme == "oci":
        return parts.port or 443
    return None


def network_policies(
    owner: Owner,
    children: Sequence[Mapping[str, Any]],
    entry_namespaces: Sequence[str] = (),
    entry_cidrs: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """The policies of the deployment's own stage workloads among `children`."""
    services = {
        c["metadata"]["name"]: dict(c["spec"]["selector"])
        for c in children
        if c["kind"] == "Service"
    }
    workloads = [
        c for c in children if c["kind"] in ("Deployment", "DaemonSet") and not is_shared(c)
    ]
    # (upstream pod selector, data port) per Service a workload forwards to
    upstream: dict[str, list[tuple[dict[str, str], int]]] = {}
    for w in workloads:
        for url in _arg(w["spec"]["template"]["spec"]["containers"][0], "--next"):
            parts = urlsplit(url)
            service = (parts.hostname or "").split(".", 1)[0]
            upstream.setdefault(service, []).append(
                (dict(w["spec"]["selector"]["matchLabels"]), parts.port or WORKER_PORT)
            )
    return [_policy(owner, w, services, upstream, entry_namespaces, entry_cidrs) for w in workloads]


def _policy(
    owner: Owner,
    workload: Mapping[str, Any],
    services: Mapping[str, dict[str, str]],
    upstream: Mapping[str, list[tuple[dict[str, str], int]]],
    entry_namespaces: Sequence[str],
    entry_cidrs: Sequence[str],
) -> dict[str, Any]:
    meta = workload["metadata"]
    name = meta["name"]
    pod = workload["spec"]["template"]["spec"]
    container = pod["containers"][0]
    ingress: list[dict[str, Any]] = []
    by_port: dict[int, list[dict[str, Any]]] = {}
    for from_pods, data_port in upstream.get(name, []):
        by_port.setdefault(data_port, []).append({"podSelector": {"matchLabels": from_pods}})
    for port, peers in sorted(by_port.items()):
        ingress.append({"from": peers, "ports": [{"protocol": "TCP", "port": port}]})
    http = [{"protocol": "TCP", "port": WORKER_PORT}]
    if meta["labels"].get("edgeai.dev/tier") == "device":
        entry_ports = http + [
            {"protocol": "TCP", "port": int(port)} for port in _arg(container, "--tls-port")
        ]
        peers = [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}}
            for ns in entry_namespaces
        ] + [{"ipBlock": {"cidr": cidr}} for cidr in entry_cidrs]
        ingress.append({"from": peers, "ports": entry_ports} if peers else {"ports": entry_ports})
    else:
        operator = {"namespaceSelector": {}, "podSelector": {"matchLabels": OPERATOR_POD_LABELS}}
        ingress.append({"from": [operator], "ports": http})
    egress: list[dict[str, Any]] = []
    for url in _arg(container, "--next"):
        parts = urlsplit(url)
        selector = services.get((parts.hostname or "").split(".", 1)[0])
        if selector is not None:
            egress.append(
                {
                    "to": [{"podSelector": {"matchLabels": selector}}],
                    "ports": [{"protocol": "TCP", "port": parts.port or WORKER_PORT}],
                }
            )
    egress.append({"to": [{"namespaceSelector": {}}], "ports": DNS_PORTS})
    for init in pod.get("initContainers", []):
        args = init.get("args", [])
        store = _store_port(args[1]) if len(args) > 1 and args[0] == "fetch" else None
        if store is not None:
            egress.append({"ports": [{"protocol": "TCP", "port": store}]})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": name,
            "namespace": owner.namespace,
            "labels": dict(meta["labels"]),
            "ownerReferences": [owner.reference()],
        },
        "spec": {
            "podSelector": {"matchLabels": dict(workload["spec"]["selector"]["matchLabels"])},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": ingress,
            "egress": egress,
        },
    }
