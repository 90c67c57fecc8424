"""Loading a model for serving: experts resident when they fit the budget, offloaded when they do not.

`load_for_inference` is the one entry point the CLI and the server use. Dense weights always stay
resident on the compute device. Experts stay resident too when `--expert-memory` holds them all;
otherwise they live in the expert store (disk tier; pinned host memory on GPU machines) and move
into a bounded pool on demand (`engine.experts.provider`). A budget too small for the work fails
here, at start-up, with the minimum it needs.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.config import ModelConfig
from engine.errors import ConfigError
from engine.experts.calibrate import calibrate
from engine.experts.cpu import CpuTransfers
from engine.experts.order import ORDER_POLICIES, OrderPolicy
from engine.experts.pool import CACHE_POLICIES, CachePolicy, ExpertPool
from engine.experts.provider import OffloadedExpertProvider, Transfers
from engine.experts.store import BlobLayout, ExpertStore, ExpertStoreWriter
from engine.model import Seq2SeqLM
from engine.model.kernels import DtypeKernels, KernelMode, announce, set_kernel_mode
from engine.sizes import format_bytes, parse_bytes
from engine.summary import summarize
from engine.weights.files import open_tensor_source
from engine.weights.loader import (
    CheckpointInfo,
    default_dtype,
    inspect_checkpoint,
    load_model,
    native_tensors,
)
from engine.weights.loader import parse_dtype as parse_dtype

#: Minimum slots: one expert computing while the next one loads.
MIN_SLOTS = 2


@dataclass(frozen=True, kw_only=True)
class OffloadConfig:
    """How experts are placed and moved (the `--expert-*` options)."""

    expert_memory: str | int | None = None
    """Fast-pool budget: bytes (`512MiB`, an int) or a share of all experts (`25%`); None = automatic
    (half of the free RAM on CPU, 80 % of free GPU memory less the dense weights on CUDA)."""
    order: OrderPolicy = "infmoe"
    """Expert order within a layer: `infmoe` (transfers hidden behind compute), `cached-first`, `index`."""
    cache: CachePolicy = "lru"
    """Eviction policy of the pool across layers and steps."""
    prefetch: bool = True
    """Predict the next layer's experts with its router and load them early."""
    window: int = 4
    """Loads kept in flight ahead of compute (InfMoE's K slots)."""
    io_threads: int = 4
    """Threads reading the disk tier (several reads in flight)."""
    direct_io: bool = False
    """Read the disk tier with O_DIRECT (bypass the page cache)."""
    host_tier: str = "auto"
    """CUDA only: `pinned` (all experts in pinned host RAM), `disk`, or `auto` (pinned when they fit)."""
    store_dir: Path | None = None
    """Where to write an expert store for checkpoints that have none (default: `<model>/experts`)."""

    def __post_init__(self) -> None:
        if self.order not in ORDER_POLICIES:
            raise ConfigError(f"expert order must be one of {', '.join(ORDER_POLICIES)}, got {self.order!r}")
        if self.cache not in CACHE_POLICIES:
            raise ConfigError(f"expert cache policy must be one of {', '.join(CACHE_POLICIES)}, got {self.cache!r}")
        if self.window < 1 or self.io_threads < 1:
            raise ConfigError("expert window and io threads must be at least 1")
        if self.host_tier not in ("auto", "pinned", "disk"):
            raise ConfigError(f"host tier must be auto, pinned or disk, got {self.host_tier!r}")


def resolve_budget(spec: str | int | None, *, total_expert_bytes: int, auto_bytes: int) -> int:
    """Budget in bytes: `25%` of all experts, a size like `512MiB`, or `auto_bytes` when unset."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "auto"):
        return auto_bytes
    if isinstance(spec, str) and (m := re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*%\s*", spec)):
        share = float(m.group(1))
        if not 0 < share <= 100:
            raise ConfigError(f"--expert-memory {spec!r}: a percentage must be in (0, 100]")
        return int(total_expert_bytes * share / 100)
    return parse_bytes(spec, name="--expert-memory")


def _available_ram() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def auto_budget(device: torch.device, dense_bytes: int) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(0, int(free * 0.8) - dense_bytes)
    return max(0, _available_ram() // 2)


@dataclass
class InferenceModel:
    """A model ready to generate, and its expert provider when experts are offloaded."""

    model: Seq2SeqLM
    info: CheckpointInfo
    provider: OffloadedExpertProvider | None = None
    budget_bytes: int = 0
    total_expert_bytes: int = 0
    kernels: DtypeKernels | None = None
    """The CPU matmul paths this model's dtype takes (None on GPUs)."""

    @property
    def is_offloaded(self) -> bool:
        return self.provider is not None

    def close(self) -> None:
        if self.provider is not None:
            self.provider.close()


