"""Dense decode tokens/s of cpm2 (float32 and int8 dense weights) against CTranslate2 (float32, int8).

Requirement: cpm2 with every dense matmul in int8 (`cpm2 quantize --dense int8`) decodes at ≥ 1.0×
CTranslate2's int8 tok/s on random T5 v1.1 models (d_model 512, 6+6 layers; t5-v1_1-base's shape),
at batch 1 and 16, both on 2 threads; float32 against float32 is reported beside it.

Method (as `bench.decode_vs_hf`): one random checkpoint per shape, written by HF's `save_pretrained`
(`bench.decode_vs_hf.ensure_checkpoint`); cpm2 loads it with `load_for_inference` and its
`--dense int8` copy likewise; CTranslate2 converts it with `TransformersConverter` (float32 weights,
`compute_type` chooses int8 at load). A word-level vocabulary (`<pad>`, `</s>`, `<unk>`, then `t3`,
`t4`, ...) stands in for the missing SentencePiece model, so token strings map one-to-one to ids.
Every system generates exactly N tokens greedily (CTranslate2 `min_decoding_length` =
`max_decoding_length` = N, cpm2 `ignore_eos`) and 1 token from the same prompts; decode throughput
is `B·(N-1) / (t_N - t_1)`. Systems alternate order across repetitions; a repetition during which
other processes took CPU time is retried (`bench.machine.CpuMeter`). CTranslate2 runs in a process of
its own (`bench.ct2_worker`: inside torch's process it slows every later torch kernel), whose CPU time
counts as the benchmark's own.

Run: `python -m bench.decode_vs_ct2 [--quick]`.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from rich.console import Console
from rich.table import Table

from bench.ct2_worker import EOS, PAD, token_string
from bench.decode_models import BenchModel
from bench.decode_vs_hf import (
    CACHE_ROOT,
    Cpm2System,
    DecodeSystem,
    check_timing,
    elapsed_log,
    ensure_checkpoint,
    ensure_int8,
    make_prompts,
    measure_batch,
    token_agreement,
)
from bench.machine import machine_info, publish
from engine.errors import ConfigError
from engine.offload import load_for_inference

RESULTS_DIR = Path("bench/results")
TARGET_RATIO = 1.0
NOISY_SPREAD = 1.15
SPEC_FILE = "ct2_spec.json"


def _t5_v1_1(**shape: int) -> dict[str, Any]:
    return {
        "vocab_size": 32128,
        "d_kv": 64,
        "feed_forward_proj": "gated-gelu",
        "tie_word_embeddings": False,
        "decoder_start_token_id": PAD,
        "pad_token_id": PAD,
        "eos_token_id": EOS,
        **shape,
    }


MODELS: dict[str, BenchModel] = {
    m.name: m
    for m in (
        BenchModel(
            name="t5-v1_1-d512",
            hf_class="T5ForConditionalGeneration",
            config=_t5_v1_1(d_model=512, d_ff=2048, num_heads=8, num_layers=6, num_decoder_layers=6),
            summary="T5 v1.1 d512, d_ff 2048, 8 heads, 6+6 layers, vocab 32128",
            min_prompt_id=3,
            target_batch_sizes=(1, 16),
        ),
        BenchModel(
            name="t5-v1_1-base",
            hf_class="T5ForConditionalGeneration",
            config=_t5_v1_1(d_model=768, d_ff=2048, num_heads=12, num_layers=12, num_decoder_layers=12),
            summary="t5-v1_1-base shape: d768, d_ff 2048, 12 heads, 12+12 layers, vocab 32128",
            min_prompt_id=3,
            target_batch_sizes=(1, 16),
        ),
    )
}


@dataclass(frozen=True, kw_only=True)
class DecodeTiming:
    """How a decode benchmark that sets its thread count times its systems (`measure_batch`)."""

    seed: int = 0
    batch_sizes: tuple[int, ...] = (1, 16)
    new_tokens: int = 32
    """N: tokens generated per row in the long run (the short run generates 1)."""
    prompt_length: int = 32
    repeats: int = 3
    """Clean timed repetitions per (model, batch); each times every system once."""
    warmup: int = 1
    threads: int = 2
    """torch's threads (and CTranslate2's `intra_threads`)."""
    max_foreign_cpu: float = 0.1
    attempts_per_repeat: int = 3

    def __post_init__(self) -> None:
        check_timing(self, "threads")


@dataclass(frozen=True, kw_only=True)
class Ct2BenchConfig(DecodeTiming):
    """One run of the benchmark."""

    models: tuple[BenchModel, ...] = tuple(MODELS.values())
    """The shapes measured, each a random T5 v1.1 checkpoint."""
    cache_root: Path = CACHE_ROOT
    """Checkpoints go to `<cache_root>/<name>`, their int8 and CTranslate2 copies beside them."""

    def __post_init__(self) -> None:
        if not self.models:
            raise ConfigError("models must name at least one model")
        super().__post_init__()


def word_tokenizer(vocab_size: int) -> Any:
    """A word-level HF tokenizer whose token i is `token_string(i)`: CTranslate2's converter reads the
    vocabulary and the special tokens from it."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    tok = Tokenizer(WordLevel({token_string(i): i for i in range(vocab_size)}, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def ensure_ct2(checkpoint: Path, out: Path, *, vocab_size: int) -> Path:
    """`checkpoint` converted for CTranslate2 (float32 weights) at `out`, unless already done."""
    import ctranslate2

    spec = {"source": str(checkpoint), "mtime": (checkpoint / "bench_spec.json").stat().st_mtime}
    if (out / SPEC_FILE).exists() and json.loads((out / SPEC_FILE).read_text()) == spec:
        return out
    tokenizer = word_tokenizer(vocab_size)

    class Converter(ctranslate2.converters.TransformersConverter):  # type: ignore[misc]
        def load_tokenizer(self, tokenizer_class: Any, model_name_or_path: str, **kwargs: Any) -> Any:
            return tokenizer

    Converter(str(checkpoint)).convert(str(out), quantization=None, force=True)
    (out / SPEC_FILE).write_text(json.dumps(spec))
    return out


