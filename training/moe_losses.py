"""MoE auxiliary losses for the training loss: Switch's load-balancing loss (Fedus et al. 2021).

An MoE layer trained with `train_routing: top1` leaves its unweighted load-balancing loss in
`MoEFeedForward.aux_loss` after each training forward; `moe_aux_loss` weighs each by its layer's
`aux_loss_coef` and sums them, and `seq2seq_moe_loss` adds that to the LM loss. Balanced (CPM-2 /
BASE) routing needs no auxiliary loss: the assignment itself is balanced.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.model.moe import MoEFeedForward
from training.losses import seq2seq_lm_loss
from training.trainer import Batch, Metrics

__all__ = ["moe_aux_loss", "seq2seq_moe_loss"]


def moe_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of `aux_loss_coef · aux_loss` over the MoE layers of the last forward; None when no layer
    produced one (dense model, eval mode, or routing without an auxiliary loss)."""
    losses = [
        layer.aux_loss_coef * layer.aux_loss
        for layer in model.modules()
        if isinstance(layer, MoEFeedForward) and layer.aux_loss is not None
    ]
    return torch.stack(losses).sum() if losses else None


def seq2seq_moe_loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, Metrics]:
    """`seq2seq_lm_loss` plus the MoE auxiliary losses; logs `lm_loss` and `aux_loss` separately."""
    lm_loss, metrics = seq2seq_lm_loss(model, batch)
    aux = moe_aux_loss(model)
    if aux is None:
        return lm_loss, {**metrics, "lm_loss": lm_loss.detach()}
    return lm_loss + aux, {**metrics, "lm_loss": lm_loss.detach(), "aux_loss": aux.detach()}
