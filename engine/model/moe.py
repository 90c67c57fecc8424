"""Mixture-of-Experts feed-forward layer: route, group tokens by expert, run each expert once.

Shape legend: B batch rows, S positions, K experts per token (`top_k`), N routed (token, choice)
pairs (padding and dropped choices removed), D model width, E experts.

Routers (SEED.md):
- CPM-2 / BASE layers: score = RMSNorm(x) @ centroids^T with frozen random orthogonal centroids;
  inference sends each token to its argmax expert, no capacity limit, output not gate-scaled.
- Switch Transformers (Fedus et al. 2021; HF `SwitchTransformersTop1Router`): a learned linear
  router run in float32; top-1; the expert output is scaled by the router probability; with an
  expert capacity, only the first `capacity` tokens of a sequence routed to an expert reach it and
  the others get a zero MoE output (HF transformers 5.x semantics). Capacity counts the tokens of
  one forward pass, so teacher forcing and one-token decode steps can differ when it binds.
- NLLB-MoE (fairseq `Top2Gate`): the same learned router, two experts per token, each output scaled
  by its renormalised gate and the two summed (`engine.model.top2`), times `expert_output_scale`.

Training-mode routing (`MoEConfig.train_routing`, only while `module.training`):
- `balanced`: CPM-2 / BASE layers (Lewis et al. 2021): the valid tokens of the batch are assigned
  so that every expert gets an equal share and the total routing score is maximal
  (`engine.model.assignment`); nothing is dropped and the capacity limit does not apply.
- `top1`: Switch top-1 as at inference, plus the load-balancing loss of Fedus et al. (2021, eq. 4-6)
  stored in `aux_loss` for the training loss to add (`load_balancing_loss`).
- `inference`: training routes exactly as inference does.

Where the expert weights live is not this module's business: it asks an `ExpertProvider` for the
experts its tokens need and runs them in whatever order the provider yields them (InfMoE orders
them so each transfer hides behind earlier compute). The default provider reads the layer's own
parameters; an offloading provider plugs in through `MoEFeedForward.expert_provider`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import MoEConfig
from engine.model.assignment import balanced_assignment
from engine.model.ffn import ACTIVATIONS, ExpertWeights, FeedForward, feed_forward
from engine.model.top2 import route_top2


@dataclass(frozen=True, order=True)
class MoELayerKey:
    """Names one MoE layer: the stack and the block index within it."""

    stack: Literal["encoder", "decoder"]
    block: int

    def __str__(self) -> str:
        return f"{self.stack}.{self.block}"


@dataclass(frozen=True)
class ExpertDemand:
    """One expert a layer needs in this forward pass, and how many tokens it will process."""

    expert: int
    num_tokens: int


@runtime_checkable
class ExpertProvider(Protocol):
    """Supplies expert weights to MoE layers; owns placement, transfer, caching and ordering."""

    def fetch(
        self, layer: MoELayerKey, demand: Sequence[ExpertDemand], hidden_ND: torch.Tensor
    ) -> Iterable[tuple[int, ExpertWeights]]:
        """Yield `(expert, weights)` once for every expert in `demand`, in the order to run them.

        The layer computes each expert as it is yielded, so a provider can start moving the next
        expert while the current one computes. `hidden_ND` is the layer's input, one row per routed
        token (padding left out) in token order, the same rows at every MoE layer of one forward
        pass (read-only): it lets a provider speculate about later layers' experts, and learn how
        one layer's input foretells the next one's routes.
        """
        ...


@runtime_checkable
class AnticipatingProvider(Protocol):
    """A provider that can start on a stack's first MoE layer before its block runs.

    Later MoE layers' experts are guessed from the layer before (`ExpertProvider.fetch`'s rows);
    the first MoE layer of a stack has none, so the stack hands its provider its input instead, the
    dense blocks ahead of that layer being the time a guessed load has to hide in."""

    def anticipate(self, layer: MoELayerKey, hidden_ND: torch.Tensor) -> None:
        """`hidden_ND`: the stack's input, normed as `layer`'s input will be normed, the same rows
        (one per routed token, in token order) that `fetch` will get for `layer` (read-only)."""
        ...


class ResidentExpertProvider:
    """Experts that are ordinary parameters of the layer, yielded in index order."""

    def __init__(self, experts: nn.ModuleList) -> None:
        self.experts = experts

    def fetch(
        self, layer: MoELayerKey, demand: Sequence[ExpertDemand], hidden_ND: torch.Tensor
    ) -> Iterable[tuple[int, ExpertWeights]]:
        for item in demand:
            expert = self.experts[item.expert]
            assert isinstance(expert, FeedForward)
            yield item.expert, expert.weights()


class CentroidRouter(nn.Module):
    """CPM-2's router: frozen centroids; the routing decision alone, no gate value."""

    def __init__(self, d_model: int, num_experts: int) -> None:
        super().__init__()
        # A buffer, not a parameter: the centroids never receive gradients (SEED.md).
        self.centroids: torch.Tensor
        self.register_buffer("centroids", torch.zeros(num_experts, d_model))

    def scores(self, x_BSD: torch.Tensor) -> torch.Tensor:
        """Routing scores (B, S, E), float32 so the routing does not depend on the weight dtype."""
        return F.linear(x_BSD.float(), self.centroids.float())

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.scores(x_BSD).argmax(dim=-1), None


