"""cpm2's offloaded decode against its peers on the same checkpoint, side by side, CPU only.

    python -m bench.offload_peers            # full run; --quick: 1 repeat, 4 steps, batch 1

One bf16 Switch-like checkpoint (64 experts, d_model 512, 6 + 6 MoE layers, 3.2 GB of experts),
saved by HF and converted once for cpm2 (bench/offload_common). Every system decodes the same
teacher-forced random ids (32 source tokens, one seeded forced id per row and step), so routing
is the same; the table shows how much of it agrees with cpm2's.

Systems (research/offload-anchors.md §4):
* `hf-ram` — transformers `from_pretrained` in RAM; in 5.x the safetensors are memory-mapped
  lazily, so with a cold page cache this is transformers' own lazy mmap loading.
* `accelerate-auto` — `device_map="auto"`, `max_memory={"cpu": dense + 25 % of expert bytes}`:
  the same RAM as cpm2's (dense weights + a pool of 25 % of the experts). accelerate fills the
  CPU block by block (`SwitchTransformersBlock` is not split) and keeps the largest block's size
  free as its working buffer, so two encoder blocks stay in RAM and the rest, every decoder block
  included, goes to "disk". (accelerate 1.x hooks still fetch per leaf module at its forward, so
  a disk block reads its attention and norms plus only the routed experts, not all 64.)
* `accelerate-expert` — an expert-granular `device_map`: every expert module on "disk",
  everything else on "cpu" (`--resident-share` keeps that share of each layer's experts in RAM).
* `cpm2-strict` — `load_cpm2(budget="25%", direct_io=True)`: RAM holds only the pool.
* `cpm2-page-cache` — `load_cpm2(budget="25%")`: the default mode (store memory-mapped).

transformers 5.x points accelerate's disk index straight into the HF safetensors shards (no
conversion for this model), so the offload folders stay empty; each fetch `safe_open`s a shard
and copies the tensor out of a fresh mmap, so the kernel's mmap read-around (read_ahead_kb) adds
to the bytes it reads. Routing: the ids are the same, but bf16 rounding flips near-tied router
choices of a random model (HF bf16 vs HF fp32 of the same weights agree on ~75 % of decoder
routings), so the check is that each system sees the same number of distinct experts per layer.

"cold": the page cache is dropped (`posix_fadvise(DONTNEED)`) on every file the system reads
before every step, outside the timed region; storage bytes come from /sys/block. "warm": every
file is read once before loading. Systems alternate within each repeat; medians over repeats.
Target (cold, batch 1 and 16): cpm2 ≥ 3x accelerate-expert tok/s.
"""

from __future__ import annotations

import argparse
import gc
import logging
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.machine import machine_info, publish
from bench.offload_common import (
    CACHE_ROOT,
    DecodeRun,
    decode_cpm2,
    drop_page_cache,
    ensure_switch_checkpoints,
    load_cpm2,
    measure_read_bandwidth,
    model_files,
    read_through,
    store_files,
)
from bench.offload_hf import (
    HF_SYSTEMS,
    decode_hf,
    device_map_summary,
    load_hf,
    model_bytes,
    offload_folder,
    routing_agreement,
)
from bench.plots import pyplot, save

CPM2_SYSTEMS: dict[str, dict[str, Any]] = {"cpm2-strict": {"direct_io": True}, "cpm2-page-cache": {"direct_io": False}}
SYSTEMS: tuple[str, ...] = (*HF_SYSTEMS, *CPM2_SYSTEMS)
TARGET_PEER, TARGET_RATIO = "accelerate-expert", 3.0


@dataclass
class PeersBenchConfig:
    batches: tuple[int, ...] = (1, 16)
    page_caches: tuple[str, ...] = ("cold", "warm")
    systems: tuple[str, ...] = SYSTEMS
    budget_share: float = 0.25  # cpm2's pool; accelerate-auto gets dense + this share of experts
    resident_share: float = 0.0  # accelerate-expert: share of each layer's experts kept on "cpu"
    steps: int = 16
    warmup: int = 4
    repeats: int = 3
    measure_bandwidth: bool = True
    cache_root: Path = CACHE_ROOT
    out: Path = Path("bench/results/offload_peers.json")
    plot: Path | None = Path("docs/offload_peers.png")
    log: Callable[[str], object] = field(default=print, repr=False)

    @property
    def budget(self) -> str:
        return f"{self.budget_share * 100:g}%"


