"""Shared pieces of the offloading benchmarks: checkpoints, token traces, page cache, cpm2 runner.

Random weights collapse routing under greedy decoding (the same token repeats, so the same experts
do), which would flatter every cache. These benchmarks therefore decode *teacher-forced random
tokens*: every step feeds a seeded random id per row, and the routing each layer saw is recorded
and reported. All systems decode the same ids.

"Cold page cache" runs call `posix_fadvise(DONTNEED)` on every checkpoint / store file before each
decode step (outside the timed region), so every byte a step needs comes from storage, as in the
peer measurements of research/offload-anchors.md §4.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.experts.cpu import drop_from_page_cache
from engine.experts.stats import ExpertStats
from engine.experts.store import STORE_DIR, ExpertStore
from engine.model import ExpertWeights, MoELayerKey
from engine.offload import InferenceModel, OffloadConfig, load_for_inference
from engine.planner.measure import blob_read_gb_s
from engine.planner.recording import RoutingRecorder, unwrap

#: HF SwitchTransformersConfig of the Switch-like benchmark model: every block sparse (6 + 6 MoE
#: layers), 64 experts of d_model 512 x d_ff 2048: 4.2 MB per bf16 expert, 3.2 GB of experts.
SWITCH_CONFIG: dict[str, Any] = {
    "vocab_size": 8192,
    "d_model": 512,
    "d_kv": 64,
    "d_ff": 2048,
    "num_heads": 8,
    "num_layers": 6,
    "num_decoder_layers": 6,
    "num_sparse_encoder_layers": 6,
    "num_sparse_decoder_layers": 6,
    "num_experts": 64,
    "expert_capacity": 64,
    "decoder_start_token_id": 0,
    "pad_token_id": 0,
    "eos_token_id": 1,
}

#: NLLB-MoE's architecture at a small width (HF `NllbMoeConfig`): top-2 routing over 128 experts with
#: biases in every 4th block of 12 + 12, d_model 512, experts of d_ff 1024 (2.1 MB in bf16), 1.6 GB
#: of experts in 6 MoE layers.
NLLB_MOE_CONFIG: dict[str, Any] = {
    "vocab_size": 8192,
    "d_model": 512,
    "encoder_layers": 12,
    "decoder_layers": 12,
    "encoder_attention_heads": 8,
    "decoder_attention_heads": 8,
    "encoder_ffn_dim": 1024,
    "decoder_ffn_dim": 1024,
    "num_experts": 128,
    "encoder_sparse_step": 4,
    "decoder_sparse_step": 4,
    "max_position_embeddings": 256,
    "pad_token_id": 1,
    "eos_token_id": 2,
    "decoder_start_token_id": 2,
}

#: `cpm2 init --preset small` overrides for the CPM-2-architecture model of similar size: gated
#: GELU experts (d_ff 1024 x 3 matrices = 3.1 MB in bf16), 64 experts in all 12 blocks, 2.4 GB.
CPM2_OVERRIDES = ["moe.num_experts=64", "vocab_size=8192"]

CACHE_ROOT = Path(".cache/bench")


def _run(cmd: Sequence[str]) -> None:
    subprocess.run([sys.executable, "-m", *cmd], check=True)


def _ensure_hf_checkpoints(
    name: str, model_class: str, config: dict[str, Any], root: Path, seed: int
) -> tuple[Path, Path]:
    """(HF directory, native cpm2 directory) of a random transformers `model_class` (its config
    class named alike) in bf16, each built once."""
    hf_dir, native_dir = root / f"{name}-offload-hf", root / f"{name}-offload-cpm2"
    if not (hf_dir / "config.json").exists():
        import transformers

        model_cls = getattr(transformers, model_class)
        torch.manual_seed(seed)
        model = model_cls(model_cls.config_class(**config))
        model.to(torch.bfloat16).save_pretrained(hf_dir, max_shard_size="500MB")
        del model
    if not (native_dir / "config.json").exists():
        _run(["cpm2", "convert", "hf", str(hf_dir), str(native_dir)])
    return hf_dir, native_dir


def ensure_switch_checkpoints(root: Path = CACHE_ROOT, *, seed: int = 0) -> tuple[Path, Path]:
    """(HF directory, native cpm2 directory) of the Switch-like model in bf16, built once."""
    return _ensure_hf_checkpoints("switch", "SwitchTransformersForConditionalGeneration", SWITCH_CONFIG, root, seed)


def ensure_nllb_moe_checkpoints(root: Path = CACHE_ROOT, *, seed: int = 0) -> tuple[Path, Path]:
    """(HF directory, native cpm2 directory) of the NLLB-MoE-shaped model in bf16, built once."""
    return _ensure_hf_checkpoints("nllb-moe", "NllbMoeForConditionalGeneration", NLLB_MOE_CONFIG, root, seed)


def ensure_cpm2_checkpoint(root: Path = CACHE_ROOT, *, seed: int = 0) -> Path:
    """Native CPM-2-architecture model (centroid routing, gated GELU) of similar size, bf16."""
    path = root / "cpm2-offload"
    if not (path / "config.json").exists():
        args = ["cpm2", "init", "--preset", "small", "--out", str(path), "--dtype", "bfloat16"]
        args += ["--seed", str(seed), "--quiet"]
        for override in CPM2_OVERRIDES:
            args += ["--set", override]
        _run(args)
    return path


def random_ids(shape: tuple[int, ...], *, vocab: int, seed: int) -> torch.Tensor:
    """Seeded random token ids avoiding pad (0) and eos (1)."""
    return torch.randint(2, vocab, shape, generator=torch.Generator().manual_seed(seed))


def model_files(*dirs: Path) -> list[Path]:
    """Every tensor file (safetensors and offload folders' .dat files) below `dirs`."""
    found: list[Path] = []
    for d in dirs:
        found += [p for p in d.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".dat", ".bin")]
    return sorted(found)