class LearnedRouter(nn.Module):
    """Switch Transformers' top-1 router: softmax over a learned linear map, in `dtype`."""

    def __init__(self, d_model: int, num_experts: int, *, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.classifier = nn.Linear(d_model, num_experts, bias=bias)
        self.router_dtype = dtype

    def scores(self, x_BSD: torch.Tensor) -> torch.Tensor:
        """Router logits (B, S, E) in the router dtype."""
        weight = self.classifier.weight.to(self.router_dtype)
        bias = None if self.classifier.bias is None else self.classifier.bias.to(self.router_dtype)
        return F.linear(x_BSD.to(self.router_dtype), weight, bias)

    def probabilities(self, x_BSD: torch.Tensor) -> torch.Tensor:
        """Router probabilities (B, S, E) in the router dtype."""
        return torch.softmax(self.scores(x_BSD), dim=-1, dtype=self.router_dtype)

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        gate_BS, expert_BS = self.probabilities(x_BSD).to(x_BSD.dtype).max(dim=-1)
        return expert_BS, gate_BS


def load_balancing_loss(
    probs_BSE: torch.Tensor, expert_BS: torch.Tensor, valid_BS: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch Transformers' auxiliary loss E * sum_e f_e * P_e (Fedus et al. 2021, eq. 4-6).

    f_e is the fraction of tokens routed to expert e and P_e the mean router probability of e, both
    over the valid tokens of one sequence (a "group", as HF's `load_balancing_loss_func`), averaged
    over the sequences that have valid tokens. It is 1 when routing is uniform; f carries no
    gradient, so the router learns through P.
    """
    E = probs_BSE.shape[-1]
    weight_BS = torch.ones_like(expert_BS, dtype=torch.float32) if valid_BS is None else valid_BS.float()
    count_B = weight_BS.sum(dim=1)
    denom_B1 = count_B.clamp(min=1).unsqueeze(-1)
    routed_BE = (F.one_hot(expert_BS, E).float() * weight_BS.unsqueeze(-1)).sum(dim=1) / denom_B1
    prob_BE = (probs_BSE.float() * weight_BS.unsqueeze(-1)).sum(dim=1) / denom_B1
    per_group_B = E * (routed_BE * prob_BE).sum(dim=-1)
    has_tokens_B = count_B > 0
    return per_group_B[has_tokens_B].sum() / has_tokens_B.sum().clamp(min=1)


class MoEFeedForward(nn.Module):
    """An MoE feed-forward sublayer (the pre-norm lives in the block and is shared by the experts)."""

    def __init__(
        self,
        key: MoELayerKey,
        moe: MoEConfig,
        *,
        d_model: int,
        d_ff: int,
        activation: str,
        is_gated: bool,
        has_bias: bool = False,
    ) -> None:
        super().__init__()
        self.key = key
        self.moe = moe
        self.num_experts = moe.num_experts
        self.capacity = moe.expert_capacity
        self.train_routing = moe.train_routing
        self.aux_loss_coef = moe.aux_loss_coef
        self.aux_loss: torch.Tensor | None = None
        """The unweighted load-balancing loss of the last `top1` training forward, else None."""
        self.act = ACTIVATIONS[activation]
        self.router: CentroidRouter | LearnedRouter
        if moe.router == "centroid":
            self.router = CentroidRouter(d_model, moe.num_experts)
        else:
            self.router = LearnedRouter(
                d_model, moe.num_experts, bias=moe.router_bias, dtype=getattr(torch, moe.router_dtype)
            )
        self.experts = nn.ModuleList(
            FeedForward(d_model, d_ff, activation=activation, is_gated=is_gated, has_bias=has_bias)
            for _ in range(moe.num_experts)
        )
        self.expert_provider: ExpertProvider = ResidentExpertProvider(self.experts)

    def route(
        self, x_BSD: torch.Tensor, valid_BS: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Expert (B, S, K), gate (B, S, K) or None, and which choices reach their expert (B, S, K)."""
        if self.moe.top_k == 2:
            return self._route_top2(x_BSD, valid_BS)
        expert_BS, gate_BS, keep_BS = self._route_top1(x_BSD, valid_BS)
        return expert_BS.unsqueeze(-1), None if gate_BS is None else gate_BS.unsqueeze(-1), keep_BS.unsqueeze(-1)

    def _route_top2(
        self, x_BSD: torch.Tensor, valid_BS: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.aux_loss = None
        assert isinstance(self.router, LearnedRouter)  # MoEConfig guarantees it
        B, S, _ = x_BSD.shape
        logits_NE = self.router.scores(x_BSD).reshape(B * S, self.num_experts)
        probs_NE = torch.softmax(logits_NE, dim=-1, dtype=self.router.router_dtype).to(x_BSD.dtype)
        routed_N = None if valid_BS is None or self.moe.route_padding else valid_BS.reshape(-1)
        # Routed padding (`route_padding`) gets its experts' output, as in HF: it decides where that
        # padding goes in the next MoE layer, and so whose capacity it takes there.
        expert_N2, gate_N2, keep_N2 = route_top2(logits_NE, probs_NE, routed_N, self.moe, training=self.training)
        return expert_N2.view(B, S, 2), gate_N2.view(B, S, 2), keep_N2.view(B, S, 2)

    def _route_top1(
        self, x_BSD: torch.Tensor, valid_BS: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Expert (B, S), gate (B, S) or None, and which tokens reach their expert (B, S)."""
        self.aux_loss = None
        if self.training and self.train_routing == "balanced":
            return self._route_balanced(x_BSD, valid_BS)
        if self.training and self.train_routing == "top1":
            assert isinstance(self.router, LearnedRouter)  # MoEConfig guarantees it
            probs_BSE = self.router.probabilities(x_BSD)
            gate_BS, expert_BS = probs_BSE.to(x_BSD.dtype).max(dim=-1)
            self.aux_loss = load_balancing_loss(probs_BSE, expert_BS, valid_BS)
        else:
            expert_BS, gate_BS = self.router(x_BSD)
        keep_BS = torch.ones_like(expert_BS, dtype=torch.bool) if valid_BS is None else valid_BS
        if self.capacity is not None:
            # A token's priority is its rank among the tokens of its sequence routed to the same
            # expert, in sequence order (padding excluded); HF's cumsum over the sequence axis.
            onehot_BSE = F.one_hot(expert_BS, self.num_experts) * keep_BS.unsqueeze(-1)
            priority_BS = onehot_BSE.cumsum(dim=1).gather(-1, expert_BS.unsqueeze(-1)).squeeze(-1)
            keep_BS = keep_BS & (priority_BS <= self.capacity)
        return expert_BS, gate_BS, keep_BS

    def _route_balanced(
        self, x_BSD: torch.Tensor, valid_BS: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        keep_BS = torch.ones(x_BSD.shape[:2], dtype=torch.bool, device=x_BSD.device) if valid_BS is None else valid_BS
        scores_BSE = self.router.scores(x_BSD)
        token_N = keep_BS.reshape(-1).nonzero().squeeze(-1)
        expert_N = balanced_assignment(scores_BSE.reshape(-1, self.num_experts)[token_N])
        expert_BS = torch.zeros(keep_BS.numel(), dtype=torch.long, device=x_BSD.device)
        expert_BS = expert_BS.index_copy(0, token_N, expert_N).view(keep_BS.shape)
        gate_BS = None
        if isinstance(self.router, LearnedRouter):
            # BASE layers gate the expert output so the router trains; the learned router's
            # probability of the assigned expert plays that part here.
            probs_BSE = self.router.probabilities(x_BSD).to(x_BSD.dtype)
            gate_BS = probs_BSE.gather(-1, expert_BS.unsqueeze(-1)).squeeze(-1)
        return expert_BS, gate_BS, keep_BS

    def anticipate(
        self, x_BSD: torch.Tensor, valid_BS: torch.Tensor | None, *, norm: Callable[[torch.Tensor], torch.Tensor]
    ) -> None:
        """Hand an `AnticipatingProvider` what this layer's input would be if the blocks before it
        changed nothing: the stack's input `x_BSD` through `norm` (the layer's pre-norm), in the rows
        `fetch` will get. Other providers cost one type check: nothing is normed for them."""
        provider = self.expert_provider
        if isinstance(provider, AnticipatingProvider):
            normed_BSD = norm(x_BSD)
            provider.anticipate(self.key, self._provider_rows(normed_BSD.reshape(-1, normed_BSD.shape[-1]), valid_BS))

    def _provider_rows(self, x_MD: torch.Tensor, valid_BS: torch.Tensor | None) -> torch.Tensor:
        """The provider's view of the tokens (`ExpertProvider.fetch`); copied only when some are padding."""
        if valid_BS is not None and not self.moe.route_padding and not bool(valid_BS.all()):
            return x_MD[valid_BS.reshape(-1)]
        return x_MD

    def forward(self, x_BSD: torch.Tensor, valid_BS: torch.Tensor | None = None) -> torch.Tensor:
        """MoE output for normed input `x_BSD`; `valid_BS` marks real (non-padding) tokens."""
        B, S, D = x_BSD.shape
        expert_BSK, gate_BSK, keep_BSK = self.route(x_BSD, valid_BS)
        K = expert_BSK.shape[-1]
        x_MD = x_BSD.reshape(B * S, D)  # M = B * S tokens
        pair_N = keep_BSK.reshape(-1).nonzero().squeeze(-1)  # kept (token, choice) pairs, flat
        expert_N = expert_BSK.reshape(-1)[pair_N]
        # Sort the kept pairs by expert so each expert reads one contiguous slice.
        order_N = torch.argsort(expert_N, stable=True)
        pair_N = pair_N[order_N]
        token_N = pair_N // K
        counts = torch.bincount(expert_N, minlength=self.num_experts).tolist()
        starts = [0] * self.num_experts
        total = 0
        for e, count in enumerate(counts):
            starts[e] = total
            total += count
        demand = [ExpertDemand(e, n) for e, n in enumerate(counts) if n > 0]

        routed_ND = x_MD.index_select(0, token_N)
        out_ND = torch.empty_like(routed_ND)
        for e, weights in self.expert_provider.fetch(self.key, demand, self._provider_rows(x_MD, valid_BS)):
            rows = slice(starts[e], starts[e] + counts[e])
            out_ND[rows] = feed_forward(routed_ND[rows], weights, self.act)
        if self.moe.expert_output_scale != 1.0:
            out_ND = out_ND * self.moe.expert_output_scale
        if gate_BSK is not None:
            out_ND = out_ND * gate_BSK.reshape(-1)[pair_N].unsqueeze(-1)
        # Tokens that were dropped (over capacity) or are padding get a zero MoE output; a token's two
        # experts are summed (two terms: the same sum in any order).
        y_MD = torch.zeros_like(x_MD)
        if K == 1:
            y_MD.index_copy_(0, token_N, out_ND.to(x_MD.dtype))
        else:
            y_MD.index_add_(0, token_N, out_ND.to(x_MD.dtype))
        return y_MD.view(B, S, D)
