"""Security children as literals, no cluster: restricted pod specs, the stage TLS and
entry-token wiring of stage pods, NetworkPolicies, and the stage certificates'
issuing and renewal decisions."""

from __future__ import annotations

import base64
import datetime
import ssl
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edgeai_operator.builders import STAGE_TLS_NAME, DeploymentOptions, Owner, build_children
from edgeai_operator.deployspec import parse_deployment
from edgeai_operator.errors import SpecError
from edgeai_operator.netpol import network_policies
from edgeai_operator.plandoc import PlanDocument
from edgeai_operator.podsecurity import restricted
from edgeai_operator.stagetls import (
    StageCert,
    certificates_due,
    issue_ca,
    issue_stage,
    keep_certificates,
    renew_time,
    stage_certs,
)

OWNER = Owner(name="cam", namespace="vision", uid="u-1")
MODEL = {"zoo": "digits_cnn", "input": {"name": "input", "shape": [1, 1, 8, 8], "dtype": "FP32"}}
NOW = datetime.datetime(2026, 12, 2, 12, 0, tzinfo=datetime.UTC)


def plan(*tiers: str) -> PlanDocument:
    tensors = ["input", "t1", "t2", "output"]
    stages = [
        {"tier": tier, "layers": f"{i}-{i}", "inputs": [tensors[i]], "outputs": [tensors[i + 1]]}
        for i, tier in enumerate(tiers)
    ]
    stages[-1]["outputs"] = ["output"]
    return PlanDocument.from_dict({"model": MODEL, "stages": stages})


