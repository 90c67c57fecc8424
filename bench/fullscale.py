"""A real-size MoE on this machine: NLLB-MoE 54B's shape, int4 experts on disk, a bounded budget.

    python -m bench.fullscale --dir PATH [--keep]     # PATH needs 32 GiB free; ~20 min to write, ~8 to run

Builds a random-weight model of NLLB-MoE 54B's architecture (`bench/configs/nllb-moe-54b`) with
`cpm2 init --experts int4 --dense int8` into `--dir` (streamed, one layer in RAM; resumed when a
previous run was cut short), loads it with the dense weights in RAM and the experts in the store on
disk behind a bounded `--expert-memory` (strict mode: O_DIRECT, RAM holds only the pool), and times
teacher-forced decoding of random tokens (`bench.offload_common`) at batch 1 and 16:

- **cold**: the first decode steps of a request, right after its encoder pass (the pool holds what
  the encoder left there); **warm**: the steps after `warmup` more, the pool in its steady state.
  The expert files are dropped from the page cache before every step either way.
- **bounds, measured in the same run**: the disk-read bound (bytes read per token ÷ the store's
  read rate through the provider's own reader, O_DIRECT, 96 random experts, the best of the rates
  measured before and after each run: this VM's disk drifts by tens of percent within minutes) and
  the compute bound (the same decode with every expert served from memory: dense work, routing and
  expert kernels, no reads). A step can go no faster than the slower of the two; `of bound` is
  tok/s ÷ that limit. Medians of `--repeats` runs.
- **the planner** (`cpm2 plan`, `engine.planner`) predicts each case from this machine's profile,
  measured at the start of the run, and the routing popularity the run recorded.
- **memory**: peak RSS while decoding (the kernel's high-water mark, reset after loading) against
  dense weights + expert budget + the stated slack (KV cache, activations, kernel workspaces).

The model is removed afterwards unless `--keep`; a kept model is reused by the next run.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from bench.machine import machine_info, publish, reset_peak_rss
from bench.offload_common import (
    DecodeRun,
    DiskSampler,
    decode_cpm2,
    drop_page_cache,
    load_cpm2,
    model_files,
    store_files,
    store_read_gb_s,
)
from bench.plan_validation import median_run, predict_measured, routing_counts
from bench.soak import proc_status
from engine.config import ModelConfig
from engine.errors import ConfigError
from engine.experts.store import ExpertStore
from engine.model import ExpertWeights, MoELayerKey
from engine.model.moe import ExpertDemand
from engine.offload import InferenceModel
from engine.planner.measure import MeasureOptions, measure_profile
from engine.planner.predict import PlanCase, predict
from engine.planner.profile import HardwareProfile, load_profile
from engine.sizes import format_bytes, parse_bytes
from engine.weights.init import PROGRESS_FILE
from engine.weights.loader import inspect_checkpoint, inspect_config
from engine.weights.quantize import QUANTIZATION_KEY

CONFIG = Path(__file__).resolve().parent / "configs" / "nllb-moe-54b" / "config.json"


@dataclass
class FullscaleConfig:
    config: Path = CONFIG
    dir: Path = Path(".cache/fullscale/nllb-moe-54b")
    keep: bool = False
    budget: str = "4GiB"
    group_size: int = 128
    batches: tuple[int, ...] = (1, 16)
    steps: int = 8
    warmup: int = 16
    source_len: int = 32
    window: int = 4
    io_threads: int = 4
    repeats: int = 3
    """Cold and warm runs per batch size (the median is reported)."""
    slack: str = "1.5GiB"
    """What the process may hold beyond dense weights and the expert budget: the Python and torch
    runtime (0.35 GiB here before anything loads), activations and KV cache, oneDNN's primitive
    caches, the I/O threads' allocator arenas."""
    quick_profile: bool = False
    """Measure the machine's profile roughly, in seconds."""
    hardware: str | None = None
    """A profile (file or shipped name) to predict with instead of measuring this machine's."""
    out: Path = Path("bench/results/fullscale.json")
    log: Any = field(default=print, repr=False)


