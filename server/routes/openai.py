"""OpenAI-compatible `POST /v1/completions` and `GET /v1/models`.

`model` names the base model, a soft prompt id, or `base:prompt_id`; `/v1/models` lists the base
model and one entry per prompt (its `parent` is the base), as vLLM and LoRAX list adapters.
Answers and streamed chunks are `server.schemas.Completion`, the shape of openai-python's `Completion`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from engine.serving.protocol import TokenEvent
from server.auth import check_api_key
from server.context import Ctx, ServerContext
from server.errors import mapping_for
from server.prompt_store import PromptNotFoundError
from server.schemas import (
    OPENAI_ERROR_RESPONSES,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionUsage,
    OpenAIFinishReason,
)
from server.service import GenerationInput, Outcome, Timing

router = APIRouter(prefix="/v1", responses=OPENAI_ERROR_RESPONSES)

_FINISH: dict[str, OpenAIFinishReason] = {"length": "length", "eos_token": "stop", "stop_sequence": "stop"}


def _finish(event: TokenEvent) -> OpenAIFinishReason:
    return _FINISH.get(event.finish_reason or "length", "stop")


def resolve_model(ctx: ServerContext, model: str) -> str | None:
    """The prompt id `model` asks for (None for the bare base model)."""
    base, _, prompt = model.partition(":")
    if prompt:
        if base != ctx.model_name:
            raise PromptNotFoundError(f"the model `{base}` does not exist; this server runs `{ctx.model_name}`")
        ctx.store.record(prompt)
        return prompt
    if model == ctx.model_name:
        return None
    try:
        ctx.store.record(model)
    except PromptNotFoundError:
        raise PromptNotFoundError(
            f"the model `{model}` does not exist; use `{ctx.model_name}` or one of the prompt ids in /v1/models"
        ) from None
    return model


def to_input(body: CompletionRequest, text: str, prompt_id: str | None) -> GenerationInput:
    sampling = body.temperature not in (None, 0.0) or body.top_p is not None or body.top_k is not None
    return GenerationInput(
        inputs=text,
        text_pair=body.text_pair,
        prompt_id=prompt_id,
        max_new_tokens=body.max_tokens,
        do_sample=sampling,
        temperature=body.temperature,
        top_k=body.top_k,
        top_p=body.top_p,
        repetition_penalty=body.repetition_penalty,
        seed=body.seed,
        stop=body.stops,
        src_lang=body.src_lang,
        tgt_lang=body.tgt_lang,
    )


def _logprobs(events: list[TokenEvent]) -> CompletionLogprobs:
    return CompletionLogprobs(tokens=[e.text for e in events], token_logprobs=[e.logprob for e in events])


def _choice(index: int, outcome: Outcome, logprobs: bool) -> CompletionChoice:
    return CompletionChoice(
        index=index,
        text=outcome.last.generated_text or "",
        logprobs=_logprobs(outcome.events) if logprobs else None,
        finish_reason=_finish(outcome.last),
    )


def _usage(*, prompt_tokens: int, completion_tokens: int, virtual_tokens: int) -> CompletionUsage:
    return CompletionUsage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        virtual_tokens=virtual_tokens,
    )


@router.post("/completions", response_model=Completion)
async def completions(request: Request, body: CompletionRequest, ctx: Ctx) -> object:
    """Text completion; `stream` sends `Completion` chunks as SSE, ending with `data: [DONE]`."""
    check_api_key(request, ctx.settings.api_key)
    prompt_id = resolve_model(ctx, body.model)
    # Every chunk of one completion repeats these fields; choices and usage are filled in per answer.
    header = Completion(
        id=f"cmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=body.model,
        system_fingerprint=ctx.system_fingerprint,
        choices=[],
    )
    if body.stream:
        if len(body.prompts) != 1:
            from engine.errors import InputError

            raise InputError("streaming takes one prompt; send the others as separate requests")
        timing = Timing(arrival=time.monotonic())
        _, events = await ctx.service.stream("completions", to_input(body, body.prompts[0], prompt_id), timing)
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(
            _openai_stream(events, header, logprobs=bool(body.logprobs), include_usage=include_usage),
            media_type="text/event-stream",
            headers={"X-Accel-Buffering": "no", "Cache-Control": "no-cache"},
        )
    specs = [to_input(body, text, prompt_id) for text in body.prompts]
    outcomes = await ctx.service.run_all("completions", specs, field="prompt")
    usage = _usage(
        prompt_tokens=sum(o.last.num_input_tokens + o.last.num_virtual_tokens for o in outcomes),
        completion_tokens=sum(o.last.index for o in outcomes),
        virtual_tokens=sum(o.last.num_virtual_tokens for o in outcomes),
    )
    choices = [_choice(i, o, bool(body.logprobs)) for i, o in enumerate(outcomes)]
    return JSONResponse(header.model_copy(update={"choices": choices, "usage": usage}).model_dump())


async def _openai_stream(
    events: AsyncIterator[TokenEvent], header: Completion, *, logprobs: bool, include_usage: bool
) -> AsyncIterator[str]:
    try:
        async for event in events:
            choice = CompletionChoice(
                index=0,
                text=event.text,
                logprobs=_logprobs([event]) if logprobs else None,
                finish_reason=_finish(event) if event.is_last else None,
            )
            yield "data: " + header.model_copy(update={"choices": [choice]}).model_dump_json() + "\n\n"
            if event.is_last and include_usage:
                # OpenAI's `stream_options.include_usage`: one more chunk, no choices, the usage.
                usage = _usage(
                    prompt_tokens=event.num_input_tokens + event.num_virtual_tokens,
                    completion_tokens=event.index,
                    virtual_tokens=event.num_virtual_tokens,
                )
                yield "data: " + header.model_copy(update={"usage": usage}).model_dump_json() + "\n\n"
    except Exception as exc:
        mapping = mapping_for(exc)
        error = {"message": str(exc), "type": mapping.error_type, "param": None, "code": mapping.status}
        yield "data: " + json.dumps({"error": error}) + "\n\n"
    yield "data: [DONE]\n\n"


@router.get("/models")
async def models(request: Request, ctx: Ctx) -> dict[str, object]:
    """The base model and every soft prompt (an OpenAI `model` each)."""
    check_api_key(request, ctx.settings.api_key)
    created = int(time.time())
    data: list[dict[str, object]] = [
        {
            "id": ctx.model_name,
            "object": "model",
            "created": created,
            "owned_by": "cpm2",
            "root": ctx.model_name,
        }
    ]
    for record in ctx.store.records():
        data.append(
            {
                "id": record.id,
                "object": "model",
                "created": int(record.created_at),
                "owned_by": "cpm2",
                "root": ctx.model_name,
                "parent": ctx.model_name,
            }
        )
    return {"object": "list", "data": data}
