"""Random-initialised model directories (`cpm2 init`), written tensor by tensor, shard by shard.

Shapes come from a model built on the meta device, so even the 198B preset never needs its weights
in memory at once: each tensor is drawn, queued into the current shard and written when the shard is
full. Each tensor has its own seed (from the run seed and its name), so a directory is reproducible
and the order of writing does not change the values. Initial scales are T5's (HF `T5PreTrainedModel.
_init_weights`, Mesh TensorFlow); the CPM-2 centroids are a random orthogonal projection times
`centroid_gain` (SEED.md).
"""

from __future__ import annotations

import json
import re
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from engine.config import ModelConfig
from engine.errors import ConfigError
from engine.experts.blob import BlobLayout
from engine.experts.store import ExpertStoreWriter, expert_layer_of, is_expert_key
from engine.model import Seq2SeqLM
from engine.sizes import format_bytes
from engine.tokenizer import builtin_corpus, train_sentencepiece
from engine.weights.files import DEFAULT_MAX_SHARD_BYTES, INDEX_FILE, SINGLE_FILE, ShardWriter
from engine.weights.loader import parse_dtype
from engine.weights.quantize import QUANTIZATION_KEY, ExpertFormat, dense_record

#: SentencePiece pieces of the tokenizer written with every random model (the model's vocabulary
#: must be at least this plus the 100 sentinels; extra rows are simply never produced).
PRESET_TOKENIZER_PIECES = 1000
#: In the output directory while `write_random_model` runs: what it was asked to write (`resume`
#: goes on only with the same request); removed once config.json is written.
PROGRESS_FILE = ".cpm2-init.json"


def init_std(config: ModelConfig, key: str) -> float:
    """Standard deviation T5's initialiser uses for the parameter `key` (factor 1.0)."""
    d, h, dk, ff = config.d_model, config.num_heads, config.d_kv, config.d_ff
    rules: list[tuple[str, float]] = [
        (r"embed\.weight|lm_head\.weight|.*router\.classifier\.weight", 1.0),
        (r".*relative_bias\.weight", d**-0.5),
        (r".*attn\.qkv\.weight", -1.0),  # per-row: q and k/v differ, handled by the caller
        (r".*(attn|cross)\.o\.weight", (h * dk) ** -0.5),
        (r".*cross\.q\.weight", (d * dk) ** -0.5),
        (r".*cross\.kv\.weight", d**-0.5),
        (r".*\.wi(_0|_1)?\.weight", d**-0.5),
        (r".*\.wo\.weight", ff**-0.5),
    ]
    for pattern, std in rules:
        if re.fullmatch(pattern, key):
            return std
    raise KeyError(key)


def _seeded(seed: int, key: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))


def random_tensor(config: ModelConfig, key: str, shape: torch.Size, *, seed: int) -> torch.Tensor:
    """The float32 initial value of parameter `key`."""
    gen = _seeded(seed, key)
    if key.endswith("norm.weight"):
        return torch.ones(shape)
    if key.endswith(".bias"):  # norms, projections, routers: zero, as HF and fairseq initialise them
        return torch.zeros(shape)
    if key.endswith("router.centroids"):
        assert config.moe is not None
        centroids = torch.empty(shape)
        torch.nn.init.orthogonal_(centroids, gain=config.moe.centroid_gain, generator=gen)
        return centroids
    if key.endswith("attn.qkv.weight"):
        inner = config.inner_dim
        q = torch.randn(inner, shape[1], generator=gen) * (config.d_model * config.d_kv) ** -0.5
        kv = torch.randn(2 * inner, shape[1], generator=gen) * config.d_model**-0.5
        return torch.cat([q, kv])
    return torch.randn(shape, generator=gen) * init_std(config, key)


@dataclass(frozen=True)
class InitPlan:
    """What `write_random_model` will write."""

    num_parameters: int
    num_bytes: int


def plan_random_model(
    config: ModelConfig, *, dtype: str, experts: ExpertFormat | None = None
) -> tuple[InitPlan, dict[str, torch.Size]]:
    """Parameter count, bytes on disk and every tensor's shape, without allocating anything;
    quantised `experts` count their store's blobs."""
    with torch.device("meta"):
        model = Seq2SeqLM(config)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    element = torch.empty((), dtype=parse_dtype(dtype)).element_size()
    count = sum(s.numel() for s in shapes.values())
    if experts is None:
        return InitPlan(count, count * element), shapes
    dense = sum(s.numel() for k, s in shapes.items() if not is_expert_key(k))
    layout = BlobLayout.of(config, experts.store_dtype, group_size=experts.group_size, packing=experts.packing)
    num_experts = len({k.rsplit(".", 2)[0] for k in shapes if is_expert_key(k)})  # "...experts.{e}"
    return InitPlan(count, dense * element + num_experts * layout.nbytes), shapes


def write_tokenizer(out_dir: Path) -> Path:
    """Train the built-in bilingual SentencePiece tokenizer into `out_dir/spiece.model`."""
    return train_sentencepiece(builtin_corpus(), out_dir / "spiece.model", vocab_size=PRESET_TOKENIZER_PIECES)


