"""Streaming, sharded, shuffled and exactly resumable readers of plain-text and JSONL corpora.

Files are read line by line (gzip included) and never loaded whole. Every record (a line, or a
blank-line separated paragraph) gets a global index; rank ``r`` of ``world_size`` keeps the records
with ``index % world_size == r``, so each rank sees a disjoint, deterministic slice whatever the
number of files. The position is a byte offset into the current file, so resuming seeks instead of
re-reading (gzip re-inflates up to the offset, but does not parse it). Shuffling uses a seeded buffer
like ``tf.data.Dataset.shuffle``; the buffer and the generator state are part of `state_dict`.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import ConfigError, InputError
from training.data.example import Example

__all__ = ["FileReader", "ReaderConfig", "expand_paths"]

_FORMATS = ("auto", "text", "jsonl")
_DOCUMENT_MODES = ("line", "paragraph")


@dataclass(frozen=True, kw_only=True)
class ReaderConfig:
    """What to read and how to split it between ranks."""

    paths: tuple[str, ...]
    """Files or glob patterns (``data/*.jsonl.gz``, ``**`` allowed); each pattern's matches are sorted."""
    format: str = "auto"
    """``text``, ``jsonl``, or ``auto``: jsonl for ``.jsonl``/``.json`` (optionally ``.gz``), else text."""
    documents: str = "line"
    """Plain text only: ``line`` (one document per line) or ``paragraph`` (blank-line separated)."""
    input_field: str = "text"
    """JSONL field holding the document, or a task's input."""
    target_field: str | None = None
    """JSONL field holding a task's target (None: documents without targets)."""
    text_pair_field: str | None = None
    """JSONL field holding the second sentence of a sentence-pair task."""
    rank: int = 0
    """This process's shard, in ``[0, world_size)``."""
    world_size: int = 1
    """Number of shards (data-parallel processes)."""
    shuffle_buffer_size: int = 0
    """Examples held for shuffling; 0 keeps file order. Memory grows with it."""
    seed: int = 0
    """Seed of the shuffle buffer."""
    num_epochs: int | None = 1
    """Passes over the files; None repeats forever (pretraining)."""

    def __post_init__(self) -> None:
        if not self.paths:
            raise ConfigError("paths is empty; pass at least one file or glob pattern")
        if self.format not in _FORMATS:
            raise ConfigError(f"format must be one of {_FORMATS}, got {self.format!r}")
        if self.documents not in _DOCUMENT_MODES:
            raise ConfigError(f"documents must be one of {_DOCUMENT_MODES}, got {self.documents!r}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ConfigError(f"need 0 <= rank < world_size, got rank={self.rank} world_size={self.world_size}")
        if self.shuffle_buffer_size < 0:
            raise ConfigError(f"shuffle_buffer_size must be >= 0, got {self.shuffle_buffer_size}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ConfigError(f"num_epochs must be >= 1 or None (forever), got {self.num_epochs}")


def expand_paths(patterns: tuple[str, ...] | list[str]) -> list[Path]:
    """Files named by ``patterns`` in order, globs expanded and sorted, duplicates dropped.

    Raises:
        ConfigError: If a pattern matches no file.
    """
    files: list[Path] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(Path(match) for match in glob.glob(pattern, recursive=True) if Path(match).is_file())
        else:
            matches = [Path(pattern)] if Path(pattern).is_file() else []
        if not matches:
            raise ConfigError(f"no file matches {pattern!r}; check the path (globs such as data/*.jsonl work)")
        files += [path for path in matches if path not in files]
    return files


def _is_jsonl(path: Path, fmt: str) -> bool:
    if fmt != "auto":
        return fmt == "jsonl"
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return name.endswith((".jsonl", ".json"))


class FileReader:
    """Iterates `Example` records of the files in a `ReaderConfig`; a `ResumableIterator`."""

    def __init__(self, config: ReaderConfig) -> None:
        """Resolve the files now (missing ones fail here); nothing is opened until the first `next`."""
        self.config = config
        self.files = expand_paths(config.paths)
        self._handle: gzip.GzipFile | io.BufferedReader | None = None
        self._rng = random.Random(config.seed)
        self._buffer: list[Example] = []
        # Position of the next record: epoch, file, byte offset, global record index (for sharding).
        self._epoch = 0
        self._file_index = 0
        self._offset = 0
        self._line_number = 0
        self._record_index = 0
        self._num_kept_in_epoch = 0
        self._is_source_done = False

    def __iter__(self) -> FileReader:
        return self

    def __next__(self) -> Example:
        if self.config.shuffle_buffer_size == 0:
            example = self._next_kept()
            if example is None:
                raise StopIteration
            return example
        while not self._is_source_done and len(self._buffer) < self.config.shuffle_buffer_size:
            example = self._next_kept()
            if example is None:
                self._is_source_done = True
            else:
                self._buffer.append(example)
        if not self._buffer:
            raise StopIteration
        # Swap the pick with the last slot so removal is O(1); the order stays a function of the seed.
        pick = self._rng.randrange(len(self._buffer))
        self._buffer[pick], self._buffer[-1] = self._buffer[-1], self._buffer[pick]
        return self._buffer.pop()

    def close(self) -> None:
        """Close the open file, if any (reading again reopens it at the saved offset)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def state_dict(self) -> dict[str, Any]:
        """The exact position, shuffle buffer and generator state; JSON-serialisable."""
        version, internal, gauss = self._rng.getstate()
        return {
            "files": [str(path) for path in self.files],
            "shard": [self.config.rank, self.config.world_size],
            "epoch": self._epoch,
            "file_index": self._file_index,
            "offset": self._offset,
            "line_number": self._line_number,
            "record_index": self._record_index,
            "num_kept_in_epoch": self._num_kept_in_epoch,
            "is_source_done": self._is_source_done,
            "buffer": [example.to_dict() for example in self._buffer],
            "rng": [version, list(internal), gauss],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``, taken from a reader over the same files and shard.

        Raises:
            ConfigError: If the state comes from a reader over other files or another shard.
        """
        files = [str(path) for path in self.files]
        if state["files"] != files or state["shard"] != [self.config.rank, self.config.world_size]:
            raise ConfigError(
                f"reader state is for files {state['files']} shard {state['shard']}, but this reader reads "
                f"{files} shard {[self.config.rank, self.config.world_size]}; resume with the same data config"
            )
        self.close()
        self._epoch, self._file_index, self._offset = state["epoch"], state["file_index"], state["offset"]
        self._line_number, self._record_index = state["line_number"], state["record_index"]
        self._num_kept_in_epoch, self._is_source_done = state["num_kept_in_epoch"], state["is_source_done"]
        self._buffer = [Example.from_dict(data) for data in state["buffer"]]
        version, internal, gauss = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss))

    def _next_kept(self) -> Example | None:
        """The next record of this rank's shard, across files and epochs; None when all epochs are done."""
        while True:
            raw = self._next_raw()
            if raw is None:
                if not self._start_next_epoch():
                    return None
                continue
            is_kept = self._record_index % self.config.world_size == self.config.rank
            self._record_index += 1
            if is_kept:
                self._num_kept_in_epoch += 1
                return self._parse(raw)

    def _start_next_epoch(self) -> bool:
        self.close()
        num_epochs = self.config.num_epochs
        if num_epochs is not None and self._epoch + 1 >= num_epochs:
            return False
        if self._num_kept_in_epoch == 0:
            # Another epoch would find nothing either: fail instead of spinning forever.
            raise InputError(
                f"rank {self.config.rank} of {self.config.world_size} got no documents from "
                f"{[str(path) for path in self.files]}; add data or use fewer ranks"
            )
        self._epoch += 1
        self._file_index = self._offset = self._line_number = self._num_kept_in_epoch = 0
        return True

    def _next_raw(self) -> str | None:
        """Text of the next record (a line or a paragraph) of any rank; None after the last file."""
        while self._file_index < len(self.files):
            handle = self._open()
            lines: list[str] = []
            while True:
                raw_line = handle.readline()
                if not raw_line:
                    break
                self._line_number += 1
                line = raw_line.decode("utf-8").rstrip("\r\n")
                if line.strip():
                    lines.append(line)
                    if self.config.documents == "line" or self._is_jsonl():
                        break
                elif lines:
                    break  # the blank line ends the paragraph
            if lines:
                # Everything up to here is consumed, so resuming at this offset starts the next record.
                self._offset = handle.tell()
                return "\n".join(lines)
            self.close()
            self._file_index += 1
            self._offset = self._line_number = 0
        return None

    def _open(self) -> gzip.GzipFile | io.BufferedReader:
        if self._handle is None:
            path = self.files[self._file_index]
            # The handle outlives this call (records are read one at a time); `close` releases it.
            if path.name.endswith(".gz"):
                self._handle = gzip.GzipFile(path, "rb")
            else:
                self._handle = path.open("rb")
            self._handle.seek(self._offset)
        return self._handle

    def _is_jsonl(self) -> bool:
        return _is_jsonl(self.files[self._file_index], self.config.format)

    def _parse(self, raw: str) -> Example:
        if not self._is_jsonl():
            return Example(input=raw)
        where = f"{self.files[self._file_index]} line {self._line_number}"
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as err:
            raise InputError(f"{where} is not valid JSON ({err}); fix or remove the line") from err
        if not isinstance(record, dict):
            raise InputError(f"{where} is a JSON {type(record).__name__}, not an object")
        config = self.config
        values: dict[str, str | None] = {}
        for field in (config.input_field, config.target_field, config.text_pair_field):
            if field is not None:
                if not isinstance(record.get(field), str):
                    raise InputError(f"{where} has no string field {field!r} (its fields: {sorted(record)})")
                values[field] = record[field]
        return Example(
            input=str(values[config.input_field]),
            target=None if config.target_field is None else values[config.target_field],
            text_pair=None if config.text_pair_field is None else values[config.text_pair_field],
        )
