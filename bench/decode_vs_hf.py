"""Decode tokens/s of cpm2 against HF transformers on one random checkpoint of a named shape.

Requirement: both systems in RAM, the same random checkpoint, batch 1 and 16, reported as a ratio
from one run; target ≥ 1.5× HF (Switch d_model 512 with 64 experts, 6+6 layers: at batch 1;
NLLB-200-distilled-600M's shape: at batch 1 and 16), and say what limits it. The models are
`bench.decode_models.BENCH_MODELS`. With `--int8` (as `make bench` runs the NLLB shape) a third
system is timed in the same repetitions: cpm2 serving the `cpm2 quantize --dense int8` copy of the
same checkpoint, against the same HF run. In one dtype a batch-1 step of a dense model reads the same
weight bytes in both systems, so the ratio is bounded by HF's distance from the bandwidth floor that
the report prints; int8 moves a quarter of float32's bytes.

Method: the checkpoint is written once by HF's `save_pretrained` and both systems load that
directory (cpm2 with `load_model`, packed weights). Each system generates exactly N tokens
greedily from the same seeded prompts (32 random ids per row, different rows) and, separately,
1 token; `B·(N-1) / (t_N - t_1)` is then decode throughput alone, with encoding, the first step
and per-call setup subtracted. Runs alternate between the systems (HF, cpm2, cpm2, HF, ...) so
background noise hits both alike, and a repetition during which other processes took CPU time is
retried (`CpuMeter`); median and best of the clean repetitions are reported.

What limits it: a decode step at batch 1 is a chain of matrix-vector products, so it reads every
weight it uses once. The bytes a step reads (decoder attention, cross-attention queries/outputs,
dense FFNs, each MoE layer's router and the experts its tokens were routed to, counted through the
expert-provider seam, and the output head, which dominates a dense model with a large vocabulary)
times steps/s is the bandwidth achieved, compared with a large GEMV measured on the same machine
(`bench.machine`). The step's GEMVs are also timed on their own
(`bench.decode_traffic.time_gemv_chain`), which splits a step into weight streaming, small-GEMV
overhead and everything else.

Run: `python -m bench.decode_vs_hf [--model NAME] [--quick]`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch
import transformers
from rich.console import Console

from bench.decode_models import BENCH_MODELS, DEFAULT_MODEL, BenchModel
from bench.decode_report import print_report, write_plot
from bench.decode_traffic import decode_weight_bytes, experts_per_decode_step, time_gemv_chain
from bench.machine import CpuMeter, machine_info, measure_gemv_bandwidth
from engine.errors import ConfigError
from engine.generation import GenerationRequest, Generator, SamplingParams
from engine.model import Seq2SeqLM
from engine.offload import load_for_inference
from engine.weights.loader import load_model, parse_dtype
from engine.weights.quantize import quantize_model

CACHE_ROOT = Path(".cache/bench")
RESULTS_DIR = Path("bench/results")
TARGET_RATIO = 1.5
#: Best repeat more than this much faster than the median: other processes interfered.
NOISY_SPREAD = 1.15
SPEC_FILE = "bench_spec.json"
INT8_SPEC_FILE = "int8_spec.json"


@dataclass(frozen=True, kw_only=True)
class DecodeBenchConfig:
    """One run of the benchmark."""

    model: BenchModel = BENCH_MODELS[DEFAULT_MODEL]
    """The model shape and HF class (`bench.decode_models`)."""
    cache_dir: Path | None = None
    """Where the random checkpoint is written (and reused when it was built from the same spec);
    default `.cache/bench/<model name>`."""
    seed: int = 0
    """Seeds the checkpoint's weights and the prompts."""
    dtype: str = "float32"
    """Weight and activation dtype of both systems: float32 or bfloat16."""
    batch_sizes: tuple[int, ...] = (1, 16)
    """Batch sizes to measure; each row has its own prompt."""
    new_tokens: int = 64
    """N: tokens generated per row in the long run (the short run generates 1)."""
    prompt_length: int = 32
    """Encoder tokens per row."""
    repeats: int = 5
    """Clean timed repetitions per batch size (each times every system once)."""
    warmup: int = 1
    """Untimed runs per system and batch size before timing."""
    max_foreign_cpu: float = 0.1
    """Retry a repetition if other processes used more than this share of the machine's CPU time
    meanwhile (on a 2-core box one busy neighbour slows two-threaded kernels several times over)."""
    attempts_per_repeat: int = 3
    """Give up retrying after this many attempts per wanted repetition."""
    gemv_bytes: int = 256 * 2**20
    """Weight size of the bandwidth-reference GEMV; far larger than the caches."""
    int8: bool = False
    """Also time cpm2 with every dense matmul in int8 (`cpm2 quantize --dense int8` of the same
    checkpoint) against the same HF run: what a user who serves the model in int8 gets."""

    def __post_init__(self) -> None:
        if parse_dtype(self.dtype) not in (torch.float32, torch.bfloat16):
            raise ConfigError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        check_timing(self, "gemv_bytes")

    @property
    def checkpoint_dir(self) -> Path:
        return self.cache_dir if self.cache_dir is not None else CACHE_ROOT / self.model.name

    @property
    def torch_dtype(self) -> torch.dtype:
        dtype = parse_dtype(self.dtype)
        assert dtype is not None
        return dtype


