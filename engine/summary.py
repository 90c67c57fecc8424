"""Parameter counts and sizes of a model, from its config alone (for `cpm2 info` and sizing)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from engine.config import ModelConfig
from engine.model import Seq2SeqLM


@dataclass(frozen=True)
class ModelSummary:
    """How big a model is, split the way offloading cares about: dense weights vs experts."""

    total_parameters: int
    dense_parameters: int
    """Everything that is not an expert (stays resident when experts are offloaded)."""
    expert_parameters: int
    num_moe_layers: int
    num_experts_per_layer: int
    parameters_per_expert: int
    bytes_per_parameter: int
    rows_per_expert: int = 0
    """Output rows of an expert's matrices (d_ff per input projection, d_model for the output one):
    a per-row quantised format stores one scale for each."""

    @property
    def bytes_per_expert(self) -> int:
        return self.parameters_per_expert * self.bytes_per_parameter

    @property
    def total_bytes(self) -> int:
        return self.total_parameters * self.bytes_per_parameter

    @property
    def expert_bytes(self) -> int:
        return self.expert_parameters * self.bytes_per_parameter

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "bytes_per_expert": self.bytes_per_expert,
            "total_bytes": self.total_bytes,
            "expert_bytes": self.expert_bytes,
            "dense_bytes": self.total_bytes - self.expert_bytes,
        }


def summarize(config: ModelConfig, dtype: torch.dtype = torch.float32) -> ModelSummary:
    """Count parameters by building the model on the meta device (no memory is allocated)."""
    with torch.device("meta"):
        model = Seq2SeqLM(config)
    counts = {k: v.numel() for k, v in model.state_dict().items()}
    expert = sum(n for k, n in counts.items() if ".experts." in k)
    moe_layers = len(model.moe_layers())
    num_experts = config.moe.num_experts if config.moe else 0
    return ModelSummary(
        total_parameters=sum(counts.values()),
        dense_parameters=sum(counts.values()) - expert,
        expert_parameters=expert,
        num_moe_layers=moe_layers,
        num_experts_per_layer=num_experts,
        parameters_per_expert=expert // (moe_layers * num_experts) if expert else 0,
        bytes_per_parameter=torch.empty((), dtype=dtype).element_size(),
        rows_per_expert=(config.d_ff * (2 if config.is_gated_ffn else 1) + config.d_model) if expert else 0,
    )


@dataclass(frozen=True)
class WeightFormat:
    """A way expert weights can be stored and run, and what it costs in bytes.

    Quantized formats (int8 with a scale per row, int4 with a scale and zero per group of inputs)
    are rows whose `nbytes` adds their scales; `cpm2 info` reports per-format expert sizes from this
    table alone.
    """

    name: str
    bits_per_weight: int
    scale_bytes_per_row: int = 0
    group_size: int = 0
    scale_bytes_per_group: int = 0

    def nbytes(self, num_parameters: int, num_rows: int = 0) -> int:
        groups = num_parameters // self.group_size if self.group_size else 0
        return (
            num_parameters * self.bits_per_weight // 8
            + num_rows * self.scale_bytes_per_row
            + groups * self.scale_bytes_per_group
        )


#: The formats the engine runs experts in, by name (float16 is left out: the T5 family overflows in
#: it; int8 and int4 are `cpm2 quantize`'s: one float32 scale per output row; a bfloat16 scale and
#: zero per 64 inputs, its default group size).
RUN_FORMATS: dict[str, WeightFormat] = {
    f.name: f
    for f in (
        WeightFormat("float32", 32),
        WeightFormat("bfloat16", 16),
        WeightFormat("int8", 8, 4),
        WeightFormat("int4", 4, group_size=64, scale_bytes_per_group=4),
    )
}


def expert_bytes_by_format(summary: ModelSummary) -> dict[str, int]:
    """Bytes of one expert in every format of `RUN_FORMATS` (empty for a dense model)."""
    if not summary.parameters_per_expert:
        return {}
    return {name: f.nbytes(summary.parameters_per_expert, summary.rows_per_expert) for name, f in RUN_FORMATS.items()}
