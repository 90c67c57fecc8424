"""The table and bar plot of a `bench.decode_vs_hf` report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.plots import pyplot, save


def _machine_line(report: dict[str, Any]) -> str:
    m = report["machine"]
    return (
        f"{m['cpu_model']}, {m['usable_cpus']} cores usable ({m['logical_cpus']} logical), "
        f"{m['memory_gib']} GiB; torch {m['torch']} ({m['torch_num_threads']} threads), "
        f"transformers {m['transformers']}; dtype {report['config']['dtype']}"
    )


def _model_line(report: dict[str, Any]) -> str:
    model = report["config"]["model"]
    return f"{model['name']}, random weights"


#: `weight_bytes_per_step` parts, in print order.
_PARTS = {
    "self_attention": "self-attention",
    "cross_attention_q_o": "cross q/o",
    "dense_ffn": "dense FFNs",
    "routers": "routers",
    "experts": "experts",
    "lm_head": "output head",
}


def _parts_line(step_bytes: dict[str, float]) -> str:
    total = step_bytes["total"]
    return ", ".join(
        f"{label} {step_bytes[key] / 1e6:.1f} ({step_bytes[key] / total:.0%})"
        for key, label in _PARTS.items()
        if step_bytes.get(key)
    )


def print_report(report: dict[str, Any], console: Console) -> None:
    """Throughput table per batch size, then the bandwidth analysis of batch 1."""
    cfg = report["config"]
    table = Table(
        title=(
            f"Decode tokens/s, cpm2 vs HF transformers: {_model_line(report)} "
            f"(N={cfg['new_tokens']}, {cfg['repeats']} repeats)"
        ),
        caption=_machine_line(report),
    )
    int8 = "target_int8" in report
    for column in ("batch", "HF med", "HF best", "cpm2 med", "cpm2 best", "ratio med", "ratio best"):
        table.add_column(column, justify="right")
    table.add_column("same tokens", justify="right")
    if int8:
        for column in ("cpm2 int8 med", "int8 ratio med", "int8 same tokens"):
            table.add_column(column, justify="right")
    for r in report["results"]:
        hf, cpm2 = r["hf"], r["cpm2"]
        int8_cells = (
            (
                f"{r['cpm2_int8']['median_tokens_per_s']:.1f}",
                f"[bold]{r['ratio_int8_median']:.2f}×[/bold]",
                f"{r['int8_tokens']['same_position_fraction']:.0%}",
            )
            if int8
            else ()
        )
        table.add_row(
            str(r["batch_size"]),
            f"{hf['median_tokens_per_s']:.1f}",
            f"{hf['best_tokens_per_s']:.1f}",
            f"{cpm2['median_tokens_per_s']:.1f}",
            f"{cpm2['best_tokens_per_s']:.1f}",
            f"[bold]{r['ratio_median']:.2f}×[/bold]",
            f"{r['ratio_best']:.2f}×",
            f"{'yes' if r['tokens_match'] else 'NO'} ({r['num_compared_tokens']})",
            *int8_cells,
        )
    console.print(table)
    for r in report["results"]:
        if r["is_noisy"]:
            console.print(
                f"[yellow]Noisy at batch {r['batch_size']}: {r['num_clean_repeats']} of {len(r['attempts'])} "
                "repeats ran without other processes taking CPU time, or the best beat the median by "
                "> 15%. Other processes competed for the cores (load average before/after: "
                f"{report['machine']['load_average_1_5_15']} / "
                f"{report['machine']['load_average_1_5_15_after']}); rerun on an idle machine.[/yellow]"
            )
    bandwidth = report["bandwidth"]
    gemv = bandwidth["gemv"]
    paths = ", ".join(f"{name} {gemv[name]['best_gb_s']:.1f} GB/s" for name in ("packed", "f_linear") if name in gemv)
    console.print(f"GEMV bandwidth, {gemv['weight_bytes'] / 1e6:.0f} MB weight, best of calls: {paths}")
    for r in report["results"]:
        step_mb = r["weight_bytes_per_step"]["total"] / 1e6
        achieved = r["achieved_gb_s"]
        experts = r["experts_per_moe_layer_per_step"]
        console.print(
            f"batch {r['batch_size']}: {step_mb:.1f} MB of weights per step"
            f"{'' if experts is None else f' ({experts:.2f} experts per MoE layer)'} → "
            f"cpm2 {achieved['cpm2']:.1f} GB/s, HF {achieved['hf']:.1f} GB/s (medians)"
        )
    if report["results"]:
        console.print(f"Weights per step, MB: {_parts_line(report['results'][0]['weight_bytes_per_step'])}")
    b1 = bandwidth.get("batch1")
    if b1 is not None:
        chain = bandwidth["gemv_chain"]
        overhead_ms = b1["gemv_chain_step_ms"] - b1["bandwidth_floor_step_ms"]
        routing = "" if report["results"][0]["experts_per_moe_layer_per_step"] is None else "routing, "
        console.print(
            f"Limit at batch 1: cpm2 reads {b1['weight_bytes_per_step'] / 1e6:.1f} MB/step at "
            f"{b1['cpm2_achieved_gb_s']:.1f} GB/s (best repeat {b1['cpm2_best_achieved_gb_s']:.1f}) = "
            f"[bold]{b1['fraction_of_reference']:.0%}[/bold] (best {b1['best_fraction_of_reference']:.0%}) "
            f"of the {bandwidth['reference']} GEMV bandwidth ({bandwidth['reference_gb_s']:.1f} GB/s). "
            f"Of its {b1['cpm2_step_ms']:.2f} ms step, the {chain['num_gemvs_per_step']} GEMVs alone take "
            f"{b1['gemv_chain_step_ms']:.2f} ms ({b1['gemv_chain_gb_s']:.1f} GB/s: "
            f"{b1['bandwidth_floor_step_ms']:.2f} ms of streaming at full bandwidth + {overhead_ms:.2f} ms "
            f"small-matrix overhead) and all other ops (norms, attention, {routing}token choice, Python) "
            f"{b1['other_ops_ms']:.2f} ms."
        )
    dtype = report["config"]["dtype"]
    for key, label in (("target", f"cpm2 {dtype}"), ("target_int8", "cpm2 --dense int8")):
        target = report.get(key)
        if target is None or target["is_met"] is None:
            continue
        verdict = "[green]met[/green]" if target["is_met"] else "[red]not met[/red]"
        batches = " and ".join(str(b) for b in target["batch_sizes"])
        ratios = ", ".join(f"batch {b}: {ratio:.2f}×" for b, ratio in target["ratio_median"].items())
        console.print(
            f"Target {label} ≥ {target['ratio_min']}× HF {dtype} at batch {batches}: {verdict} (medians: {ratios})"
        )


def write_plot(report: dict[str, Any], path: Path) -> Path | None:
    """Grouped bars of median tokens/s per batch size (best as a tick); None without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    results = report["results"]
    fig, axes = plt.subplots(1, len(results), figsize=(3.2 * len(results) + 1, 3.8), squeeze=False)
    for ax, r in zip(axes[0], results, strict=True):
        systems = {"HF": "hf", "cpm2": "cpm2", **({"cpm2 int8": "cpm2_int8"} if "cpm2_int8" in r else {})}
        names = list(systems)
        medians = [r[key]["median_tokens_per_s"] for key in systems.values()]
        bests = [r[key]["best_tokens_per_s"] for key in systems.values()]
        ax.bar(names, medians, color=["#9e9e9e", "#1f77b4", "#2ca02c"][: len(names)])
        ax.scatter(names, bests, marker="_", s=400, color="black", label="best", zorder=3)
        ax.set_title(f"batch {r['batch_size']}: cpm2 {r['ratio_median']:.2f}× HF (median)", fontsize=10)
        ax.set_ylim(0, max(bests) * 1.15)
        ax.set_ylabel("decode tokens/s (median)")
    axes[0][0].legend(loc="upper left", frameon=False)
    cfg, machine = report["config"], report["machine"]
    fig.suptitle(
        f"Decode throughput, {cfg['model']['summary']}\n{cfg['dtype']}, N={cfg['new_tokens']} "
        f"({machine['cpu_model']}, {machine['torch_num_threads']} threads)",
        fontsize=9,
    )
    return save(fig, path, dpi=120)
