"""`spec.security` of a DNNDeployment, checked field by field.

    security:
      stageTLS: required                     # required (default) | disabled
      entryAuth:
        bearerTokenSecret: {name: camera-clients, key: token}
        clientCASecret: {name: camera-ca, key: ca.crt}
      networkPolicy:
        enabled: true                        # default
        entryFrom: {namespaces: [apps], cidrs: [10.20.0.0/16]}

`stageTLS: required`: stages talk to each other over mutual TLS with certificates the
operator issues per deployment (`stagetls.py`), over HTTP or, with
`placement.transport: grpc`, over gRPC; it needs no `sharing: backbone` (a shared
stage serves several deployments, each with its own CA). `entryAuth`: the entry
(device) stage accepts only requests carrying the Secret's token as `Authorization:
Bearer`, and/or, with `clientCASecret`, serves its clients over TLS (with its stage
certificate, so it needs `stageTLS: required`) and accepts only client certificates
signed by that Secret's CA. `networkPolicy`: the operator's NetworkPolicies for the
deployment (`netpol.py`); `entryFrom` limits who may call the entry (no list: anyone,
the token still applies).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edgeai_operator.errors import SpecError

STAGE_TLS = ("required", "disabled")
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")


@dataclass(frozen=True)
class SecuritySpec:
    stage_tls: bool = True
    # (Secret name, key) of the entry's bearer token; None: the entry is open
    entry_token: tuple[str, str] | None = None
    # (Secret name, key) of the CA the entry's client certificates must chain to
    entry_client_ca: tuple[str, str] | None = None
    network_policy: bool = True
    entry_namespaces: tuple[str, ...] = ()
    entry_cidrs: tuple[str, ...] = ()


def _mapping(value: Any, path: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise SpecError(path, f"must be a mapping, got {type(value).__name__}", "a mapping")
    return dict(value)


def _known(data: Mapping[str, Any], path: str, known: tuple[str, ...]) -> None:
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise SpecError(f"{path}.{unknown[0]}", "is not a field", ", ".join(known))


def _strings(value: Any, path: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SpecError(path, f"must be a list of strings, got {value!r:.60}", "[...]")
    return list(value)


def _secret_ref(value: Any, path: str, default_key: str) -> tuple[str, str]:
    ref = _mapping(value, path)
    _known(ref, path, ("name", "key"))
    name, key = ref.get("name"), ref.get("key", default_key)
    if not isinstance(name, str) or not _NAME.match(name) or len(name) > 253:
        raise SpecError(f"{path}.name", f"{name!r} is not a Secret name", "a DNS subdomain")
    if not isinstance(key, str) or not _KEY.match(key):
        raise SpecError(f"{path}.key", f"{key!r} is not a Secret key", "[-._a-zA-Z0-9]+")
    return name, key


def parse_security(spec: Mapping[str, Any], transport: str, sharing: str) -> SecuritySpec:
    """`spec.security` of a DNNDeployment's `spec`; `transport` and `sharing` are the
    already checked `spec.placement.transport` and `spec.sharing`."""
    data = _mapping(spec.get("security"), "spec.security")
    _known(data, "spec.security", ("stageTLS", "entryAuth", "networkPolicy"))
    tls = data.get("stageTLS", "required")
    if tls not in STAGE_TLS:
        raise SpecError("spec.security.stageTLS", f"{tls!r} is not accepted", "required, disabled")
    if tls == "required" and sharing == "backbone":
        raise SpecError(
            "spec.security.stageTLS",
            "required is not available with spec.sharing: backbone "
            "(a shared stage serves several deployments, each with its own CA)",
            "disabled with sharing: backbone, or sharing: none",
        )
    auth = _mapping(data.get("entryAuth"), "spec.security.entryAuth")
    _known(auth, "spec.security.entryAuth", ("bearerTokenSecret", "clientCASecret"))
    token: tuple[str, str] | None = None
    client_ca: tuple[str, str] | None = None
    if "entryAuth" in data:
        if "bearerTokenSecret" not in auth and "clientCASecret" not in auth:
            raise SpecError(
                "spec.security.entryAuth",
                "names no Secret",
                "bearerTokenSecret: {name: SECRET, key: KEY}, clientCASecret: {name: SECRET, "
                "key: KEY} or both",
            )
        if "bearerTokenSecret" in auth:
            token = _secret_ref(
                auth["bearerTokenSecret"], "spec.security.entryAuth.bearerTokenSecret", "token"
            )
        if "clientCASecret" in auth:
            path = "spec.security.entryAuth.clientCASecret"
            client_ca = _secret_ref(auth["clientCASecret"], path, "ca.crt")
            if tls != "required":
                raise SpecError(
                    path,
                    "needs spec.security.stageTLS: required (the entry serves its clients "
                    "with its stage certificate)",
                    "stageTLS: required, or bearerTokenSecret only",
                )
        if transport == "grpc":
            raise SpecError(
                "spec.security.entryAuth",
                "is not available with spec.placement.transport: grpc",
                "transport: http",
            )
    policy = _mapping(data.get("networkPolicy"), "spec.security.networkPolicy")
    _known(policy, "spec.security.networkPolicy", ("enabled", "entryFrom"))
    enabled = policy.get("enabled", True)
    if not isinstance(enabled, bool):
        raise SpecError("spec.security.networkPolicy.enabled", f"{enabled!r}", "true or false")
    entry = _mapping(policy.get("entryFrom"), "spec.security.networkPolicy.entryFrom")
    _known(entry, "spec.security.networkPolicy.entryFrom", ("namespaces", "cidrs"))
    namespaces = _strings(
        entry.get("namespaces"), "spec.security.networkPolicy.entryFrom.namespaces"
    )
    for i, ns in enumerate(namespaces):
        if not _NAME.match(ns) or len(ns) > 63:
            raise SpecError(
                f"spec.security.networkPolicy.entryFrom.namespaces[{i}]",
                f"{ns!r} is not a namespace name",
                "a DNS label",
            )
    cidrs = _strings(entry.get("cidrs"), "spec.security.networkPolicy.entryFrom.cidrs")
    for i, cidr in enumerate(cidrs):
        try:
            ipaddress.ip_network(cidr, strict=True)
        except ValueError as exc:
            raise SpecError(
                f"spec.security.networkPolicy.entryFrom.cidrs[{i}]",
                f"{cidr!r} is not a network: {exc}",
                "a CIDR such as 10.0.0.0/8",
            ) from None
    return SecuritySpec(
        stage_tls=tls == "required",
        entry_token=token,
        entry_client_ca=client_ca,
        network_policy=enabled,
        entry_namespaces=tuple(namespaces),
        entry_cidrs=tuple(cidrs),
    )
