"""Hugging Face T5 / mT5 / Switch Transformers / M2M-100 / NLLB-200 checkpoints: the one place their
names are translated.

Config: `hf_to_config` turns an HF `config.json` into a `ModelConfig`. Weights: `hf_key_plan` says,
for every native parameter, which HF tensors it is made of (several when cpm2 fuses projections:
`qkv` = [q; k; v], `kv` = [k; v], biases alike), and `ignored_hf_keys` which stored tensors are
aliases to skip. Model code never sees an HF name. M2M-100 (and NLLB-200, `model_type: m2m_100`) has
its own translation in `engine.weights.hf_m2m100`, NLLB-MoE (`nllb-moe`) in `engine.weights.hf_nllb_moe`;
this module dispatches to them.

Facts this follows (HF transformers 5.x modeling files, checked by the parity tests):
- Switch places MoE in block i of a stack when `step > 0 and (i % step == 1 or step == 1)`
  (`SwitchTransformersStack.__init__`), step = the config's `encoder_sparse_step` /
  `decoder_sparse_step`. `save_pretrained` writes both, and a stored step wins over the one
  `SwitchTransformersConfig.__post_init__` derives from `num_sparse_*_layers` (the base
  `PreTrainedConfig.__post_init__` sets leftover kwargs afterwards), so the fields may disagree.
  Only a config.json without the step gets the derived one: layers // num_sparse if num_sparse > 0,
  else layers, which still makes block 1 (block 0 of a one-block stack) an MoE block. Transformers
  4.x (config `__init__` then `PretrainedConfig.__init__(**kwargs)`) does the same from v4.37 on;
  before it (PR #28564) step 1 made no block sparse, so such a checkpoint is dense where HF 5.x and
  cpm2 expect experts.
- Switch's `expert_capacity` defaults to 64 and caps, per sequence, the tokens one expert takes
  (`SwitchTransformersTop1Router`: `cumsum <= capacity`), so a negative one drops every token.
- T5 v1.0 / Switch with tied embeddings scale the last decoder state by d_model^-0.5; T5 v1.1 and
  mT5 do not. A checkpoint without `lm_head.weight` uses the shared embedding as the head.
- The decoder's cross-attention never has a relative bias; HF still saves one in some checkpoints,
  which is ignored.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from engine.config import Activation, ModelConfig, MoEConfig
from engine.errors import CheckpointError, UnsupportedModelError
from engine.weights import hf_m2m100, hf_nllb_moe
from engine.weights.keys import split_block_key

SUPPORTED_MODEL_TYPES = ("t5", "mt5", "switch_transformers", hf_m2m100.MODEL_TYPE, hf_nllb_moe.MODEL_TYPE)

_ACTIVATIONS: dict[str, Activation] = {"relu": "relu", "gelu_new": "gelu_new", "gelu": "gelu", "silu": "silu"}

#: T5 / Switch keys that are aliases of another tensor or unused by the math; present or not, they are
#: skipped (`ignored_hf_keys` gives the pattern of any model).
IGNORED_HF_KEYS = re.compile(
    r"^(encoder\.embed_tokens\.weight|decoder\.embed_tokens\.weight"
    r"|decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight)$"
)


def ignored_hf_keys(config: ModelConfig) -> re.Pattern[str]:
    """The stored tensors of `config`'s HF layout that are aliases or unused (skipped when loading)."""
    if config.family in (hf_m2m100.MODEL_TYPE, hf_nllb_moe.MODEL_TYPE):
        return hf_m2m100.ignored_keys(config)
    return IGNORED_HF_KEYS


def is_hf_config(data: dict[str, Any]) -> bool:
    """Whether a parsed `config.json` is a Hugging Face one (it names a `model_type`)."""
    return "model_type" in data and data.get("format") != "cpm2"


def _config_int(data: dict[str, Any], key: str, *, source: str, fix: str) -> int:
    value = data[key]
    # bool is an int subclass, and HF would even run `true` as 1; neither is a meaningful value here.
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(f"{source}: {key} must be an integer, got {value!r}; {fix}")
    return value


