"""What a caller asks generation for: one `SamplingParams`, validated, and the request/result types."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from engine.errors import InputError
from engine.prompts import SoftPrompt, encoder_length

FinishReason = Literal["length", "eos_token", "stop_sequence"]


#: Smallest positive temperature / repetition penalty accepted.
MIN_LOGIT_DIVISOR = 1e-4


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to choose tokens for one request (TGI / HF `generate` semantics where they overlap)."""

    max_new_tokens: int = 20
    """Generate at most this many tokens (the end-of-sequence token included)."""
    do_sample: bool = False
    """Sample instead of choosing the most likely token. Setting `temperature` (other than 0 or 1),
    `top_k` or `top_p` also turns sampling on, as in TGI."""
    temperature: float | None = None
    """Divide logits by this before sampling; 0 means greedy."""
    top_k: int | None = None
    """Sample only among the k most likely tokens."""
    top_p: float | None = None
    """Sample only among the most likely tokens whose probabilities add up to `top_p` (nucleus)."""
    repetition_penalty: float | None = None
    """Divide positive (multiply negative) logits of tokens already in the output by this (CTRL, HF)."""
    seed: int | None = None
    """Seed of this request's own random stream; the same seed gives the same tokens whatever else
    is in the batch. Drawn at random (and reported) when unset."""
    stop: tuple[str, ...] = ()
    """Stop once the generated text contains one of these strings (it is kept in the output)."""
    num_beams: int = 1
    """Beam search with this many beams (greedy when 1); returns the best finished beam."""
    num_return_sequences: int = 1
    """Beam search: also return the next best beams, up to this many in all (HF's name; at most
    `num_beams`), as the result's `alternatives`."""
    length_penalty: float = 1.0
    """Beam search: a finished beam's score is its log-probability / length ** length_penalty."""
    early_stopping: bool = False
    """Beam search: stop as soon as `num_beams` beams have finished (HF `early_stopping=True`)."""
    ignore_eos: bool = False
    """Keep generating after the end-of-sequence token (benchmarks use this for fixed lengths)."""
    forced_tokens: tuple[int, ...] = ()
    """The first generated tokens, fixed in advance (HF `forced_bos_token_id`: the target language of
    NLLB / M2M-100). They count toward `max_new_tokens`, carry the model's own log-probabilities and
    add nothing to a beam's score (HF sets every other token to -inf)."""

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.temperature is not None and not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise InputError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        for name, scale in (("temperature", self.temperature), ("repetition_penalty", self.repetition_penalty)):
            # Logits are divided by these in float32: below this the quotient overflows to inf and
            # sampling would fail mid-generation instead of refusing the request here.
            if scale is not None and 0 < scale < MIN_LOGIT_DIVISOR:
                raise InputError(
                    f"{name} must be at least {MIN_LOGIT_DIVISOR} (temperature 0 is greedy), got {scale!r}"
                )
        if self.top_k is not None and self.top_k < 1:
            raise InputError(f"top_k must be at least 1, got {self.top_k!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.repetition_penalty is not None and not (
            math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0
        ):
            raise InputError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r}")
        if self.num_beams < 1:
            raise InputError(f"num_beams must be at least 1, got {self.num_beams!r}")
        if not 1 <= self.num_return_sequences <= self.num_beams:
            raise InputError(
                f"num_return_sequences must be between 1 and num_beams ({self.num_beams}), got "
                f"{self.num_return_sequences!r}: raise num_beams to return more beams"
            )
        if self.num_beams > 1 and self.is_sampling:
            raise InputError(
                "beam search (num_beams > 1) cannot be combined with sampling; drop do_sample, "
                "temperature, top_k and top_p, or set num_beams to 1"
            )
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            raise InputError("stop sequences must be non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.forced_tokens):
            raise InputError(f"forced tokens must be token ids (integers >= 0), got {self.forced_tokens!r}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InputError(f"seed must be in [0, 2**63), got {self.seed!r}")

    @property
    def is_sampling(self) -> bool:
        """Whether tokens are drawn at random (otherwise the most likely token is taken)."""
        if self.temperature == 0:
            return False
        has_warper = (
            (self.temperature is not None and self.temperature != 1.0)
            or self.top_k is not None
            or (self.top_p is not None and self.top_p < 1.0)
        )
        return self.do_sample or has_warper


@dataclass(frozen=True)
class GenerationRequest:
    """One generation: encoder input token ids (usually ending in EOS) and how to decode.

    With a soft prompt, the encoder input is prefix | input_ids | infix | pair_ids | suffix
    (`engine.prompts`); `pair_ids` is the second segment of two-part tasks.
    """

    input_ids: tuple[int, ...]
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""
    pair_ids: tuple[int, ...] = ()
    prompt: SoftPrompt | None = None

    def __post_init__(self) -> None:
        virtual = self.prompt.encoder_tokens if self.prompt is not None else 0
        if len(self.input_ids) + len(self.pair_ids) + virtual == 0:
            raise InputError("the input is empty; give at least one token")

    @property
    def encoder_length(self) -> int:
        """Encoder positions, virtual tokens included."""
        return encoder_length(len(self.input_ids), len(self.pair_ids), self.prompt)


@dataclass(frozen=True)
class Alternative:
    """A beam ranked after the best one (`SamplingParams.num_return_sequences`)."""

    token_ids: tuple[int, ...]
    text: str
    """Detokenized (set when a tokenizer is attached)."""
    score: float
    """Its beam score: the sum of its log-probabilities / length ** length_penalty."""


@dataclass
class GenerationResult:
    """What generation produced for one request."""

    token_ids: list[int]
    """Generated ids, without the decoder start token; the end-of-sequence token included if produced."""
    logprobs: list[float]
    """Log-probability of each generated token under the model's (unprocessed) distribution."""
    finish_reason: FinishReason
    seed: int | None
    """The seed the request sampled with (None for greedy and beam search)."""
    text: str = ""
    """Detokenized output (set when a tokenizer is attached), cut after a matched stop sequence."""
    num_input_tokens: int = 0
    alternatives: list[Alternative] = field(default_factory=list)
    """Beam search with `num_return_sequences` > 1: the next best beams after this one, best first."""
    experts: dict[str, float] = field(default_factory=dict)
    """This request's share of offloaded-expert traffic (`bytes_moved`, `hits`, `misses`,
    `transfers`, `stall_seconds`): each step's counters split evenly over the rows it ran.
    Empty when the experts are resident."""
