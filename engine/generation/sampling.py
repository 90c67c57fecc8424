"""Choosing the next token of each row: repetition penalty, temperature, top-k, top-p, seeded draws.

Shape legend: B rows, V vocabulary.

Semantics follow HF transformers' logits processors (`RepetitionPenaltyLogitsProcessor`,
`TemperatureLogitsWarper`, `TopKLogitsWarper`, `TopPLogitsWarper`) applied in that order, so a
request behaves like the same request sent to TGI or `generate`. Every row has its own
`torch.Generator`, seeded per request: a request's tokens do not depend on what else is batched
with it.
"""

from __future__ import annotations

import secrets
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
            # CPU generator even for CUDA models: draws happen on small host copies of the probabilities,
            # so the stream is the same on every device.
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


def warp(scores_V: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p, on one row of float32 logits; removed tokens get -inf."""
    if params.temperature is not None and params.temperature not in (0.0, 1.0):
        scores_V = scores_V / params.temperature
    if params.top_k is not None and params.top_k < scores_V.shape[-1]:
        kth = torch.topk(scores_V, params.top_k).values[-1]
        scores_V = scores_V.masked_fill(scores_V < kth, -float("inf"))
    if params.top_p is not None and params.top_p < 1.0:
        sorted_V, order_V = torch.sort(scores_V, descending=False)
        cumulative_V = sorted_V.softmax(-1).cumsum(-1)
        remove_V = cumulative_V <= (1 - params.top_p)
        remove_V[-1] = False  # always keep the most likely token
        scores_V = scores_V.masked_fill(remove_V.scatter(0, order_V, remove_V), -float("inf"))
    return scores_V


def choose_tokens(logits_BV: torch.Tensor, choosers: list[TokenChooser]) -> tuple[list[int], list[float]]:
    """Next token of every row and its log-probability under the model's raw distribution."""
    logits_BV = logits_BV.float()
    logprobs_BV = torch.log_softmax(logits_BV, dim=-1)
    scores_BV = logits_BV
    penalised = [i for i, c in enumerate(choosers) if c.params.repetition_penalty not in (None, 1.0)]
    if penalised:
        scores_BV = scores_BV.clone()
        for i in penalised:
            penalty = choosers[i].params.repetition_penalty
            assert penalty is not None
            scores_BV[i] = apply_repetition_penalty(scores_BV[i], choosers[i].seen, penalty)
    tokens_B = scores_BV.argmax(dim=-1)
    forced = {i: token for i, c in enumerate(choosers) if (token := c.forced_token()) is not None}
    sampled = [i for i, c in enumerate(choosers) if c.generator is not None and i not in forced]
    if sampled or forced:
        tokens_B = tokens_B.clone()
        for i in sampled:
            chooser = choosers[i]
            probs_V = warp(scores_BV[i], chooser.params).softmax(-1).cpu()
            tokens_B[i] = torch.multinomial(probs_V, 1, generator=chooser.generator).item()
        for i, token in forced.items():
            tokens_B[i] = token
    chosen_B1 = tokens_B.unsqueeze(-1)
    tokens = tokens_B.tolist()
    logprobs = logprobs_BV.gather(-1, chosen_B1).squeeze(-1).tolist()
    for chooser, token in zip(choosers, tokens, strict=True):
        chooser.seen.add(token)
        chooser.num_chosen += 1
    return tokens, logprobs
