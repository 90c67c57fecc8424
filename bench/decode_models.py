"""The models `bench.decode_vs_hf` measures, by name: an HF model class and its config arguments.

Each is built with random weights (the shape, not the training, decides decode speed), written once
with `save_pretrained`, and loaded by both systems from that directory.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import transformers

from engine.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class BenchModel:
    """One benchmark model."""

    name: str
    """`--model` name; also names the checkpoint directory and the results file."""
    hf_class: str
    """HF transformers model class, e.g. `M2M100ForConditionalGeneration`; its `config_class` takes `config`."""
    config: Mapping[str, Any]
    """Arguments of the HF config class."""
    summary: str
    """One line for tables and plots."""
    min_prompt_id: int = 2
    """Smallest id a random prompt uses; the ids below it are special (pad, end of sequence, ...)."""
    target_batch_sizes: tuple[int, ...] = (1,)
    """Batch sizes at which cpm2 should reach the target ratio over HF."""
    forced_first_token: int | None = None
    """A token both systems emit first (HF `forced_bos_token_id`, cpm2 `SamplingParams.forced_tokens`),
    as a translation model decodes with its target language forced first; None: none."""

    def __post_init__(self) -> None:
        if self.min_prompt_id < 0:
            raise ConfigError(f"{self.name}: min_prompt_id must be >= 0, got {self.min_prompt_id}")
        vocab_size = self.config.get("vocab_size")
        if self.forced_first_token is not None and not 0 <= self.forced_first_token < (vocab_size or 2**63):
            raise ConfigError(
                f"{self.name}: forced_first_token {self.forced_first_token} is not an id of the "
                f"{vocab_size}-token vocabulary"
            )
        if not self.target_batch_sizes or any(b < 1 for b in self.target_batch_sizes):
            raise ConfigError(f"{self.name}: target batch sizes must be positive, got {self.target_batch_sizes}")

    def hf_model_class(self) -> Any:
        """The HF model class (`from_pretrained` loads the checkpoint with it)."""
        cls = getattr(transformers, self.hf_class, None)
        if cls is None:
            raise ConfigError(
                f"{self.name}: transformers {transformers.__version__} has no {self.hf_class}; "
                "upgrade transformers or pick another --model"
            )
        return cls

    def hf_config(self) -> Any:
        """The HF config object the random checkpoint is built from."""
        return self.hf_model_class().config_class(**self.config)


#: HF `SwitchTransformersConfig` arguments of the default benchmark checkpoint.
SWITCH_D512_E64: dict[str, Any] = {
    "vocab_size": 8192,
    "d_model": 512,
    "d_kv": 64,
    "d_ff": 2048,
    "num_heads": 8,
    "num_layers": 6,
    "num_decoder_layers": 6,
    "num_sparse_encoder_layers": 3,
    "num_sparse_decoder_layers": 3,
    "num_experts": 64,
    "expert_capacity": 64,
    "decoder_start_token_id": 0,
    "pad_token_id": 0,
    "eos_token_id": 1,
}

#: The architecture fields of facebook/nllb-200-distilled-600M's config.json, as published (its
#: generation default `max_length` 200 and bookkeeping fields left out; dropouts do not act in eval
#: mode but are kept as published). 615M parameters; the tied 256206 × 1024 embedding is 262M of them.
NLLB_200_DISTILLED_600M: dict[str, Any] = {
    "vocab_size": 256206,
    "d_model": 1024,
    "encoder_layers": 12,
    "decoder_layers": 12,
    "encoder_attention_heads": 16,
    "decoder_attention_heads": 16,
    "encoder_ffn_dim": 4096,
    "decoder_ffn_dim": 4096,
    "activation_function": "relu",
    "scale_embedding": True,
    "max_position_embeddings": 1024,
    "init_std": 0.02,
    "dropout": 0.1,
    "attention_dropout": 0.1,
    "activation_dropout": 0.0,
    "encoder_layerdrop": 0,
    "decoder_layerdrop": 0,
    "use_cache": True,
    "is_encoder_decoder": True,
    "bos_token_id": 0,
    "pad_token_id": 1,
    "eos_token_id": 2,
    "decoder_start_token_id": 2,
}

BENCH_MODELS: dict[str, BenchModel] = {
    m.name: m
    for m in (
        BenchModel(
            name="switch-d512-e64",
            hf_class="SwitchTransformersForConditionalGeneration",
            config=SWITCH_D512_E64,
            summary="Switch d512, 64 experts, 6+6 layers",
        ),
        BenchModel(
            name="nllb-200-distilled-600m",
            hf_class="M2M100ForConditionalGeneration",
            config=NLLB_200_DISTILLED_600M,
            summary="NLLB-200-distilled-600M shape (dense, d1024, 12+12 layers, vocab 256206)",
            # <s> 0, <pad> 1, </s> 2, <unk> 3.
            min_prompt_id=4,
            target_batch_sizes=(1, 16),
            # eng_Latn (256000 + its index 47 among the language codes): translation into English.
            forced_first_token=256047,
        ),
    )
}
DEFAULT_MODEL = "switch-d512-e64"
