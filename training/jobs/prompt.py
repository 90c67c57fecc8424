"""`cpm2 train prompt`: prompt tuning (Lester et al. 2021; CPM-2 §prompt tuning).

The model is frozen; only the soft prompt's prefix / infix / suffix rows train, with a constant
learning rate, no warm-up and weight decay 0.01 (CPM-2's recipe, SEED.md). At the end the job
writes ``prompt.safetensors`` in the server's soft-prompt format (`engine.prompts`) and, for a
prefix-only prompt, a PEFT prompt-tuning adapter in ``peft/`` (`engine.peft`; PEFT has no infix or
suffix). Both are taken from the final checkpoint, so they are what a resumed run would give too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, model_validator
from safetensors.torch import load_file

from engine.errors import CheckpointError, ConfigError
from engine.model.moe import MoEFeedForward
from engine.peft import peft_files
from engine.prompts import SoftPrompt
from training.checkpoint import MODEL_FILE, latest_checkpoint
from training.config import JobConfig, OptimizerSpec, Section
from training.evaluate import task_eval_fn
from training.job import DataShard, build_model, run_job
from training.jobs.command import add_job_command
from training.jobs.task_data import TaskSpec, eval_examples, job_tokenizer, task_batches
from training.soft_prompt import PARTS, PromptedSeq2SeqLM, TrainableSoftPrompt, prompted_lm_loss
from training.tasks.instructions import instruction_for
from training.trainer import ResumableIterator, Trainer

PROMPT_FILE = "prompt.safetensors"
PEFT_DIR = "peft"
_PARAM_PREFIX = "prompt.rows."

__all__ = ["PromptJobConfig", "PromptSpec", "add_prompt_command", "run_prompt_job", "write_prompt_files"]


class PromptSpec(Section):
    """The soft prompt: its length at each place and its initialisation."""

    prefix_length: int = Field(20, ge=0)
    """Virtual tokens before the input ("front")."""
    infix_length: int = Field(0, ge=0)
    """Virtual tokens between the input and the text pair ("middle"; for sentence-pair tasks)."""
    suffix_length: int = Field(0, ge=0)
    """Virtual tokens after the last segment ("back")."""
    init_text: str | None = None
    """Initialise every part from the embeddings of this text's tokens (cycled to the length); null
    samples rows of the vocabulary's first `init_vocab_size` ids (Lester et al.'s common tokens)."""
    init_from_instruction: bool = False
    """Initialise each part from the built-in task's instruction words at that place
    (`training.tasks.instructions`: the words multi-task pretraining wrapped the task in), cycled to
    the length; parts without words sample the vocabulary. Needs `task.name`; excludes `init_text`."""
    init_vocab_size: int = Field(5000, ge=4)
    init_seed: int = 0

    @property
    def lengths(self) -> dict[str, int]:
        return {"prefix": self.prefix_length, "infix": self.infix_length, "suffix": self.suffix_length}

    @model_validator(mode="after")
    def _some_tokens(self) -> PromptSpec:
        if not any(self.lengths.values()):
            raise ValueError("the prompt has no virtual token; set prompt.prefix_length (or infix/suffix) > 0")
        if self.init_from_instruction and self.init_text is not None:
            raise ValueError("set at most one of prompt.init_text or prompt.init_from_instruction")
        return self


class PromptJobConfig(JobConfig):
    """`cpm2 train prompt` config: the job's sections plus `task` and `prompt`."""

    task: TaskSpec
    prompt: PromptSpec = PromptSpec()
    optimizer: OptimizerSpec = OptimizerSpec(lr=0.3, weight_decay=0.01)

    @model_validator(mode="after")
    def _constant_lr(self) -> PromptJobConfig:
        # CPM-2 tuned prompts at a constant rate; a warm-up or decay silently changes the recipe.
        if self.schedule.name != "constant" or self.schedule.warmup_steps:
            raise ValueError("prompt tuning uses a constant learning rate: set schedule.name constant, warmup_steps 0")
        return self


@dataclass(frozen=True)
class PromptJobResult:
    trainer: Trainer
    prompt_path: Path
    peft_dir: Path | None
    """None when the prompt is not prefix-only (PEFT has no place for an infix or suffix)."""


