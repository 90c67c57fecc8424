"""Bias-free linear layers, and the CPU weight packing that decode speed depends on.

Decoding reads every weight matrix once per token with one (or a few) input rows: it is a chain of
GEMVs bound by memory bandwidth. On CPUs, oneDNN's matmul over weights reordered into its blocked
layout (`mkldnn._reorder_linear_weight`, the path torch.compile's CPU freezing takes) streams
weights about twice as fast as `F.linear` over the plain (out, in) layout, which MKL serves with a
strided GEMV (measured: 10 GB/s vs 22-25 GB/s on a 2-core EPYC, fp32, weights not in cache).

Packing is an inference-only transformation applied from outside (`pack_for_cpu`); the model code
calls `linear(x, w)`, which takes either layout, so training and tests of the plain model are
unaffected. Results differ from `F.linear` only by summation order (~1e-6 relative).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`x @ weight.T` for a plain (out, in) weight or one packed by `pack_weight`."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
    return F.linear(x, weight)


class Linear(nn.Linear):
    """`nn.Linear` without bias whose weight may be packed for the CPU."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


def can_pack(weight: torch.Tensor) -> bool:
    """Whether `weight` can use the oneDNN packed layout here (CPU, fp32/bf16, oneDNN built in)."""
    return (
        weight.device.type == "cpu"
        and weight.dtype in (torch.float32, torch.bfloat16)
        and not weight.is_mkldnn
        and weight.dim() == 2
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight in oneDNN's blocked layout (a new tensor; a copy of the data).

    No batch-size hint: the layout oneDNN picks for a hint of 1 is ~5% faster at one row but
    ~40% slower at 16 rows (measured, fp32, 2-core EPYC), and a server decodes batches.
    """
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


def unpack_weight(weight: torch.Tensor) -> torch.Tensor:
    """A plain (out, in) tensor for a packed or plain weight."""
    return weight.to_dense() if weight.is_mkldnn else weight


def pack_for_cpu(model: nn.Module) -> int:
    """Pack every `Linear` weight of `model` in place; returns how many were packed.

    Call after loading, for inference only (packed weights take no gradients and are not saved).
    """
    count = 0
    for module in model.modules():
        if isinstance(module, Linear) and can_pack(module.weight):
            module.weight = nn.Parameter(pack_weight(module.weight), requires_grad=False)
            count += 1
    return count
