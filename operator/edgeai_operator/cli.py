"""The `edgeai` command line. Each command lives in its own module, which exposes
`register(subparsers)` adding its parser and setting `func(args) -> int`."""

from __future__ import annotations

import argparse
import importlib
import sys

from edgeai_operator.errors import SpecError

# Modules that contribute commands, in the order `edgeai --help` lists them.
COMMAND_MODULES = [
    "edgeai_operator.localcluster",
    "edgeai_operator.plancli",
    "edgeai_operator.runlocal",
    "edgeai_operator.stagecmd",
    "edgeai_operator.trunkcmd",
    "edgeai_operator.fetchcmd",
    "edgeai_operator.preparecmd",
    "edgeai_operator.main",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeai", description="Plan, profile and run DNNs across device, edge and cloud."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
