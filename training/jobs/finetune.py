"""`cpm2 train finetune`: full fine-tuning on a task, the baseline prompt tuning is measured against.

Every parameter trains, on exactly the batches and exact-match evaluation of `cpm2 train prompt`
(`training.jobs.task_data`), so the two differ only in what is trainable. CPM-2 fine-tuned at
2e-6 to 5e-6 for an 11B model; a small model wants far larger rates (the example config uses 1e-3).
At the end the final checkpoint is exported as a native model directory (`output_dir/model`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from engine.model import Seq2SeqLM
from training.config import JobConfig
from training.evaluate import task_eval_fn
from training.job import DataShard, build_model, run_job
from training.jobs.command import add_job_command
from training.jobs.export import export_trained
from training.jobs.task_data import TaskSpec, eval_examples, job_tokenizer, task_batches, tokenizer_dir
from training.losses import seq2seq_lm_loss
from training.trainer import ResumableIterator

__all__ = ["FinetuneJobConfig", "add_finetune_command", "run_finetune_job"]

PRODUCER = "cpm2 train finetune"


class FinetuneJobConfig(JobConfig):
    """`cpm2 train finetune` config: the job's sections plus `task` and where the model goes."""

    task: TaskSpec
    export_dir: Path | None = None
    """Where the fine-tuned model directory goes; null: `output_dir/model`."""


def _model(config: FinetuneJobConfig, device: torch.device) -> Seq2SeqLM:
    return build_model(config.model, device)


def _data(config: FinetuneJobConfig, shard: DataShard) -> ResumableIterator:
    return task_batches(config.task, config.model, shard)


def run_finetune_job(config: FinetuneJobConfig, *, device: str | None = None) -> Path:
    """Fine-tune every parameter of `config.model` on `config.task`; returns the exported model dir."""
    eval_fn = None
    if config.eval_every:
        eval_fn = task_eval_fn(
            job_tokenizer(config.task, config.model),
            eval_examples(config.task),
            batch_size=config.task.eval_batch_size,
            max_new_tokens=config.task.max_new_tokens,
        )
    # The batches carry `pair_start` for prompt placement; without a prompt the model reads
    # input_ids as they are, so the plain seq2seq loss applies.
    trainer = run_job(
        config, _model, seq2seq_lm_loss, _data, trainable=lambda name: True, eval_fn=eval_fn, device=device
    )
    return export_trained(
        trainer,
        config.export_dir or config.output_dir / "model",
        lambda: build_model(config.model, torch.device("cpu")),
        tokenizer_dir=tokenizer_dir(config.task, config.model),
        producer=PRODUCER,
        extra={"task": config.task.name or str(config.task.train_file)},
    )


def add_finetune_command(commands: Any) -> None:
    """``cpm2 train finetune``."""
    add_job_command(
        commands,
        "finetune",
        help="full fine-tuning on a task (the prompt-tuning baseline); writes a model directory",
        description="Fine-tune every parameter on a task; see training/configs/finetune.yaml.",
        config_cls=FinetuneJobConfig,
        run=run_finetune_job,
    )
