"""Beam search for one request, with HF transformers' scoring and stopping rules.

Each step keeps the 2·num_beams best continuations of all live beams (so that num_beams survive even
if every beam's best continuation is the end token); candidates that end a sequence and rank among
the first num_beams are scored `sum(logprobs) / length ** length_penalty` and kept in a pool of the
num_beams best finished hypotheses. The search stops when no live beam can beat the worst of a full
pool (HF's heuristic for `early_stopping=False`), when the pool is full (`early_stopping=True`), or at
`max_new_tokens`. The decoder cache follows the beams by row selection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.generation.inputs import encode_requests, feed_decoder_prefixes
from engine.generation.params import Alternative, GenerationRequest, GenerationResult
from engine.model import Seq2SeqLM
from engine.tokenizer import Tokenizer


@dataclass(frozen=True)
class _Hypothesis:
    tokens: tuple[int, ...]
    logprobs: tuple[float, ...]
    score: float  # sum of (processed) log-probabilities


def _repetition_penalty(logp_RV: torch.Tensor, beams: list[_Hypothesis], start: int, penalty: float) -> torch.Tensor:
    logp_RV = logp_RV.clone()
    for r, beam in enumerate(beams):
        index = torch.tensor(sorted({start, *beam.tokens}), device=logp_RV.device)
        picked = logp_RV[r].index_select(0, index)
        logp_RV[r] = logp_RV[r].index_copy(0, index, torch.where(picked < 0, picked * penalty, picked / penalty))
    return logp_RV


@torch.inference_mode()
def beam_search(
    model: Seq2SeqLM,
    request: GenerationRequest,
    *,
    tokenizer: Tokenizer | None = None,
    num_choosable: int | None = None,
) -> GenerationResult:
    """Best finished beam for `request` (its `params.num_beams` > 1).

    Only ids below `num_choosable` (default: the whole vocabulary) can be chosen.
    """
    params = request.params
    config = model.config
    num_beams = params.num_beams
    device = model.embed.weight.device
    eos = None if params.ignore_eos else config.eos_token_id
    start = config.decoder_start_token_id

    enc_1SD, valid_1S = encode_requests(model, [request])
    prefix = request.prompt.decoder_prefix if request.prompt is not None else None
    state = model.start_decoding(
        enc_1SD, valid_1S, capacity=params.max_new_tokens + (0 if prefix is None else prefix.shape[0])
    )
    if prefix is not None:
        feed_decoder_prefixes(model, state, [prefix])

    def hits_stop(tokens: tuple[int, ...]) -> bool:
        if eos is not None and tokens[-1] == eos:
            return True
        if params.stop and tokenizer is not None:
            text = tokenizer.decode(list(tokens))
            return any(stop in text for stop in params.stop)
        return False

    beams = [_Hypothesis((), (), 0.0)]
    finished: list[tuple[float, _Hypothesis]] = []  # (normalised score, hypothesis), best first
    can_improve = True
    for step in range(params.max_new_tokens):
        last = [b.tokens[-1] if b.tokens else start for b in beams]
        tokens_R1 = torch.tensor(last, dtype=torch.long, device=device).unsqueeze(1)
        logits_RV = model.logits(model.decode(model.embed(tokens_R1), state))[:, -1, :num_choosable].float()
        raw_RV = torch.log_softmax(logits_RV, dim=-1)
        logp_RV = raw_RV
        if params.repetition_penalty not in (None, 1.0):
            assert params.repetition_penalty is not None
            logp_RV = _repetition_penalty(raw_RV, beams, start, params.repetition_penalty)
        if step < len(params.forced_tokens):
            # HF's ForcedBOSTokenLogitsProcessor: every other token -inf, the forced one 0.
            logp_RV = torch.full_like(raw_RV, -float("inf"))
            logp_RV[:, params.forced_tokens[step]] = 0.0
        vocab = logp_RV.shape[-1]
        totals = (logp_RV + torch.tensor([b.score for b in beams], device=device).unsqueeze(1)).view(-1)
        top_scores, top_index = torch.topk(totals, k=min(2 * num_beams, totals.numel()))
        is_last_step = step + 1 >= params.max_new_tokens
        pool_full = len(finished) == num_beams

        next_beams: list[_Hypothesis] = []
        parents: list[int] = []
        for rank, (score, flat) in enumerate(zip(top_scores.tolist(), top_index.tolist(), strict=True)):
            parent, token = divmod(flat, vocab)
            beam = beams[parent]
            candidate = _Hypothesis((*beam.tokens, token), (*beam.logprobs, raw_RV[parent, token].item()), score)
            if is_last_step or hits_stop(candidate.tokens):
                accept = rank < num_beams and can_improve and not (pool_full and params.early_stopping)
                if accept:
                    normalised = score / (len(candidate.tokens) ** params.length_penalty)
                    finished.append((normalised, candidate))
            elif len(next_beams) < num_beams:
                next_beams.append(candidate)
                parents.append(parent)
        finished.sort(key=lambda item: item[0], reverse=True)
        del finished[num_beams:]

        if is_last_step or not next_beams:
            break
        if len(finished) == num_beams:
            if params.early_stopping:
                break
            # HF's early-stop heuristic: the best live beam, normalised at the current length,
            # can no longer beat the worst finished hypothesis.
            best_live = next_beams[0].score / ((step + 1) ** params.length_penalty)
            can_improve = can_improve and best_live > finished[-1][0]
            if not can_improve:
                break
        if parents != list(range(len(beams))):
            state = state.select(parents)
        beams = next_beams

    # The finished beams best first, as HF's `num_return_sequences` returns them; then the live ones
    # (all of one length, so already in order), for a search that ended with too few finished.
    ranked = [*finished, *((b.score / (len(b.tokens) ** params.length_penalty), b) for b in beams if b.tokens)]
    best = ranked[0][1] if ranked else beams[0]
    reason = "length"
    if eos is not None and best.tokens and best.tokens[-1] == eos:
        reason = "eos_token"
    elif len(best.tokens) < params.max_new_tokens or (params.stop and hits_stop(best.tokens)):
        reason = "stop_sequence"
    decode = (lambda tokens: tokenizer.decode(list(tokens))) if tokenizer is not None else (lambda _: "")
    text = decode(best.tokens)
    alternatives = [
        Alternative(h.tokens, decode(h.tokens), score) for score, h in ranked[1 : params.num_return_sequences]
    ]
    return GenerationResult(
        token_ids=list(best.tokens),
        logprobs=list(best.logprobs),
        finish_reason=reason,  # type: ignore[arg-type]
        seed=None,
        text=text,
        num_input_tokens=len(request.input_ids),
        alternatives=alternatives,
    )
