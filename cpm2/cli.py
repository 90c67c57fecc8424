"""`cpm2 …`: gathers the subcommands of the engine, server and training packages.

This module sits above the three packages (it may import all of them, nothing imports it), so the
dependency rule `server → engine ← training` holds. Server and training commands are registered
when those packages provide a `cli` module.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from engine import cli as engine_cli
from engine.errors import Cpm2Error

OPTIONAL_COMMAND_MODULES = ("server.cli", "training.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cpm2",
        description="Serve and adapt encoder-decoder Mixture-of-Experts models (CPM-2, T5, Switch).",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    engine_cli.register(subparsers)
    for name in OPTIONAL_COMMAND_MODULES:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except Cpm2Error as exc:
        print(f"cpm2 {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
