"""Checkpoint files: lazy, memory-mapped reads of (sharded) safetensors and shard-by-shard writes.

A checkpoint is `model.safetensors`, or shards `model-0000i-of-0000n.safetensors` listed in
`model.safetensors.index.json` (the layout HF transformers and safetensors use). Reading never
unpickles anything: pickled `.bin` files are refused here and only the converter reads them, with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import re
import struct
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from engine.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
#: Shards are cut at this size unless told otherwise (`--max-shard-size`).
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
#: The tensors of one expert (`...experts.{e}.*`) share this prefix; a shard never splits them.
_EXPERT_PREFIX = re.compile(r"^(.*\.experts\.\d+)\.")


class TensorSource(Protocol):
    """Tensors by key, with their file and shape known before the data is read."""

    def keys(self) -> list[str]: ...
    def __contains__(self, key: str) -> bool: ...
    def file_of(self, key: str) -> Path: ...
    def shape(self, key: str) -> tuple[int, ...]: ...
    def get(self, key: str) -> torch.Tensor: ...
    def close(self) -> None: ...


class TensorFiles:
    """The tensors of a checkpoint directory, by key; each read is a zero-copy view of the mmap'd file."""

    def __init__(self, files_by_key: dict[str, Path]) -> None:
        self._files_by_key = files_by_key
        self._stack = ExitStack()
        self._handles: dict[Path, Any] = {}

    @classmethod
    def open(cls, model_dir: Path) -> TensorFiles:
        """Index the safetensors of `model_dir` (validating every header) without reading tensor data."""
        index_path = model_dir / INDEX_FILE
        single = model_dir / SINGLE_FILE
        if index_path.exists():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index_path}: not a safetensors index ({exc})") from exc
            files_by_key = {key: model_dir / name for key, name in weight_map.items()}
        elif single.exists():
            with _open(single) as handle:
                files_by_key = dict.fromkeys(handle.keys(), single)
        else:
            pickles = [name for name in PICKLE_FILES if (model_dir / name).exists()]
            hint = (
                f"; it holds a pickled checkpoint ({pickles[0]}), which cpm2 never loads directly: "
                f"run `cpm2 convert hf {model_dir} DST` once and use DST"
                if pickles
                else ""
            )
            raise CheckpointError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")
        files = cls(files_by_key)
        files._validate()
        return files

    def _validate(self) -> None:
        # Open every shard now, so a missing, truncated or corrupt file fails at load time with its
        # name, never in the middle of serving a request.
        listed: dict[Path, set[str]] = {}
        for key, path in self._files_by_key.items():
            listed.setdefault(path, set()).add(key)
        for path, keys in listed.items():
            present = set(self._handle(path).keys())
            absent = sorted(keys - present)
            if absent:
                raise CheckpointError(f"{path}: the index lists tensor '{absent[0]}' but the file does not hold it")

    def _handle(self, path: Path) -> Any:
        handle = self._handles.get(path)
        if handle is None:
            if not path.exists():
                raise CheckpointError(f"{path}: checkpoint shard is missing")
            handle = self._stack.enter_context(_open(path))
            self._handles[path] = handle
        return handle

    def keys(self) -> list[str]:
        return list(self._files_by_key)

    def __contains__(self, key: str) -> bool:
        return key in self._files_by_key

    def file_of(self, key: str) -> Path:
        return self._files_by_key[key]

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of `key` read from the header, without touching the data."""
        return tuple(self._handle(self.file_of(key)).get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        """The tensor `key` (memory-mapped, copy-on-write)."""
        path = self.file_of(key)
        try:
            return self._handle(path).get_tensor(key)
        except SafetensorError as exc:
            raise CheckpointError(f"{path}: cannot read tensor '{key}' ({exc})") from exc

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _open(path: Path) -> Any:
    if path.is_file() and not os.access(path, os.R_OK):
        raise CheckpointError(
            f"{path}: permission denied for user id {os.getuid()}; make the checkpoint readable (chmod a+r)"
        )
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc


def _expert_of(key: str) -> str | None:
    match = _EXPERT_PREFIX.match(key)
    return match.group(1) if match else None


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _storage_id(tensor: torch.Tensor) -> tuple[int, int]:
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def _complete_shard_keys(path: Path) -> list[str] | None:
    """The tensor names of a safetensors file holding every byte its header promises, else None."""
    try:
        with path.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
    except (OSError, ValueError, struct.error):
        return None
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    if path.stat().st_size != 8 + header_len + max(ends, default=0):
        return None
    return [name for name in header if name != "__metadata__"]


class ShardWriter:
    """Writes tensors into safetensors shards of bounded size, then the index; files appear atomically.

    Tensors are written in the order they are added, so the tensors of one expert, added together,
    form one contiguous byte range of one shard.
    """

    def __init__(self, out_dir: Path, *, max_shard_bytes: int, metadata: dict[str, str] | None = None) -> None:
        self.out_dir = out_dir
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._pending_storages: set[tuple[int, int]] = set()
        self._written: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0
        out_dir.mkdir(parents=True, exist_ok=True)

    def add(self, key: str, tensor: torch.Tensor) -> None:
        """Queue `tensor` under `key`; flushes a shard once the size bound would be crossed."""
        tensor = tensor.detach().contiguous().cpu()
        if _storage_id(tensor) in self._pending_storages:
            # One storage under two names (a tied head read from a pickle): safetensors stores no
            # aliases, so this name gets its own copy.
            tensor = tensor.clone()
        size = _nbytes(tensor)
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            # Never split an expert: the part of it already queued moves on to the next shard.
            expert = _expert_of(key)
            carried = {k: t for k, t in self._pending.items() if expert and _expert_of(k) == expert}
            for k in carried:
                del self._pending[k]
            self._pending_bytes -= sum(map(_nbytes, carried.values()))
            self.flush()
            for k, t in carried.items():
                self._pending[k] = t
                self._pending_storages.add(_storage_id(t))
                self._pending_bytes += _nbytes(t)
        self._pending[key] = tensor
        self._pending_storages.add(_storage_id(tensor))
        self._pending_bytes += size
        self.total_bytes += size

    def adopt_partial(self) -> set[str]:
        """Take the shards an interrupted writer into this directory completed as written, and return
        their keys; a shard cut short, and any after it, is deleted (its tensors are written anew)."""
        adopted: set[str] = set()
        if not (self.out_dir / INDEX_FILE).exists():
            # Named shards without their index are a `close` cut short between its renames: the
            # shards it had not yet renamed are gone from the sequence, so all of them are redone.
            for named in self.out_dir.glob("model-*-of-*.safetensors"):
                named.unlink()
        for path in sorted(self.out_dir.glob(".shard-*.tmp")):
            keys = _complete_shard_keys(path) if path.name == f".shard-{len(self._written):05d}.tmp" else None
            if keys is None:
                path.unlink()
                continue
            self._written.append((path, keys))
            self.total_bytes += path.stat().st_size  # headers included: only the index's total uses it
            adopted.update(keys)
        return adopted

    def flush(self) -> None:
        """Write the queued tensors as the next shard."""
        if not self._pending:
            return
        path = self.out_dir / f".shard-{len(self._written):05d}.tmp"
        save_file(self._pending, str(path), metadata=self.metadata)
        # safetensors >= 0.7 creates files as 0600; a checkpoint is read by other users too (a
        # server image's non-root user, a shared model volume), so it gets the usual umask mode.
        os.chmod(path, 0o666 & ~_umask())
        self._written.append((path, list(self._pending)))
        self._pending = {}
        self._pending_bytes = 0
        self._pending_storages = set()

    def close(self) -> list[Path]:
        """Finish: name the shards (`model.safetensors` when there is one) and write the index."""
        self.flush()
        count = len(self._written)
        final: list[Path] = []
        weight_map: dict[str, str] = {}
        for i, (tmp, keys) in enumerate(self._written):
            name = SINGLE_FILE if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(tmp, self.out_dir / name)
            final.append(self.out_dir / name)
            weight_map.update(dict.fromkeys(keys, name))
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            tmp_index = self.out_dir / f".{INDEX_FILE}.tmp"
            tmp_index.write_text(json.dumps(index, indent=2) + "\n")
            os.replace(tmp_index, self.out_dir / INDEX_FILE)
        return final


class PickleFiles:
    """A pickled HF checkpoint (`pytorch_model.bin`, optionally sharded): for the converter only.

    Loaded with `torch.load(weights_only=True, mmap=True)`: no code in the file can run, and the
    tensors stay on disk until read.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], files_by_key: dict[str, Path]) -> None:
        self._tensors = tensors
        self._files_by_key = files_by_key

    @classmethod
    def open(cls, model_dir: Path) -> PickleFiles:
        index_path = model_dir / PICKLE_FILES[1]
        if index_path.exists():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index_path}: not a checkpoint index ({exc})") from exc
            paths = sorted({model_dir / name for name in weight_map.values()})
        else:
            paths = [model_dir / PICKLE_FILES[0]]
        tensors: dict[str, torch.Tensor] = {}
        files_by_key: dict[str, Path] = {}
        for path in paths:
            try:
                loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except FileNotFoundError:
                raise CheckpointError(f"{path}: checkpoint file is missing") from None
            except Exception as exc:  # torch raises UnpicklingError, RuntimeError, ... for bad files
                raise CheckpointError(
                    f"{path}: cannot be loaded safely as a tensor checkpoint ({type(exc).__name__}: {exc})"
                ) from exc
            if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
                raise CheckpointError(f"{path}: expected a flat dictionary of tensors")
            tensors.update(loaded)
            files_by_key.update(dict.fromkeys(loaded, path))
        return cls(tensors, files_by_key)

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def file_of(self, key: str) -> Path:
        return self._files_by_key[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def get(self, key: str) -> torch.Tensor:
        return self._tensors[key]

    def close(self) -> None:
        self._tensors.clear()


def open_tensor_source(model_dir: Path, *, allow_pickle: bool = False) -> TensorSource:
    """The safetensors of `model_dir`; with `allow_pickle` (converter only) also a pickled `.bin`."""
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: no such model directory")
    has_safetensors = (model_dir / SINGLE_FILE).exists() or (model_dir / INDEX_FILE).exists()
    if allow_pickle and not has_safetensors and any((model_dir / name).exists() for name in PICKLE_FILES):
        return PickleFiles.open(model_dir)
    return TensorFiles.open(model_dir)