@dataclass
class _Setup:
    hf_dir: Path
    native_dir: Path
    offload_dir: Path
    cpu_budget_bytes: int


def _files(system: str, setup: _Setup) -> list[Path]:
    """Every tensor file `system` reads."""
    if system in CPM2_SYSTEMS:
        return model_files(setup.native_dir)
    folder = offload_folder(system, setup.offload_dir)
    return model_files(setup.hf_dir, *([folder] if system != "hf-ram" and folder.exists() else []))


def _run_once(system: str, batch: int, page_cache: str, setup: _Setup, cfg: PeersBenchConfig) -> dict[str, Any]:
    """Load `system`, decode, unload; the run's numbers (expert counts under `_counts`)."""
    is_cold = page_cache == "cold"
    if is_cold:
        drop_page_cache(_files(system, setup))
    else:
        read_through(_files(system, setup))
    begin = time.perf_counter()
    extra: dict[str, Any] = {}
    run: DecodeRun
    if system in CPM2_SYSTEMS:
        loaded = load_cpm2(setup.native_dir, budget=cfg.budget, **CPM2_SYSTEMS[system])
        load_seconds = time.perf_counter() - begin
        extra["budget_bytes"] = loaded.budget_bytes
        try:
            files = _files(system, setup) if is_cold else ()
            run = decode_cpm2(loaded, batch=batch, steps=cfg.steps, warmup=cfg.warmup, cold_files=files)
        finally:
            loaded.close()
    else:
        model = load_hf(
            system,
            setup.hf_dir,
            cpu_budget_bytes=setup.cpu_budget_bytes,
            offload_dir=setup.offload_dir,
            resident_share=cfg.resident_share,
        )
        load_seconds = time.perf_counter() - begin
        if system != "hf-ram":
            extra["device_map"] = device_map_summary(model)
        try:
            files = _files(system, setup) if is_cold else ()
            run = decode_hf(model, batch=batch, steps=cfg.steps, warmup=cfg.warmup, cold_files=files)
        finally:
            del model
    gc.collect()  # drop the HF model's memory maps before the next system runs
    return {"load_seconds": load_seconds, **extra, **run.to_dict(), "_counts": run.expert_counts}