def _by(children: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(c for c in children if c["kind"] == kind and c["metadata"]["name"] == name)


def _deployment(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "edgeai.dev/v1alpha1",
        "kind": "DNNDeployment",
        "metadata": {"name": "cam"},
        "spec": {"modelRef": {"name": "digits"}, **spec},
    }


def _container(children: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    container: dict[str, Any] = _by(children, kind, name)["spec"]["template"]["spec"]["containers"][
        0
    ]
    return container


def test_restricted_pod_spec_literal() -> None:
    spec = {
        "initContainers": [{"name": "fetch", "volumeMounts": [{"name": "m", "mountPath": "/m"}]}],
        "containers": [{"name": "main", "volumeMounts": [{"name": "w", "mountPath": "/tmp"}]}],
        "volumes": [{"name": "w", "emptyDir": {}}],
    }
    container_context = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
    }
    assert restricted(spec) == {
        "initContainers": [
            {
                "name": "fetch",
                "volumeMounts": [
                    {"name": "m", "mountPath": "/m"},
                    {"name": "tmp", "mountPath": "/tmp"},
                ],
                "securityContext": container_context,
            }
        ],
        "containers": [
            {
                "name": "main",
                # its own /tmp mount stays the only one
                "volumeMounts": [{"name": "w", "mountPath": "/tmp"}],
                "securityContext": container_context,
            }
        ],
        "volumes": [{"name": "w", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}],
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 10001,
            "runAsGroup": 10001,
            "fsGroup": 10001,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    assert "securityContext" not in spec["containers"][0], "the input is not changed"


def test_stage_pods_mount_their_certificate_and_forward_over_tls() -> None:
    opts = DeploymentOptions(stage_tls=True, entry_token=("camera-clients", "token"))
    children = build_children(
        OWNER,
        {"zone-a": plan("device", "edge", "cloud"), "zone-b": plan("device", "cloud")},
        {},
        opts,
    )
    device = _container(children, "DaemonSet", "cam-device-zone-a")
    assert device["args"][5:] == [
        "--next=https://cam-edge-zone-a.vision.svc:8443",
        "--tls-dir=/etc/edgeai-tls",
        "--entry-token-file=/etc/edgeai-entry/token",
    ]
    assert device["ports"] == [{"name": "http", "containerPort": 8080}]
    device_pod = _by(children, "DaemonSet", "cam-device-zone-a")["spec"]["template"]["spec"]
    assert device_pod["volumes"][1:3] == [
        {"name": "stage-tls", "secret": {"secretName": "cam-device-tls"}},
        {
            "name": "entry-token",
            "secret": {
                "secretName": "camera-clients",
                "items": [{"key": "token", "path": "token"}],
            },
        },
    ]
    edge = _container(children, "Deployment", "cam-edge-zone-a")
    assert edge["args"][5:] == [
        "--next=https://cam-cloud-zone-a.vision.svc:8443",
        "--tls-dir=/etc/edgeai-tls",
        "--tls-port=8443",
        "--tls-peer=edgeai://vision/cam/device",
    ]
    assert edge["ports"] == [
        {"name": "http", "containerPort": 8080},
        {"name": "https", "containerPort": 8443},
    ]
    # zone-b forwards from its device straight to its cloud stage
    assert _container(children, "Deployment", "cam-cloud-zone-a")["args"][-1] == (
        "--tls-peer=edgeai://vision/cam/edge"
    )
    assert _container(children, "Deployment", "cam-cloud-zone-b")["args"][-1] == (
        "--tls-peer=edgeai://vision/cam/device"
    )
    zone_b_device = _container(children, "DaemonSet", "cam-device-zone-b")
    assert "--next=https://cam-cloud-zone-b.vision.svc:8443" in zone_b_device["args"]
    assert _by(children, "Service", "cam-edge-zone-a")["spec"]["ports"] == [
        {"name": "http", "port": 8080, "targetPort": "http"},
        {"name": "https", "port": 8443, "targetPort": "https"},
    ]
    assert stage_certs(OWNER, children) == (
        StageCert("cloud", "cam-cloud-tls", "edgeai://vision/cam/cloud"),
        StageCert("device", "cam-device-tls", "edgeai://vision/cam/device"),
        StageCert("edge", "cam-edge-tls", "edgeai://vision/cam/edge"),
    )


def test_without_stage_tls_nothing_is_mounted_and_stages_speak_http() -> None:
    children = build_children(OWNER, {"z": plan("device", "edge")}, {}, DeploymentOptions())
    device = _container(children, "DaemonSet", "cam-device-z")
    assert device["args"][5:] == ["--next=http://cam-edge-z.vision.svc:8080"]
    assert not any(
        a.startswith("--tls") for a in _container(children, "Deployment", "cam-edge-z")["args"]
    )
    assert stage_certs(OWNER, children) == ()


def test_network_policies_literal() -> None:
    children = build_children(
        OWNER, {"z": plan("device", "edge")}, {}, DeploymentOptions(stage_tls=True)
    )
    device_pods = {
        "edgeai.dev/deployment": "cam",
        "edgeai.dev/tier": "device",
        "edgeai.dev/zone": "z",
    }
    edge_pods = {"edgeai.dev/deployment": "cam", "edgeai.dev/tier": "edge", "edgeai.dev/zone": "z"}
    dns = {
        "to": [{"namespaceSelector": {}}],
        "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
    }
    edge, device = network_policies(OWNER, children, ["apps"], ["10.20.0.0/16"])
    assert device["metadata"]["name"] == "cam-device-z"
    assert device["metadata"]["ownerReferences"] == [OWNER.reference()]
    assert device["spec"] == {
        "podSelector": {"matchLabels": device_pods},
        "policyTypes": ["Ingress", "Egress"],
        "ingress": [
            {
                "from": [
                    {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "apps"}}},
                    {"ipBlock": {"cidr": "10.20.0.0/16"}},
                ],
                "ports": [{"protocol": "TCP", "port": 8080}],
            }
        ],
        "egress": [
            {
                "to": [{"podSelector": {"matchLabels": edge_pods}}],
                "ports": [{"protocol": "TCP", "port": 8443}],
            },
            dns,
        ],
    }
    assert edge["metadata"]["name"] == "cam-edge-z"
    assert edge["spec"] == {
        "podSelector": {"matchLabels": edge_pods},
        "policyTypes": ["Ingress", "Egress"],
        "ingress": [
            {
                "from": [{"podSelector": {"matchLabels": device_pods}}],
                "ports": [{"protocol": "TCP", "port": 8443}],
            },
            {
                "from": [
                    {
                        "namespaceSelector": {},
                        "podSelector": {
                            "matchLabels": {"app.kubernetes.io/name": "edgeai-operator"}
                        },
                    }
                ],
                "ports": [{"protocol": "TCP", "port": 8080}],
            },
        ],
        "egress": [dns],
    }
    # no entryFrom: the entry takes calls from anywhere (its token still applies)
    open_entry = network_policies(OWNER, children)[1]
    assert open_entry["spec"]["ingress"] == [{"ports": [{"protocol": "TCP", "port": 8080}]}]


