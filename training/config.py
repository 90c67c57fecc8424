"""Typed, validated training job configs, read from a YAML, JSON or TOML file.

Every section forbids unknown keys, so a typo (`lerning_rate`) fails at load time with the field's
dotted path instead of silently training with a default. A job that needs its own settings (KI's
teacher and temperature, prompt tuning's prompt length) subclasses `JobConfig` and adds a typed
section; `load_job_config(path, MyJobConfig)` validates it the same way.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal, TypeVar, overload

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from engine.errors import ConfigError


class Section(BaseModel):
    """Base of every config section: unknown keys are errors and values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(Section):
    """The model to train: a model directory (native or Hugging Face) or a named preset (random init)."""

    dir: Path | None = None
    """Directory `engine.weights.loader.load_model` can read."""
    preset: str | None = None
    """Preset of `engine.weights.presets` initialised randomly (e.g. `tiny`)."""
    init_seed: int = 0
    """Seed of the random initialisation of a preset (ignored for `dir`)."""
    dropout_rate: float | None = Field(None, ge=0, lt=1)
    """Training dropout, overriding the model config's (T5 pre-training used 0.1); null keeps it."""

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelSpec:
        if (self.dir is None) == (self.preset is None):
            raise ValueError("set exactly one of model.dir (a model directory) or model.preset (a preset name)")
        return self


class OptimizerSpec(Section):
    """Optimizer and gradient clipping."""

    name: Literal["adamw", "adafactor"] = "adamw"
    """`adamw` (torch.optim.AdamW) or `adafactor` (torch.optim.Adafactor; memory-light, what T5 used)."""
    lr: float = Field(1e-4, gt=0)
    """Peak learning rate (the schedule scales it)."""
    weight_decay: float = Field(0.0, ge=0)
    """Decoupled weight decay (prompt tuning in CPM-2 used 0.01)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas (ignored by Adafactor)."""
    eps: float = Field(1e-8, gt=0)
    """AdamW epsilon (ignored by Adafactor)."""
    grad_clip: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm to this value; `null` disables clipping."""

    @model_validator(mode="after")
    def _betas_in_range(self) -> OptimizerSpec:
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optimizer.betas must lie in [0, 1), got {list(self.betas)}")
        return self


class ScheduleSpec(Section):
    """Learning-rate schedule, as a factor of `optimizer.lr` per optimizer step."""

    name: Literal["constant", "linear", "inverse_sqrt"] = "constant"
    """`constant` (prompt tuning, SEED.md), `linear` decay to `min_lr_ratio` at the last step, or
    `inverse_sqrt` (T5 pre-training: lr · sqrt(warmup / step) after warm-up)."""
    warmup_steps: int = Field(0, ge=0)
    """Steps of linear warm-up from 0 to the peak learning rate."""
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    """Final learning rate of `linear`, as a fraction of the peak."""


class JobConfig(Section):
    """Everything the trainer core needs; jobs subclass it to add their own sections."""

    model: ModelSpec
    optimizer: OptimizerSpec = OptimizerSpec()
    schedule: ScheduleSpec = ScheduleSpec()
    steps: int = Field(gt=0)
    """Optimizer steps to train for (in total, counting steps done before a resume)."""
    batch_size: int = Field(gt=0)
    """Global sequences per optimizer step, over all ranks and accumulation micro-batches, so that
    a run means the same thing at any world size."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches accumulated per optimizer step; each rank's micro-batch holds
    `batch_size / (grad_accum · world_size)` sequences."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """`bfloat16` runs forward and loss under bf16 autocast; weights and optimizer stay float32."""
    seed: int = 0
    """Seeds python, numpy and torch (rank r uses seed + r, so dropout masks differ across ranks)."""
    log_every: int = Field(10, ge=1)
    """Steps between metrics-log lines."""
    checkpoint_every: int = Field(0, ge=0)
    """Steps between checkpoints (0: only at the end)."""
    eval_every: int = Field(0, ge=0)
    """Steps between calls of the eval hook (0: never)."""
    keep_checkpoints: int = Field(2, ge=1)
    """Checkpoints kept on disk; older ones are deleted after a newer one is complete."""
    output_dir: Path
    """Where `metrics.jsonl` and `checkpoints/step_*` go."""
    resume: Literal["auto", "never"] | Path = "auto"
    """`auto`: continue from the newest checkpoint in `output_dir` if there is one; `never`: start
    fresh (existing checkpoints are an error); a path: that checkpoint directory."""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """Under torchrun: replicate the model (`ddp`) or shard parameters and optimizer state (`fsdp`)."""
    progress: bool = True
    """Show a progress bar with loss and tokens/s on rank 0."""

    def micro_batch_size(self, world_size: int) -> int:
        """Sequences per forward pass on one rank; raises ConfigError when the batch does not split evenly."""
        parts = self.grad_accum * world_size
        if self.batch_size % parts:
            raise ConfigError(
                f"batch_size {self.batch_size} does not split into grad_accum {self.grad_accum} x "
                f"world size {world_size} equal micro-batches; use a multiple of {parts}"
            )
        return self.batch_size // parts


C = TypeVar("C", bound=JobConfig)
S = TypeVar("S", bound=Section)


def read_config_file(path: Path) -> dict[str, Any]:
    """The mapping in a `.yaml`/`.yml`, `.json` or `.toml` file."""
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        data = yaml.safe_load(text)
    elif suffix == ".json":
        data = json.loads(text)
    elif suffix == ".toml":
        data = tomllib.loads(text)
    else:
        raise ConfigError(f"{path}: unknown config format {suffix!r}; use .yaml, .json or .toml")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def parse_job_config(data: dict[str, Any], config_cls: type[S], *, source: str = "config") -> S:
    """Validate `data` as `config_cls`; errors name each bad field by its dotted path."""
    try:
        return config_cls.model_validate(data)
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(p) for p in err['loc']) or '<top>'}: {err['msg']}" for err in exc.errors()]
        raise ConfigError(f"{source}: invalid training config\n" + "\n".join(lines)) from None


@overload
def load_job_config(path: Path | str) -> JobConfig: ...
@overload
def load_job_config(path: Path | str, config_cls: type[C]) -> C: ...
def load_job_config(path: Path | str, config_cls: type[JobConfig] = JobConfig) -> JobConfig:
    """Read and validate a job config file as `config_cls` (a job's JobConfig subclass)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"training config {path} does not exist")
    return parse_job_config(read_config_file(path), config_cls, source=str(path))
