"""Probes and introspection: `/health`, `/ready`, `/info`, `/metrics`, `/tokenize`."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from server import version
from server.auth import check_api_key
from server.context import Ctx
from server.prompt_store import check_id
from server.schemas import ERROR_RESPONSES, TokenizeRequest
from server.service import GenerationInput

router = APIRouter(responses=ERROR_RESPONSES)


@router.get("/health")
async def health(ctx: Ctx) -> JSONResponse:
    """Liveness: the event loop answers and the engine thread makes progress (or is idle)."""
    state = ctx.engine.health()
    body = {
        "status": state.status,
        "detail": state.detail,
        "last_step_age_seconds": state.last_step_age_seconds,
    }
    return JSONResponse(body, status_code=200 if state.is_live else 503)


@router.get("/ready")
async def ready(ctx: Ctx) -> JSONResponse:
    """Readiness: loaded, warmed up, not draining."""
    state = ctx.engine.health()
    is_ready = state.is_ready and not ctx.draining
    ctx.metrics.ready.set(1 if is_ready else 0)
    status = "draining" if ctx.draining else state.status
    headers = None if is_ready else {"Retry-After": "5"}
    return JSONResponse({"status": status}, status_code=200 if is_ready else 503, headers=headers)


@router.get("/info")
async def info(ctx: Ctx) -> dict[str, object]:
    """Model, limits and version (TGI's /info fields where they apply)."""
    engine = ctx.engine.info()
    s = ctx.settings
    return {
        "model_id": ctx.model_name,
        "model_path": engine.model_id,
        "model_family": engine.model_family,
        "dtype": engine.dtype,
        "device": engine.device,
        "d_model": engine.d_model,
        "max_input_tokens": s.max_input_tokens,
        "max_input_chars": ctx.service.max_input_chars,
        "max_total_tokens": s.max_total_tokens,
        "max_new_tokens": s.max_new_tokens,
        "max_concurrent_requests": s.max_concurrent_requests,
        "max_queue_requests": s.max_queue_requests,
        "max_batch_size": engine.max_batch_size,
        "max_stop_sequences": s.max_stop_sequences,
        "max_virtual_tokens": s.max_virtual_tokens,
        "max_prompt_upload_bytes": s.max_prompt_upload_bytes,
        "experts_offloaded": engine.experts_offloaded,
        "quantization": engine.extra.get("quantization", {}),
        "expert_memory_bytes": engine.expert_memory_bytes,
        "expert_memory": _expert_memory(ctx, engine.expert_memory_bytes) if engine.experts_offloaded else None,
        "cpu_kernels": engine.cpu_kernels or None,
        "languages": list(engine.languages),
        "version": version(),
    }


def _expert_memory(ctx: Ctx, budget_bytes: int) -> dict[str, float]:
    """Expert bytes in RAM now (the pool, and the mapped store's pages in the page cache) beside the
    budget: read from the engine's stats, as /metrics does (a `mincore` pass, not per request)."""
    experts = ctx.engine.stats().experts
    keys = ("pool_bytes", "mapped_resident_bytes", "resident_bytes")
    return {"budget_bytes": budget_bytes, **{k: experts.get(k, 0.0) for k in keys}}


@router.get("/metrics")
async def metrics(ctx: Ctx) -> Response:
    """Prometheus text exposition."""
    return Response(ctx.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.post("/tokenize")
async def tokenize(request: Request, body: TokenizeRequest, ctx: Ctx) -> dict[str, object]:
    """The tokens of `inputs` (and `text_pair`), and where a prompt's virtual tokens would go; the
    same input limits as generation (422 over them)."""
    check_api_key(request, ctx.settings.api_key)

    def report() -> dict[str, object]:
        ids_a, ids_b = ctx.service.tokens(GenerationInput(inputs=body.inputs, text_pair=body.text_pair))
        virtual: dict[str, int] = {}
        if body.prompt_id is not None:
            virtual = ctx.store.record(check_id(body.prompt_id)).num_virtual_tokens
        tokens = [{"id": t, "text": ctx.engine.token_text(t), "segment": "inputs"} for t in ids_a]
        tokens += [{"id": t, "text": ctx.engine.token_text(t), "segment": "text_pair"} for t in ids_b]
        return {
            "tokens": tokens,
            "virtual_tokens": virtual,
            "input_length": len(ids_a) + len(ids_b) + sum(n for k, n in virtual.items() if k != "decoder_prefix"),
        }

    return await ctx.off_loop(report)
