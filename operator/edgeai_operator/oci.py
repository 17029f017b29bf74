"""Model artefacts in an OCI registry: `oci://REGISTRY/REPO:TAG` and
`oci://REGISTRY/REPO@sha256:HEX`, pushed and pulled with the ORAS Python client.

An artefact is one manifest (`application/vnd.oci.image.manifest.v1+json`) with an
empty config and one layer: the model file, its media type `application/vnd.onnx.model`
unless the caller names another, its file name in the `org.opencontainers.image.title`
annotation (what `oras pull` names the file after, so the ORAS CLI reads the same
artefacts).

ORAS's own `pull` writes layers without checking their digests, retries an
unreachable registry for about two minutes and reports failures without the
registry's error code; so `pull` here reads the manifest and the layer with the
client's requests and checks every digest itself, a short probe of `/v2/` answers
"unreachable" at once, and errors carry the HTTP status and the registry's error
codes (`MANIFEST_UNKNOWN`, `NAME_UNKNOWN`, ...).
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import oras.container
import oras.defaults
import oras.provider
import requests

from edgeai_operator.errors import SpecError
from edgeai_operator.files import file_sha256, replaced_when_done

ONNX_MEDIA_TYPE = "application/vnd.onnx.model"
OCI_MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
ACCEPTED_FORMS = (
    "oci://REGISTRY[:PORT]/REPOSITORY:TAG or oci://REGISTRY[:PORT]/REPOSITORY@sha256:<64 hex>"
)
# How long the reachability probe waits; the registries meant here answer in
# milliseconds, and a fetch that cannot connect should fail while the caller still
# has time to report it.
PROBE_TIMEOUT_S = 5.0
_CHUNK_BYTES = 1 << 20
# Tags named in a "manifest unknown" error, enough to spot a typo.
_TAGS_SHOWN = 10

# The grammar of github.com/distribution/reference, narrowed to what a model source
# needs: a host (DNS name, IPv4 or [IPv6]) with an optional port, lower-case path
# components, and either a tag or a sha256 digest.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_HOST = rf"(?:{_LABEL}(?:\.{_LABEL})*|\[[0-9A-Fa-f:.]+\])"
_REGISTRY_RE = re.compile(rf"{_HOST}(?::[0-9]{{1,5}})?")
_COMPONENT_RE = re.compile(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
# A layer's title becomes a file name under dest_dir only when it is a plain name.
_SAFE_FILE_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}")


@dataclass(frozen=True)
class OciRef:
    """A parsed `oci://` reference: exactly one of `tag` and `digest` is set."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def reference(self) -> str:
        """The tag or the digest: what follows `/manifests/` in the registry API."""
        return self.digest or self.tag or ""

    @property
    def host(self) -> str:
        """The registry without its port (an IPv6 address without brackets)."""
        if self.registry.startswith("["):
            return self.registry[1 : self.registry.index("]")]
        return self.registry.rsplit(":", 1)[0]

    @property
    def uri(self) -> str:
        sep = "@" if self.digest else ":"
        return f"oci://{self.registry}/{self.repository}{sep}{self.reference}"

    def __str__(self) -> str:
        return self.uri


@dataclass(frozen=True)
class PulledArtefact:
    """A model file pulled from a registry, its digests checked."""

    path: Path
    layer_digest: str
    manifest_digest: str
    size_bytes: int


class OciError(Exception):
    """A registry could not do what was asked; names the reference and the answer."""

    def __init__(self, uri: str, problem: str) -> None:
        self.uri = uri
        self.problem = problem
        super().__init__(f"{uri}: {problem}")


class FetchError(OciError):
    """Pulling failed: the registry is unreachable, refused, or sent the wrong bytes."""


class PushError(OciError):
    """Pushing failed."""


