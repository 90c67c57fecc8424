"""Arguments shared by the engine's commands: the model, its dtype / device / CPU kernels, and the
`--expert-*` offloading options (also what `cpm2 serve` documents)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from engine.errors import ConfigError
from engine.experts.order import ORDER_POLICIES
from engine.experts.pool import CACHE_POLICIES
from engine.model.kernels import KERNEL_MODES
from engine.offload import EXPERT_IO, PREDICTIONS, OffloadConfig, direct_io
from engine.weights.builtin import resolve_model

MODEL_HELP = "native cpm2 or HF T5/mT5/Switch/M2M-100/NLLB directory, or builtin:<preset> (e.g. builtin:tiny)"


def model_arg(value: str) -> Path:
    """`--model`: a directory, or `builtin:<preset>` resolved (and written on first use) here."""
    try:
        return resolve_model(value)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=model_arg, help=MODEL_HELP)
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: as stored)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    parser.add_argument(
        "--cpu-kernels",
        default="auto",
        choices=KERNEL_MODES,
        help="CPU matmul paths: auto (the fastest this CPU supports per dtype) or plain (F.linear)",
    )


def add_offload_args(parser: argparse.ArgumentParser) -> None:
    """The `--expert-*` options (shared with `cpm2 serve`)."""
    group = add_placement_args(parser)
    group.add_argument("--expert-order", default="infmoe", choices=ORDER_POLICIES)
    group.add_argument("--expert-cache", default="lrfu", choices=CACHE_POLICIES)
    group.add_argument("--expert-io-threads", type=int, default=4)
    group.add_argument(
        "--expert-io",
        default="auto",
        choices=EXPERT_IO,
        help="strict: O_DIRECT reads, RAM holds only the pool (--expert-memory bounds expert memory); "
        "page-cache: experts the kernel caches are used in place (faster, bounded only by the kernel); "
        "auto (default): strict when --expert-memory is given",
    )
    group.add_argument("--expert-direct-io", action="store_true", help="the same as --expert-io strict")
    group.add_argument("--no-expert-prefetch", action="store_true", help="no next-layer prefetch")
    group.add_argument(
        "--expert-prediction",
        default="calibrated",
        choices=PREDICTIONS,
        help="router: the next layer's router on this layer's input; calibrated (default): plus a "
        "correction learned from the first routes served, kept where it predicts better",
    )
    group.add_argument("--expert-store-dir", type=Path, help="where to write an expert store if the model has none")


def add_placement_args(parser: argparse.ArgumentParser) -> Any:
    """The options the memory plan reads (`engine.memory_plan`), shared by loading and `cpm2 info`."""
    group = parser.add_argument_group("expert offloading (InfMoE)")
    group.add_argument(
        "--expert-memory",
        default=None,
        help="fast-pool budget for experts: a size (512MiB) or a share of all experts (25%%); "
        "experts are offloaded whenever they exceed it (default: auto)",
    )
    group.add_argument("--expert-window", type=int, default=4, help="loads in flight ahead of compute")
    group.add_argument("--expert-host-tier", default="auto", choices=("auto", "pinned", "disk"))
    return group


def offload_config(args: argparse.Namespace) -> OffloadConfig:
    return OffloadConfig(
        expert_memory=args.expert_memory,
        order=args.expert_order,
        cache=args.expert_cache,
        window=args.expert_window,
        io_threads=args.expert_io_threads,
        direct_io=direct_io(args.expert_io, force_direct=args.expert_direct_io),
        prefetch=not args.no_expert_prefetch,
        prediction=args.expert_prediction,
        host_tier=args.expert_host_tier,
        store_dir=args.expert_store_dir,
    )