def test_an_entry_taking_client_certificates_mounts_their_ca_and_serves_tls() -> None:
    security = parse_deployment(
        _deployment(security={"entryAuth": {"clientCASecret": {"name": "camera-ca"}}})
    ).security
    assert security.entry_client_ca == ("camera-ca", "ca.crt")
    assert security.entry_token is None
    opts = DeploymentOptions(stage_tls=True, entry_client_ca=("camera-ca", "ca.crt"))
    children = build_children(OWNER, {"z": plan("device", "edge")}, {}, opts)
    device = _container(children, "DaemonSet", "cam-device-z")
    assert device["args"][5:] == [
        "--next=https://cam-edge-z.vision.svc:8443",
        "--tls-dir=/etc/edgeai-tls",
        "--tls-port=8443",
        "--entry-client-ca=/etc/edgeai-entry-ca/ca.crt",
    ]
    assert device["ports"] == [
        {"name": "http", "containerPort": 8080},
        {"name": "https", "containerPort": 8443},
    ]
    assert device["volumeMounts"][1:3] == [
        {"name": "stage-tls", "mountPath": "/etc/edgeai-tls", "readOnly": True},
        {"name": "entry-client-ca", "mountPath": "/etc/edgeai-entry-ca", "readOnly": True},
    ]
    device_pod = _by(children, "DaemonSet", "cam-device-z")["spec"]["template"]["spec"]
    assert device_pod["volumes"][1:3] == [
        {"name": "stage-tls", "secret": {"secretName": "cam-device-tls"}},
        {
            "name": "entry-client-ca",
            "secret": {"secretName": "camera-ca", "items": [{"key": "ca.crt", "path": "ca.crt"}]},
        },
    ]
    # the edge stage is as without it: its TLS port is for the device only
    edge = _container(children, "Deployment", "cam-edge-z")
    assert edge["args"][5:] == [
        "--tls-dir=/etc/edgeai-tls",
        "--tls-port=8443",
        "--tls-peer=edgeai://vision/cam/device",
    ]
    # the entry's callers reach both its ports
    _, entry = network_policies(OWNER, children, ["apps"])
    assert entry["spec"]["ingress"] == [
        {
            "from": [
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "apps"}}}
            ],
            "ports": [{"protocol": "TCP", "port": 8080}, {"protocol": "TCP", "port": 8443}],
        }
    ]


def test_a_fetched_artefact_opens_egress_to_its_store_only() -> None:
    uri = "oci://registry.local:5000/models:net-1a2b3c4d5e6f"
    model = {"uri": uri, "digest": "sha256:" + "1" * 64, "variant": "fp32", "input": MODEL["input"]}
    doc = PlanDocument.from_dict({**plan("device", "edge").to_dict(), "model": model})
    children = build_children(OWNER, {"z": doc}, {}, DeploymentOptions())
    edge, device = network_policies(OWNER, children)
    assert device["spec"]["egress"][0]["ports"] == [{"protocol": "TCP", "port": 8080}]
    assert edge["spec"]["egress"][-1] == {"ports": [{"protocol": "TCP", "port": 5000}]}