def _is_this_model(cfg: FullscaleConfig) -> bool:
    """Whether `cfg.dir` holds a finished model of `cfg.config` in the format this run writes."""
    if not (cfg.dir / "config.json").exists() or (cfg.dir / PROGRESS_FILE).exists():
        return False
    built = inspect_checkpoint(cfg.dir).config
    wanted = inspect_config(cfg.config).config
    record = built.extra.get(QUANTIZATION_KEY, {})
    same_shape = {k: v for k, v in built.to_dict().items() if k != "extra"} == {
        k: v for k, v in wanted.to_dict().items() if k != "extra"
    }
    same_format = (record.get("experts"), record.get("group_size"), record.get("dense")) == (
        "int4",
        cfg.group_size,
        "int8",
    )
    if not (same_shape and same_format):
        raise ConfigError(
            f"{cfg.dir} holds another model (shape or format differs from {cfg.config}, int4 experts of "
            f"group size {cfg.group_size}, int8 dense); remove it or pass another --dir"
        )
    return True


def ensure_model(cfg: FullscaleConfig) -> float:
    """Write the model into `cfg.dir` unless a finished one is there; the seconds it took (0 if reused)."""
    if _is_this_model(cfg):
        cfg.log(f"reusing the model in {cfg.dir}")
        return 0.0
    args = [sys.executable, "-m", "cpm2", "init", "--config", str(cfg.config), "--out", str(cfg.dir)]
    args += ["--dtype", "bfloat16", "--experts", "int4", "--group-size", str(cfg.group_size), "--dense", "int8"]
    if (cfg.dir / PROGRESS_FILE).exists():
        args.append("--resume")
    begin = time.perf_counter()
    subprocess.run(args, check=True)
    return time.perf_counter() - begin


def dense_resident_bytes(loaded: InferenceModel) -> int:
    """Bytes of every tensor the model holds in RAM outside the expert pool: parameters, buffers
    and int8 weights (whose float parameters are empty placeholders)."""
    seen: set[int] = set()
    total = 0
    for tensor in [*loaded.model.parameters(), *loaded.model.buffers()]:
        if tensor.data_ptr() not in seen and not tensor.is_meta:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    for module in loaded.model.modules():
        int8 = getattr(module, "int8", None)
        if int8 is not None:
            total += int8.q.numel() + int8.scale.numel() * int8.scale.element_size()
    return total


@dataclass
class _FromMemory:
    """Serves every expert of a layer with one expert's weights held in RAM: the layer computes
    exactly the work it would (same token counts, same kernel, same format) and reads nothing."""

    weights: ExpertWeights

    def fetch(
        self, layer: MoELayerKey, demand: Sequence[ExpertDemand], hidden_ND: torch.Tensor
    ) -> Iterator[tuple[int, ExpertWeights]]:
        for item in demand:
            yield item.expert, self.weights


@contextlib.contextmanager
def experts_from_memory(loaded: InferenceModel, store: ExpertStore) -> Iterator[None]:
    """Within the block, each MoE layer computes from its expert 0 copied into RAM (no reads)."""
    layers = loaded.model.moe_layers()
    kept = [layer.expert_provider for layer in layers]
    blobs = {key: store.mapped_blob(key, 0).clone() for key in store.keys}
    try:
        for layer in layers:
            layer.expert_provider = _FromMemory(store.layout.unpack(blobs[layer.key]))
        yield
    finally:
        for layer, provider in zip(layers, kept, strict=True):
            layer.expert_provider = provider


def _row(run: DecodeRun, *, phase: str, batch: int) -> dict[str, Any]:
    return {"phase": phase, "batch": batch, **run.to_dict(), "routing_trace": run.routing_trace}


def _peak_rss() -> int:
    return int(proc_status(Path("/proc/self"))["VmHWM"] * 1024)


