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
from server.context import Ctx
from server.errors import PayloadTooLargeError, mapping_for
from server.prompt_store import check_id
from server.schemas import ERROR_RESPONSES

router = APIRouter(prefix="/prompts", responses=ERROR_RESPONSES)


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
    check_admin(request, ctx.settings.admin_token)
    check_id(prompt_id)
    limit = ctx.settings.max_prompt_upload_bytes
    data = await file.read(limit + 1)
    try:
        if len(data) > limit:
            raise PayloadTooLargeError(f"the prompt file is over {limit} bytes (CPM2_MAX_PROMPT_UPLOAD_BYTES)")
        if adapter_config is not None:
            config = await adapter_config.read(MAX_CONFIG_BYTES + 1)
            data = soft_prompt_from_peft_files(config, data, d_model=ctx.store.d_model).to_bytes()
        record = ctx.store.create(prompt_id, data, description=description)
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
    check_admin(request, ctx.settings.admin_token)
    record = ctx.store.record(prompt_id)
    if file_format == "peft":
        return Response(
            peft_archive(ctx.store.stored_prompt(prompt_id)),
            media_type="application/zip",
            headers={
                # The archive is a pure function of the stored file, so its hash identifies it too.
                "ETag": f'"{record.sha256}-peft"',
                "Content-Disposition": f'attachment; filename="{prompt_id}-peft.zip"',
            },
        )
    return Response(
        ctx.store.file_bytes(prompt_id),
        media_type="application/octet-stream",
        headers={
            "ETag": f'"{record.sha256}"',
            "Content-Disposition": f'attachment; filename="{prompt_id}.safetensors"',
        },
    )


@router.delete("/{prompt_id}", status_code=204)
async def delete(prompt_id: str, request: Request, ctx: Ctx) -> Response:
    """Delete a prompt (admin). Requests already using it finish normally."""
    check_admin(request, ctx.settings.admin_token)
    ctx.store.delete(prompt_id)
    return Response(status_code=204)