def ensure_checkpoint(path: Path, model: BenchModel, *, seed: int) -> Path:
    """A random-weight checkpoint of `model` at `path`, built with `save_pretrained` (safetensors)
    unless one from the same class, config and seed is already there."""
    spec = {"hf_class": model.hf_class, "config": dict(model.config), "seed": seed}
    spec_path = path / SPEC_FILE
    if spec_path.exists() and json.loads(spec_path.read_text()) == spec:
        return path
    spec_path.unlink(missing_ok=True)  # an interrupted rebuild must not look complete
    torch.manual_seed(seed)
    hf = model.hf_model_class()(model.hf_config()).eval()
    hf.save_pretrained(path)
    del hf
    gc.collect()
    spec_path.write_text(json.dumps(spec, indent=2))  # last: marks the directory complete
    return path


def ensure_int8(checkpoint: Path, out: Path) -> Path:
    """`checkpoint`'s copy with every dense matmul in int8 (`quantize_model(dense="int8")`) at `out`,
    unless one made from the same checkpoint is already there."""
    spec = {"source": str(checkpoint), "mtime": (checkpoint / SPEC_FILE).stat().st_mtime}
    spec_path = out / INT8_SPEC_FILE
    if spec_path.exists() and json.loads(spec_path.read_text()) == spec:
        return out
    shutil.rmtree(out, ignore_errors=True)
    quantize_model(checkpoint, out, experts=None, dense="int8", check_inputs=0, progress=False)
    spec_path.write_text(json.dumps(spec))
    return out


