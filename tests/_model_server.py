"""A real HTTP(S) server on loopback for model sources, and a CA for its certificate.

`ModelServer` answers each path with its replies in turn (the last one repeats) and
counts the requests it got; given a `ServerCert` it speaks TLS with a certificate for
127.0.0.1 signed by a CA of the test's own (`make_ca`), which no system trust store
holds: a client trusts it only when told to."""

from __future__ import annotations

import ssl
import threading
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from edgeai_operator.localcluster import write_pki


@dataclass(frozen=True)
class ServerCert:
    """A CA and a serving certificate it signed for IP 127.0.0.1 (PEM files)."""

    ca: Path
    cert: Path
    key: Path


def make_ca(directory: Path) -> ServerCert:
    """A fresh CA and a 127.0.0.1 serving certificate under `directory` (openssl, the
    same PKI a local cluster's API server gets)."""
    write_pki(directory)
    return ServerCert(
        directory / "ca.crt", directory / "apiserver.crt", directory / "apiserver.key"
    )


@dataclass
class Reply:
    status: int
    body: bytes = b""
    # a Content-Length larger than the body: the connection closes early
    promised_bytes: int | None = None


class ModelServer:
    """A real HTTP server on loopback (HTTPS with `tls`). Each path answers its replies
    in turn (the last one repeats) and counts the requests it got."""

    def __init__(self, tls: ServerCert | None = None) -> None:
        self.replies: dict[str, list[Reply]] = {}
        self.hits: Counter[str] = Counter()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.hits[self.path] += 1
                queue = server.replies.get(self.path, [Reply(404, b"not found")])
                reply = queue.pop(0) if len(queue) > 1 else queue[0]
                self.send_response(reply.status)
                length = reply.promised_bytes or len(reply.body)
                self.send_header("Content-Length", str(length))
                self.end_headers()
                self.wfile.write(reply.body)
                self.close_connection = reply.promised_bytes is not None

            def log_message(self, format: str, *args: Any) -> None:
                pass  # the tests check the counts, not the log

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                # a client refusing the certificate ends the handshake: count it
                server.broken_connections += 1

        self.broken_connections = 0
        self._httpd = Server(("127.0.0.1", 0), Handler)
        scheme = "http"
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(tls.cert), str(tls.key))
            # the handshake runs in the request's thread, so a client that refuses the
            # certificate cannot stall the accept loop
            self._httpd.socket = context.wrap_socket(
                self._httpd.socket, server_side=True, do_handshake_on_connect=False
            )
            scheme = "https"
        self.base_url = f"{scheme}://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def serve(self, path: str, body: bytes) -> str:
        """Answers `path` with 200 and `body` from now on; returns its URL."""
        self.replies[path] = [Reply(200, body)]
        return f"{self.base_url}{path}"

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()
