"""Bounded offloaded decoding, this tree against a baseline revision, in one run.

    python -m bench.offload_ab --baseline REV          # ~15 min on 2 cores with the defaults

What the budgets and prediction work is judged by: strict mode (O_DIRECT, RAM holds only the pool)
at a 25 % expert budget, the expert store dropped from the page cache before every decode step, so
every miss is a disk read; teacher-forced decode steps at batch 1 and 16 (`bench.offload_common`).
The baseline is a git worktree of `REV` (made under `.cache/bench/`, removed afterwards). Each
repeat runs one child process per tree and model, the trees alternating, so the disk's and the
VM's drift over the run falls on both alike; the table gives each side's median and the median of
the per-repeat ratios (this tree / baseline). The models are built once by this tree and read by
both (the store format is the same).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.machine import machine_info, publish

ROOT = Path(__file__).resolve().parent.parent
WORKTREES = Path(".cache/bench")


@dataclass
class OffloadABConfig:
    baseline: str = "HEAD"
    models: tuple[str, ...] = ("switch", "cpm2")
    batches: tuple[int, ...] = (1, 16)
    budget: str = "25%"
    steps: int = 16
    repeats: int = 7
    out: Path = Path("bench/results/offload_ab.json")


def _child(model_dir: Path, batches: Sequence[int], budget: str, steps: int) -> dict[str, float]:
    """Runs inside either tree (its `bench.offload_common` and engine): tok/s per batch."""
    from bench.offload_common import decode_cpm2, load_cpm2, model_files

    files = model_files(model_dir / "experts")  # the store only: see store_files
    out = {}
    for batch in batches:
        loaded = load_cpm2(model_dir, budget=budget, direct_io=True)
        try:
            out[str(batch)] = decode_cpm2(loaded, batch=batch, steps=steps, cold_files=files).tokens_per_second
        finally:
            loaded.close()
    return out


def _worktree(rev: str) -> Path:
    commit = subprocess.check_output(["git", "rev-parse", "--short", rev], cwd=ROOT, text=True).strip()
    path = (ROOT / WORKTREES / f"ab-{commit}").resolve()
    if not path.exists():
        subprocess.check_call(["git", "worktree", "add", "--detach", str(path), commit], cwd=ROOT)
    return path


def _run_child(tree: Path, model_dir: Path, cfg: OffloadABConfig) -> dict[str, float]:
    """This file's `_child` with `tree`'s packages first on the path (this script's own folder,
    `bench/`, holds no `bench` package, so `bench.*` and `engine.*` resolve in `tree`)."""
    args = [sys.executable, __file__, "--child", str(model_dir), "--budget", cfg.budget, "--steps", str(cfg.steps)]
    args += ["--batches", *map(str, cfg.batches)]
    done = subprocess.run(
        args, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True, text=True, check=True
    )
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def run(cfg: OffloadABConfig, log: Any = print) -> dict[str, Any]:
    from bench.offload import MODELS

    baseline = _worktree(cfg.baseline)
    trees = {"baseline": baseline, "this tree": ROOT}
    report: dict[str, Any] = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "baseline_commit": baseline.name.removeprefix("ab-"),
        "this_commit": subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip(),
        "machine": machine_info(),
        "runs": [],
    }
    # A bench model by name, or any model directory (e.g. a `cpm2 quantize` copy) by its path; the
    # names come first, since a name may also be a folder here (`cpm2/` is a package).
    models = {name: (MODELS[name]() if name in MODELS else Path(name)).resolve() for name in cfg.models}
    try:
        for repeat in range(cfg.repeats):
            for name, model_dir in models.items():
                for side, tree in trees.items():
                    log(f"repeat {repeat + 1}/{cfg.repeats}: {name}, {side}")
                    report["runs"].append({"model": name, "side": side, **_run_child(tree, model_dir, cfg)})
    finally:
        subprocess.call(["git", "worktree", "remove", "--force", str(baseline)], cwd=ROOT)
    report["summary"] = _summarize(report["runs"], cfg)
    return report


def _summarize(runs: list[dict[str, Any]], cfg: OffloadABConfig) -> list[dict[str, Any]]:
    rows = []
    for name in cfg.models:
        for batch in map(str, cfg.batches):
            base = [r[batch] for r in runs if r["model"] == name and r["side"] == "baseline"]
            this = [r[batch] for r in runs if r["model"] == name and r["side"] == "this tree"]
            ratios = [t / b for t, b in zip(this, base, strict=True)]
            rows.append(
                {
                    "model": name,
                    "batch": int(batch),
                    "baseline_tokens_per_second": statistics.median(base),
                    "this_tokens_per_second": statistics.median(this),
                    "ratio_median": statistics.median(ratios),
                    "ratio_min": min(ratios),
                    "ratio_max": max(ratios),
                }
            )
    return rows


def print_report(report: dict[str, Any], console: Console) -> None:
    cfg = report["config"]
    table = Table(
        title=f"strict {cfg['budget']}, cold disk: {report['this_commit']} against {report['baseline_commit']} "
        f"({cfg['repeats']} alternating repeats)"
    )
    for col in ("model", "batch", "baseline tok/s", "this tok/s", "ratio (median)", "ratio range"):
        table.add_column(col, justify="right")
    for r in report["summary"]:
        table.add_row(
            r["model"],
            str(r["batch"]),
            f"{r['baseline_tokens_per_second']:.1f}",
            f"{r['this_tokens_per_second']:.1f}",
            f"{r['ratio_median']:.2f}x",
            f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f}",
        )
    console.print(table)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=OffloadABConfig.baseline, help="git revision to compare with")
    parser.add_argument(
        "--models", nargs="+", default=list(OffloadABConfig.models), help="bench model names or model directories"
    )
    parser.add_argument("--batches", nargs="+", type=int, default=list(OffloadABConfig.batches))
    parser.add_argument("--budget", default=OffloadABConfig.budget)
    parser.add_argument("--steps", type=int, default=OffloadABConfig.steps)
    parser.add_argument("--repeats", type=int, default=OffloadABConfig.repeats)
    parser.add_argument("--quick", action="store_true", help="one model, batch 1, 2 repeats")
    parser.add_argument("--out", type=Path, default=OffloadABConfig.out)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(_child(args.child, args.batches, args.budget, args.steps)))
        return 0
    cfg = OffloadABConfig(
        baseline=args.baseline,
        models=tuple(args.models),
        batches=tuple(args.batches),
        budget=args.budget,
        steps=args.steps,
        repeats=args.repeats,
        out=args.out,
    )
    if args.quick:
        cfg = OffloadABConfig(
            baseline=args.baseline,
            models=("cpm2",),
            batches=(1,),
            steps=8,
            repeats=2,
            out=args.out.with_suffix(".quick.json"),
        )
    report = run(cfg)
    publish(report, out=cfg.out, plot=None, show=print_report, draw=lambda r, p: None, width=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
