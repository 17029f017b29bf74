"""Model sources: where a DNNModel's ONNX file comes from, KServe `storageUri`-style.

`parse_source` checks a URI (and its digest) as a user wrote it and names the field on
any error; `fetch` writes the bytes under a directory and returns their sha256. A file
appears under its final name only once it is complete and its digest matches: every
scheme writes to a temporary file beside it first and renames it.

Schemes:
- `zoo://NAME`: a zoo model, exported with torch (so this one needs torch installed);
  `digits_cnn` comes trained.
- `https://...`, `http://...`: a `sha256` is required, since nothing else pins what a
  server returns. Transient failures (connection refused or reset, timeouts, HTTP 5xx and
  429) are retried with exponential backoff. A server's certificate is checked against
  the system's trusted CAs plus those of `ca_bundle` (`trust_context`); one that does not
  verify is a final failure, not retried.
- `pvc://CLAIM/PATH`: the file PATH on the claim, which the stage pod mounts at
  `PVC_ROOT/CLAIM`.
- `configmap://NAME/KEY`: `binaryData[KEY]` of a ConfigMap in the pod's namespace (small
  models: a ConfigMap holds at most 1 MiB).
- `oci://REGISTRY/REPO:TAG` or `oci://REGISTRY/REPO@sha256:HEX`: an OCI artefact (oci.py).
"""

from __future__ import annotations

import hashlib
import http.client
import re
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from edgeai_operator import k8s
from edgeai_operator.errors import SpecError
from edgeai_operator.files import replaced_when_done
from edgeai_worker.zoo import ZOO_NAMES

Scheme = Literal["zoo", "https", "http", "pvc", "configmap", "oci"]

ACCEPTED_FORMS = (
    f"zoo://NAME (NAME one of {', '.join(ZOO_NAMES)}), "
    "https://HOST/PATH or http://HOST/PATH (with a sha256), pvc://CLAIM/PATH, "
    "configmap://NAME/KEY, oci://REGISTRY/REPO:TAG or oci://REGISTRY/REPO@sha256:HEX"
)

# Where a stage pod's service account token and namespace are mounted.
_POD_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")

_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_SUBDOMAIN = re.compile(rf"{_DNS_LABEL}(\.{_DNS_LABEL})*")
_CONFIGMAP_KEY = re.compile(r"[-._a-zA-Z0-9]+")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_CHUNK_BYTES = 1 << 20


class FetchError(Exception):
    """A source that could not be fetched (unreachable, an HTTP error, a missing object,
    a digest mismatch); the message names the URI and what went wrong."""

    def __init__(self, uri: str, problem: str) -> None:
        self.uri = uri
        self.problem = problem
        super().__init__(f"cannot fetch {uri}: {problem}")


class _TransientError(FetchError):
    """A failure worth another attempt (the server or the network may recover)."""


@dataclass(frozen=True)
class Source:
    """A parsed model source. `location` is the zoo name, the URL, the claim, the
    ConfigMap name or the OCI reference; `path` is the file on the claim or the
    ConfigMap key (empty otherwise); `expect_sha256` (lowercase hex) is checked on fetch."""

    scheme: Scheme
    uri: str
    location: str
    path: str = ""
    expect_sha256: str | None = None


