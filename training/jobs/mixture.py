"""Multi-task pretraining: built-in task examples mixed into the span-corruption batches.

T5 (Raffel et al. 2020, §3.5.2) and PPT (Gu et al. 2022) pretrain on a mixture of the unsupervised
objective and supervised tasks; a soft prompt tuned afterwards then recalls a skill the frozen model
already has. Each batch holds `fraction` task rows (rounded) and the rest span-corrupted chunks,
all padded to the span shapes, so steps keep one shape. Which task each row draws depends only on
``(seed, rank, batch number)``, and the streams resume from counters: resume stays exact.
"""

from __future__ import annotations

import random
from typing import Any

from pydantic import Field, field_validator

from training.config import Section
from training.data.seq2seq import Seq2SeqCollator
from training.data.span_corruption import SpanCorruptionStream
from training.jobs.span_batches import fixed_shape_batch
from training.tasks import TASKS, TaskStream
from training.tasks.instructions import with_instruction
from training.trainer import Batch

__all__ = ["MixedBatches", "MixtureSpec"]


class MixtureSpec(Section):
    """Built-in task examples mixed into pretraining (empty `tasks`: span corruption only)."""

    tasks: dict[str, float] = Field(default_factory=dict)
    """Built-in task → sampling weight, e.g. `{num2zh: 1, zh2num: 1, add: 2, same: 1}`."""
    fraction: float = Field(0.5, ge=0, le=1)
    """Share of each batch's rows that are task examples; the rest are span-corrupted text."""
    instructions: bool = True
    """Write each example with its task's words around it (`training.tasks.instructions`), so a
    prompt tuned later on the bare input can start from them; false: the bare input, as served."""

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(tasks) - set(TASKS))
        if unknown:
            raise ValueError(f"unknown task(s) {unknown} in mixture.tasks; built-in tasks are {sorted(TASKS)}")
        if any(weight <= 0 for weight in tasks.values()):
            raise ValueError(f"mixture.tasks weights must be > 0, got {tasks}")
        return tasks

    @property
    def active(self) -> bool:
        return bool(self.tasks) and self.fraction > 0


class MixedBatches:
    """Fixed-shape micro-batches: `round(fraction · batch_size)` task rows, the rest span corruption."""

    def __init__(
        self,
        span: SpanCorruptionStream,
        spec: MixtureSpec,
        *,
        batch_size: int,
        decoder_start_id: int,
        seed: int,
        rank: int,
    ) -> None:
        self.span, self.spec = span, spec
        self.batch_size, self.decoder_start_id = batch_size, decoder_start_id
        self.seed, self.rank = seed, rank
        # Each rank its own task streams: disjoint draws in practice, resumable from counters.
        self.streams = {name: TaskStream(name, "train", seed=seed * 1009 + rank) for name in sorted(spec.tasks)}
        self.weights = [spec.tasks[name] for name in self.streams]
        shapes = span.config
        self.collator = Seq2SeqCollator(
            tokenizer=span.tokenizer, max_input_length=shapes.encoder_length, max_target_length=shapes.decoder_length
        )
        self.num_task_rows = round(spec.fraction * batch_size)
        self.batches = 0

    def __iter__(self) -> MixedBatches:
        return self

    def __next__(self) -> Batch:
        rng = random.Random(f"mixture:{self.seed}:{self.rank}:{self.batches}")
        pairs = []
        for name in rng.choices(list(self.streams), weights=self.weights, k=self.num_task_rows):
            example = next(self.streams[name])
            pairs.append(self.collator.encode(with_instruction(example) if self.spec.instructions else example))
        pairs.extend(next(self.span) for _ in range(self.batch_size - self.num_task_rows))
        self.batches += 1
        return fixed_shape_batch(pairs, self.span, decoder_start_id=self.decoder_start_id)

    def state_dict(self) -> dict[str, Any]:
        return {
            "span": self.span.state_dict(),
            "tasks": {name: stream.state_dict() for name, stream in self.streams.items()},
            "batches": self.batches,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.span.load_state_dict(state["span"])
        for name, stream in self.streams.items():
            stream.load_state_dict(state["tasks"][name])
        self.batches = state["batches"]
