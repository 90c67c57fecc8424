"""Engine commands of the `cpm2` CLI: generate, prompt, info, convert, init.

Each command parses its flags into the engine's typed objects and calls the engine; errors the user
can fix (`Cpm2Error`) are printed as one line by `cpm2.cli.main`, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from engine.config import ModelConfig
from engine.errors import CheckpointError, ConfigError, InputError
from engine.experts.order import ORDER_POLICIES
from engine.experts.pool import CACHE_POLICIES
from engine.generation import GenerationRequest, Generator, SamplingParams
from engine.languages import Languages, encode_source, force_target, translation_tokenizer
from engine.model.kernels import KERNEL_MODES
from engine.model.transformer import Seq2SeqLM
from engine.model_info import describe_model
from engine.offload import OffloadConfig, load_for_inference
from engine.peft import is_peft_path, read_peft_dir
from engine.prompts import PROMPT_KEYS, SoftPrompt, parse_soft_prompt, prompt_from_text
from engine.sizes import format_bytes, parse_bytes
from engine.summary import summarize
from engine.tokenizer import MissingDependencyError, Tokenizer, check_special_ids, load_tokenizer
from engine.weights.builtin import resolve_model
from engine.weights.convert import convert_cpm2, convert_hf
from engine.weights.init import DEFAULT_MAX_SHARD_BYTES, plan_random_model, write_random_model
from engine.weights.loader import inspect_config, load_model, parse_dtype
from engine.weights.presets import PRESETS, get_preset

Handler = Callable[[argparse.Namespace], int]


MODEL_HELP = "native cpm2 or HF T5/mT5/Switch/M2M-100/NLLB directory, or builtin:<preset> (e.g. builtin:tiny)"


def model_arg(value: str) -> Path:
    """`--model`: a directory, or `builtin:<preset>` resolved (and written on first use) here."""
    try:
        return resolve_model(value)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_model_args(parser: argparse.ArgumentParser) -> None:
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
    group = _add_placement_args(parser)
    group.add_argument("--expert-order", default="infmoe", choices=ORDER_POLICIES)
    group.add_argument("--expert-cache", default="lru", choices=CACHE_POLICIES)
    group.add_argument("--expert-io-threads", type=int, default=4)
    group.add_argument("--expert-direct-io", action="store_true", help="read the disk tier with O_DIRECT")
    group.add_argument("--no-expert-prefetch", action="store_true", help="no next-layer prefetch")
    group.add_argument("--expert-store-dir", type=Path, help="where to write an expert store if the model has none")


def _add_placement_args(parser: argparse.ArgumentParser) -> Any:
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
        direct_io=args.expert_direct_io,
        prefetch=not args.no_expert_prefetch,
        host_tier=args.expert_host_tier,
        store_dir=args.expert_store_dir,
    )


def _sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=tuple(args.stop),
        num_beams=args.num_beams,
        ignore_eos=args.ignore_eos,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    params = _sampling_params(args)
    texts, id_rows = _generate_inputs(args)
    if id_rows:  # checked against the config before any weight is loaded
        vocab_size = inspect_config(args.model).config.vocab_size
        for spec, ids in zip(args.input_ids, id_rows, strict=True):
            _check_vocabulary(spec, ids, vocab_size=vocab_size)
    tokenizer = _generate_tokenizer(args.model, has_ids=bool(id_rows))
    sources: list[str | tuple[int, ...]] = [*texts] or [*id_rows]
    languages = Languages(src_lang=args.src_lang, tgt_lang=args.tgt_lang)
    if languages.is_set:
        if args.src_lang is not None and (id_rows or args.text_pair is not None):
            raise ConfigError(
                "--src-lang encodes text inputs; with --input-ids or --text-pair put the language id in yourself"
            )
        translator = translation_tokenizer(tokenizer, model=str(args.model))
        params = force_target(params, translator, languages)
        if args.src_lang is not None:
            sources = [tuple(encode_source(translator, text, languages)) for text in texts]
    loaded = load_for_inference(
        args.model,
        dtype=args.dtype,
        device=args.device,
        offload=offload_config(args),
        progress=False,
        cpu_kernels=args.cpu_kernels,
    )
    try:
        config = loaded.model.config
        if tokenizer is not None:
            check_special_ids(
                tokenizer, eos=config.eos_token_id, decoder_start=config.decoder_start_token_id, source=args.model
            )
        provider = loaded.provider
        generator = Generator(
            loaded.model, tokenizer, expert_stats=provider.stats.snapshot if provider is not None else None
        )
        prompt = _read_prompt(args.prompt, loaded.model) if args.prompt else None
        requests = [_request(tokenizer, t, args.text_pair, params, prompt) for t in sources]
        for result in generator.generate(requests):
            # Without a tokenizer there is no text, only ids (printed as --input-ids takes them).
            text = result.text if tokenizer is not None else None
            if args.json:
                out: dict[str, Any] = {"text": text, "token_ids": result.token_ids}
                if args.details:
                    out.update(finish_reason=result.finish_reason, logprobs=result.logprobs, seed=result.seed)
                    if result.experts:
                        out["experts"] = result.experts
                print(json.dumps(out, ensure_ascii=False))
            else:
                print(text if text is not None else ",".join(map(str, result.token_ids)))
        if provider is not None and args.details:
            print(json.dumps({"expert_stats": provider.stats.to_dict()}), file=sys.stderr)
    finally:
        loaded.close()
    return 0


def _generate_inputs(args: argparse.Namespace) -> tuple[list[str], list[tuple[int, ...]]]:
    """The texts, or the token-id rows of `--input-ids`: exactly one of the two is given."""
    if args.text and args.input_ids:
        raise ConfigError("give input text(s) or --input-ids, not both")
    if not args.text and not args.input_ids:
        raise ConfigError("nothing to generate from: give input text(s), '-' to read stdin, or --input-ids 5,17,33")
    if args.input_ids:
        return [], [parse_token_ids(spec) for spec in args.input_ids]
    if args.text == ["-"]:
        return [line.rstrip("\n") for line in sys.stdin], []
    return list(args.text), []


def parse_token_ids(spec: str) -> tuple[int, ...]:
    """`"5,17,33"` → `(5, 17, 33)`: one encoder input, exactly as given (no end-of-sequence id added)."""
    try:
        return tuple(int(part) for part in spec.split(","))
    except ValueError:
        raise InputError(
            f"--input-ids {spec!r}: give comma-separated integer token ids, e.g. --input-ids 5,17,33"
        ) from None


def _check_vocabulary(spec: str, ids: tuple[int, ...], *, vocab_size: int) -> None:
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise InputError(
            f"--input-ids {spec!r}: token id {bad[0]} is outside the model's vocabulary; "
            f"use ids from 0 to {vocab_size - 1}"
        )


def _generate_tokenizer(model_dir: Path, *, has_ids: bool) -> Tokenizer | None:
    """The model's tokenizer; optional with `--input-ids` (it then only turns the output into text)."""
    if has_ids:
        try:
            return load_tokenizer(model_dir)
        except (CheckpointError, MissingDependencyError):
            return None
    try:
        return load_tokenizer(model_dir)
    except CheckpointError as exc:
        if not model_dir.is_dir():
            raise
        raise CheckpointError(f"{exc}; or give token ids instead of text: --input-ids 5,17,33") from exc


