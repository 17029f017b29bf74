"""`edgeai operator`: run the kopf operator (cluster-wide or in namespaces)."""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import ctypes
import ctypes.util
import logging
import secrets
from typing import Any

import kopf

from edgeai_operator import API_GROUP, opmetrics
from edgeai_operator.context import MEMO_KEY, OperatorContext, Settings, context_of

FINALIZER = f"{API_GROUP}/finalizer"
RECONCILE_THREADS = 32
# glibc gives each thread that allocates while others hold the main heap an arena of
# its own (up to 8 per core); with RECONCILE_THREADS passes each arena keeps its own
# free memory, which at hundreds of DNNDeployments is a large share of the RSS.
_M_ARENA_MAX = -8
MALLOC_ARENAS = 2


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Caps glibc's malloc arenas (a no-op, False, where libc is not glibc)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_ARENA_MAX, arenas))


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=API_GROUP, key="last-handled-configuration"
    )
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 300
    settings.execution.max_workers = 8


@kopf.on.startup()
async def widen_thread_pool(**_: Any) -> None:
    # Reconcile passes run in threads and mostly wait on the API server: with many
    # DNNDeployments, the default pool (CPUs + 4) would queue them.
    asyncio.get_running_loop().set_default_executor(
        concurrent.futures.ThreadPoolExecutor(
            max_workers=RECONCILE_THREADS, thread_name_prefix="reconcile"
        )
    )


@kopf.on.startup()
async def start_metrics(memo: kopf.Memo, **_: Any) -> None:
    port = context_of(memo).settings.metrics_port
    if port:
        memo["metrics_runner"] = await opmetrics.start_server(port, context_of(memo).metrics)


@kopf.on.cleanup()
async def stop_metrics(memo: kopf.Memo, **_: Any) -> None:
    runner = memo.get("metrics_runner")
    if runner is not None:
        await runner.cleanup()


def peering_priority() -> int:
    """A random kopf peering priority for this process. The chart runs its replicas with
    the same arguments; kopf pauses every operator of a peering that sees another one of
    equal priority, so replicas of the default priority would all stand by. With distinct
    priorities the highest one works and the others take over when it is gone."""
    return secrets.randbelow(2**31 - 1) + 1


def _run(args: argparse.Namespace) -> int:
    from edgeai_operator import handlers  # registers the handlers

    settings = Settings.from_env(metrics_port=args.metrics_port)
    limit_malloc_arenas()
    handlers.models.register_timers(settings.profile_poll_s)
    kopf.configure(
        verbose=args.verbose,
        log_format=kopf.LogFormat.JSON if args.log_format == "json" else kopf.LogFormat.PLAIN,
    )
    asyncio.run(
        kopf.operator(
            clusterwide=not args.namespace,
            namespaces=args.namespace or [],
            standalone=args.peering is None,
            peering_name=args.peering,
            priority=peering_priority() if args.peering else None,
            liveness_endpoint=args.liveness,
            memo=kopf.Memo({MEMO_KEY: OperatorContext(settings=settings)}),
        )
    )
    return 0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("operator", help="run the operator against the current cluster")
    parser.add_argument(
        "--namespace", action="append", help="watch only this namespace (repeatable)"
    )
    parser.add_argument(
        "--peering",
        help="kopf peering object name for HA (only one operator of the peering is active); "
        "standalone when absent",
    )
    parser.add_argument(
        "--liveness", default=None, help="liveness endpoint, e.g. http://0.0.0.0:8081/healthz"
    )
    parser.add_argument(
        "--metrics-port", type=int, default=None, help="serve the operator's /metrics here"
    )
    parser.add_argument("--log-format", choices=["plain", "json"], default="plain")
    parser.add_argument("--verbose", action="store_true")
    parser.set_defaults(func=_run)