def parse_reference(uri: str, field: str = "uri") -> OciRef:
    """`oci://REGISTRY[:PORT]/REPOSITORY:TAG` or `oci://REGISTRY[:PORT]/REPOSITORY@sha256:HEX`.

    Anything else raises SpecError naming `field`, the URI, what is wrong with it and
    the accepted forms. Only sha256 digests are accepted: it is what registries and
    the digest checks here compute.
    """

    def refuse(problem: str) -> SpecError:
        return SpecError(field, f"{uri!r} is not an OCI reference: {problem}", ACCEPTED_FORMS)

    if not uri.startswith("oci://"):
        raise refuse("it must start with oci://")
    rest = uri[len("oci://") :]
    registry, slash, path = rest.partition("/")
    if not slash or not registry:
        raise refuse("it names no registry and repository")
    if not _REGISTRY_RE.fullmatch(registry):
        raise refuse(f"{registry!r} is not a registry host[:port]")
    if registry.startswith("["):
        try:
            ipaddress.IPv6Address(registry[1 : registry.index("]")])
        except ValueError:
            raise refuse(f"{registry!r} is not a registry host[:port]") from None
    port = registry.rsplit("]", 1)[-1].rpartition(":")[2] if ":" in registry else ""
    if port and not 0 < int(port) < 65536:
        raise refuse(f"port {port} is out of range 1-65535")

    tag: str | None = None
    digest: str | None = None
    if "@" in path:
        path, _, digest = path.partition("@")
        if not _DIGEST_RE.fullmatch(digest):
            raise refuse(f"digest {digest!r} is not sha256: followed by 64 lower-case hex digits")
    last = path.rsplit("/", 1)[-1]
    if ":" in last:
        path, _, tag = path.rpartition(":")
        if not _TAG_RE.fullmatch(tag):
            raise refuse(f"tag {tag!r} is not 1-128 of [A-Za-z0-9_.-], starting with [A-Za-z0-9_]")
    if tag is not None and digest is not None:
        raise refuse("it has both a tag and a digest; give one")
    if tag is None and digest is None:
        raise refuse("it has neither a tag nor a digest")
    if not path:
        raise refuse("the repository is empty")
    for component in path.split("/"):
        if not _COMPONENT_RE.fullmatch(component):
            raise refuse(
                f"repository component {component!r} is not lower-case letters and digits "
                "separated by '.', '_', '__' or '-'"
            )
    return OciRef(registry=registry, repository=path, tag=tag, digest=digest)


def is_loopback(ref: OciRef) -> bool:
    """A registry on this machine, where plain HTTP crosses no network."""
    if ref.host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(ref.host).is_loopback
    except ValueError:
        return False


def push(
    path: Path,
    uri: str,
    *,
    media_type: str = ONNX_MEDIA_TYPE,
    insecure: bool = False,
) -> str:
    """Pushes the file at `path` as a one-layer OCI artefact tagged as `uri` says
    (`oci://REGISTRY/REPO:TAG`); returns the layer's digest (`sha256:...`).

    Plain HTTP is used for a loopback registry (localhost, 127.0.0.0/8, ::1) or when
    `insecure=True`; any other registry is spoken to over HTTPS with verified
    certificates. The digest is computed here and the registry checks it on upload,
    so the returned digest is the one the registry stores.
    """
    ref = parse_reference(uri)
    if ref.tag is None:
        raise SpecError(
            "uri",
            f"{uri!r} names a digest; a push needs a tag (the digest is the registry's answer)",
            "oci://REGISTRY[:PORT]/REPOSITORY:TAG",
        )
    if not path.is_file():
        raise SpecError("path", f"{path} is not a file")
    layer_digest = file_sha256(path)
    client = _client(ref, insecure)
    _probe(client, ref, PushError)
    try:
        response = client.push(
            target=_container(client, ref),
            files=[f"{path}:{media_type}"],
            disable_path_validation=True,
            quiet=True,
        )
    except (requests.RequestException, ValueError) as exc:
        raise PushError(ref.uri, f"push failed: {exc}") from exc
    if response.status_code not in (200, 201):
        raise PushError(ref.uri, f"manifest upload answered {_answer(response)}")
    return layer_digest


