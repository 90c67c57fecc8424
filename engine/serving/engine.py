"""`AsyncEngine`: the engine behind the server, an `EngineClient` over the engine thread.

Built from a model directory: loads the model (experts offloaded when they exceed the budget), the
tokenizer, starts the engine thread, warms up with a one-token generation, and then answers
`generate` with an async stream of token events. Leaving the stream early (a client that went
away) cancels the request at the next step boundary.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.errors import ConfigError, InputError
from engine.experts.provider import OffloadedExpertProvider
from engine.generation import Generator, SamplingParams
from engine.languages import Languages, encode_source, translation_tokenizer
from engine.model.kernels import KernelMode, active_kernels, cpu_capability
from engine.offload import InferenceModel, OffloadConfig, load_for_inference
from engine.serving.loop import EngineLoop
from engine.serving.protocol import (
    EngineHealth,
    EngineInfo,
    EngineRequest,
    EngineStats,
    EngineUnavailableError,
    StepListener,
    TokenEvent,
)
from engine.serving.threads import in_fresh_thread
from engine.tokenizer import (
    Tokenizer,
    TranslationTokenizer,
    check_special_ids,
    load_tokenizer,
    longest_token_chars,
)
from engine.weights.quantize import quantized_dense, quantized_experts


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """How the engine is built and how much it takes on."""

    model: Path
    """Native cpm2 or HF T5 / mT5 / Switch directory."""
    dtype: str | None = None
    device: str = "cpu"
    cpu_kernels: KernelMode = "auto"
    """CPU matmul paths: `auto` (the fastest this CPU supports per dtype) or `plain` (`F.linear`)."""
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    max_batch_size: int = 32
    """Rows decoded together at most."""
    max_queue: int = 128
    """Requests waiting at most before new ones are refused (429)."""
    waiting_served_ratio: float = 0.0
    """While a batch runs, encode new requests once they are this many × the running rows
    (0: at every step; see `engine.serving.scheduler`)."""
    max_waiting_steps: int = 20
    """...or once they have waited this many decode steps."""
    max_prefill_tokens: int = 0
    """Encoder tokens encoded in one pass between decode steps at most (at least one request; 0: no
    limit): bounds how long a burst of arrivals pauses the running rows, at some throughput."""
    encoder_step_share: float = 0.0
    """While rows decode, newcomers' encoder pass runs between two decode steps for at most this
    share of a decode step's time, block by block (at least one block; 0: the whole pass at once):
    bounds how much an admission lengthens the running rows' gaps between tokens."""
    stall_seconds: float = 60.0
    """With requests running and no step for this long, the engine is reported stalled."""
    warmup: bool = True


def _expert_stats(provider: OffloadedExpertProvider) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """The provider's counters, the pool's high-water mark in bytes (slots x one expert, plus any
    staging buffers), and the expert bytes in RAM now (pool + mapped store pages in the page cache),
    the figures to hold against the `--expert-memory` budget; and the per-layer counters."""
    snapshot = provider.stats.snapshot()
    stats = snapshot.to_dict()
    staging = getattr(provider.transfers, "staging_bytes", 0)
    stats["pool_used_bytes_peak"] = provider.pool.peak_used * provider.bytes_per_expert + staging
    stats.update(provider.memory())
    return stats, snapshot.layers_to_dict()


def kernel_info(loaded: InferenceModel) -> dict[str, str]:
    """The CPU kernels `loaded` runs on, as `EngineInfo.cpu_kernels` reports them (empty off the CPU).

    Probes torch's int4 kernel the first time in a process (a small matmul): call it off the event
    loop's thread.
    """
    kernels = loaded.kernels
    if kernels is None:
        return {}
    table = active_kernels()
    return {
        "mode": table.mode,
        "cpu_capability": cpu_capability(),
        **kernels.to_dict(),
        "int4_packing": table.int4_packing or "",
    }


