"""`cpm2 convert hf|cpm2 SRC DST`: a foreign checkpoint → a native cpm2 directory.

The only code paths that read pickled checkpoints (always with `torch.load(weights_only=True)`):
HF `.bin` files (`convert_hf`) and the released CPM-2 DeepSpeed rank files (`convert_cpm2`). Tensors
stream from the source into bounded shards, one at a time. Experts go to the expert store
(`engine.experts.store`: one aligned blob per expert), everything else to the shards.

Peak memory of `convert_cpm2`: the rank files are memory-mapped, so resident memory is one merged
tensor (the largest is the vocab x d_model embedding, 205 MiB in fp16 for CPM-2), its dtype-converted
copy, the shard being written (`max_shard_bytes`, default 2 GiB) and one expert blob; the OS page cache
holds the mapped file pages and drops them as needed.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from engine.config import ModelConfig
from engine.errors import CheckpointError, ConfigError
from engine.experts.store import ExpertStoreWriter
from engine.model import Seq2SeqLM
from engine.weights.cpm2_files import RankFiles
from engine.weights.cpm2_layout import (
    IGNORED_KEYS,
    RELEASED_CONFIG,
    RELEASED_SPECIAL_IDS,
    SlicePlan,
    cpm2_key_plan,
    cpm2_to_config,
    fold_expert_norm,
    merge_slices,
    merged_shape,
    special_token_ids,
)
from engine.weights.files import DEFAULT_MAX_SHARD_BYTES, ShardWriter, open_tensor_source
from engine.weights.loader import CONFIG_FILE, inspect_checkpoint, native_tensors, parse_dtype, read_json_object

log = logging.getLogger("cpm2.engine")

#: Tokenizer and generation files copied unchanged when present (M2M-100 and NLLB-200 keep their
#: SentencePiece model in `sentencepiece.bpe.model`, NLLB-200 its specials in `tokenizer.json`).
CARRIED_FILES = (
    "spiece.model",
    "tokenizer.model",
    "vocab.txt",
    "sentencepiece.bpe.model",
    "vocab.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)


def _check_destination(dst: Path) -> None:
    if dst.exists() and any(dst.iterdir()):
        raise CheckpointError(f"{dst}: exists and is not empty; choose a new destination")


def _write_native(
    dst: Path,
    tensors: Iterator[tuple[str, torch.Tensor]],
    *,
    config: ModelConfig,
    dtype: torch.dtype,
    max_shard_bytes: int,
    producer: str,
    total: int | None,
    progress: bool,
) -> None:
    # The expert writer first: it refuses experts it cannot store before anything is written.
    experts = ExpertStoreWriter(dst, config, dtype) if config.moe is not None else None
    writer = ShardWriter(dst, max_shard_bytes=max_shard_bytes, metadata={"producer": producer})
    for key, tensor in tqdm(tensors, desc="converting", unit="tensor", total=total, disable=not progress):
        if experts is None or not experts.add(key, tensor):
            writer.add(key, tensor)
    writer.close()
    if experts is not None:
        experts.close()


def _carry_files(dirs: list[Path], dst: Path) -> None:
    for name in CARRIED_FILES:
        found = next((d / name for d in dirs if (d / name).is_file()), None)
        if found is not None:
            shutil.copy2(found, dst / name)


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
        _check_destination(dst)
        target = parse_dtype(dtype) or info.stored_dtype
        tensors = native_tensors(info, files, dtype=target, device=torch.device("cpu"))
        _write_native(
            dst,
            tensors,
            config=info.config,
            dtype=target,
            max_shard_bytes=max_shard_bytes,
            producer="cpm2 convert hf",
            total=None,
            progress=progress,
        )
    finally:
        files.close()
    _carry_files([src], dst)
    info.config.replace(extra={**info.config.extra, "converted_from": str(src)}).save(dst / CONFIG_FILE)
    return dst


# ---- CPM-2 (DeepSpeed model-parallel rank files) ---------------------------------------------------


def _read_cpm2_json(config_path: Path | None, src: Path) -> tuple[dict[str, Any], str]:
    path = config_path or (src / CONFIG_FILE if (src / CONFIG_FILE).is_file() else None)
    if path is None:
        return dict(RELEASED_CONFIG), "the released CPM-2 shapes (no --config given; pass one for other models)"
    return read_json_object(path, missing="no such file (--config)", error=ConfigError), str(path)


def _first(files: RankFiles, key: str) -> torch.Tensor:
    state = files.state(0)
    if key not in state:
        raise CheckpointError(f"{files.path(0)}: tensor '{key}' is missing; not a CPM-2 checkpoint?")
    return state[key]


def _cpm2_config(
    files: RankFiles, data: dict[str, Any], source: str, vocab_file: Path | None
) -> tuple[ModelConfig, int]:
    """The model config and the number of model-parallel ranks, from the JSON and rank 0's shapes."""
    heads_per_rank = _first(files, "encoder.blocks.0.self_attn.self_attn.relative_attention_bias.weight").shape[1]
    world = files.meta.get("mp_world_size")
    if isinstance(world, int) and world > 0:
        num_ranks = world
    elif "num_heads" in data and int(data["num_heads"]) % heads_per_rank == 0:
        # No DeepSpeed metadata: each rank owns num_heads / P heads of the relative bias.
        num_ranks = int(data["num_heads"]) // heads_per_rank
    else:
        raise ConfigError(
            f"{source}: num_heads {data.get('num_heads')} is not a multiple of the {heads_per_rank} heads "
            f"rank 0 holds ({files.path(0)}); the config does not describe this checkpoint"
        )
    num_experts = _first(files, "encoder.blocks.0.ff.expert_centroids").shape[0] if files.is_moe else None
    files.require(num_ranks=num_ranks, num_experts=num_experts)
    vocab_size = _first(files, "word_embeds.weight").shape[0] * num_ranks
    if vocab_file is None or not vocab_file.is_file():
        # The released vocabularies disagree on <eod> (7 in CPM-2-Pretrain's, 8 in CPM-2-Finetune's).
        log.warning(
            "%s: no vocab.txt; assuming the special ids %s of CPM-2-Finetune's vocabulary. Put the model's "
            "vocab.txt in the source directory so the ids (and the tokenizer) come from it.",
            source,
            RELEASED_SPECIAL_IDS,
        )
    config = cpm2_to_config(
        data,
        source=source,
        vocab_size=vocab_size,
        num_experts=num_experts,
        special_ids=special_token_ids(vocab_file),
    )
    return config, num_ranks


