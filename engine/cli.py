"""Engine commands of the `cpm2` CLI: prompt, info, convert, quantize, init, and `generate`
(`engine.cli_generate`; shared flags in `engine.cli_args`).

Each command parses its flags into the engine's typed objects and calls the engine; errors the user
can fix (`Cpm2Error`) are printed as one line by `cpm2.cli.main`, without a traceback.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from engine.cli_args import MODEL_HELP, add_placement_args, model_arg
from engine.cli_generate import add_generate_parser
from engine.cli_plan import add_plan_parser
from engine.config import ModelConfig
from engine.errors import ConfigError
from engine.model.int4 import DEFAULT_GROUP_SIZE, GROUP_SIZES
from engine.model_info import describe_model
from engine.offload import OffloadConfig
from engine.prompts import PROMPT_KEYS, prompt_from_text
from engine.sizes import format_bytes, parse_bytes
from engine.summary import summarize
from engine.tokenizer import load_tokenizer
from engine.weights.convert import convert_cpm2, convert_hf
from engine.weights.files import DEFAULT_MAX_SHARD_BYTES
from engine.weights.init import plan_random_model, write_random_model
from engine.weights.loader import inspect_config, load_model, parse_dtype
from engine.weights.presets import PRESETS, get_preset
from engine.weights.quantize import (
    DENSE_FORMATS,
    EXPERT_FORMATS,
    PACKING_CHOICES,
    REPORT_FILE,
    ExpertFormat,
    check_int4_options,
    dense_record,
    quantize_model,
)

Handler = Callable[[argparse.Namespace], int]


def cmd_prompt(args: argparse.Namespace) -> int:
    texts = {key: getattr(args, key) for key in PROMPT_KEYS if getattr(args, key) is not None}
    tokenizer = load_tokenizer(args.model)
    model, _ = load_model(args.model, load_experts=False, pack=False)
    pieces = {key: tokenizer.encode(text, add_eos=False) for key, text in texts.items()}
    prompt = prompt_from_text(model.embed, pieces, **{f"{key}_text": text for key, text in texts.items()})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(prompt.to_bytes())
    shapes = ", ".join(f"{key} {list(t.shape)}" for key, t in prompt.tensors().items())
    print(f"wrote {args.out}: {shapes}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    offload = OffloadConfig(
        expert_memory=args.expert_memory, window=args.expert_window, host_tier=args.expert_host_tier
    )
    described = describe_model(args.model, dtype=args.dtype, device=args.device, offload=offload)
    if args.json:
        print(json.dumps(described.to_dict(), indent=2))
    else:
        print("\n".join(described.lines()))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    if args.source_format not in ("hf", "cpm2"):
        raise ConfigError(f"unknown source format {args.source_format!r}; supported: hf, cpm2")
    max_shard_bytes = parse_bytes(args.max_shard_size, name="--max-shard-size")
    if args.source_format == "cpm2":
        convert_cpm2(
            args.src,
            args.dst,
            config_path=args.config,
            iteration=args.iteration,
            dtype=args.dtype,
            max_shard_bytes=max_shard_bytes,
        )
    else:
        convert_hf(args.src, args.dst, dtype=args.dtype, max_shard_bytes=max_shard_bytes)
    print(f"wrote {args.dst}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    report = quantize_model(
        args.model,
        args.out,
        experts=args.experts,
        dense=args.dense,
        group_size=args.group_size,
        packing=args.packing,
        check_inputs=args.check_inputs,
        max_shard_bytes=parse_bytes(args.max_shard_size, name="--max-shard-size"),
        progress=not args.quiet,
    )
    print("\n".join(report.lines()))
    print(f"wrote {args.out} (report: {args.out / REPORT_FILE})")
    return 0


def _apply_overrides(config: ModelConfig, pairs: list[str]) -> ModelConfig:
    data = config.to_dict()
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--set takes FIELD=VALUE, got {pair!r}")
        target = data
        *parents, leaf = key.split(".")
        for parent in parents:
            if not isinstance(target.get(parent), dict):
                raise ConfigError(f"--set {key}: {parent!r} is not a config section")
            target = target[parent]
        try:
            target[leaf] = json.loads(value)
        except json.JSONDecodeError:
            target[leaf] = value
    return ModelConfig.from_dict(data, source="--set")


def cmd_init(args: argparse.Namespace) -> int:
    if args.list:
        for name, preset in PRESETS.items():
            summary = summarize(preset.config, parse_dtype(preset.dtype) or torch.float32)
            print(f"{name:18s} {format_bytes(summary.total_bytes):>11s}  {preset.description}")
        return 0
    if not args.out or (args.preset is None) == (args.config is None):
        raise ConfigError("cpm2 init needs --out DIR and one of --preset NAME or --config CONFIG.json (or --list)")
    if args.preset is not None:
        preset = get_preset(args.preset)
        name, config, default_dtype = args.preset, preset.config, preset.dtype
    else:
        info = inspect_config(args.config)  # a native or Hugging Face config.json, or a directory holding one
        name, config, default_dtype = str(args.config), info.config, str(info.stored_dtype).removeprefix("torch.")
    config = _apply_overrides(config, args.set)
    dtype = args.dtype or default_dtype
    if args.dense is not None:
        dense_record(args.dense)  # refuses an unknown format before anything is planned
    experts = None
    if args.experts is not None:
        experts = ExpertFormat.choose(config, args.experts, group_size=args.group_size, packing=args.packing)
    else:
        check_int4_options(None, args.group_size, args.packing)
    plan, _ = plan_random_model(config, dtype=dtype, experts=experts)
    stored = f"{dtype}, experts {args.experts}" if experts is not None else dtype
    print(f"{name}: {plan.num_parameters:,} parameters, {format_bytes(plan.num_bytes)} in {stored}")
    if args.dry_run:
        return 0
    write_random_model(
        config,
        args.out,
        dtype=dtype,
        seed=args.seed,
        max_shard_bytes=parse_bytes(args.max_shard_size, name="--max-shard-size"),
        progress=not args.quiet,
        experts=experts,
        dense=args.dense,
        resume=args.resume,
    )
    print(f"wrote {args.out}")
    return 0


def register(subparsers: Any) -> None:
    """Add the engine's commands to the `cpm2` argument parser."""
    add_generate_parser(subparsers)
    add_plan_parser(subparsers)

    p = subparsers.add_parser("prompt", help="write a soft prompt file from text (its token embeddings)")
    p.add_argument("--model", required=True, type=model_arg, help="the model the prompt is for (" + MODEL_HELP + ")")
    p.add_argument("--out", required=True, type=Path, help="output .safetensors file")
    for key in PROMPT_KEYS:
        p.add_argument(f"--{key.replace('_', '-')}", dest=key, help=f"text whose embeddings become the {key}")
    p.set_defaults(handler=cmd_prompt)

    p = subparsers.add_parser(
        "info", help="print a model's shape, parameter counts, expert sizes and memory plan (no weights needed)"
    )
    p.add_argument(
        "--model",
        required=True,
        type=model_arg,
        help=MODEL_HELP + "; a directory holding only config.json, or a config.json file, is enough",
    )
    p.add_argument(
        "--dtype",
        default=None,
        help="plan in this dtype (default: as loading would: as stored, bfloat16 for float16 on CPU; "
        "float32 when there are no weights and the config names none)",
    )
    p.add_argument("--device", default="cpu", help="plan for this device: cpu, cuda, cuda:1, ... (default: cpu)")
    add_placement_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_info)

    p = subparsers.add_parser("convert", help="convert a checkpoint into a native cpm2 directory")
    p.add_argument(
        "source_format",
        help="hf: a Hugging Face T5 / mT5 / Switch Transformers / M2M-100 / NLLB-200 directory; "
        "cpm2: a released CPM-2 checkpoint (DeepSpeed mp_rank_* files)",
    )
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--dtype", default=None, help="store in this dtype (default: as stored)")
    p.add_argument("--max-shard-size", default=str(DEFAULT_MAX_SHARD_BYTES), help="e.g. 2GiB (default)")
    p.add_argument(
        "--config", type=Path, help="cpm2: CPM-2 JSON config (default: SRC/config.json, else the released shapes)"
    )
    p.add_argument("--iteration", help="cpm2: iteration directory under SRC (default: the latest)")
    p.set_defaults(handler=cmd_convert)

    p = subparsers.add_parser(
        "quantize", help="write a copy of a model with int8/int4 experts and/or int8 dense matmuls"
    )
    p.add_argument("--model", required=True, type=model_arg, help=MODEL_HELP)
    p.add_argument("--out", required=True, type=Path, help="new (empty) output directory")
    p.add_argument("--experts", default=None, help=f"expert format: {', '.join(EXPERT_FORMATS)}")
    p.add_argument(
        "--group-size",
        type=int,
        default=None,
        help=f"int4: inputs per scale and zero, one of {', '.join(map(str, GROUP_SIZES))} "
        f"(default {DEFAULT_GROUP_SIZE})",
    )
    p.add_argument(
        "--packing",
        default="auto",
        help=f"int4: how values sit in bytes, one of {', '.join(PACKING_CHOICES)} "
        "(auto: the layout this machine's int4 kernel reads; other machines run it by the slower dequant path)",
    )
    p.add_argument(
        "--dense",
        default=None,
        help=f"dense matmul format: {', '.join(DENSE_FORMATS)} (quantised when loaded; shards stay float)",
    )
    p.add_argument(
        "--check-inputs",
        type=int,
        default=4,
        help="random inputs to compare the two models on (logit difference, top-1 agreement); 0 skips",
    )
    p.add_argument("--max-shard-size", default=str(DEFAULT_MAX_SHARD_BYTES))
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_quantize)

    p = subparsers.add_parser(
        "init", help="write a randomly initialised model from a named preset or a published config, any size"
    )
    p.add_argument("--preset", help=f"one of: {', '.join(PRESETS)}")
    p.add_argument(
        "--config",
        type=Path,
        help="a model's config.json (native cpm2, or Hugging Face: T5, Switch, M2M-100, NLLB-MoE...), or its directory",
    )
    p.add_argument("--out", type=Path, help="new (empty) output directory")
    p.add_argument(
        "--dtype", default=None, help="float dtype of the weights (default: the preset's, or the config's torch_dtype)"
    )
    p.add_argument("--experts", default=None, help=f"store the experts quantised: {', '.join(EXPERT_FORMATS)}")
    p.add_argument(
        "--group-size", type=int, default=None, help=f"int4: inputs per scale and zero (default {DEFAULT_GROUP_SIZE})"
    )
    p.add_argument("--packing", default="auto", help=f"int4: one of {', '.join(PACKING_CHOICES)}")
    p.add_argument(
        "--dense", default=None, help=f"dense matmul format: {', '.join(DENSE_FORMATS)} (quantised when loaded)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a config field")
    p.add_argument("--max-shard-size", default=str(DEFAULT_MAX_SHARD_BYTES))
    p.add_argument("--dry-run", action="store_true", help="print the size and write nothing")
    p.add_argument(
        "--resume", action="store_true", help="finish an interrupted run into --out (started with the same arguments)"
    )
    p.add_argument("--list", action="store_true", help="list the presets")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_init)
