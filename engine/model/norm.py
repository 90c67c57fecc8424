"""T5 layer norm: RMS normalisation with a learned scale, no mean subtraction and no bias."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """`weight * x / sqrt(mean(x^2) + eps)`, accumulated in float32 as T5 and CPM-2 do."""

    def __init__(self, d_model: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_model))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The variance is taken in float32 even for half inputs; the product with the fp32 rsqrt
        # promotes to fp32 and is cast back to the weight's dtype (same rounding as HF T5LayerNorm).
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x