def test_the_spec_defaults_lock_a_deployment_down_and_bad_values_name_the_field() -> None:
    body = _deployment(slo={"latencyP95Ms": 50})
    security = parse_deployment(body).security
    assert security.stage_tls
    assert security.network_policy
    assert security.entry_token is None
    cases = [
        ({"sharing": "backbone"}, "spec.security.stageTLS"),
        ({"security": {"stageTLS": "maybe"}}, "spec.security.stageTLS"),
        ({"security": {"entryAuth": {}}}, "spec.security.entryAuth"),
        (
            {"security": {"stageTLS": "disabled", "entryAuth": {"clientCASecret": {"name": "ca"}}}},
            "spec.security.entryAuth.clientCASecret",
        ),
        (
            {"security": {"entryAuth": {"clientCASecret": {"name": "Not_A_Name"}}}},
            "spec.security.entryAuth.clientCASecret.name",
        ),
        (
            {"security": {"entryAuth": {"clientCASecret": {"name": "ca", "key": "a/b"}}}},
            "spec.security.entryAuth.clientCASecret.key",
        ),
        (
            {"security": {"networkPolicy": {"entryFrom": {"cidrs": ["10.0.0.1/8"]}}}},
            "spec.security.networkPolicy.entryFrom.cidrs[0]",
        ),
    ]
    for extra, field in cases:
        with pytest.raises(SpecError) as caught:
            parse_deployment({**body, "spec": {**body["spec"], **extra}})
        assert caught.value.field == field


class Store:
    """Secrets in memory, with every call recorded."""

    def __init__(self) -> None:
        self.secrets: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, str]] = []

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.calls.append(("get", name))
        return self.secrets.get(name)

    def apply(self, obj: dict[str, Any]) -> None:
        self.calls.append(("apply", obj["metadata"]["name"]))
        self.secrets[obj["metadata"]["name"]] = obj


def _pem(store: Store, name: str, key: str) -> bytes:
    return base64.b64decode(store.secrets[name]["data"][key])


def test_certificates_are_issued_once_renewed_when_due_and_verify_against_the_ca(
    tmp_path: Any,
) -> None:
    stages = [StageCert("device", "cam-device-tls", "edgeai://vision/cam/device")]
    store = Store()
    recheck = keep_certificates(OWNER, stages, store, NOW)
    assert [c for c in store.calls if c[0] == "apply"] == [
        ("apply", "cam-stage-ca"),
        ("apply", "cam-device-tls"),
    ]
    secret = store.secrets["cam-device-tls"]
    assert secret["metadata"]["ownerReferences"] == [OWNER.reference()]
    assert sorted(secret["data"]) == ["ca.crt", "tls.crt", "tls.key"]
    cert_pem = _pem(store, "cam-device-tls", "tls.crt")
    assert (
        recheck
        == renew_time(cert_pem)
        == NOW - datetime.timedelta(minutes=5) + (datetime.timedelta(hours=24, minutes=5) * 2 / 3)
    )
    cert = x509.load_pem_x509_certificate(cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [stages[0].identity]
    # it verifies against the deployment's CA, as the peer stage's TLS does
    ca_pem = _pem(store, "cam-stage-ca", "ca.crt")
    assert _pem(store, "cam-device-tls", "ca.crt") == ca_pem
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_pem))
    (tmp_path / "c.pem").write_bytes(cert_pem)
    (tmp_path / "k.pem").write_bytes(_pem(store, "cam-device-tls", "tls.key"))
    ssl.create_default_context().load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")

    store.calls.clear()
    assert keep_certificates(OWNER, stages, store, NOW + datetime.timedelta(hours=1)) == recheck
    assert not [c for c in store.calls if c[0] == "apply"], "current: nothing issued"
    later = recheck + datetime.timedelta(seconds=1)
    keep_certificates(OWNER, stages, store, later)
    assert [c for c in store.calls if c[0] == "apply"] == [("apply", "cam-device-tls")]
    assert _pem(store, "cam-device-tls", "tls.crt") != cert_pem
    assert _pem(store, "cam-stage-ca", "ca.crt") == ca_pem, "the CA stays"