def _check_cpm2_plan(
    plan: list[SlicePlan], files: RankFiles, expected: dict[str, torch.Size], num_ranks: int, source: str
) -> None:
    """Every slice present with mergeable shapes matching the config; no unexpected dense tensor."""
    used: set[str] = set()
    for item in plan:
        shapes = []
        for rank in range(num_ranks):
            state = files.state(rank, item.expert)
            if item.source not in state:
                raise CheckpointError(
                    f"{files.path(rank, item.expert)}: tensor '{item.source}' is missing "
                    f"(needed for '{item.native}'; the config says this model has it)"
                )
            shapes.append(tuple(state[item.source].shape))
        if item.expert in (None, 0):
            used.add(item.source)
        want = tuple(expected[item.native])
        got = merged_shape(item, shapes)
        if got != want:
            found = f"{list(shapes[0])} per rank" if len(set(shapes)) == 1 else " / ".join(map(str, shapes))
            raise CheckpointError(
                f"{files.path(0, item.expert)}: tensor '{item.source}' has shape {found}, which over "
                f"{num_ranks} ranks does not give the {list(want)} the config needs for '{item.native}'; "
                f"the checkpoint and the config ({source}) disagree"
            )
    for rank in range(num_ranks):
        extra = sorted(k for k in files.state(rank) if k not in used and not IGNORED_KEYS.match(k))
        if extra:
            raise CheckpointError(
                f"{files.path(rank)}: unexpected tensor '{extra[0]}' ({len(extra)} unexpected in all); "
                f"the config ({source}) does not describe it; check its layer counts"
            )


def _expert_norm_folds(files: RankFiles, config: ModelConfig) -> dict[str, list[torch.Tensor]]:
    """MoE layers whose experts carry different FFN norm weights: layer prefix → norm of each expert."""
    folds: dict[str, list[torch.Tensor]] = {}
    if config.moe is None:
        return folds
    for stack in ("encoder", "decoder"):
        for block in config.moe_layers(stack):
            prefix = f"{stack}.blocks.{block}"
            key = f"{prefix}.ff.expert_network.layer_norm.weight"
            norms = []
            for expert in range(config.moe.num_experts):
                state = files.state(0, expert)
                if key not in state:
                    raise CheckpointError(f"{files.path(0, expert)}: tensor '{key}' is missing")
                norms.append(state[key])
            if not all(torch.equal(norms[0], n) for n in norms[1:]):
                folds[prefix] = norms
    return folds


def _cpm2_tensors(
    plan: list[SlicePlan], files: RankFiles, num_ranks: int, folds: dict[str, list[torch.Tensor]], dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    for item in plan:
        tensor = merge_slices(item, [files.state(rank, item.expert)[item.source] for rank in range(num_ranks)])
        layer = ".".join(item.native.split(".")[:3])
        if layer in folds:
            tensor = fold_expert_norm(item, tensor, folds[layer])
        yield item.native, tensor.to(dtype)


def convert_cpm2(
    src: Path,
    dst: Path,
    *,
    config_path: Path | None = None,
    iteration: str | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
) -> Path:
    """Convert a released CPM-2 checkpoint (`engine.weights.cpm2_layout`) into a native directory `dst`.

    `src` is the checkpoint directory (the iteration is `iteration`, the one its
    `latest_checkpointed_iteration.txt` names, or its only one) or the iteration directory itself.
    The config is `config_path` (CPM-2 `EncDecConfig` JSON names), else `src/config.json`, else the
    released shapes; the vocabulary size and expert count are read from the checkpoint.
    """
    files = RankFiles.open(src, iteration=iteration)
    try:
        data, source = _read_cpm2_json(config_path, src)
        vocab_file = next((d / "vocab.txt" for d in (src, files.root) if (d / "vocab.txt").is_file()), None)
        config, num_ranks = _cpm2_config(files, data, source, vocab_file)
        with torch.device("meta"):
            expected = {k: v.shape for k, v in Seq2SeqLM(config).state_dict().items()}
        plan = cpm2_key_plan(config, expected)
        _check_cpm2_plan(plan, files, expected, num_ranks, source)
        _check_destination(dst)
        target = parse_dtype(dtype) or files.state(0)["word_embeds.weight"].dtype
        folds = _expert_norm_folds(files, config)
        for layer in folds:
            log.warning("%s: experts' FFN norms differ; folded into their wi_0/wi_1 and the router", layer)
        _write_native(
            dst,
            _cpm2_tensors(plan, files, num_ranks, folds, target),
            config=config,
            dtype=target,
            max_shard_bytes=max_shard_bytes,
            producer="cpm2 convert cpm2",
            total=len(plan),
            progress=progress,
        )
        extra = {
            **config.extra,
            "converted_from": str(files.root),
            "model_parallel": num_ranks,
            "config_from": source,
            "folded_expert_norms": sorted(folds),
        }
    finally:
        files.close()
    _carry_files([src, files.root], dst)
    config.replace(extra=extra).save(dst / CONFIG_FILE)
    return dst