def pull(uri: str, dest_dir: Path, *, insecure: bool = False) -> PulledArtefact:
    """Pulls the one-layer artefact `uri` names (by tag or by digest) into `dest_dir`.

    The manifest's digest is checked against a digest reference, the layer's bytes
    against the digest and size the manifest names; on any mismatch FetchError is
    raised and no file is left under `dest_dir`. The file is named after the layer's
    title annotation when that is a plain file name, else after the layer digest.
    Plain HTTP is used only for a loopback registry or when `insecure=True`.
    """
    ref = parse_reference(uri)
    client = _client(ref, insecure)
    _probe(client, ref, FetchError)
    container = _container(client, ref)

    manifest_url = f"{client.prefix}://{container.manifest_url()}"
    accept = ", ".join(oras.defaults.default_manifest_accepted_media_types)
    response = _request(client, ref, manifest_url, accept=accept)
    if response.status_code != 200:
        problem = f"manifest request answered {_answer(response)}"
        if response.status_code == 404:
            problem += f"; {_repository_state(client, ref, container)}"
        raise FetchError(ref.uri, problem)
    manifest_bytes = response.content
    manifest_digest = "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()
    if ref.digest is not None and manifest_digest != ref.digest:
        raise FetchError(ref.uri, f"the registry sent a manifest with digest {manifest_digest}")
    layer = _model_layer(ref, manifest_bytes)
    layer_digest: str = layer["digest"]
    layer_size_bytes: int = layer["size"]

    dest_dir.mkdir(parents=True, exist_ok=True)
    title = (layer.get("annotations") or {}).get(oras.defaults.annotation_title, "")
    name = title if _SAFE_FILE_NAME_RE.fullmatch(title) else layer_digest.replace(":", "-")
    final = dest_dir / name
    # Renamed to the final name once verified, so a reader of dest_dir never sees a
    # partial or unverified model.
    with replaced_when_done(final) as out:
        size_bytes, actual = _download_blob(client, ref, container, layer_digest, out)
        if size_bytes != layer_size_bytes:
            raise FetchError(
                ref.uri,
                f"layer {layer_digest}: received {size_bytes} bytes, "
                f"the manifest says {layer_size_bytes}",
            )
        if actual != layer_digest:
            raise FetchError(
                ref.uri,
                f"layer digest mismatch: the manifest names {layer_digest}, "
                f"the bytes received hash to {actual}",
            )
    return PulledArtefact(
        path=final,
        layer_digest=layer_digest,
        manifest_digest=manifest_digest,
        size_bytes=size_bytes,
    )


def _client(ref: OciRef, insecure: bool) -> oras.provider.Registry:
    plain_http = insecure or is_loopback(ref)
    return oras.provider.Registry(hostname=ref.registry, insecure=plain_http)


def _container(client: oras.provider.Registry, ref: OciRef) -> oras.container.Container:
    """ORAS's container parser takes a first path component with a dot for a registry
    host; the fields are set from our own parse so `models.v1/net` stays a repository."""
    namespace, _, repository = ref.repository.rpartition("/")
    container = client.get_container(f"{ref.registry}/{repository}:latest")
    container.registry = ref.registry
    container.namespace = namespace or None
    container.repository = repository
    container.tag = ref.tag or oras.defaults.default_tag
    container.digest = ref.digest
    return container


def _probe(client: oras.provider.Registry, ref: OciRef, error: type[OciError]) -> None:
    """`GET /v2/` once, quickly: ORAS's requests retry a refused connection with
    back-off for minutes, which would hide a registry that is simply not there."""
    url = f"{client.prefix}://{ref.registry}/v2/"
    try:
        response = client.session.get(url, timeout=PROBE_TIMEOUT_S)
    except requests.RequestException as exc:
        raise error(
            ref.uri, f"registry {ref.registry} unreachable at {url}: {_reason(exc)}"
        ) from exc
    # 401 is a registry asking for credentials, which the client answers per request.
    if response.status_code not in (200, 401):
        raise error(ref.uri, f"{url} is not an OCI registry: answered {_answer(response)}")


def _request(
    client: oras.provider.Registry, ref: OciRef, url: str, *, accept: str
) -> requests.Response:
    try:
        response: requests.Response = client.do_request(url, "GET", headers={"Accept": accept})
    except (requests.RequestException, ValueError) as exc:
        raise FetchError(ref.uri, f"GET {url} failed: {exc}") from exc
    return response