def measure(
    cfg: FullscaleConfig, loaded: InferenceModel, store: ExpertStore, profile: HardwareProfile, report: dict[str, Any]
) -> list[dict[str, Any]]:
    """Cold and warm decoding at each batch size (their RSS peak into `report`), then the same
    decoding with experts served from memory (the compute bound), then the rows."""
    files = store_files(cfg.dir)
    decoded: dict[int, tuple[list[DecodeRun], list[DecodeRun], list[float]]] = {}
    for batch in cfg.batches:
        decode = functools.partial(decode_cpm2, loaded, batch=batch, steps=cfg.steps, source_len=cfg.source_len)
        sampler = functools.partial(DiskSampler, threads=cfg.io_threads, window=cfg.window)
        colds, warms, rates = [], [], [store_read_gb_s(store, threads=cfg.io_threads, window=cfg.window)]
        for repeat in range(cfg.repeats):
            cfg.log(f"batch {batch}: cold, warm ({repeat + 1} of {cfg.repeats})")
            seed = 100 * batch + 2 * repeat
            colds.append(decode(warmup=0, seed=seed, cold_files=files, sampler=sampler(store)))
            warms.append(decode(warmup=cfg.warmup, seed=seed + 1, cold_files=files, sampler=sampler(store)))
            rates.append(store_read_gb_s(store, threads=cfg.io_threads, window=cfg.window))
        decoded[batch] = (colds, warms, rates)
    report["peak_rss_decoding_bytes"] = _peak_rss()
    rows = []
    for batch, (colds, warms, rates) in decoded.items():
        cfg.log(f"batch {batch}: compute only (experts from memory)")
        with experts_from_memory(loaded, store):
            compute = decode_cpm2(loaded, batch=batch, steps=cfg.steps, source_len=cfg.source_len, warmup=2)
        for phase, runs in (("cold", colds), ("warm", warms)):
            row = _row(median_run(runs), phase=phase, batch=batch)
            row["tokens_per_second_all"] = [r.tokens_per_second for r in runs]
            row["routing_counts"] = routing_counts(runs)
            row["read_bandwidth_all_gb_s"] = rates
            row["compute_only_tokens_per_second"] = compute.tokens / compute.seconds
            row["compute_only_encode_seconds"] = compute.encode_seconds
            row.update(predict_row(loaded.model.config, profile, row, cfg))
            row.update(bounds(row))
            rows.append(row)
    report["predicted_memory"] = predict(loaded.model.config, profile, _case(cfg, max(cfg.batches))).memory.to_dict()
    return rows


def _case(cfg: FullscaleConfig, batch: int) -> PlanCase:
    return PlanCase(
        batch=batch,
        budget=cfg.budget,
        experts="int4",
        group_size=cfg.group_size,
        dense="int8",
        source_len=cfg.source_len,
        warmup=cfg.warmup,
        steps=cfg.steps,
        window=cfg.window,
    )


def predict_row(
    config: ModelConfig, profile: HardwareProfile, row: dict[str, Any], cfg: FullscaleConfig
) -> dict[str, Any]:
    """The planner's figures for a measured `row` and their errors: this machine's profile with the
    store's read rate sampled between the run's steps (`DiskSampler`; a report from before it: the
    median of the readings around the runs), the routing they recorded."""
    rate = row.get("sampled_read_gb_s") or statistics.median(row["read_bandwidth_all_gb_s"])
    return predict_measured(config, profile, _case(cfg, row["batch"]), row, disk_read_gb_s=rate)