def make_prompts(batch_size: int, *, length: int, vocab_size: int, seed: int, low: int = 2) -> list[list[int]]:
    """`batch_size` rows of random ids in [low, vocab_size) (above the special ids); row i is the same
    for every batch size."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, vocab_size, (batch_size, length), generator=generator).tolist()


class HFSystem:
    """HF transformers' `generate`, greedy, forced to exactly `num_tokens` new tokens (the first one
    `forced_first_token` when set)."""

    name = "hf"

    def __init__(self, model: Any, *, forced_first_token: int | None = None) -> None:
        self.model = model
        self.forced = {} if forced_first_token is None else {"forced_bos_token_id": forced_first_token}

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], num_tokens: int) -> list[list[int]]:
        ids = torch.tensor(prompts)
        out = self.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=num_tokens,
            min_new_tokens=num_tokens,
            do_sample=False,
            **self.forced,
        )
        return out[:, 1:].tolist()  # drop the decoder start token


class Cpm2System:
    """cpm2's `Generator`, greedy, generating past the end token (the first one `forced_first_token`
    when set)."""

    def __init__(self, model: Seq2SeqLM, *, forced_first_token: int | None = None, name: str = "cpm2") -> None:
        self.name = name
        self.generator = Generator(model)
        self.forced = () if forced_first_token is None else (forced_first_token,)

    def generate(self, prompts: list[list[int]], num_tokens: int) -> list[list[int]]:
        params = SamplingParams(max_new_tokens=num_tokens, ignore_eos=True, forced_tokens=self.forced)
        results = self.generator.generate([GenerationRequest(tuple(p), params) for p in prompts])
        return [r.token_ids for r in results]


class DecodeSystem(Protocol):
    """A system under test: greedy decoding of exactly `num_tokens` tokens per prompt."""

    name: str

    def generate(self, prompts: list[list[int]], num_tokens: int) -> list[list[int]]: ...


class TimingConfig(Protocol):
    """The fields `measure_batch` reads (every decode benchmark's config has them)."""

    @property
    def new_tokens(self) -> int: ...
    @property
    def warmup(self) -> int: ...
    @property
    def repeats(self) -> int: ...
    @property
    def attempts_per_repeat(self) -> int: ...
    @property
    def max_foreign_cpu(self) -> float: ...


def check_timing(cfg: Any, *at_least_one: str) -> None:
    """The checks every decode benchmark's config shares (its `batch_sizes`, `new_tokens`,
    `prompt_length`, `repeats`, `attempts_per_repeat`, `max_foreign_cpu`, `warmup`), and that each
    field named in `at_least_one` is at least 1."""
    if not cfg.batch_sizes or any(b < 1 for b in cfg.batch_sizes):
        raise ConfigError(f"batch sizes must be positive integers, got {list(cfg.batch_sizes)}")
    if cfg.new_tokens < 2:
        raise ConfigError(f"new_tokens must be at least 2 (t_N - t_1 needs N > 1), got {cfg.new_tokens}")
    for name in ("prompt_length", "repeats", "attempts_per_repeat", *at_least_one):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    if not 0 <= cfg.max_foreign_cpu <= 1:
        raise ConfigError(f"max_foreign_cpu must be in [0, 1], got {cfg.max_foreign_cpu}")
    if cfg.warmup < 0:
        raise ConfigError(f"warmup must be >= 0, got {cfg.warmup}")


def timed_generate(system: DecodeSystem, prompts: list[list[int]], num_tokens: int) -> float:
    """Seconds `system` takes to generate `num_tokens` tokens for every prompt."""
    start = time.perf_counter()
    system.generate(prompts, num_tokens)
    return time.perf_counter() - start


def elapsed_log(log: Callable[[str], object]) -> Callable[[str], None]:
    """`log`, each message prefixed with the seconds since this call (a benchmark's progress notes)."""
    started = time.perf_counter()

    def note(message: str) -> None:
        log(f"[{time.perf_counter() - started:6.1f} s] {message}")

    return note


def compare_tokens(hf: list[list[int]], cpm2: list[list[int]], *, eos: int) -> tuple[bool, int]:
    """Whether greedy tokens agree, and how many were compared.

    Each row is compared up to cpm2's first end token: from there HF's `min_new_tokens` forbids the
    end token while cpm2 (`ignore_eos`) emits it, so the two legitimately part.
    """
    is_match, compared = True, 0
    for hf_row, cpm2_row in zip(hf, cpm2, strict=True):
        n = cpm2_row.index(eos) if eos in cpm2_row else len(cpm2_row)
        is_match = is_match and hf_row[:n] == cpm2_row[:n]
        compared += n
    return is_match, compared


def token_agreement(reference: list[list[int]], other: list[list[int]], *, eos: int) -> dict[str, Any]:
    """`compare_tokens` of two systems' greedy tokens, and the share of `reference`'s positions where
    `other` has the same token (a rounding change flips near-ties of random weights)."""
    is_match, compared = compare_tokens(reference, other, eos=eos)
    same = sum(a == b for ra, rb in zip(reference, other, strict=True) for a, b in zip(ra, rb, strict=False))
    return {
        "is_match": is_match,
        "num_compared": compared,
        "same_position_fraction": same / max(1, sum(map(len, reference))),
    }


def _summary(times_1: list[float], times_n: list[float], *, batch: int, n: int) -> dict[str, Any]:
    rates = [batch * (n - 1) / (tn - t1) for t1, tn in zip(times_1, times_n, strict=True)]
    return {
        "t_1_s": times_1,
        "t_n_s": times_n,
        "tokens_per_s": rates,
        "median_tokens_per_s": statistics.median(rates),
        "best_tokens_per_s": max(rates),
        "best_over_median": max(rates) / statistics.median(rates),
    }


def measure_batch(systems: Sequence[DecodeSystem], prompts: list[list[int]], cfg: TimingConfig) -> dict[str, Any]:
    """Warm up, then time every system's 1-token and N-token runs in alternating order.

    One repetition times every system once. A repetition during which other processes used more
    than `cfg.max_foreign_cpu` of the machine is kept in the raw record but retried, up to
    `cfg.attempts_per_repeat` × `cfg.repeats` attempts; the statistics use the clean ones (all of
    them if none was clean).
    """
    n = cfg.new_tokens
    for _ in range(cfg.warmup):
        for system in systems:
            system.generate(prompts, 1)
            system.generate(prompts, n)
    meter = CpuMeter()
    attempts: list[dict[str, Any]] = []
    while sum(a["is_clean"] for a in attempts) < cfg.repeats and len(attempts) < (
        cfg.attempts_per_repeat * cfg.repeats
    ):
        order = list(systems) if len(attempts) % 2 == 0 else list(reversed(systems))
        meter.start()
        times = {
            s.name: {"t_1_s": timed_generate(s, prompts, 1), "t_n_s": timed_generate(s, prompts, n)} for s in order
        }
        share = meter.foreign_share()
        is_clean = share is None or share <= cfg.max_foreign_cpu
        attempts.append({"order": [s.name for s in order], "foreign_cpu_share": share, "is_clean": is_clean, **times})
    used = [a for a in attempts if a["is_clean"]] or attempts
    batch = len(prompts)
    return {
        **{
            s.name: _summary([a[s.name]["t_1_s"] for a in used], [a[s.name]["t_n_s"] for a in used], batch=batch, n=n)
            for s in systems
        },
        "num_clean_repeats": sum(a["is_clean"] for a in attempts),
        "attempts": attempts,
    }


def run(cfg: DecodeBenchConfig, *, log: Callable[[str], object] = print) -> dict[str, Any]:
    """Run the whole benchmark and return the report (what the JSON file holds)."""
    note = elapsed_log(log)
    machine = machine_info()
    path = ensure_checkpoint(cfg.checkpoint_dir, cfg.model, seed=cfg.seed)
    note(f"checkpoint: {path} ({cfg.model.name})")
    hf_model = cfg.model.hf_model_class().from_pretrained(path, dtype=cfg.torch_dtype).eval()
    model, info = load_model(path, dtype=cfg.torch_dtype, pack=True)
    is_moe = info.config.moe is not None
    forced = cfg.model.forced_first_token
    hf, cpm2 = HFSystem(hf_model, forced_first_token=forced), Cpm2System(model, forced_first_token=forced)
    systems: list[DecodeSystem] = [hf, cpm2]
    if cfg.int8:
        int8_dir = ensure_int8(path, cfg.checkpoint_dir.parent / f"{cfg.checkpoint_dir.name}.int8")
        int8_model = load_for_inference(int8_dir, dtype=cfg.torch_dtype, progress=False).model
        systems.append(Cpm2System(int8_model, forced_first_token=forced, name="cpm2_int8"))
    note(f"loaded {', '.join(s.name for s in systems)}")
    results = []
    for batch in cfg.batch_sizes:
        prompts = make_prompts(
            batch,
            length=cfg.prompt_length,
            vocab_size=info.config.vocab_size,
            seed=cfg.seed,
            low=cfg.model.min_prompt_id,
        )
        hf_tokens = hf.generate(prompts, cfg.new_tokens)
        is_match, compared = compare_tokens(
            hf_tokens, cpm2.generate(prompts, cfg.new_tokens), eos=info.config.eos_token_id
        )
        # A dense model has no experts to count (and no untimed counting run to spend).
        experts = experts_per_decode_step(model, partial(cpm2.generate, prompts, cfg.new_tokens)) if is_moe else None
        note(f"batch {batch}: timing {cfg.repeats} repeats of N={cfg.new_tokens} ...")
        timings = measure_batch(systems, prompts, cfg)
        note(f"batch {batch}: {timings['num_clean_repeats']} of {len(timings['attempts'])} repeats clean")
        step_bytes = decode_weight_bytes(info.config, dtype=cfg.torch_dtype, experts_per_layer=experts or 0.0)
        results.append(
            {
                "batch_size": batch,
                **timings,
                "ratio_median": timings["cpm2"]["median_tokens_per_s"] / timings["hf"]["median_tokens_per_s"],
                "ratio_best": timings["cpm2"]["best_tokens_per_s"] / timings["hf"]["best_tokens_per_s"],
                "is_noisy": timings["num_clean_repeats"] < cfg.repeats
                or any(timings[name]["best_over_median"] > NOISY_SPREAD for name in ("hf", "cpm2")),
                "tokens_match": is_match,
                "num_compared_tokens": compared,
                "experts_per_moe_layer_per_step": experts,
                "weight_bytes_per_step": step_bytes,
                "achieved_gb_s": {
                    name: step_bytes["total"] * timings[name]["median_tokens_per_s"] / batch / 1e9
                    for name in ("hf", "cpm2")
                },
                **(
                    _int8_row(timings, hf_tokens, systems[-1], prompts, cfg, eos=info.config.eos_token_id)
                    if cfg.int8
                    else {}
                ),
            }
        )
    note("timing the decode step's GEMVs alone, and a large GEMV ...")
    chain = time_gemv_chain(model, num_steps=cfg.new_tokens) if 1 in cfg.batch_sizes else None
    del hf_model, model, hf, cpm2, systems
    gc.collect()
    bandwidth = _bandwidth_summary(results, cfg, chain)
    machine["load_average_1_5_15_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    note("done")
    return {
        "benchmark": "decode_vs_hf",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine,
        "config": {**asdict(cfg), "cache_dir": str(cfg.checkpoint_dir)},
        "results": results,
        "bandwidth": bandwidth,
        "target": _target(results, cfg.model.target_batch_sizes),
        **(
            {"target_int8": _target(results, cfg.model.target_batch_sizes, key="ratio_int8_median")} if cfg.int8 else {}
        ),
    }


def _int8_row(
    timings: dict[str, Any],
    hf_tokens: list[list[int]],
    system: DecodeSystem,
    prompts: list[list[int]],
    cfg: DecodeBenchConfig,
    *,
    eos: int,
) -> dict[str, Any]:
    """cpm2 int8's ratios to HF and how many of HF's greedy tokens it reproduces (int8 rounding
    changes some: random weights leave near-ties that it flips)."""
    return {
        "ratio_int8_median": timings["cpm2_int8"]["median_tokens_per_s"] / timings["hf"]["median_tokens_per_s"],
        "ratio_int8_best": timings["cpm2_int8"]["best_tokens_per_s"] / timings["hf"]["best_tokens_per_s"],
        "int8_tokens": token_agreement(hf_tokens, system.generate(prompts, cfg.new_tokens), eos=eos),
    }


def _bandwidth_summary(
    results: list[dict[str, Any]], cfg: DecodeBenchConfig, chain: dict[str, Any] | None
) -> dict[str, Any]:
    """The reference GEMV bandwidth and, for batch 1, where cpm2's step time goes."""
    gemv = measure_gemv_bandwidth(dtype=cfg.torch_dtype, weight_bytes=cfg.gemv_bytes)
    # The machine's capability: the faster path's best call (a busy neighbour slows the
    # two-threaded packed kernel far more than MKL's GEMV, so either can come out ahead).
    reference = max((p for p in ("packed", "f_linear") if p in gemv), key=lambda p: gemv[p]["best_gb_s"])
    reference_gb_s = gemv[reference]["best_gb_s"]
    summary: dict[str, Any] = {"gemv": gemv, "reference": reference, "reference_gb_s": reference_gb_s}
    first = next((r for r in results if r["batch_size"] == 1), None)
    if first is None or chain is None:
        return summary
    step_bytes = first["weight_bytes_per_step"]["total"]
    cpm2 = first["cpm2"]
    step_ms = 1e3 / cpm2["median_tokens_per_s"]
    summary["gemv_chain"] = chain
    summary["batch1"] = {
        "weight_bytes_per_step": step_bytes,
        "cpm2_achieved_gb_s": first["achieved_gb_s"]["cpm2"],
        "cpm2_best_achieved_gb_s": step_bytes * cpm2["best_tokens_per_s"] / 1e9,
        "fraction_of_reference": first["achieved_gb_s"]["cpm2"] / reference_gb_s,
        "best_fraction_of_reference": step_bytes * cpm2["best_tokens_per_s"] / 1e9 / reference_gb_s,
        "cpm2_step_ms": step_ms,
        # Step time split: streaming the weights at the reference bandwidth; the rest of the
        # GEMVs' own time (many small matrices: per-call and threading overhead); everything else.
        "bandwidth_floor_step_ms": step_bytes / (reference_gb_s * 1e9) * 1e3,
        "gemv_chain_step_ms": chain["best_step_ms"],
        "gemv_chain_gb_s": chain["best_gb_s"],
        "other_ops_ms": step_ms - chain["best_step_ms"],
    }
    return summary


def _target(results: list[dict[str, Any]], batch_sizes: Sequence[int], *, key: str = "ratio_median") -> dict[str, Any]:
    """The target ratio at the model's target batch sizes that were measured (None: none was)."""
    ratios = {str(r["batch_size"]): r[key] for r in results if r["batch_size"] in batch_sizes}
    return {
        "ratio_min": TARGET_RATIO,
        "batch_sizes": list(batch_sizes),
        "ratio_median": ratios,
        "is_met": all(v >= TARGET_RATIO for v in ratios.values()) if ratios else None,
    }


def default_out(model_name: str, *, quick: bool) -> Path:
    """`bench/results/decode_vs_hf[_<model>][.quick].json`: the default model keeps the plain name, and a
    quick check never overwrites full results."""
    stem = "decode_vs_hf" if model_name == DEFAULT_MODEL else f"decode_vs_hf_{model_name}"
    return RESULTS_DIR / f"{stem}{'.quick' if quick else ''}.json"


def _parse_args(argv: Sequence[str] | None) -> tuple[DecodeBenchConfig, Path, bool]:
    parser = argparse.ArgumentParser(prog="python -m bench.decode_vs_hf", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        choices=sorted(BENCH_MODELS),
        help=f"benchmark model (default {DEFAULT_MODEL})",
    )
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="checkpoint directory (default .cache/bench/MODEL)"
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch-sizes", default="1,16", help="comma-separated (default 1,16)")
    parser.add_argument("--new-tokens", type=int, default=None, help="N (default 64; 16 with --quick)")
    parser.add_argument("--repeats", type=int, default=None, help="default 5; 2 with --quick")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON path, the plot goes beside it (default bench/results/decode_vs_hf[_MODEL][.quick].json; "
        f"no _MODEL for {DEFAULT_MODEL})",
    )
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument(
        "--int8",
        action="store_true",
        help="also time cpm2 with every dense matmul in int8 (cpm2 quantize --dense int8)",
    )
    parser.add_argument("--quick", action="store_true", help="N=16 and 2 repeats (< 1 min for the default model)")
    args = parser.parse_args(argv)
    try:
        batch_sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    except ValueError:
        parser.error(f"--batch-sizes: expected comma-separated integers, got {args.batch_sizes!r}")
    try:
        cfg = DecodeBenchConfig(
            model=BENCH_MODELS[args.model],
            cache_dir=args.cache_dir,
            seed=args.seed,
            dtype=args.dtype,
            batch_sizes=batch_sizes,
            new_tokens=args.new_tokens or (16 if args.quick else 64),
            repeats=args.repeats or (2 if args.quick else 5),
            int8=args.int8,
        )
    except ConfigError as exc:
        parser.error(str(exc))
    out = args.out or default_out(args.model, quick=args.quick)
    return cfg, out, not args.no_plot


def main(argv: Sequence[str] | None = None) -> int:
    cfg, out, want_plot = _parse_args(argv)
    # Wide enough for the table when the output goes to a file or pipe (README numbers).
    console = Console(width=None if sys.stdout.isatty() else 120)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    report = run(cfg, log=lambda msg: console.print(f"[dim]{msg}[/dim]"))
    args = sys.argv[1:] if argv is None else list(argv)
    report = {"command": " ".join(["python -m bench.decode_vs_hf", *args]), **report}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print_report(report, console)
    console.print(f"JSON: {out}")
    if want_plot:
        plot = write_plot(report, out.with_suffix(".png"))
        console.print(f"plot: {plot}" if plot else "plot: skipped (matplotlib is not installed)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
