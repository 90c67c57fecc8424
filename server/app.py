"""The FastAPI application: `create_app(settings, engine=None)`.

Without an engine the lifespan builds the real one from the settings (tests pass a fake or a tiny
real engine) and starts it; on shutdown it drains: no new requests, running ones finish (up to
`shutdown_timeout`), then the engine stops.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from engine.errors import ConfigError
from engine.peft import MAX_CONFIG_BYTES
from engine.serving.protocol import EngineClient
from server.context import ServerContext
from server.errors import error_body, install_error_handlers, is_openai_route
from server.limits import BodyLimit, BodyLimitMiddleware
from server.prompt_store import PromptStore
from server.routes import detect, generate, openai, prompts, system, translate
from server.settings import Settings

log = logging.getLogger("cpm2.server")

#: What a prompt upload's multipart body may carry beyond the prompt file: the PEFT config, the
#: form fields and the part headers.
_UPLOAD_OVERHEAD = MAX_CONFIG_BYTES + 64 * 1024


def _route_label(request: Request) -> str:
    route = request.scope.get("route")
    path = getattr(route, "path", None)
    return str(path) if path else "unmatched"


def build_engine(settings: Settings) -> EngineClient:
    """The real engine for `settings` (a model directory, or the built-in default model)."""
    from engine.serving.engine import AsyncEngine
    from engine.weights.builtin import resolve_model

    model_dir = resolve_model(settings.model, cache_dir=settings.cache_dir)
    return AsyncEngine.from_config(settings.engine_config(model_dir))


def build_store(settings: Settings, engine: EngineClient) -> PromptStore:
    import torch

    info = engine.info()
    return PromptStore(
        Path(settings.prompt_store),
        d_model=info.d_model,
        dtype=getattr(torch, info.dtype),
        max_virtual_tokens=settings.max_virtual_tokens,
        max_upload_bytes=settings.max_prompt_upload_bytes,
        cache_bytes=settings.prompt_cache_bytes,
    )


def add_bundled_prompts(settings: Settings, engine: EngineClient, store: PromptStore) -> None:
    """Serve the model's bundled prompts (`CPM2_BUNDLED_PROMPTS`, default `<model dir>/prompts/`)
    read-only beside the uploads, so a model trained with its prompts serves them from the start."""
    bundle = settings.bundled_prompts or Path(engine.info().model_id) / "prompts"
    if settings.bundled_prompts is not None and not bundle.is_dir():
        raise ConfigError(f"CPM2_BUNDLED_PROMPTS={bundle} is not a directory; give a folder of .safetensors prompts")
    if bundle.is_dir():
        ids = store.add_bundle(bundle)
        log.info("prompts bundled in %s: %s", bundle, ", ".join(ids) or "none")


def announce_prompt_writes(settings: Settings) -> None:
    """Say at start who may upload and delete prompts (server/auth.py)."""
    if settings.admin_token is not None:
        log.info("prompt writes need the admin token (CPM2_ADMIN_TOKEN)")
    elif settings.allow_local_admin:
        log.warning(
            "CPM2_ALLOW_LOCAL_ADMIN: prompt uploads and deletes are accepted without a token from every loopback "
            "peer, proxies, port-forwards and tunnels on this host included; set CPM2_ADMIN_TOKEN for anything "
            "reachable from outside"
        )
    else:
        log.info("prompt writes are disabled: set CPM2_ADMIN_TOKEN (or --allow-local-admin) to enable them")


def body_limit(settings: Settings) -> Callable[[str, str], BodyLimit]:
    """Every body is bounded: a prompt upload by the upload limit, any other by `payload_limit`."""
    upload = BodyLimit(settings.max_prompt_upload_bytes + _UPLOAD_OVERHEAD, "CPM2_MAX_PROMPT_UPLOAD_BYTES")
    payload = BodyLimit(settings.payload_limit, "CPM2_PAYLOAD_LIMIT")
    return lambda method, path: upload if (method, path.rstrip("/")) == ("POST", "/prompts") else payload


def create_app(settings: Settings | None = None, engine: EngineClient | None = None) -> FastAPI:
    """The app; `engine` is started by the lifespan (the real one is built when none is given)."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        real = engine or build_engine(settings)
        store = build_store(settings, real)
        add_bundled_prompts(settings, real, store)
        ctx = ServerContext.create(settings, real, store)
        app.state.ctx = ctx
        announce_prompt_writes(settings)
        await real.start()
        ctx.metrics.ready.set(1)
        log.info("cpm2 ready: model %s", ctx.model_name)
        try:
            yield
        finally:
            ctx.draining = True
            ctx.metrics.ready.set(0)
            ctx.metrics.draining.set(1)
            await real.drain(settings.shutdown_timeout)

    app = FastAPI(
        title="cpm2",
        description="Encoder-decoder MoE inference with runtime soft prompts (TGI- and OpenAI-compatible).",
        version="0.1.0",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    # Added before the middleware below, so inside it: its 413s are counted in the metrics.
    app.add_middleware(BodyLimitMiddleware, limit_for=body_limit(settings))

    @app.middleware("http")
    async def drain_and_metrics(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        ctx: ServerContext | None = getattr(request.app.state, "ctx", None)
        if ctx is not None and ctx.draining and request.url.path not in ("/health", "/ready", "/metrics"):
            response: Response = JSONResponse(
                error_body(
                    "the server is shutting down; retry on another replica",
                    "unavailable",
                    openai=is_openai_route(request),
                    status=503,
                ),
                status_code=503,
                headers={"Retry-After": "5"},
            )
        else:
            response = await call_next(request)
        if ctx is not None and request.url.path != "/metrics":
            error_type = None
            if response.status_code >= 400:
                error_type = {
                    401: "unauthorized",
                    404: "not_found",
                    413: "too_large",
                    422: "validation",
                    429: "overloaded",
                    503: "unavailable",
                    504: "timeout",
                }.get(response.status_code, "error")
            ctx.metrics.response(_route_label(request), response.status_code, error_type)
        return response

    app.include_router(generate.router)
    app.include_router(openai.router)
    app.include_router(prompts.router)
    app.include_router(system.router)
    app.include_router(translate.router)
    app.include_router(detect.router)
    return app