def build_prompted_model(config: PromptJobConfig, device: torch.device) -> PromptedSeq2SeqLM:
    """The frozen model of `config.model` with a prompt initialised from its token embeddings."""
    model = build_model(config.model, device).requires_grad_(False)
    for layer in model.modules():
        if isinstance(layer, MoEFeedForward):
            # The experts are frozen, so a training-time balancing assignment has nothing to balance:
            # route as the server will, or the prompt learns to steer a routing it never gets.
            layer.train_routing = "inference"
    spec = config.prompt
    tokenizer = job_tokenizer(config.task, config.model)
    init_ids = None
    if spec.init_text is not None:
        ids = tokenizer.encode(spec.init_text, add_eos=False)
        init_ids = dict.fromkeys(PARTS, ids)
    elif spec.init_from_instruction:
        if config.task.name is None:
            raise ConfigError("prompt.init_from_instruction needs a built-in task (task.name); use init_text instead")
        words = instruction_for(config.task.name).parts()
        init_ids = {part: tokenizer.encode(text, add_eos=False) for part, text in words.items()}
    # Ids below 3 are pad / eos / unk; sentinels sit at the top of the vocabulary.
    high = min(spec.init_vocab_size, tokenizer.vocab_size - tokenizer.num_sentinels)
    prompt = TrainableSoftPrompt.from_embeddings(
        model.embed, spec.lengths, init_ids=init_ids, sample_range=(3, high), seed=spec.init_seed
    ).to(device)
    return PromptedSeq2SeqLM(model, prompt)


def prompt_of(module: torch.nn.Module) -> SoftPrompt:
    """The serving form of the trainable prompt inside `module` (DDP-wrapped or not)."""
    for sub in module.modules():
        if isinstance(sub, TrainableSoftPrompt):
            return sub.to_soft_prompt()
    raise CheckpointError(f"{type(module).__name__} holds no TrainableSoftPrompt")


def prompt_data(config: PromptJobConfig, shard: DataShard) -> ResumableIterator:
    return task_batches(config.task, config.model, shard)


def read_final_prompt(output_dir: Path, *, metadata: dict[str, str]) -> SoftPrompt:
    """The prompt of the newest checkpoint under `output_dir` (full tensors at any world size)."""
    latest = latest_checkpoint(output_dir / "checkpoints")
    if latest is None:
        raise CheckpointError(f"no checkpoint under {output_dir / 'checkpoints'}; did training run?")
    tensors = load_file(str(latest / MODEL_FILE))
    parts = {k.removeprefix(_PARAM_PREFIX): t for k, t in tensors.items() if k.startswith(_PARAM_PREFIX)}
    if not parts:
        raise CheckpointError(f"{latest} holds no prompt tensors; was it written by `cpm2 train prompt`?")
    return SoftPrompt(**parts, metadata=metadata)


def write_prompt_files(prompt: SoftPrompt, output_dir: Path) -> tuple[Path, Path | None]:
    """Write the server's prompt file and, when the prompt is prefix-only, a PEFT adapter directory."""
    path = output_dir / PROMPT_FILE
    path.write_bytes(prompt.to_bytes())
    if set(prompt.tensors()) != {"prefix"}:
        return path, None
    peft_dir = output_dir / PEFT_DIR
    peft_dir.mkdir(exist_ok=True)
    for name, data in peft_files(prompt).items():
        (peft_dir / name).write_bytes(data)
    return path, peft_dir


def run_prompt_job(config: PromptJobConfig, *, device: str | None = None) -> PromptJobResult:
    """Train the prompt of `config` and write its files (rank 0)."""
    eval_fn = None
    if config.eval_every:
        tokenizer = job_tokenizer(config.task, config.model)
        eval_fn = task_eval_fn(
            tokenizer,
            eval_examples(config.task),
            prompt_provider=prompt_of,
            batch_size=config.task.eval_batch_size,
            max_new_tokens=config.task.max_new_tokens,
        )
    trainer = run_job(
        config,
        build_prompted_model,
        prompted_lm_loss,
        prompt_data,
        trainable=lambda name: name.startswith("prompt."),
        eval_fn=eval_fn,
        device=device,
    )
    metadata = {
        "producer": "cpm2 train prompt",
        "task": config.task.name or str(config.task.train_file),
        "steps": str(config.steps),
        "base_model": str(config.model.dir or f"preset:{config.model.preset}"),
    }
    prompt = read_final_prompt(config.output_dir, metadata=metadata)
    path, peft_dir = config.output_dir / PROMPT_FILE, None
    if trainer.ctx.is_main:
        path, peft_dir = write_prompt_files(prompt, config.output_dir)
    return PromptJobResult(trainer=trainer, prompt_path=path, peft_dir=peft_dir)


def _wrote(result: PromptJobResult) -> str:
    peft = f", PEFT adapter {result.peft_dir}" if result.peft_dir else " (no PEFT copy: PEFT has only prefix prompts)"
    return f"{result.prompt_path}{peft}"


def add_prompt_command(commands: Any) -> None:
    """``cpm2 train prompt``."""
    add_job_command(
        commands,
        "prompt",
        help="prompt tuning of a frozen model; writes a server soft-prompt file (and a PEFT adapter)",
        description="Train a soft prompt (prefix / infix / suffix); see training/configs/prompt.yaml.",
        config_cls=PromptJobConfig,
        run=run_prompt_job,
        wrote=_wrote,
    )
