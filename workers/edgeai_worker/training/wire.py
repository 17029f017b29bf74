"""The training wire format: one binary message per request or response body.

    b"EAT1" | uint32 header length | header (UTF-8 JSON object) | payload

The header carries the small things (round, worker, loss, the payload's compression
kind and length); the payload is raw little-endian bytes (see compressors.py). This
keeps tensors out of JSON, as the serving side's binary tensor extension does.
"""

from __future__ import annotations

import json
import struct
from typing import Any

MAGIC = b"EAT1"
CONTENT_TYPE = "application/x-edgeai-train"
_PREFIX = struct.Struct("<4sI")


class WireError(ValueError):
    """A body that is not a training message."""


def pack(header: dict[str, Any], payload: bytes = b"") -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    return _PREFIX.pack(MAGIC, len(head)) + head + payload


def unpack(body: bytes) -> tuple[dict[str, Any], bytes]:
    if len(body) < _PREFIX.size:
        raise WireError(f"message of {len(body)} bytes is shorter than its prefix")
    magic, size = _PREFIX.unpack_from(body)
    if magic != MAGIC:
        raise WireError(f"message starts with {magic!r}, not {MAGIC!r}")
    end = _PREFIX.size + size
    if len(body) < end:
        raise WireError(f"header of {size} bytes runs past the {len(body)}-byte message")
    try:
        header = json.loads(body[_PREFIX.size : end])
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WireError(f"header is not JSON: {err}") from err
    if not isinstance(header, dict):
        raise WireError("header is not a JSON object")
    return header, body[end:]
