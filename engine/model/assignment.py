"""Balanced token-to-expert assignment for training CPM-2 / BASE-layer MoE layers.

Shape legend: N tokens, E experts, C slots per expert.

BASE layers (Lewis et al. 2021, "BASE Layers: Simplifying Training of Large, Sparse Models") and
CPM-2-MoE (SEED.md) route training tokens by solving a linear assignment: every expert takes the
same number of tokens, nothing is dropped, and the total routing score is maximised. fairseq solves
it with an auction algorithm (`fairseq/clib/libbase/balanced_assignment.cpp`); so does this module,
as Bertsekas' forward auction on the "similar objects" form of the problem, run in parallel
(Jacobi) (Bertsekas, "The auction algorithm: a distributed relaxation method for the assignment
problem", 1988; Bertsekas & Castanon 1989 for similar objects).

Each expert has C = ceil(N / E) slots; when E does not divide N, constant-score dummy tokens fill
the spare slots (they change no real token's choice, so an expert then gets between C - spare and C
tokens). Every slot has a price; an unassigned token bids for the cheapest slot of its best expert,
raising its price by the margin over its second-best option plus epsilon. All bidders bid at once:
an expert's bidders, highest bid first, take its cheapest slots in price order while their bid
exceeds the slot's price, which keeps every assignment epsilon-complementary-slack (each token is
within epsilon of its best option at the final prices). Hence the total score is within N * epsilon
of the optimum (N counting dummies); with integer scores and epsilon < 1 / N it is exactly optimal (tests check both
against brute force). Epsilon is `tolerance` times the score range (default 1%; fairseq uses
2%). One phase, no epsilon scaling: on routing scores (1024 tokens, 8 experts) scaling took 3x the
bidding rounds. The loop runs in numpy on the CPU (on a GPU: one small copy and a sync per MoE
layer), whose per-call overhead on these small arrays is a fraction of torch's; the assignment is
a routing decision without gradients, so nothing is lost.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def balanced_assignment(scores_NE: torch.Tensor, *, tolerance: float = 1e-2) -> torch.Tensor:
    """The expert (N,) of each token maximising the total score with at most ceil(N/E) tokens per expert.

    The total is within `E * ceil(N/E) * tolerance * (max - min score)` of the optimum (N when E
    divides N; exactly optimal for integer scores when that bound is below 1). Runs without
    gradients, in float64.
    """
    N, E = scores_NE.shape
    device = scores_NE.device
    if N == 0 or E == 1:
        return torch.zeros(N, dtype=torch.long, device=device)
    C = math.ceil(N / E)
    scores = scores_NE.detach().to("cpu", torch.float64).numpy()
    spare = E * C - N
    if spare:
        # Dummies score the same for every expert, so where they sit changes no real token's value.
        scores = np.concatenate([scores, np.full((spare, E), scores.min())])
    span = float(scores.max() - scores.min())
    if span == 0.0:  # every assignment is optimal: deal tokens out round-robin
        return torch.arange(N, device=device) % E
    slot_N = _auction(scores, C, eps=span * tolerance)
    return torch.from_numpy(slot_N[:N] // C).to(device)


def _auction(scores_NE: np.ndarray, C: int, *, eps: float) -> np.ndarray:
    """Bid until every token holds a slot; returns each token's flat slot `e * C + c`."""
    N, E = scores_NE.shape
    prices_EC = np.zeros((E, C))
    holder = np.full(E * C, -1)
    slot_N = np.full(N, -1)
    rows_E = np.arange(E)
    while True:
        bidders = np.flatnonzero(slot_N < 0)
        if bidders.size == 0:
            return slot_N
        slot_order_EC = np.argsort(prices_EC, axis=1, kind="stable")
        slot_price_EC = np.take_along_axis(prices_EC, slot_order_EC, axis=1)
        values_BE = scores_NE[bidders] - slot_price_EC[:, 0]  # value of each expert's cheapest slot
        best_B = values_BE.argmax(axis=1)
        score_B = scores_NE[bidders, best_B]
        # Second-best option: another expert's cheapest slot, or this expert's second-cheapest one.
        values_BE[np.arange(bidders.size), best_B] = -np.inf
        runner_up_B = values_BE.max(axis=1)
        if C > 1:
            runner_up_B = np.maximum(runner_up_B, score_B - slot_price_EC[best_B, 1])
        bid_B = score_B - runner_up_B + eps
        # Group bidders by expert, highest bid first; the k-th bidder of an expert targets its k-th
        # cheapest slot and wins it if it bids above that slot's price.
        order = np.lexsort((-bid_B, best_B))
        bidders, best_B, bid_B = bidders[order], best_B[order], bid_B[order]
        rank_B = np.arange(best_B.size) - np.searchsorted(best_B, rows_E)[best_B]
        won = rank_B < C
        won[won] = bid_B[won] > slot_price_EC[best_B[won], rank_B[won]]
        slot_w = best_B[won] * C + slot_order_EC[best_B[won], rank_B[won]]
        evicted = holder[slot_w]
        slot_N[evicted[evicted >= 0]] = -1
        holder[slot_w] = bidders[won]
        prices_EC.reshape(-1)[slot_w] = bid_B[won]
        slot_N[bidders[won]] = slot_w
