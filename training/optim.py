"""Optimizers and learning-rate schedules built from the job config."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from training.config import OptimizerSpec, ScheduleSpec


def build_optimizer(named_params: Iterable[tuple[str, nn.Parameter]], spec: OptimizerSpec) -> torch.optim.Optimizer:
    """AdamW or Adafactor over the given trainable parameters.

    Weight decay skips vectors (norm weights, biases), as in T5 / HF fine-tuning recipes; a soft
    prompt is a matrix and is decayed, as CPM-2's prompt tuning did (weight decay 0.01).
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for _, p in named_params:
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": spec.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if spec.name == "adamw":
        return torch.optim.AdamW(groups, lr=spec.lr, betas=spec.betas, eps=spec.eps)
    return torch.optim.Adafactor(groups, lr=spec.lr)


def lr_factor(spec: ScheduleSpec, step: int, total_steps: int) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based)."""
    done = step + 1  # the first update already uses a non-zero warm-up rate
    if spec.warmup_steps and done <= spec.warmup_steps:
        return done / spec.warmup_steps
    if spec.name == "constant":
        return 1.0
    if spec.name == "inverse_sqrt":
        return math.sqrt(max(spec.warmup_steps, 1) / done)
    span = max(total_steps - spec.warmup_steps, 1)
    progress = min((done - spec.warmup_steps) / span, 1.0)
    return 1.0 - (1.0 - spec.min_lr_ratio) * progress


def build_scheduler(optimizer: torch.optim.Optimizer, spec: ScheduleSpec, total_steps: int) -> LambdaLR:
    """A LambdaLR stepping `lr_factor`; its state (the step count) goes into checkpoints."""
    return LambdaLR(optimizer, lambda step: lr_factor(spec, step, total_steps))
