"""Choosing the next token of each row: repetition penalty, temperature, top-k, top-p, seeded draws.

Shape legend: B rows, V vocabulary, S sampled rows, K candidate tokens per row.

Semantics follow HF transformers' logits processors (`RepetitionPenaltyLogitsProcessor`,
`TemperatureLogitsWarper`, `TopKLogitsWarper`, `TopPLogitsWarper`) applied in that order, so a
request behaves like the same request sent to TGI or `generate`. Every row has its own
`torch.Generator`, seeded per request: a request's tokens do not depend on what else is batched
with it.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from engine.generation.params import SamplingParams


def new_seed() -> int:
    """A fresh random seed for a request that did not bring one."""
    return secrets.randbits(63)


@dataclass
class TokenChooser:
    """Per-request token selection state: the random stream and the tokens seen so far."""

    params: SamplingParams
    seed: int | None = None
    generator: torch.Generator | None = None
    seen: set[int] = field(default_factory=set)
    num_chosen: int = 0

    @classmethod
    def create(cls, params: SamplingParams, *, start_token: int, device: torch.device) -> TokenChooser:
        seed = generator = None
        if params.is_sampling:
            seed = params.seed if params.seed is not None else new_seed()
            # CPU generator even for CUDA models: a draw takes one uniform from it (`draw_rows`), so
            # the stream is the same on every device.
            generator = torch.Generator(device="cpu").manual_seed(seed)
        del device
        return cls(params=params, seed=seed, generator=generator, seen={start_token})

    def forced_token(self) -> int | None:
        """The token this row must take next (`SamplingParams.forced_tokens`), if any."""
        forced = self.params.forced_tokens
        return forced[self.num_chosen] if self.num_chosen < len(forced) else None


def apply_repetition_penalty(scores_V: torch.Tensor, seen: set[int], penalty: float) -> torch.Tensor:
    """HF/CTRL repetition penalty on one row: seen tokens' positive scores / penalty, negative * penalty."""
    index = torch.tensor(sorted(seen), device=scores_V.device)
    picked = scores_V.index_select(0, index)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return scores_V.index_copy(0, index, picked)