def _summarise(group: list[dict[str, Any]]) -> dict[str, Any]:
    """Median run by tok/s, with every repeat's numbers alongside."""
    ordered = sorted(group, key=lambda r: r["tokens_per_second"])
    out = {k: v for k, v in ordered[len(ordered) // 2].items() if k not in ("_counts", "repeat")}
    out["tokens_per_second_all"] = [r["tokens_per_second"] for r in group]
    out["storage_bytes_per_token_median"] = statistics.median(r["storage_bytes_per_token"] for r in group)
    out["load_seconds_median"] = statistics.median(r["load_seconds"] for r in group)
    out["runs"] = [{k: v for k, v in r.items() if k not in ("_counts", "device_map")} for r in group]
    return out


def run(cfg: PeersBenchConfig, *, checkpoints: tuple[Path, Path] | None = None) -> dict[str, Any]:
    """All systems x batches x page-cache states x repeats; `checkpoints` = (HF dir, native dir)."""
    hf_dir, native_dir = checkpoints or ensure_switch_checkpoints(cfg.cache_root)
    sizes = model_bytes(hf_dir)
    setup = _Setup(
        hf_dir,
        native_dir,
        cfg.cache_root / "switch-offload-accelerate",
        sizes.dense + int(sizes.experts * cfg.budget_share),
    )
    bandwidth: dict[str, float] = {}
    if cfg.measure_bandwidth:
        files = store_files(native_dir)
        bandwidth = {str(n): measure_read_bandwidth(files, readers=n) for n in (1, 4)}
        cfg.log(f"cold read bandwidth GB/s by readers: {bandwidth}")
    raw: dict[tuple[int, str, str], list[dict[str, Any]]] = {}
    for repeat in range(cfg.repeats):
        for batch in cfg.batches:
            for page_cache in cfg.page_caches:
                for system in cfg.systems:  # interleaved: A B C D, A B C D, ...
                    cfg.log(f"  repeat {repeat + 1} batch {batch} {page_cache}: {system}")
                    record = _run_once(system, batch, page_cache, setup, cfg)
                    cfg.log(f"    {record['tokens_per_second']:.2f} tok/s")
                    raw.setdefault((batch, page_cache, system), []).append({"repeat": repeat, **record})
    results = []
    for (batch, page_cache, system), group in raw.items():
        row = {"batch": batch, "page_cache": page_cache, "system": system, **_summarise(group)}
        # every routed expert read once per step, no cache: what a step must move at worst
        distinct = row["routing"].get("distinct_experts_per_layer_call_mean", 0.0)
        row["routed_expert_bytes_per_token"] = distinct * len(group[0]["_counts"]) * sizes.per_expert / batch
        reference = next((raw[(batch, page_cache, s)] for s in CPM2_SYSTEMS if (batch, page_cache, s) in raw), None)
        if reference is not None:
            row["routing_agreement_with_cpm2"] = routing_agreement(group[0]["_counts"], reference[0]["_counts"])
        results.append(row)
    medians = {(r["batch"], r["page_cache"], r["system"]): r["tokens_per_second"] for r in results}
    for row in results:
        key = (row["batch"], row["page_cache"])
        row["cpm2_speedup"] = {
            s: medians[(*key, s)] / row["tokens_per_second"] for s in CPM2_SYSTEMS if (*key, s) in medians
        }
    target = [
        {
            "batch": b,
            "cpm2": s,
            "peer": TARGET_PEER,
            "ratio": medians[(b, "cold", s)] / medians[(b, "cold", TARGET_PEER)],
        }
        for b in cfg.batches
        for s in CPM2_SYSTEMS
        if (b, "cold", s) in medians and (b, "cold", TARGET_PEER) in medians
    ]
    for t in target:
        t["is_met"] = t["ratio"] >= TARGET_RATIO
    machine = machine_info()
    machine["accelerate"] = _version("accelerate")
    return {
        "benchmark": "offload_peers",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine,
        "config": {k: v for k, v in asdict(cfg).items() if k != "log"},
        "checkpoints": {
            "hf": str(hf_dir),
            "cpm2": str(native_dir),
            "accelerate_offload": str(setup.offload_dir),
        },
        "model": sizes.to_dict(),
        "ram_budget": {
            "cpm2_expert_memory": cfg.budget,
            "accelerate_auto_max_memory_cpu_bytes": setup.cpu_budget_bytes,
            "accelerate_expert_resident_share": cfg.resident_share,
            "rationale": "cpm2 holds the dense weights plus a pool of budget_share of the expert bytes; "
            "accelerate-auto gets max_memory = dense bytes + the same share of expert bytes "
            "(accelerate keeps the largest block's size of it free as its working buffer). "
            "accelerate-expert keeps only the dense weights (and resident_share of experts) in RAM.",
        },
        "read_bandwidth_gb_s": bandwidth,
        "systems": {
            **HF_SYSTEMS,
            "cpm2-strict": "cpm2, O_DIRECT reads into the pool",
            "cpm2-page-cache": "cpm2 default",
        },
        "results": results,
        "target": {"peer": TARGET_PEER, "page_cache": "cold", "ratio_min": TARGET_RATIO, "rows": target},
    }


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def print_report(report: dict[str, Any], console: Console) -> None:
    m, budget = report["model"], report["ram_budget"]
    table = Table(
        title=(
            f"cpm2 vs peers — Switch bf16, {m['num_experts']} experts x "
            f"{m['bytes_per_expert'] / 2**20:.1f} MiB, "
            f"cpm2 pool {budget['cpm2_expert_memory']}, accelerate auto max_memory "
            f"{budget['accelerate_auto_max_memory_cpu_bytes'] / 2**20:.0f} MiB"
        )
    )
    cpm2 = list(CPM2_SYSTEMS)
    # "cpm2-strict x": how many times faster cpm2-strict is than this row's system
    columns = ["cache", "B", "system", "tok/s", "repeats", "MB read/tok", "routed MB/tok", "load s"]
    columns += [f"{s.removeprefix('cpm2-')} x" for s in cpm2] + ["experts/layer", "routing agrees"]
    for col in columns:
        table.add_column(col, justify="left" if col in ("cache", "system") else "right")
    for r in sorted(report["results"], key=lambda r: (r["page_cache"], r["batch"])):
        agreement = r.get("routing_agreement_with_cpm2")
        table.add_row(
            r["page_cache"],
            str(r["batch"]),
            r["system"],
            f"{r['tokens_per_second']:.2f}",
            " ".join(f"{x:.1f}" for x in r["tokens_per_second_all"]),
            f"{r['storage_bytes_per_token_median'] / 1e6:.1f}",
            f"{r['routed_expert_bytes_per_token'] / 1e6:.1f}",
            f"{r['load_seconds_median']:.1f}",
            *[f"{r['cpm2_speedup'][s]:.2f}" if s in r["cpm2_speedup"] else "–" for s in cpm2],
            f"{r['routing'].get('distinct_experts_per_layer_call_mean', 0):.2f}",
            "–" if agreement is None else f"{agreement:.3f}",
        )
    console.print(table)
    console.print("strict x / page-cache x: cpm2's tok/s over the row's; routed MB/tok: every routed expert read once")
    for t in report["target"]["rows"]:
        verdict = "met" if t["is_met"] else "NOT met"
        console.print(
            f"target cold batch {t['batch']}: {t['cpm2']} / {t['peer']} = {t['ratio']:.2f} "
            f"(≥ {report['target']['ratio_min']:g}: {verdict})"
        )
    if report["read_bandwidth_gb_s"]:
        console.print(f"cold read bandwidth GB/s by readers: {report['read_bandwidth_gb_s']}")


def write_plot(report: dict[str, Any], path: Path, *, page_cache: str = "cold") -> Path | None:
    """Bar chart of median tok/s per system, one bar per batch size (log scale)."""
    plt = pyplot()
    if plt is None:
        return None
    import matplotlib.ticker

    rows = [r for r in report["results"] if r["page_cache"] == page_cache]
    systems = [s for s in SYSTEMS if any(r["system"] == s for r in rows)]
    batches = sorted({r["batch"] for r in rows})
    width = 0.8 / max(1, len(batches))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for i, batch in enumerate(batches):
        values = [
            next((r["tokens_per_second"] for r in rows if r["system"] == s and r["batch"] == batch), 0.0)
            for s in systems
        ]
        xs = [j + (i - (len(batches) - 1) / 2) * width for j in range(len(systems))]
        bars = ax.bar(xs, values, width, label=f"batch {batch}")
        ax.bar_label(bars, labels=[f"{v:.1f}" for v in values], fontsize=8)
    ax.set_xticks(range(len(systems)), systems, fontsize=9)
    ax.set_yscale("log")
    lowest = min((r["tokens_per_second"] for r in rows), default=1.0)
    ax.set_ylim(bottom=lowest / 3)  # so the slowest bar still shows
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set_ylabel("decode tokens/s (median, log scale)")
    ax.set_title(
        f"Offloaded decode, {page_cache} page cache every step: cpm2 at "
        f"{report['ram_budget']['cpm2_expert_memory']} vs peers\n(Switch bf16, "
        f"{report['model']['expert_bytes'] / 1e9:.1f} GB of experts, {report['machine']['usable_cpus']}-core "
        "CPU, teacher-forced random tokens)",
        fontsize=10,
    )
    ax.legend()
    return save(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.offload_peers", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 repeat, 4 steps, batch 1")
    parser.add_argument("--repeats", type=int, default=PeersBenchConfig.repeats)
    parser.add_argument("--steps", type=int, default=PeersBenchConfig.steps)
    parser.add_argument("--resident-share", type=float, default=0.0, help="accelerate-expert: experts kept in RAM")
    parser.add_argument("--out", type=Path, default=PeersBenchConfig.out)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    cfg = PeersBenchConfig(repeats=args.repeats, steps=args.steps, resident_share=args.resident_share, out=args.out)
    if args.quick:
        cfg.repeats, cfg.steps, cfg.batches, cfg.plot = 1, 4, (1,), None
        cfg.out = args.out.with_suffix(".quick.json")  # keeps the full results
    import transformers

    logging.getLogger("accelerate").setLevel(logging.ERROR)  # "Some parameters are on the meta device"
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    begin = time.time()
    report = run(cfg)
    report["command"] = " ".join(["python -m bench.offload_peers", *argv])
    report["wall_seconds"] = time.time() - begin
    publish(report, out=cfg.out, plot=cfg.plot, show=print_report, draw=write_plot, width=170)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
