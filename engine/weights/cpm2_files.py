"""The rank files of a released CPM-2 checkpoint (`engine.weights.cpm2_layout`): found, loaded, kept open.

Only the converter reads them. Each file is loaded with `torch.load(weights_only=True, mmap=True)`:
nothing in it can run code, and tensor data stays in the file (the OS pages it in while a slice is
merged), so keeping every rank open costs address space, not memory. Besides tensors, DeepSpeed's
model-state files carry plain training data (iteration, learning-rate schedule, RNG states, the
NumPy generator state among them); NumPy arrays of plain numbers are allowed for that reason.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.errors import CheckpointError
from engine.weights.cpm2_layout import rank_file_name

#: DeepSpeed / Megatron write the latest iteration's directory name here.
TRACKER_FILE = "latest_checkpointed_iteration.txt"
_RANK_FILE = re.compile(r"^mp_rank_(\d+)(?:_(\d+))?_model_states\.pt$")
#: Keys of the state dict in a rank file: DeepSpeed's, then Megatron's own save (and `init_ckpt.py`).
STATE_KEYS = ("module", "model")

RankId = tuple[int | None, int]
"""(expert, model-parallel rank); expert None in a dense checkpoint."""


def _numpy_globals() -> list[Any]:
    # `np.random.get_state()` pickles as an ndarray of uint32. Files written with NumPy 1.x name
    # `numpy.core.multiarray._reconstruct`, NumPy 2 `numpy._core...`; both resolve to the same function.
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # NumPy 1.x
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return [
        _reconstruct,
        (_reconstruct, "numpy.core.multiarray._reconstruct"),
        np.ndarray,
        np.dtype,
        type(np.dtype(np.uint32)),
    ]


def _has_rank_files(path: Path) -> bool:
    return any(_RANK_FILE.match(p.name) for p in path.iterdir())


def find_iteration_dir(src: Path, iteration: str | None = None) -> Path:
    """The directory holding the rank files: `src` itself, `src/<iteration>`, or the tracked latest."""
    if not src.is_dir():
        raise CheckpointError(f"{src}: no such checkpoint directory")
    if iteration is not None:
        path = src / str(iteration)
        if not path.is_dir():
            raise CheckpointError(f"{path}: no such iteration directory; check --iteration")
        return path
    if _has_rank_files(src):
        return src
    tracker = src / TRACKER_FILE
    if tracker.is_file():
        name = tracker.read_text().strip()
        if not (src / name).is_dir():
            raise CheckpointError(
                f"{tracker}: names iteration {name!r}, but {src / name} does not exist; use --iteration"
            )
        return src / name
    candidates = sorted(p.name for p in src.iterdir() if p.is_dir() and _has_rank_files(p))
    if len(candidates) == 1:
        return src / candidates[0]
    if not candidates:
        raise CheckpointError(
            f"{src}: no mp_rank_*_model_states.pt files here or in a subdirectory; "
            "point SRC at a CPM-2 checkpoint directory"
        )
    raise CheckpointError(f"{src}: holds iterations {', '.join(candidates)}; choose one with --iteration")


def _load_error(path: Path, exc: Exception) -> str:
    text = str(exc)
    if "mmap can only be used" in text:
        return (
            f"{path}: saved in PyTorch's legacy (pre-1.6) format, which cannot be memory-mapped; "
            "re-save it once with a current PyTorch (torch.save(torch.load(path), path), only for a trusted file)"
        )
    if isinstance(exc, pickle.UnpicklingError):
        # torch's message is a page of advice; the line naming the refused object is what matters.
        reason = next((line.strip() for line in text.splitlines() if "WeightsUnpickler error" in line), text)
        return (
            f"{path}: holds objects other than tensors and plain data ({reason}); cpm2 never runs code "
            "from a checkpoint. Only if you trust the file, re-save just its weights: "
            "torch.save({'module': torch.load(path, weights_only=False)['module']}, path)"
        )
    first_line = text.splitlines()[0] if text else ""
    return f"{path}: cannot be loaded as a tensor checkpoint ({type(exc).__name__}: {first_line})"


def load_rank_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state dict of one rank file (memory-mapped tensors) and the file's other top-level entries."""
    if not path.is_file():
        raise CheckpointError(f"{path}: rank file is missing")
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, ... for bad files
        raise CheckpointError(_load_error(path, exc)) from exc
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path}: expected a dictionary (DeepSpeed model states), found {type(loaded).__name__}")
    key = next((k for k in STATE_KEYS if isinstance(loaded.get(k), dict)), None)
    if key is None:
        raise CheckpointError(
            f"{path}: no state dict under {' or '.join(map(repr, STATE_KEYS))}; top-level keys are {sorted(loaded)}"
        )
    state = loaded[key]
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: '{key}' entry '{name}' is a {type(value).__name__}, not a tensor")
    return state, {k: v for k, v in loaded.items() if k not in STATE_KEYS}