def _switch_sparse_step(data: dict[str, Any], stack: str, num_layers: int, *, source: str) -> int:
    """HF's `{stack}_sparse_step`: the saved one, else the one `SwitchTransformersConfig` derives."""
    step_key, count_key = f"{stack}_sparse_step", f"num_sparse_{stack}_layers"
    if step_key in data:
        fix = (
            f"set it to the spacing of the {stack}'s MoE blocks (MoE in block i when i % step == 1, in "
            f"every block when it is 1, in none when it is <= 0) or delete it to derive it from {count_key}"
        )
        return _config_int(data, step_key, source=source, fix=fix)
    num_sparse = 3  # SwitchTransformersConfig's default
    if count_key in data:
        num_sparse = _config_int(data, count_key, source=source, fix=f"set it to the number of MoE {stack} blocks")
    return num_layers // num_sparse if num_sparse > 0 else num_layers


def _switch_sparse_layers(num_layers: int, step: int) -> tuple[int, ...]:
    if step <= 0:
        return ()
    return tuple(i for i in range(num_layers) if i % step == 1 or step == 1)


def _switch_capacity(data: dict[str, Any], *, source: str) -> int | None:
    if "expert_capacity" not in data:
        return 64  # SwitchTransformersConfig's default
    if data["expert_capacity"] is None:
        # HF cannot run this (5.x rejects it, 4.x fails in the router); cpm2 reads it as "no limit".
        return None
    capacity = _config_int(
        data, "expert_capacity", source=source, fix="set it to the most tokens of a sequence one expert takes"
    )
    # HF keeps a token when its rank among the sequence's tokens for that expert is <= capacity;
    # ranks start at 1, so any capacity below 0 drops every token exactly as 0 does.
    return max(capacity, 0)


def hf_to_config(data: dict[str, Any], *, has_lm_head: bool, source: str) -> ModelConfig:
    """Translate an HF T5 / mT5 / Switch / M2M-100 `config.json` (parsed) into a `ModelConfig`.

    `has_lm_head` says whether the checkpoint stores a separate `lm_head.weight` (T5 family; M2M-100's
    `tie_word_embeddings` decides, and a stored head of a tied model is an alias).
    """
    model_type = data.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"{source}: model_type {model_type!r} is not supported; cpm2 runs "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} and native cpm2 directories"
        )
    if model_type == hf_m2m100.MODEL_TYPE:
        return hf_m2m100.m2m100_to_config(data, source=source)
    if model_type == hf_nllb_moe.MODEL_TYPE:
        return hf_nllb_moe.nllb_moe_to_config(data, source=source)
    num_layers = int(data.get("num_layers", 12))
    num_decoder_layers = int(data.get("num_decoder_layers") or num_layers)
    proj = str(data.get("feed_forward_proj", ""))
    if model_type == "switch_transformers":
        is_gated = False
        act_name = str(data.get("dense_act_fn", "relu"))
    else:
        parts = proj.split("-") if proj else ["relu"]
        is_gated = parts[0] == "gated"
        act_name = "gelu_new" if proj == "gated-gelu" else parts[-1]
        act_name = str(data.get("dense_act_fn", act_name)) if proj == "" else act_name
    if act_name not in _ACTIVATIONS:
        raise UnsupportedModelError(f"{source}: activation {act_name!r} is not supported")

    original_tie = data.get("tie_word_embeddings", True)
    if model_type == "t5":
        scale = bool(data.get("scale_decoder_outputs", original_tie is not False))
    elif model_type == "mt5":
        scale = False
    else:
        scale = bool(original_tie)

    moe = None
    if model_type == "switch_transformers":
        encoder_step = _switch_sparse_step(data, "encoder", num_layers, source=source)
        decoder_step = _switch_sparse_step(data, "decoder", num_decoder_layers, source=source)
        encoder_layers = _switch_sparse_layers(num_layers, encoder_step)
        decoder_layers = _switch_sparse_layers(num_decoder_layers, decoder_step)
        if encoder_layers or decoder_layers:
            moe = MoEConfig(
                num_experts=int(data.get("num_experts", 8)),
                router="learned",
                encoder_layers=encoder_layers,
                decoder_layers=decoder_layers,
                expert_capacity=_switch_capacity(data, source=source),
                router_bias=bool(data.get("router_bias", False)),
                router_dtype=data.get("router_dtype", "float32"),
            )
    pad = data.get("pad_token_id")
    eos = data.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0]
    start = data.get("decoder_start_token_id")
    pad = 0 if pad is None else int(pad)
    return ModelConfig(
        family=str(model_type),
        vocab_size=int(data.get("vocab_size", 32128)),
        d_model=int(data.get("d_model", 512)),
        num_heads=int(data.get("num_heads", 8)),
        d_kv=int(data.get("d_kv", 64)),
        d_ff=int(data.get("d_ff", 2048)),
        num_encoder_layers=num_layers,
        num_decoder_layers=num_decoder_layers,
        activation=_ACTIVATIONS[act_name],
        is_gated_ffn=is_gated,
        relative_attention_num_buckets=int(data.get("relative_attention_num_buckets", 32)),
        relative_attention_max_distance=int(data.get("relative_attention_max_distance", 128)),
        layer_norm_eps=float(data.get("layer_norm_epsilon", 1e-6)),
        tie_word_embeddings=not has_lm_head,
        scale_decoder_output=scale,
        pad_token_id=pad,
        eos_token_id=1 if eos is None else int(eos),
        decoder_start_token_id=pad if start is None else int(start),
        moe=moe,
        extra={"source": "hf", "model_type": model_type},
    )


