"""Named model shapes for `cpm2 init`: tiny ones for tests, real ones for sizing and benchmarks.

`cpm2-11b` and `cpm2-moe-198b` are the CPM-2 shapes of SEED.md (24+24 layers, d_model 4096, 64 heads
of 64, d_ff 10240, vocabulary 26,240; the MoE variant has 32 experts in every block).
`switch-base-like` has the shape of google/switch-base-8 (T5-base body, 8 experts in every other
block, learned top-1 router, capacity 64).
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.config import ModelConfig, MoEConfig
from engine.errors import ConfigError


@dataclass(frozen=True)
class Preset:
    """A model shape and the dtype it is written in."""

    config: ModelConfig
    dtype: str
    description: str


def _cpm2(*, layers: int, d_model: int, heads: int, d_ff: int, vocab: int, experts: int | None) -> ModelConfig:
    moe = None
    if experts is not None:
        every = tuple(range(layers))
        moe = MoEConfig(num_experts=experts, router="centroid", encoder_layers=every, decoder_layers=every)
    return ModelConfig(
        family="cpm2",
        vocab_size=vocab,
        d_model=d_model,
        num_heads=heads,
        d_kv=d_model // heads,
        d_ff=d_ff,
        num_encoder_layers=layers,
        num_decoder_layers=layers,
        activation="gelu_new",
        is_gated_ffn=True,
        tie_word_embeddings=False,
        scale_decoder_output=False,
        moe=moe,
    )


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        _cpm2(layers=2, d_model=64, heads=4, d_ff=128, vocab=1152, experts=4),
        "float32",
        "CPM-2 architecture, 2+2 layers, d_model 64, 4 experts per block (tests, the built-in demo)",
    ),
    "demo-dense": Preset(
        _cpm2(layers=3, d_model=128, heads=4, d_ff=256, vocab=1152, experts=None),
        "float32",
        "CPM-2 architecture, dense, 3+3 layers, d_model 128: the demo model before upcycling (make demo-model)",
    ),
    "small": Preset(
        _cpm2(layers=6, d_model=512, heads=8, d_ff=1024, vocab=4224, experts=16),
        "float32",
        "CPM-2 architecture, 6+6 layers, d_model 512, 16 experts per block (benchmarks)",
    ),
    "switch-base-like": Preset(
        ModelConfig(
            family="switch_transformers",
            vocab_size=32128,
            d_model=768,
            num_heads=12,
            d_kv=64,
            d_ff=3072,
            num_encoder_layers=12,
            num_decoder_layers=12,
            activation="relu",
            is_gated_ffn=False,
            tie_word_embeddings=True,
            scale_decoder_output=True,
            moe=MoEConfig(
                num_experts=8,
                router="learned",
                encoder_layers=tuple(range(1, 12, 2)),
                decoder_layers=tuple(range(1, 12, 2)),
                expert_capacity=64,
            ),
        ),
        "float32",
        "google/switch-base-8 shape: 12+12 layers, d_model 768, 8 experts in every other block",
    ),
    "cpm2-11b": Preset(
        _cpm2(layers=24, d_model=4096, heads=64, d_ff=10240, vocab=26240, experts=None),
        "float16",
        "CPM-2 dense, 11B parameters (SEED.md shape)",
    ),
    "cpm2-moe-198b": Preset(
        _cpm2(layers=24, d_model=4096, heads=64, d_ff=10240, vocab=26240, experts=32),
        "float16",
        "CPM-2-MoE, 198B parameters, 32 experts in all 48 blocks (~397 GB in fp16)",
    ),
}


def get_preset(name: str) -> Preset:
    """The preset called `name`; an unknown name lists the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
