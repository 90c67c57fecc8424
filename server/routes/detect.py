"""LibreTranslate-compatible language detection: `POST /detect`.

Follows LibreTranslate's route (LibreTranslate/LibreTranslate `libretranslate/app.py` and
`language.py`): `q` (a text, or a list of texts answered together) and `api_key` from a JSON or a
form body; the answer is `[{"confidence": 0-100, "language": code}]`, best first, with the codes
`/languages` lists. Detection (server/detect.py) is an optional extra: without it the route answers
400 saying how to install it. It runs in the worker pool, as the model's first load takes ~0.5 s.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from server.auth import check_api_key
from server.context import Ctx
from server.detect import detect_languages, merge_detections
from server.routes.translate import read_fields
from server.schemas import LIBRETRANSLATE_ERROR_RESPONSES, DetectedLanguage

router = APIRouter(responses=LIBRETRANSLATE_ERROR_RESPONSES)


class DetectRequest(BaseModel):
    """`POST /detect` (LibreTranslate's fields), from a JSON or a form body."""

    model_config = ConfigDict(extra="ignore")  # as LibreTranslate, which ignores fields it does not know

    q: str | list[str] = Field("", description="the text, or a list of texts detected together")
    api_key: str | None = Field(None, description="the API key, when the server requires one")

    @model_validator(mode="after")
    def _libretranslate_checks(self) -> DetectRequest:
        if not self.q:
            raise PydanticCustomError("missing", "Invalid request: missing q parameter")
        if isinstance(self.q, list) and not all(self.q):
            raise PydanticCustomError("empty", "Invalid request: q has an empty text; leave empty texts out")
        return self

    @property
    def texts(self) -> list[str]:
        return [self.q] if isinstance(self.q, str) else list(self.q)


async def detect_body(request: Request, ctx: Ctx) -> DetectRequest:
    """The request from a JSON or a form body, validated; its size is bounded while it is read."""
    try:
        return DetectRequest.model_validate(await read_fields(request, ctx.settings.payload_limit))
    except ValidationError as exc:  # worded by the handler in server/errors.py
        raise RequestValidationError(exc.errors()) from None


# The body is read by `detect_body` (JSON or form), so FastAPI cannot document it on its own.
_BODY = {
    "required": True,
    "content": {
        media: {"schema": DetectRequest.model_json_schema()}
        for media in ("application/json", "application/x-www-form-urlencoded", "multipart/form-data")
    },
}


@router.post("/detect", response_model=list[DetectedLanguage], openapi_extra={"requestBody": _BODY})
async def detect(
    request: Request, body: Annotated[DetectRequest, Depends(detect_body)], ctx: Ctx
) -> list[DetectedLanguage]:
    """The language of `q`: candidates among the model's languages, best first."""
    check_api_key(request, ctx.settings.api_key, body_key=body.api_key)
    texts = body.texts
    model_codes = ctx.engine.info().languages
    per_text = await ctx.off_loop(lambda: detect_languages(texts, model_codes=model_codes))
    detections = per_text[0] if len(texts) == 1 else merge_detections(per_text, texts=texts)
    return [DetectedLanguage(confidence=d.confidence, language=d.language) for d in detections]
