"""`cpm2 convert hf SRC DST`: a Hugging Face T5 / mT5 / Switch directory → a native cpm2 directory.

The only code path that reads pickled `.bin` checkpoints (with `torch.load(weights_only=True)`).
Tensors stream from the source into bounded shards, one at a time, so converting a model never holds
more than one tensor (plus the shard being written) in memory. Experts go to the expert store
(`engine.experts.store`: one aligned blob per expert), everything else to the shards.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from engine.errors import CheckpointError
from engine.experts.store import ExpertStoreWriter
from engine.weights.files import ShardWriter, open_tensor_source
from engine.weights.init import DEFAULT_MAX_SHARD_BYTES
from engine.weights.loader import CONFIG_FILE, inspect_checkpoint, native_tensors, parse_dtype

#: Tokenizer and generation files copied unchanged when present.
CARRIED_FILES = ("spiece.model", "tokenizer.model", "vocab.txt", "generation_config.json")


def convert_hf(
    src: Path,
    dst: Path,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
) -> Path:
    """Convert the HF model directory `src` into a native directory `dst` (new or empty)."""
    files = open_tensor_source(src, allow_pickle=True)
    try:
        info = inspect_checkpoint(src, files)
        if info.source_format != "hf":
            raise CheckpointError(f"{src}: already a native cpm2 directory; nothing to convert")
        if dst.exists() and any(dst.iterdir()):
            raise CheckpointError(f"{dst}: exists and is not empty; choose a new destination")
        target = parse_dtype(dtype) or info.stored_dtype
        writer = ShardWriter(dst, max_shard_bytes=max_shard_bytes, metadata={"producer": "cpm2 convert hf"})
        experts = ExpertStoreWriter(dst, info.config, target) if info.config.moe is not None else None
        tensors = native_tensors(info, files, dtype=target, device=torch.device("cpu"))
        for key, tensor in tqdm(tensors, desc="converting", unit="tensor", disable=not progress):
            if experts is None or not experts.add(key, tensor):
                writer.add(key, tensor)
        writer.close()
        if experts is not None:
            experts.close()
    finally:
        files.close()
    for name in CARRIED_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
    info.config.replace(extra={**info.config.extra, "converted_from": str(src)}).save(dst / CONFIG_FILE)
    return dst
