"""InfMoE offloading on this machine: budgets, expert order policies, and the disk tier.

    python -m bench.offload            # full run (~20 min on 2 cores); --quick for a smoke run

Three measurements, each on a Switch-like model (64 experts, d_model 512, 6 + 6 MoE layers), a
CPM-2-architecture model of similar size and an NLLB-MoE-shaped one (top-2 over 128 experts with
biases in every 4th of 12 + 12 blocks), bf16, teacher-forced random tokens (bench/offload_common):

1. **Budgets** — resident vs offloaded at 50 / 25 / 10 % of the experts, batch 1 and 16, in the two
   CPU modes: `page cache` (default: the store is memory-mapped; experts the OS holds in RAM are
   used in place, others read into the pool) and `strict` (O_DIRECT: RAM holds only the pool, every
   miss comes from storage). Target: 25 % ≥ 0.85× resident tok/s at batch 16.
2. **Order policies** (strict mode, 25 %), decode step and encoder pass: time ÷ max(compute-only,
   transfer-only), with the store on disk (DMA reads) and on tmpfs (memcpy "transfers"); see
   `measure_orders`. 1.0 is the physical limit; target ≤ 1.15.
3. **Disk tier**: page cache evicted before every step (the model is 4× the 25 % budget), strict
   mode; tok/s against the disk-read bound (bytes read per token ÷ measured read bandwidth),
   target ≥ 0.7; bytes read per token against the ideal (every routed expert read once, no cache).

Runs of the systems being compared alternate within each repeat; medians of `repeats`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.machine import machine_info, publish
from bench.offload_common import (
    DecodeRun,
    copy_to_ram,
    decode_cpm2,
    drop_page_cache,
    ensure_cpm2_checkpoint,
    ensure_nllb_moe_checkpoints,
    ensure_switch_checkpoints,
    load_cpm2,
    measure_read_bandwidth,
    store_files,
    time_loads,
)
from bench.plots import pyplot, save
from engine.summary import summarize
from engine.weights.loader import inspect_checkpoint

MODES = {"page-cache": {"direct_io": False}, "strict": {"direct_io": True}}
#: The benchmark models by name: each builder returns the native directory (built once, cached).
MODELS: dict[str, Callable[[], Path]] = {
    "switch": lambda: ensure_switch_checkpoints()[1],
    "cpm2": ensure_cpm2_checkpoint,
    "nllb-moe": lambda: ensure_nllb_moe_checkpoints()[1],
}


@dataclass
class OffloadBenchConfig:
    models: tuple[str, ...] = ("switch", "cpm2", "nllb-moe")
    batches: tuple[int, ...] = (1, 16)
    budgets: tuple[str, ...] = ("50%", "25%", "10%")
    orders: tuple[str, ...] = ("infmoe", "cached-first", "index")
    steps: int = 16
    repeats: int = 3
    window: int = 4
    out: Path = Path("bench/results/offload.json")
    plot: Path | None = Path("docs/offload.png")
    log: Callable[[str], object] = field(default=print, repr=False)


def _median_run(runs: list[DecodeRun]) -> dict[str, Any]:
    """The median run (by tok/s) with every repeat's tok/s alongside."""
    ordered = sorted(runs, key=lambda r: r.tokens_per_second)
    middle = ordered[len(ordered) // 2]
    out = middle.to_dict()
    out["tokens_per_second_all"] = [r.tokens_per_second for r in runs]
    return out


def _decode(model_dir: Path, budget: str | None, batch: int, cfg: OffloadBenchConfig, **kwargs: Any) -> DecodeRun:
    cold_files: Sequence[Path] = kwargs.pop("cold_files", ())
    loaded = load_cpm2(model_dir, budget=budget, window=cfg.window, **kwargs)
    try:
        return decode_cpm2(loaded, batch=batch, steps=cfg.steps, cold_files=cold_files)
    finally:
        loaded.close()


def measure_budgets(model_dir: Path, cfg: OffloadBenchConfig) -> list[dict[str, Any]]:
    rows = []
    for batch in cfg.batches:
        systems: list[tuple[str, str | None, dict[str, Any]]] = [("resident", None, {})]
        for mode, options in MODES.items():
            systems += [(mode, budget, options) for budget in cfg.budgets]
        runs: dict[int, list[DecodeRun]] = {i: [] for i in range(len(systems))}
        for repeat in range(cfg.repeats):
            for i, (mode, budget, options) in enumerate(systems):
                cfg.log(f"  budgets batch {batch} repeat {repeat + 1}: {mode} {budget or ''}")
                runs[i].append(_decode(model_dir, budget, batch, cfg, **options))
        resident = statistics.median(r.tokens_per_second for r in runs[0])
        for i, (mode, budget, _) in enumerate(systems):
            row = {"batch": batch, "mode": mode, "budget": budget or "100%", **_median_run(runs[i])}
            row["ratio_to_resident"] = row["tokens_per_second"] / resident
            rows.append(row)
    return rows


def measure_orders(model_dir: Path, cfg: OffloadBenchConfig) -> list[dict[str, Any]]:
    """Order policies at 25 %, strict mode, for a decode step and for the encoder pass (prefill).

    The physical limit is max(compute-only, transfer-only): compute-only is the resident time of
    the same work, transfer-only the same number of loads timed alone through the same reader and
    concurrency (`time_loads`). It is measured twice:
    - disk tier (O_DIRECT reads are DMA, so a load costs the CPUs nearly nothing and can truly
      overlap compute: the regime InfMoE's ordering is for);
    - host tier in RAM (the store on tmpfs): a "transfer" is then a memcpy by the CPUs, which on a
      2-core machine competes with compute for the same cores, so no order can overlap them and
      the step approaches compute + transfer.
    """
    rows = []
    ram_dir = copy_to_ram(model_dir)
    tiers = [("disk", model_dir)] + ([("ram", ram_dir)] if ram_dir is not None else [])
    try:
        for tier, source in tiers:
            per_load = time_loads(source, window=cfg.window, direct=True)
            cfg.log(f"  orders: store on {tier}, {per_load * 1e3:.2f} ms per load alone")
            for batch in cfg.batches:
                names = ["resident", *cfg.orders]
                runs: dict[str, list[DecodeRun]] = {n: [] for n in names}
                for repeat in range(cfg.repeats):
                    for name in names:
                        cfg.log(f"  orders {tier} batch {batch} repeat {repeat + 1}: {name}")
                        if name == "resident":
                            runs[name].append(_decode(source, None, batch, cfg))
                        else:
                            runs[name].append(_decode(source, "25%", batch, cfg, direct_io=True, order=name))
                compute_step = statistics.median(r.seconds / cfg.steps for r in runs["resident"])
                compute_encode = statistics.median(r.encode_seconds for r in runs["resident"])
                for name in cfg.orders:
                    row = {"batch": batch, "order": name, "host_tier": tier, **_median_run(runs[name])}
                    step = row["seconds"] / cfg.steps
                    transfer_step = row["experts"]["transfers"] / cfg.steps * per_load
                    encode = statistics.median(r.encode_seconds for r in runs[name])
                    transfer_encode = statistics.median(r.encode_transfers for r in runs[name]) * per_load
                    row.update(
                        seconds_per_load=per_load,
                        step_seconds=step,
                        compute_only_seconds=compute_step,
                        transfer_only_seconds=transfer_step,
                        ratio_to_limit=step / max(compute_step, transfer_step),
                        encode_seconds=encode,
                        encode_compute_only_seconds=compute_encode,
                        encode_transfer_only_seconds=transfer_encode,
                        encode_ratio_to_limit=encode / max(compute_encode, transfer_encode),
                    )
                    rows.append(row)
    finally:
        if ram_dir is not None:
            import shutil

            shutil.rmtree(ram_dir, ignore_errors=True)
    return rows


def measure_disk_tier(model_dir: Path, cfg: OffloadBenchConfig, bandwidth: float) -> list[dict[str, Any]]:
    """Strict mode at 25 %, page cache evicted before each step; against the disk-read bound."""
    info = inspect_checkpoint(model_dir)
    summary = summarize(info.config, info.stored_dtype)
    files = store_files(model_dir)
    rows = []
    for batch in cfg.batches:
        runs = []
        for repeat in range(cfg.repeats):
            cfg.log(f"  disk tier batch {batch} repeat {repeat + 1}")
            runs.append(_decode(model_dir, "25%", batch, cfg, direct_io=True, cold_files=files))
        row = {"batch": batch, **_median_run(runs)}
        per_token = row["experts"]["bytes_moved"] / row["tokens"]
        bound = bandwidth * 1e9 / per_token if per_token else float("inf")
        distinct = row["routing"].get("distinct_experts_per_layer_call_mean", 0.0)
        ideal = distinct * summary.num_moe_layers / 2 * summary.bytes_per_expert / batch
        row.update(
            read_bandwidth_gb_s=bandwidth,
            bytes_read_per_token=per_token,
            ideal_bytes_per_token=ideal,
            bound_tokens_per_second=bound,
            ratio_to_bound=row["tokens_per_second"] / bound,
            model_to_budget=1 / 0.25,
        )
        rows.append(row)
    return rows


def run(cfg: OffloadBenchConfig) -> dict[str, Any]:
    report: dict[str, Any] = {
        "config": {k: v for k, v in asdict(cfg).items() if k != "log"},
        "machine": machine_info(),
        "models": {},
    }
    for name in cfg.models:
        model_dir = MODELS[name]()
        info = inspect_checkpoint(model_dir)
        summary = summarize(info.config, info.stored_dtype)
        files = store_files(model_dir)
        bandwidth = {readers: measure_read_bandwidth(files, readers=readers) for readers in (1, cfg.window)}
        cfg.log(f"{name}: read bandwidth {bandwidth}")
        for path in files:  # warm the page cache again for the page-cache mode
            with open(path, "rb") as f:
                while f.read(64 << 20):
                    pass
        entry: dict[str, Any] = {
            "path": str(model_dir),
            "summary": summary.to_dict(),
            "read_bandwidth_gb_s": {str(k): v for k, v in bandwidth.items()},
        }
        entry["budgets"] = measure_budgets(model_dir, cfg)
        entry["orders"] = measure_orders(model_dir, cfg)
        entry["disk_tier"] = measure_disk_tier(model_dir, cfg, bandwidth[cfg.window])
        drop_page_cache(files)
        report["models"][name] = entry
    return report


def print_report(report: dict[str, Any], console: Console) -> None:
    for name, entry in report["models"].items():
        s = entry["summary"]
        title = (
            f"{name}: {s['num_moe_layers']} MoE layers x {s['num_experts_per_layer']} experts, "
            f"{s['bytes_per_expert'] / 2**20:.1f} MiB/expert, {s['expert_bytes'] / 2**30:.2f} GiB of experts"
        )
        table = Table(title=f"budgets — {title}")
        for col in (
            "batch",
            "mode",
            "budget",
            "tok/s",
            "x resident",
            "MB moved/tok",
            "hit",
            "in place",
            "prec",
            "rec",
        ):
            table.add_column(col, justify="right")
        for r in entry["budgets"]:
            e = r.get("experts", {})
            looked = max(1, e.get("hits", 0) + e.get("in_place", 0) + e.get("misses", 0))
            table.add_row(
                str(r["batch"]),
                r["mode"],
                r["budget"],
                f"{r['tokens_per_second']:.1f}",
                f"{r['ratio_to_resident']:.2f}",
                f"{r.get('bytes_moved_per_token', 0) / 1e6:.1f}",
                f"{e.get('hit_rate', 1):.2f}",
                f"{e.get('in_place', 0) / looked:.2f}",
                f"{e.get('prefetch_precision', 0):.2f}",
                f"{e.get('prefetch_recall', 0):.2f}",
            )
        console.print(table)
        table = Table(title=f"order policies (strict, 25%): step / max(compute-only, transfer-only) — {name}")
        columns = ("tier", "batch", "order", "tok/s", "step ms", "compute ms", "transfer ms", "step/limit")
        for col in (*columns, "prefill ms", "prefill/limit"):
            table.add_column(col, justify="right")
        for r in entry["orders"]:
            table.add_row(
                r["host_tier"],
                str(r["batch"]),
                r["order"],
                f"{r['tokens_per_second']:.1f}",
                f"{r['step_seconds'] * 1e3:.1f}",
                f"{r['compute_only_seconds'] * 1e3:.1f}",
                f"{r['transfer_only_seconds'] * 1e3:.1f}",
                f"{r['ratio_to_limit']:.2f}",
                f"{r['encode_seconds'] * 1e3:.0f}",
                f"{r['encode_ratio_to_limit']:.2f}",
            )
        console.print(table)
        table = Table(title=f"disk tier (cold page cache every step, strict, 25%) — {name}")
        for col in ("batch", "tok/s", "bound tok/s", "of bound", "MB read/tok", "ideal MB/tok", "read GB/s"):
            table.add_column(col, justify="right")
        for r in entry["disk_tier"]:
            table.add_row(
                str(r["batch"]),
                f"{r['tokens_per_second']:.1f}",
                f"{r['bound_tokens_per_second']:.1f}",
                f"{r['ratio_to_bound']:.2f}",
                f"{r['bytes_read_per_token'] / 1e6:.1f}",
                f"{r['ideal_bytes_per_token'] / 1e6:.1f}",
                f"{r['read_bandwidth_gb_s']:.2f}",
            )
        console.print(table)
        print_layer_table(entry["disk_tier"], f"disk tier per decoder layer (strict, 25%) — {name}", console)
        routing = entry["budgets"][-1]["routing"]
        console.print(f"routing at batch {entry['budgets'][-1]['batch']}: {routing}")


def print_layer_table(rows: Sequence[dict[str, Any]], title: str, console: Console) -> None:
    """Per decoder layer and batch: the pool's hit rate and the prefetch prediction's precision and
    recall (a layer with no prediction, the first of its stack, shows "-")."""
    table = Table(title=title)
    table.add_column("layer", justify="right")
    for r in rows:
        for col in ("hit", "prec", "rec"):
            table.add_column(f"b{r['batch']} {col}", justify="right")
    layers = [name for name in rows[0].get("experts_per_layer", {}) if name.startswith("decoder")] if rows else []
    for layer in layers:
        cells = [layer]
        for r in rows:
            counts = r.get("experts_per_layer", {}).get(layer, {})
            scored = counts.get("predicted", 0) > 0
            cells += [
                f"{counts.get('hit_rate', 1.0):.2f}",
                f"{counts['prefetch_precision']:.2f}" if scored else "-",
                f"{counts['prefetch_recall']:.2f}" if scored else "-",
            ]
        table.add_row(*cells)
    console.print(table)


def write_plot(report: dict[str, Any], path: Path) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    models = list(report["models"])
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, name in zip(axes[0], models, strict=True):
        rows = report["models"][name]["budgets"]
        for mode, style in (("page-cache", "-o"), ("strict", "--s")):
            for batch in sorted({r["batch"] for r in rows}):
                pts = [r for r in rows if r["batch"] == batch and r["mode"] in (mode, "resident")]
                xs = [float(r["budget"].rstrip("%")) for r in pts]
                ys = [r["ratio_to_resident"] for r in pts]
                order = sorted(range(len(xs)), key=xs.__getitem__)
                ax.plot([xs[i] for i in order], [ys[i] for i in order], style, label=f"{mode}, batch {batch}")
        ax.axhline(0.85, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("expert memory budget (% of all experts)")
        ax.set_ylabel("tok/s relative to resident")
        ax.set_title(name)
        ax.legend(fontsize=8)
    fig.suptitle("cpm2 offloaded decode vs resident (2-core CPU, bf16, teacher-forced random tokens)")
    return save(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one model, 1 repeat, 8 steps")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--out", type=Path, default=OffloadBenchConfig.out)
    args = parser.parse_args(argv)
    models = tuple(args.models.split(","))
    if unknown := [m for m in models if m not in MODELS]:
        parser.error(f"--models: unknown {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    # A run written elsewhere (e.g. one model) draws its plot beside its JSON, not over docs/offload.png.
    plot = OffloadBenchConfig.plot if args.out == OffloadBenchConfig.out else args.out.with_suffix(".png")
    cfg = OffloadBenchConfig(models=models, repeats=args.repeats, steps=args.steps, out=args.out, plot=plot)
    if args.quick:
        cfg = OffloadBenchConfig(
            models=("switch",),
            repeats=1,
            steps=8,
            budgets=("25%",),
            out=args.out.with_suffix(".quick.json"),
            plot=None,
        )
    begin = time.time()
    report = run(cfg)
    report["wall_seconds"] = time.time() - begin
    publish(report, out=cfg.out, plot=cfg.plot, show=print_report, draw=write_plot, width=140)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
