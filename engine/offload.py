"""Loading a model for serving: experts resident when they fit the budget, offloaded when they do not.

`load_for_inference` is the one entry point the CLI and the server use. Dense weights always stay
resident on the compute device. Experts stay resident too when `--expert-memory` holds them all;
otherwise they live in the expert store (disk tier; pinned host memory on GPU machines) and move
into a bounded pool on demand (`engine.experts.provider`). A budget too small for the work fails
here, at start-up, with the minimum it needs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch

from engine.config import ModelConfig
from engine.errors import ConfigError
from engine.experts.calibrate import calibrate
from engine.experts.cpu import CpuTransfers
from engine.experts.order import ORDER_POLICIES, OrderPolicy
from engine.experts.pool import CACHE_POLICIES, CachePolicy, ExpertPool
from engine.experts.provider import OffloadedExpertProvider, Transfers
from engine.experts.resident import InMemoryExperts
from engine.experts.store import ExpertStore, ExpertStoreWriter
from engine.memory_plan import MIN_SLOTS as MIN_SLOTS
from engine.memory_plan import MachineMemory, MemoryPlan, is_auto, plan_memory
from engine.memory_plan import resolve_budget as resolve_budget
from engine.model import Seq2SeqLM
from engine.model.kernels import DtypeKernels, KernelMode, announce, set_kernel_mode
from engine.summary import summarize
from engine.weights.files import open_tensor_source
from engine.weights.loader import (
    CheckpointInfo,
    default_dtype,
    inspect_checkpoint,
    load_model,
    native_tensors,
    quantize_dense,
)
from engine.weights.loader import parse_dtype as parse_dtype
from engine.weights.quantize import expert_store_dtype, quantized_dense

#: `--expert-prediction` choices (`OffloadConfig.prediction`).
Prediction = Literal["calibrated", "router"]
PREDICTIONS: tuple[Prediction, ...] = get_args(Prediction)
#: `--expert-io` modes: `auto` (strict when a budget is given), `strict` (O_DIRECT), `page-cache`.
EXPERT_IO: tuple[str, ...] = ("auto", "strict", "page-cache")


def direct_io(mode: str, *, force_direct: bool = False) -> bool | None:
    """`OffloadConfig.direct_io` for an `--expert-io` mode (None: decided by the budget)."""
    if mode not in EXPERT_IO:
        raise ConfigError(f"expert io must be one of {', '.join(EXPERT_IO)}, got {mode!r}")
    if force_direct or mode == "strict":
        return True
    return False if mode == "page-cache" else None


@dataclass(frozen=True, kw_only=True)
class OffloadConfig:
    """How experts are placed and moved (the `--expert-*` options)."""

    expert_memory: str | int | None = None
    """Fast-pool budget: bytes (`512MiB`, an int) or a share of all experts (`25%`); None = automatic
    (half of the free RAM on CPU, 80 % of free GPU memory less the dense weights on CUDA)."""
    order: OrderPolicy = "infmoe"
    """Expert order within a layer: `infmoe` (transfers hidden behind compute), `cached-first`, `index`."""
    cache: CachePolicy = "lrfu"
    """Eviction policy of the pool across layers and steps."""
    prefetch: bool = True
    """Predict the next layer's experts with its router and load them early."""
    prediction: Prediction = "calibrated"
    """How prefetch predicts: `router` applies the next layer's router to this layer's input;
    `calibrated` (default) also learns a linear correction to it from the first routes it serves and
    keeps it for the layers where it predicts better on held-out tokens (`engine.experts.predictor`)."""
    window: int = 4
    """Loads kept in flight ahead of compute (InfMoE's K slots)."""
    io_threads: int = 4
    """Threads reading the disk tier (several reads in flight)."""
    direct_io: bool | None = None
    """Read the disk tier with O_DIRECT (strict mode: RAM holds only the pool, so the budget bounds
    expert memory) or through the page cache (page-cache mode: experts the kernel holds are used in
    place, fast but bounded only by the kernel, not by the budget). None: strict whenever
    `expert_memory` is given, page-cache mode under the automatic budget (unset or `auto`)."""
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
        if self.prediction not in PREDICTIONS:
            raise ConfigError(f"expert prediction must be one of {', '.join(PREDICTIONS)}, got {self.prediction!r}")
        if self.host_tier not in ("auto", "pinned", "disk"):
            raise ConfigError(f"host tier must be auto, pinned or disk, got {self.host_tier!r}")

    @property
    def is_direct(self) -> bool:
        """Whether the disk tier is read with O_DIRECT (see `direct_io`)."""
        return self.direct_io if self.direct_io is not None else not is_auto(self.expert_memory)


def _available_ram() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def auto_budget(device: torch.device, dense_bytes: int, *, available_ram: int | None = None) -> int:
    """What `--expert-memory auto` means on this machine: half of the free RAM on CPU, 80 % of the
    free GPU memory less the dense weights on CUDA."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(0, int(free * 0.8) - dense_bytes)
    return max(0, (_available_ram() if available_ram is None else available_ram) // 2)


def measure_machine(device: torch.device, dense_bytes: int) -> MachineMemory:
    """This machine's memory as `plan_memory` needs it; no automatic budget for a GPU it does not have."""
    has_device = device.type != "cuda" or torch.cuda.is_available()
    ram = _available_ram()
    return MachineMemory(
        auto_budget_bytes=auto_budget(device, dense_bytes, available_ram=ram) if has_device else None,
        host_ram_bytes=ram,
    )