def _repository_state(
    client: oras.provider.Registry, ref: OciRef, container: oras.container.Container
) -> str:
    """Whether the repository exists and which tags it has: a registry answers a
    missing tag and a missing repository alike (MANIFEST_UNKNOWN) on the manifest."""
    url = f"{client.prefix}://{container.tags_url(N=_TAGS_SHOWN + 1)}"
    response = _request(client, ref, url, accept="application/json")
    if response.status_code != 200:
        return f"repository {ref.repository}: tags list answered {_answer(response)}"
    try:
        tags = [str(t) for t in response.json().get("tags") or []]
    except (ValueError, AttributeError):
        return f"repository {ref.repository}: the tags list is not JSON"
    shown = ", ".join(tags[:_TAGS_SHOWN]) + (", ..." if len(tags) > _TAGS_SHOWN else "")
    return f"repository {ref.repository} has tags: {shown or '(none)'}"


def _model_layer(ref: OciRef, manifest_bytes: bytes) -> dict[str, Any]:
    try:
        manifest = json.loads(manifest_bytes)
    except ValueError as exc:
        raise FetchError(ref.uri, f"the manifest is not JSON: {exc}") from exc
    media_type = manifest.get("mediaType") if isinstance(manifest, dict) else None
    layers = manifest.get("layers") if isinstance(manifest, dict) else None
    if media_type != OCI_MANIFEST_MEDIA_TYPE or not isinstance(layers, list):
        raise FetchError(
            ref.uri,
            f"not a model artefact: manifest media type {media_type!r} "
            f"(accepted: {OCI_MANIFEST_MEDIA_TYPE} with one layer)",
        )
    if len(layers) != 1:
        raise FetchError(
            ref.uri, f"not a model artefact: the manifest has {len(layers)} layers, not one"
        )
    layer = layers[0]
    if (
        not isinstance(layer, dict)
        or not _DIGEST_RE.fullmatch(str(layer.get("digest", "")))
        or not isinstance(layer.get("size"), int)
    ):
        raise FetchError(ref.uri, "the manifest's layer has no sha256 digest and size")
    return layer


def _download_blob(
    client: oras.provider.Registry,
    ref: OciRef,
    container: oras.container.Container,
    digest: str,
    out: Any,
) -> tuple[int, str]:
    """Streams the blob into `out`; returns the bytes written and their digest."""
    hasher = hashlib.sha256()
    size_bytes = 0
    try:
        response: requests.Response = client.get_blob(container, digest, stream=True)
        with contextlib.closing(response):
            if response.status_code != 200:
                raise FetchError(ref.uri, f"layer {digest} answered {_answer(response)}")
            for chunk in response.iter_content(chunk_size=_CHUNK_BYTES):
                hasher.update(chunk)
                out.write(chunk)
                size_bytes += len(chunk)
    except requests.RequestException as exc:
        raise FetchError(ref.uri, f"layer {digest} download failed: {_reason(exc)}") from exc
    return size_bytes, "sha256:" + hasher.hexdigest()


def _answer(response: requests.Response) -> str:
    """`HTTP 404 MANIFEST_UNKNOWN: manifest unknown`: the status and the registry's
    error codes and messages (the distribution spec's error body), when it sent any."""
    text = f"HTTP {response.status_code}"
    try:
        errors = response.json().get("errors") or []
    except (ValueError, AttributeError):
        errors = []
    details = [
        f"{e.get('code', '?')}: {e.get('message', '')}".rstrip(": ")
        for e in errors
        if isinstance(e, dict)
    ]
    return f"{text} {'; '.join(details)}" if details else text


def _reason(exc: requests.RequestException) -> str:
    """The innermost cause (`[Errno 111] Connection refused`), not urllib3's wrapping."""
    cause: BaseException = exc
    while (inner := cause.__cause__ or cause.__context__) is not None:
        cause = inner
    return str(cause) or type(exc).__name__