def warp_rows(scores_BV: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k, then top-p (HF's warpers, in that order) on float32 logits, each row
    with its own settings: (B, V) scores, removed tokens -inf (`warped_candidates`)."""
    values_BK, index_BK = warped_candidates(scores_BV, params)
    if index_BK is None:
        return values_BK
    return torch.full_like(scores_BV, -float("inf")).scatter(-1, index_BK, values_BK)


def warped_candidates(
    scores_BV: torch.Tensor, params: Sequence[SamplingParams]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Temperature, top-k and top-p (HF's semantics) for every row at once, each with its own settings,
    without sorting the vocabulary: (values, token ids) of the tokens each row may still draw, the
    rest of its vocabulary removed; or (B, V) scores and None when a row needs the whole vocabulary.

    When every row has a top-k, the candidates are the top max(k) tokens and everything after the
    one top-k pass works on them (unless a tie at a row's k-th score reaches the last candidate:
    HF keeps every token tied with the k-th, so then the whole vocabulary is masked instead).
    Top-p keeps the most likely tokens while the probability mass strictly above a token is below
    `top_p` (HF sorts ascending and drops tokens whose cumulative mass is <= 1 - top_p: the same set
    in exact arithmetic); without top-k that set is found in the top `k` tokens, k grown 8x from 64
    until the cut falls inside, so a 256k vocabulary costs a softmax and small top-k passes instead
    of a full sort (warping one such row that way took 20 ms on 2 cores). A row's result does not
    depend on the other rows: k only decides how much is looked at, not what is kept.
    """
    vocab = scores_BV.shape[-1]
    device = scores_BV.device
    temperature_B1 = torch.tensor(
        [[p.temperature if p.temperature not in (None, 0.0) else 1.0] for p in params], dtype=scores_BV.dtype
    ).to(device)
    if bool((temperature_B1 != 1.0).any()):
        scores_BV = scores_BV / temperature_B1
    top_k = [p.top_k if p.top_k is not None and p.top_k < vocab else 0 for p in params]
    top_p_B1 = torch.tensor([[p.top_p if p.top_p is not None else 1.0] for p in params]).to(device)
    nucleus = bool((top_p_B1 < 1.0).any())
    if not any(top_k):
        return (_nucleus_full(scores_BV, top_p_B1) if nucleus else scores_BV), None
    k_B1 = torch.tensor([[k or vocab] for k in top_k], device=device)
    # One more than the candidates: HF keeps every token tied with a row's k-th score, so where the
    # first token past them ties, the whole vocabulary is masked instead.
    count = max(top_k)
    values_BK, index_BK = torch.topk(scores_BV, min(vocab, count + 1), dim=-1)
    kth_B1 = values_BK.gather(-1, k_B1.clamp(max=count) - 1)
    tie_past = values_BK.shape[-1] > count and bool((values_BK[:, count:] == kth_B1).any())
    values_BK, index_BK = values_BK[:, :count], index_BK[:, :count]
    if all(top_k) and not tie_past:
        values_BK = values_BK.masked_fill(values_BK < kth_B1, -float("inf"))
        if nucleus:
            values_BK = values_BK.masked_fill(~_nucleus_keeps(values_BK.float().softmax(-1), top_p_B1), -float("inf"))
        return values_BK, index_BK
    kth_B1 = kth_B1.masked_fill(torch.tensor([[k == 0] for k in top_k], device=device), -float("inf"))
    scores_BV = scores_BV.masked_fill(scores_BV < kth_B1, -float("inf"))
    return (_nucleus_full(scores_BV, top_p_B1, limit=[k or vocab for k in top_k]) if nucleus else scores_BV), None


def _nucleus_keeps(probs_BK: torch.Tensor, top_p_B1: torch.Tensor) -> torch.Tensor:
    """Which of each row's candidates, sorted most likely first, top-p keeps: those with less than
    `top_p` of the probability mass strictly above them (float64 sums); rows with top_p 1 keep all
    (their mass may round past 1)."""
    above_BK = probs_BK.double().cumsum(-1) - probs_BK
    return (above_BK < top_p_B1) | (top_p_B1 >= 1.0)


def _nucleus_full(
    scores_BV: torch.Tensor, top_p_B1: torch.Tensor, *, limit: Sequence[int] | None = None
) -> torch.Tensor:
    """Top-p on whole-vocabulary rows (rows with top_p 1 keep everything); `limit`: each row's
    count of tokens with any probability (its top-k), past which no candidate need be looked at."""
    rows, vocab = scores_BV.shape
    limit_B = torch.tensor(limit if limit is not None else [vocab] * rows, device=scores_BV.device)
    probs_BV = scores_BV.float().softmax(-1)
    k = min(vocab, 64)
    while True:
        probs_BK, index_BK = torch.topk(probs_BV, k, dim=-1)
        keep_BK = _nucleus_keeps(probs_BK, top_p_B1)
        if not bool((keep_BK[:, -1] & (limit_B > k) & (top_p_B1[:, 0] < 1.0)).any()):
            break  # every row's cut falls inside its top k
        k = min(vocab, k * 8)
    remove_BV = torch.ones_like(scores_BV, dtype=torch.bool).scatter(-1, index_BK, ~keep_BK)
    return scores_BV.masked_fill(remove_BV & (top_p_B1 < 1.0), -float("inf"))  # top_p 1 rows keep all


def draw_rows(probs_SV: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One token per row from its probabilities, each row with its own generator: inverse CDF on the
    row's cumulative sum with one uniform from the row's generator. The same draw as
    `torch.multinomial` in distribution, at one uniform per row, where multinomial took 5.5 ms a row
    on a 256k vocabulary on 2 cores. Zero-probability tokens are never drawn (the first cumulative
    value above the target is always a token's own rise). float32: a float64 cumsum of 16 x 256k
    took 20 ms against 1.5, and its rounding (~1e-5 of the mass) is far below sampling noise."""
    cdf_SV = probs_SV.float().cumsum(-1)
    uniform_S = torch.stack([torch.rand((), generator=g) for g in generators])
    target_S1 = (uniform_S.to(cdf_SV.device) * cdf_SV[:, -1]).unsqueeze(-1)
    tokens_S = torch.searchsorted(cdf_SV, target_S1, right=True).squeeze(-1)
    return tokens_S.clamp_(max=probs_SV.shape[-1] - 1)


def choose_tokens(logits_BV: torch.Tensor, choosers: list[TokenChooser]) -> tuple[list[int], list[float]]:
    """Next token of every row and its log-probability under the model's raw distribution.

    Scores are penalised, warped and drawn from for all rows together; each sampled row draws with
    its own generator, so its tokens do not depend on what else is batched."""
    logits_BV = logits_BV.float()
    scores_BV = logits_BV
    penalised = [i for i, c in enumerate(choosers) if c.params.repetition_penalty not in (None, 1.0)]
    if penalised:
        scores_BV = scores_BV.clone()
        for i in penalised:
            penalty = choosers[i].params.repetition_penalty
            assert penalty is not None
            scores_BV[i] = apply_repetition_penalty(scores_BV[i], choosers[i].seen, penalty)
    forced = {i: token for i, c in enumerate(choosers) if (token := c.forced_token()) is not None}
    sampled = [i for i, c in enumerate(choosers) if c.generator is not None and i not in forced]
    if len(sampled) + len(forced) < len(choosers):
        tokens_B = scores_BV.max(dim=-1).indices  # the first maximum, as argmax (which took 2.5x as long)
    else:
        tokens_B = torch.zeros(len(choosers), dtype=torch.long, device=scores_BV.device)
    if sampled:
        index = torch.tensor(sampled, device=scores_BV.device)
        rows_SV = scores_BV if len(sampled) == len(choosers) else scores_BV.index_select(0, index)
        values_SK, candidates_SK = warped_candidates(rows_SV, [choosers[i].params for i in sampled])
        generators = [choosers[i].generator for i in sampled]
        drawn_S = draw_rows(values_SK.softmax(-1), generators)  # type: ignore[arg-type]
        if candidates_SK is not None:
            drawn_S = candidates_SK.gather(-1, drawn_S.unsqueeze(-1)).squeeze(-1)
        tokens_B = tokens_B.index_copy(0, index, drawn_S)
    if forced:
        tokens_B = tokens_B.index_copy(
            0, torch.tensor(list(forced), device=tokens_B.device), torch.tensor(list(forced.values())).to(tokens_B)
        )
    chosen_B1 = tokens_B.unsqueeze(-1)
    # A fused log-softmax then a gather measured faster than logit - logsumexp (0.73 vs 0.98 ms at
    # 64 x 32k), its (B, V) result notwithstanding.
    logprobs_B = torch.log_softmax(logits_BV, dim=-1).gather(-1, chosen_B1).squeeze(-1)
    tokens = tokens_B.tolist()
    logprobs = logprobs_B.tolist()
    for chooser, token in zip(choosers, tokens, strict=True):
        chooser.seen.add(token)
        chooser.num_chosen += 1
    return tokens, logprobs
