"""LibreTranslate-compatible translation: `POST /translate` and `GET /languages`.

Follows LibreTranslate's API (LibreTranslate/LibreTranslate `libretranslate/app.py`): the body is
JSON or a form (urlencoded or multipart), `q` is a text or a list of texts and the answer has the
same shape, errors are `{"error": message}` (400 bad input, 403 API key, 429 overloaded; see
server/errors.py). Language codes are LibreTranslate's (`en`, `zh-Hans`), mapped to the model's
NLLB codes by server/languages.py. A list is submitted all at once, so the engine batches it.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from engine.errors import InputError
from server.auth import check_api_key
from server.context import Ctx, ServerContext
from server.languages import offered, to_nllb
from server.schemas import LIBRETRANSLATE_ERROR_RESPONSES, LanguageEntry, TranslateRequest, TranslateResponse
from server.service import GenerationInput, Outcome, Timing

router = APIRouter(responses=LIBRETRANSLATE_ERROR_RESPONSES)


async def _fields(request: Request) -> Any:
    if request.headers.get("content-type", "").split(";")[0].strip().endswith("json"):
        try:
            return await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InputError("Invalid request: the body is not valid JSON") from None
    form = await request.form()
    fields: dict[str, Any] = {key: value for key, value in form.items() if isinstance(value, str)}
    # LibreTranslate normalises a form's line endings to LF (RFC 2046 sends CRLF); repeated `q`
    # fields are a list.
    texts = ["\n".join(value.splitlines()) for value in form.getlist("q") if isinstance(value, str)]
    if texts:
        fields["q"] = texts[0] if len(texts) == 1 else texts
    return fields


async def translate_body(request: Request) -> TranslateRequest:
    """The request from a JSON or a form body (LibreTranslate accepts both), validated; its size is
    bounded while it is read (server/limits.py)."""
    try:
        return TranslateRequest.model_validate(await _fields(request))
    except ValidationError as exc:  # the handler in server/errors.py words it like FastAPI's own
        raise RequestValidationError(exc.errors()) from None


async def _run_all(ctx: ServerContext, specs: list[GenerationInput]) -> list[Outcome]:
    """Every spec at once (so the engine batches them); one failing cancels the rest."""
    tasks = [
        asyncio.ensure_future(ctx.service.run("translate", spec, Timing(arrival=time.monotonic()))) for spec in specs
    ]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()  # no-op on finished tasks
        await asyncio.gather(*tasks, return_exceptions=True)


# The body is read by `translate_body` (JSON or form), so FastAPI cannot document it on its own.
_BODY_SCHEMA = TranslateRequest.model_json_schema()
_BODY = {
    "required": True,
    "content": {
        media: {"schema": _BODY_SCHEMA}
        for media in ("application/json", "application/x-www-form-urlencoded", "multipart/form-data")
    },
}


@router.post("/translate", response_model=TranslateResponse, openapi_extra={"requestBody": _BODY})
async def translate(
    request: Request, body: Annotated[TranslateRequest, Depends(translate_body)], ctx: Ctx
) -> TranslateResponse:
    """Translate `q` (a text or a list of texts) from `source` to `target`."""
    check_api_key(request, ctx.settings.api_key, body_key=body.api_key)
    codes = ctx.engine.info().languages
    src_lang = to_nllb(body.source, codes, field="source")
    tgt_lang = to_nllb(body.target, codes, field="target")
    texts = body.texts
    if len(texts) > ctx.settings.max_concurrent_requests:
        raise InputError(
            f"Invalid request: {len(texts)} texts in one request; the limit is "
            f"{ctx.settings.max_concurrent_requests} (CPM2_MAX_CONCURRENT_REQUESTS)"
        )
    specs = [GenerationInput(inputs=t, src_lang=src_lang, tgt_lang=tgt_lang, prompt_id=body.prompt_id) for t in texts]
    translated = [outcome.last.generated_text or "" for outcome in await _run_all(ctx, specs)]
    return TranslateResponse(translatedText=translated[0] if isinstance(body.q, str) else translated)


@router.get("/languages", response_model=list[LanguageEntry])
async def languages(ctx: Ctx) -> list[LanguageEntry]:
    """The languages the model translates, with LibreTranslate's codes; each targets all the others."""
    have = offered(ctx.engine.info().languages)
    return [
        LanguageEntry(code=lang.code, name=lang.name, targets=[t.code for t in have if t.nllb != lang.nllb])
        for lang in have
    ]
