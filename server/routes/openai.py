"""OpenAI-compatible `POST /v1/completions` and `GET /v1/models`.

`model` names the base model, a soft prompt id, or `base:prompt_id`; `/v1/models` lists the base
model and one entry per prompt (its `parent` is the base), as vLLM and LoRAX list adapters.
"""

from __future__ import annotations

import asyncio
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
from server.schemas import OPENAI_ERROR_RESPONSES, CompletionRequest
from server.service import GenerationInput, Outcome, Timing

router = APIRouter(prefix="/v1", responses=OPENAI_ERROR_RESPONSES)

_FINISH = {"length": "length", "eos_token": "stop", "stop_sequence": "stop"}


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
    )


def _choice(index: int, outcome: Outcome, logprobs: bool) -> dict[str, object]:
    last = outcome.last
    text = last.generated_text or ""
    choice: dict[str, object] = {
        "index": index,
        "text": text,
        "finish_reason": _FINISH.get(last.finish_reason or "length", "stop"),
        "logprobs": None,
    }
    if logprobs:
        choice["logprobs"] = {
            "tokens": [e.text for e in outcome.events],
            "token_logprobs": [e.logprob for e in outcome.events],
            "top_logprobs": None,
            "text_offset": None,
        }
    return choice


@router.post("/completions")
async def completions(request: Request, body: CompletionRequest, ctx: Ctx) -> object:
    """Text completion; `stream` sends SSE chunks ending with `data: [DONE]`."""
    check_api_key(request, ctx.settings.api_key)
    prompt_id = resolve_model(ctx, body.model)
    created = int(time.time())
    completion_id = f"cmpl-{uuid.uuid4().hex}"
    if body.stream:
        if len(body.prompts) != 1:
            from engine.errors import InputError

            raise InputError("streaming takes one prompt; send the others as separate requests")
        timing = Timing(arrival=time.monotonic())
        _, events = await ctx.service.stream("completions", to_input(body, body.prompts[0], prompt_id), timing)
        return StreamingResponse(
            _openai_stream(events, completion_id, created, body.model),
            media_type="text/event-stream",
            headers={"X-Accel-Buffering": "no", "Cache-Control": "no-cache"},
        )
    outcomes = await asyncio.gather(
        *[
            ctx.service.run("completions", to_input(body, text, prompt_id), Timing(arrival=time.monotonic()))
            for text in body.prompts
        ]
    )
    prompt_tokens = sum(o.last.num_input_tokens + o.last.num_virtual_tokens for o in outcomes)
    completion_tokens = sum(o.last.index for o in outcomes)
    return JSONResponse(
        {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": body.model,
            "choices": [_choice(i, o, bool(body.logprobs)) for i, o in enumerate(outcomes)],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "virtual_tokens": sum(o.last.num_virtual_tokens for o in outcomes),
            },
        }
    )


async def _openai_stream(
    events: AsyncIterator[TokenEvent], completion_id: str, created: int, model: str
) -> AsyncIterator[str]:
    try:
        async for event in events:
            chunk = {
                "id": completion_id,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "text": event.text,
                        "logprobs": None,
                        "finish_reason": _FINISH.get(event.finish_reason or "", "stop") if event.is_last else None,
                    }
                ],
            }
            yield "data: " + json.dumps(chunk) + "\n\n"
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
