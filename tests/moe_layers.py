"""A small randomly initialised MoE layer shared by the MoE math tests and the training-routing tests."""

from __future__ import annotations

import torch

from engine.config import MoEConfig
from engine.model import MoELayerKey
from engine.model.moe import MoEFeedForward

KEY = MoELayerKey("encoder", 0)


def random_moe_layer(
    router: str,
    *,
    experts: int = 4,
    capacity: int | None = None,
    gated: bool = True,
    train_routing: str = "inference",
) -> MoEFeedForward:
    """d_model 16, d_ff 32, weights N(0, 0.5) (seed 0), orthogonal centroids; in training mode."""
    torch.manual_seed(0)
    moe = MoEConfig(
        num_experts=experts,
        router=router,
        encoder_layers=(0,),
        decoder_layers=(),
        expert_capacity=capacity,
        train_routing=train_routing,
    )
    layer = MoEFeedForward(KEY, moe, d_model=16, d_ff=32, activation="gelu_new", is_gated=gated)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
        if router == "centroid":
            torch.nn.init.orthogonal_(layer.router.centroids)
    return layer
