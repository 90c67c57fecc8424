"""Where a model's bytes go when it is loaded for inference: the one plan both loading and `cpm2 info` use.

Dense weights always stay resident on the compute device. Experts stay resident too when the budget
(`--expert-memory`) holds them all; otherwise they stay in the expert store (memory-mapped from disk;
on CUDA, pinned host memory when it fits) and a pool of `num_slots` device slots takes them on demand
(InfMoE, SEED.md). On a CPU computing in another dtype than the store's, each load in flight also
needs a staging buffer, paid from the same budget, so a small budget first gets a shorter window and
is refused only when even one load in flight leaves fewer than `MIN_SLOTS` slots.

`plan_memory` is pure arithmetic: what the machine offers (free memory) is measured by the caller and
passed in as `MachineMemory`, so `cpm2 info` can plan for a machine it is not running on.
`engine.offload.load_for_inference` follows the plan it returns; `cpm2 info` prints it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from engine.config import ModelConfig
from engine.errors import ConfigError
from engine.experts.blob import BlobLayout
from engine.sizes import format_bytes, parse_bytes
from engine.summary import ModelSummary, summarize

#: Minimum slots: one expert computing while the next one loads.
MIN_SLOTS = 2

HostTier = Literal["pinned", "disk"]

#: Share of the host's available RAM the experts may take before `--expert-host-tier auto` keeps
#: them on disk instead of pinning them (pinned memory cannot be paged out).
PINNED_RAM_SHARE = 0.8


def is_auto(spec: str | int | None) -> bool:
    """Whether an `--expert-memory` value asks for the automatic budget."""
    return spec is None or (isinstance(spec, str) and spec.strip().lower() == "auto")


def resolve_budget(spec: str | int | None, *, total_expert_bytes: int, auto_bytes: int | None) -> int:
    """Budget in bytes: `25%` of all experts, a size like `512MiB`, or `auto_bytes` when unset."""
    if is_auto(spec):
        if auto_bytes is None:
            raise ConfigError(
                "--expert-memory auto needs the free memory of the device, which cannot be measured here; "
                "pass --expert-memory SIZE (e.g. 40GiB) or a share of all experts (e.g. 25%)"
            )
        return auto_bytes
    if isinstance(spec, str) and (m := re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*%\s*", spec)):
        share = float(m.group(1))
        if not 0 < share <= 100:
            raise ConfigError(f"--expert-memory {spec!r}: a percentage must be in (0, 100]")
        return int(total_expert_bytes * share / 100)
    assert spec is not None  # is_auto covers None
    return parse_bytes(spec, name="--expert-memory")


@dataclass(frozen=True, kw_only=True)
class MachineMemory:
    """What the machine offers, measured by the caller (the plan itself reads nothing)."""

    auto_budget_bytes: int | None
    """The budget `--expert-memory auto` means here; None when it cannot be measured (a CUDA plan on a
    machine without a GPU): planning then needs an explicit budget."""
    host_ram_bytes: int
    """Available host RAM (decides `--expert-host-tier auto` on CUDA)."""


@dataclass(frozen=True, kw_only=True)
class MemoryPlan:
    """How a model is placed for inference, in bytes of the compute dtype unless named otherwise."""

    dtype: torch.dtype
    """Compute dtype of the weights."""
    device: torch.device
    expert_memory: str | int | None
    """The budget as given (`--expert-memory`; None = auto)."""
    budget_bytes: int
    """The budget resolved to bytes (0 for a dense model, which needs none)."""
    dense_bytes: int
    """Everything that is not an expert: always resident on the device."""
    expert_bytes: int
    """All experts of all MoE layers."""
    bytes_per_expert: int
    num_experts: int
    """Experts in the whole model (MoE layers x experts per layer)."""
    is_offloaded: bool
    """Experts live in the expert store and move into a pool on demand (False: all resident)."""
    num_slots: int
    """Pool slots (experts resident at once) when offloaded; 0 otherwise."""
    window: int
    """Loads in flight ahead of compute, shortened from the requested one when the budget is small."""
    staging_bytes: int
    """Staging buffers (one per load in flight) taken from the budget: CPU, store dtype != compute dtype."""
    store_dtype: torch.dtype
    """Dtype of the expert store (the checkpoint's stored dtype when no store exists yet)."""
    store_bytes: int
    """Size of the expert store (blobs padded to 4 KiB), when offloaded."""
    host_tier: HostTier | None
    """Where offloaded experts wait: `disk` (memory-mapped store) or `pinned` host RAM (CUDA only)."""
    min_budget_bytes: int
    """Smallest budget offloading accepts: `MIN_SLOTS` experts plus one staging buffer if needed."""

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def is_too_small(self) -> bool:
        """Offloading would need more slots than the budget holds (loading refuses this plan)."""
        return self.is_offloaded and self.num_slots < MIN_SLOTS

    @property
    def pool_bytes(self) -> int:
        """Device memory the expert pool takes (its slots), when offloaded."""
        return max(self.num_slots, 0) * self.bytes_per_expert

    @property
    def resident_bytes(self) -> int:
        """Device memory the weights take: dense weights plus all experts, or plus pool and staging."""
        if not self.is_offloaded:
            return self.dense_bytes + self.expert_bytes
        return self.dense_bytes + self.pool_bytes + self.staging_bytes

    def check(self) -> None:
        """Raise the `ConfigError` loading gives when the budget is too small (saying the minimum)."""
        if not self.is_too_small:
            return
        raise ConfigError(
            f"--expert-memory {self.expert_memory or 'auto'} ({format_bytes(self.budget_bytes)}) is too small: "
            f"offloading needs room for {MIN_SLOTS} experts of {format_bytes(self.bytes_per_expert)}"
            + (f" plus {self.window} staging buffer" if self.staging_bytes else "")
            + f", at least {format_bytes(self.min_budget_bytes)} "
            f"({100 * self.min_budget_bytes / self.expert_bytes:.1f}% of the "
            f"{format_bytes(self.expert_bytes)} of experts)"
        )

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-ready values (dtypes and devices as strings)."""
        return {
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "expert_memory": "auto" if is_auto(self.expert_memory) else self.expert_memory,
            "budget_bytes": self.budget_bytes,
            "dense_bytes": self.dense_bytes,
            "expert_bytes": self.expert_bytes,
            "bytes_per_expert": self.bytes_per_expert,
            "num_experts": self.num_experts,
            "is_offloaded": self.is_offloaded,
            "num_slots": self.num_slots,
            "pool_bytes": self.pool_bytes,
            "window": self.window,
            "staging_bytes": self.staging_bytes,
            "store_dtype": str(self.store_dtype).removeprefix("torch."),
            "store_bytes": self.store_bytes,
            "host_tier": self.host_tier,
            "resident_bytes": self.resident_bytes,
            "min_budget_bytes": self.min_budget_bytes,
            "is_too_small": self.is_too_small,
        }


def plan_memory(
    config: ModelConfig,
    *,
    dtype: torch.dtype,
    device: torch.device,
    expert_memory: str | int | None,
    window: int,
    host_tier: str,
    store_dtype: torch.dtype,
    machine: MachineMemory,
    summary: ModelSummary | None = None,
) -> MemoryPlan:
    """Place `config`'s weights in `dtype` on `device` under the `--expert-*` options given.

    A budget too small for offloading still gives a plan (`is_too_small`, `min_budget_bytes`);
    `MemoryPlan.check` turns it into the error loading raises. A dense model gets a plan without a
    budget (its `--expert-memory` is never read). `summary` saves recounting when the caller has it.
    """
    summary = summary or summarize(config, dtype)
    num_experts = summary.num_moe_layers * summary.num_experts_per_layer
    stored = BlobLayout.of(config, store_dtype)
    # Experts take this layout in memory: the compute dtype's, or an int8 store's own (which the
    # budget then counts: the same budget holds twice the experts of a 16-bit store).
    in_memory = stored.for_compute(dtype)
    per_expert = in_memory.payload_bytes if config.moe is not None else summary.bytes_per_expert
    total = per_expert * num_experts
    plan = MemoryPlan(
        dtype=dtype,
        device=device,
        expert_memory=expert_memory,
        budget_bytes=0,
        dense_bytes=summary.total_bytes - summary.expert_bytes,
        expert_bytes=total,
        bytes_per_expert=per_expert,
        num_experts=num_experts,
        is_offloaded=False,
        num_slots=0,
        window=window,
        staging_bytes=0,
        store_dtype=store_dtype,
        store_bytes=0,
        host_tier=None,
        min_budget_bytes=0,
    )
    if config.moe is None:
        return plan

    budget = resolve_budget(expert_memory, total_expert_bytes=total, auto_bytes=machine.auto_budget_bytes)
    blob = stored.nbytes
    # The CPU kernels read float experts in the compute dtype; a float store in another dtype is
    # converted through a staging buffer per load in flight (a GPU converts after the copy).
    uses_staging = device.type == "cpu" and in_memory != stored
    plan = replace(plan, budget_bytes=budget, min_budget_bytes=MIN_SLOTS * per_expert + (blob if uses_staging else 0))
    if budget >= total:
        return plan

    # Staging buffers come out of the same budget; a small budget gets a shorter window before it
    # is refused.
    while True:
        staging = window * blob if uses_staging else 0
        slots = (budget - staging) // per_expert
        if slots >= MIN_SLOTS or window == 1:
            break
        window -= 1
    tier: HostTier = "disk"
    if device.type == "cuda" and host_tier == "pinned":
        tier = "pinned"
    elif device.type == "cuda" and host_tier == "auto":
        tier = "pinned" if total <= PINNED_RAM_SHARE * machine.host_ram_bytes else "disk"
    return replace(
        plan,
        is_offloaded=True,
        num_slots=slots,
        window=window,
        staging_bytes=staging,
        store_bytes=num_experts * blob,
        host_tier=tier,
    )