def bounds(row: dict[str, Any]) -> dict[str, float]:
    """The decode rate `row`'s run could at best reach: the slower of computing with every expert
    in memory and reading the bytes it read at the disk's best rate seen in the same run.

    The disk's rate drifts by tens of percent within minutes on this VM, and a run's own reads can
    outpace the store's readings around it (NLLB-MoE 54B on the EPYC VM: 3.4-3.5 GB/s of link time
    in the runs, 1.7-2.0 in the readings, which bounded the batch-16 runs below what they
    decoded): the best rate is the fastest of the readings, the samples between the run's steps
    and the run's own."""
    rate = max(row["read_bandwidth_all_gb_s"] + [row["disk_read_gb_s"]["sampled"], row["disk_read_gb_s"]["decode"]])
    read_bound = rate * 1e9 / row["storage_bytes_per_token"] if row["storage_bytes_per_token"] else float("inf")
    bound = min(row["compute_only_tokens_per_second"], read_bound)
    return {
        "read_bandwidth_gb_s": rate,
        "read_bound_tokens_per_second": read_bound,
        "bound_tokens_per_second": bound,
        "ratio_to_bound": row["tokens_per_second"] / bound,
    }


def repredict(report: dict[str, Any], cfg: FullscaleConfig) -> dict[str, Any]:
    """`report`'s measured rows predicted again (the planner changed), with the profile it recorded,
    and bounded again."""
    profile = HardwareProfile.from_dict(report["profile"], source="the report's profile")
    config = inspect_config(Path(report["config"]["config"])).config
    rows = [{**row, **predict_row(config, profile, row, cfg)} for row in report["runs"]]
    return {**report, "runs": [{**row, **bounds(row)} for row in rows]}


def run(cfg: FullscaleConfig) -> dict[str, Any]:
    report: dict[str, Any] = {
        "config": {k: str(v) for k, v in asdict(cfg).items() if k != "log"},
        "machine": machine_info(),
    }
    cfg.dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        report["init_seconds"] = ensure_model(cfg)
        files = store_files(cfg.dir)
        cfg.log("measuring this machine's profile (cpm2 plan --measure)")
        if cfg.hardware is not None:
            profile = load_profile(cfg.hardware)
        else:
            options = MeasureOptions.quick(cfg.dir) if cfg.quick_profile else MeasureOptions(scratch=cfg.dir)
            profile = measure_profile(options, name="this-machine")
        report["profile"] = profile.to_dict()
        report["store_bytes"] = sum(p.stat().st_size for p in files)
        report["model_bytes_on_disk"] = sum(p.stat().st_size for p in cfg.dir.rglob("*") if p.is_file())
        begin = time.perf_counter()
        loaded = load_cpm2(cfg.dir, budget=cfg.budget, direct_io=True, window=cfg.window, io_threads=cfg.io_threads)
        report["load_seconds"] = time.perf_counter() - begin
        report["peak_rss_loading_bytes"] = _peak_rss()
        try:
            store = ExpertStore.open(cfg.dir, loaded.model.config)
            plan = loaded.plan
            if plan is None or not plan.is_offloaded:
                raise ConfigError(f"--budget {cfg.budget} holds every expert of {cfg.config}; nothing is offloaded")
            dense = dense_resident_bytes(loaded)
            allowed = dense + plan.budget_bytes + parse_bytes(cfg.slack, name="slack")
            report.update(
                dense_resident_bytes=dense,
                budget_bytes=plan.budget_bytes,
                pool_slots=plan.num_slots,
                bytes_per_expert=store.layout.nbytes,
                num_experts=plan.num_experts,
                slack_bytes=parse_bytes(cfg.slack, name="slack"),
                rss_allowed_bytes=allowed,
            )
            drop_page_cache(model_files(cfg.dir))
            reset_peak_rss()
            report["rss_after_load_bytes"] = _peak_rss()
            report["runs"] = measure(cfg, loaded, store, profile, report)
            report["rss_within_allowed"] = report["peak_rss_decoding_bytes"] <= allowed
        finally:
            loaded.close()
    finally:
        if not cfg.keep:
            shutil.rmtree(cfg.dir, ignore_errors=True)
    return report