def write_random_model(
    config: ModelConfig,
    out_dir: Path,
    *,
    dtype: str = "float32",
    seed: int = 0,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
    experts: ExpertFormat | None = None,
    dense: str | None = None,
    resume: bool = False,
) -> InitPlan:
    """Write a randomly initialised native model directory (config, shards, tokenizer) to `out_dir`.

    With `experts`, expert matrices are quantised as they are drawn and stored as `cpm2 quantize`
    stores them; `dense="int8"` records that the dense matmuls run in int8 (quantised when loaded).
    One tensor is in memory at a time, so a model of any size streams to disk. With `resume`, a
    run that was interrupted into `out_dir` with the same arguments goes on from the shards and
    expert layers it finished (every tensor is drawn from the seed and its own name, so the result
    is the same model).
    """
    if config.vocab_size < PRESET_TOKENIZER_PIECES + 100:
        raise ConfigError(
            f"vocab_size {config.vocab_size} is smaller than the built-in tokenizer "
            f"({PRESET_TOKENIZER_PIECES} pieces + 100 sentinels); "
            f"use at least {PRESET_TOKENIZER_PIECES + 100}"
        )
    torch_dtype = parse_dtype(dtype) or torch.float32
    record: dict[str, object] = {}
    if experts is not None:
        record.update(experts.record())
    if dense is not None:
        record.update(dense_record(dense))
    plan, shapes = plan_random_model(config, dtype=dtype, experts=experts)
    request = {
        "config": config.to_dict(),
        "dtype": dtype,
        "seed": seed,
        "quantization": record,
        "max_shard_bytes": max_shard_bytes,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    progress_file = out_dir / PROGRESS_FILE
    resuming = any(out_dir.iterdir())
    if resuming:
        _check_resumable(out_dir, request, resume=resume)
    free = shutil.disk_usage(out_dir).free
    if plan.num_bytes - _bytes_in(out_dir) > free:
        raise ConfigError(
            f"{out_dir}: the model needs {format_bytes(plan.num_bytes)} but only {format_bytes(free)} are free"
        )
    if not resuming:
        progress_file.write_text(json.dumps(request, indent=1) + "\n")
    if not (out_dir / "spiece.model").exists():
        write_tokenizer(out_dir)  # first: what is left after the weights is config.json alone
    writer = ShardWriter(out_dir, max_shard_bytes=max_shard_bytes, metadata={"producer": "cpm2 init"})
    store = None
    if config.moe is not None:
        store_dtype = experts.store_dtype if experts is not None else torch_dtype
        group_size, packing = (experts.group_size, experts.packing) if experts is not None else (None, None)
        store = ExpertStoreWriter(out_dir, config, store_dtype, group_size=group_size, packing=packing)
    written = writer.adopt_partial() if resuming else set()
    finished_layers = set(store.adopt_finished()) if resuming and store is not None else set()
    weights_done = (out_dir / SINGLE_FILE).exists() or (out_dir / INDEX_FILE).exists()
    # Counted in parameters: a quantised expert's bytes on disk are not its parameters' in `dtype`.
    bar = tqdm(total=plan.num_parameters, unit="param", unit_scale=True, desc="writing", disable=not progress)
    for key, shape in shapes.items():
        if weights_done or key in written or expert_layer_of(key) in finished_layers:
            bar.update(shape.numel())
            continue
        tensor = random_tensor(config, key, shape, seed=seed).to(torch_dtype)
        if store is None or not is_expert_key(key):
            writer.add(key, tensor)
        elif experts is not None and key.endswith(".weight"):
            store.add(key, experts.quantize(tensor))
        else:
            store.add(key, tensor)  # float experts, and expert biases beside quantised values
        bar.update(tensor.numel())
    if store is not None and not weights_done:
        store.close()
    if not weights_done:
        writer.close()  # names the shards and writes the index: the weights are complete
    bar.close()
    extra: dict[str, object] = {**config.extra, "init_seed": seed}
    if record:
        extra[QUANTIZATION_KEY] = {**record, "source": "cpm2 init"}
    config.replace(extra=extra).save(out_dir / "config.json")
    progress_file.unlink()
    return plan


def _check_resumable(out_dir: Path, request: dict[str, object], *, resume: bool) -> None:
    """Refuse a non-empty `out_dir` unless it is an interrupted run of this very request, resumed."""
    progress_file = out_dir / PROGRESS_FILE
    if not progress_file.is_file():
        raise ConfigError(f"{out_dir} is not empty; choose a new directory (nothing was written)")
    if not resume:
        raise ConfigError(
            f"{out_dir} holds an interrupted cpm2 init; add --resume to finish it, or choose a new directory"
        )
    if json.loads(progress_file.read_text()) != json.loads(json.dumps(request)):
        raise ConfigError(
            f"{out_dir} holds an interrupted cpm2 init of another model, dtype, seed or format; "
            "resume it with the arguments it was started with, or choose a new directory"
        )


def _bytes_in(directory: Path) -> int:
    """Bytes of the files under `directory` (what a resumed run has already written)."""
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
