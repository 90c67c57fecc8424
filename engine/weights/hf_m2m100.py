"""Hugging Face M2M-100 and NLLB-200 checkpoints (`model_type: m2m_100`): config and key map.

NLLB-200 (dense, distilled or not) is an M2M-100 model with another vocabulary and tokenizer; both are
fairseq's pre-norm Transformer. Facts this follows (HF transformers 5.x `modeling_m2m_100.py` and
`configuration_m2m_100.py`, checked by tests/test_parity_m2m100.py):
- Every norm is `nn.LayerNorm(d_model)`: bias, epsilon 1e-5 (no config field sets it); each stack ends
  with one (`layer_norm`).
- Every attention projection has a bias and the scores are scaled by 1/sqrt(head width); the FFN is
  `fc2(act(fc1 x))` with biases, `activation_function` (relu for every released checkpoint).
- Token embeddings are scaled by sqrt(d_model) when `scale_embedding` (default true), and
  sinusoidal positions with fairseq's padding offset are added (`padding_idx` = `pad_token_id`).
  HF grows the position table past `max_position_embeddings` on demand, so that field limits nothing;
  it is kept in `extra`.
- `model.encoder.embed_tokens`, `model.decoder.embed_tokens` and `lm_head` are `model.shared` (the
  head is not scaled by d_model^-0.5). With `tie_word_embeddings: false`, transformers 5.x gives all
  four their own matrices, which cpm2's one embedding cannot hold; no released checkpoint does that,
  and such a config is refused. Older checkpoints also hold the position tables
  (`embed_positions.weights`), which are computed.
- Decoding starts from `decoder_start_token_id` (`</s>`, 2); padding is 1, end of sequence 2.
- Encoder and decoder may in principle differ in heads and FFN width; released checkpoints do not,
  and cpm2's config has one value for each, so such a config is refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from engine.config import Activation, ModelConfig
from engine.errors import CheckpointError, UnsupportedModelError
from engine.weights.keys import split_block_key

MODEL_TYPE = "m2m_100"

# HF `ACT2FN` names → cpm2 activations with the same arithmetic (`gelu` is the erf form, as F.gelu).
_ACTIVATIONS: dict[str, Activation] = {
    "relu": "relu",
    "gelu": "gelu",
    "gelu_new": "gelu_new",
    "silu": "silu",
    "swish": "silu",
}

#: Epsilon of `nn.LayerNorm`, which M2M-100 uses without setting it.
LAYER_NORM_EPS = 1e-5

_ALIASES = (
    r"model\.(encoder|decoder)\.embed_tokens\.weight",
    r"model\.(encoder|decoder)\.embed_positions\.(weights|_float_tensor)",
    r"model\.(encoder|decoder)\.version",
)


def ignored_keys(config: ModelConfig) -> re.Pattern[str]:
    """Stored tensors that are aliases of another one or computed: skipped, present or not."""
    aliases = (*_ALIASES, r"lm_head\.weight") if config.tie_word_embeddings else _ALIASES
    return re.compile(rf"^({'|'.join(aliases)})$")


def _int(data: dict[str, Any], key: str, default: int, *, source: str) -> int:
    value = data.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(f"{source}: {key} must be an integer, got {value!r}")
    return value


def _same(data: dict[str, Any], name: str, default: int, *, source: str) -> int:
    encoder = _int(data, f"encoder_{name}", default, source=source)
    decoder = _int(data, f"decoder_{name}", default, source=source)
    if encoder != decoder:
        raise UnsupportedModelError(
            f"{source}: encoder_{name} {encoder} differs from decoder_{name} {decoder}; cpm2 runs M2M-100 "
            "models whose encoder and decoder have the same shape (every released M2M-100 and NLLB-200 does)"
        )
    return encoder


def m2m100_to_config(data: dict[str, Any], *, source: str) -> ModelConfig:
    """Translate an HF `m2m_100` `config.json` (parsed) into a `ModelConfig` (M2M100Config's defaults)."""
    d_model = _int(data, "d_model", 1024, source=source)
    num_heads = _same(data, "attention_heads", 16, source=source)
    if num_heads < 1 or d_model % num_heads:
        raise CheckpointError(f"{source}: d_model {d_model} is not a multiple of the {num_heads} attention heads")
    act_name = str(data.get("activation_function", "relu"))
    if act_name not in _ACTIVATIONS:
        raise UnsupportedModelError(
            f"{source}: activation_function {act_name!r} is not supported; cpm2 runs {sorted(_ACTIVATIONS)}"
        )
    eos = data.get("eos_token_id", 2)
    if isinstance(eos, list):
        eos = eos[0]
    if data.get("tie_word_embeddings", True) is False:
        raise UnsupportedModelError(
            f"{source}: tie_word_embeddings is false, which gives the encoder, the decoder and the output "
            "head separate embeddings (transformers 5.x); cpm2 runs M2M-100 models with one shared embedding, "
            "as every released M2M-100 and NLLB-200 checkpoint has"
        )
    extra: dict[str, Any] = {"source": "hf", "model_type": MODEL_TYPE}
    for key in ("max_position_embeddings", "tokenizer_class"):
        if key in data:
            extra[key] = data[key]
    return ModelConfig(
        family=MODEL_TYPE,
        vocab_size=_int(data, "vocab_size", 128112, source=source),
        d_model=d_model,
        num_heads=num_heads,
        d_kv=d_model // num_heads,
        d_ff=_same(data, "ffn_dim", 4096, source=source),
        num_encoder_layers=_int(data, "encoder_layers", 12, source=source),
        num_decoder_layers=_int(data, "decoder_layers", 12, source=source),
        activation=_ACTIVATIONS[act_name],
        is_gated_ffn=False,
        position_embedding="sinusoidal",
        scale_embedding=bool(data.get("scale_embedding", True)),
        norm="layer",
        layer_norm_eps=LAYER_NORM_EPS,
        has_attention_bias=True,
        has_ffn_bias=True,
        scale_attention_scores=True,
        tie_word_embeddings=True,
        scale_decoder_output=False,
        pad_token_id=_int(data, "pad_token_id", 1, source=source),
        eos_token_id=2 if eos is None else int(eos),
        decoder_start_token_id=_int(data, "decoder_start_token_id", 2, source=source),
        extra=extra,
    )


@dataclass(frozen=True)
class LayerNames:
    """What HF calls a block's modules (NLLB-MoE renames some of M2M-100's)."""

    cross: str = "encoder_attn"
    cross_norm: str = "encoder_attn_layer_norm"
    ff_norm: str = "final_layer_norm"
    ffn: str = ""
    """Prefix of the dense FFN's `fc1` / `fc2` (empty: they sit in the layer itself)."""


M2M100_NAMES = LayerNames()


def m2m100_sources(native: str, names: LayerNames = M2M100_NAMES) -> tuple[str, ...]:
    """HF tensor names making up native tensor `native` (raises KeyError for an unmapped name)."""
    fixed = {
        "embed.weight": ("model.shared.weight",),
        "lm_head.weight": ("lm_head.weight",),
        "encoder.final_norm.weight": ("model.encoder.layer_norm.weight",),
        "encoder.final_norm.bias": ("model.encoder.layer_norm.bias",),
        "decoder.final_norm.weight": ("model.decoder.layer_norm.weight",),
        "decoder.final_norm.bias": ("model.decoder.layer_norm.bias",),
    }
    if native in fixed:
        return fixed[native]
    stack, block, rest = split_block_key(native)
    layer = f"model.{stack}.layers.{block}"
    attn, cross = f"{layer}.self_attn", f"{layer}.{names.cross}"
    ffn = f"{layer}.{names.ffn}." if names.ffn else f"{layer}."
    module, _, kind = rest.rpartition(".")
    if kind not in ("weight", "bias"):
        raise KeyError(native)
    table = {
        "attn_norm": (f"{layer}.self_attn_layer_norm.{kind}",),
        "attn.qkv": (f"{attn}.q_proj.{kind}", f"{attn}.k_proj.{kind}", f"{attn}.v_proj.{kind}"),
        "attn.o": (f"{attn}.out_proj.{kind}",),
        "cross_norm": (f"{layer}.{names.cross_norm}.{kind}",),
        "cross.q": (f"{cross}.q_proj.{kind}",),
        "cross.kv": (f"{cross}.k_proj.{kind}", f"{cross}.v_proj.{kind}"),
        "cross.o": (f"{cross}.out_proj.{kind}",),
        "ff_norm": (f"{layer}.{names.ff_norm}.{kind}",),
        "mlp.wi": (f"{ffn}fc1.{kind}",),
        "mlp.wo": (f"{ffn}fc2.{kind}",),
    }
    if module not in table:
        raise KeyError(native)
    return table[module]
