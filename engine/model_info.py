"""What `cpm2 info` reports: a model's shape, its sizes per weight format and where its bytes would go.

Everything comes from the config (`inspect_config`: no tensor is read, and no weights need to be
there yet). The memory plan is `engine.memory_plan.plan_memory` fed exactly as
`engine.offload.load_for_inference` feeds it (same dtype rule, same store dtype, same machine
measurement), so what `info` prints is what loading does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.errors import ConfigError
from engine.memory_plan import MIN_SLOTS, MemoryPlan, is_auto, plan_memory
from engine.model.kernels import active_kernels, cpu_capability
from engine.offload import OffloadConfig, inference_dtype, measure_machine, store_dtype_for
from engine.sizes import format_bytes
from engine.summary import ModelSummary, expert_bytes_by_format, summarize
from engine.weights.loader import CheckpointInfo, inspect_config


@dataclass(frozen=True)
class ModelInfo:
    """A model described from its config, with the memory plan for one device, dtype and budget."""

    path: Path
    checkpoint: CheckpointInfo
    dtype: torch.dtype
    summary: ModelSummary
    plan: MemoryPlan

    def to_dict(self) -> dict[str, Any]:
        kernels = active_kernels().for_dtype(self.dtype)
        return {
            "path": str(self.path),
            "format": self.checkpoint.source_format,
            "has_weights": self.checkpoint.has_weights,
            "family": self.checkpoint.config.family,
            "dtype": str(self.dtype).removeprefix("torch."),
            "config": self.checkpoint.config.to_dict(),
            "summary": self.summary.to_dict(),
            "expert_bytes_by_format": expert_bytes_by_format(self.summary),
            "memory_plan": self.plan.to_dict(),
            "cpu_kernels": {
                "cpu_capability": cpu_capability(),
                **kernels.to_dict(),
                # The int4 layout this machine's kernel reads ("" when int4 experts run by dequant).
                "int4_packing": active_kernels().int4_packing or "",
            },
        }

    def lines(self) -> list[str]:
        """The text report, one line per item."""
        c, s = self.checkpoint.config, self.summary
        weights = "" if self.checkpoint.has_weights else "; config only, no weights"
        dtype = str(self.dtype).removeprefix("torch.")
        out = [f"{self.path} ({self.checkpoint.source_format}, {dtype}{weights})"]
        out.append(f"  family            {c.family}")
        out.append(f"  layers            {c.num_encoder_layers} encoder + {c.num_decoder_layers} decoder")
        out.append(f"  d_model / d_ff    {c.d_model} / {c.d_ff}   heads {c.num_heads} x {c.d_kv}")
        out.append(f"  vocabulary        {c.vocab_size}   tied head: {c.tie_word_embeddings}")
        out.append(f"  feed-forward      {('gated ' if c.is_gated_ffn else '') + c.activation}")
        if c.moe is not None:
            m = c.moe
            if m.top_k == 2 and m.eval_capacity_fraction is not None and m.eval_capacity_fraction > 0:
                capacity = f"capacity {m.eval_capacity_fraction:g} x tokens at inference"
            else:
                capacity = f"capacity {m.expert_capacity}"
            out.append(
                f"  MoE               {m.num_experts} experts, {m.router} router, top-{m.top_k}, "
                f"layers enc {list(m.encoder_layers)} dec {list(m.decoder_layers)}, {capacity}"
            )
        out.append(f"  parameters        {s.total_parameters:,} ({format_bytes(s.total_bytes)})")
        out.append(f"    dense           {s.dense_parameters:,}")
        out.append(f"    experts         {s.expert_parameters:,} ({format_bytes(s.expert_bytes)})")
        if s.parameters_per_expert:
            out.append(
                f"    per expert      {s.parameters_per_expert:,} ({format_bytes(s.bytes_per_expert)}), "
                f"{s.num_moe_layers} MoE layers x {s.num_experts_per_layer}"
            )
            sizes = ", ".join(f"{name} {format_bytes(n)}" for name, n in expert_bytes_by_format(s).items())
            out.append(f"  bytes per expert  {sizes}")
        out.extend(_plan_lines(self.plan))
        kernels = active_kernels().for_dtype(self.dtype)
        out.append(f"  CPU kernels       dense {kernels.dense}, experts {kernels.experts} (CPU: {cpu_capability()})")
        if kernels.reason:
            out.append(f"    why not faster  {kernels.reason}")
        return out


def describe_model(
    path: Path, *, dtype: str | torch.dtype | None, device: str | torch.device, offload: OffloadConfig
) -> ModelInfo:
    """Describe the model at `path` (a model directory, with or without weights, or a config.json)."""
    device = torch.device(device)
    checkpoint = inspect_config(path)
    target = inference_dtype(checkpoint, dtype, device)
    summary = summarize(checkpoint.config, target)
    if (
        checkpoint.config.moe is not None
        and device.type == "cuda"
        and not torch.cuda.is_available()
        and is_auto(offload.expert_memory)
    ):
        raise ConfigError(
            f"--device {device}: the automatic --expert-memory is a share of that GPU's free memory, and "
            "this machine has no GPU to measure; pass --expert-memory SIZE (e.g. 40GiB) or a share of "
            "all experts (e.g. 25%) to plan for it"
        )
    # A checkpoint that already has an expert store keeps its dtype (staging buffers depend on it).
    store_dtype = store_dtype_for(checkpoint, store_dir=offload.store_dir) if checkpoint.has_weights else None
    plan = plan_memory(
        checkpoint.config,
        dtype=target,
        device=device,
        expert_memory=offload.expert_memory,
        window=offload.window,
        host_tier=offload.host_tier,
        store_dtype=store_dtype or checkpoint.stored_dtype,
        machine=measure_machine(device, summary.total_bytes - summary.expert_bytes),
        summary=summary,
    )
    return ModelInfo(Path(path), checkpoint, target, summary, plan)


def _size_at_least(num: int) -> str:
    """A `--expert-memory` value (one decimal, binary unit) no smaller than `num` bytes."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num >= scale:
            return f"{math.ceil(num * 10 / scale) / 10:.1f}{unit}"
    return str(num)


