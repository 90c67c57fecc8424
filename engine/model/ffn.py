"""T5 feed-forward networks: the dense FFN sublayer and the identical-shaped MoE experts.

T5 v1.0 and Switch use `wo(act(wi x))`; CPM-2 and T5 v1.1 the gated form `wo(act(wi_0 x) * wi_1 x)`
with the tanh-approximated GELU (SEED.md); M2M-100 and NLLB-200 `fc2(relu(fc1 x))` with biases,
which is the ungated form with `has_bias`. An expert is exactly one such network (NLLB-MoE's experts
have biases too).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from engine.model.int4 import Int4Weight
from engine.model.linear import Linear, linear
from engine.model.quant import Int8Weight


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu_new": _gelu_tanh,
    "gelu": F.gelu,
    "silu": F.silu,
}


#: A matrix as `linear` takes it: float (plain or packed for the CPU), int8 (`engine.model.quant`) or
#: int4 (`engine.model.int4`).
Weight = torch.Tensor | Int8Weight | Int4Weight


class ExpertWeights(NamedTuple):
    """The three (or two) matrices of one feed-forward network, in `nn.Linear` layout (out, in),
    packed for the CPU (`engine.model.linear`), or quantised (an int8 or int4 expert store).

    `wi_0` is the activation branch (`wi` of an ungated FFN), `wi_1` the linear gate branch (None
    when ungated), `wo` the output projection; their biases where the network has them (NLLB-MoE).
    """

    wi_0: Weight  # (F, D)
    wi_1: Weight | None  # (F, D)
    wo: Weight  # (D, F)
    bi_0: torch.Tensor | None = None  # (F,)
    bi_1: torch.Tensor | None = None  # (F,)
    bo: torch.Tensor | None = None  # (D,)


def feed_forward(x: torch.Tensor, weights: ExpertWeights, act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Apply one FFN to `x` (..., D) and return (..., D)."""
    h = act(linear(x, weights.wi_0, weights.bi_0))
    if weights.wi_1 is not None:
        h = h * linear(x, weights.wi_1, weights.bi_1)
    # A float `wo` takes its own dtype (bf16 weights under fp32 activations); a quantised one
    # computes in the activations' dtype.
    return linear(h.to(weights.wo.dtype) if isinstance(weights.wo, torch.Tensor) else h, weights.wo, weights.bo)


class FeedForward(nn.Module):
    """A dense FFN with T5 parameter names (`wi` or `wi_0`/`wi_1`, `wo`); also the unit an expert is."""

    def __init__(self, d_model: int, d_ff: int, *, activation: str, is_gated: bool, has_bias: bool = False) -> None:
        super().__init__()
        self.is_gated = is_gated
        self.has_bias = has_bias
        self.act = ACTIVATIONS[activation]
        if is_gated:
            self.wi_0 = Linear(d_model, d_ff, bias=has_bias)
            self.wi_1 = Linear(d_model, d_ff, bias=has_bias)
        else:
            self.wi = Linear(d_model, d_ff, bias=has_bias)
        self.wo = Linear(d_ff, d_model, bias=has_bias)

    def weights(self) -> ExpertWeights:
        """The matrices (and biases) as an `ExpertWeights` (views, no copies)."""
        wi = self.wi_0 if self.is_gated else self.wi
        wi_1 = self.wi_1 if self.is_gated else None
        return ExpertWeights(
            wi.matrix,
            None if wi_1 is None else wi_1.matrix,
            self.wo.matrix,
            bi_0=wi.bias,
            bi_1=None if wi_1 is None else wi_1.bias,
            bo=self.wo.bias,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return feed_forward(x, self.weights(), self.act)