def ensure_store(info: CheckpointInfo, *, store_dir: Path | None) -> ExpertStore:
    """The model's expert store, writing one from its checkpoint first if it has none."""
    config = info.config
    if info.source_format == "cpm2" and ExpertStore.exists(info.path) and store_dir is None:
        return ExpertStore.open(info.path, config)
    root = store_dir or info.path
    if ExpertStore.exists(root):
        return ExpertStore.open(root, config)
    files = open_tensor_source(info.path)
    try:
        writer = ExpertStoreWriter(root, config, info.stored_dtype)
        for key, tensor in native_tensors(info, files, dtype=info.stored_dtype, device=torch.device("cpu")):
            writer.add(key, tensor)
        writer.close()
    except PermissionError as exc:
        raise ConfigError(
            f"{root}: cannot write the expert store there ({exc}); pass a writable --expert-store-dir"
        ) from exc
    finally:
        files.close()
    return ExpertStore.open(root, config)


def _slots_for(budget: int, *, per_expert: int, staging: int) -> int:
    return (budget - staging) // per_expert


def load_for_inference(
    model_dir: Path | str,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    offload: OffloadConfig | None = None,
    pack: bool = True,
    progress: bool = True,
    cpu_kernels: KernelMode | None = None,
) -> InferenceModel:
    """Load `model_dir` for generation, offloading experts when they exceed the budget.

    `cpu_kernels` sets the process's CPU matmul paths first (`engine.model.kernels`; None keeps
    them); on a CPU, a dtype without the fastest path here is logged once.
    """
    device = torch.device(device)
    info = inspect_checkpoint(Path(model_dir))
    target = parse_dtype(dtype) or default_dtype(info.stored_dtype, device)
    if cpu_kernels is not None:
        set_kernel_mode(cpu_kernels)
    kernels = announce(target) if device.type == "cpu" else None
    loaded = _load(
        model_dir, info, target=target, device=device, offload=offload or OffloadConfig(), pack=pack, progress=progress
    )
    loaded.kernels = kernels
    return loaded


def _load(
    model_dir: Path | str,
    info: CheckpointInfo,
    *,
    target: torch.dtype,
    device: torch.device,
    offload: OffloadConfig,
    pack: bool,
    progress: bool,
) -> InferenceModel:
    config: ModelConfig = info.config
    if config.moe is None:
        model, info = load_model(model_dir, dtype=target, device=device, pack=pack)
        return InferenceModel(model, info)
    summary = summarize(config, target)
    total = summary.expert_bytes
    budget = resolve_budget(
        offload.expert_memory,
        total_expert_bytes=total,
        auto_bytes=auto_budget(device, summary.total_bytes - total),
    )
    if budget >= total:
        model, info = load_model(model_dir, dtype=target, device=device, pack=pack)
        return InferenceModel(model, info, budget_bytes=budget, total_expert_bytes=total)

    per_expert = summary.bytes_per_expert
    store = ensure_store(info, store_dir=offload.store_dir)
    uses_staging = device.type == "cpu" and target != store.dtype
    # Staging buffers (one per load in flight) come out of the same budget; a small budget gets a
    # shorter window before it is refused.
    window = offload.window
    while True:
        staging = window * store.layout.nbytes if uses_staging else 0
        slots = _slots_for(budget, per_expert=per_expert, staging=staging)
        if slots >= MIN_SLOTS or window == 1:
            break
        window -= 1
    if slots < MIN_SLOTS:
        needed = MIN_SLOTS * per_expert + staging
        raise ConfigError(
            f"--expert-memory {offload.expert_memory or 'auto'} ({format_bytes(budget)}) is too small: "
            f"offloading needs room for {MIN_SLOTS} experts of {format_bytes(per_expert)}"
            + (f" plus {window} staging buffer" if staging else "")
            + f", at least {format_bytes(needed)} ({100 * needed / total:.1f}% of the "
            f"{format_bytes(total)} of experts)"
        )
    model, info = load_model(model_dir, dtype=target, device=device, pack=pack, load_experts=False)
    transfers: Transfers
    if device.type == "cuda":
        from engine.experts.cuda import CudaTransfers

        host_tier = offload.host_tier
        if host_tier == "auto":
            host_tier = "pinned" if total <= 0.8 * _available_ram() else "disk"
        transfers = CudaTransfers(
            store,
            num_slots=slots,
            window=window,
            device=device,
            dtype=target,
            host_tier=host_tier,  # type: ignore[arg-type]
            io_threads=offload.io_threads,
            direct=offload.direct_io,
            progress=progress,
        )
    else:
        transfers = CpuTransfers(
            store,
            num_slots=slots,
            window=window,
            dtype=target,
            io_threads=offload.io_threads,
            direct=offload.direct_io,
        )
    cost = calibrate(transfers, store, activation=config.activation, device=device)
    provider = OffloadedExpertProvider(
        transfers,
        ExpertPool(slots, offload.cache),
        bytes_per_expert=BlobLayout.of(config, target).payload_bytes,
        cost=cost,
        order=offload.order,
        window=window,
        prefetch=offload.prefetch,
    )
    provider.attach(model.moe_layers())
    return InferenceModel(model, info, provider, budget_bytes=budget, total_expert_bytes=total)
