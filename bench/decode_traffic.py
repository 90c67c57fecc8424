"""What one decode step reads: weight bytes by part, and how many experts the MoE layers run.

A decode step at small batch is a chain of matrix-vector products, so its time is bounded below by
the weight bytes it reads over the machine's memory bandwidth. Experts are counted through the MoE
layer's expert-provider seam (`engine.model.moe.ExpertProvider`), without touching the model math.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from engine.config import ModelConfig
from engine.model import Seq2SeqLM
from engine.model.ffn import ExpertWeights, FeedForward
from engine.model.linear import linear
from engine.model.moe import (
    CentroidRouter,
    ExpertDemand,
    ExpertProvider,
    LearnedRouter,
    MoEFeedForward,
    MoELayerKey,
)


class CountingProvider:
    """Wraps a layer's expert provider and counts the experts fetched per call."""

    def __init__(self, inner: ExpertProvider) -> None:
        self.inner = inner
        self.counts: list[int] = []

    def fetch(
        self, layer: MoELayerKey, demand: Sequence[ExpertDemand], hidden_ND: torch.Tensor
    ) -> Iterable[tuple[int, ExpertWeights]]:
        self.counts.append(len(demand))
        return self.inner.fetch(layer, demand, hidden_ND)


def experts_per_decode_step(model: Seq2SeqLM, generate: Callable[[], object]) -> float:
    """Mean number of distinct experts one decoder MoE layer runs per step while `generate()` decodes
    with `model` (an untimed run: the counting wrapper is removed afterwards)."""
    layers = [m for m in model.moe_layers() if m.key.stack == "decoder"]
    counters = [CountingProvider(m.expert_provider) for m in layers]
    try:
        for layer, counter in zip(layers, counters, strict=True):
            layer.expert_provider = counter
        generate()
    finally:
        for layer, counter in zip(layers, counters, strict=True):
            layer.expert_provider = counter.inner
    counts = [c for counter in counters for c in counter.counts]
    return sum(counts) / len(counts) if counts else 0.0


def decode_weight_bytes(config: ModelConfig, *, dtype: torch.dtype, experts_per_layer: float) -> dict[str, float]:
    """Weight bytes one decode step reads, by part (matrices only; norms and position bias are tiny).

    Cross-attention keys/values are computed once per request, so only its query and output
    projections count. Each MoE layer reads its router and `experts_per_layer` experts.
    """
    size = torch.empty((), dtype=dtype).element_size()
    d, inner, ff = config.d_model, config.inner_dim, config.d_ff
    ffn = (3 if config.is_gated_ffn else 2) * d * ff
    sparse = config.moe_layers("decoder")
    num_dense = config.num_decoder_layers - len(sparse)
    num_experts = config.moe.num_experts if config.moe is not None else 0
    parts = {
        "self_attention": config.num_decoder_layers * 4 * d * inner,
        "cross_attention_q_o": config.num_decoder_layers * 2 * d * inner,
        "dense_ffn": num_dense * ffn,
        "routers": len(sparse) * num_experts * d,
        "experts": len(sparse) * experts_per_layer * ffn,
        "lm_head": config.vocab_size * d,
    }
    out = {name: float(count * size) for name, count in parts.items()}
    out["total"] = sum(out.values())
    return out


def _ffn_weights(ffn: FeedForward) -> list[torch.Tensor]:
    # `FeedForward.weights()` is the bias-free expert view; a dense FFN with biases (M2M-100) is read
    # from its projections (the chain times the matrix products; bias adds count as other ops).
    projections = [ffn.wi_0, ffn.wi_1] if ffn.is_gated else [ffn.wi]
    return [p.weight for p in (*projections, ffn.wo)]


def _router_weight(router: CentroidRouter | LearnedRouter) -> torch.Tensor:
    return router.centroids if isinstance(router, CentroidRouter) else router.classifier.weight


def decode_gemv_weights(model: Seq2SeqLM, *, step: int = 0) -> list[torch.Tensor]:
    """The weight matrices one batch-1 decode step multiplies by, in order (packed where cpm2 packs).

    The expert of each MoE layer rotates with `step`, as routing would, so a chain of steps does not
    keep re-reading one cached expert.
    """
    weights: list[torch.Tensor] = []
    for block in model.decoder.layers():
        weights += [block.attn.qkv.weight, block.attn.o.weight, block.cross.q.weight, block.cross.o.weight]
        mlp = block.mlp
        if isinstance(mlp, MoEFeedForward):
            expert = mlp.experts[step % mlp.num_experts]
            assert isinstance(expert, FeedForward)
            weights += [_router_weight(mlp.router), *_ffn_weights(expert)]
        else:
            weights += _ffn_weights(mlp)
    weights.append(model.embed.weight if model.lm_head is None else model.lm_head.weight)
    return weights


@torch.inference_mode()
def time_gemv_chain(model: Seq2SeqLM, *, num_steps: int, repeats: int = 5) -> dict[str, Any]:
    """Time only the matrix-vector products of `num_steps` batch-1 decode steps, back to back.

    The same kernels on the same weights as decoding (`engine.model.linear.linear`), without the
    norms, attention, routing, sampling and Python around them: the step time this leaves over is
    what everything else costs.
    """
    steps = [decode_gemv_weights(model, step=s) for s in range(num_steps)]
    dtype = steps[0][0].dtype
    inputs = {w.shape[1]: torch.randn(1, w.shape[1], dtype=dtype) for chain in steps for w in chain}
    num_bytes = sum(w.numel() * w.element_size() for chain in steps for w in chain) / num_steps

    def run_chain() -> None:
        for chain in steps:
            for w in chain:
                linear(inputs[w.shape[1]], w)

    run_chain()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run_chain()
        times.append((time.perf_counter() - start) / num_steps)
    return {
        "num_gemvs_per_step": len(steps[0]),
        "weight_bytes_per_step": num_bytes,
        "step_s": times,
        "best_step_ms": min(times) * 1e3,
        "median_step_ms": statistics.median(times) * 1e3,
        "best_gb_s": num_bytes / min(times) / 1e9,
    }