class Ct2System:
    """CTranslate2's `Translator.translate_batch`, greedy, exactly `num_tokens` new tokens, in its own
    process (`bench.ct2_worker` says why); a context manager that stops the process on exit."""

    def __init__(self, path: Path, *, compute_type: str, threads: int, vocab_size: int) -> None:
        self.name = f"ct2_{compute_type}"
        model = str(path.resolve())
        command = [sys.executable, "-m", "bench.ct2_worker", model, compute_type, str(threads), str(vocab_size)]
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1]
        )
        self._reply()  # the model is loaded

    def _reply(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name}: the CTranslate2 worker exited (code {self.process.wait()})")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"{self.name}: {reply['error']}")
        return reply

    def generate(self, prompts: list[list[int]], num_tokens: int) -> list[list[int]]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"prompts": prompts, "num_tokens": num_tokens}) + "\n")
        self.process.stdin.flush()
        tokens: list[list[int]] = self._reply()["tokens"]
        return tokens

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> Ct2System:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _measure_batch(
    model: BenchModel, systems: list[DecodeSystem], batch: int, cfg: Ct2BenchConfig, note: Callable[[str], None]
) -> dict[str, Any]:
    """One (model, batch) row: every system's timings, the ratios and the token agreement."""
    vocab = int(model.config["vocab_size"])
    prompts = make_prompts(batch, length=cfg.prompt_length, vocab_size=vocab, seed=cfg.seed, low=model.min_prompt_id)
    tokens = {s.name: s.generate(prompts, cfg.new_tokens) for s in systems}
    lengths = {name: sorted({len(r) for r in rows}) for name, rows in tokens.items()}
    note(f"{model.name} batch {batch}: timing {cfg.repeats} repeats of N={cfg.new_tokens} ...")
    timings = measure_batch(systems, prompts, cfg)
    note(f"{model.name} batch {batch}: {timings['num_clean_repeats']} of {len(timings['attempts'])} repeats clean")
    ratios = {
        p: timings[f"cpm2_{p}"]["median_tokens_per_s"] / timings[f"ct2_{p}"]["median_tokens_per_s"]
        for p in ("float32", "int8")
    }
    return {
        "model": model.name,
        "batch_size": batch,
        **timings,
        "ratio_median": ratios,
        "ratio_best": {
            p: timings[f"cpm2_{p}"]["best_tokens_per_s"] / timings[f"ct2_{p}"]["best_tokens_per_s"]
            for p in ("float32", "int8")
        },
        "is_noisy": timings["num_clean_repeats"] < cfg.repeats
        or any(
            timings[s.name]["best_tokens_per_s"] / timings[s.name]["median_tokens_per_s"] > NOISY_SPREAD
            for s in systems
        ),
        "generated_lengths": lengths,
        # Random weights leave near-ties in the logits: summation order may flip one.
        "agreement": {
            "float32": token_agreement(tokens["ct2_float32"], tokens["cpm2_float32"], eos=EOS),
            "int8": token_agreement(tokens["ct2_int8"], tokens["cpm2_int8"], eos=EOS),
        },
    }


