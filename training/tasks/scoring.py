"""Exact-match scoring of generated answers, per task.

Answers are compared after whitespace normalisation: runs collapse to one space, the ends are
stripped, and spaces next to a CJK character are dropped, because Chinese is written without spaces
and tokenizers (CPM-2's jieba segmentation, SentencePiece word-start marks) put them back between
pieces (``四千 零九十六`` is the right answer).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from engine.errors import InputError
from training.data.example import Example

__all__ = ["TaskScore", "exact_match", "normalize_answer", "score_predictions"]

_CJK = r"\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uff00-\uffef"
_SPACE_NEAR_CJK = re.compile(rf"(?<=[{_CJK}]) (?=\S)|(?<=\S) (?=[{_CJK}])")


def normalize_answer(text: str) -> str:
    """``text`` with whitespace collapsed, stripped, and removed next to CJK characters."""
    return _SPACE_NEAR_CJK.sub("", " ".join(text.split()))


def exact_match(prediction: str, target: str) -> bool:
    """Whether ``prediction`` equals ``target`` after `normalize_answer`."""
    return normalize_answer(prediction) == normalize_answer(target)


@dataclass(frozen=True)
class TaskScore:
    """Exact-match counts of one task."""

    task: str
    num_correct: int
    num_examples: int

    @property
    def accuracy(self) -> float:
        """Fraction answered exactly (0.0 for no examples)."""
        return self.num_correct / self.num_examples if self.num_examples else 0.0


def score_predictions(examples: Sequence[Example], predictions: Sequence[str]) -> dict[str, TaskScore]:
    """Per-task exact-match scores of ``predictions[i]`` against ``examples[i].target``, sorted by task.

    Raises:
        InputError: If the lengths differ or an example has no target.
    """
    if len(examples) != len(predictions):
        raise InputError(f"{len(predictions)} predictions for {len(examples)} examples; pass one per example")
    counts: dict[str, list[int]] = {}
    for example, prediction in zip(examples, predictions, strict=True):
        if example.target is None:
            raise InputError(f"example {example.input!r} has no target to score against")
        correct, total = counts.setdefault(example.task, [0, 0])
        counts[example.task] = [correct + exact_match(prediction, example.target), total + 1]
    return {task: TaskScore(task, *counts[task]) for task in sorted(counts)}
