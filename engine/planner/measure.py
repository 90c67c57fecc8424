"""`cpm2 plan --measure`: this machine's hardware profile, measured with the engine's own code.

Every rate comes from the path a model would take here: matmuls through `engine.model.linear` on
weights of each format (plain float, int8, int4 in this machine's packing; enough of them that
they stream from memory, not cache), expert reads through the provider's `BlobReader` (O_DIRECT,
its thread count, `window` blobs in flight, page cache dropped first) on a scratch file, and the
engine's per-block and per-expert overheads from decode steps of tiny models, where everything but
the Python and the dispatch is negligible.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import torch

from engine.config import ModelConfig, MoEConfig
from engine.experts.cpu import BlobReader, aligned_empty, drop_from_page_cache
from engine.experts.store import BlobLocation
from engine.model import Seq2SeqLM
from engine.model.int4 import quantize_int4
from engine.model.kernels import active_kernels
from engine.model.linear import linear
from engine.model.moe import ExpertDemand
from engine.model.quant import quantize_int8
from engine.planner.profile import (
    FORMATS,
    LARGE_SHAPE,
    LOAD_WINDOW,
    SMALL_SHAPE,
    GpuProfile,
    HardwareProfile,
    MatmulRates,
    OverheadProfile,
    overlapping_part,
)
from engine.summary import RUN_FORMATS

Log = Callable[[str], object]
CPU = torch.device("cpu")


@dataclass(frozen=True, kw_only=True)
class MeasureOptions:
    """How much to measure: the defaults took 18-38 s on this project's 2-core VM; `quick` a few seconds."""

    scratch: Path
    """Where the disk-read file is written (on the disk the experts will live on)."""
    window: int = 4
    """Blobs in flight (`--expert-window`)."""
    io_threads: int = 4
    """The provider's reader threads (`--expert-io-threads`)."""
    matmul_bytes: int = 192 << 20
    """Weights cycled through per format, so each call streams from memory."""
    disk_bytes: int = 512 << 20
    blob_bytes: int = 16 << 20
    """One read: the size of a large expert (NLLB-MoE 54B's int4 experts are 18 MiB)."""
    repeats: int = 3
    large_shape: tuple[int, int] = LARGE_SHAPE
    """The large matrix streaming rates are measured on (the size `MatmulRates` interpolates from)."""
    small_shape: tuple[int, int] = SMALL_SHAPE
    """The small one."""

    @classmethod
    def quick(cls, scratch: Path) -> MeasureOptions:
        """Seconds instead of a minute: smaller matrices (rates are then rougher), one repeat."""
        return cls(
            scratch=scratch,
            matmul_bytes=8 << 20,
            disk_bytes=8 << 20,
            blob_bytes=1 << 20,
            repeats=1,
            large_shape=(1024, 1024),
            small_shape=(512, 512),
        )


def _best(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        begin = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - begin)
    return best


def _weights(fmt: str, count: int, out_features: int, in_features: int, device: torch.device) -> list[Any]:
    generator = torch.Generator().manual_seed(0)
    made: list[Any] = []
    for _ in range(count):
        w = torch.randn(out_features, in_features, generator=generator)
        if fmt == "int8":
            made.append(quantize_int8(w).to(device))
        elif fmt == "int4":
            packing = active_kernels().int4_packing if device.type == "cpu" else None
            made.append(quantize_int4(w, group_size=128, packing=packing or "plain").to(device))
        else:
            made.append(w.to(device=device, dtype=getattr(torch, fmt)))
    return made


def _bytes_per_parameter(fmt: str) -> float:
    return RUN_FORMATS[fmt].bits_per_weight / 8  # the values alone: scales are beside the point here


