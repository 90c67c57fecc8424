"""`cpm2 plot`: loss / accuracy curves against the optimizer step from training metrics logs.

Reads the JSONL logs the trainer writes (`output_dir/metrics.jsonl`: one line per logging step with
`loss`, `accuracy`, …, and one per eval with `eval_<name>` keys) and overlays one curve per run and
metric. A metric may be a glob (`eval_acc/*`) to draw every matching key, e.g. each task's accuracy.
Uses matplotlib's Agg backend: no display is needed.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot is imported: headless machines and CI have no display
import matplotlib.pyplot as plt

from engine.errors import ConfigError, InputError

__all__ = ["Curve", "add_plot_command", "plot_metrics", "read_curves"]


@dataclass(frozen=True)
class Curve:
    """One metric of one run: steps and values, in log order."""

    label: str
    metric: str
    steps: list[int]
    values: list[float]


def _read_records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise ConfigError(f"metrics log {path} does not exist; pass the metrics.jsonl a training run wrote")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}:{number}: not a JSON line ({err.msg})") from None
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def read_curves(path: Path, metrics: Sequence[str], *, label: str) -> list[Curve]:
    """The curves of `metrics` (names or globs) in the log at `path`; missing metrics give none."""
    records = _read_records(path)
    keys = sorted({k for r in records for k, v in r.items() if k != "step" and isinstance(v, int | float)})
    curves = []
    for pattern in metrics:
        for key in [k for k in keys if fnmatch.fnmatchcase(k, pattern)]:
            # A resumed run's log was truncated at the checkpoint, so steps are increasing; keep the
            # last value of a repeated step anyway (a log appended to by hand).
            by_step = {r["step"]: float(r[key]) for r in records if isinstance(r.get(key), int | float)}
            points = [(s, v) for s, v in sorted(by_step.items()) if math.isfinite(v)]
            curves.append(Curve(label, key, [s for s, _ in points], [v for _, v in points]))
    return curves


def plot_metrics(
    paths: Sequence[Path],
    out: Path,
    *,
    metrics: Sequence[str] = ("loss",),
    labels: Sequence[str] | None = None,
    title: str | None = None,
    log_y: bool = False,
) -> list[Curve]:
    """Draw `metrics` of every log in `paths` into the PNG `out` (one panel per metric pattern).

    Raises:
        ConfigError: If labels and paths differ in number, or no log holds any of the metrics.
    """
    if not paths:
        raise ConfigError("no metrics logs given; pass at least one metrics.jsonl")
    if labels is not None and len(labels) != len(paths):
        raise ConfigError(f"{len(labels)} labels for {len(paths)} logs; give one label per log or none")
    names = list(labels) if labels is not None else [_default_label(p) for p in paths]
    fig, axes = plt.subplots(len(metrics), 1, figsize=(7, 3.6 * len(metrics)), squeeze=False)
    drawn: list[Curve] = []
    try:
        for axis, pattern in zip(axes[:, 0], metrics, strict=True):
            panel = [
                c for path, name in zip(paths, names, strict=True) for c in read_curves(path, [pattern], label=name)
            ]
            for curve in panel:
                several = len({c.metric for c in panel}) > 1
                legend = f"{curve.label}: {curve.metric}" if several else curve.label
                axis.plot(curve.steps, curve.values, marker="." if len(curve.steps) < 30 else None, label=legend)
            axis.set_xlabel("step")
            axis.set_ylabel(pattern)
            if log_y:
                axis.set_yscale("log")
            axis.grid(alpha=0.3)
            if panel:
                axis.legend(fontsize="small")
            drawn += panel
        if not drawn:
            raise ConfigError(f"none of {', '.join(map(str, paths))} has a metric matching {', '.join(metrics)}")
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=120)
    finally:
        plt.close(fig)
    return drawn


def _default_label(path: Path) -> str:
    # `runs/ki/metrics.jsonl` is labelled `ki`: the run directory names the run.
    return path.parent.name if path.name == "metrics.jsonl" and path.parent.name else path.stem


def cmd_plot(args: argparse.Namespace) -> int:
    curves = plot_metrics(
        args.logs, args.out, metrics=args.metric or ["loss"], labels=args.labels, title=args.title, log_y=args.log_y
    )
    for curve in curves:
        last = f"{curve.values[-1]:.4g} at step {curve.steps[-1]}"
        print(f"{curve.label} {curve.metric}: {len(curve.steps)} points, last {last}")
    print(f"wrote {args.out}")
    return 0


def add_plot_command(subparsers: Any) -> None:
    """``cpm2 plot`` (a top-level command: it reads any run's log)."""
    p = subparsers.add_parser(
        "plot",
        help="plot loss/accuracy curves from training metrics logs (PNG)",
        description="Overlay metrics of one or more training runs (metrics.jsonl) against the step.",
    )
    p.add_argument("logs", nargs="+", type=Path, metavar="METRICS.jsonl", help="metrics logs of training runs")
    p.add_argument("--out", required=True, type=Path, metavar="PNG", help="image to write")
    p.add_argument(
        "--metric",
        action="append",
        metavar="NAME",
        help="metric or glob (eval_acc/*) to plot, one panel each; repeatable (default: loss)",
    )
    p.add_argument("--labels", nargs="+", metavar="LABEL", help="one legend label per log (default: run dir)")
    p.add_argument("--title", default=None, help="figure title")
    p.add_argument("--log-y", action="store_true", help="logarithmic y axis")
    p.set_defaults(handler=cmd_plot)
