"""The released CPM-2 checkpoints: the one place their tensor names, model-parallel splits and config live.

The layout follows the code that wrote them (TsinghuaAI/CPM-2-Pretrain: `src/mpu/transformer_enc_dec.py`,
`src/model/enc_dec_modeling.py`, `init_ckpt.py`, and on its `moe` branch `src/utils.py` and
`src/mpu/baselayer.py`; SEED.md "Checkpoint layout").

Files, in one iteration directory `<dir>/<iter>/` (P model-parallel ranks):
- Dense (P = 4 for the released 11B models): `mp_rank_{r:02d}_model_states.pt`, r < P.
- MoE (P = 8, 32 experts): `mp_rank_{e:02d}_{r:02d}_model_states.pt`. BASE layers put one expert on
  each data-parallel worker (`expert_id = get_data_parallel_rank()`) and every worker saves its own
  file (`get_checkpoint_name` of the moe branch), so file (e, r) holds model-parallel slice r of the
  dense part (identical for every e; read from e = 0) and slice r of expert e under
  `...ff.expert_network.*` (no expert index in the key). `...ff.expert_centroids` [E, d] is replicated;
  row e routes to expert e (the balanced assignment sends expert e's tokens to worker e).
- The state dict sits under `module` (DeepSpeed) or `model` (Megatron's own save, `init_ckpt.py`).

Splits (Megatron `ColumnParallelLinear` / `RowParallelLinear` / `VocabParallelEmbedding`):
- rows (dim 0): `word_embeds`, `lm_head` (vocabulary-parallel), `project_q`, `wi_0`, `wi_1`.
- strided rows: self-attention `project` holds [Q_r; K_r; V_r] per rank (stride 3), cross-attention
  `project_kv` [K_r; V_r] (stride 2); the merged matrix is [Q_0..Q_{P-1}; K_0..; V_0..].
- columns (dim 1): `dense` (attention output), `wo`, and `relative_attention_bias`: an
  `nn.Embedding(num_buckets, num_heads / P)`, so each rank owns the bias columns of its own heads
  (`init_ckpt.py` splits it on dim 1 with the row-parallel weights).
- replicated: layer norms, final layer norms, centroids (rank 0's copy is taken).
- `encoder.word_embeds.weight` / `decoder.word_embeds.weight` are the shared embedding again (both
  stacks hold it) and are skipped.

Architecture facts the config encodes: gated GELU (tanh) whatever `feed_forward_proj` says (the
released `enc_dec_xlarge_config.json` says "relu", the code always runs `gelu(wi_0 x) * wi_1 x`),
unscaled attention, untied head, relative distance capped at 128 (hard-coded there).

Expert layer norms: each expert owns a copy of the FFN layer norm (`expert_network.layer_norm`), and
the native model has one norm per MoE layer (SEED.md: shared by the experts). When the copies are
equal it is used as is. When they differ, `fold_expert_norm` makes the conversion exact for every
expert anyway: the norm becomes all ones, expert e's `wi_0` / `wi_1` absorb its own weight
(W·diag(γ_e)), and the router absorbs the experts' mean weight (training routed each token with the
norm of whichever worker it landed on, so no single copy is the right one).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from engine.config import ModelConfig, MoEConfig
from engine.errors import ConfigError, UnsupportedModelError
from engine.tokenizer.wordpiece import read_vocab
from engine.weights.keys import split_block_key

Merge = Literal["rows", "columns", "replicated"]

#: Shapes of the released models (`src/configs/model/enc_dec_xlarge_config.json`, SEED.md), used
#: when no config is given; the vocabulary size is read from the checkpoint.
RELEASED_CONFIG: dict[str, Any] = {
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_heads": 64,
    "num_layers": 24,
    "num_decoder_layers": 24,
    "relative_attention_num_buckets": 32,
    "layer_norm_epsilon": 1e-6,
}
#: Special tokens of the released `vocab.txt` (`<unk>`, `<s>`, `</s>`, ..., `<pad>` = 5, `<eod>` = 8).
#: CPM-2-Finetune starts decoding with `<s>` (id 1); generation ends at `<eod>`.
RELEASED_SPECIAL_IDS = {"pad": 5, "eos": 8, "start": 1}
_SPECIAL_TOKENS = {"pad": "<pad>", "eos": "<eod>", "start": "<s>"}

#: Aliases of the shared embedding held by each stack; present or not, they are skipped.
IGNORED_KEYS = re.compile(r"^(encoder|decoder)\.word_embeds\.weight$")
_REQUIRED_FIELDS = ("d_model", "d_kv", "d_ff", "num_heads", "num_layers")


def rank_file_name(rank: int, expert: int | None = None) -> str:
    """File of model-parallel rank `rank` (of expert `expert` in an MoE checkpoint)."""
    if expert is None:
        return f"mp_rank_{rank:02d}_model_states.pt"
    return f"mp_rank_{expert:02d}_{rank:02d}_model_states.pt"


def special_token_ids(vocab_file: Path | None) -> dict[str, int]:
    """`pad` / `eos` / `start` ids: their line numbers in `vocab_file`, else the released vocabulary's."""
    if vocab_file is None or not vocab_file.is_file():
        return dict(RELEASED_SPECIAL_IDS)
    # Read exactly as the tokenizer reads it (a repeated piece takes its last line), so the ids the
    # config records are the ids the tokenizer produces.
    ids = {piece: i for i, piece in enumerate(read_vocab(vocab_file))}
    return {name: ids.get(token, RELEASED_SPECIAL_IDS[name]) for name, token in _SPECIAL_TOKENS.items()}


