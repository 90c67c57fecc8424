"""Training checkpoints: written atomically, pruned to the newest N, and exact to resume from.

A checkpoint directory `step_<N>` holds
- `trainable.safetensors`: the full (unsharded) trainable parameters by name. Frozen weights are not
  saved: the job's model factory rebuilds them, so a prompt-tuning checkpoint is the prompt only;
- `trainer.pt`: full optimizer and scheduler state, the step, and each rank's RNG and data-reader
  state (loaded with `weights_only=True`, nothing arbitrary is unpickled).
Full state dicts come from `torch.distributed.checkpoint.state_dict`, which gathers DDP or FSDP
shards into plain tensors keyed by parameter name, so a run can resume at another world size.
The directory is written under a temporary name and renamed, so a crash never leaves a partial
`step_<N>` that `latest_checkpoint` would pick.
"""

from __future__ import annotations

import random
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from engine.errors import CheckpointError
from training.distributed import DistContext, barrier, gather_objects, unwrap

_STEP_DIR = re.compile(r"step_(\d+)")
MODEL_FILE = "trainable.safetensors"
STATE_FILE = "trainer.pt"


def capture_rng() -> dict[str, Any]:
    """This process's python, numpy and torch (CPU and every CUDA device) RNG states."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "python": random.getstate(),
        # The numpy key array becomes a tensor so that `torch.load(weights_only=True)` accepts it.
        "numpy": (kind, torch.from_numpy(np.asarray(keys).copy()), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Undo everything drawn since `capture_rng` returned `state`."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block (an eval hook) without moving any RNG, so that evaluating or not, and resuming
    before or after an evaluation, leaves training's random stream the same."""
    state = capture_rng()
    try:
        yield
    finally:
        restore_rng(state)


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the parameters that receive gradients."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under `root`, if any."""
    found = list_checkpoints(root)
    return found[-1] if found else None


@dataclass
class TrainingState:
    """What a checkpoint restores besides model and optimizer."""

    step: int
    tokens: int
    """Tokens trained on so far, summed over ranks."""
    elapsed: float
    """Seconds of training so far, over all resumed segments."""
    data_state: dict[str, Any] | None
    """This rank's data-reader state, or None when the checkpoint was written at another world size."""


def save_checkpoint(
    root: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainingState,
    ctx: DistContext,
    keep: int,
) -> Path | None:
    """Write `root/step_<N>` (collective: every rank must call); returns the path on rank 0."""
    names = set(trainable_names(unwrap(model)))  # DDP prefixes names with `module.`
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full_model = get_model_state_dict(model, options=options)
    full_optim = get_optimizer_state_dict(model, optimizer, options=options)
    rng = gather_objects(capture_rng(), ctx)
    data = gather_objects(state.data_state, ctx)
    final = root / f"step_{state.step:08d}"
    if ctx.is_main:
        tmp = root / f".tmp-{final.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        tensors = {k: cast(torch.Tensor, v).detach().contiguous() for k, v in full_model.items() if k in names}
        save_file(tensors, str(tmp / MODEL_FILE), metadata={"step": str(state.step)})
        trainer = {
            "step": state.step,
            "tokens": state.tokens,
            "elapsed": state.elapsed,
            "world_size": ctx.world_size,
            "optimizer": full_optim,
            "scheduler": scheduler.state_dict(),
            "rng": rng,
            "data": data,
        }
        torch.save(trainer, tmp / STATE_FILE)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(ctx)
    return final if ctx.is_main else None


def load_checkpoint(
    path: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    ctx: DistContext,
) -> TrainingState:
    """Restore model, optimizer, scheduler and (same world size) RNG; every rank reads the files."""
    if not (path / MODEL_FILE).is_file() or not (path / STATE_FILE).is_file():
        raise CheckpointError(f"{path} is not a training checkpoint (expected {MODEL_FILE} and {STATE_FILE})")
    tensors: dict[str, Any] = load_file(str(path / MODEL_FILE))
    missing = set(trainable_names(unwrap(model))) - set(tensors)
    if missing:
        raise CheckpointError(
            f"{path} lacks trainable parameters {sorted(missing)[:5]}; was it written by a job that "
            "trains other parameters?"
        )
    saved = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    # Frozen weights are not in the file; strict=False leaves them as the model factory built them.
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, tensors, options=options)
    set_optimizer_state_dict(model, optimizer, saved["optimizer"], options=options)
    scheduler.load_state_dict(saved["scheduler"])
    same_layout = saved["world_size"] == ctx.world_size
    if same_layout:
        restore_rng(saved["rng"][ctx.rank])
    return TrainingState(
        step=saved["step"],
        tokens=saved["tokens"],
        elapsed=saved["elapsed"],
        data_state=saved["data"][ctx.rank] if same_layout else None,
    )
