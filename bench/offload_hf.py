"""cpm2's peers for offloaded decode: HF transformers in RAM and accelerate disk offload (two maps).

All three load the same HF Switch Transformers checkpoint in bf16 and decode the same
teacher-forced random ids as `bench.offload_common.decode_cpm2` (same seeds, same shapes), so
every system routes the same tokens (checked: `routing_agreement`).

accelerate's unit of placement is the device-map entry, but for an offloaded entry its hooks fetch
weights per leaf module with parameters (each `nn.Linear`, accelerate 1.15) at that module's
forward, so a block on "disk" reads its attention and norms and only the experts it routes to.
research/offload-anchors.md §1.6, §4.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.offload_common import DecodeRun, drop_page_cache, random_ids, storage_read_bytes
from engine.planner.recording import routing_summary

#: The HF systems, in the order they run within a repeat, and what each is.
HF_SYSTEMS: dict[str, str] = {
    "hf-ram": "transformers from_pretrained in RAM (5.x: lazily memory-mapped safetensors)",
    "accelerate-auto": "accelerate disk offload, device_map='auto' (whole blocks on disk) at the RAM budget",
    "accelerate-expert": "accelerate disk offload, expert-granular device_map (experts on disk)",
}

_EXPERT_MODULE = re.compile(r"\.experts\.expert_(\d+)$")


@dataclass(frozen=True)
class ModelBytes:
    """Parameter bytes of the HF model, split into experts and the rest."""

    total: int
    experts: int
    num_experts: int  # over all layers

    @property
    def dense(self) -> int:
        return self.total - self.experts

    @property
    def per_expert(self) -> int:
        return self.experts // max(1, self.num_experts)

    def to_dict(self) -> dict[str, int]:
        return {
            "total_bytes": self.total,
            "expert_bytes": self.experts,
            "dense_bytes": self.dense,
            "num_experts": self.num_experts,
            "bytes_per_expert": self.per_expert,
        }


def _model_class() -> Any:
    from transformers import SwitchTransformersForConditionalGeneration

    return SwitchTransformersForConditionalGeneration


def empty_model(hf_dir: Path) -> Any:
    """The model on the meta device (no weights read), in bf16."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    with init_empty_weights():
        return _model_class()._from_config(AutoConfig.from_pretrained(hf_dir), dtype=torch.bfloat16)


def model_bytes(hf_dir: Path) -> ModelBytes:
    model = empty_model(hf_dir)
    total = experts = 0
    for name, param in model.named_parameters():  # tied weights once
        size = param.numel() * param.element_size()
        total += size
        experts += size if ".experts." in name else 0
    num = sum(1 for name, _ in model.named_modules() if _EXPERT_MODULE.search(name))
    return ModelBytes(total, experts, num)


def expert_granular_device_map(hf_dir: Path, *, resident_share: float = 0.0) -> dict[str, str]:
    """Every expert module -> "disk" (but the first `resident_share` of each layer's experts ->
    "cpu"), and every other module that holds parameters -> "cpu"."""
    model = empty_model(hf_dir)
    num_per_layer = model.config.num_experts
    device_map: dict[str, str] = {}
    for name, _ in model.named_modules():
        if match := _EXPERT_MODULE.search(name):
            resident = int(match.group(1)) < round(resident_share * num_per_layer)
            device_map[name] = "cpu" if resident else "disk"
    for name, _ in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]:
        if ".experts.expert_" not in name:
            device_map[name.rpartition(".")[0]] = "cpu"
    return device_map


def offload_folder(system: str, offload_dir: Path) -> Path:
    """accelerate's `offload_folder` for `system` (transformers 5.x leaves it empty when it can
    index the checkpoint's own safetensors, as for this model)."""
    return offload_dir / system.removeprefix("accelerate-")


def load_hf(
    system: str,
    hf_dir: Path,
    *,
    cpu_budget_bytes: int,
    offload_dir: Path,
    resident_share: float = 0.0,
) -> Any:
    """One of `HF_SYSTEMS`, loaded in bf16 on the CPU (eval mode)."""
    cls = _model_class()
    if system == "hf-ram":
        return cls.from_pretrained(hf_dir, dtype=torch.bfloat16)
    if system == "accelerate-auto":
        return cls.from_pretrained(
            hf_dir,
            dtype=torch.bfloat16,
            device_map="auto",
            max_memory={"cpu": cpu_budget_bytes},
            offload_folder=str(offload_folder(system, offload_dir)),
        )
    if system == "accelerate-expert":
        return cls.from_pretrained(
            hf_dir,
            dtype=torch.bfloat16,
            device_map=expert_granular_device_map(hf_dir, resident_share=resident_share),
            offload_folder=str(offload_folder(system, offload_dir)),
        )
    raise ValueError(f"unknown HF system {system!r}; one of {', '.join(HF_SYSTEMS)}")