def _read_prompt(path: Path, model: Seq2SeqLM) -> SoftPrompt:
    if is_peft_path(path):  # a PEFT prompt-tuning adapter, converted the way the server converts uploads
        data = read_peft_dir(path, d_model=model.config.d_model).to_bytes()
    elif path.is_file():
        data = path.read_bytes()
    else:
        raise ConfigError(f"--prompt {path}: no such file")
    return parse_soft_prompt(
        data, d_model=model.config.d_model, dtype=model.embed.weight.dtype, max_virtual_tokens=1 << 16
    )


def _request(
    tokenizer: Tokenizer | None,
    source: str | tuple[int, ...],
    pair: str | None,
    params: SamplingParams,
    prompt: SoftPrompt | None,
) -> GenerationRequest:
    """One request from a text (tokenized here) or from token ids (used as given)."""
    # With a second segment the end-of-sequence token closes the pair, as the server does.
    if isinstance(source, tuple):  # token ids: --input-ids, or a text encoded with its language
        first = source
    elif tokenizer is None:
        raise ConfigError("text inputs need the model's tokenizer; give token ids with --input-ids 5,17,33")
    else:
        first = tuple(tokenizer.encode(source, add_eos=pair is None))
    if pair is None:
        return GenerationRequest(first, params, prompt=prompt)
    if tokenizer is None:
        raise ConfigError("--text-pair needs the model's tokenizer; without one, put both segments in --input-ids")
    return GenerationRequest(first, params, pair_ids=tuple(tokenizer.encode(pair)), prompt=prompt)


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
    if not args.preset or not args.out:
        raise ConfigError("cpm2 init needs --preset NAME and --out DIR (or --list)")
    preset = get_preset(args.preset)
    config = _apply_overrides(preset.config, args.set)
    dtype = args.dtype or preset.dtype
    plan, _ = plan_random_model(config, dtype=dtype)
    print(f"{args.preset}: {plan.num_parameters:,} parameters, {format_bytes(plan.num_bytes)} in {dtype}")
    if args.dry_run:
        return 0
    write_random_model(
        config,
        args.out,
        dtype=dtype,
        seed=args.seed,
        max_shard_bytes=parse_bytes(args.max_shard_size, name="--max-shard-size"),
        progress=not args.quiet,
    )
    print(f"wrote {args.out}")
    return 0


