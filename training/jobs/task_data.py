"""Task data and evaluation shared by the adaptation jobs (`prompt`, `finetune`), so the two are
compared on exactly the same examples, batches and exact-match evaluation.

Batches follow the serving layout (`engine.cli`, `server/service.py`): a sentence pair is
``input | text_pair </s>`` — the end-of-sequence token closes the pair only — and ``pair_start``
records where the pair begins, so a prompt's infix goes where the server puts it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, model_validator

from engine.errors import ConfigError
from engine.tokenizer import Tokenizer, load_tokenizer
from engine.weights.loader import inspect_checkpoint
from engine.weights.presets import get_preset
from training.config import ModelSpec, Section
from training.data.example import Example
from training.data.readers import FileReader, ReaderConfig
from training.data.seq2seq import Seq2SeqCollator, collate_ids
from training.job import DataShard
from training.tasks import generate_task
from training.tasks.suite import TaskStream


class TaskSpec(Section):
    """The task to adapt to: a built-in task of `training.tasks` or JSONL files."""

    name: str | None = None
    """Built-in task (`num2zh`, `zh2num`, `add`, `same`): train on its `train` split."""
    train_file: Path | None = None
    """JSONL training examples (read forever, shuffled); instead of `name`."""
    eval_file: Path | None = None
    """JSONL evaluation examples (with `train_file`); the first `num_eval_examples` are used."""
    input_field: str = "input"
    target_field: str = "target"
    text_pair_field: str | None = None
    """JSONL field of the second segment of sentence-pair tasks (null: single inputs)."""
    eval_split: str = "validation"
    """Split of the built-in task to evaluate on (`validation`; `test` only for final numbers)."""
    num_eval_examples: int = Field(200, ge=1)
    max_input_length: int = Field(128, ge=2)
    """Encoder tokens kept per example, eos included (the prompt comes on top)."""
    max_target_length: int = Field(32, ge=2)
    max_new_tokens: int = Field(24, ge=1)
    """Greedy decoding budget of the evaluation."""
    eval_batch_size: int = Field(64, ge=1)
    tokenizer: Path | None = None
    """Directory holding the tokenizer; null uses `model.dir` (a preset model needs one here)."""

    @model_validator(mode="after")
    def _one_source(self) -> TaskSpec:
        if (self.name is None) == (self.train_file is None):
            raise ValueError("set exactly one of task.name (a built-in task) or task.train_file (JSONL)")
        return self


def tokenizer_dir(task: TaskSpec, model: ModelSpec) -> Path:
    """Where the job's tokenizer lives (raises ConfigError when neither place is set)."""
    found = task.tokenizer or model.dir
    if found is None:
        raise ConfigError("a preset model has no tokenizer; set task.tokenizer to a directory holding spiece.model")
    return found


def job_tokenizer(task: TaskSpec, model: ModelSpec) -> Tokenizer:
    return load_tokenizer(tokenizer_dir(task, model))


def collate_examples(collator: Seq2SeqCollator, examples: list[Example], *, decoder_start_id: int) -> dict[str, Any]:
    """Training tensors of `collate_ids` plus ``pair_start`` (B,): where each row's pair begins (its
    length when it has none)."""
    rows = []
    for example in examples:
        first, pair, targets = collator.encode_segments(example)
        rows.append((first, pair, targets))
    padded = collate_ids(
        [(a + b, t) for a, b, t in rows], pad_id=collator.tokenizer.pad_id, decoder_start_id=decoder_start_id
    )
    pair_start = torch.tensor([len(a) for a, _, _ in rows], dtype=torch.long)
    return {**padded.model_inputs(), "labels": padded.labels, "pair_start": pair_start}


class TaskBatches:
    """A `ResumableIterator` of training batches: an example stream, collated ``batch_size`` at a time."""

    def __init__(self, examples: Any, collator: Seq2SeqCollator, *, batch_size: int, decoder_start_id: int) -> None:
        self.examples, self.collator = examples, collator
        self.batch_size, self.decoder_start_id = batch_size, decoder_start_id

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        chunk = [next(self.examples) for _ in range(self.batch_size)]
        return collate_examples(self.collator, chunk, decoder_start_id=self.decoder_start_id)

    def state_dict(self) -> dict[str, Any]:
        return {"examples": self.examples.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.examples.load_state_dict(state["examples"])


def _reader(task: TaskSpec, path: Path, *, shard: DataShard | None, epochs: int | None) -> FileReader:
    return FileReader(
        ReaderConfig(
            paths=(str(path),),
            format="jsonl",
            input_field=task.input_field,
            target_field=task.target_field,
            text_pair_field=task.text_pair_field,
            rank=shard.rank if shard else 0,
            world_size=shard.world_size if shard else 1,
            shuffle_buffer_size=1024 if shard else 0,
            seed=shard.seed if shard else 0,
            num_epochs=epochs,
        )
    )


def model_decoder_start(model: ModelSpec) -> int:
    """The model's decoder start id: labels are shifted behind the token generation starts with."""
    if model.dir is not None:
        return inspect_checkpoint(model.dir).config.decoder_start_token_id
    assert model.preset is not None  # ModelSpec guarantees exactly one of dir / preset
    return get_preset(model.preset).config.decoder_start_token_id


def task_batches(task: TaskSpec, model: ModelSpec, shard: DataShard) -> TaskBatches:
    """This rank's training batches of `task`."""
    tokenizer = job_tokenizer(task, model)
    collator = Seq2SeqCollator(
        tokenizer=tokenizer, max_input_length=task.max_input_length, max_target_length=task.max_target_length
    )
    examples: Any
    if task.name is not None:
        # Each rank its own seeded stream: disjoint in practice, and resumable from a counter.
        examples = TaskStream(task.name, "train", seed=shard.seed * 1009 + shard.rank)
    else:
        assert task.train_file is not None
        examples = _reader(task, task.train_file, shard=shard, epochs=None)
    start = model_decoder_start(model)
    return TaskBatches(examples, collator, batch_size=shard.micro_batch_size, decoder_start_id=start)


def eval_examples(task: TaskSpec, *, split: str | None = None, seed: int = 0) -> list[Example]:
    """The evaluation set: `num_eval_examples` of the built-in task's split, or of `eval_file`."""
    if task.name is not None:
        return generate_task(task.name, split or task.eval_split, num_examples=task.num_eval_examples, seed=seed)
    if task.eval_file is None:
        raise ConfigError("task.train_file needs task.eval_file for evaluation (or set eval_every: 0)")
    reader = _reader(task, task.eval_file, shard=None, epochs=1)
    return [example for _, example in zip(range(task.num_eval_examples), reader, strict=False)]
