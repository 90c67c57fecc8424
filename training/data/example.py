"""The record every reader, task generator and collator exchanges, and the resumable-stream protocol.

One record type serves both objectives: a pretraining document is ``Example(input=text)``; a task
example carries a ``target`` (and, for sentence-pair tasks such as LCQMC, a ``text_pair``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

__all__ = ["Example", "ResumableIterator"]

T_co = TypeVar("T_co", covariant=True)


@dataclass(frozen=True, kw_only=True)
class Example:
    """One text example."""

    input: str
    """The document (pretraining) or the source text (tasks)."""
    target: str | None = None
    """What the decoder should produce; None for raw pretraining text."""
    text_pair: str | None = None
    """Second sentence of a sentence-pair task; None for single-input tasks."""
    task: str = ""
    """Name of the task it came from (per-task scoring); empty for files."""

    def to_dict(self) -> dict[str, str]:
        """JSON-friendly form without the empty fields (used in stream states and JSONL dumps)."""
        data = {"input": self.input}
        for key, value in (("target", self.target), ("text_pair", self.text_pair)):
            if value is not None:
                data[key] = value
        if self.task:
            data["task"] = self.task
        return data

    @classmethod
    def from_dict(cls, data: dict[str, str]) -> Example:
        """Inverse of `to_dict`."""
        return cls(
            input=data["input"],
            target=data.get("target"),
            text_pair=data.get("text_pair"),
            task=data.get("task", ""),
        )


@runtime_checkable
class ResumableIterator(Protocol[T_co]):
    """An iterator whose position can be saved and restored exactly.

    After ``b.load_state_dict(a.state_dict())`` (``b`` built with the same arguments as ``a``), ``b``
    yields exactly what ``a`` would have yielded next. States are plain JSON-serialisable values
    (dicts, lists, str, int, float, bool, None), so they fit in any checkpoint format.
    """

    def __iter__(self) -> Iterator[T_co]: ...

    def __next__(self) -> T_co: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
