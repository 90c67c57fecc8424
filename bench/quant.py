"""Float experts (as stored) against int8 experts: one model, one expert budget, one run.

    python -m bench.quant            # full run (~2 min on 2 cores); --quick writes quant.quick.json

The model is `cpm2 init --preset small` (6 + 6 MoE blocks of 16 gated-GELU experts, d_model 512,
d_ff 1024), written in float32 and in bfloat16 from the same seed, and the float32 copy quantised
with `cpm2 quantize --experts int8` (per-row int8, `engine.model.quant`). All three live in a
temporary directory under `.cache/bench/` that is deleted at the end. Each decodes in the dtype of
its dense weights (the int8 model in float32 through the int8 kernels, see bench/int8_kernels.py).

Every offloaded run gets the same budget in bytes: `--budget-share` (10 %) of the bfloat16 experts,
so the float32 experts are 20x, the bfloat16 10x and the int8 5x the pool (at 25 % the int8 pool
holds almost every decoder expert and a cold run barely reads: results/quant_budget25.json). Modes:
- `cold`: strict (O_DIRECT reads, RAM holds only the pool) with the expert store evicted from the
  page cache before each decode step, so each miss is a real disk read. The dense weights stay as
  loaded (in RAM, as in any deployment): evicting their file too made every step fault the memory-
  mapped embedding back in through the kernel's readahead (8 MiB here), 5.4 MB per token that
  measured the VM's readahead setting, not the expert format;
- `warm`: page-cache mode, the store read into the page cache before the run (misses are memcpys
  or computed in place from the mapped store);
- `resident`: a budget of 100 % (all experts in RAM).

Decoding is teacher-forced on seeded random ids (`bench.offload_common.decode_cpm2`): greedy
decoding of a random-weight model repeats one token and hence one expert set, which would let any
cache look perfect. Only decode steps are timed, after 4 untimed ones (`B*steps / t`). The systems
being compared alternate within each repeat; medians of `repeats`, each repeat's foreign CPU share
recorded. Quality: held-out exact match of the shipped demo model (float32) against its int8 copy,
scored as the server loads them (`training.demo.evaluate_model_dir`), and the random model's logit
error from the quantize report.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from bench.machine import CpuMeter, machine_info, publish
from bench.offload_common import (
    CACHE_ROOT,
    decode_cpm2,
    drop_page_cache,
    measure_read_bandwidth,
    model_files,
    read_through,
)
from bench.plots import pyplot, save
from bench.soak import proc_status
from engine.experts.store import STORE_DIR
from engine.offload import OffloadConfig, load_for_inference
from engine.summary import summarize
from engine.weights.loader import inspect_checkpoint
from engine.weights.quantize import quantize_model

#: Stored formats, in table order; `int8` is the float32 model quantised.
FORMATS = ("fp32", "bf16", "int8")
#: (format, mode) pairs each batch size runs, alternated within a repeat.
SYSTEMS = (
    ("fp32", "resident"),
    ("bf16", "resident"),
    ("int8", "resident"),
    ("fp32", "cold"),
    ("bf16", "cold"),
    ("int8", "cold"),
    ("fp32", "warm"),
    ("bf16", "warm"),
    ("int8", "warm"),
)
COLD_TARGET = 1.7  # int8 / bf16 tok/s, offloaded, cold disk tier
RESIDENT_TARGET = 1.0  # int8 / fp32 tok/s, resident
DROP_TARGET = 1.0  # max drop of demo exact match, points
NOISY_SHARE = 0.10  # other processes' share of the CPU above which a repeat is flagged


@dataclass
class QuantBenchConfig:
    preset: str = "small"
    overrides: tuple[str, ...] = ()
    batches: tuple[int, ...] = (1, 16)
    steps: int = 16
    repeats: int = 3
    budget_share: float = 0.10
    """Expert budget of every offloaded run, as a share of the bfloat16 model's expert bytes."""
    check_inputs: int = 8
    demo_dir: Path = Path("models/demo")
    demo_examples: int = 200
    work_root: Path = CACHE_ROOT
    out: Path = Path("bench/results/quant.json")
    plot: Path | None = Path("bench/results/quant.png")
    log: Callable[[str], object] = field(default=print, repr=False)