def _plan_lines(plan: MemoryPlan) -> list[str]:
    budget = "auto" if is_auto(plan.expert_memory) else str(plan.expert_memory)
    out = [f"  memory plan       {plan.device}, {str(plan.dtype).removeprefix('torch.')}"]
    if not plan.is_moe:
        out.append(f"    resident        {format_bytes(plan.dense_bytes)} (dense model: no experts to offload)")
        return out
    out[0] += f", --expert-memory {budget} = {format_bytes(plan.budget_bytes)}"
    if not plan.is_offloaded:
        out.append(
            f"    resident        {format_bytes(plan.resident_bytes)}: dense {format_bytes(plan.dense_bytes)} "
            f"+ all {plan.num_experts} experts {format_bytes(plan.expert_bytes)} (not offloaded)"
        )
    elif not plan.is_too_small:
        pool = f"pool {plan.num_slots} slots x {format_bytes(plan.bytes_per_expert)}"
        staging = f" + staging {format_bytes(plan.staging_bytes)}" if plan.staging_bytes else ""
        out.append(
            f"    resident        {format_bytes(plan.resident_bytes)}: dense {format_bytes(plan.dense_bytes)} "
            f"+ {pool}{staging}"
        )
        where = "pinned host memory" if plan.host_tier == "pinned" else "the expert store on disk"
        out.append(
            f"    offloaded       {plan.num_experts} experts in {where} "
            f"({format_bytes(plan.store_bytes)} in {str(plan.store_dtype).removeprefix('torch.')}), "
            f"window {plan.window}"
        )
    out.append(
        f"    minimum budget  {format_bytes(plan.min_budget_bytes)} ({MIN_SLOTS} experts"
        + (" + 1 staging buffer" if plan.min_budget_bytes > MIN_SLOTS * plan.bytes_per_expert else "")
        + ")"
    )
    if plan.is_too_small:
        out.append(
            f"    too small       loading refuses {format_bytes(plan.budget_bytes)}: "
            f"pass --expert-memory {_size_at_least(plan.min_budget_bytes)} or more"
        )
    return out
