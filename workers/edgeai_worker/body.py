"""HTTP bodies without extra copies of the tensor bytes.

A request body is read straight into one buffer of its declared length (aiohttp's
`read()` collects the chunks and then copies them into a `bytes`). A body is written as
its parts, the JSON header and each tensor's bytes as a view of its array, so the
tensor bytes go from the array to the socket instead of being joined into a new body
first (and joined again with the HTTP headers).
"""

from __future__ import annotations

from typing import Any

from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import Payload

from edgeai_worker.protocol import Parts, join_parts

# Bodies smaller than this are joined and sent at once: the copy costs less than
# another system call and wake-up.
JOIN_BELOW_BYTES = 256 * 1024


class PartsPayload(Payload):
    """A body made of buffers written one after another (reusable: a retry writes it
    again)."""

    def __init__(self, parts: Parts, content_type: str) -> None:
        super().__init__(parts, content_type=content_type)
        self._parts = parts
        self._total = sum(len(p) for p in parts)
        self._size = self._total

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return b"".join(self._parts).decode(encoding, errors)

    async def write(self, writer: AbstractStreamWriter) -> None:
        for part in self._parts:
            await writer.write(part)

    async def write_with_length(
        self, writer: AbstractStreamWriter, content_length: int | None
    ) -> None:
        if content_length is None or content_length >= self._total:
            await self.write(writer)
            return
        remaining = content_length
        for part in self._parts:
            if remaining <= 0:
                break
            chunk = part if len(part) <= remaining else memoryview(part)[:remaining]
            await writer.write(chunk)
            remaining -= len(chunk)


def body_of(parts: Parts, headers: dict[str, str]) -> tuple[bytes | PartsPayload, dict[str, str]]:
    """The body to send for `parts` and the HTTP headers to send with it (as
    `encode_*_parts` give them): a small body joined, a large one as its parts (the
    payload carries the content type)."""
    if len(parts) == 1 or sum(len(p) for p in parts) < JOIN_BELOW_BYTES:
        return join_parts(parts), headers
    headers = dict(headers)
    content_type = headers.pop("Content-Type")
    return PartsPayload(parts, content_type), headers


def parts_response(parts: Parts, headers: dict[str, str]) -> web.Response:
    """A response whose body is `parts` (headers as `encode_response_parts` gives)."""
    body, headers = body_of(parts, headers)
    return web.Response(body=body, headers=headers)


def body_size(body: Any) -> int:
    """Bytes of a body as `body_of` gives it (or a response's `body`; None is 0)."""
    if isinstance(body, Payload):
        return body.size or 0
    return len(body) if body is not None else 0


async def read_body(request: web.Request, max_bytes: int) -> bytearray | bytes:
    """The whole request body, read once into a buffer of its `Content-Length`.

    Bodies without a length (chunked) or with a `Content-Encoding` (decompressed on the
    way in, so the length is not the body's) are read by aiohttp. Bodies over
    `max_bytes` get a 413 before any of them is read."""
    length = request.content_length
    if length is None or hdrs.CONTENT_ENCODING in request.headers:
        return await request.read()
    if length > max_bytes:
        raise web.HTTPRequestEntityTooLarge(max_size=max_bytes, actual_size=length)
    buffer = bytearray(length)
    view = memoryview(buffer)
    filled = 0
    stream = request.content
    while filled < length:
        try:
            chunk = await stream.readany()
        except ConnectionError:  # the client went away mid-body: its mistake, not ours
            break
        if not chunk:
            break
        end = filled + len(chunk)
        if end > length:  # the HTTP parser stops at Content-Length; cannot happen
            raise web.HTTPBadRequest(text="the body is longer than its Content-Length")
        view[filled:end] = chunk
        filled = end
    if filled < length:
        raise web.HTTPBadRequest(
            text=f"the body ended after {filled} of its {length} bytes (Content-Length); "
            "the connection was closed"
        )
    return buffer
