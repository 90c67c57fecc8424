"""From an HTTP request to engine requests and back: validation, limits, soft prompts, timing.

Routes stay thin: they parse a body, call `GenerationService`, and shape the answer. Everything a
request is checked against (lengths including virtual tokens, stop sequences, the prompt's
existence) happens here, before the engine sees it, so an over-long or malformed request is
refused at admission with 422 instead of failing inside the engine.

Nothing here runs on the event loop that costs more than a few microseconds: tokenising and reading
a prompt run in `ServerContext`'s bounded worker pool (`off_loop`), and an input is bounded by
characters (`max_input_chars`) before it is tokenised, so an oversize text costs nothing per token.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from engine.errors import InputError
from engine.generation.params import SamplingParams
from engine.serving.protocol import EngineClient, EngineRequest, TokenEvent
from server.errors import TooManyRequestsError
from server.metrics import Metrics
from server.prompt_store import PromptStore, check_id
from server.settings import Settings


@dataclass
class GenerationInput:
    """The parts of a generation request that do not depend on the API flavour."""

    inputs: str
    text_pair: str | None = None
    prompt_id: str | None = None
    max_new_tokens: int | None = None
    do_sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    num_beams: int | None = None
    num_return_sequences: int = 1
    """Beam search: the best beam and the next ones, this many in all (`TokenEvent.alternatives`)."""
    timeout_ms: int | None = None
    truncate: int | None = None
    ignore_eos: bool = False
    src_lang: str | None = None
    """Translation models: language code of `inputs` (its code token goes in the encoder input)."""
    tgt_lang: str | None = None
    """Translation models: language code to generate (forced as the first generated token)."""


@contextmanager
def _naming(field_name: str) -> Iterator[None]:
    """The engine's InputError (an unknown language code, a model without codes) names the request
    field it came from."""
    try:
        yield
    except InputError as exc:
        raise InputError(f"{field_name}: {exc}") from None


@dataclass
class Timing:
    """When a request arrived, was validated, got its first token and finished (monotonic seconds)."""

    arrival: float
    validated: float = 0.0
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None
    queue_seconds: float = 0.0

    def headers(self, *, prompt_tokens: int, virtual_tokens: int, generated: int, request_id: str) -> dict[str, str]:
        end = self.finished or time.monotonic()
        # The engine measures queueing on its own thread; clamp so rounding never reports < 0.
        inference = max(0.0, end - self.validated - self.queue_seconds)
        per_token = inference / generated if generated else 0.0
        ms = lambda seconds: str(round(seconds * 1000))  # noqa: E731
        return {
            "x-request-id": request_id,
            "x-prompt-tokens": str(prompt_tokens),
            "x-virtual-tokens": str(virtual_tokens),
            "x-generated-tokens": str(generated),
            "x-validation-time": ms(self.validated - self.arrival),
            "x-queue-time": ms(self.queue_seconds),
            "x-inference-time": ms(inference),
            "x-time-per-token": ms(per_token),
            "x-total-time": ms(end - self.arrival),
        }


@dataclass
class Outcome:
    """All events of a finished (non-streamed) generation."""

    request: EngineRequest
    events: list[TokenEvent]
    timing: Timing

    @property
    def last(self) -> TokenEvent:
        return self.events[-1]


T = TypeVar("T")


class OffLoop(Protocol):
    """Runs a blocking call in the server's worker pool and awaits it (`ServerContext.off_loop`)."""

    def __call__(self, call: Callable[[], T], /) -> Awaitable[T]: ...


