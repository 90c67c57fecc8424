"""The one place typed errors become HTTP responses: `{"error", "error_type"}` (TGI's body).

Routes raise the engine's and the store's typed errors and carry no try/except ladders; the
handlers registered here pick the status code. OpenAI routes get OpenAI's error envelope;
LibreTranslate's routes get its `{"error"}` body and statuses (400 bad input, 403 credentials).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.errors import Cpm2Error, InputError
from engine.prompts import PromptError
from engine.serving.protocol import (
    EngineOverloadedError,
    EngineUnavailableError,
    GenerationFailedError,
    RequestTimeoutError,
)
from server.prompt_store import PromptExistsError, PromptNotFoundError

log = logging.getLogger("cpm2.server")


class UnauthorizedError(Cpm2Error):
    """Missing or wrong credentials (HTTP 401)."""


class ForbiddenError(Cpm2Error):
    """Credentials are fine but not allowed here (HTTP 403)."""


class PayloadTooLargeError(Cpm2Error):
    """A request body over the configured limit (HTTP 413)."""


class TooManyRequestsError(EngineOverloadedError):
    """The server's concurrency limit is reached (HTTP 429)."""


@dataclass(frozen=True)
class ErrorMapping:
    status: int
    error_type: str
    retry_after: float | None = None


_PROMPT_STATUS = {"format": 415, "too_large": 413, "shape": 422, "values": 422, "config": 422}


def mapping_for(exc: Exception) -> ErrorMapping:
    """Status and error type of an exception raised while serving a request."""
    if isinstance(exc, PromptError):
        return ErrorMapping(_PROMPT_STATUS[exc.problem], "validation" if exc.problem != "too_large" else "too_large")
    table: list[tuple[type[Exception], int, str]] = [
        (UnauthorizedError, 401, "unauthorized"),
        (ForbiddenError, 403, "forbidden"),
        (PromptNotFoundError, 404, "prompt_not_found"),
        (PromptExistsError, 409, "conflict"),
        (PayloadTooLargeError, 413, "too_large"),
        (InputError, 422, "validation"),
        (RequestTimeoutError, 504, "timeout"),
        (GenerationFailedError, 500, "generation"),
    ]
    if isinstance(exc, EngineOverloadedError):
        return ErrorMapping(429, "overloaded", exc.retry_after)
    if isinstance(exc, EngineUnavailableError):
        return ErrorMapping(503, "unavailable", exc.retry_after)
    for kind, status, error_type in table:
        if isinstance(exc, kind):
            return ErrorMapping(status, error_type)
    return ErrorMapping(500, "internal")


def error_body(message: str, error_type: str, *, openai: bool, status: int) -> dict[str, object]:
    if openai:
        return {"error": {"message": message, "type": error_type, "param": None, "code": status}}
    return {"error": message, "error_type": error_type}


def is_openai_route(request: Request) -> bool:
    return request.url.path.startswith("/v1/")


#: LibreTranslate-compatible routes (server/routes/translate.py, server/routes/detect.py).
LIBRETRANSLATE_ROUTES = ("/translate", "/languages", "/detect")

# LibreTranslate answers every problem with the input 400 and bad credentials 403 (its clients
# know no 401/404/422); a body over the size limit (413, as its Flask server answers one), overload
# (429) and server faults keep their status.
_LIBRETRANSLATE_STATUS = {401: 403, 404: 400, 409: 400, 415: 400, 422: 400}


def is_libretranslate_route(request: Request) -> bool:
    return request.url.path in LIBRETRANSLATE_ROUTES


def json_error(
    request: Request, message: str, error_type: str, status: int, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The error body and status of the route's API flavour: TGI's, OpenAI's or LibreTranslate's."""
    if is_libretranslate_route(request):
        return JSONResponse({"error": message}, status_code=_LIBRETRANSLATE_STATUS.get(status, status), headers=headers)
    return JSONResponse(
        error_body(message, error_type, openai=is_openai_route(request), status=status),
        status_code=status,
        headers=headers,
    )


def error_response(request: Request, exc: Exception) -> JSONResponse:
    mapping = mapping_for(exc)
    message = str(exc) if mapping.status != 500 or isinstance(exc, Cpm2Error) else "internal server error"
    headers = {"Retry-After": str(max(1, round(mapping.retry_after)))} if mapping.retry_after else None
    return json_error(request, message, mapping.error_type, mapping.status, headers)


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers: typed errors, validation errors, HTTP errors, anything else (500)."""

    async def on_cpm2_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response(request, exc)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        problems = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
            problems.append(f"{where}: {error.get('msg')}" if where else str(error.get("msg")))
        message = "; ".join(problems) or "invalid request"
        return json_error(request, message, "validation", 422)

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        kinds = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}
        error_type = kinds.get(exc.status_code, "http_error")
        return json_error(request, str(exc.detail), error_type, exc.status_code, getattr(exc, "headers", None))

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return error_response(request, exc)

    app.add_exception_handler(Cpm2Error, on_cpm2_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)
