"""Top-2 routing: NLLB-MoE's gate (fairseq's `Top2Gate`, HF `NllbMoeTop2Router.route_tokens`).

Shape legend: N tokens of the forward pass (batch rows x positions, padding included), E experts,
K = 2 choices per token.

Each token's first expert is the argmax of its router probabilities, its second the argmax of the
logits with the first masked out (the "all" second-expert policy; fairseq's "random" and "sampling"
policies draw random numbers at inference and are not offered). Each expert then takes tokens up
to its capacity: first choices before second choices, each in token order or, with
`batch_prioritized_routing`, in order of the token's top probability over the whole forward pass.
The two gates are the two probabilities renormalised to sum to 1, before or after capacity drops
one of them (`normalize_gates_before_capacity`). At inference the capacity is ceil(fraction x N)
(`eval_capacity_fraction`; 1.0 never drops a token: an expert is chosen at most once per token);
otherwise `expert_capacity`, or 2 x ceil(N / E) without one. Capacity counts every token of the
forward pass, so when it binds, rows of a batch compete for it (as in fairseq and HF).

A (token, choice) pair reaches its expert when its gate is positive, as transformers 4.x decided it
(`router_probs.bool()`): a dropped choice has gate 0, and so has padding (masked out first).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from engine.config import MoEConfig


def _normalized(probs_NE: torch.Tensor, mask1_NE: torch.Tensor, mask2_NE: torch.Tensor) -> torch.Tensor:
    """The two chosen probabilities (N, 2) over their sum (floored at the dtype's eps), as HF's
    `normalize_router_probabilities` computes them (a sum over the masked row, exact)."""
    p1_N = (probs_NE * mask1_NE).sum(dim=1)
    p2_N = (probs_NE * mask2_NE).sum(dim=1)
    denom_N = torch.clamp(p1_N + p2_N, min=torch.finfo(probs_NE.dtype).eps)
    return torch.stack((p1_N / denom_N, p2_N / denom_N), dim=1)


def _locations(mask_NE: torch.Tensor, order: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """Each token's place (N, E) in the queue of its chosen expert (0-based; 0 where not chosen),
    counting in the permutation `order` = (order_N, its inverse) (None: token order)."""
    if order is None:
        return torch.cumsum(mask_NE, dim=0) - 1
    order_N, inverse_N = order
    sorted_NE = mask_NE[order_N]
    places_NE = (torch.cumsum(sorted_NE, dim=0) - 1) * sorted_NE
    return places_NE[inverse_N]


def capacity(moe: MoEConfig, num_tokens: int, *, training: bool) -> int:
    """Tokens one expert takes in a forward pass of `num_tokens` tokens (first and second choices)."""
    fraction = moe.eval_capacity_fraction
    if not training and fraction is not None and fraction > 0:
        return math.ceil(fraction * num_tokens)
    if moe.expert_capacity is not None:
        return moe.expert_capacity
    return 2 * math.ceil(num_tokens / moe.num_experts)


def route_top2(
    logits_NE: torch.Tensor,
    probs_NE: torch.Tensor,
    routed_N: torch.Tensor | None,
    moe: MoEConfig,
    *,
    training: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Expert (N, 2), gate (N, 2) in `probs_NE`'s dtype, and whether each choice reaches its expert
    (N, 2), from the router's logits (router dtype) and probabilities; `routed_N` marks the tokens
    that take part in routing (None: all)."""
    N, E = probs_NE.shape
    top1_N = probs_NE.argmax(dim=-1)
    mask1_NE = F.one_hot(top1_N, E)
    top2_N = logits_NE.masked_fill(mask1_NE.bool(), float("-inf")).argmax(dim=-1)
    mask2_NE = F.one_hot(top2_N, E)
    gates_N2 = _normalized(probs_NE, mask1_NE, mask2_NE) if moe.normalize_gates_before_capacity else None
    if routed_N is not None:
        mask1_NE = mask1_NE * routed_N.unsqueeze(-1)
        mask2_NE = mask2_NE * routed_N.unsqueeze(-1)
    order = None
    if moe.batch_prioritized_routing:
        order_N = torch.argsort(-probs_NE.max(dim=1).values, stable=True)
        order = (order_N, torch.argsort(order_N))
    # Second choices queue behind every first choice of their expert.
    places1_NE = _locations(mask1_NE, order)
    places2_NE = _locations(mask2_NE, order) + mask1_NE.sum(dim=0, keepdim=True)
    limit = capacity(moe, N, training=training)
    mask1_NE = mask1_NE * (places1_NE < limit)
    mask2_NE = mask2_NE * (places2_NE < limit)
    if gates_N2 is None:
        gates_N2 = _normalized(probs_NE, mask1_NE, mask2_NE)
    kept_N2 = torch.stack((mask1_NE.sum(dim=1), mask2_NE.sum(dim=1)), dim=1).bool()
    gates_N2 = gates_N2 * kept_N2
    expert_N2 = torch.stack((top1_N, top2_N), dim=1)
    return expert_N2, gates_N2, gates_N2 > 0
