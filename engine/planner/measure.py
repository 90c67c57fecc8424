"""`cpm2 plan --measure`: this machine's hardware profile, measured with the engine's own code.

Every rate comes from the path a model would take here: matmuls through `engine.model.linear` on
weights of each format (plain float, int8, int4 in this machine's packing; enough of them that
they stream from memory, not cache), expert reads through the provider's `BlobReader` (O_DIRECT,
its thread count, `window` blobs in flight, page cache dropped first) on a scratch file, and the
engine's per-block and per-expert overheads from decode steps of tiny models, where everything but
the Python and the dispatch is negligible.
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import torch

from engine.config import ModelConfig, MoEConfig
from engine.experts.cpu import BlobReader, aligned_empty
from engine.experts.store import BlobLocation
from engine.model import Seq2SeqLM
from engine.model.int4 import quantize_int4
from engine.model.kernels import active_kernels
from engine.model.linear import linear
from engine.model.moe import ExpertDemand
from engine.model.quant import quantize_int8
from engine.planner.profile import FORMATS, HardwareProfile, MatmulRates, OverheadProfile

Log = Callable[[str], object]


@dataclass(frozen=True, kw_only=True)
class MeasureOptions:
    """How much to measure: the defaults take about a minute on 2 cores; `quick` seconds (tests)."""

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

    @classmethod
    def quick(cls, scratch: Path) -> MeasureOptions:
        return cls(scratch=scratch, matmul_bytes=8 << 20, disk_bytes=8 << 20, blob_bytes=1 << 20, repeats=1)


def _best(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        begin = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - begin)
    return best


def _weights(fmt: str, count: int, out_features: int, in_features: int) -> list[Any]:
    generator = torch.Generator().manual_seed(0)
    made: list[Any] = []
    for _ in range(count):
        w = torch.randn(out_features, in_features, generator=generator)
        if fmt == "int8":
            made.append(quantize_int8(w))
        elif fmt == "int4":
            packing = active_kernels().int4_packing or "plain"
            made.append(quantize_int4(w, group_size=128, packing=packing))
        else:
            made.append(w.to(getattr(torch, fmt)))
    return made


def _bytes_per_parameter(fmt: str) -> float:
    return {"float32": 4.0, "bfloat16": 2.0, "int8": 1.0, "int4": 0.5}[fmt]


@torch.inference_mode()
def matmul_rates(fmt: str, options: MeasureOptions) -> MatmulRates:
    """Streaming rate at 1 and 16 rows, arithmetic rate at 256 rows, and the fixed cost of a call."""
    out_features, in_features = 4096, 1024
    per_weight = out_features * in_features * _bytes_per_parameter(fmt)
    count = max(2, int(options.matmul_bytes // per_weight))
    weights = _weights(fmt, count, out_features, in_features)
    act = torch.float32 if fmt == "float32" else torch.bfloat16

    def sweep(rows: int, group: Sequence[Any]) -> float:
        x = torch.randn(rows, in_features, dtype=act)
        linear(x, group[0])  # first call: kernel selection, primitive creation
        return _best(lambda: [linear(x, w) for w in group], options.repeats) / len(group)

    gemv = sweep(1, weights)
    gemv16 = sweep(16, weights)
    many = sweep(256, weights[: max(1, len(weights) // 8)])
    small = _weights(fmt, 1, 128, 128)
    x = torch.randn(1, 128, dtype=act)
    linear(x, small[0])
    call = _best(lambda: [linear(x, small[0]) for _ in range(200)], options.repeats) / 200
    return MatmulRates(
        gemv_gb_s=per_weight / gemv / 1e9,
        gemv16_gb_s=per_weight / gemv16 / 1e9,
        tflops=2 * 256 * out_features * in_features / many / 1e12,
        call_us=call * 1e6,
    )


def memcpy_gb_s(repeats: int = 3, nbytes: int = 256 << 20) -> float:
    source = torch.ones(nbytes, dtype=torch.uint8)
    target = torch.empty_like(source)
    return nbytes / _best(lambda: target.copy_(source), repeats) / 1e9


def _drop_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


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


def disk_rates(options: MeasureOptions) -> tuple[float, float]:
    """(read GB/s of expert-sized blobs, µs per small read) on a scratch file under `options.scratch`."""
    options.scratch.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="cpm2-plan-", dir=options.scratch)
    path = Path(name)
    try:
        chunk = os.urandom(1 << 20)
        with os.fdopen(fd, "wb") as f:
            for _ in range(options.disk_bytes >> 20):
                f.write(chunk)
        blobs = options.disk_bytes // options.blob_bytes
        _drop_page_cache(path)
        rate = blob_read_gb_s(
            [BlobLocation(path, i * options.blob_bytes, options.blob_bytes) for i in range(blobs)],
            threads=options.io_threads,
            window=options.window,
        )
        _drop_page_cache(path)
        small = 4096
        picks = torch.randperm(options.disk_bytes // small, generator=torch.Generator().manual_seed(0))[:64]
        latency = _read_all(
            (BlobLocation(path, int(p) * small, small) for p in picks), threads=1, window=1, blob_bytes=small
        ) / len(picks)
        return rate, latency * 1e6
    finally:
        path.unlink(missing_ok=True)


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


@torch.inference_mode()
def _step_seconds(config: ModelConfig, *, batch: int, steps: int = 48) -> tuple[float, float]:
    """(seconds per decode step, experts computed per step) of a random tiny model, best of 3 runs."""
    torch.manual_seed(0)
    model = Seq2SeqLM(config).eval()
    counters = [_Counting(layer.expert_provider) for layer in model.moe_layers()]
    for layer, counter in zip(model.moe_layers(), counters, strict=True):
        layer.expert_provider = counter
    ids = torch.randint(2, config.vocab_size, (batch, 8))
    valid = torch.ones_like(ids, dtype=torch.bool)
    forced = torch.randint(2, config.vocab_size, (steps, batch, 1))
    best = float("inf")
    for _ in range(3):
        state = model.start_decoding(model.encode(model.embed(ids), valid), valid, capacity=steps)
        for c in counters:
            c.served = 0
        begin = time.perf_counter()
        for t in range(steps):
            model.logits(model.decode(model.embed(forced[t]), state))
        best = min(best, (time.perf_counter() - begin) / steps)
    return best, sum(c.served for c in counters) / (3 * steps)


def overheads(call_us: float) -> OverheadProfile:
    """Per-step, per-block, per-MoE-layer and per-expert costs from tiny models' decode steps.

    A tiny model's matmuls cost their call floor (`call_us`, subtracted per call), the rest is the
    engine's own time. Blocks: the slope between 2 and 8 dense decoder blocks. MoE: 8 MoE blocks
    against 8 dense ones, at batch 1 (one expert per layer) and 8 (several), solved for the layer's
    and each expert's share. The provider's per-load bookkeeping is not measured here (it needs a
    store on disk); it is taken as one expert's overhead.
    """
    calls_per_block = 6  # fused q/k/v, output, cross query, cross output, FFN in and out
    short, _ = _step_seconds(_tiny_config(decoder_layers=2, moe=False), batch=1)
    long, _ = _step_seconds(_tiny_config(decoder_layers=8, moe=False), batch=1)
    block = max(0.0, (long - short) / 6 - calls_per_block * call_us * 1e-6)
    step = max(0.0, short - 2 * (block + calls_per_block * call_us * 1e-6) - call_us * 1e-6)
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
        moe_layer_us=layer * 1e6,
        expert_us=expert * 1e6,
        load_us=expert * 1e6,
    )


def _ram_bytes() -> int:
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(pages)


def measure_profile(options: MeasureOptions, *, name: str | None = None, log: Log = lambda _: None) -> HardwareProfile:
    """This machine's profile (CPU only: a GPU's rates are not measured here)."""
    cpu = {}
    for fmt in FORMATS:
        log(f"matmul rates: {fmt}")
        cpu[fmt] = matmul_rates(fmt, options)
    log("memory copy")
    copy = statistics.median(memcpy_gb_s() for _ in range(options.repeats))
    log(f"disk reads ({options.disk_bytes >> 20} MiB under {options.scratch})")
    read, latency = disk_rates(options)
    log("engine overheads (tiny models)")
    overhead = overheads(statistics.median(r.call_us for r in cpu.values()))
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
        cpu=cpu,
        overhead=overhead,
    )
