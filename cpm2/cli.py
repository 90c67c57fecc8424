"""`cpm2 …`: gathers the subcommands of the engine, server and training packages.

This module sits above the three packages (it may import all of them, nothing imports it), so the
dependency rule `server → engine ← training` holds. Server and training commands are registered
when those packages provide a `cli` module; when an optional extra is not installed (the serving
image has no `training` extra), its commands still appear and say what to install.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from engine import cli as engine_cli
from engine.errors import ConfigError, Cpm2Error

OPTIONAL_COMMAND_MODULES = ("server.cli", "training.cli")
#: The pip extra each optional module needs, and the commands it registers.
EXTRAS: dict[str, tuple[str, tuple[str, ...]]] = {
    "server.cli": ("server", ("serve",)),
    "training.cli": ("training", ("train", "plot")),
}


def _register_missing(subparsers: argparse._SubParsersAction, name: str, missing: ModuleNotFoundError) -> None:
    extra, commands = EXTRAS[name]
    message = f"needs the '{extra}' extra (missing module {missing.name!r}): pip install 'cpm2[{extra}]'"

    def handler(args: argparse.Namespace) -> int:
        raise ConfigError(message)

    for command in commands:
        p = subparsers.add_parser(command, help=f"({message})", description=f"cpm2 {command} {message}.")
        p.add_argument("ignored", nargs=argparse.REMAINDER)
        p.set_defaults(handler=handler)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cpm2",
        description="Serve and adapt encoder-decoder Mixture-of-Experts models (CPM-2, T5, Switch).",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    engine_cli.register(subparsers)
    for name in OPTIONAL_COMMAND_MODULES:
        if importlib.util.find_spec(name) is None:
            continue
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as missing:
            _register_missing(subparsers, name, missing)
            continue
        module.register(subparsers)
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
