"""LibreTranslate-compatible translation: `POST /translate` and `GET /languages`.

Follows LibreTranslate's API (LibreTranslate/LibreTranslate `libretranslate/app.py`): the body is
JSON or a form (urlencoded or multipart), `q` is a text or a list of texts and the answer has the
same shape, errors are `{"error": message}` (400 bad input, 403 API key, 429 overloaded; see
server/errors.py). Language codes are LibreTranslate's (`en`, `zh-Hans`), mapped to the model's
NLLB codes by server/languages.py. A list is submitted all at once, so the engine batches it.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from engine.errors import InputError
from server.auth import check_api_key
from server.context import Ctx
from server.detect import detect_languages
from server.languages import offered, to_nllb
from server.schemas import (
    LIBRETRANSLATE_ERROR_RESPONSES,
    DetectedLanguage,
    LanguageEntry,
    TranslateRequest,
    TranslateResponse,
)
from server.service import GenerationInput

router = APIRouter(responses=LIBRETRANSLATE_ERROR_RESPONSES)


async def read_fields(request: Request, payload_limit: int) -> Any:
    """A LibreTranslate body's fields: JSON, or a form (urlencoded or multipart), as LibreTranslate
    reads them (also `/detect`'s)."""
    if request.headers.get("content-type", "").split(";")[0].strip().endswith("json"):
        try:
            return await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InputError("Invalid request: the body is not valid JSON") from None
    # A text field may take the whole body (Starlette's own cap is 1 MiB): the body limit bounds it.
    form = await request.form(max_part_size=payload_limit)
    fields: dict[str, Any] = {key: value for key, value in form.items() if isinstance(value, str)}
    # LibreTranslate normalises a form's line endings to LF (RFC 2046 sends CRLF); repeated `q`
    # fields are a list.
    texts = ["\n".join(value.splitlines()) for value in form.getlist("q") if isinstance(value, str)]
    if texts:
        fields["q"] = texts[0] if len(texts) == 1 else texts
    return fields


async def translate_body(request: Request, ctx: Ctx) -> TranslateRequest:
    """The request from a JSON or a form body (LibreTranslate accepts both), validated; its size is
    bounded while it is read (server/limits.py)."""
    try:
        return TranslateRequest.model_validate(await read_fields(request, ctx.settings.payload_limit))
    except ValidationError as exc:  # the handler in server/errors.py words it like FastAPI's own
        raise RequestValidationError(exc.errors()) from None


# The body is read by `translate_body` (JSON or form), so FastAPI cannot document it on its own.
_BODY_SCHEMA = TranslateRequest.model_json_schema()
_BODY = {
    "required": True,
    "content": {
        media: {"schema": _BODY_SCHEMA}
        for media in ("application/json", "application/x-www-form-urlencoded", "multipart/form-data")
    },
}


@router.post(
    "/translate",
    response_model=TranslateResponse,
    response_model_exclude_none=True,  # `alternatives` only when asked for, as LibreTranslate
    openapi_extra={"requestBody": _BODY},
)
async def translate(
    request: Request, body: Annotated[TranslateRequest, Depends(translate_body)], ctx: Ctx
) -> TranslateResponse:
    """Translate `q` (a text or a list of texts) from `source` (`auto`: detected) to `target`."""
    check_api_key(request, ctx.settings.api_key, body_key=body.api_key)
    codes = ctx.engine.info().languages
    texts = body.texts
    tgt_lang = to_nllb(body.target, codes, field="target")
    detected: list[DetectedLanguage] | None = None
    if body.source == "auto":
        # Each text is translated from its own best guess (LibreTranslate takes the first text's
        # for a whole list); the guesses come back as `detectedLanguage`, in the shape of `q`.
        answers = await ctx.off_loop(lambda: detect_languages(texts, model_codes=codes))
        detected = [DetectedLanguage(confidence=a[0].confidence, language=a[0].language) for a in answers]
        src_langs = [to_nllb(d.language, codes, field="source") for d in detected]
    else:
        src_langs = [to_nllb(body.source, codes, field="source")] * len(texts)
    # N alternatives are the next best beams of a search of N + 1 beams.
    beams = body.alternatives + 1
    specs = [
        GenerationInput(
            inputs=text,
            src_lang=src_lang,
            tgt_lang=tgt_lang,
            prompt_id=body.prompt_id,
            num_beams=beams if beams > 1 else None,
            num_return_sequences=beams,
        )
        for text, src_lang in zip(texts, src_langs, strict=True)
    ]
    outcomes = await ctx.service.run_all("translate", specs, field="q")
    translated = [outcome.last.generated_text or "" for outcome in outcomes]
    others = [_distinct(outcome.last.alternatives, text) for outcome, text in zip(outcomes, translated, strict=True)]
    one = isinstance(body.q, str)
    return TranslateResponse(
        translatedText=translated[0] if one else translated,
        alternatives=(others[0] if one else others) if body.alternatives else None,
        detectedLanguage=(detected[0] if one else detected) if detected is not None else None,
    )


def _distinct(alternatives: tuple[str, ...], translation: str) -> list[str]:
    """Beams that differ only in tokens that decode to nothing read the same: each text once, and
    never the translation itself (as LibreTranslate filters its hypotheses)."""
    seen, distinct = {translation}, []
    for text in alternatives:
        if text not in seen:
            seen.add(text)
            distinct.append(text)
    return distinct


@router.get("/languages", response_model=list[LanguageEntry])
async def languages(ctx: Ctx) -> list[LanguageEntry]:
    """The languages the model translates, with LibreTranslate's codes; each targets all the others."""
    have = offered(ctx.engine.info().languages)
    return [
        LanguageEntry(code=lang.code, name=lang.name, targets=[t.code for t in have if t.nllb != lang.nllb])
        for lang in have
    ]
