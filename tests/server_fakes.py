"""A fake engine implementing `EngineClient`, enough to test every route without a model.

Tokens are characters (id = code point % 1000 + 3); generation spells out "abcdefgh..." up to
max_new_tokens. Inputs containing `fail`, `overload`, `slow` or `unavailable` trigger the
matching behaviour, so routes can be driven into every error path.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi.testclient import TestClient

from engine.errors import InputError
from engine.serving.protocol import (
    EngineHealth,
    EngineInfo,
    EngineOverloadedError,
    EngineRequest,
    EngineStats,
    EngineUnavailableError,
    GenerationFailedError,
    RequestTimeoutError,
    StepListener,
    StepRecord,
    TokenEvent,
)

D_MODEL = 16
EOS = 1

#: A loopback address for in-process test clients (Starlette's default peer, "testclient", is no
#: address, and so never a local peer).
LOCAL_PEER = ("127.0.0.1", 50000)


def local_client(app: Any) -> TestClient:
    """An in-process client connecting from loopback: with `allow_local_admin` its prompt writes
    need no token, as for `make serve` users on the same machine."""
    return TestClient(app, client=LOCAL_PEER)


LANG_BASE = 2000


class FakeEngine:
    def __init__(self, *, languages: tuple[str, ...] = ()) -> None:
        self.languages = languages
        """Language codes, as a translation model's tokenizer has them (code i is token id 2000 + i)."""
        self.requests: list[EngineRequest] = []
        self.cancelled: list[str] = []
        self.status = "starting"
        self.started = False
        self.drained = False
        self.step_listeners: list[StepListener] = []

    def info(self) -> EngineInfo:
        return EngineInfo(
            model_id="/models/fake-model",
            model_family="cpm2",
            dtype="float32",
            device="cpu",
            d_model=D_MODEL,
            vocab_size=1003,
            max_batch_size=4,
            max_queue=8,
            experts_offloaded=True,
            expert_memory_bytes=1234,
            languages=self.languages,
            max_token_chars=1,  # one token per character (`tokenize` below)
        )

    def health(self) -> EngineHealth:
        return EngineHealth(self.status, "", 0.01)  # type: ignore[arg-type]

    def stats(self) -> EngineStats:
        return EngineStats(
            running=0,
            waiting=0,
            steps_total=7,
            last_step_unix=time.time(),
            generated_tokens_total=sum(r.params.max_new_tokens for r in self.requests),
            experts={"bytes_moved": 4096.0, "hits": 3.0, "misses": 1.0},
        )

    def add_step_listener(self, listener: StepListener) -> None:
        self.step_listeners.append(listener)

    def tokenize(self, text: str, *, add_eos: bool = True, src_lang: str | None = None) -> list[int]:
        code = [self.lang_id(src_lang)] if src_lang is not None else []
        return code + [ord(c) % 1000 + 3 for c in text] + ([EOS] if add_eos or code else [])

    def lang_id(self, code: str) -> int:
        if not self.languages:
            raise InputError("fake-model has no language codes; leave the languages out for this model")
        if code not in self.languages:
            raise InputError(f"unknown language code {code!r}")
        return LANG_BASE + self.languages.index(code)

    def token_text(self, token_id: int) -> str:
        if token_id >= LANG_BASE:
            return self.languages[token_id - LANG_BASE]
        return "</s>" if token_id == EOS else chr(token_id - 3)

    async def start(self) -> None:
        self.started = True
        self.status = "ok"

    async def drain(self, timeout: float) -> None:
        self.drained = True
        self.status = "stopped"

    def generate(self, request: EngineRequest) -> AsyncIterator[TokenEvent]:
        text = self.token_text_of(request)
        if "overload" in text:
            raise EngineOverloadedError("fake queue full", retry_after=2.0)
        if "unavailable" in text:
            raise EngineUnavailableError("fake engine draining")
        self.requests.append(request)
        return self._events(request, text)

    def token_text_of(self, request: EngineRequest) -> str:
        return "".join(self.token_text(t) for t in (*request.input_ids, *request.pair_ids) if t != EOS)

    async def _events(self, request: EngineRequest, text: str) -> AsyncIterator[TokenEvent]:
        finished = False
        try:
            n = request.params.max_new_tokens
            produced = ""
            for i in range(1, n + 1):
                if "slow" in text:
                    await asyncio.sleep(0.05)
                if "fail" in text and i == 2:
                    raise GenerationFailedError("fake failure in the engine")
                if "deadline" in text:
                    raise RequestTimeoutError("the request's deadline passed")
                piece = chr(ord("a") + (i - 1) % 26)
                produced += piece
                last = i == n
                for listener in self.step_listeners:
                    listener(StepRecord("decode", 1, 1, 1 if request.prompt is None else 2, 0.001))
                finished = last
                yield TokenEvent(
                    request_id=request.request_id,
                    index=i,
                    token_id=ord(piece) + 3,
                    text=piece,
                    logprob=-0.5,
                    special=False,
                    finish_reason="length" if last else None,
                    generated_text=produced if last else None,
                    seed=request.params.seed,
                    num_input_tokens=len(request.input_ids) + len(request.pair_ids),
                    num_virtual_tokens=request.prompt.encoder_tokens if request.prompt else 0,
                    experts={"bytes_moved": 4096.0, "hits": 3.0, "misses": 1.0} if last else {},
                    queue_seconds=0.001,
                )
        finally:
            if not finished:
                self.cancelled.append(request.request_id)