def device_map_summary(model: Any) -> dict[str, Any]:
    """Entries per device of an accelerate-dispatched model (the whole map when it is short)."""
    device_map: dict[str, Any] = getattr(model, "hf_device_map", None) or {}
    counts: dict[str, int] = {}
    for device in device_map.values():
        counts[str(device)] = counts.get(str(device), 0) + 1
    out: dict[str, Any] = {"entries_per_device": counts}
    if len(device_map) <= 40:
        out["device_map"] = {k: str(v) for k, v in device_map.items()}
    return out


class _RouterCounter:
    """Counts, per decoder layer, how many tokens each expert got (forward hooks on the routers)."""

    def __init__(self, model: Any) -> None:
        self.counts: dict[str, torch.Tensor] = {}
        self.distinct: list[int] = []
        self._handles = []
        for index, block in enumerate(model.decoder.block):
            mlp = getattr(block.layer[-1], "mlp", None)
            if mlp is not None and hasattr(mlp, "router"):
                key = f"decoder.{index}"
                self.counts[key] = torch.zeros(model.config.num_experts, dtype=torch.long)
                self._handles.append(mlp.router.register_forward_hook(self._hook(key)))

    def _hook(self, key: str) -> Any:
        def record(_module: Any, _inputs: Any, output: Any) -> None:
            per_expert = output[0].reshape(-1, output[0].shape[-1]).sum(0).long()  # one-hot dispatch
            self.counts[key] += per_expert
            self.distinct.append(int((per_expert > 0).sum()))

        return record

    def reset(self) -> None:
        self.counts = {k: torch.zeros_like(v) for k, v in self.counts.items()}
        self.distinct = []

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@torch.inference_mode()
def decode_hf(
    model: Any,
    *,
    batch: int,
    steps: int,
    warmup: int = 4,
    source_len: int = 32,
    seed: int = 0,
    cold_files: Sequence[Path] = (),
) -> DecodeRun:
    """`decode_cpm2` for an HF model: encode once, then one cached decoder step per forced id."""
    vocab = model.config.vocab_size
    ids = random_ids((batch, source_len), vocab=vocab, seed=seed)
    mask = torch.ones_like(ids)
    forced = random_ids((warmup + steps, batch), vocab=vocab, seed=seed + 1)
    counter = _RouterCounter(model)
    try:
        encoded = model.get_encoder()(input_ids=ids, attention_mask=mask)
        cache = None

        def step(t: int) -> None:
            nonlocal cache
            # transformers 5.x: the KV cache argument and output field are `cache` (was past_key_values)
            out = model(
                decoder_input_ids=forced[t].unsqueeze(1),
                encoder_outputs=encoded,
                attention_mask=mask,
                cache=cache,
                use_cache=True,
            )
            cache = out.cache

        for t in range(warmup):
            step(t)
        counter.reset()
        elapsed, storage = 0.0, 0
        for t in range(warmup, warmup + steps):
            if cold_files:
                drop_page_cache(cold_files)
            read_before = storage_read_bytes()
            begin = time.perf_counter()
            step(t)
            elapsed += time.perf_counter() - begin
            storage += storage_read_bytes() - read_before
        routing = routing_summary(list(counter.counts.values()), counter.distinct)
        counts = {k: v.tolist() for k, v in counter.counts.items()}
        return DecodeRun(batch * steps / elapsed, elapsed, batch * steps, None, routing, storage, counts)
    finally:
        counter.remove()


def routing_agreement(counts: dict[str, list[int]], reference: dict[str, list[int]]) -> float | None:
    """Share of routed tokens per (layer, expert) that two runs have in common (1.0 = same routing)."""
    common = total = 0
    for key, row in reference.items():
        other = counts.get(key)
        if other is None:
            return None
        common += sum(min(a, b) for a, b in zip(row, other, strict=True))
        total += sum(row)
    return common / total if total else None