def cpm2_to_config(
    data: dict[str, Any],
    *,
    source: str,
    vocab_size: int,
    num_experts: int | None,
    special_ids: dict[str, int],
) -> ModelConfig:
    """A `ModelConfig` from a CPM-2 JSON config (`EncDecConfig` names) and what the checkpoint says.

    `vocab_size` and `num_experts` (None: dense) come from the checkpoint when the JSON lacks them
    (the released config has no vocabulary size); a JSON value that disagrees is an error.
    """
    missing = [name for name in _REQUIRED_FIELDS if name not in data]
    if missing:
        needed = ", ".join(_REQUIRED_FIELDS)
        raise ConfigError(f"{source}: missing {', '.join(missing)} (a CPM-2 config names {needed})")
    if data.get("attn_scale"):
        raise UnsupportedModelError(f"{source}: attn_scale=true (scaled attention) is not the CPM-2 architecture")
    for name, found in (("vocab_size", vocab_size), ("num_experts", num_experts)):
        if data.get(name) is not None and data[name] != found:
            held = "none (dense mp_rank_RR files)" if found is None else found
            raise ConfigError(f"{source}: {name} is {data[name]} but the checkpoint holds {held}; fix the config")
    moe = None
    num_layers = int(data["num_layers"])
    num_decoder_layers = int(data.get("num_decoder_layers") or num_layers)
    if num_experts is not None:
        # CPM-2-MoE: every feed-forward of both stacks is an MoE layer (SEED.md).
        moe = MoEConfig(
            num_experts=num_experts,
            router="centroid",
            encoder_layers=tuple(range(num_layers)),
            decoder_layers=tuple(range(num_decoder_layers)),
        )
    return ModelConfig(
        family="cpm2",
        vocab_size=vocab_size,
        d_model=int(data["d_model"]),
        num_heads=int(data["num_heads"]),
        d_kv=int(data["d_kv"]),
        d_ff=int(data["d_ff"]),
        num_encoder_layers=num_layers,
        num_decoder_layers=num_decoder_layers,
        activation="gelu_new",
        is_gated_ffn=True,
        relative_attention_num_buckets=int(data.get("relative_attention_num_buckets", 32)),
        relative_attention_max_distance=int(data.get("relative_attention_max_distance", 128)),
        layer_norm_eps=float(data.get("layer_norm_epsilon", 1e-6)),
        tie_word_embeddings=False,
        scale_decoder_output=False,
        pad_token_id=special_ids["pad"],
        eos_token_id=special_ids["eos"],
        decoder_start_token_id=special_ids["start"],
        moe=moe,
        extra={"source": "cpm2-deepspeed"},
    )


@dataclass(frozen=True)
class SlicePlan:
    """A native tensor, the per-rank tensor it is merged from, and how."""

    native: str
    source: str
    merge: Merge
    stride: int = 1
    """For `rows`: how many projections each rank stacks ([Q_r; K_r; V_r]: 3)."""
    expert: int | None = None
    """MoE: the expert whose files hold the slices; None for the dense part."""