class AsyncEngine:
    """`EngineClient` implementation backed by one model and one engine thread."""

    def __init__(
        self, config: EngineConfig, loaded: InferenceModel, tokenizer: Tokenizer, *, kernels: dict[str, str]
    ) -> None:
        """`kernels`: the CPU kernels `loaded` runs on (`kernel_info`), probed off this thread."""
        self.config = config
        self.loaded = loaded
        self.tokenizer = tokenizer
        self._kernels = kernels
        provider = loaded.provider
        self.generator = Generator(
            loaded.model, tokenizer, expert_stats=provider.stats.totals if provider is not None else None
        )
        specials = frozenset(i for i in range(tokenizer.vocab_size) if tokenizer.is_special(i))
        self._max_token_chars = longest_token_chars(tokenizer)
        self.loop = EngineLoop(
            self.generator,
            max_running=config.max_batch_size,
            max_waiting=config.max_queue,
            waiting_served_ratio=config.waiting_served_ratio,
            max_waiting_steps=config.max_waiting_steps,
            max_prefill_tokens=config.max_prefill_tokens,
            encoder_step_share=config.encoder_step_share,
            special_ids=specials,
            expert_stats=(lambda: _expert_stats(provider)) if provider is not None else None,
        )
        self._status = "starting"

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncEngine:
        # Loaded, and the kernels `info` reports probed, in a thread of its own, so that its OpenMP
        # team does not outlive it (see engine.serving.threads): the engine thread's must be the only
        # one. The int4 probe runs a matmul, which `info` on the event loop's thread used to run.
        def load() -> tuple[InferenceModel, dict[str, str]]:
            loaded = load_for_inference(
                config.model,
                dtype=config.dtype,
                device=config.device,
                offload=config.offload,
                progress=False,
                cpu_kernels=config.cpu_kernels,
            )
            try:
                return loaded, kernel_info(loaded)
            except BaseException:
                loaded.close()
                raise

        loaded, kernels = in_fresh_thread(load, name="cpm2-load")
        try:
            tokenizer = load_tokenizer(config.model)
            model_config = loaded.model.config
            check_special_ids(
                tokenizer,
                eos=model_config.eos_token_id,
                decoder_start=model_config.decoder_start_token_id,
                source=config.model,
            )
        except BaseException:
            loaded.close()  # the offload threads and files; the server exits with the error
            raise
        return cls(config, loaded, tokenizer, kernels=kernels)

    # ---- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        self.loop.start()
        if self.config.warmup:
            await self._warm_up()
        self._status = "ok"

    async def _warm_up(self) -> None:
        """One tiny generation through the whole path, so the first request pays no first-call costs."""
        request = EngineRequest(
            request_id="warmup",
            input_ids=tuple(self.tokenizer.encode("warm up")),
            params=SamplingParams(max_new_tokens=2),
        )
        async for _ in self._stream(request):
            pass

    async def drain(self, timeout: float) -> None:
        self._status = "draining"
        self.loop.stop_accepting()
        deadline = time.monotonic() + timeout
        while self.loop.num_active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.loop.stop()
        await asyncio.to_thread(self.loop.join, 10.0)
        self._status = "stopped"
        self.loaded.close()

    # ---- queries -----------------------------------------------------------------------------

    def add_step_listener(self, listener: StepListener) -> None:
        self.loop.step_listeners.append(listener)

    def info(self) -> EngineInfo:
        config = self.loaded.model.config
        weight = self.loaded.model.embed.weight
        return EngineInfo(
            model_id=str(self.config.model),
            model_family=config.family,
            dtype=str(weight.dtype).removeprefix("torch."),
            device=str(weight.device),
            d_model=config.d_model,
            vocab_size=config.vocab_size,
            max_batch_size=self.config.max_batch_size,
            max_queue=self.config.max_queue,
            experts_offloaded=self.loaded.is_offloaded,
            expert_memory_bytes=self.loaded.budget_bytes,
            extra={
                "total_expert_bytes": self.loaded.total_expert_bytes,
                # What `cpm2 quantize` did to this model (`{"experts": "int8", "dense": "int8", ...}`).
                "quantization": {
                    part: fmt
                    for part, fmt in (("experts", quantized_experts(config)), ("dense", quantized_dense(config)))
                    if fmt is not None
                },
            },
            cpu_kernels=dict(self._kernels),
            languages=self.tokenizer.language_codes if isinstance(self.tokenizer, TranslationTokenizer) else (),
            max_token_chars=self._max_token_chars,
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.loaded.model.embed.weight.dtype

    def health(self) -> EngineHealth:
        age = time.monotonic() - self.loop.alive_at
        if self.loop.failure is not None:
            return EngineHealth("failed", f"the engine thread failed: {self.loop.failure}", age)
        if self._status != "starting" and not self.loop.is_alive():
            return EngineHealth("stopped", "the engine thread is not running", age)
        if age > self.config.stall_seconds:
            return EngineHealth("stalled", f"no engine step for {age:.0f} s", age)
        return EngineHealth(self._status, "", age)  # type: ignore[arg-type]

    def stats(self) -> EngineStats:
        return self.loop.snapshot()

    def tokenize(self, text: str, *, add_eos: bool = True, src_lang: str | None = None) -> list[int]:
        if src_lang is None:
            return self.tokenizer.encode(text, add_eos=add_eos)
        return encode_source(self._translator(), text, Languages(src_lang=src_lang))

    def lang_id(self, code: str) -> int:
        return self._translator().lang_id(code)

    def _translator(self) -> TranslationTokenizer:
        """The tokenizer with its language codes; a model without them is the request's fault here
        (it asked for a language), so the CLI's ConfigError becomes an InputError (422)."""
        try:
            return translation_tokenizer(self.tokenizer, model=self.config.model.name)
        except ConfigError as exc:
            raise InputError(str(exc)) from None

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.id_to_piece(token_id)

    # ---- generation ------------------------------------------------------------------------------

    def generate(self, request: EngineRequest) -> AsyncIterator[TokenEvent]:
        if self._status != "ok":
            raise EngineUnavailableError(f"the engine is {self._status}; retry shortly")
        return self._stream(request)

    def _stream(self, request: EngineRequest) -> AsyncIterator[TokenEvent]:
        """Submit `request` now and return its events.

        Submitting here rather than on the first iteration makes a full queue or a draining engine
        raise from `generate` itself, as the protocol promises, so a streamed request is refused with
        429 / 503 before its 200 and SSE headers are sent (not as an error event inside a 200).
        """
        events: asyncio.Queue[TokenEvent | Exception] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def sink(item: TokenEvent | Exception) -> None:
            loop.call_soon_threadsafe(events.put_nowait, item)

        self.loop.submit(request, sink)
        stream = self._events(request, events)
        # An async generator dropped before its first iteration (a client gone before the response
        # started) never runs its `finally`; cancel on collection too (a no-op once it finished).
        weakref.finalize(stream, self.loop.cancel, request.request_id)
        return stream

    async def _events(
        self, request: EngineRequest, events: asyncio.Queue[TokenEvent | Exception]
    ) -> AsyncIterator[TokenEvent]:
        finished = False
        try:
            while True:
                item = await events.get()
                if isinstance(item, Exception):
                    finished = True
                    raise item
                finished = item.is_last
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.loop.cancel(request.request_id)
