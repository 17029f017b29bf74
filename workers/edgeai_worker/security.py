"""Who may talk to a stage: mutual TLS between stages, a bearer token at the entry.

Stage TLS. A stage started with a TLS directory (`tls_dir`: `tls.crt`, `tls.key` and
`ca.crt`, the Secret the operator issues per stage workload) serves the protocol a
second time on `tls_port`, over TLS that requires a client certificate signed by the
deployment's CA, and forwards to `https://` next-stage URLs presenting its own
certificate and checking the next stage's against the same CA. A handshake without a
certificate, with one from another CA (another deployment) or with an expired one
fails, and is counted by why (`handshake_refusal`: untrusted, expired, no-certificate,
plain-text, other) in edgeai_tls_handshake_failures_total; a verified peer must also
carry one of the identities in `tls_peers` as a URI subject alternative name
(`edgeai://<namespace>/<deployment>/<tier>`, the upstream stage), or its requests are
answered 403. On the plain port such a stage answers
inference with 403 (health, metadata and /metrics stay there for probes and scrapes).

The same holds over gRPC: such a stage serves its `grpc_port` over mutual TLS only
(the same CA, the identity checked per call, PERMISSION_DENIED for another one;
`grpc_server.py`), and forwards to `grpcs://` next-stage URLs with its certificate,
checking the next stage's against the CA and the DNS name every stage certificate
carries (`STAGE_TLS_NAME`: gRPC checks a host name where the HTTP forwarder checks
only the CA).

The files are read again every `reload_s` seconds and, when they changed, the next
handshakes use them: the server through an SNI callback that switches each new
connection to the newest context (the gRPC server asks for the newest files at each
handshake), the forwarder by passing the newest client context with each request
(aiohttp pools connections per context, so open connections finish their requests on
the old one; a gRPC forwarder opens a new channel and closes the old one once its
calls are done). The operator renews certificates well before they
expire, so both are valid while connections move over.

Entry authentication. An entry stage started with `entry_token_file` answers every
request but health (`/v2/health/*`) and `/metrics` with 401 when it carries no
`Authorization: Bearer` token and 403 when the token differs from the file's, with the
protocol's error body, before anything reaches the model; the file is re-read like the
certificates, so a changed Secret takes effect without a restart.

An entry stage started with `entry_client_ca` (a CA's certificate file) serves its
clients on the TLS port with its stage certificate and asks each for a client
certificate: one that does not chain to that CA, or has expired, fails the handshake;
a connection without one is answered 401 with the protocol's error body on every
path but health and /metrics. The CA file is re-read with the stage's own files.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import ssl
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"
CA_FILE = "ca.crt"
IDENTITY_SCHEME = "edgeai://"
# The DNS SAN of every stage certificate (edgeai_operator.builders.STAGE_TLS_NAME).
STAGE_TLS_NAME = "edgeai-stage"
OPEN_PATHS = ("/v2/health/", "/metrics")

log = logging.getLogger("edgeai_worker")


def stage_identity(namespace: str, deployment: str, tier: str) -> str:
    """The URI a stage's certificate carries: which deployment, which stage (its tier)."""
    return f"{IDENTITY_SCHEME}{namespace}/{deployment}/{tier}"


def peer_identities(peercert: Any) -> list[str]:
    """The URI subject alternative names of a verified peer certificate
    (`SSLObject.getpeercert()`), in order."""
    if not peercert:
        return []
    return [value for kind, value in peercert.get("subjectAltName", ()) if kind == "URI"]


# OpenSSL's X509_V_ERR_CERT_HAS_EXPIRED
_CERT_HAS_EXPIRED = 10


