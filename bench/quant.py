"""Float experts (as stored) against int8 and int4 experts: one model, one expert budget, one run.

    python -m bench.quant            # full run (~4 min on 2 cores); --quick writes quant.quick.json

The model is `cpm2 init --preset small` (6 + 6 MoE blocks of 16 gated-GELU experts, d_model 512,
d_ff 1024), written in float32 and in bfloat16 from the same seed, and the float32 copy quantised
with `cpm2 quantize --experts int8` (per-row int8, `engine.model.quant`) and `--experts int4`
(groups of 64 inputs, packed for this machine's int4 kernel, `engine.model.int4`), each also with
`--dense int8` (`int8+d8`, `int4+d8`: every dense matmul in int8 too, as a user who quantises the
whole model runs it). All six live in a temporary directory under `.cache/bench/` that is deleted at
the end. Each decodes in the dtype of its dense weights (the quantised models in float32 through their
kernels, see bench/int8_kernels.py).

Every offloaded run gets the same budget in bytes: `--budget-share` (10 %) of the bfloat16 experts,
so the float32 experts are 20x, the bfloat16 10x, the int8 5x and the int4 2.8x the pool (at 25 %
the int8 pool holds almost every decoder expert and a cold run barely reads:
results/quant_budget25.json). Modes:
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
int4 copies at every group size and both with int8 dense matmuls, scored as the server loads them
(`training.demo.evaluate_model_dir`), and the random model's logit error from the quantize reports.
"""

from __future__ import annotations

import argparse
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

from bench.machine import CpuMeter, machine_info, publish, reset_peak_rss
from bench.offload_common import (
    CACHE_ROOT,
    decode_cpm2,
    drop_page_cache,
    measure_read_bandwidth,
    model_files,
    read_through,
    store_files,
)
from bench.quant_report import print_report, tok_s, write_plot
from bench.soak import proc_status
from engine.model.int4 import DEFAULT_GROUP_SIZE, GROUP_SIZES
from engine.offload import OffloadConfig, load_for_inference
from engine.summary import summarize
from engine.weights.loader import inspect_checkpoint
from engine.weights.quantize import quantize_model

#: The float32 model quantised: format -> (`cpm2 quantize --experts`, `--dense`). `+d8` is the same
#: experts with every dense matmul in int8 as well (quantised when the model loads): at batch 1 the
#: dense weights bound the step (EPYC VM, 2026-12-07: resident int8 299 tok/s, with int8 dense 435).
QUANTIZED: dict[str, tuple[str, str | None]] = {
    "int8": ("int8", None),
    "int4": ("int4", None),
    "int8+d8": ("int8", "int8"),
    "int4+d8": ("int4", "int8"),
}
#: Stored formats, in table order.
FORMATS = ("fp32", "bf16", *QUANTIZED)
#: (format, mode) pairs each batch size runs, alternated within a repeat.
SYSTEMS = tuple((fmt, mode) for mode in ("resident", "cold", "warm") for fmt in FORMATS)
#: Quantised / baseline tok/s: offloaded from a cold disk tier against the 16-bit run, and resident
#: against float32 (not slower).
COLD_TARGETS = {"int8": 1.7, "int4": 2.5}
RESIDENT_TARGET = 1.0
#: Max drop of the demo model's held-out exact match, points (int4 at the default group size).
DROP_TARGETS = {"int8": 1.0, "int4": 3.0}
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


def _quantize(
    src: Path, dst: Path, fmt: str, check_inputs: int, group_size: int = DEFAULT_GROUP_SIZE, dense: str | None = None
) -> Any:
    """`cpm2 quantize --experts int8|int4 [--dense int8]` (int4 packed for this machine's kernel); the report."""
    group = {"group_size": group_size} if fmt == "int4" else {}
    return quantize_model(src, dst, experts=fmt, dense=dense, check_inputs=check_inputs, progress=False, **group)


def build_models(cfg: QuantBenchConfig, work: Path) -> tuple[dict[str, Path], dict[str, dict[str, Any]]]:
    """The fp32 and bf16 models and the quantised copies of fp32 under `work`; the quantize reports."""
    paths = {name: work / name for name in FORMATS}
    for name, dtype in (("fp32", "float32"), ("bf16", "bfloat16")):
        args = ["init", "--preset", cfg.preset, "--out", str(paths[name]), "--dtype", dtype, "--seed", "0", "--quiet"]
        for override in cfg.overrides:
            args += ["--set", override]
        _cpm2(*args)
    reports = {
        name: _quantize(paths["fp32"], paths[name], experts, cfg.check_inputs, dense=dense).to_dict()
        for name, (experts, dense) in QUANTIZED.items()
    }
    return paths, reports


def _status_mib(key: str) -> float:
    return proc_status(Path("/proc/self")).get(key, float("nan")) / 1024


def decode_once(model_dir: Path, mode: str, batch: int, budget: int, cfg: QuantBenchConfig) -> dict[str, Any]:
    """Load `model_dir` in `mode`, decode `cfg.steps` teacher-forced steps, return the run's figures."""
    files = model_files(model_dir)
    if mode == "warm":
        read_through(files)
    reset_peak_rss()
    rss_start = _status_mib("VmRSS")
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
        cold_files = store_files(model_dir) if mode == "cold" else ()
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


