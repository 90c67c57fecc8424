"""TGI-compatible generation: `POST /generate`, `POST /generate_stream`, and TGI's `POST /`."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Callable

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from engine.serving.protocol import TokenEvent
from server.auth import check_api_key
from server.context import Ctx, ServerContext
from server.errors import mapping_for
from server.schemas import (
    ERROR_RESPONSES,
    Details,
    ExpertDetails,
    GenerateRequest,
    GenerateResponse,
    StreamDetails,
    StreamResponse,
    Token,
)
from server.service import GenerationInput, Outcome, Timing

router = APIRouter(responses=ERROR_RESPONSES)

#: Seconds between SSE keep-alive comments while a request waits for its next token.
KEEP_ALIVE_SECONDS = 15.0


def to_input(body: GenerateRequest) -> GenerationInput:
    """The engine-facing input: every `GenerationInput` field has the same name in TGI's parameters."""
    names = {f.name for f in dataclasses.fields(GenerationInput)} - {"inputs"}
    return GenerationInput(inputs=body.inputs, **body.parameters.model_dump(include=names))


def _token(event: TokenEvent) -> Token:
    return Token(id=event.token_id, text=event.text, logprob=event.logprob, special=event.special)


def _experts(event: TokenEvent) -> ExpertDetails:
    e = event.experts
    return ExpertDetails(bytes_moved=e.get("bytes_moved", 0), hits=e.get("hits", 0), misses=e.get("misses", 0))


def response_for(outcome: Outcome, *, details: bool) -> GenerateResponse:
    last = outcome.last
    assert last.finish_reason is not None
    return GenerateResponse(
        generated_text=last.generated_text or "",
        details=Details(
            finish_reason=last.finish_reason,
            generated_tokens=last.index,
            seed=last.seed,
            input_length=last.num_input_tokens,
            virtual_tokens=last.num_virtual_tokens,
            tokens=[_token(e) for e in outcome.events],
            experts=_experts(last),
        )
        if details
        else None,
    )


def _headers(outcome: Outcome) -> dict[str, str]:
    last = outcome.last
    return outcome.timing.headers(
        prompt_tokens=last.num_input_tokens,
        virtual_tokens=last.num_virtual_tokens,
        generated=last.index,
        request_id=outcome.request.request_id,
    )


async def generate_json(route: str, request: Request, body: GenerateRequest, ctx: ServerContext) -> JSONResponse:
    check_api_key(request, ctx.settings.api_key)
    timing = Timing(arrival=time.monotonic())
    outcome = await ctx.service.run(route, to_input(body), timing)
    response = response_for(outcome, details=body.parameters.details)
    return JSONResponse(response.body(), headers=_headers(outcome))


async def sse_events(
    events: AsyncIterator[TokenEvent], render: Callable[[TokenEvent], dict[str, object]]
) -> AsyncIterator[str]:
    """Server-sent events for `events`, with keep-alive comments while waiting and errors as events."""
    iterator = events.__aiter__()
    next_event: asyncio.Task[TokenEvent] | None = None
    try:
        while True:
            next_event = asyncio.ensure_future(iterator.__anext__())
            while True:
                done, _ = await asyncio.wait({next_event}, timeout=KEEP_ALIVE_SECONDS)
                if done:
                    break
                yield ": ping\n\n"
            try:
                event = next_event.result()
            except StopAsyncIteration:
                return
            next_event = None
            yield "data:" + json.dumps(render(event)) + "\n\n"
    except Exception as exc:  # after the 200 has been sent, errors travel as an event
        mapping = mapping_for(exc)
        yield "data:" + json.dumps({"error": str(exc), "error_type": mapping.error_type}) + "\n\n"
    finally:
        # A client that hangs up cancels this task's scope, and anyio re-raises that cancellation at
        # every await; shielded, the cleanup below runs to the end (the engine request is cancelled).
        with anyio.CancelScope(shield=True):
            if next_event is not None and not next_event.done():
                next_event.cancel()
                # cancel() only asks: until that task has unwound, the generator is still running,
                # and aclose() on a running async generator raises RuntimeError.
                await asyncio.wait({next_event})
            close = getattr(iterator, "aclose", None)
            if close is not None:
                await close()


def tgi_stream_event(event: TokenEvent) -> dict[str, object]:
    details = None
    if event.is_last:
        assert event.finish_reason is not None
        details = StreamDetails(
            finish_reason=event.finish_reason,
            generated_tokens=event.index,
            seed=event.seed,
            input_length=event.num_input_tokens,
            virtual_tokens=event.num_virtual_tokens,
            experts=_experts(event),
        )
    # TGI sends generated_text and details as null on every event but the last.
    return StreamResponse(
        index=event.index, token=_token(event), generated_text=event.generated_text, details=details
    ).model_dump()


async def generate_stream(route: str, request: Request, body: GenerateRequest, ctx: ServerContext) -> StreamingResponse:
    check_api_key(request, ctx.settings.api_key)
    timing = Timing(arrival=time.monotonic())
    engine_request, events = await ctx.service.stream(route, to_input(body), timing)
    return StreamingResponse(
        sse_events(events, tgi_stream_event),
        media_type="text/event-stream",
        headers={
            "X-Accel-Buffering": "no",
            "Cache-Control": "no-cache",
            "x-request-id": engine_request.request_id,
        },
    )


@router.post("/generate", response_model=GenerateResponse)
async def generate(request: Request, body: GenerateRequest, ctx: Ctx) -> JSONResponse:
    """Generate text for `inputs` (TGI's schema); `details` adds tokens, logprobs and expert traffic."""
    return await generate_json("generate", request, body, ctx)


@router.post("/generate_stream")
async def generate_stream_route(request: Request, body: GenerateRequest, ctx: Ctx) -> StreamingResponse:
    """Server-sent events, one per token; the last carries `generated_text` and `details`."""
    return await generate_stream("generate_stream", request, body, ctx)


@router.post("/")
async def compat(request: Request, body: GenerateRequest, ctx: Ctx) -> object:
    """TGI's compatibility route: `stream` picks SSE; otherwise a list with one response."""
    if body.stream:
        return await generate_stream("compat", request, body, ctx)
    response = await generate_json("compat", request, body, ctx)
    payload = json.loads(bytes(response.body))
    return JSONResponse([payload], headers={k: v for k, v in response.headers.items() if k.startswith("x-")})