def handshake_refusal(exc: ssl.SSLError) -> str:
    """Why a server-side handshake failed, as the metric's `reason` label."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "expired" if exc.verify_code == _CERT_HAS_EXPIRED else "untrusted"
    reason = str(exc.reason or "").upper()
    if "PEER_DID_NOT_RETURN_A_CERTIFICATE" in reason or "CERTIFICATE_REQUIRED" in reason:
        return "no-certificate"
    if "HTTP_REQUEST" in reason or "WRONG_VERSION_NUMBER" in reason:
        return "plain-text"
    return "other"


def _counting(on_refused: Callable[[str], None]) -> type[ssl.SSLObject]:
    """An SSLObject class (what the listening context's wrap_bio returns, which asyncio
    drives) that reports each handshake that fails, before asyncio closes the
    connection without a word to the application."""

    class CountingSSLObject(ssl.SSLObject):
        def do_handshake(self) -> None:
            try:
                super().do_handshake()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                raise
            except ssl.SSLError as exc:
                try:
                    on_refused(handshake_refusal(exc))
                except Exception:  # a failing counter must not replace the TLS error
                    logging.getLogger(__name__).exception("counting a refused handshake")
                raise

    return CountingSSLObject


class StageTLS:
    """The server and client TLS contexts of a stage, from the files in `directory`.
    `on_refused(reason)` hears of each handshake the TLS port refuses."""

    def __init__(
        self,
        directory: Path,
        client_ca: Path | None = None,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self.directory = directory
        self._on_refused = on_refused
        self.files = (directory / CERT_FILE, directory / KEY_FILE, directory / CA_FILE)
        missing = [str(p) for p in self.files if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"tls_dir: {', '.join(missing)} missing (accepted: a directory holding "
                f"{CERT_FILE}, {KEY_FILE} and {CA_FILE})"
            )
        # who may call the TLS port: the deployment's stages (the CA in the directory)
        # or, at an entry, the clients of `client_ca`
        self.client_ca = client_ca
        if client_ca is not None and not client_ca.is_file():
            raise FileNotFoundError(
                f"entry_client_ca_file: {client_ca} missing (accepted: a CA certificate file)"
            )
        self._digest = ""
        self.generation = 0
        self.pem: tuple[bytes, bytes, bytes] = (b"", b"", b"")  # certificate, key, CA
        self._server_current = self._server_context()
        self._client_current = self._client_context()
        self.reload()
        self.server_context = self._front_context()

    @property
    def _trusted(self) -> Path:
        """The CA the server checks client certificates against."""
        return self.client_ca if self.client_ca is not None else self.files[2]

    def _server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        # An entry's client without a certificate gets through the handshake to be
        # answered 401 with the protocol's body; a certificate, when sent, must verify.
        ctx.verify_mode = ssl.CERT_OPTIONAL if self.client_ca is not None else ssl.CERT_REQUIRED
        # The peer's certificate is then the one of the handshake for the connection's
        # life, which lets `PeerCheck` judge a connection once.
        ctx.options |= ssl.OP_NO_RENEGOTIATION
        return ctx

    def _client_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        # Stages are reached through Service names and (in tests) addresses: the CA,
        # which is the deployment's own, is what says the next stage is one of ours.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def _front_context(self) -> ssl.SSLContext:
        """The listening socket's context: every new connection switches to the newest
        server context before the handshake goes on (called with or without SNI)."""
        front = self._server_context()
        cert, key, _ = self.files
        front.load_cert_chain(cert, key)
        front.load_verify_locations(cafile=str(self._trusted))

        def switch(sslobj: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
            sslobj.context = self._server_current

        front.sni_callback = switch
        if self._on_refused is not None:
            front.sslobject_class = _counting(self._on_refused)
        return front

    def reload(self) -> bool:
        """Loads the files again when they changed; True when they did. A half-written
        set (a certificate that does not match its key) keeps the current contexts."""
        try:
            cert_pem, key_pem, ca_pem = (path.read_bytes() for path in self.files)
            client_ca_pem = self.client_ca.read_bytes() if self.client_ca else b""
        except OSError as exc:
            log.warning("stage TLS: cannot read %s: %s", self.directory, exc)
            return False
        pem = (cert_pem, key_pem, ca_pem)
        digest = hashlib.sha256(b"".join((*pem, client_ca_pem))).hexdigest()
        if digest == self._digest:
            return False
        cert, key, ca = self.files
        try:
            server, client = self._server_context(), self._client_context()
            for ctx in (server, client):
                ctx.load_cert_chain(cert, key)
            server.load_verify_locations(cafile=str(self._trusted))
            client.load_verify_locations(cafile=str(ca))
        except (ssl.SSLError, OSError) as exc:
            log.warning("stage TLS: keeping the current certificate: %s", exc)
            return False
        self._server_current, self._client_current = server, client
        self._digest = digest
        self.pem = pem
        self.generation += 1
        return True

    @property
    def client_context(self) -> ssl.SSLContext:
        return self._client_current


class EntryToken:
    """The bearer token an entry stage accepts, from a file (a mounted Secret's key)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._token = b""
        if not self.reload() and not self._token:
            raise ValueError(f"entry_token_file: {path} is empty (accepted: a non-empty token)")

    def reload(self) -> bool:
        try:
            token = self.path.read_bytes().strip()
        except OSError as exc:
            if not self._token:
                raise ValueError(f"entry_token_file: cannot read {self.path}: {exc}") from None
            log.warning("entry token: keeping the current token: %s", exc)
            return False
        if not token or token == self._token:
            return False
        self._token = token
        return True

    def check(self, authorization: str | None) -> tuple[int, str] | None:
        """None when `authorization` (the header's value) carries the token; otherwise
        the status to answer (401: no bearer token, 403: another one) and why."""
        if not authorization:
            return 401, "this model needs an Authorization: Bearer token"
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return 401, "the Authorization header must be 'Bearer <token>'"
        if not hmac.compare_digest(token.strip().encode(), self._token):
            return 403, "the bearer token is not accepted"
        return None


def is_open_path(path: str) -> bool:
    """Health endpoints and /metrics: open on every port, for probes and scrapes."""
    return any(path == p or path.startswith(p) for p in OPEN_PATHS)


def grpc_peer_identities(auth_context: Any) -> list[str]:
    """The edgeai:// subject alternative names of a gRPC call's verified peer
    (`context.auth_context()`), in order."""
    names = auth_context.get("x509_subject_alternative_name", ()) if auth_context else ()
    found = [n.decode("utf-8", "replace") for n in names]
    return [n for n in found if n.startswith(IDENTITY_SCHEME)]


class PeerCheck:
    """`check_peer` once per connection: a keep-alive connection carries many requests
    and its verified certificate cannot change (renegotiation is off), so the verdict is
    kept with the connection's SSL object and goes with it."""

    def __init__(self, allowed: Sequence[str]) -> None:
        self.allowed = tuple(allowed)
        self._verdicts: weakref.WeakKeyDictionary[ssl.SSLObject, str | None] = (
            weakref.WeakKeyDictionary()
        )

    def check(self, ssl_object: ssl.SSLObject | None) -> str | None:
        """None when the connection's peer carries an allowed identity; otherwise why not."""
        if ssl_object is None:
            return check_peer(None, self.allowed)
        try:
            return self._verdicts[ssl_object]
        except KeyError:
            verdict = self._verdicts[ssl_object] = check_peer(
                ssl_object.getpeercert(), self.allowed
            )
            return verdict


def check_client(ssl_object: ssl.SSLObject | None) -> str | None:
    """At an entry taking client certificates: None when the connection's client sent
    one (the handshake verified it against the clients' CA); otherwise why not."""
    if ssl_object is None or not ssl_object.getpeercert():
        return "this model needs a client certificate signed by the clients' CA"
    return None


def check_peer(peercert: Any, allowed: Sequence[str]) -> str | None:
    """None when the verified peer carries an allowed identity; otherwise why not."""
    return check_identities(peer_identities(peercert), allowed)


def check_identities(found: Sequence[str], allowed: Sequence[str]) -> str | None:
    """None when one of the peer's identities `found` is allowed; otherwise why not."""
    if any(identity in allowed for identity in found):
        return None
    shown = ", ".join(found) or "no edgeai:// identity"
    return (
        f"peer {shown} is not an upstream stage of this one "
        f"(accepted: {', '.join(allowed) or 'none'})"
    )