@dataclass(frozen=True)
class Fetched:
    """A fetched model file: where it is, the sha256 (lowercase hex) and size of its bytes."""

    path: Path
    sha256: str
    size_bytes: int
    uri: str

    def to_dict(self) -> dict[str, object]:
        return {
            "uri": self.uri,
            "path": str(self.path),
            "sha256": self.sha256,
            "sizeBytes": self.size_bytes,
        }


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry a transient failure: `attempts` in all (the
    first included), waiting base_delay_s, 2*base_delay_s, 4*base_delay_s, ... between
    them, each wait at most max_delay_s."""

    attempts: int = 5
    base_delay_s: float = 0.5
    max_delay_s: float = 10.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise SpecError("attempts", f"{self.attempts} is not a count of attempts", ">= 1")
        if self.base_delay_s < 0 or self.max_delay_s < 0:
            raise SpecError("base_delay_s/max_delay_s", "a delay is negative", ">= 0 seconds")

    def delays_s(self) -> list[float]:
        """The waits before the second, third, ... attempt."""
        return [
            min(self.max_delay_s, self.base_delay_s * 2**retry)
            for retry in range(self.attempts - 1)
        ]


def _sibling_field(field_name: str, leaf: str) -> str:
    # spec.source.uri -> spec.source.sha256: the digest sits beside the URI
    parent, dot, _ = field_name.rpartition(".")
    return f"{parent}{dot}{leaf}" if dot else leaf


def _normalise_sha256(value: str, sha256_field: str) -> str:
    hex_digest = value.strip().lower().removeprefix("sha256:")
    if not _SHA256_HEX.fullmatch(hex_digest):
        raise SpecError(
            sha256_field,
            f"{value!r} is not a sha256 digest",
            "64 hexadecimal digits, optionally prefixed with sha256:",
        )
    return hex_digest


def _check_relative_path(path: str, field_name: str, uri: str) -> None:
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise SpecError(
            field_name,
            f"{uri!r} names the path {path!r} on the claim",
            "a relative path such as models/net.onnx, without empty, '.' or '..' parts",
        )


def parse_source(
    uri: str, *, sha256: str | None, field: str, sha256_field: str | None = None
) -> Source:
    """Checks a source URI as a user wrote it in `field` (e.g. `spec.source.uri`);
    `sha256` is the expected digest (required for http and https, checked for every
    scheme when given), from `sha256_field` (by default the field beside `field`)."""
    digest_field = sha256_field or _sibling_field(field, "sha256")
    expect = _normalise_sha256(sha256, digest_field) if sha256 is not None else None
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme not in ("zoo", "https", "http", "pvc", "configmap", "oci"):
        raise SpecError(field, f"{uri!r} is not a model source URI", ACCEPTED_FORMS)

    if scheme == "zoo":
        if rest not in ZOO_NAMES:
            raise SpecError(field, f"{uri!r} names no zoo model", ", ".join(ZOO_NAMES))
        return Source("zoo", uri, rest, expect_sha256=expect)

    if scheme in ("https", "http"):
        parsed = urllib.parse.urlsplit(uri)
        if not parsed.hostname or not parsed.path.strip("/"):
            raise SpecError(
                field, f"{uri!r} names no host or no file", f"{scheme}://HOST[:PORT]/PATH"
            )
        try:
            parsed.port  # noqa: B018 - the property raises on a bad port
        except ValueError as exc:
            raise SpecError(field, f"{uri!r} has a bad port: {exc}", "1-65535") from exc
        if expect is None:
            raise SpecError(
                digest_field,
                f"a sha256 is required for the {scheme} source {uri!r}, since nothing else "
                "pins what a server returns",
                "64 hexadecimal digits",
            )
        web: Scheme = "https" if scheme == "https" else "http"
        return Source(web, uri, uri, expect_sha256=expect)

    if scheme == "oci":
        from edgeai_operator import oci  # the OCI client loads only for oci sources

        oci.parse_reference(uri, field=field)
        return Source("oci", uri, uri, expect_sha256=expect)

    name, slash, path = rest.partition("/")
    what = "claim" if scheme == "pvc" else "ConfigMap"
    if not slash or len(name) > 253 or not _DNS_SUBDOMAIN.fullmatch(name):
        form = "pvc://CLAIM/PATH" if scheme == "pvc" else "configmap://NAME/KEY"
        raise SpecError(
            field,
            f"{uri!r} does not name a {what} ({name!r})",
            f"{form}, the {what} name a DNS subdomain (lowercase letters, digits, '-', '.')",
        )
    if scheme == "pvc":
        _check_relative_path(path, field, uri)
        return Source("pvc", uri, name, path, expect)
    if len(path) > 253 or not _CONFIGMAP_KEY.fullmatch(path) or path in (".", ".."):
        raise SpecError(
            field,
            f"{uri!r} names the ConfigMap key {path!r}",
            "configmap://NAME/KEY, KEY of letters, digits, '-', '_' and '.'",
        )
    return Source("configmap", uri, name, path, expect)


def _file_name(source: Source) -> str:
    if source.scheme == "zoo":
        return f"{source.location}.onnx"
    if source.scheme in ("https", "http"):
        tail = PurePosixPath(urllib.parse.urlsplit(source.uri).path).name
        return tail if tail not in ("", ".", "..") else "model.onnx"
    return PurePosixPath(source.path).name


def _write_verified(dest: Path, chunks: Iterable[bytes], source: Source) -> Fetched:
    """Writes the chunks to a temporary file beside `dest`, hashing while writing, and
    renames it to `dest` only when the digest matches; the temporary file never outlives
    a failure (a broken stream, a mismatch)."""
    digest = hashlib.sha256()
    size_bytes = 0
    with replaced_when_done(dest) as out:
        for chunk in chunks:
            out.write(chunk)
            digest.update(chunk)
            size_bytes += len(chunk)
        actual = digest.hexdigest()
        if source.expect_sha256 is not None and actual != source.expect_sha256:
            raise FetchError(
                source.uri,
                f"sha256 mismatch: expected {source.expect_sha256}, got {actual} "
                f"({size_bytes} bytes); nothing was kept",
            )
    return Fetched(dest, actual, size_bytes, source.uri)


def _read_file(path: Path) -> Iterator[bytes]:
    with path.open("rb") as src:
        while chunk := src.read(_CHUNK_BYTES):
            yield chunk


# Names of the files a CA bundle directory contributes (a ConfigMap's keys, mounted).
_CA_FILE_SUFFIXES = (".crt", ".pem")


def ca_files(ca_bundle: Path, flag: str = "--ca-bundle") -> list[Path]:
    """The PEM files of a CA bundle: the file itself, or every `*.crt`/`*.pem` file of a
    directory (none is fine: an optional ConfigMap that does not exist mounts empty).
    A path that does not exist is refused naming `flag`."""
    if ca_bundle.is_dir():
        return sorted(
            p for p in ca_bundle.iterdir() if p.is_file() and p.name.endswith(_CA_FILE_SUFFIXES)
        )
    if ca_bundle.is_file():
        return [ca_bundle]
    raise SpecError(
        flag, f"{str(ca_bundle)!r} does not exist", "a PEM file of CA certificates or a directory"
    )


def trust_context(ca_bundle: Path | None, flag: str = "--ca-bundle") -> ssl.SSLContext:
    """The TLS context of https fetches: the system's trusted CAs, plus every CA
    certificate of `ca_bundle` (see `ca_files`). A file that holds no certificate is
    refused naming `flag`."""
    context = ssl.create_default_context()
    for path in ca_files(ca_bundle, flag) if ca_bundle is not None else []:
        try:
            context.load_verify_locations(cafile=str(path))
        except ssl.SSLError as exc:
            raise SpecError(
                flag, f"{str(path)!r} holds no readable certificate ({exc.reason})", "PEM"
            ) from exc
    return context


def _http_chunks(url: str, timeout_s: float, context: ssl.SSLContext) -> Iterator[bytes]:
    request = urllib.request.Request(url, headers={"User-Agent": "edgeai-fetch"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s, context=context) as response:
            while chunk := response.read(_CHUNK_BYTES):
                yield chunk
            # http.client ends a body cut short by a closed connection without an error;
            # `length` keeps the bytes the Content-Length promised and never came
            if response.length:
                raise _TransientError(
                    url, f"the connection closed {response.length} bytes before the body's end"
                )
    except urllib.error.HTTPError as exc:
        exc.close()  # the error holds the response's connection open until closed
        problem = f"HTTP {exc.code} {exc.reason}"
        if exc.code >= 500 or exc.code == 429:
            raise _TransientError(url, problem) from exc
        raise FetchError(url, problem) from exc
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ssl.SSLCertVerificationError):
            # a certificate no trusted CA signed does not get better by retrying
            raise FetchError(
                url,
                f"TLS certificate verify failed: {exc.reason.verify_message}; trust the "
                "server's CA with a CA bundle (edgeai fetch/prepare --ca-bundle, the "
                "operator's EDGEAI_CA_BUNDLE_CONFIGMAP)",
            ) from exc
        raise _TransientError(url, f"{exc.reason}") from exc
    except (OSError, http.client.HTTPException) as exc:
        # a reset or a short body halfway through the download
        raise _TransientError(url, f"{type(exc).__name__}: {exc}") from exc


def _fetch_http(
    source: Source,
    dest: Path,
    timeout_s: float,
    retry: RetryPolicy,
    sleep: Callable[[float], None],
    context: ssl.SSLContext,
) -> Fetched:
    delays_s = retry.delays_s()
    for attempt in range(1, retry.attempts + 1):
        try:
            return _write_verified(dest, _http_chunks(source.uri, timeout_s, context), source)
        except _TransientError as exc:
            if attempt == retry.attempts:
                raise FetchError(
                    source.uri, f"{exc.problem} (after {retry.attempts} attempts)"
                ) from exc
            sleep(delays_s[attempt - 1])
    raise AssertionError("unreachable: the last attempt returns or raises")


def _pod_namespace() -> str:
    try:
        return _POD_NAMESPACE_FILE.read_text().strip()
    except OSError as exc:
        raise SpecError(
            "namespace",
            f"no namespace given and none mounted at {_POD_NAMESPACE_FILE} ({exc.strerror})",
            "the ConfigMap's namespace (edgeai fetch --namespace NS)",
        ) from exc


def _fetch_configmap(source: Source, dest: Path, namespace: str | None) -> Fetched:
    ns = namespace or _pod_namespace()
    try:
        data = k8s.read_configmap_bytes(ns, source.location, source.path)
    except LookupError as exc:
        raise FetchError(source.uri, f"{exc.args[0]} (namespace {ns})") from exc
    except k8s.ApiException as exc:
        raise FetchError(
            source.uri, f"the API server answered {exc.status} {exc.reason} (namespace {ns})"
        ) from exc
    return _write_verified(dest, [data], source)


def _fetch_pvc(source: Source, dest: Path, pvc_root: Path) -> Fetched:
    path = pvc_root / source.location / source.path
    if not path.is_file():
        mount = pvc_root / source.location
        why = "the claim is not mounted there" if not mount.is_dir() else "no such file"
        raise FetchError(source.uri, f"{path}: {why}")
    return _write_verified(dest, _read_file(path), source)


def _fetch_zoo(source: Source, dest: Path) -> Fetched:
    from edgeai_worker import zoo  # torch is needed from here on

    exported = zoo.export_onnx(source.location, trained=source.location == "digits_cnn")
    return _write_verified(dest, _read_file(exported), source)


def _fetch_oci(source: Source, dest_dir: Path) -> Fetched:
    from edgeai_operator import oci

    try:
        pulled = oci.pull(source.uri, dest_dir)
    except oci.OciError as exc:
        raise FetchError(source.uri, exc.problem) from exc
    # oci.pull has checked the bytes against the layer digest the manifest names
    actual = pulled.layer_digest.removeprefix("sha256:")
    if source.expect_sha256 is not None and actual != source.expect_sha256:
        pulled.path.unlink(missing_ok=True)
        raise FetchError(
            source.uri,
            f"sha256 mismatch: expected {source.expect_sha256}, the artefact's layer is "
            f"{actual}; nothing was kept",
        )
    return Fetched(pulled.path, actual, pulled.size_bytes, source.uri)


def fetch(
    source: Source,
    dest_dir: Path,
    *,
    namespace: str | None = None,
    pvc_root: Path = Path("/mnt/pvc"),
    timeout_s: float = 60,
    retry: RetryPolicy = RetryPolicy(),
    sleep: Callable[[float], None] = time.sleep,
    ca_bundle: Path | None = None,
) -> Fetched:
    """Writes the source's model file under dest_dir (created if missing) and returns
    it with its sha256. `namespace` is the ConfigMap's (default: the pod's own),
    `pvc_root` where claims are mounted, `timeout_s` the limit on each network wait,
    `retry` the policy for transient http(s) failures and `sleep` how to wait between
    attempts; `ca_bundle` adds CAs an https server's certificate may chain to
    (`trust_context`). Raises FetchError when the source cannot be fetched or its digest
    differs, SpecError when `ca_bundle` is not a CA bundle."""
    context = trust_context(ca_bundle)  # a bundle that is not one is refused for any scheme
    dest_dir.mkdir(parents=True, exist_ok=True)
    if source.scheme == "oci":
        return _fetch_oci(source, dest_dir)
    dest = dest_dir / _file_name(source)
    if source.scheme in ("https", "http"):
        return _fetch_http(source, dest, timeout_s, retry, sleep, context)
    if source.scheme == "configmap":
        return _fetch_configmap(source, dest, namespace)
    if source.scheme == "pvc":
        return _fetch_pvc(source, dest, pvc_root)
    return _fetch_zoo(source, dest)


__all__ = [
    "ACCEPTED_FORMS",
    "FetchError",
    "Fetched",
    "RetryPolicy",
    "Source",
    "ca_files",
    "fetch",
    "parse_source",
    "trust_context",
]