def targets(rows: list[dict[str, Any]], demo: dict[str, Any] | None, batches: Sequence[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for fmt, (experts, _) in QUANTIZED.items():
        for name, (base, mode, target) in {
            f"{fmt}_over_bf16_cold": ("bf16", "cold", COLD_TARGETS[experts]),
            f"{fmt}_over_fp32_resident": ("fp32", "resident", RESIDENT_TARGET),
        }.items():
            for batch in batches:
                ratio = tok_s(rows, fmt, mode, batch) / tok_s(rows, base, mode, batch)
                out[f"{name}_batch{batch}"] = {"ratio": ratio, "target": target, "is_met": ratio >= target}
    if demo is not None:
        for fmt, (experts, dense) in QUANTIZED.items():
            variant = demo_variant(experts, DEFAULT_GROUP_SIZE if experts == "int4" else 0, dense)
            drop = demo["max_drop_points"][variant]
            target = DROP_TARGETS[experts]
            out[f"demo_{fmt}_max_drop_points"] = {"drop": drop, "target": target, "is_met": drop <= target}
    return out


def demo_variant(experts: str, group_size: int, dense: str | None) -> str:
    """The demo copy's name: `int8`, `int4-g64`, and `+d8` where the dense matmuls are int8 too."""
    return experts + (f"-g{group_size}" if group_size else "") + ("+d8" if dense == "int8" else "")


#: The demo model's quantised copies, name -> (experts, group size, dense): int8, int4 at every group
#: size (which one recovers what), and both with int8 dense matmuls at the default group size.
DEMO_VARIANTS = {
    demo_variant(experts, group_size, dense): (experts, group_size, dense)
    for experts, group_size, dense in (
        ("int8", 0, None),
        *(("int4", g, None) for g in GROUP_SIZES),
        ("int8", 0, "int8"),
        ("int4", DEFAULT_GROUP_SIZE, "int8"),
    )
}


def measure_demo(cfg: QuantBenchConfig, work: Path) -> dict[str, Any]:
    """Held-out exact match per task (each task's prompt) of the demo model and its quantised copies."""
    from training.demo import evaluate_model_dir

    dirs = {"fp32": cfg.demo_dir}
    reports = {}
    for variant, (fmt, group_size, dense) in DEMO_VARIANTS.items():
        dirs[variant] = work / f"demo-{variant}"
        report = _quantize(cfg.demo_dir, dirs[variant], fmt, cfg.check_inputs, group_size or DEFAULT_GROUP_SIZE, dense)
        reports[variant] = {
            "logit_max_abs_diff": report.logit_max_abs_diff,
            "top1_agreement": report.top1_agreement,
            "expert_bytes": report.expert_bytes_after,
        }
    shipped_path = cfg.demo_dir / "eval.json"
    shipped = json.loads(shipped_path.read_text()) if shipped_path.exists() else {}
    tasks = list(shipped.get("exact_match_with_prompt", {})) or sorted(
        p.stem for p in (cfg.demo_dir / "prompts").glob("*.safetensors")
    )
    scores = {}
    for name, model_dir in dirs.items():
        prompts: dict[str, Path | None] = {t: model_dir / "prompts" / f"{t}.safetensors" for t in tasks}
        cfg.log(f"  demo: scoring {name} on {cfg.demo_examples} examples per task")
        scores[name] = evaluate_model_dir(model_dir, prompts, num_examples=cfg.demo_examples)
    drops = {v: {t: 100 * (scores["fp32"][t] - scores[v][t]) for t in tasks} for v in DEMO_VARIANTS}
    return {
        "path": str(cfg.demo_dir),
        "num_examples_per_task": cfg.demo_examples,
        "metric": "exact_match_with_prompt",
        "scores": scores,
        "drop_points": drops,
        "max_drop_points": {v: max(d.values()) for v, d in drops.items()},
        "shipped_fp32": shipped.get("exact_match_with_prompt"),
        "check_inputs": {"num_inputs": cfg.check_inputs, **reports},
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
        cfg.log(f"building {cfg.preset} in fp32 and bf16, quantising fp32 to {', '.join(QUANTIZED)} under {work}")
        paths, quant_reports = build_models(cfg, work)
        models = {}
        for name, path in paths.items():
            info = inspect_checkpoint(path)
            summary = summarize(info.config, info.stored_dtype).to_dict()
            expert_files = store_files(path)
            models[name] = {
                "summary": summary,
                "stored_dtype": str(info.stored_dtype).removeprefix("torch."),
                "expert_store_bytes": sum(p.stat().st_size for p in expert_files),
            }
        budget = int(cfg.budget_share * models["bf16"]["summary"]["expert_bytes"])
        report.update(
            models=models, budget_bytes=budget, budget_rule=f"{cfg.budget_share:.0%} of the bf16 expert bytes"
        )
        report["read_bandwidth_gb_s"] = measure_read_bandwidth(store_files(paths["bf16"]), readers=4)
        report["decode"] = measure_decode(paths, budget, cfg)
        report["quality"] = {
            "random": {
                fmt: {
                    "model": cfg.preset,
                    "num_inputs": r["num_inputs"],
                    "logit_max_abs_diff": r["logit_max_abs_diff"],
                    "top1_agreement": r["top1_agreement"],
                    "weight_max_abs": r["max_abs"],
                    "weight_mean_abs": r["mean_abs"],
                }
                for fmt, r in quant_reports.items()
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
