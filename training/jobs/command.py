"""`cpm2 train <job> --config FILE [--device]`: the one way every job becomes a subcommand."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from training.config import JobConfig, load_job_config

C = TypeVar("C", bound=JobConfig)


def add_job_command(
    commands: Any,
    name: str,
    *,
    help: str,
    description: str,
    config_cls: type[C],
    run: Callable[..., object],
    wrote: Callable[[Any], str] = str,
) -> None:
    """Register `name`: load `--config` as `config_cls`, call `run(config, device=...)`, and print what
    it wrote (`wrote(result)`) and where the metrics log is."""

    def handler(args: argparse.Namespace) -> int:
        config = load_job_config(args.config, config_cls)
        result = run(config, device=args.device)
        print(f"wrote {wrote(result)} (metrics: {config.output_dir / 'metrics.jsonl'})")
        return 0

    p = commands.add_parser(name, help=help, description=description)
    p.add_argument("--config", required=True, type=Path, metavar="FILE", help="job config (.yaml, .json or .toml)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: CUDA when available")
    p.set_defaults(handler=handler)
