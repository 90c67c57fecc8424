"""Hugging Face NLLB-MoE checkpoints (`model_type: nllb-moe`): config and key map.

NLLB-MoE (NLLB Team 2022; fairseq's MoE Transformer) is M2M-100 / NLLB-200's pre-norm encoder-decoder
(`engine.weights.hf_m2m100`) whose every `sparse_step`-th block (HF: block i when (i + 1) % step == 0)
has a top-2 MoE feed-forward: a learned router (`ffn.router.classifier`, in `router_dtype`) and
`num_experts` experts, each `fc2(relu(fc1 x))` with biases (`ffn.experts.expert_{e}`). HF names some
modules differently from M2M-100 (`cross_attention`, `ff_layer_norm`, `ffn.fc1`). Routing follows
HF `NllbMoeTop2Router` (`engine.model.top2`); the experts' combination follows transformers 4.x and
fairseq (transformers 5.x's `NllbMoeExperts.forward` one-hot-encodes the one-hot top-1 mask and runs
experts 0 and 1 for every token; tests/test_parity_nllb_moe.py shows it). At inference each expert
output is scaled by 1 - `moe_token_dropout`, as transformers does.
"""

from __future__ import annotations

import re
from typing import Any

from engine.config import ModelConfig, MoEConfig
from engine.errors import CheckpointError, UnsupportedModelError
from engine.weights.hf_m2m100 import LayerNames, m2m100_sources, m2m100_to_config
from engine.weights.keys import split_block_key

MODEL_TYPE = "nllb-moe"

NAMES = LayerNames(cross="cross_attention", cross_norm="cross_attention_layer_norm", ff_norm="ff_layer_norm", ffn="ffn")


def _sparse_layers(data: dict[str, Any], stack: str, num_layers: int, *, source: str) -> tuple[int, ...]:
    step = data.get(f"{stack}_sparse_step", 4)
    if isinstance(step, bool) or not isinstance(step, int):
        raise CheckpointError(f"{source}: {stack}_sparse_step must be an integer, got {step!r}")
    return tuple(i for i in range(num_layers) if step > 0 and (i + 1) % step == 0)


def _fraction(data: dict[str, Any], *, source: str) -> float | None:
    value = data.get("moe_eval_capacity_token_fraction", 1.0)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CheckpointError(f"{source}: moe_eval_capacity_token_fraction must be a number, got {value!r}")
    return float(value)


def nllb_moe_to_config(data: dict[str, Any], *, source: str) -> ModelConfig:
    """Translate an HF `nllb-moe` `config.json` (parsed) into a `ModelConfig` (NllbMoeConfig's defaults)."""
    policy = data.get("second_expert_policy", "all")
    if policy != "all":
        raise UnsupportedModelError(
            f"{source}: second_expert_policy {policy!r} draws random numbers at inference (its second expert "
            "changes from run to run); cpm2 runs NLLB-MoE with second_expert_policy 'all', as released"
        )
    router_dtype = str(data.get("router_dtype", "float32"))
    if router_dtype not in ("float32", "bfloat16", "float16"):
        raise UnsupportedModelError(f"{source}: router_dtype {router_dtype!r} is not float32, bfloat16 or float16")
    dropout = data.get("moe_token_dropout", 0.2)
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise CheckpointError(f"{source}: moe_token_dropout must be a number in [0, 1), got {dropout!r}")
    capacity = data.get("expert_capacity", 64)
    if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int)):
        raise CheckpointError(f"{source}: expert_capacity must be an integer or null, got {capacity!r}")
    base = m2m100_to_config({**data, "model_type": "m2m_100"}, source=source)
    moe = MoEConfig(
        num_experts=int(data.get("num_experts", 128)),
        router="learned",
        top_k=2,
        encoder_layers=_sparse_layers(data, "encoder", base.num_encoder_layers, source=source),
        decoder_layers=_sparse_layers(data, "decoder", base.num_decoder_layers, source=source),
        expert_capacity=None if capacity is None else max(capacity, 0),
        router_bias=bool(data.get("router_bias", False)),
        router_dtype=router_dtype,  # type: ignore[arg-type]
        normalize_gates_before_capacity=bool(data.get("normalize_router_prob_before_dropping", False)),
        batch_prioritized_routing=bool(data.get("batch_prioritized_routing", False)),
        eval_capacity_fraction=_fraction(data, source=source),
        route_padding=bool(data.get("router_ignore_padding_tokens", False)),
        expert_output_scale=1.0 - float(dropout),
    )
    extra = {**base.extra, "model_type": MODEL_TYPE}
    return base.replace(family=MODEL_TYPE, moe=moe, extra=extra)


def nllb_moe_sources(native: str) -> tuple[str, ...]:
    """HF tensor names making up native tensor `native` (raises KeyError for an unmapped name)."""
    if ".mlp.experts." not in native and ".mlp.router." not in native:
        return m2m100_sources(native, NAMES)
    stack, block, rest = split_block_key(native)
    ffn = f"model.{stack}.layers.{block}.ffn"
    m = re.fullmatch(r"mlp\.router\.classifier\.(weight|bias)", rest)
    if m:
        return (f"{ffn}.router.classifier.{m.group(1)}",)
    m = re.fullmatch(r"mlp\.experts\.(\d+)\.(wi|wo)\.(weight|bias)", rest)
    if m:
        fc = "fc1" if m.group(2) == "wi" else "fc2"
        return (f"{ffn}.experts.expert_{m.group(1)}.{fc}.{m.group(3)}",)
    raise KeyError(native)
