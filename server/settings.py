"""Server settings: every option from `cpm2 serve` flags or a `CPM2_*` environment variable.

The server reads its environment here only (pydantic-settings) and builds the engine's typed config
from it, so the engine's serving code never looks at environment variables.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from engine.model.kernels import KernelMode
from engine.offload import OffloadConfig, Prediction, direct_io
from engine.serving.engine import EngineConfig

DEFAULT_MODEL = "builtin:tiny"


class Settings(BaseSettings):
    """`CPM2_MODEL=/models/x cpm2 serve` and `cpm2 serve --model /models/x` are the same thing."""

    model_config = SettingsConfigDict(env_prefix="CPM2_", env_file=None, extra="ignore")

    model: str = Field(
        DEFAULT_MODEL,
        description="model directory, or builtin:tiny (a small random model written on first start)",
    )
    cache_dir: Path | None = Field(
        None, description="where builtin models are written (default: $XDG_CACHE_HOME/cpm2 or ~/.cache/cpm2)"
    )
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8080, ge=1, le=65535, description="port to listen on")
    dtype: str | None = Field(None, description="float32 | bfloat16 | float16 (default: as stored)")
    device: str = Field("cpu", description="cpu, cuda, cuda:1, ...")
    cpu_kernels: KernelMode = Field(
        "auto", description="CPU matmul paths: auto (fastest this CPU supports per dtype) or plain (F.linear)"
    )
    expert_memory: str | None = Field(None, description="expert pool budget: 512MiB or 25%% (default: auto)")
    expert_order: Literal["infmoe", "cached-first", "index"] = Field("infmoe", description="expert order")
    expert_prediction: Prediction = Field(
        "calibrated", description="how prefetch predicts the next layer's experts (see --expert-prediction)"
    )
    expert_io: Literal["auto", "strict", "page-cache"] = Field(
        "auto",
        description="strict: O_DIRECT, RAM holds only the pool (the budget bounds expert memory); page-cache: "
        "experts the kernel caches are used in place (bounded only by the kernel); auto: strict when "
        "expert_memory is set",
    )
    expert_direct_io: bool = Field(False, description="the same as expert_io strict")
    prompt_store: Path = Field(Path("data/prompts"), description="directory of uploaded soft prompts")
    bundled_prompts: Path | None = Field(
        None, description="dir of <id>.safetensors prompts served read-only (default: the model's prompts/)"
    )
    prompt_cache_bytes: int = Field(256 * 2**20, ge=0, description="bytes of soft prompts kept in memory")
    max_input_tokens: int = Field(1024, ge=1, description="encoder tokens per request, virtual tokens included")
    max_total_tokens: int = Field(2048, ge=2, description="input + generated tokens per request")
    max_new_tokens: int = Field(256, ge=1, description="default max_new_tokens when a request sets none")
    max_batch_size: int = Field(32, ge=1, description="requests decoded together")
    waiting_served_ratio: float = Field(
        0.0, ge=0, description="encode new requests once waiting >= this x running rows (0: at every step)"
    )
    max_waiting_steps: int = Field(20, ge=0, description="...or once they have waited this many decode steps")
    max_prefill_tokens: int = Field(
        0, ge=0, description="encoder tokens encoded between two decode steps (at least one request; 0: no limit)"
    )
    encoder_step_share: float = Field(
        0.0,
        ge=0,
        description="while rows decode, encode newcomers between two decode steps for at most this share of a "
        "step's time, block by block (0: a whole encoder pass at once)",
    )
    max_queue_requests: int = Field(128, ge=0, description="requests waiting before new ones get 429")
    max_concurrent_requests: int = Field(160, ge=1, description="requests in the server at once (429 above)")
    max_stop_sequences: int = Field(4, ge=0, description="stop sequences per request")
    max_virtual_tokens: int = Field(512, ge=1, description="virtual tokens per soft prompt")
    max_prompt_upload_bytes: int = Field(64 * 2**20, ge=1, description="size of one uploaded prompt file")
    payload_limit: int = Field(2_000_000, ge=1, description="bytes of a JSON request body")
    api_key: str | None = Field(None, description="key required on generation routes (Authorization: Bearer)")
    admin_token: str | None = Field(None, description="token required to upload/delete prompts")
    allow_local_admin: bool = Field(
        False,
        description="without an admin token, accept prompt writes from loopback peers: trusts every "
        "loopback peer, proxies on this host included",
    )
    forwarded_allow_ips: str = Field(
        "",
        description="comma-separated proxy addresses whose X-Forwarded-For / Forwarded headers are believed "
        "(default: none)",
    )
    shutdown_timeout: float = Field(30.0, ge=0, description="seconds to finish running requests on SIGTERM")
    stall_seconds: float = Field(60.0, gt=0, description="engine reported stalled after this long without a step")
    log_level: str = Field("info", description="debug, info, warning, error")

    @field_validator("expert_memory")
    @classmethod
    def _blank_is_auto(cls, value: str | None) -> str | None:
        return None if value in (None, "", "auto") else value

    @field_validator("api_key", "admin_token", "dtype", "cache_dir", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        # `CPM2_ADMIN_TOKEN=` (compose's `${CPM2_ADMIN_TOKEN:-}`, an empty Secret) means "not set",
        # never "the empty string is the key".
        return None if isinstance(value, str) and not value.strip() else value

    def engine_config(self, model_dir: Path) -> EngineConfig:
        """The engine's typed config for these settings."""
        return EngineConfig(
            model=model_dir,
            dtype=self.dtype,
            device=self.device,
            cpu_kernels=self.cpu_kernels,
            offload=OffloadConfig(
                expert_memory=self.expert_memory,
                order=self.expert_order,
                prediction=self.expert_prediction,
                direct_io=direct_io(self.expert_io, force_direct=self.expert_direct_io),
            ),
            max_batch_size=self.max_batch_size,
            max_queue=self.max_queue_requests,
            waiting_served_ratio=self.waiting_served_ratio,
            max_prefill_tokens=self.max_prefill_tokens,
            encoder_step_share=self.encoder_step_share,
            max_waiting_steps=self.max_waiting_steps,
            stall_seconds=self.stall_seconds,
        )