def register(subparsers: Any) -> None:
    """Add the engine's commands to the `cpm2` argument parser."""
    p = subparsers.add_parser("generate", help="generate text with a model")
    _add_model_args(p)
    p.add_argument("text", nargs="*", help="input text(s); '-' reads one input per line from stdin")
    p.add_argument(
        "--input-ids",
        action="append",
        default=[],
        metavar="ID,ID,...",
        help="token ids of one input, used as given (repeatable; instead of text, no tokenizer needed)",
    )
    p.add_argument(
        "--src-lang", help="language of the input text, e.g. eng_Latn (translation models: NLLB-200, M2M-100)"
    )
    p.add_argument("--tgt-lang", help="language to generate, e.g. fra_Latn: forced as the first generated token")
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    p.add_argument("--json", action="store_true", help='print {"text": ..., "token_ids": [...]} per input')
    p.add_argument("--details", action="store_true", help="with --json: add finish_reason, logprobs, seed, experts")
    p.add_argument("--text-pair", help="second segment of a two-part task (a prompt's infix goes before it)")
    p.add_argument(
        "--prompt", type=Path, help="soft prompt file (safetensors, see `cpm2 prompt`) or PEFT prompt-tuning directory"
    )
    add_offload_args(p)
    p.set_defaults(handler=cmd_generate)

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
    _add_placement_args(p)
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

    p = subparsers.add_parser("init", help="write a randomly initialised model from a named preset")
    p.add_argument("--preset", help=f"one of: {', '.join(PRESETS)}")
    p.add_argument("--out", type=Path, help="new (empty) output directory")
    p.add_argument("--dtype", default=None, help="default: the preset's (float32 small, float16 large)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a config field")
    p.add_argument("--max-shard-size", default=str(DEFAULT_MAX_SHARD_BYTES))
    p.add_argument("--dry-run", action="store_true", help="print the size and write nothing")
    p.add_argument("--list", action="store_true", help="list the presets")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_init)
