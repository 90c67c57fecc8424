"""Does `torch.compile` make cpm2's CPU decode step faster? Eager against compiled, side by side.

Issue 26 asks for `torch.compile` (or CPU graph capture) wherever it wins on this CPU, measured.
The engine decodes eagerly; this benchmark measures what compiling would change, on the machine it
runs on, so the answer is re-measured rather than assumed on each new CPU:

- `eager`: the engine as it serves (oneDNN-packed dense weights where the CPU has them).
- `eager_unpacked`: the same checkpoint with plain weights (as the compiled variants start from),
  eager: what the engine's oneDNN packing is worth, apart from what compiling changes.
- `compiled`: the same checkpoint loaded again with plain (unpacked) weights, its whole decoder stack
  compiled by inductor with dynamic shapes (one graph serves every batch size and cache length; a
  server's batch changes at every join and leave) and `freezing` (weights become constants that
  inductor packs for oneDNN itself: it cannot trace the engine's own packed weights, and without
  freezing its oneDNN linear lowering refuses weights passed as inputs).
- `compiled_sublayers`: only what is pure tensor math compiled, each on its own: every decoder
  block's norms, cross-attention and feed-forward layer; self-attention, which writes the cache,
  and the cache's bookkeeping stay eager. Compiling the whole decoder traces that bookkeeping too:
  its per-row lengths are a Python list and its layer indices module integers, so dynamo breaks
  the graph at every cache write and recompiles per layer and per length (the report counts the
  graphs compiled); this variant measures what compiling gains where nothing breaks.

Method as `bench.decode_vs_ct2`: one random T5 v1.1 checkpoint (`ensure_checkpoint`), greedy, exactly
N tokens and 1 token from the same prompts, decode rate `B·(N-1) / (t_N - t_1)`, systems alternating
order across repetitions, a repetition during which other processes took CPU time retried. The
first call of each system (compilation included) is timed apart and reported as its warm-up cost;
tokens are compared with eager's (a compiled kernel's summation order may flip a near-tie).

Run: `python -m bench.compiled_step [--quick]`.
"""

from __future__ import annotations

import argparse
import gc
import statistics
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

from bench.ct2_worker import EOS
from bench.decode_models import BenchModel
from bench.decode_vs_ct2 import MODELS, DecodeTiming
from bench.decode_vs_hf import (
    CACHE_ROOT,
    Cpm2System,
    DecodeSystem,
    elapsed_log,
    ensure_checkpoint,
    make_prompts,
    measure_batch,
    timed_generate,
    token_agreement,
)
from bench.machine import machine_info, publish
from engine.errors import ConfigError
from engine.model import Seq2SeqLM
from engine.offload import load_for_inference

RESULTS_DIR = Path("bench/results")
#: A compiled step counts as a win from this ratio over eager at every batch size: below it the
#: gain is within this VM's run-to-run spread, and compiling costs tens of seconds per process.
WIN_RATIO = 1.05
VARIANTS = ("eager", "eager_unpacked", "compiled", "compiled_sublayers")
#: The variants that would change the engine (eager_unpacked is a reference for them).
CANDIDATES = ("compiled", "compiled_sublayers")
LABELS = {"eager": "eager", "eager_unpacked": "unpacked", "compiled": "compiled", "compiled_sublayers": "sublayers"}


@dataclass(frozen=True, kw_only=True)
class CompileBenchConfig(DecodeTiming):
    """One run of the benchmark."""

    model: BenchModel = MODELS["t5-v1_1-d512"]
    cache_root: Path = CACHE_ROOT


def compile_decoder(model: Seq2SeqLM, variant: str) -> Seq2SeqLM:
    """`model` with its decoder compiled as `variant` says (in place; `eager` leaves it as it is)."""
    if variant == "compiled":
        model.decoder.compile(dynamic=True)
    elif variant == "compiled_sublayers":
        for block in model.decoder.layers():
            for sublayer in (block.attn_norm, block.cross_norm, block.cross, block.ff_norm, block.mlp):
                sublayer.compile(dynamic=True)
    elif variant not in ("eager", "eager_unpacked"):
        raise ConfigError(f"unknown variant {variant!r}; one of {', '.join(VARIANTS)}")
    return model


def _graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def measure(cfg: CompileBenchConfig, note: Callable[[str], None]) -> list[dict[str, Any]]:
    """Every batch size: each variant's timings, its ratio over eager and its tokens against eager's."""
    checkpoint = ensure_checkpoint(cfg.cache_root / cfg.model.name, cfg.model, seed=cfg.seed)
    vocab = int(cfg.model.config["vocab_size"])
    systems: list[DecodeSystem] = [
        Cpm2System(compile_decoder(load_for_inference(checkpoint, progress=False, pack=v == "eager").model, v), name=v)
        for v in VARIANTS
    ]
    first_prompts = make_prompts(
        1, length=cfg.prompt_length, vocab_size=vocab, seed=cfg.seed, low=cfg.model.min_prompt_id
    )
    # The first call compiles (dynamic shapes: later batch sizes and lengths reuse the graphs).
    first = {s.name: timed_generate(s, first_prompts, cfg.new_tokens) for s in systems}
    graphs = [_graphs_compiled()]
    note("first calls: " + ", ".join(f"{k} {v:.1f} s" for k, v in first.items()) + f"; {graphs[0]} graphs compiled")
    rows = []
    for batch in cfg.batch_sizes:
        prompts = make_prompts(
            batch, length=cfg.prompt_length, vocab_size=vocab, seed=cfg.seed, low=cfg.model.min_prompt_id
        )
        tokens = {s.name: s.generate(prompts, cfg.new_tokens) for s in systems}
        timings = measure_batch(systems, prompts, cfg)
        graphs.append(_graphs_compiled())
        eager = timings["eager"]["median_tokens_per_s"]
        rows.append(
            {
                "batch_size": batch,
                **timings,
                "first_call_seconds": first,
                # Graphs compiled so far (both compiled variants): growth here means a recompilation
                # during this batch size's runs, whose time the timings include.
                "graphs_compiled": graphs[-1],
                "graphs_compiled_before": graphs[-2],
                "ratio_median": {v: timings[v]["median_tokens_per_s"] / eager for v in VARIANTS[1:]},
                "agreement": {v: token_agreement(tokens["eager"], tokens[v], eos=EOS) for v in VARIANTS[1:]},
            }
        )
        note(
            f"batch {batch}: "
            + ", ".join(f"{v} {timings[v]['median_tokens_per_s']:.1f} tok/s" for v in VARIANTS)
            + f" ({timings['num_clean_repeats']} of {len(timings['attempts'])} repeats clean)"
        )
    del systems
    gc.collect()
    return rows


