"""Soft prompts at runtime: upload, list, read, download, delete (`/prompts`).

A PEFT prompt-tuning adapter is accepted and exported too (`engine/peft.py` translates); the store
always keeps the cpm2 format, so an adapter is converted before it is validated like any upload.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Query, Request, Response, UploadFile
from fastapi.responses import JSONResponse

from engine.peft import MAX_CONFIG_BYTES, peft_archive, soft_prompt_from_peft_files
from engine.prompts import PromptError
from server.auth import check_admin, check_api_key
from server.context import Ctx, ServerContext
from server.errors import PayloadTooLargeError, mapping_for
from server.prompt_store import check_id
from server.schemas import ERROR_RESPONSES

router = APIRouter(prefix="/prompts", responses=ERROR_RESPONSES)


def _check_admin(request: Request, ctx: ServerContext) -> None:
    check_admin(request, ctx.settings.admin_token, allow_local=ctx.settings.allow_local_admin)


@router.post("", status_code=201)
async def upload(
    request: Request,
    ctx: Ctx,
    file: Annotated[
        UploadFile,
        File(description="safetensors with prefix / infix / suffix / decoder_prefix, or a PEFT adapter_model"),
    ],
    prompt_id: Annotated[str, Form(alias="id", description="the prompt id: letters, digits, '.', '_', '-'")],
    description: Annotated[str, Form()] = "",
    adapter_config: Annotated[
        UploadFile | None, File(description="PEFT adapter_config.json; `file` is then its adapter_model.safetensors")
    ] = None,
) -> JSONResponse:
    """Store a new soft prompt (admin). 409 if the id exists, 415 for a non-safetensors file."""
    _check_admin(request, ctx)
    check_id(prompt_id)
    limit = ctx.settings.max_prompt_upload_bytes
    data = await file.read(limit + 1)
    try:
        if len(data) > limit:
            raise PayloadTooLargeError(f"the prompt file is over {limit} bytes (CPM2_MAX_PROMPT_UPLOAD_BYTES)")
        if adapter_config is not None:
            config = await adapter_config.read(MAX_CONFIG_BYTES + 1)
            peft = data
            data = await ctx.off_loop(
                lambda: soft_prompt_from_peft_files(config, peft, d_model=ctx.store.d_model).to_bytes()
            )
        prompt = data
        # Parsing, validating and fsyncing up to CPM2_MAX_PROMPT_UPLOAD_BYTES: in the worker pool.
        record = await ctx.off_loop(lambda: ctx.store.create(prompt_id, prompt, description=description))
    except (PromptError, PayloadTooLargeError) as exc:
        ctx.metrics.uploads.labels(f"rejected_{mapping_for(exc).error_type}").inc()
        raise
    ctx.metrics.uploads.labels("created").inc()
    return JSONResponse(record.to_dict(), status_code=201, headers={"Location": f"/prompts/{prompt_id}"})


@router.get("")
async def list_prompts(request: Request, ctx: Ctx) -> dict[str, object]:
    """Every stored prompt's metadata."""
    check_api_key(request, ctx.settings.api_key)
    return {"data": [r.to_dict() for r in ctx.store.records()]}


@router.get("/{prompt_id}")
async def get_prompt(prompt_id: str, request: Request, ctx: Ctx) -> dict[str, object]:
    check_api_key(request, ctx.settings.api_key)
    return ctx.store.record(prompt_id).to_dict()


@router.get("/{prompt_id}/file")
async def download(
    prompt_id: str,
    request: Request,
    ctx: Ctx,
    file_format: Annotated[
        Literal["cpm2", "peft"],
        Query(alias="format", description="peft: a zip of adapter_config.json + adapter_model.safetensors"),
    ] = "cpm2",
) -> Response:
    """The prompt's safetensors file as stored (admin), or with `format=peft` a PEFT adapter (zip)."""
    _check_admin(request, ctx)
    record = ctx.store.record(prompt_id)
    if file_format == "peft":
        return Response(
            await ctx.off_loop(lambda: peft_archive(ctx.store.stored_prompt(prompt_id))),
            media_type="application/zip",
            headers={
                # The archive is a pure function of the stored file, so its hash identifies it too.
                "ETag": f'"{record.sha256}-peft"',
                "Content-Disposition": f'attachment; filename="{prompt_id}-peft.zip"',
            },
        )
    return Response(
        await ctx.off_loop(lambda: ctx.store.file_bytes(prompt_id)),
        media_type="application/octet-stream",
        headers={
            "ETag": f'"{record.sha256}"',
            "Content-Disposition": f'attachment; filename="{prompt_id}.safetensors"',
        },
    )


@router.delete("/{prompt_id}", status_code=204)
async def delete(prompt_id: str, request: Request, ctx: Ctx) -> Response:
    """Delete a prompt (admin). Requests already using it finish normally."""
    _check_admin(request, ctx)
    await ctx.off_loop(lambda: ctx.store.delete(prompt_id))
    return Response(status_code=204)