def test_certificates_due_names_missing_foreign_misnamed_and_old_ones() -> None:
    ca_cert, ca_key = issue_ca(OWNER, NOW)
    other_cert, other_key = issue_ca(OWNER, NOW)
    edge = StageCert("edge", "cam-edge-tls", "edgeai://vision/cam/edge")

    def secret(cert: bytes, ca: bytes) -> dict[str, Any]:
        return {
            "data": {
                "tls.crt": base64.b64encode(cert).decode(),
                "ca.crt": base64.b64encode(ca).decode(),
            }
        }

    good, _ = issue_stage(ca_cert, ca_key, edge.identity, NOW)
    foreign, _ = issue_stage(other_cert, other_key, edge.identity, NOW)
    misnamed, _ = issue_stage(ca_cert, ca_key, "edgeai://vision/cam/cloud", NOW)
    assert certificates_due([edge], {}, ca_cert, NOW) == [edge]
    assert certificates_due([edge], {edge.secret: secret(good, ca_cert)}, ca_cert, NOW) == []
    assert certificates_due([edge], {edge.secret: secret(foreign, other_cert)}, ca_cert, NOW) == [
        edge
    ]
    assert certificates_due([edge], {edge.secret: secret(misnamed, ca_cert)}, ca_cert, NOW) == [
        edge
    ]
    due_at = renew_time(good)
    assert certificates_due([edge], {edge.secret: secret(good, ca_cert)}, ca_cert, due_at) == [edge]
    # every stage certificate carries the DNS name a gRPC forwarder checks; one issued
    # without it is issued again
    san = x509.load_pem_x509_certificate(good).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert san.value.get_values_for_type(x509.DNSName) == [STAGE_TLS_NAME]
    unnamed = _without_dns_name(good, ca_key)
    assert certificates_due([edge], {edge.secret: secret(unnamed, ca_cert)}, ca_cert, NOW) == [edge]


def _without_dns_name(cert_pem: bytes, ca_key_pem: bytes) -> bytes:
    """`cert_pem` issued again by the same CA with its URI SAN only."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.issuer)
        .public_key(cert.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(cert.not_valid_after_utc)
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.UniformResourceIdentifier(u)
                    for u in uris.get_values_for_type(x509.UniformResourceIdentifier)
                ]
            ),
            critical=False,
        )
    )
    return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_a_reconcile_pass_issues_before_applying_and_renews_only_when_due() -> None:
    """reconcile._keep_certificates: a pass that applies stage workloads issues their
    certificates; later passes that apply nothing touch no Secret until the earliest
    renewal is due, then renew it."""
    from edgeai_operator.decide import Apply, Decision, DeploymentState
    from edgeai_operator.reconcile import _keep_certificates

    children = build_children(
        OWNER, {"z": plan("device", "edge")}, {}, DeploymentOptions(stage_tls=True)
    )
    state = DeploymentState()
    store = Store()
    _keep_certificates(Decision({}, None, state, [Apply(c) for c in children]), OWNER, store, NOW)
    assert sorted(name for call, name in store.calls if call == "apply") == [
        "cam-device-tls",
        "cam-edge-tls",
        "cam-stage-ca",
    ]
    assert [s.tier for s in state.tls_stages] == ["device", "edge"]
    due = state.tls_recheck
    assert due == renew_time(_pem(store, "cam-edge-tls", "tls.crt"))
    store.calls.clear()
    _keep_certificates(Decision({}, None, state), OWNER, store, due - datetime.timedelta(seconds=1))
    assert store.calls == [], "nothing is read or written before the renewal"
    _keep_certificates(Decision({}, None, state), OWNER, store, due)
    assert sorted(name for call, name in store.calls if call == "apply") == [
        "cam-device-tls",
        "cam-edge-tls",
    ]
    assert state.tls_recheck > due