def print_report(report: dict[str, Any], console: Console) -> None:
    console.print(
        f"{report['config']['config']}: store {format_bytes(report['store_bytes'])} on disk "
        f"({format_bytes(report['bytes_per_expert'])} per expert, {report['num_experts']} experts), "
        f"budget {format_bytes(report['budget_bytes'])} = {report['pool_slots']} slots"
    )
    table = Table(title="decode, strict mode, expert files dropped from the page cache every step")
    columns = ("batch", "phase", "tok/s", "compute-only", "read GB/s", "read bound", "of bound", "MB read/tok", "hit")
    for col in (*columns, "prefill s", "prefill GB/s", "planned tok/s", "error", "sampled GB/s", "error at it"):
        table.add_column(col, justify="right")
    for r in report["runs"]:
        e = r.get("experts", {})
        table.add_row(
            str(r["batch"]),
            r["phase"],
            f"{r['tokens_per_second']:.2f}",
            f"{r['compute_only_tokens_per_second']:.2f}",
            f"{r['read_bandwidth_gb_s']:.2f}",
            f"{r['read_bound_tokens_per_second']:.2f}",
            f"{r['ratio_to_bound']:.2f}",
            f"{r['storage_bytes_per_token'] / 1e6:.0f}",
            f"{e.get('hit_rate', 0):.2f}",
            f"{r['encode_seconds']:.1f}",
            f"{r.get('encode_storage_bytes_read', 0) / 1e9 / max(r['encode_seconds'], 1e-9):.2f}",
            f"{r['predicted_tokens_per_second']:.2f}",
            f"{r['tokens_per_second_error']:+.0%}",
            f"{r['disk_read_gb_s']['sampled']:.2f}",
            f"{r['at_sampled_rate']['tokens_per_second_error']:+.0%}",
        )
    console.print(table)
    console.print(
        f"RSS: peak while decoding {format_bytes(report['peak_rss_decoding_bytes'])} against dense "
        f"{format_bytes(report['dense_resident_bytes'])} + budget {format_bytes(report['budget_bytes'])} + "
        f"slack {format_bytes(report['slack_bytes'])} = {format_bytes(report['rss_allowed_bytes'])} "
        f"({'within' if report['rss_within_allowed'] else 'OVER'}); after loading "
        f"{format_bytes(report['rss_after_load_bytes'])}; peak while loading "
        f"{format_bytes(report['peak_rss_loading_bytes'])}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = FullscaleConfig()
    parser.add_argument("--config", type=Path, default=defaults.config, help="model shape (config.json)")
    parser.add_argument("--dir", type=Path, default=defaults.dir, help="where the model is written")
    parser.add_argument("--keep", action="store_true", help="keep the model afterwards (the next run reuses it)")
    parser.add_argument("--budget", default=defaults.budget, help="--expert-memory of the offloaded runs")
    parser.add_argument("--group-size", type=int, default=defaults.group_size, help="int4 group size")
    parser.add_argument("--batches", type=int, nargs="+", default=list(defaults.batches))
    parser.add_argument("--steps", type=int, default=defaults.steps, help="timed decode steps per run")
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="steps before the warm run's")
    parser.add_argument("--repeats", type=int, default=defaults.repeats, help="cold and warm runs per batch")
    parser.add_argument("--slack", default=defaults.slack, help="RSS allowed beyond dense + budget")
    parser.add_argument("--out", type=Path, default=defaults.out)
    parser.add_argument("--hardware", help="predict with this profile instead of measuring this machine's")
    parser.add_argument(
        "--from", dest="source", type=Path, help="predict the measured runs of this report again (no new runs)"
    )
    args = parser.parse_args(argv)
    cfg = FullscaleConfig(
        config=args.config,
        dir=args.dir,
        keep=args.keep,
        budget=args.budget,
        group_size=args.group_size,
        batches=tuple(args.batches),
        steps=args.steps,
        warmup=args.warmup,
        repeats=args.repeats,
        hardware=args.hardware,
        slack=args.slack,
        out=args.out,
    )
    report = repredict(json.loads(args.source.read_text()), cfg) if args.source else run(cfg)
    publish(report, out=cfg.out, plot=None, show=print_report, draw=lambda r, p: None, width=140)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
