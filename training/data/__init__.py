"""Training data: streaming file readers, span corruption (pretraining) and seq2seq collation."""

from training.data.example import Example, ResumableIterator
from training.data.readers import FileReader, ReaderConfig, expand_paths
from training.data.seq2seq import (
    IGNORE_INDEX,
    Seq2SeqBatch,
    Seq2SeqCollator,
    TokenBudgetBatcher,
    collate_ids,
    shift_right,
)
from training.data.span_corruption import (
    SpanCorruptionConfig,
    SpanCorruptionStream,
    corrupt_spans,
    random_spans_noise_mask,
    raw_length_for,
)

__all__ = [
    "IGNORE_INDEX",
    "Example",
    "FileReader",
    "ReaderConfig",
    "ResumableIterator",
    "Seq2SeqBatch",
    "Seq2SeqCollator",
    "SpanCorruptionConfig",
    "SpanCorruptionStream",
    "TokenBudgetBatcher",
    "collate_ids",
    "corrupt_spans",
    "expand_paths",
    "random_spans_noise_mask",
    "raw_length_for",
    "shift_right",
]