def store_files(model_dir: Path) -> list[Path]:
    """The expert store's files: what a cold (disk-tier) step drops from the page cache.

    The dense checkpoint is left cached: a server touches its pages every step, so they are never
    cold in service, and dropping them too made each timed step fault the mapped dense weights back
    in (5 MB a token on the CPM-2-like model at batch 1), a cost neither users nor `cpm2 plan` see.
    """
    return model_files(model_dir / STORE_DIR)


#: Evict files from the page cache (the research notes' §4.4: pages a live mmap holds may survive).
drop_page_cache = drop_from_page_cache


def read_through(paths: Iterable[Path]) -> None:
    """Read `paths` once, so the page cache holds them (a warm run)."""
    for path in paths:
        with open(path, "rb") as f:
            while f.read(64 << 20):
                pass


def measure_read_bandwidth(paths: Sequence[Path], *, readers: int, total_bytes: int = 512 << 20) -> float:
    """Cold sequential-chunk read bandwidth (GB/s) with `readers` threads of 8 MiB preads."""
    from concurrent.futures import ThreadPoolExecutor

    drop_page_cache(paths)
    chunk = 8 << 20
    jobs: list[tuple[Path, int]] = []
    for path in paths:
        size = path.stat().st_size
        jobs += [(path, off) for off in range(0, size, chunk)]  # the last one may be short
        if len(jobs) * chunk >= total_bytes:
            break
    jobs = jobs[: total_bytes // chunk]

    def read(job: tuple[Path, int]) -> int:
        fd = os.open(job[0], os.O_RDONLY)
        try:
            return len(os.pread(fd, chunk, job[1]))
        finally:
            os.close(fd)

    begin = time.perf_counter()
    with ThreadPoolExecutor(readers) as pool:
        done = sum(pool.map(read, jobs))
    return done / (time.perf_counter() - begin) / 1e9


def store_read_gb_s(
    store: ExpertStore, *, threads: int = 4, window: int = 4, count: int = 96, seed: int | None = None
) -> float:
    """Cold read rate (GB/s) of `count` random experts of `store` (drawn with `seed`; the same
    experts every time without one) through the provider's own reader (O_DIRECT, `threads` I/O
    threads, `window` blobs in flight)."""
    generator = torch.Generator().manual_seed(len(store.keys) if seed is None else seed)
    picks = torch.randint(len(store.keys) * store.num_experts, (count,), generator=generator).tolist()
    locations = [store.location(store.keys[i // store.num_experts], i % store.num_experts) for i in picks]
    drop_page_cache(sorted({loc.path for loc in locations}))
    return blob_read_gb_s(locations, threads=threads, window=window)


@dataclass
class DiskSampler:
    """The store's cold read rate sampled between a run's steps, so that it stands for the disk over
    the run's whole duration rather than for a second or two either side of it.

    This VM's virtual disk moves by up to 2x within minutes (1.6-2.8 GB/s in readings around the
    NLLB-MoE 54B runs whose own reads ran at 3.0-3.4): a reading before and after a run can miss
    what the run saw in either direction. A few experts are read after the encoder pass and after
    every timed step, outside the timed region, each time other ones (the page cache is dropped
    before the next step anyway); the rate is the bytes of all samples over their seconds."""

    store: ExpertStore
    count: int = 8
    threads: int = 4
    window: int = 4
    samples: int = 0
    seconds: float = 0.0

    def __call__(self) -> None:
        seed = self.samples + 1_000_003 * len(self.store.keys)  # other experts each time
        rate = store_read_gb_s(self.store, threads=self.threads, window=self.window, count=self.count, seed=seed)
        self.samples += 1
        self.seconds += self.count * self.store.layout.nbytes / (rate * 1e9)

    @property
    def bytes_read(self) -> int:
        return self.samples * self.count * self.store.layout.nbytes

    @property
    def gb_s(self) -> float | None:
        return self.bytes_read / self.seconds / 1e9 if self.seconds > 0 else None


def storage_read_bytes() -> int:
    """Bytes this process (its I/O threads included) has read from storage so far (`read_bytes` of
    /proc/self/io). Per process, not per device: another process reading the same disk meanwhile
    (a test run, a build) is not counted, which machine-wide /sys/block counters would do."""
    for line in Path("/proc/self/io").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == "read_bytes":
            return int(value)
    return 0


#: One MoE layer call: its layer ("decoder.3") and the experts it needed (bench/cache_policies.py).
Call = tuple[str, tuple[int, ...]]


@dataclass
class DecodeRun:
    """One timed teacher-forced decode."""

    tokens_per_second: float
    seconds: float
    tokens: int
    stats: ExpertStats | None
    routing: dict[str, Any] = field(default_factory=dict)
    storage_bytes_read: int = 0
    #: Tokens per expert of each decoder layer over the timed steps (not in `to_dict`: bulky).
    expert_counts: dict[str, list[int]] = field(default_factory=dict)
    #: The encoder pass (prefill) of the batch: seconds, bytes it read from storage, and the
    #: provider's counters over it.
    encode_seconds: float = 0.0
    encode_storage_bytes_read: int = 0
    encode_stats: ExpertStats | None = None
    #: Tokens per expert of each encoder layer in that pass (not in `to_dict`: bulky).
    encoder_expert_counts: dict[str, list[int]] = field(default_factory=dict)
    #: Every layer call from the encoder pass to the last timed step (`RoutingRecorder.trace`).
    routing_trace: dict[str, list[list[tuple[int, int]]]] = field(default_factory=dict)
    #: The store's read rate sampled between the run's steps (`DiskSampler`), where it was.
    sampled_read_gb_s: float | None = None

    @property
    def encode_transfers(self) -> int:
        """Expert loads the encoder pass needed."""
        return self.encode_stats.transfers if self.encode_stats is not None else 0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "tokens_per_second": self.tokens_per_second,
            "seconds": self.seconds,
            "tokens": self.tokens,
            "routing": self.routing,
            "storage_bytes_read": self.storage_bytes_read,
            "storage_bytes_per_token": self.storage_bytes_read / max(1, self.tokens),
            "encode_seconds": self.encode_seconds,
            "encode_transfers": self.encode_transfers,
            "encode_storage_bytes_read": self.encode_storage_bytes_read,
        }
        if self.sampled_read_gb_s is not None:
            out["sampled_read_gb_s"] = self.sampled_read_gb_s
        if self.encode_stats is not None:
            out["encode_experts"] = self.encode_stats.to_dict()
        if self.stats is not None:
            out["experts"] = self.stats.to_dict()
            out["experts_per_layer"] = self.stats.layers_to_dict()
            out["bytes_moved_per_token"] = self.stats.bytes_moved / max(1, self.tokens)
        return out


def load_cpm2(native_dir: Path, *, budget: str | None, device: str = "cpu", **offload: Any) -> InferenceModel:
    """cpm2 in bf16, resident (`budget=None` or "100%") or offloaded at `budget`."""
    config = OffloadConfig(expert_memory=budget or "100%", **offload)
    return load_for_inference(native_dir, dtype="bfloat16", device=device, offload=config, progress=False)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def decode_cpm2(
    loaded: InferenceModel,
    *,
    batch: int,
    steps: int,
    warmup: int = 4,
    source_len: int = 32,
    seed: int = 0,
    cold_files: Sequence[Path] = (),
    sampler: DiskSampler | None = None,
) -> DecodeRun:
    """Teacher-forced decode of `steps` random tokens for `batch` rows; only the steps are timed.
    A `sampler` reads the disk after the encoder pass and after every timed step (untimed); its
    rate is the run's `sampled_read_gb_s`."""
    model = loaded.model
    device = model.embed.weight.device
    vocab = model.config.vocab_size
    ids = random_ids((batch, source_len), vocab=vocab, seed=seed).to(device)
    valid = torch.ones_like(ids, dtype=torch.bool)
    forced = random_ids((warmup + steps, batch), vocab=vocab, seed=seed + 1).to(device)
    recorder = RoutingRecorder(model.moe_layers())
    try:
        if cold_files:
            drop_page_cache(cold_files)
        encode_before = loaded.provider.stats.snapshot() if loaded.provider else None
        encode_read_before = storage_read_bytes()
        _sync(device)
        encode_begin = time.perf_counter()
        state = model.start_decoding(model.encode(model.embed(ids), valid), valid, capacity=warmup + steps)
        _sync(device)
        encode_seconds = time.perf_counter() - encode_begin
        encode_storage = storage_read_bytes() - encode_read_before
        encode_stats = (loaded.provider.stats - encode_before) if loaded.provider and encode_before else None
        encoder_counts = recorder.stack_counts("encoder")
        if sampler is not None:
            sampler()
        for t in range(warmup):
            model.logits(model.decode(model.embed(forced[t].unsqueeze(1)), state))
        recorder.counts = {k: torch.zeros_like(v) for k, v in recorder.counts.items()}
        recorder.distinct = []
        before = loaded.provider.stats.snapshot() if loaded.provider else None
        elapsed = 0.0
        storage = 0
        for t in range(warmup, warmup + steps):
            if cold_files:
                drop_page_cache(cold_files)
            read_before = storage_read_bytes()
            _sync(device)
            begin = time.perf_counter()
            model.logits(model.decode(model.embed(forced[t].unsqueeze(1)), state))
            _sync(device)
            elapsed += time.perf_counter() - begin
            storage += storage_read_bytes() - read_before
            if sampler is not None:
                sampler()
        stats = (loaded.provider.stats - before) if loaded.provider and before else None
        return DecodeRun(
            batch * steps / elapsed,
            elapsed,
            batch * steps,
            stats,
            recorder.summary(),
            storage,
            recorder.decoder_counts(),
            encode_seconds=encode_seconds,
            encode_storage_bytes_read=encode_storage,
            encode_stats=encode_stats,
            encoder_expert_counts=encoder_counts,
            routing_trace=recorder.trace(),
            sampled_read_gb_s=sampler.gb_s if sampler is not None else None,
        )
    finally:
        unwrap(model.moe_layers())


def expert_weights_of(loaded: InferenceModel, key: MoELayerKey, expert: int) -> ExpertWeights:
    """An expert's weights from a resident model (for timing experiments)."""
    layer = next(m for m in loaded.model.moe_layers() if m.key == key)
    module = layer.experts[expert]
    return module.weights()  # type: ignore[operator]


def time_loads(model_dir: Path, *, count: int = 64, window: int = 4, io_threads: int = 4, direct: bool = True) -> float:
    """Seconds per expert load with `window` loads in flight and nothing else running.

    The "transfer-only" time of the order-policy measurement: the same reader, blob sizes and
    concurrency as a decode step's loads, without the compute they normally overlap with.
    """
    from engine.experts.cpu import CpuTransfers
    from engine.experts.pool import PoolEntry
    from engine.experts.store import ExpertStore
    from engine.weights.loader import inspect_checkpoint

    info = inspect_checkpoint(model_dir)
    store = ExpertStore.open(model_dir, info.config)
    transfers = CpuTransfers(
        store, num_slots=window, window=window, dtype=store.dtype, io_threads=io_threads, direct=direct
    )
    gen = torch.Generator().manual_seed(0)
    layers = torch.randint(len(store.keys), (count,), generator=gen).tolist()
    experts = torch.randint(store.num_experts, (count,), generator=gen).tolist()
    picks = [(store.keys[layer], expert) for layer, expert in zip(layers, experts, strict=True)]
    in_flight: list[PoolEntry] = []
    try:
        begin = time.perf_counter()
        for i, expert in enumerate(picks):
            if len(in_flight) == window:
                oldest = in_flight.pop(0)
                transfers.wait(oldest)
            entry = PoolEntry(expert=expert, slot=i % window)
            entry.pending = transfers.start(entry)
            in_flight.append(entry)
        for entry in in_flight:
            transfers.wait(entry)
        return (time.perf_counter() - begin) / count
    finally:
        transfers.close()


def copy_to_ram(model_dir: Path, root: Path = Path("/dev/shm/cpm2-bench")) -> Path | None:
    """A copy of `model_dir` on a RAM-backed filesystem (the host tier in RAM), or None without room."""
    import shutil

    size = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())
    if not root.parent.exists() or shutil.disk_usage(root.parent).free < size * 1.2:
        return None
    target = root / model_dir.name
    if not (target / "config.json").exists():
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(model_dir, target)
    return target
