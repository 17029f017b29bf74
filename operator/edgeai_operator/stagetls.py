"""Certificates for mutual TLS between a DNNDeployment's stages.

Each DNNDeployment with `spec.security.stageTLS: required` gets its own CA (EC P-256,
valid `CA_LIFETIME`), kept in the Secret `<deployment>-stage-ca` (only the operator
mounts or reads it), and one certificate per stage tier in `<deployment>-<tier>-tls`
(`tls.crt`, `tls.key`, `ca.crt`), which the stage pods mount. A stage certificate
names the deployment and the stage as its URI subject alternative name
`edgeai://<namespace>/<deployment>/<tier>` (`builders.stage_identity`) and carries the
DNS name `builders.STAGE_TLS_NAME` (the name a gRPC forwarder checks), is valid for
`STAGE_CERT_LIFETIME` and is renewed once `RENEW_AFTER` of that has passed, so the
kubelet's Secret refresh (about a minute) and the worker's reload (every few seconds)
have hours to pick it up while the old one is still valid. Both Secrets are owned by
the DNNDeployment and go with it.

`certificates_due` decides (pure) which Secrets to issue from what exists and the
time; `keep_certificates` does the reading, issuing and applying through a
`SecretStore`, and tells the reconcile pass when to look again, so the steady state
costs no API request.
"""

from __future__ import annotations

import base64
import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgeai_operator.builders import (
    MANAGED_BY,
    STAGE_TLS_NAME,
    Owner,
    dns_label,
    stage_identity,
    tls_secret_name,
)

CA_LIFETIME = datetime.timedelta(days=365)
STAGE_CERT_LIFETIME = datetime.timedelta(hours=24)
RENEW_AFTER = 2 / 3  # of a stage certificate's lifetime
TLS_LABEL = "edgeai.dev/stage-tls"


def ca_secret_name(owner: Owner) -> str:
    return dns_label(f"{owner.name}-stage-ca")


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def issue_ca(owner: Owner, now: datetime.datetime) -> tuple[bytes, bytes]:
    """A new CA for the deployment: (certificate PEM, key PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgeai-operator"),
            x509.NameAttribute(
                NameOID.COMMON_NAME, f"{owner.namespace}/{owner.name} stage CA"[:64]
            ),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _cert_pem(cert), _key_pem(key)


def issue_stage(
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    identity: str,
    now: datetime.datetime,
    lifetime: datetime.timedelta = STAGE_CERT_LIFETIME,
) -> tuple[bytes, bytes]:
    """A stage certificate for `identity` (its URI SAN), signed by the CA, usable as
    both TLS server and client: (certificate PEM, key PEM)."""
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("the stage CA key is not an EC key")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity[:64])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + lifetime)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(identity), x509.DNSName(STAGE_TLS_NAME)]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return _cert_pem(cert), _key_pem(key)


def renew_time(cert_pem: bytes) -> datetime.datetime:
    """When a stage certificate is due for renewal: RENEW_AFTER into its lifetime."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return start + (end - start) * RENEW_AFTER


def _names(cert_pem: bytes) -> tuple[list[str], list[str]]:
    """The URI and the DNS subject alternative names of a certificate."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    return (
        list(san.get_values_for_type(x509.UniformResourceIdentifier)),
        list(san.get_values_for_type(x509.DNSName)),
    )


def _data(secret: Mapping[str, Any] | None, key: str) -> bytes | None:
    value = ((secret or {}).get("data") or {}).get(key)
    return base64.b64decode(value) if value else None


@dataclass(frozen=True)
class StageCert:
    tier: str
    secret: str
    identity: str


def stage_certs(owner: Owner, children: Sequence[Mapping[str, Any]]) -> tuple[StageCert, ...]:
    """The stage certificates the children's pods mount (builders._secure_stage)."""
    tiers: set[str] = set()
    for child in children:
        if child.get("kind") not in ("Deployment", "DaemonSet"):
            continue
        volumes = child["spec"]["template"]["spec"].get("volumes", [])
        if any(v.get("name") == "stage-tls" for v in volumes):
            tiers.add(child["metadata"]["labels"]["edgeai.dev/tier"])
    return tuple(
        StageCert(t, tls_secret_name(owner, t), stage_identity(owner, t)) for t in sorted(tiers)
    )


def _current(cert: bytes | None, same_ca: bool, identity: str, now: datetime.datetime) -> bool:
    if cert is None or not same_ca:
        return False
    # a certificate from before the DNS name (gRPC checks it) is issued again
    return _names(cert) == ([identity], [STAGE_TLS_NAME]) and now < renew_time(cert)


def certificates_due(
    stages: Sequence[StageCert],
    existing: Mapping[str, Mapping[str, Any] | None],
    ca_cert_pem: bytes,
    now: datetime.datetime,
) -> list[StageCert]:
    """The stages whose Secret must be issued: missing, from another CA, naming
    another identity (or without the DNS name), or past its renewal time."""
    due = []
    for stage in stages:
        secret = existing.get(stage.secret)
        cert, ca = _data(secret, "tls.crt"), _data(secret, "ca.crt")
        if not _current(cert, ca == ca_cert_pem, stage.identity, now):
            due.append(stage)
    return due


def _secret(owner: Owner, name: str, data: Mapping[str, bytes]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": owner.namespace,
            "labels": {**MANAGED_BY, "edgeai.dev/deployment": owner.name, TLS_LABEL: "true"},
            "ownerReferences": [owner.reference()],
        },
        "type": "Opaque",
        "data": {k: base64.b64encode(v).decode() for k, v in sorted(data.items())},
    }


def ca_secret(owner: Owner, cert_pem: bytes, key_pem: bytes) -> dict[str, Any]:
    return _secret(owner, ca_secret_name(owner), {"ca.crt": cert_pem, "ca.key": key_pem})


def stage_secret(
    owner: Owner, stage: StageCert, cert_pem: bytes, key_pem: bytes, ca_pem: bytes
) -> dict[str, Any]:
    return _secret(owner, stage.secret, {"tls.crt": cert_pem, "tls.key": key_pem, "ca.crt": ca_pem})


class SecretStore(Protocol):
    def get(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    def apply(self, obj: dict[str, Any]) -> None: ...


def keep_certificates(
    owner: Owner,
    stages: Sequence[StageCert],
    store: SecretStore,
    now: datetime.datetime,
    lifetime: datetime.timedelta = STAGE_CERT_LIFETIME,
) -> datetime.datetime | None:
    """Makes every stage's Secret current (the CA first); returns when to look again
    (the earliest renewal), None when there is nothing to keep."""
    if not stages:
        return None
    ca = store.get(owner.namespace, ca_secret_name(owner))
    ca_cert, ca_key = _data(ca, "ca.crt"), _data(ca, "ca.key")
    if ca_cert is None or ca_key is None:
        ca_cert, ca_key = issue_ca(owner, now)
        store.apply(ca_secret(owner, ca_cert, ca_key))
    existing = {s.secret: store.get(owner.namespace, s.secret) for s in stages}
    due = set(certificates_due(stages, existing, ca_cert, now))
    renewals = []
    for stage in stages:
        if stage in due:
            cert, key = issue_stage(ca_cert, ca_key, stage.identity, now, lifetime)
            store.apply(stage_secret(owner, stage, cert, key, ca_cert))
        else:
            cert = _data(existing[stage.secret], "tls.crt") or b""
        renewals.append(renew_time(cert))
    return min(renewals)