def measure_model(model: BenchModel, cfg: Ct2BenchConfig, note: Callable[[str], None]) -> list[dict[str, Any]]:
    """Every (batch, precision) of one model."""
    vocab = int(model.config["vocab_size"])
    root = cfg.cache_root / model.name
    checkpoint = ensure_checkpoint(root, model, seed=cfg.seed)
    ct2_dir = ensure_ct2(checkpoint, cfg.cache_root / f"{model.name}.ct2", vocab_size=vocab)
    int8_dir = ensure_int8(checkpoint, cfg.cache_root / f"{model.name}.int8")
    note(f"{model.name}: checkpoint, CTranslate2 conversion and int8 copy ready")
    with contextlib.ExitStack() as stack:
        systems: list[DecodeSystem] = [
            stack.enter_context(Ct2System(ct2_dir, compute_type="float32", threads=cfg.threads, vocab_size=vocab)),
            Cpm2System(load_for_inference(checkpoint, progress=False).model, name="cpm2_float32"),
            stack.enter_context(Ct2System(ct2_dir, compute_type="int8", threads=cfg.threads, vocab_size=vocab)),
            Cpm2System(load_for_inference(int8_dir, progress=False).model, name="cpm2_int8"),
        ]
        results = [_measure_batch(model, systems, batch, cfg, note) for batch in cfg.batch_sizes]
    del systems
    gc.collect()
    return results


