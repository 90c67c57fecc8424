"""`cpm2 generate`: text or token ids in, generated text and ids out (greedy, sampling, beams,
soft prompts, languages of translation models, offloaded experts)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from engine.cli_args import add_model_args, add_offload_args, offload_config
from engine.errors import CheckpointError, ConfigError, InputError
from engine.generation import GenerationRequest, Generator, SamplingParams
from engine.languages import Languages, encode_source, force_target, translation_tokenizer
from engine.model.transformer import Seq2SeqLM
from engine.offload import load_for_inference
from engine.peft import is_peft_path, read_peft_dir
from engine.planner.recording import RoutingRecord, RoutingRecorder, prediction_precision
from engine.prompts import SoftPrompt, parse_soft_prompt
from engine.tokenizer import MissingDependencyError, Tokenizer, check_special_ids, load_tokenizer
from engine.weights.loader import inspect_config


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
    if args.record_routing is not None:
        _check_routing_target(args.record_routing, args.model)
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
            loaded.model, tokenizer, expert_stats=provider.stats.totals if provider is not None else None
        )
        prompt = _read_prompt(args.prompt, loaded.model) if args.prompt else None
        requests = [_request(tokenizer, t, args.text_pair, params, prompt) for t in sources]
        with contextlib.ExitStack() as recording:
            recorder = (
                recording.enter_context(RoutingRecorder(loaded.model.moe_layers())) if args.record_routing else None
            )
            results = generator.generate(requests)
        for result in results:
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
        if recorder is not None:  # after the outputs: a failed write loses none of them
            assert config.moe is not None  # _check_routing_target refused dense models
            # Beam-search requests are encoded one at a time; the others in one pass together.
            encoded_together = 1 if params.num_beams > 1 else len(requests)
            record = RoutingRecord.from_recorder(
                recorder,
                top_k=config.moe.top_k,
                requests=encoded_together,
                source=str(args.model),
                precision=prediction_precision(provider.stats.layers_to_dict()) if provider is not None else None,
            )
            record.save(args.record_routing)
        if provider is not None and args.details:
            memory = {"budget_bytes": loaded.budget_bytes, **provider.memory()}
            print(json.dumps({"expert_stats": provider.stats.to_dict(), "expert_memory": memory}), file=sys.stderr)
    finally:
        loaded.close()
    return 0


def _check_routing_target(path: Path, model: Path) -> None:
    """Refuse `--record-routing` before any weight loads: a dense model, or a file that cannot be written."""
    if inspect_config(model).config.moe is None:
        raise ConfigError(f"--record-routing: {model} has no MoE layers, so there is no routing to record")
    if path.is_dir():
        raise ConfigError(f"--record-routing {path}: a directory; give a file name (e.g. {path / 'routing.json'})")
    if not path.parent.is_dir():
        raise ConfigError(f"--record-routing {path}: the folder {path.parent} does not exist; create it first")
    if not os.access(path.parent, os.W_OK):
        raise ConfigError(f"--record-routing {path}: the folder {path.parent} is not writable")


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


def add_generate_parser(subparsers: Any) -> None:
    """The `generate` command and its flags."""
    p = subparsers.add_parser("generate", help="generate text with a model")
    add_model_args(p)
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
    p.add_argument(
        "--record-routing",
        type=Path,
        metavar="FILE",
        help="write the routing these inputs took (tokens per expert, reuse and concentration per MoE layer) to "
        "FILE, for `cpm2 plan --routing FILE`",
    )
    add_offload_args(p)
    p.set_defaults(handler=cmd_generate)