class RankFiles:
    """The rank files of one iteration, by (expert, rank); each loaded on first use and kept open."""

    def __init__(self, root: Path, found: dict[RankId, Path]) -> None:
        self.root = root
        self.is_moe = any(expert is not None for expert, _ in found)
        self._found = found
        self._states: dict[RankId, dict[str, torch.Tensor]] = {}
        self.meta: dict[str, Any] = {}
        """Top-level entries of the first file loaded besides its state dict (`mp_world_size`, ...)."""

    @classmethod
    def open(cls, src: Path, *, iteration: str | None = None) -> RankFiles:
        """Find the rank files of `src` (see `find_iteration_dir`) without loading any."""
        root = find_iteration_dir(src, iteration)
        found: dict[RankId, Path] = {}
        for path in root.iterdir():
            m = _RANK_FILE.match(path.name)
            if m is not None:
                rank_id: RankId = (None, int(m[1])) if m[2] is None else (int(m[1]), int(m[2]))
                found[rank_id] = path
        if len({expert is None for expert, _ in found}) > 1:
            raise CheckpointError(
                f"{root}: mixes dense (mp_rank_RR_...) and MoE (mp_rank_EE_RR_...) rank files; "
                "keep one checkpoint per directory"
            )
        return cls(root, found)

    def _key(self, rank: int, expert: int | None) -> RankId:
        # The dense part of an MoE checkpoint is replicated over the experts' files; expert 0's is read.
        return (expert if expert is not None else 0, rank) if self.is_moe else (None, rank)

    def path(self, rank: int, expert: int | None = None) -> Path:
        """File of `rank` (for `expert`; None: the file the dense part is read from)."""
        exp, r = self._key(rank, expert)
        return self.root / rank_file_name(r, exp)

    def state(self, rank: int, expert: int | None = None) -> dict[str, torch.Tensor]:
        """The state dict of `rank` (of `expert`), memory-mapped."""
        key = self._key(rank, expert)
        state = self._states.get(key)
        if state is None:
            state, meta = load_rank_file(self.path(rank, expert))
            self.meta = self.meta or meta
            self._states[key] = state
        return state

    def require(self, *, num_ranks: int, num_experts: int | None) -> None:
        """Check that exactly the files of `num_ranks` ranks (x `num_experts` experts) are present."""
        experts: list[int | None] = list(range(num_experts)) if num_experts else [None]
        expected = {(e, r) for e in experts for r in range(num_ranks)}
        shape = f"{num_ranks} model-parallel ranks" + (f" x {num_experts} experts" if num_experts else "")
        missing = sorted(expected - set(self._found), key=lambda k: (k[0] or 0, k[1]))
        if missing:
            expert, rank = missing[0]
            which = f"rank {rank} of {num_ranks}" + ("" if expert is None else f", expert {expert} of {num_experts}")
            raise CheckpointError(
                f"{self.root / rank_file_name(rank, expert)}: missing ({which}; {len(missing)} of "
                f"{len(expected)} files missing); the checkpoint has {shape}: copy every rank file in"
            )
        extra = sorted(set(self._found) - expected, key=lambda k: (k[0] or 0, k[1]))
        if extra:
            raise CheckpointError(
                f"{self._found[extra[0]]}: unexpected rank file; the checkpoint has {shape} "
                "(from its mp_world_size, or the config's num_heads); check --config or remove stray files"
            )

    def close(self) -> None:
        self._states.clear()
