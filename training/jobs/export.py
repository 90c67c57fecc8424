"""Writing a trained model as a native model directory (what `cpm2 generate`, `cpm2 serve` and the
next job's `model.dir` load): `config.json`, safetensors shards and the tokenizer file.

A job exports from its final training checkpoint rather than from the live module: the checkpoint
holds the full (unsharded) trainable tensors whatever the world size, so export needs no collective
and runs after the process group is gone; frozen tensors come from the job's starting model.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

from engine.errors import CheckpointError, ConfigError
from engine.experts.store import ExpertStoreWriter
from engine.model import Seq2SeqLM
from engine.weights.files import DEFAULT_MAX_SHARD_BYTES, ShardWriter
from training.checkpoint import MODEL_FILE, latest_checkpoint
from training.trainer import Trainer

__all__ = ["TOKENIZER_FILES", "copy_tokenizer", "export_checkpoint", "write_model_dir"]

#: The files `engine.tokenizer.load_tokenizer` looks for, in its order.
TOKENIZER_FILES = ("spiece.model", "tokenizer.model", "vocab.txt")


def copy_tokenizer(tokenizer_dir: Path, out_dir: Path) -> Path:
    """Copy the tokenizer file `load_tokenizer` would pick from `tokenizer_dir` into `out_dir`."""
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            return Path(shutil.copyfile(tokenizer_dir / name, out_dir / name))
    raise ConfigError(f"no tokenizer file ({', '.join(TOKENIZER_FILES)}) in {tokenizer_dir}")


def write_model_dir(
    model: Seq2SeqLM,
    out_dir: Path,
    *,
    tokenizer_dir: Path,
    producer: str,
    extra: dict[str, object] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write `model` (config, weights in `dtype`, tokenizer) to `out_dir`, replacing it atomically.

    The directory is built under a temporary name and renamed, so an interrupted export never
    leaves a half-written model where a server would load it.
    """
    tmp = out_dir.parent / f".{out_dir.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writer = ShardWriter(tmp, max_shard_bytes=DEFAULT_MAX_SHARD_BYTES, metadata={"producer": producer})
    # Experts go to an expert store, as `cpm2 init` writes them, so serving can offload them without
    # first converting the directory (and may be read-only).
    experts = ExpertStoreWriter(tmp, model.config, dtype) if model.config.moe is not None else None
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu", dtype)
        if experts is None or not experts.add(key, tensor):
            writer.add(key, tensor)
    writer.close()
    if experts is not None:
        experts.close()
    copy_tokenizer(tokenizer_dir, tmp)
    config = model.config
    config.replace(extra={**config.extra, "producer": producer, **(extra or {})}).save(tmp / "config.json")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def export_checkpoint(
    base: Seq2SeqLM,
    checkpoint_root: Path,
    out_dir: Path,
    *,
    tokenizer_dir: Path,
    producer: str,
    extra: dict[str, object] | None = None,
) -> Path:
    """Load the newest checkpoint under `checkpoint_root` into `base` and write it as a model dir.

    `base` is the job's starting model (its frozen tensors are not in the checkpoint); it is modified.
    """
    latest = latest_checkpoint(checkpoint_root)
    if latest is None:
        raise CheckpointError(f"no checkpoint under {checkpoint_root} to export; did training run?")
    tensors = load_file(str(latest / MODEL_FILE))
    unknown = sorted(set(tensors) - set(base.state_dict()))
    if unknown:
        raise CheckpointError(f"{latest} holds tensors the model lacks: {unknown[:5]}; was it written by this job?")
    base.load_state_dict(tensors, strict=False)
    return write_model_dir(base, out_dir, tokenizer_dir=tokenizer_dir, producer=producer, extra=extra)


def export_trained(
    trainer: Trainer,
    out_dir: Path,
    base: Callable[[], Seq2SeqLM],
    *,
    tokenizer_dir: Path,
    producer: str,
    extra: dict[str, object] | None = None,
) -> Path:
    """The end of every job that yields a model: rank 0 loads the final checkpoint into `base()` (the
    starting model again, on CPU: its frozen tensors are not in the checkpoint) and writes `out_dir`,
    recording the steps trained."""
    if trainer.ctx.is_main:
        export_checkpoint(
            base(),
            trainer.checkpoint_dir,
            out_dir,
            tokenizer_dir=tokenizer_dir,
            producer=producer,
            extra={"trained_steps": trainer.step, **(extra or {})},
        )
    return out_dir
