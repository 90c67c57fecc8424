"""Resumable batch streams for span-corruption jobs (pretraining, and KI on the same objective).

`SpanCorruptionBatches` pads `SpanCorruptionStream` pairs to the fixed encoder / decoder lengths
(T5 packs to 512 / 114; CPM-2 uses 512 / 256), so every step has the same shapes; its state is the
stream's, taken between batches, which is what makes resume exact. `RankSlice` shards a source that
cannot shard itself (the generated documents) by striding.
"""

from __future__ import annotations

from typing import Any

from training.data.example import Example, ResumableIterator
from training.data.seq2seq import collate_ids
from training.data.span_corruption import SpanCorruptionStream
from training.trainer import Batch

__all__ = ["RankSlice", "SpanCorruptionBatches", "fixed_shape_batch"]


class RankSlice:
    """Items `start, start + step, …` of a resumable stream: one rank's share of an unsharded source."""

    def __init__(self, inner: ResumableIterator[Example], *, start: int, step: int) -> None:
        self.inner, self.start, self.step = inner, start, step
        self._started = False

    def __iter__(self) -> RankSlice:
        return self

    def __next__(self) -> Example:
        for _ in range(self.start if not self._started else self.step - 1):
            next(self.inner)
        self._started = True
        return next(self.inner)

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "started": self._started}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state["inner"])
        self._started = state["started"]


def fixed_shape_batch(
    pairs: list[tuple[list[int], list[int]]], stream: SpanCorruptionStream, *, decoder_start_id: int
) -> Batch:
    """`pairs` padded to the stream's encoder / decoder lengths: the same shapes at every step."""
    span = stream.config
    batch = collate_ids(
        pairs,
        pad_id=stream.tokenizer.pad_id,
        decoder_start_id=decoder_start_id,
        input_length=span.encoder_length,
        target_length=span.decoder_length,
    )
    return {**batch.model_inputs(), "labels": batch.labels}


class SpanCorruptionBatches:
    """Fixed-shape micro-batches of span-corrupted chunks; resumable through the stream's state."""

    def __init__(self, stream: SpanCorruptionStream, *, batch_size: int, decoder_start_id: int) -> None:
        self.stream = stream
        self.batch_size = batch_size
        self.decoder_start_id = decoder_start_id

    def __iter__(self) -> SpanCorruptionBatches:
        return self

    def __next__(self) -> Batch:
        # A finite corpus ends with StopIteration here, which the trainer reports as "data ran out".
        pairs = [next(self.stream) for _ in range(self.batch_size)]
        return fixed_shape_batch(pairs, self.stream, decoder_start_id=self.decoder_start_id)

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)
