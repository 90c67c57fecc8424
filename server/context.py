"""What every route needs, in one object on `app.state` (FastAPI dependency `context`)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, TypeVar

import anyio
from fastapi import Depends, Request

from engine.serving.protocol import EngineClient
from server import version
from server.metrics import Metrics
from server.prompt_store import PromptStore
from server.service import GenerationService
from server.settings import Settings

T = TypeVar("T")


@dataclass
class ServerContext:
    settings: Settings
    engine: EngineClient
    store: PromptStore
    metrics: Metrics
    service: GenerationService
    model_name: str
    system_fingerprint: str
    """OpenAI's `system_fingerprint`: what changes the numbers for a given seed (version, dtype, device,
    and on CPUs the dense matmul path, whose summation order shows in bf16); fixed for the process."""
    draining: bool = False
    notes: list[str] = field(default_factory=list)

    @classmethod
    def create(cls, settings: Settings, engine: EngineClient, store: PromptStore) -> ServerContext:
        """Built inside the running event loop (the lifespan): the worker pool belongs to it."""
        metrics = Metrics()
        # The worker pool for a request's blocking work (tokenising, prompt files): a thread per
        # core, so that such work queues instead of crowding out the engine thread.
        workers = anyio.CapacityLimiter(max(2, os.cpu_count() or 2))

        async def off_loop(call: Callable[[], T]) -> T:
            return await anyio.to_thread.run_sync(call, limiter=workers)

        service = GenerationService(engine, store, settings, metrics, off_loop)
        info = engine.info()
        metrics.attach(engine, store, lambda: service.in_flight)
        metrics.describe_build(model=info.model_id, dtype=info.dtype)
        kernels = info.cpu_kernels.get("dense")
        fingerprint = f"cpm2-{version()}-{info.dtype}-{info.device}" + (f"-{kernels}" if kernels else "")
        return cls(
            settings,
            engine,
            store,
            metrics,
            service,
            model_name=Path(info.model_id).name or info.model_id,
            system_fingerprint=fingerprint,
        )

    async def off_loop(self, call: Callable[[], T]) -> T:
        """`call()` in the worker pool, so the event loop keeps answering meanwhile."""
        return await self.service.off_loop(call)


def context(request: Request) -> ServerContext:
    ctx: ServerContext = request.app.state.ctx
    return ctx


#: Route parameter type: `ctx: Ctx` injects the server context.
Ctx = Annotated[ServerContext, Depends(context)]