def _plan_one(config: ModelConfig, native: str) -> SlicePlan:
    fixed = {
        "embed.weight": SlicePlan(native, "word_embeds.weight", "rows"),
        "lm_head.weight": SlicePlan(native, "lm_head.weight", "rows"),
    }
    for stack in ("encoder", "decoder"):
        fixed[f"{stack}.final_norm.weight"] = SlicePlan(native, f"{stack}.final_layernorm.weight", "replicated")
        bias = f"{stack}.blocks.0.self_attn.self_attn.relative_attention_bias.weight"
        fixed[f"{stack}.relative_bias.weight"] = SlicePlan(native, bias, "columns")
    if native in fixed:
        return fixed[native]
    stack, block, rest = split_block_key(native)
    b = f"{stack}.blocks.{block}"
    is_moe = block in config.moe_layers(stack)  # type: ignore[arg-type]
    ff = f"{b}.ff.expert_network" if is_moe else f"{b}.ff"
    table: dict[str, tuple[str, Merge, int]] = {
        "attn_norm.weight": (f"{b}.self_attn.layer_norm.weight", "replicated", 1),
        "attn.qkv.weight": (f"{b}.self_attn.self_attn.project.weight", "rows", 3),
        "attn.o.weight": (f"{b}.self_attn.self_attn.dense.weight", "columns", 1),
        "cross_norm.weight": (f"{b}.cross_attn.layer_norm.weight", "replicated", 1),
        "cross.q.weight": (f"{b}.cross_attn.cross_attn.project_q.weight", "rows", 1),
        "cross.kv.weight": (f"{b}.cross_attn.cross_attn.project_kv.weight", "rows", 2),
        "cross.o.weight": (f"{b}.cross_attn.cross_attn.dense.weight", "columns", 1),
        "ff_norm.weight": (f"{ff}.layer_norm.weight", "replicated", 1),
        "mlp.router.centroids": (f"{b}.ff.expert_centroids", "replicated", 1),
        "mlp.wi_0.weight": (f"{ff}.dense_relu_dense.wi_0.weight", "rows", 1),
        "mlp.wi_1.weight": (f"{ff}.dense_relu_dense.wi_1.weight", "rows", 1),
        "mlp.wo.weight": (f"{ff}.dense_relu_dense.wo.weight", "columns", 1),
    }
    if rest in table:
        source, merge, stride = table[rest]
        return SlicePlan(native, source, merge, stride)
    m = re.fullmatch(r"mlp\.experts\.(\d+)\.(wi_0|wi_1|wo)\.weight", rest)
    if m is not None:
        split: Merge = "columns" if m.group(2) == "wo" else "rows"
        return SlicePlan(native, f"{ff}.dense_relu_dense.{m.group(2)}.weight", split, expert=int(m.group(1)))
    raise KeyError(native)


def cpm2_key_plan(config: ModelConfig, native_keys: Iterable[str]) -> list[SlicePlan]:
    """For every native key, the CPM-2 tensor it is merged from."""
    return [_plan_one(config, key) for key in native_keys]


def merged_shape(plan: SlicePlan, shapes: list[tuple[int, ...]]) -> tuple[int, ...] | None:
    """The merged shape of per-rank `shapes`, or None when they cannot be merged by `plan`."""
    first = shapes[0]
    if any(s != first for s in shapes):  # Megatron splits evenly; replicas are the same shape
        return None
    if plan.merge == "replicated":
        return first
    dim = 0 if plan.merge == "rows" else 1
    if len(first) != 2 or first[0] % plan.stride:
        return None
    return tuple(n * len(shapes) if d == dim else n for d, n in enumerate(first))


def merge_slices(plan: SlicePlan, parts: list[torch.Tensor]) -> torch.Tensor:
    """The full tensor from its per-rank slices (in rank order)."""
    if plan.merge == "replicated":
        return parts[0]
    if plan.merge == "columns":
        return torch.cat(parts, dim=1)
    # [Q_0; K_0; V_0], [Q_1; K_1; V_1], ... → [Q_0; Q_1; ...; K_0; K_1; ...; V_0; ...]
    pieces = [part.chunk(plan.stride, dim=0) for part in parts]
    return torch.cat([rank[i] for i in range(plan.stride) for rank in pieces], dim=0)


def fold_expert_norm(plan: SlicePlan, tensor: torch.Tensor, norms: list[torch.Tensor]) -> torch.Tensor:
    """`tensor` rewritten so an MoE layer whose experts' norm weights `norms` differ stays exact.

    RMSNorm(x)·γ feeds only linear maps (the router and each expert's `wi_0` / `wi_1`), so γ moves
    into their columns; the shared norm becomes all ones. Math in float32, cast back once.
    """
    dtype = tensor.dtype
    if plan.native.endswith("ff_norm.weight"):
        return torch.ones_like(tensor)
    if plan.native.endswith("router.centroids"):
        gamma = torch.stack([n.float() for n in norms]).mean(dim=0)
        return (tensor.float() * gamma).to(dtype)
    if plan.expert is not None and plan.merge == "rows":  # wi_0 / wi_1 of expert e
        return (tensor.float() * norms[plan.expert].float()).to(dtype)
    return tensor