def _streamed(
    fmt: str, shape: tuple[int, int], options: MeasureOptions, *, budget: int | None = None, device: torch.device = CPU
) -> list[Any]:
    """Enough weights of `shape` (`budget` bytes, default `options.matmul_bytes`) that cycling through
    them streams from memory, not cache."""
    out_features, in_features = shape
    per_weight = out_features * in_features * _bytes_per_parameter(fmt)
    count = max(2, int((budget or options.matmul_bytes) // per_weight))
    return _weights(fmt, count, out_features, in_features, device)


def _per_call(
    fmt: str, weights: Sequence[Any], rows: int, options: MeasureOptions, *, device: torch.device = CPU
) -> float:
    """Seconds per call at `rows` rows, cycling through `weights` (`_streamed`; float, int8 and int4
    weights all have an (out, in) `shape`)."""
    in_features = weights[0].shape[-1]
    x = torch.randn(rows, in_features, dtype=torch.float32 if fmt == "float32" else torch.bfloat16, device=device)
    linear(x, weights[0])  # first call: kernel selection, primitive creation

    def calls() -> None:
        for w in weights:
            linear(x, w)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return _best(calls, options.repeats) / len(weights)


@torch.inference_mode()
def matmul_rates(fmt: str, options: MeasureOptions, *, device: torch.device = CPU) -> MatmulRates:
    """Streaming rates at 1 and 16 rows on a large matrix and at 1 row on a small one, arithmetic
    rate at 256 rows, and the fixed cost of a call (a 128 x 128 matrix)."""
    large, small = options.large_shape, options.small_shape
    large_bytes = large[0] * large[1] * _bytes_per_parameter(fmt)
    small_bytes = small[0] * small[1] * _bytes_per_parameter(fmt)
    # Made once per shape: the 1-, 16- and 256-row calls share the large weights (an eighth of them
    # for 256 rows, which are arithmetic-bound); freed before the small ones are made.
    weights = _streamed(fmt, large, options, device=device)
    many = _per_call(fmt, weights[: max(2, len(weights) // 8)], 256, options, device=device)
    gemv = _per_call(fmt, weights, 1, options, device=device)
    gemv16 = _per_call(fmt, weights, 16, options, device=device)
    del weights
    small_gemv = _per_call(fmt, _streamed(fmt, small, options, device=device), 1, options, device=device)
    call = _per_call(fmt, _streamed(fmt, (128, 128), options, budget=1, device=device), 1, options, device=device)
    return MatmulRates(
        gemv_gb_s=large_bytes / gemv / 1e9,
        gemv16_gb_s=large_bytes / gemv16 / 1e9,
        small_gemv_gb_s=small_bytes / small_gemv / 1e9,
        tflops=2 * 256 * large[0] * large[1] / many / 1e12,
        call_us=call * 1e6,
    )


def gpu_profile(options: MeasureOptions, device: torch.device) -> GpuProfile:
    """The GPU `device`: its memory, pinned host-to-device copy rate, and matmul rates per format."""
    nbytes = 256 << 20
    host = torch.ones(nbytes, dtype=torch.uint8).pin_memory()
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)

    def copy() -> None:
        target.copy_(host, non_blocking=True)
        torch.cuda.synchronize(device)

    copy()
    h2d = nbytes / _best(copy, options.repeats) / 1e9
    free, _ = torch.cuda.mem_get_info(device)
    return GpuProfile(
        name=torch.cuda.get_device_name(device),
        memory_bytes=int(free),
        h2d_gb_s=h2d,
        matmul={fmt: matmul_rates(fmt, options, device=device) for fmt in FORMATS},
    )


def memcpy_gb_s(repeats: int = 3, nbytes: int = 256 << 20) -> float:
    source = torch.ones(nbytes, dtype=torch.uint8)
    target = torch.empty_like(source)
    return nbytes / _best(lambda: target.copy_(source), repeats) / 1e9


def blob_read_gb_s(locations: Sequence[BlobLocation], *, threads: int, window: int) -> float:
    """Read rate (GB/s) of `locations` through the provider's reader: O_DIRECT, `threads` I/O
    threads, `window` blobs in flight (what a step's expert loads get)."""
    seconds = _read_all(locations, threads=threads, window=window, blob_bytes=max(loc.nbytes for loc in locations))
    return sum(loc.nbytes for loc in locations) / seconds / 1e9


def _read_all(locations: Iterable[BlobLocation], *, threads: int, window: int, blob_bytes: int) -> float:
    """Seconds to read `locations` through the provider's reader with `window` blobs in flight."""
    reader = BlobReader(threads=threads, direct=True)
    buffers = [aligned_empty(blob_bytes) for _ in range(window)]
    in_flight: list[Future[None]] = []
    try:
        begin = time.perf_counter()
        for i, location in enumerate(locations):
            if len(in_flight) == window:
                in_flight.pop(0).result()
            done: Future[None] = Future()
            reader.submit(location, buffers[i % window][: location.nbytes], done=_settle(done))
            in_flight.append(done)
        for done in in_flight:
            done.result()
        return time.perf_counter() - begin
    finally:
        reader.close()


def _settle(future: Future[None]) -> Callable[[BaseException | None], None]:
    def done(error: BaseException | None) -> None:
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)

    return done


@contextmanager
def _scratch_file(options: MeasureOptions) -> Iterator[Path]:
    """A file of `options.disk_bytes` random bytes under `options.scratch`, removed afterwards."""
    options.scratch.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="cpm2-plan-", dir=options.scratch)
    path = Path(name)
    try:
        chunk = os.urandom(1 << 20)
        with os.fdopen(fd, "wb") as f:
            for _ in range(options.disk_bytes >> 20):
                f.write(chunk)
        yield path
    finally:
        path.unlink(missing_ok=True)


def _blobs(path: Path, options: MeasureOptions) -> list[BlobLocation]:
    return [
        BlobLocation(path, i * options.blob_bytes, options.blob_bytes)
        for i in range(options.disk_bytes // options.blob_bytes)
    ]


def disk_rates(path: Path, options: MeasureOptions) -> tuple[float, float]:
    """(read GB/s of expert-sized blobs, µs per small read) on the scratch file `path` (`_scratch_file`)."""
    drop_from_page_cache([path])
    rate = blob_read_gb_s(_blobs(path, options), threads=options.io_threads, window=options.window)
    drop_from_page_cache([path])
    small = 4096
    picks = torch.randperm(options.disk_bytes // small, generator=torch.Generator().manual_seed(0))[:64]
    latency = _read_all(
        (BlobLocation(path, int(p) * small, small) for p in picks), threads=1, window=1, blob_bytes=small
    ) / len(picks)
    return rate, latency * 1e6


@torch.inference_mode()
def read_contention(path: Path, options: MeasureOptions, *, fmt: str = "bfloat16") -> float:
    """How many times longer an expert's matmul (16 rows on the small matrix) takes while the
    provider's reader streams the scratch file `path`, against the same matmul alone: the I/O
    threads and their completions share the cores (1.1-1.5x measured on this project's 2-vCPU VM;
    ~1 on a machine with cores to spare)."""
    stop = threading.Event()
    blobs = _blobs(path, options)
    weights = _streamed(fmt, options.small_shape, options)

    def stream() -> None:
        while not stop.is_set():
            drop_from_page_cache([path])
            _read_all(blobs, threads=options.io_threads, window=options.window, blob_bytes=options.blob_bytes)

    ratios = []
    for _ in range(options.repeats):
        alone = _per_call(fmt, weights, 16, options)
        stop.clear()
        reader = threading.Thread(target=stream, name="cpm2-plan-reads", daemon=True)
        reader.start()
        try:
            time.sleep(0.05)  # reads in flight before the timing starts
            during = _per_call(fmt, weights, 16, options)
        finally:
            stop.set()
            reader.join()
        ratios.append(during / alone)
    return max(1.0, statistics.median(ratios))


def _tiny_config(*, decoder_layers: int, moe: bool) -> ModelConfig:
    experts = MoEConfig(num_experts=8, router="learned", encoder_layers=(), decoder_layers=tuple(range(decoder_layers)))
    return ModelConfig(
        vocab_size=1100,
        d_model=64,
        num_heads=2,
        d_kv=32,
        d_ff=128,
        num_encoder_layers=1,
        num_decoder_layers=decoder_layers,
        activation="relu",
        is_gated_ffn=False,
        moe=experts if moe else None,
    )


@dataclass
class _Counting:
    """An expert provider that counts the experts it serves (to know how many a step computed)."""

    inner: Any
    served: int = 0

    def fetch(self, layer: Any, demand: Sequence[ExpertDemand], hidden_ND: torch.Tensor) -> Any:
        self.served += len(demand)
        yield from self.inner.fetch(layer, demand, hidden_ND)


#: A tiny model's timing: the best of this many runs of this many teacher-forced decode steps.
DECODE_RUNS, DECODE_STEPS = 5, 48


def _tiny_model(config: ModelConfig) -> Seq2SeqLM:
    torch.manual_seed(0)
    return Seq2SeqLM(config).eval()


def _step_seconds(config: ModelConfig, *, batch: int, steps: int = DECODE_STEPS) -> tuple[float, float]:
    """(seconds per decode step, experts computed per step) of a random tiny model, best of 5 runs."""
    return _decode_seconds(_tiny_model(config), batch=batch, steps=steps)


#: Decoder depths a block's own time is fitted over.
BLOCK_DEPTHS = (2, 4, 8)


def block_fit(*, batch: int, rounds: int = 5) -> tuple[float, float]:
    """(seconds per decode step outside its blocks, seconds per dense decoder block) of tiny models
    at `batch` rows: a least-squares line through their step times at `BLOCK_DEPTHS` blocks, each
    depth's time the best of `rounds` runs taken in turn with the others'. Two depths measured one
    after the other put this VM's drift into the slope: from 2 and 8 blocks, block_us came out at
    123 to 485 µs in runs an hour apart, and a 12-block model's predicted step moved by 4 ms."""
    models = {depth: _tiny_model(_tiny_config(decoder_layers=depth, moe=False)) for depth in BLOCK_DEPTHS}
    best = dict.fromkeys(BLOCK_DEPTHS, float("inf"))
    for _ in range(rounds):
        for depth, model in models.items():
            best[depth] = min(best[depth], _decode_seconds(model, batch=batch, runs=1)[0])
    slope, intercept = statistics.linear_regression(list(best), list(best.values()))
    return max(0.0, intercept), max(0.0, slope)


@torch.inference_mode()
def _decode_seconds(
    model: Seq2SeqLM, *, batch: int, steps: int = DECODE_STEPS, runs: int = DECODE_RUNS
) -> tuple[float, float]:
    """(seconds per teacher-forced decode step, experts computed per step) of `model`, best of `runs`."""
    counters = [_Counting(layer.expert_provider) for layer in model.moe_layers()]
    for layer, counter in zip(model.moe_layers(), counters, strict=True):
        layer.expert_provider = counter
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(2, vocab, (batch, 8), generator=generator)
    valid = torch.ones_like(ids, dtype=torch.bool)
    forced = torch.randint(2, vocab, (steps, batch, 1), generator=generator)
    best = float("inf")
    try:
        for _ in range(runs):
            state = model.start_decoding(model.encode(model.embed(ids), valid), valid, capacity=steps)
            for c in counters:
                c.served = 0
            begin = time.perf_counter()
            for t in range(steps):
                model.logits(model.decode(model.embed(forced[t]), state))
            best = min(best, (time.perf_counter() - begin) / steps)
    finally:
        for layer, counter in zip(model.moe_layers(), counters, strict=True):
            layer.expert_provider = counter.inner
    return best, sum(c.served for c in counters) / steps  # counted over the last run


def provider_load_us(scratch: Path, *, disk_latency_us: float) -> tuple[float, float]:
    """(`load_us`, `load_window_us`): the offloading provider's own time per expert load
    (bookkeeping, handing the read to an I/O thread, the wake-ups on its completion), beyond the read
    itself, with one load in flight and with `LOAD_WINDOW`. A tiny MoE model decoded offloaded in
    strict mode, prefetch off (loads of a few KiB, so a read is its latency), against the same model
    resident, per load: at batch 1 (one expert a layer: one load at a time) and at batch 16 (most of
    a layer's 8 experts: several loads queued, up to the window in flight)."""
    from engine.offload import OffloadConfig, load_for_inference
    from engine.weights.init import write_random_model

    per_load = []  # (µs per load, loads in flight) at batch 1, then 16
    with tempfile.TemporaryDirectory(prefix="cpm2-plan-", dir=scratch) as tmp:
        model_dir = Path(tmp) / "model"
        write_random_model(_tiny_config(decoder_layers=8, moe=True), model_dir, progress=False)
        # Each batch's resident and offloaded runs back to back: with the models loaded once and the
        # resident runs of both batches first, this VM's drift between them spread load_window_us
        # over 128-161 µs in six measurements, against 145-153 in nine this way.
        for batch in (1, 16):
            resident = load_for_inference(model_dir, offload=OffloadConfig(expert_memory="100%"), progress=False)
            try:
                resident_step, _ = _decode_seconds(resident.model, batch=batch)
            finally:
                resident.close()
            offload = OffloadConfig(expert_memory="25%", direct_io=True, prefetch=False, window=LOAD_WINDOW)
            loaded = load_for_inference(model_dir, offload=offload, progress=False)
            try:
                assert loaded.provider is not None
                before = loaded.provider.stats.snapshot()
                offloaded_step, _ = _decode_seconds(loaded.model, batch=batch)
                stats = loaded.provider.stats - before
            finally:
                loaded.close()
            # Transfers are counted over all the runs (the tiny model's encoder has no MoE layer, so
            # every one is a decode step's): the loads of the best run's steps are not known apart,
            # so a step's loads are the average over every step decoded.
            loads = stats.transfers / (DECODE_RUNS * DECODE_STEPS)
            if loads <= 0:
                return 0.0, 0.0
            in_flight = min(max(1.0, stats.transfers / max(1, stats.layer_calls)), LOAD_WINDOW)
            own = (offloaded_step - resident_step) / loads * 1e6 - disk_latency_us / in_flight
            per_load.append((max(0.0, own), in_flight))
    (alone, _), (together, in_flight) = per_load
    # Measured with `in_flight` loads queued a layer; reported as with `LOAD_WINDOW` in flight.
    overlapping = overlapping_part(alone, together, in_flight=in_flight)
    return alone, alone - overlapping + overlapping / LOAD_WINDOW


def overheads(call_us: float, *, load_us: float, load_window_us: float | None = None) -> OverheadProfile:
    """Per-step, per-block, per-MoE-layer and per-expert costs from tiny models' decode steps.

    A tiny model's matmuls cost their call floor (`call_us`, subtracted per call), the rest is the
    engine's own time. Blocks: the slope of step time over decoder depth (`block_fit`), at 1 row
    and at 16. MoE: 8 MoE blocks against 8 dense ones, at batch 1 (one expert per layer) and 8
    (several), solved for the layer's and each expert's share. The provider's per-load time
    (`load_us`, `load_window_us`) needs a store on disk and is measured by `provider_load_us`.
    """
    calls = 6 * call_us * 1e-6  # a block's: fused q/k/v, output, cross query, cross output, FFN in and out
    outside, per_block = block_fit(batch=1)
    block = max(0.0, per_block - calls)
    block16 = max(0.0, block_fit(batch=16)[1] - calls)
    step = max(0.0, outside - call_us * 1e-6)  # less the head's call
    moe_extra = []
    experts = []
    for batch in (1, 8):
        dense, _ = _step_seconds(_tiny_config(decoder_layers=8, moe=False), batch=batch)
        sparse, served = _step_seconds(_tiny_config(decoder_layers=8, moe=True), batch=batch)
        moe_extra.append((sparse - dense) / 8)
        experts.append(served / 8)
    # extra per layer = layer + experts x (expert + its 2 calls) - the dense FFN's 2 calls
    slope = (moe_extra[1] - moe_extra[0]) / max(1e-9, experts[1] - experts[0])
    expert = max(0.0, slope - 2 * call_us * 1e-6)
    layer = max(0.0, moe_extra[0] - experts[0] * slope + 2 * call_us * 1e-6)
    return OverheadProfile(
        step_us=step * 1e6,
        block_us=block * 1e6,
        block16_us=block16 * 1e6,
        moe_layer_us=layer * 1e6,
        expert_us=expert * 1e6,
        load_us=load_us,
        load_window_us=load_window_us,
    )


def _ram_bytes() -> int:
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(pages)


def remeasure_cpu(
    profile: HardwareProfile, options: MeasureOptions, *, formats: Sequence[str] = FORMATS
) -> HardwareProfile:
    """`profile` with this machine's matmul rates of `formats` and copy rate measured again now (a
    few seconds), for machines whose speed drifts (shared VMs): a prediction compared with a run is
    made from the rates of the minutes around it. The engine overheads are kept: measured from
    differences of tiny models' step times, one short reading swings by 2x."""
    cpu = {**profile.cpu, **{fmt: matmul_rates(fmt, options) for fmt in formats}}
    return dataclasses.replace(profile, cpu=cpu, memcpy_gb_s=memcpy_gb_s())


def measure_profile(options: MeasureOptions, *, name: str | None = None, log: Log = lambda _: None) -> HardwareProfile:
    """This machine's profile, with its first GPU's when torch sees one."""
    cpu = {}
    for fmt in FORMATS:
        log(f"matmul rates: {fmt}")
        cpu[fmt] = matmul_rates(fmt, options)
    log("memory copy")
    copy = statistics.median(memcpy_gb_s() for _ in range(options.repeats))
    with _scratch_file(options) as path:  # written once: both measurements read it
        log(f"disk reads ({options.disk_bytes >> 20} MiB under {options.scratch})")
        read, latency = disk_rates(path, options)
        log("matmuls while the reader streams")
        contention = read_contention(path, options)
    log("engine overheads (tiny models)")
    load, load_window = provider_load_us(options.scratch, disk_latency_us=latency)
    overhead = overheads(statistics.median(r.call_us for r in cpu.values()), load_us=load, load_window_us=load_window)
    gpu = None
    if torch.cuda.is_available():
        log("GPU: host-to-device copies and matmul rates")
        gpu = gpu_profile(options, torch.device("cuda"))
    host = platform.node() or "this machine"
    return HardwareProfile(
        name=name or f"{host}-measured",
        source=(
            f"measured by cpm2 plan --measure on {host} ({platform.machine()}, torch {torch.__version__}), "
            f"{date.today().isoformat()}; disk: {options.scratch}"
        ),
        cpu_cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1),
        ram_bytes=_ram_bytes(),
        memcpy_gb_s=copy,
        disk_read_gb_s=read,
        disk_latency_us=latency,
        read_contention=contention,
        cpu=cpu,
        overhead=overhead,
        gpu=gpu,
    )