class GenerationService:
    """Turns validated inputs into engine requests; records request metrics."""

    def __init__(
        self, engine: EngineClient, store: PromptStore, settings: Settings, metrics: Metrics, off_loop: OffLoop
    ) -> None:
        self.engine = engine
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self.off_loop = off_loop
        self.in_flight = 0
        """Requests admitted and not finished: validating in the worker pool, or generating."""
        self.token_chars = engine.info().max_token_chars
        self.max_input_chars = settings.max_input_tokens * self.token_chars if self.token_chars else None
        """No input of more characters can fit `max_input_tokens` (None: the tokenizer did not say)."""

    def check_chars(self, spec: GenerationInput) -> None:
        """Refuse a text that cannot fit `max_input_tokens` before tokenising it. With `truncate`,
        `inputs` is cut to its last tokens, so only `text_pair` is bounded here (and `inputs` by the
        body limit)."""
        if self.max_input_chars is None:
            return
        chars = len(spec.text_pair or "") + (0 if spec.truncate is not None else len(spec.inputs))
        if chars > self.max_input_chars:
            raise InputError(
                f"the input is {chars} characters; at most {self.max_input_chars} fit max_input_tokens "
                f"({self.settings.max_input_tokens} tokens of at most {self.token_chars} characters each): "
                "shorten it or set parameters.truncate"
            )

    def build(self, spec: GenerationInput) -> EngineRequest:
        """Validate `spec` against the server's limits and make the engine request (raises InputError).

        Blocking (tokenises, may read a prompt from disk): call it through `off_loop`."""
        s = self.settings
        self.check_chars(spec)
        prompt = self.store.load(check_id(spec.prompt_id)) if spec.prompt_id else None
        ids_a, ids_b = self._tokenize(spec)
        if spec.truncate is not None and len(ids_a) > spec.truncate:
            if spec.src_lang is not None:
                raise InputError(
                    f"src_lang: the input is {len(ids_a)} tokens and truncating it to {spec.truncate} would "
                    "cut its language code; shorten the text or raise parameters.truncate"
                )
            ids_a = ids_a[-spec.truncate :]
        virtual = prompt.encoder_tokens if prompt is not None else 0
        length = len(ids_a) + len(ids_b) + virtual
        if length > s.max_input_tokens:
            raise InputError(
                f"the input is {length} tokens ({len(ids_a) + len(ids_b)} of text, {virtual} virtual from "
                f"the prompt); the limit is {s.max_input_tokens}: shorten it or set parameters.truncate"
            )
        room = s.max_total_tokens - length
        if spec.max_new_tokens is not None and spec.max_new_tokens > room:
            raise InputError(
                f"input ({length}) + max_new_tokens ({spec.max_new_tokens}) exceeds max_total_tokens "
                f"({s.max_total_tokens}); ask for at most {room} new tokens"
            )
        forced: tuple[int, ...] = ()
        if spec.tgt_lang is not None:
            # The target language's code is the first generated token (HF's forced_bos_token_id).
            with _naming("tgt_lang"):
                forced = (self.engine.lang_id(spec.tgt_lang),)
        if room < 1:
            raise InputError(f"the input leaves no room to generate within max_total_tokens ({s.max_total_tokens})")
        if len(spec.stop) > s.max_stop_sequences:
            raise InputError(f"{len(spec.stop)} stop sequences given; the limit is {s.max_stop_sequences}")
        params = SamplingParams(
            max_new_tokens=spec.max_new_tokens or min(s.max_new_tokens, room),
            do_sample=spec.do_sample,
            temperature=spec.temperature,
            top_k=spec.top_k,
            top_p=spec.top_p,
            repetition_penalty=spec.repetition_penalty,
            seed=spec.seed,
            stop=tuple(spec.stop),
            num_beams=spec.num_beams or 1,
            num_return_sequences=spec.num_return_sequences,
            ignore_eos=spec.ignore_eos,
            forced_tokens=forced,
        )
        deadline = time.monotonic() + spec.timeout_ms / 1000 if spec.timeout_ms else None
        return EngineRequest(
            request_id=uuid.uuid4().hex,
            input_ids=tuple(ids_a),
            pair_ids=tuple(ids_b),
            params=params,
            prompt=prompt,
            prompt_id=spec.prompt_id,
            deadline=deadline,
        )

    def tokens(self, spec: GenerationInput) -> tuple[list[int], list[int]]:
        """Ids of `inputs` and `text_pair` within the input limits (`/tokenize`). Blocking."""
        self.check_chars(spec)
        ids_a, ids_b = self._tokenize(spec)
        if len(ids_a) + len(ids_b) > self.settings.max_input_tokens:
            raise InputError(
                f"the input is {len(ids_a) + len(ids_b)} tokens; the limit is {self.settings.max_input_tokens}: "
                "shorten it"
            )
        return ids_a, ids_b

    def _tokenize(self, spec: GenerationInput) -> tuple[list[int], list[int]]:
        """Ids of `inputs` and `text_pair`; with `src_lang`, `inputs` carries its language code."""
        if spec.src_lang is not None:
            if spec.text_pair is not None:
                raise InputError("src_lang: encodes `inputs` alone; leave text_pair out with src_lang")
            with _naming("src_lang"):
                return self.engine.tokenize(spec.inputs, src_lang=spec.src_lang), []
        if spec.text_pair is not None:
            return self.engine.tokenize(spec.inputs, add_eos=False), self.engine.tokenize(spec.text_pair)
        return self.engine.tokenize(spec.inputs), []

    async def stream(
        self, route: str, spec: GenerationInput, timing: Timing
    ) -> tuple[EngineRequest, AsyncIterator[TokenEvent]]:
        """Validate, then start generating; the iterator yields events and records metrics."""
        if self.in_flight >= self.settings.max_concurrent_requests:
            self.metrics.rejected(route, "concurrency")
            raise TooManyRequestsError(
                f"{self.settings.max_concurrent_requests} requests are in flight; retry shortly",
                retry_after=1.0,
            )
        # Counted while it validates too, so a flood of requests waiting for the worker pool is
        # bounded by the same limit as the ones generating.
        self.in_flight += 1
        try:
            request = await self.off_loop(lambda: self.build(spec))
            timing.validated = time.monotonic()
            events = self.engine.generate(request)
        finally:
            self.in_flight -= 1
        return request, self._observe(route, request, events, timing)

    async def _observe(
        self, route: str, request: EngineRequest, events: AsyncIterator[TokenEvent], timing: Timing
    ) -> AsyncIterator[TokenEvent]:
        # Counted from the first iteration: an iterator that is never started holds nothing.
        self.in_flight += 1
        try:
            async for event in events:
                now = time.monotonic()
                if timing.first_token is None:
                    timing.first_token = now
                    timing.queue_seconds = event.queue_seconds
                    self.metrics.first_token(route, now - timing.arrival, event.queue_seconds)
                elif timing.last_token is not None:
                    self.metrics.inter_token(now - timing.last_token)
                timing.last_token = now
                if event.is_last:
                    timing.finished = now
                    self.metrics.finished(route, request, event, now - timing.arrival)
                yield event
        finally:
            self.in_flight -= 1

    async def run(self, route: str, spec: GenerationInput, timing: Timing) -> Outcome:
        """Generate to the end and return every event."""
        request, events = await self.stream(route, spec, timing)
        collected = [event async for event in events]
        return Outcome(request, collected, timing)

    async def run_all(self, route: str, specs: list[GenerationInput], *, field: str) -> list[Outcome]:
        """Every spec of one HTTP request at once (so the engine batches them); one failing cancels
        the rest. `field` names the request's list in the error for too many of them."""
        limit = self.settings.max_concurrent_requests
        if len(specs) > limit:
            raise InputError(
                f"{field}: {len(specs)} texts in one request; the limit is {limit} (CPM2_MAX_CONCURRENT_REQUESTS)"
            )
        tasks = [asyncio.ensure_future(self.run(route, spec, Timing(arrival=time.monotonic()))) for spec in specs]
        try:
            return await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()  # no-op on finished tasks
            await asyncio.gather(*tasks, return_exceptions=True)
