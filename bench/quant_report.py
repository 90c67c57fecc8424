"""Tables and plot of `python -m bench.quant` (float against int8 and int4 experts, one budget)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.plots import pyplot, save

_QUANTIZED_LABEL = {
    "int8": " + int8 experts",
    "int4": " + int4 experts (groups of 64)",
    "int8+d8": " + int8 experts, int8 dense",
    "int4+d8": " + int4 experts (groups of 64), int8 dense",
}


def tok_s(rows: list[dict[str, Any]], fmt: str, mode: str, batch: int) -> float:
    return next(r["tokens_per_second"] for r in rows if (r["format"], r["mode"], r["batch"]) == (fmt, mode, batch))


def _print_formats(report: dict[str, Any], console: Console) -> None:
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
            m["stored_dtype"] + _QUANTIZED_LABEL.get(name, ""),
            f"{per_expert / 2**20:.2f}",
            f"{per_expert * num_experts / 2**20:.0f}",
            f"{m['expert_store_bytes'] / 2**20:.0f}",
            f"{per_expert * num_experts / budget:.1f}x",
        )
    console.print(table)


def _print_decode(report: dict[str, Any], console: Console) -> None:
    table = Table(title=f"decode tok/s (teacher-forced, budget {report['budget_bytes'] / 2**20:.1f} MiB; median)")
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


def _print_quality(report: dict[str, Any], console: Console) -> None:
    quality = report["quality"]
    for fmt, rnd in quality["random"].items():
        console.print(
            f"random {rnd['model']} model, {fmt} vs fp32 on {rnd['num_inputs']} inputs: logits max abs diff "
            f"{rnd['logit_max_abs_diff']:.3g}, top-1 agreement {100 * rnd['top1_agreement']:.1f} %; "
            f"weights max abs error {rnd['weight_max_abs']:.3g}, mean {rnd['weight_mean_abs']:.3g}"
        )
    demo = quality.get("demo")
    if not demo:
        return
    variants = list(demo["drop_points"])
    table = Table(title=f"demo model, held-out exact match ({demo['num_examples_per_task']} per task, prompts)")
    for col in ("task", "fp32", *variants, "shipped fp32"):
        table.add_column(col, justify="right")
    scores = demo["scores"]
    for task, fp in scores["fp32"].items():
        shipped = (demo["shipped_fp32"] or {}).get(task)
        table.add_row(
            task,
            f"{100 * fp:.1f}",
            *(f"{100 * scores[v][task]:.1f} ({-demo['drop_points'][v][task]:+.1f})" for v in variants),
            "" if shipped is None else f"{100 * shipped:.1f}",
        )
    checks = demo["check_inputs"]
    table.add_row(
        "top-1 agree",
        "",
        *(f"{100 * checks[v]['top1_agreement']:.1f} %" for v in variants),
        "",
    )
    console.print(table)


def print_report(report: dict[str, Any], console: Console) -> None:
    _print_formats(report, console)
    _print_decode(report, console)
    _print_quality(report, console)
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
    formats = list(report["models"])
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4), squeeze=False)
    modes = ("resident", "warm", "cold")
    width = 0.8 / len(formats)
    for ax, batch in zip(axes[0], batches, strict=True):
        for i, fmt in enumerate(formats):
            ys = [tok_s(rows, fmt, mode, batch) for mode in modes]
            offset = (i - (len(formats) - 1) / 2) * width
            ax.bar([m + offset for m in range(len(modes))], ys, width=width, label=fmt)
        ax.set_xticks(range(len(modes)), list(modes))
        ax.set_ylabel("decode tok/s")
        ax.set_title(f"batch {batch}")
        ax.legend(fontsize=8)
    fig.suptitle(f"cpm2 float vs int8 / int4 experts, same budget ({report['budget_rule']}), 2-core CPU")
    return save(fig, path)