@dataclass(frozen=True)
class KeyPlan:
    """A native tensor and the HF tensors it is concatenated from (along dim 0), in order."""

    native: str
    sources: tuple[str, ...]


_FFN_NAMES = ("wi", "wi_0", "wi_1", "wo")


def _hf_ff_prefix(config: ModelConfig, stack: str, block: int) -> str:
    layer = 2 if stack == "decoder" else 1
    switch = config.family == "switch_transformers"
    mlp = "mlp" if switch else "DenseReluDense"
    return f"{stack}.block.{block}.layer.{layer}.{mlp}"


def _hf_sources(config: ModelConfig, native: str) -> tuple[str, ...]:
    """HF tensor names making up native tensor `native` (raises KeyError for an unmapped name)."""
    fixed = {
        "embed.weight": ("shared.weight",),
        "lm_head.weight": ("lm_head.weight",),
        "encoder.final_norm.weight": ("encoder.final_layer_norm.weight",),
        "decoder.final_norm.weight": ("decoder.final_layer_norm.weight",),
        "encoder.relative_bias.weight": ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",),
        "decoder.relative_bias.weight": ("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",),
    }
    if native in fixed:
        return fixed[native]
    stack, block, rest = split_block_key(native)
    block_prefix = f"{stack}.block.{block}"
    attn = f"{block_prefix}.layer.0.SelfAttention"
    cross = f"{block_prefix}.layer.1.EncDecAttention"
    ff_layer = 2 if stack == "decoder" else 1
    ff = _hf_ff_prefix(config, stack, block)
    table = {
        "attn_norm.weight": (f"{block_prefix}.layer.0.layer_norm.weight",),
        "attn.qkv.weight": (f"{attn}.q.weight", f"{attn}.k.weight", f"{attn}.v.weight"),
        "attn.o.weight": (f"{attn}.o.weight",),
        "cross_norm.weight": (f"{block_prefix}.layer.1.layer_norm.weight",),
        "cross.q.weight": (f"{cross}.q.weight",),
        "cross.kv.weight": (f"{cross}.k.weight", f"{cross}.v.weight"),
        "cross.o.weight": (f"{cross}.o.weight",),
        "ff_norm.weight": (f"{block_prefix}.layer.{ff_layer}.layer_norm.weight",),
        "mlp.router.classifier.weight": (f"{ff}.router.classifier.weight",),
        "mlp.router.classifier.bias": (f"{ff}.router.classifier.bias",),
    }
    if rest in table:
        return table[rest]
    m = re.fullmatch(r"mlp\.(\w+)\.weight", rest)
    if m and m.group(1) in _FFN_NAMES:
        return (f"{ff}.{m.group(1)}.weight",)
    m = re.fullmatch(r"mlp\.experts\.(\d+)\.(\w+)\.weight", rest)
    if m and m.group(2) in _FFN_NAMES:
        return (f"{ff}.experts.expert_{m.group(1)}.{m.group(2)}.weight",)
    raise KeyError(native)


def hf_key_plan(config: ModelConfig, native_keys: Iterable[str]) -> list[KeyPlan]:
    """For every native key, the HF tensors it is built from."""
    if config.family == hf_m2m100.MODEL_TYPE:
        return [KeyPlan(key, hf_m2m100.m2m100_sources(key)) for key in native_keys]
    if config.family == hf_nllb_moe.MODEL_TYPE:
        return [KeyPlan(key, hf_nllb_moe.nllb_moe_sources(key)) for key in native_keys]
    return [KeyPlan(key, _hf_sources(config, key)) for key in native_keys]
