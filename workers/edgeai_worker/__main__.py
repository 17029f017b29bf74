"""`edgeai-worker`: serve one stage of a partitioned model over OIP v2 REST."""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import logging
import sys
from pathlib import Path

from aiohttp import web

from edgeai_worker.app import create_app
from edgeai_worker.config import ConfigError, load_config
from edgeai_worker.grpc_server import add_grpc_endpoint


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Request bodies, tensors and response bodies of a few hundred KB to a few MB come and
# go with every request. With glibc's defaults each is a fresh mmap (or trimmed heap)
# whose pages fault in again on every request, which on a 600 KB tensor costs more
# than the rest of the request's handling. Up to this size blocks come from the heap,
# and the heap keeps up to twice this much free memory for the next request.
_HEAP_BLOCKS_UP_TO = 32 << 20


def keep_large_blocks_in_heap() -> bool:
    """Make glibc serve large blocks from a retained heap (no-op elsewhere)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(
        mallopt(_M_MMAP_THRESHOLD, _HEAP_BLOCKS_UP_TO)
        and mallopt(_M_TRIM_THRESHOLD, 2 * _HEAP_BLOCKS_UP_TO)
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeai-worker", description="Serve one stage of a partitioned DNN (OIP v2 REST)."
    )
    parser.add_argument("--config", type=Path, help="JSON/YAML settings file (or EDGEAI_CONFIG)")
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (default 8000)")
    parser.add_argument(
        "--grpc-port", type=int, help="also serve the protocol over gRPC on this port"
    )
    parser.add_argument("--model-name", help="model name clients use in /v2/models/{name}")
    parser.add_argument("--tier", choices=["device", "edge", "cloud"])
    parser.add_argument("--stage-index", type=int)
    parser.add_argument(
        "--partition", action="append", dest="partitions", help="ONNX partition (repeatable)"
    )
    parser.add_argument(
        "--next", action="append", dest="next_urls", help="next stage replica URL (repeatable)"
    )
    parser.add_argument("--max-batch", type=int)
    parser.add_argument("--max-wait-ms", type=float)
    parser.add_argument("--log-json", action="store_true", default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(
            args.config,
            host=args.host,
            port=args.port,
            grpc_port=args.grpc_port,
            model_name=args.model_name,
            tier=args.tier,
            stage_index=args.stage_index,
            partitions=args.partitions,
            next_urls=args.next_urls,
            max_batch=args.max_batch,
            max_wait_ms=args.max_wait_ms,
            log_json=args.log_json,
        )
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    handler = logging.StreamHandler()
    if config.log_json:
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    keep_large_blocks_in_heap()
    app = create_app(config)
    if config.grpc_port is not None:
        add_grpc_endpoint(app)
    web.run_app(
        app,
        host=config.host,
        port=config.port,
        shutdown_timeout=config.shutdown_grace_s,
        access_log=None,
        print=lambda message: logging.getLogger("edgeai_worker").info("%s", message.strip()),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