def run(cfg: CompileBenchConfig, *, log: Callable[[str], object] = print) -> dict[str, Any]:
    """Run the whole benchmark and return the report (what the JSON file holds)."""
    import torch._inductor.config as inductor_config

    note = elapsed_log(log)
    torch.set_num_threads(cfg.threads)
    with inductor_config.patch(freezing=True):
        results = measure(cfg, note)
    wins = {
        v: all(r["ratio_median"][v] >= WIN_RATIO for r in results)
        and all(r["agreement"][v]["is_match"] for r in results)
        for v in CANDIDATES
    }
    config = asdict(cfg)
    config["model"] = {"name": cfg.model.name, "summary": cfg.model.summary}
    config["cache_root"] = str(cfg.cache_root)
    return {
        "benchmark": "compiled_step",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "config": config,
        "results": results,
        "verdict": {
            "what": f"compiled / eager median decode tok/s >= {WIN_RATIO} at every batch size, same tokens",
            "wins": wins,
            "median_ratio": {v: statistics.median(r["ratio_median"][v] for r in results) for v in VARIANTS[1:]},
        },
    }


def print_report(report: dict[str, Any], console: Console) -> None:
    """One row per batch size: each variant's median tok/s and its ratio over eager."""
    cfg, m = report["config"], report["machine"]
    table = Table(
        title=f"Decode tokens/s (median), eager vs torch.compile, {cfg['model']['summary']} "
        f"(N={cfg['new_tokens']}, {cfg['repeats']} repeats, {cfg['threads']} threads)",
        caption=f"{m['cpu_model']} ({m['cpu_capability']}), {m['usable_cpus']} cores, torch {m['torch']}",
    )
    others = VARIANTS[1:]
    columns = ("batch", *(LABELS[v] for v in VARIANTS), *(f"{LABELS[v]} ÷ eager" for v in others), "same tokens")
    for column in columns:
        table.add_column(column, justify="right")
    for r in report["results"]:
        table.add_row(
            str(r["batch_size"]),
            *(f"{r[v]['median_tokens_per_s']:.1f}" for v in VARIANTS),
            *(f"{r['ratio_median'][v]:.2f}×" for v in others),
            "/".join(f"{r['agreement'][v]['same_position_fraction']:.0%}" for v in others),
        )
    console.print(table)
    first = report["results"][0]["first_call_seconds"]
    console.print(
        "First call (compiling included): "
        + ", ".join(f"{k} {v:.1f} s" for k, v in first.items())
        + "; graphs compiled after each batch size's runs: "
        + ", ".join(f"{r['batch_size']}: {r['graphs_compiled']}" for r in report["results"])
    )
    for v, wins in report["verdict"]["wins"].items():
        verdict = "[green]wins[/green]" if wins else "[red]does not win[/red]"
        console.print(f"{v}: {verdict} (≥ {WIN_RATIO}× eager at every batch size with the same tokens)")


def _parse_args(argv: Sequence[str] | None) -> tuple[CompileBenchConfig, Path]:
    parser = argparse.ArgumentParser(prog="python -m bench.compiled_step", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="t5-v1_1-d512", help=f"one of {', '.join(MODELS)}")
    parser.add_argument("--batch-sizes", default="1,16", help="comma-separated (default 1,16)")
    parser.add_argument("--new-tokens", type=int, default=None, help="N (default 32; 8 with --quick)")
    parser.add_argument("--repeats", type=int, default=None, help="default 3; 1 with --quick")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/compiled_step.json)")
    parser.add_argument("--quick", action="store_true", help="N=8, 1 repeat")
    args = parser.parse_args(argv)
    if args.model not in MODELS:
        parser.error(f"--model: {args.model!r} is not one of {', '.join(MODELS)}")
    try:
        cfg = CompileBenchConfig(
            model=MODELS[args.model],
            batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",")),
            new_tokens=args.new_tokens or (8 if args.quick else 32),
            repeats=args.repeats or (1 if args.quick else 3),
        )
    except (ValueError, ConfigError) as exc:
        parser.error(f"--batch-sizes / --new-tokens / --repeats: {exc}")
    out = args.out or RESULTS_DIR / f"compiled_step{'.quick' if args.quick else ''}.json"
    return cfg, out


def main(argv: Sequence[str] | None = None) -> int:
    cfg, out = _parse_args(argv)
    transformers.logging.set_verbosity_error()
    report = run(cfg, log=lambda msg: Console().print(f"[dim]{msg}[/dim]"))
    args = sys.argv[1:] if argv is None else list(argv)
    report = {"command": " ".join(["python -m bench.compiled_step", *args]), **report}
    publish(report, out=out, plot=None, show=print_report, draw=lambda _report, _path: None, width=140)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