def _cpm2(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "cpm2", *args], check=True)


def build_models(cfg: QuantBenchConfig, work: Path) -> tuple[dict[str, Path], dict[str, Any]]:
    """The fp32, bf16 and int8 (from fp32) models under `work`, and the int8 quantize report."""
    paths = {name: work / name for name in FORMATS}
    for name, dtype in (("fp32", "float32"), ("bf16", "bfloat16")):
        args = ["init", "--preset", cfg.preset, "--out", str(paths[name]), "--dtype", dtype, "--seed", "0", "--quiet"]
        for override in cfg.overrides:
            args += ["--set", override]
        _cpm2(*args)
    report = quantize_model(paths["fp32"], paths["int8"], experts="int8", check_inputs=cfg.check_inputs, progress=False)
    return paths, report.to_dict()


def _reset_peak_rss() -> float:
    """Return memory to the OS and reset VmHWM (Linux `clear_refs` 5); the RSS it restarts from, MiB."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status_mib("VmRSS")


def _status_mib(key: str) -> float:
    return proc_status(Path("/proc/self")).get(key, float("nan")) / 1024


def decode_once(model_dir: Path, mode: str, batch: int, budget: int, cfg: QuantBenchConfig) -> dict[str, Any]:
    """Load `model_dir` in `mode`, decode `cfg.steps` teacher-forced steps, return the run's figures."""
    files = model_files(model_dir)
    if mode == "warm":
        read_through(files)
    rss_start = _reset_peak_rss()
    # Cold: strict mode; warm: page-cache mode (the store read into the page cache beforehand).
    options = {"direct_io": mode == "cold"}
    offload = OffloadConfig(expert_memory="100%" if mode == "resident" else budget, **options)
    meter = CpuMeter()
    meter.start()
    # Loaded in inference mode too: the int8 dequant path keeps a scratch buffer made during the
    # previous (inference-mode) decode, which calibration outside it may not write to.
    with torch.inference_mode():
        loaded = load_for_inference(model_dir, offload=offload, progress=False)
    try:
        plan = loaded.plan
        assert plan is not None  # every MoE model gets a plan
        if mode != "resident" and not loaded.is_offloaded:
            raise RuntimeError(f"{model_dir}: budget {budget} holds every expert; lower --budget-share")
        cold_files = model_files(model_dir / STORE_DIR) if mode == "cold" else ()
        run = decode_cpm2(loaded, batch=batch, steps=cfg.steps, cold_files=cold_files)
    finally:
        loaded.close()
    row = run.to_dict()
    row.pop("routing", None)
    experts = row.get("experts", {})
    row.update(
        peak_rss_mib=_status_mib("VmHWM"),
        rss_at_start_mib=rss_start,
        foreign_cpu_share=meter.foreign_share(),
        num_slots=plan.num_slots,
        bytes_per_expert=plan.bytes_per_expert,
        hit_rate=experts.get("hit_rate", 1.0),
        bytes_read_per_token=row.get("bytes_moved_per_token", 0.0),
    )
    return row


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ordered = sorted(runs, key=lambda r: r["tokens_per_second"])
    out = dict(ordered[len(ordered) // 2])
    out["tokens_per_second_all"] = [r["tokens_per_second"] for r in runs]
    shares = [r["foreign_cpu_share"] or 0.0 for r in runs]
    out["foreign_cpu_share_max"] = max(shares)
    out["is_noisy"] = max(shares) > NOISY_SHARE
    out["peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs)
    return out


def measure_decode(paths: dict[str, Path], budget: int, cfg: QuantBenchConfig) -> list[dict[str, Any]]:
    rows = []
    for batch in cfg.batches:
        runs: dict[tuple[str, str], list[dict[str, Any]]] = {s: [] for s in SYSTEMS}
        for repeat in range(cfg.repeats):
            for fmt, mode in SYSTEMS:
                cfg.log(f"  batch {batch} repeat {repeat + 1}: {fmt} {mode}")
                runs[(fmt, mode)].append(decode_once(paths[fmt], mode, batch, budget, cfg))
        rows += [{"format": f, "mode": m, "batch": batch, **_median(runs[(f, m)])} for f, m in SYSTEMS]
    return rows


def _tok_s(rows: list[dict[str, Any]], fmt: str, mode: str, batch: int) -> float:
    return next(r["tokens_per_second"] for r in rows if (r["format"], r["mode"], r["batch"]) == (fmt, mode, batch))


def targets(rows: list[dict[str, Any]], demo: dict[str, Any] | None, batches: Sequence[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, (base, mode, target) in {
        "int8_over_bf16_cold": ("bf16", "cold", COLD_TARGET),
        "int8_over_fp32_resident": ("fp32", "resident", RESIDENT_TARGET),
    }.items():
        for batch in batches:
            ratio = _tok_s(rows, "int8", mode, batch) / _tok_s(rows, base, mode, batch)
            out[f"{name}_batch{batch}"] = {"ratio": ratio, "target": target, "is_met": ratio >= target}
    if demo is not None:
        drop = demo["max_drop_points"]
        out["demo_max_drop_points"] = {"drop": drop, "target": DROP_TARGET, "is_met": drop <= DROP_TARGET}
    return out


def measure_demo(cfg: QuantBenchConfig, work: Path) -> dict[str, Any]:
    """Held-out exact match per task (each task's prompt) of the demo model and its int8 copy."""
    from training.demo import evaluate_model_dir

    int8_dir = work / "demo-int8"
    report = quantize_model(cfg.demo_dir, int8_dir, experts="int8", check_inputs=cfg.check_inputs, progress=False)
    shipped_path = cfg.demo_dir / "eval.json"
    shipped = json.loads(shipped_path.read_text()) if shipped_path.exists() else {}
    tasks = list(shipped.get("exact_match_with_prompt", {})) or sorted(
        p.stem for p in (cfg.demo_dir / "prompts").glob("*.safetensors")
    )
    scores = {}
    for name, model_dir in (("fp32", cfg.demo_dir), ("int8", int8_dir)):
        prompts: dict[str, Path | None] = {t: model_dir / "prompts" / f"{t}.safetensors" for t in tasks}
        cfg.log(f"  demo: scoring {name} on {cfg.demo_examples} examples per task")
        scores[name] = evaluate_model_dir(model_dir, prompts, num_examples=cfg.demo_examples)
    drops = {t: 100 * (scores["fp32"][t] - scores["int8"][t]) for t in tasks}
    return {
        "path": str(cfg.demo_dir),
        "num_examples_per_task": cfg.demo_examples,
        "metric": "exact_match_with_prompt",
        "fp32": scores["fp32"],
        "int8": scores["int8"],
        "drop_points": drops,
        "max_drop_points": max(drops.values()),
        "shipped_fp32": shipped.get("exact_match_with_prompt"),
        "logit_max_abs_diff": report.logit_max_abs_diff,
        "top1_agreement": report.top1_agreement,
        "num_check_inputs": report.num_inputs,
    }


def run(cfg: QuantBenchConfig) -> dict[str, Any]:
    cfg.work_root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(cfg.work_root).free
    if free < 4 << 30:
        raise RuntimeError(f"{cfg.work_root}: {free / 2**30:.1f} GiB free, the models need ~2.5 GiB")
    work = Path(tempfile.mkdtemp(prefix="quant-", dir=cfg.work_root))
    report: dict[str, Any] = {
        "benchmark": "quant",
        "config": {k: v for k, v in asdict(cfg).items() if k != "log"},
        "machine": machine_info(),
        "work_dir": str(work),
    }
    try:
        cfg.log(f"building {cfg.preset} in fp32 and bf16, quantising fp32 to int8 under {work}")
        paths, quant_report = build_models(cfg, work)
        models = {}
        for name, path in paths.items():
            info = inspect_checkpoint(path)
            summary = summarize(info.config, info.stored_dtype).to_dict()
            expert_files = model_files(path / "experts")
            models[name] = {
                "summary": summary,
                "stored_dtype": str(info.stored_dtype).removeprefix("torch."),
                "expert_store_bytes": sum(p.stat().st_size for p in expert_files),
            }
        budget = int(cfg.budget_share * models["bf16"]["summary"]["expert_bytes"])
        report.update(
            models=models, budget_bytes=budget, budget_rule=f"{cfg.budget_share:.0%} of the bf16 expert bytes"
        )
        report["read_bandwidth_gb_s"] = measure_read_bandwidth(model_files(paths["bf16"] / "experts"), readers=4)
        report["decode"] = measure_decode(paths, budget, cfg)
        report["quality"] = {
            "random": {
                "model": cfg.preset,
                "num_inputs": quant_report["num_inputs"],
                "logit_max_abs_diff": quant_report["logit_max_abs_diff"],
                "top1_agreement": quant_report["top1_agreement"],
                "weight_max_abs": quant_report["max_abs"],
                "weight_mean_abs": quant_report["mean_abs"],
            }
        }
        demo = measure_demo(cfg, work) if cfg.demo_examples > 0 else None
        report["quality"]["demo"] = demo
        report["targets"] = targets(report["decode"], demo, cfg.batches)
        for path in paths.values():
            drop_page_cache(model_files(path))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        report["work_dir_deleted"] = not work.exists()
    return report


def print_report(report: dict[str, Any], console: Console) -> None:
    budget = report["budget_bytes"]
    table = Table(title="stored formats (the budget of every offloaded run: " + report["budget_rule"] + ")")
    for col in ("format", "stored as", "MiB/expert", "expert MiB", "store MiB", "experts / budget"):
        table.add_column(col, justify="right")
    by_format = {r["format"]: r for r in report["decode"] if r["mode"] == "cold"}
    for name, m in report["models"].items():
        per_expert = by_format[name]["bytes_per_expert"] if name in by_format else m["summary"]["bytes_per_expert"]
        num_experts = m["summary"]["expert_bytes"] / m["summary"]["bytes_per_expert"]
        table.add_row(
            name,
            m["stored_dtype"] + (" + int8 experts" if name == "int8" else ""),
            f"{per_expert / 2**20:.2f}",
            f"{per_expert * num_experts / 2**20:.0f}",
            f"{m['expert_store_bytes'] / 2**20:.0f}",
            f"{per_expert * num_experts / budget:.1f}x",
        )
    console.print(table)
    table = Table(title=f"decode tok/s (teacher-forced, budget {budget / 2**20:.1f} MiB; median of repeats)")
    columns = ("batch", "mode", "format", "tok/s", "all repeats", "MB read/tok", "disk MB/tok", "hit", "slots")
    for col in (*columns, "peak RSS MiB", "noisy"):
        table.add_column(col, justify="right")
    for r in report["decode"]:
        table.add_row(
            str(r["batch"]),
            r["mode"],
            r["format"],
            f"{r['tokens_per_second']:.1f}",
            " ".join(f"{v:.0f}" for v in r["tokens_per_second_all"]),
            f"{r['bytes_read_per_token'] / 1e6:.2f}",
            f"{r['storage_bytes_per_token'] / 1e6:.2f}",
            f"{r['hit_rate']:.2f}",
            str(r["num_slots"]) if r["mode"] != "resident" else "all",
            f"{r['peak_rss_mib']:.0f}",
            f"{r['foreign_cpu_share_max']:.0%}" + (" !" if r["is_noisy"] else ""),
        )
    console.print(table)
    quality = report["quality"]
    rnd = quality["random"]
    console.print(
        f"random {rnd['model']} model, int8 vs fp32 on {rnd['num_inputs']} inputs: logits max abs diff "
        f"{rnd['logit_max_abs_diff']:.3g}, top-1 agreement {100 * rnd['top1_agreement']:.1f} %; "
        f"weights max abs error {rnd['weight_max_abs']:.3g}, mean {rnd['weight_mean_abs']:.3g}"
    )
    demo = quality.get("demo")
    if demo:
        table = Table(title=f"demo model, held-out exact match ({demo['num_examples_per_task']} per task, prompts)")
        for col in ("task", "fp32", "int8", "drop (points)", "shipped fp32"):
            table.add_column(col, justify="right")
        for task, fp in demo["fp32"].items():
            shipped = (demo["shipped_fp32"] or {}).get(task)
            table.add_row(
                task,
                f"{100 * fp:.1f}",
                f"{100 * demo['int8'][task]:.1f}",
                f"{demo['drop_points'][task]:+.1f}",
                "" if shipped is None else f"{100 * shipped:.1f}",
            )
        console.print(table)
    table = Table(title="targets")
    for col in ("target", "value", "needs", "met"):
        table.add_column(col, justify="right")
    for name, t in report["targets"].items():
        value = t.get("ratio", t.get("drop"))
        needs = f"<= {t['target']:.1f} points" if "drop" in t else f">= {t['target']:.2f}x"
        table.add_row(name, f"{value:.2f}", needs, "met" if t["is_met"] else "NOT met")
    console.print(table)


def write_plot(report: dict[str, Any], path: Path) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    rows = report["decode"]
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4), squeeze=False)
    modes = ("resident", "warm", "cold")
    for ax, batch in zip(axes[0], batches, strict=True):
        for i, fmt in enumerate(FORMATS):
            ys = [_tok_s(rows, fmt, mode, batch) for mode in modes]
            ax.bar([m + (i - 1) * 0.27 for m in range(len(modes))], ys, width=0.27, label=fmt)
        ax.set_xticks(range(len(modes)), list(modes))
        ax.set_ylabel("decode tok/s")
        ax.set_title(f"batch {batch}")
        ax.legend(fontsize=8)
    fig.suptitle(f"cpm2 float vs int8 experts, same budget ({report['budget_rule']}), 2-core CPU")
    return save(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 repeat, 8 steps, 50 demo examples per task")
    parser.add_argument("--preset", default=QuantBenchConfig.preset)
    parser.add_argument("--set", action="append", default=[], dest="overrides", help="cpm2 init override")
    parser.add_argument("--repeats", type=int, default=QuantBenchConfig.repeats)
    parser.add_argument("--steps", type=int, default=QuantBenchConfig.steps)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--budget-share", type=float, default=QuantBenchConfig.budget_share)
    parser.add_argument("--demo-examples", type=int, default=QuantBenchConfig.demo_examples)
    parser.add_argument("--demo-dir", type=Path, default=QuantBenchConfig.demo_dir)
    parser.add_argument("--work-root", type=Path, default=QuantBenchConfig.work_root)
    parser.add_argument("--out", type=Path, default=QuantBenchConfig.out)
    parser.add_argument("--plot", type=Path, default=QuantBenchConfig.plot)
    args = parser.parse_args(argv)
    cfg = QuantBenchConfig(
        preset=args.preset,
        overrides=tuple(args.overrides),
        batches=tuple(int(b) for b in args.batches.split(",")),
        steps=args.steps,
        repeats=args.repeats,
        budget_share=args.budget_share,
        demo_dir=args.demo_dir,
        demo_examples=args.demo_examples,
        work_root=args.work_root,
        out=args.out,
        plot=args.plot,
    )
    if args.quick:
        cfg.repeats, cfg.steps, cfg.demo_examples = 1, 8, min(cfg.demo_examples, 50)
        cfg.out, cfg.plot = cfg.out.with_suffix(".quick.json"), None
    begin = time.time()
    report = run(cfg)
    report["wall_seconds"] = time.time() - begin
    publish(report, out=cfg.out, plot=cfg.plot, show=print_report, draw=write_plot, width=150)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
