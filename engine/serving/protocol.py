"""The one seam between a server and the engine: requests in, token events out, health and stats.

A server imports this module (the protocol and its dataclasses) and nothing else of the engine's
runtime, so a fake engine implementing `EngineClient` is enough to test every route (vLLM's
`engine/protocol.py` plays the same role).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from engine.errors import Cpm2Error
from engine.generation.params import FinishReason, SamplingParams
from engine.prompts import SoftPrompt


class EngineOverloadedError(Cpm2Error):
    """The engine's queue is full; the caller should retry later (HTTP 429)."""

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineUnavailableError(Cpm2Error):
    """The engine is starting, draining or stopped (HTTP 503)."""

    def __init__(self, message: str, *, retry_after: float = 5.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class GenerationFailedError(Cpm2Error):
    """Generation of this request failed inside the engine (HTTP 500 / an SSE error event)."""


class RequestTimeoutError(Cpm2Error):
    """The request's deadline passed before it finished (HTTP 504)."""


@dataclass(frozen=True)
class EngineRequest:
    """A validated generation request: token ids, how to decode, and its soft prompt."""

    request_id: str
    input_ids: tuple[int, ...]
    params: SamplingParams
    pair_ids: tuple[int, ...] = ()
    prompt: SoftPrompt | None = None
    prompt_id: str | None = None
    deadline: float | None = None
    """`time.monotonic()` after which the request is abandoned (RequestTimeoutError)."""


@dataclass(frozen=True)
class TokenEvent:
    """One generated token; the last event of a request also carries the whole result."""

    request_id: str
    index: int
    """1-based position of the token in the output."""
    token_id: int
    text: str
    """Text this token added (empty for special tokens and for text cut by a stop sequence)."""
    logprob: float
    special: bool
    finish_reason: FinishReason | None = None
    generated_text: str | None = None
    """Set on the last event: the whole output text."""
    alternatives: tuple[str, ...] = ()
    """Set on the last event of a beam search with `num_return_sequences` > 1: the texts of the next
    best beams, best first."""
    seed: int | None = None
    num_input_tokens: int = 0
    num_virtual_tokens: int = 0
    experts: dict[str, float] = field(default_factory=dict)
    queue_seconds: float = 0.0
    """Time from arrival to admission (set on every event)."""

    @property
    def is_last(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class EngineInfo:
    model_id: str
    model_family: str
    dtype: str
    device: str
    d_model: int
    vocab_size: int
    max_batch_size: int
    max_queue: int
    experts_offloaded: bool
    expert_memory_bytes: int
    extra: dict[str, Any] = field(default_factory=dict)
    cpu_kernels: dict[str, str] = field(default_factory=dict)
    """On CPUs: the kernel mode, torch's CPU capability, the dense and expert matmul paths and why a
    faster one is not taken (`engine.model.kernels`); empty on GPUs."""
    languages: tuple[str, ...] = ()
    """Language codes of a translation model's tokenizer (NLLB-200: `eng_Latn` ...); empty for a
    model without them."""
    max_token_chars: int = 0
    """The most characters of text one token stands for (the longest vocabulary entry), so that
    `n` tokens never cover more than `n * max_token_chars` characters: a server bounds an input by
    characters before tokenising it. 0: unknown (no such bound)."""


@dataclass(frozen=True)
class EngineHealth:
    status: Literal["starting", "ok", "stalled", "draining", "stopped", "failed"]
    detail: str = ""
    last_step_age_seconds: float | None = None

    @property
    def is_live(self) -> bool:
        """Liveness: the engine thread runs and is not stuck."""
        return self.status in ("starting", "ok", "draining")

    @property
    def is_ready(self) -> bool:
        """Readiness: accepting new requests."""
        return self.status == "ok"


@dataclass
class StepRecord:
    """What one engine step did (for metrics)."""

    phase: Literal["encode", "decode"]
    batch_size: int
    num_tokens: int
    distinct_prompts: int
    seconds: float


@dataclass
class EngineStats:
    """Counters and gauges of the engine, read by the server's metrics."""

    running: int = 0
    waiting: int = 0
    steps_total: int = 0
    last_step_unix: float = 0.0
    requests_finished: int = 0
    requests_failed: int = 0
    requests_cancelled: int = 0
    requests_timed_out: int = 0
    generated_tokens_total: int = 0
    prompt_tokens_total: int = 0
    virtual_tokens_total: int = 0
    experts: dict[str, float] = field(default_factory=dict)
    """Cumulative expert-offloading counters (empty when experts are resident)."""
    expert_layers: dict[str, dict[str, float]] = field(default_factory=dict)
    """The same lookups and prediction scores per MoE layer ("decoder.3": hits, misses, predicted, ...)."""


StepListener = Callable[[StepRecord], None]


class EngineClient(Protocol):
    """What the server may ask of the engine."""

    def info(self) -> EngineInfo: ...

    def health(self) -> EngineHealth: ...

    def stats(self) -> EngineStats: ...

    def add_step_listener(self, listener: StepListener) -> None:
        """Call `listener` after every engine step (on the engine's thread: it must be quick)."""
        ...

    def tokenize(self, text: str, *, add_eos: bool = True, src_lang: str | None = None) -> list[int]:
        """Token ids of `text`; with `src_lang`, the encoder input of a translation model: the source
        language's code included, as its tokenizer places it (`add_eos` is then ignored: the
        tokenizer adds `</s>`). Raises InputError for an unknown code or a model without codes."""
        ...

    def lang_id(self, code: str) -> int:
        """Token id of language `code`: forced as the first generated token for a target language
        (`SamplingParams.forced_tokens`). Raises InputError for an unknown code (the message suggests
        close ones) or a model without language codes."""
        ...

    def token_text(self, token_id: int) -> str: ...

    def generate(self, request: EngineRequest) -> AsyncIterator[TokenEvent]:
        """Events of `request` as they are produced; raises the errors above. Closing the iterator
        (client gone) cancels the request at the next step boundary."""
        ...

    async def start(self) -> None: ...

    async def drain(self, timeout: float) -> None:
        """Stop admitting, let running requests finish (up to `timeout` seconds), then stop."""
        ...