def inference_dtype(info: CheckpointInfo, dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The dtype a model runs in: the one asked for, else as stored (bfloat16 for float16 on a CPU)."""
    return parse_dtype(dtype) or default_dtype(info.stored_dtype, device)


def _existing_store(info: CheckpointInfo, *, store_dir: Path | None) -> ExpertStore | None:
    """The expert store already written for this model (in `store_dir`, else the model directory)."""
    root = store_dir or info.path
    return ExpertStore.open(root, info.config) if ExpertStore.exists(root) else None


def store_dtype_for(info: CheckpointInfo, *, store_dir: Path | None) -> torch.dtype:
    """The dtype of the store `ensure_store` gives (an existing store's, else the checkpoint's)."""
    store = _existing_store(info, store_dir=store_dir) if info.config.moe is not None else None
    return store.dtype if store is not None else info.stored_dtype


@dataclass
class InferenceModel:
    """A model ready to generate, and its expert provider when experts are offloaded."""

    model: Seq2SeqLM
    info: CheckpointInfo
    provider: OffloadedExpertProvider | None = None
    plan: MemoryPlan | None = None
    """The placement the model was loaded with (`engine.memory_plan`; None for a dense model)."""
    kernels: DtypeKernels | None = None
    """The CPU matmul paths this model's dtype takes (None on GPUs)."""

    @property
    def budget_bytes(self) -> int:
        """The expert budget in bytes (0 for a dense model)."""
        return self.plan.budget_bytes if self.plan is not None else 0

    @property
    def total_expert_bytes(self) -> int:
        return self.plan.expert_bytes if self.plan is not None else 0

    @property
    def is_offloaded(self) -> bool:
        return self.provider is not None

    def close(self) -> None:
        if self.provider is not None:
            self.provider.close()


def ensure_store(info: CheckpointInfo, *, store_dir: Path | None) -> ExpertStore:
    """The model's expert store, writing one from its checkpoint first if it has none."""
    existing = _existing_store(info, store_dir=store_dir)
    if existing is not None:
        return existing
    config = info.config
    root = store_dir or info.path
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
    target = inference_dtype(info, dtype, device)
    if cpu_kernels is not None:
        set_kernel_mode(cpu_kernels)
    kernels = announce(target) if device.type == "cpu" else None
    # Int8 dense weights are quantised from the plain ones: packing them first would be undone.
    dense_int8 = quantized_dense(info.config) == "int8"
    loaded = _load(
        model_dir,
        info,
        target=target,
        device=device,
        offload=offload or OffloadConfig(),
        pack=pack and not dense_int8,
        progress=progress,
    )
    loaded.kernels = kernels
    if dense_int8:
        quantize_dense(loaded.model)
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
    machine = measure_machine(device, summary.total_bytes - summary.expert_bytes)

    def plan_for(store_dtype: torch.dtype) -> MemoryPlan:
        return plan_memory(
            config,
            dtype=target,
            device=device,
            expert_memory=offload.expert_memory,
            window=offload.window,
            host_tier=offload.host_tier,
            store_dtype=store_dtype,
            machine=machine,
            summary=summary,
        )

    # Whether experts stay resident does not depend on the store, so a resident load of float
    # experts never opens one. Quantised experts exist only in their store, which holds them in RAM.
    quantized_dtype = expert_store_dtype(config)
    quantized = quantized_dtype is not None
    plan = plan_for(quantized_dtype or info.stored_dtype)
    if not plan.is_offloaded:
        model, info = load_model(model_dir, dtype=target, device=device, pack=pack, load_experts=not quantized)
        if quantized:
            store = ExpertStore.open(Path(model_dir), config)
            InMemoryExperts(store, device=device, progress=progress).attach(model.moe_layers())
        return InferenceModel(model, info, plan=plan)

    store = ExpertStore.open(info.path, config) if quantized else ensure_store(info, store_dir=offload.store_dir)
    if store.dtype != plan.store_dtype:  # an existing store in another dtype: other staging buffers
        plan = plan_for(store.dtype)
    plan.check()
    slots, window = plan.num_slots, plan.window
    model, info = load_model(model_dir, dtype=target, device=device, pack=pack, load_experts=False)
    transfers: Transfers
    if device.type == "cuda":
        from engine.experts.cuda import CudaTransfers

        assert plan.host_tier is not None  # every offloaded CUDA plan names its host tier
        transfers = CudaTransfers(
            store,
            num_slots=slots,
            window=window,
            device=device,
            dtype=target,
            host_tier=plan.host_tier,
            io_threads=offload.io_threads,
            direct=offload.is_direct,
            progress=progress,
        )
    else:
        transfers = CpuTransfers(
            store,
            num_slots=slots,
            window=window,
            dtype=target,
            io_threads=offload.io_threads,
            direct=offload.is_direct,
        )
    cost = calibrate(transfers, store, activation=config.activation, device=device, dtype=target)
    provider = OffloadedExpertProvider(
        transfers,
        ExpertPool(slots, offload.cache),
        bytes_per_expert=store.layout.for_compute(target).payload_bytes,
        cost=cost,
        order=offload.order,
        window=window,
        prefetch=offload.prefetch,
        calibrate_prediction=offload.prediction == "calibrated",
    )
    provider.attach(model.moe_layers())
    return InferenceModel(model, info, provider, plan=plan)