def run(cfg: Ct2BenchConfig, *, log: Callable[[str], object] = print) -> dict[str, Any]:
    """Run the whole benchmark and return the report (what the JSON file holds)."""
    import ctranslate2

    note = elapsed_log(log)
    torch.set_num_threads(cfg.threads)
    machine = {**machine_info(), "ctranslate2": ctranslate2.__version__}
    results = [r for model in cfg.models for r in measure_model(model, cfg, note)]
    machine["load_average_1_5_15_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    note("done")
    int8 = {f"{r['model']}/{r['batch_size']}": r["ratio_median"]["int8"] for r in results}
    config = asdict(cfg)
    config["models"] = [{"name": m.name, "summary": m.summary, "config": dict(m.config)} for m in cfg.models]
    config["cache_root"] = str(cfg.cache_root)
    return {
        "benchmark": "decode_vs_ct2",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine,
        "config": config,
        "results": results,
        "target": {
            "what": "cpm2 int8 / CTranslate2 int8, median decode tok/s",
            "ratio_min": TARGET_RATIO,
            "ratio_median": int8,
            "is_met": all(v >= TARGET_RATIO for v in int8.values()),
        },
    }


def print_report(report: dict[str, Any], console: Console) -> None:
    """One row per (model, batch): medians of all four systems and the two ratios."""
    cfg, m = report["config"], report["machine"]
    table = Table(
        title=f"Decode tokens/s (median), cpm2 vs CTranslate2 {m['ctranslate2']} (N={cfg['new_tokens']}, "
        f"{cfg['repeats']} repeats, {cfg['threads']} threads)",
        caption=f"{m['cpu_model']} ({m['cpu_capability']}), {m['usable_cpus']} cores, torch {m['torch']}, "
        "cpm2 int8 kernels {int8} / {int8_many} (few / many rows)".format_map(m["cpu_kernels"]["float32"]),
    )
    columns = ("model", "batch", "CT2 fp32", "cpm2 fp32", "fp32 ratio", "CT2 int8", "cpm2 int8", "int8 ratio")
    for column in columns:
        table.add_column(column, justify="left" if column == "model" else "right")
    table.add_column("fp32 / int8 same tokens", justify="right")
    for r in report["results"]:
        agree = r["agreement"]
        table.add_row(
            r["model"],
            str(r["batch_size"]),
            *(f"{r[name]['median_tokens_per_s']:.1f}" for name in ("ct2_float32", "cpm2_float32")),
            f"{r['ratio_median']['float32']:.2f}×",
            *(f"{r[name]['median_tokens_per_s']:.1f}" for name in ("ct2_int8", "cpm2_int8")),
            f"[bold]{r['ratio_median']['int8']:.2f}×[/bold]",
            " / ".join(f"{agree[p]['same_position_fraction']:.0%}" for p in ("float32", "int8")),
        )
    console.print(table)
    for r in report["results"]:
        if r["is_noisy"]:
            console.print(
                f"[yellow]Noisy: {r['model']} batch {r['batch_size']} ({r['num_clean_repeats']} of "
                f"{len(r['attempts'])} repeats clean, or best > 15% over median); rerun on an idle machine.[/yellow]"
            )
    target = report["target"]
    verdict = "[green]met[/green]" if target["is_met"] else "[red]not met[/red]"
    ratios = ", ".join(f"{k}: {v:.2f}×" for k, v in target["ratio_median"].items())
    console.print(f"Target cpm2 int8 ≥ {target['ratio_min']}× CTranslate2 int8: {verdict} ({ratios})")


def default_out(*, quick: bool) -> Path:
    return RESULTS_DIR / f"decode_vs_ct2{'.quick' if quick else ''}.json"


def _parse_args(argv: Sequence[str] | None) -> tuple[Ct2BenchConfig, Path]:
    parser = argparse.ArgumentParser(prog="python -m bench.decode_vs_ct2", description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--batch-sizes", default="1,16", help="comma-separated (default 1,16)")
    parser.add_argument("--new-tokens", type=int, default=None, help="N (default 32; 8 with --quick)")
    parser.add_argument("--repeats", type=int, default=None, help="default 3; 1 with --quick")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON path (default bench/results/decode_vs_ct2[.quick].json)"
    )
    parser.add_argument("--quick", action="store_true", help="N=8, 1 repeat")
    args = parser.parse_args(argv)
    try:
        batch_sizes = tuple(int(b) for b in args.batch_sizes.split(","))
        models = tuple(MODELS[name] for name in args.models.split(","))
    except (ValueError, KeyError) as exc:
        parser.error(f"--batch-sizes / --models: {exc}")
    try:
        cfg = Ct2BenchConfig(
            models=models,
            seed=args.seed,
            batch_sizes=batch_sizes,
            new_tokens=args.new_tokens or (8 if args.quick else 32),
            repeats=args.repeats or (1 if args.quick else 3),
        )
    except ConfigError as exc:
        parser.error(str(exc))
    return cfg, args.out or default_out(quick=args.quick)


def main(argv: Sequence[str] | None = None) -> int:
    cfg, out = _parse_args(argv)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    report = run(cfg, log=lambda msg: Console().print(f"[dim]{msg}[/dim]"))
    args = sys.argv[1:] if argv is None else list(argv)
    report = {"command": " ".join(["python -m bench.decode_vs_ct2", *args]), **report}
    publish(report, out=out, plot=None, show=print_report, draw=lambda _report, _path: None, width=140)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
