"""Shared fixtures: tiny seeded models built by the tests themselves (nothing is downloaded).

`hf_model_dirs` holds random-weight Hugging Face models (the reference implementation) saved the way
`save_pretrained` writes them; `tiny_model_dir` is a native CPM-2-architecture model with a trained
SentencePiece tokenizer, written by `cpm2 init`'s code path.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from quantized_models import INT4_TEST_GROUP

from engine.model import kernels
from engine.weights.init import write_random_model
from engine.weights.presets import get_preset
from engine.weights.quantize import quantize_model

UNTIED_HEAD = "_untied_head"

# Each entry: (HF model class name, config class name, config kwargs). Different expert counts,
# sparse steps, capacities and layer counts so that every branch of the key map is exercised.
HF_CASES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "t5-v1.0": (
        "T5ForConditionalGeneration",
        "T5Config",
        {"num_layers": 3, "num_decoder_layers": 2, "feed_forward_proj": "relu"},
    ),
    "t5-v1.1": (
        "T5ForConditionalGeneration",
        "T5Config",
        {"num_layers": 2, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False},
    ),
    "mt5": ("MT5ForConditionalGeneration", "MT5Config", {"num_layers": 2}),
    # Real T5 v1.1 / mT5 checkpoints store a separate lm_head.weight; transformers 5.x ties it on
    # construction, so this case unties it by hand and saves both tensors.
    "t5-v1.1-untied-head": (
        "T5ForConditionalGeneration",
        "T5Config",
        {"num_layers": 2, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False, UNTIED_HEAD: True},
    ),
    "switch-4e-step2": (
        "SwitchTransformersForConditionalGeneration",
        "SwitchTransformersConfig",
        {
            "num_layers": 4,
            "num_decoder_layers": 4,
            "num_sparse_encoder_layers": 2,
            "num_sparse_decoder_layers": 2,
            "num_experts": 4,
            "expert_capacity": 64,
        },
    ),
    "switch-8e-capacity": (
        "SwitchTransformersForConditionalGeneration",
        "SwitchTransformersConfig",
        {
            "num_layers": 3,
            "num_decoder_layers": 3,
            "num_sparse_encoder_layers": 3,
            "num_sparse_decoder_layers": 1,
            "num_experts": 8,
            "expert_capacity": 3,
        },
    ),
}

# M2M-100 / NLLB-200 (`model_type: m2m_100`), kept apart from HF_CASES because their special ids
# differ from T5's (pad 1, </s> 2 as EOS and decoder start). Encoder and decoder depths differ, with
# and without embedding scaling, two activations; `nllb-200` has the fields of
# facebook/nllb-200-distilled-600M's config.json at a tiny size.
M2M100_CASES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "m2m100": (
        "M2M100ForConditionalGeneration",
        "M2M100Config",
        {"encoder_layers": 3, "decoder_layers": 2, "scale_embedding": True},
    ),
    "m2m100-unscaled-gelu": (
        "M2M100ForConditionalGeneration",
        "M2M100Config",
        {
            "vocab_size": 211,
            "d_model": 48,
            "encoder_ffn_dim": 80,
            "decoder_ffn_dim": 80,
            "encoder_layers": 2,
            "decoder_layers": 3,
            "scale_embedding": False,
            "activation_function": "gelu",
        },
    ),
    "nllb-200": (
        "M2M100ForConditionalGeneration",
        "M2M100Config",
        {
            "vocab_size": 300,
            "d_model": 64,
            "encoder_ffn_dim": 128,
            "decoder_ffn_dim": 128,
            "encoder_layers": 3,
            "decoder_layers": 2,
            "activation_function": "relu",
            "activation_dropout": 0.0,
            "attention_dropout": 0.1,
            "dropout": 0.1,
            "encoder_layerdrop": 0,
            "decoder_layerdrop": 0,
            "max_position_embeddings": 1024,
            "scale_embedding": True,
            "tokenizer_class": "NllbTokenizer",
        },
    ),
}

M2M100_COMMON = {
    "vocab_size": 160,
    "d_model": 32,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
    "max_position_embeddings": 64,
    "bos_token_id": 0,
    "pad_token_id": 1,
    "eos_token_id": 2,
    "decoder_start_token_id": 2,
    # Larger than HF's 0.02, so that logits spread and a wrong detail shows.
    "init_std": 0.3,
}

HF_COMMON = {
    "vocab_size": 160,
    "d_model": 32,
    "d_kv": 8,
    "d_ff": 64,
    "num_heads": 4,
    "decoder_start_token_id": 0,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "relative_attention_num_buckets": 8,
    "relative_attention_max_distance": 20,
}


def build_hf_model(name: str, seed: int = 0, **overrides: Any) -> Any:
    """A random-weight HF model of case `name` in eval mode; `overrides` replace config fields."""
    import transformers

    is_m2m100 = name in M2M100_CASES
    model_cls, config_cls, kwargs = M2M100_CASES[name] if is_m2m100 else HF_CASES[name]
    kwargs = {**(M2M100_COMMON if is_m2m100 else HF_COMMON), **kwargs, **overrides}
    untied = kwargs.pop(UNTIED_HEAD, False)
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**kwargs)
    model = getattr(transformers, model_cls)(config).eval()
    if untied:
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    if is_m2m100:
        # HF initialises biases to 0 and LayerNorms to 1, which would hide a bias or norm mapped wrong.
        with torch.no_grad():
            for key, param in model.named_parameters():
                if key.endswith(".bias") or "layer_norm" in key:
                    param.add_(torch.randn_like(param) * 0.2)
    return model


def save_hf_model(model: Any, path: Path) -> None:
    """`save_pretrained`, except that an untied head is written as its own tensor."""
    if model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr():
        model.save_pretrained(path)
        return
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    model.config.save_pretrained(path)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if "embed_tokens" not in k}
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


def _save_cases(root: Path, cases: dict[str, Any]) -> dict[str, Path]:
    """Each case built with seed = its position and saved under `root / name`."""
    dirs = {}
    for i, name in enumerate(cases):
        dirs[name] = root / name
        save_hf_model(build_hf_model(name, seed=i), dirs[name])
    return dirs


@pytest.fixture(scope="session")
def hf_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every HF case saved with `save_pretrained` (safetensors), by name."""
    return _save_cases(tmp_path_factory.mktemp("hf"), HF_CASES)


@pytest.fixture(scope="session")
def m2m100_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every M2M-100 / NLLB-200 case saved with `save_pretrained` (safetensors), by name."""
    return _save_cases(tmp_path_factory.mktemp("m2m100"), M2M100_CASES)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A native tiny CPM-2-architecture MoE model with its tokenizer (read-only: do not modify)."""
    path = tmp_path_factory.mktemp("native") / "tiny"
    write_random_model(get_preset("tiny").config, path, seed=0, progress=False)
    return path


@pytest.fixture(scope="session", params=["tiny-cpm2", "switch-8e"])
def source_dir(request: pytest.FixtureRequest, tiny_model_dir: Path, hf_model_dirs: dict[str, Path]) -> Path:
    """A float MoE model to quantise: the native tiny CPM-2, and an HF Switch (read-only)."""
    return tiny_model_dir if request.param == "tiny-cpm2" else hf_model_dirs["switch-8e-capacity"]


@pytest.fixture(scope="session")
def int8_dir(source_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`source_dir` with int8 experts, by `cpm2 quantize` (read-only)."""
    out = tmp_path_factory.mktemp("int8") / "model"
    quantize_model(source_dir, out, experts="int8", check_inputs=2, progress=False)
    return out


@pytest.fixture(scope="session")
def int4_dir(source_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`source_dir` with int4 experts in groups of `INT4_TEST_GROUP`, this machine's packing (read-only)."""
    out = tmp_path_factory.mktemp("int4") / "model"
    quantize_model(source_dir, out, experts="int4", group_size=INT4_TEST_GROUP, check_inputs=2, progress=False)
    return out


@pytest.fixture
def random_ids() -> Callable[..., list[list[int]]]:
    """Ragged rows of random token ids (no pad/eos), reproducible per call arguments."""

    def make(lengths: list[int], *, vocab: int = HF_COMMON["vocab_size"], seed: int = 0) -> list[list[int]]:
        gen = torch.Generator().manual_seed(seed)
        return [torch.randint(2, vocab, (n,), generator=gen).tolist() for n in lengths]

    return make


def pytest_configure(config: pytest.Config) -> None:
    # Tiny models gain nothing from intra-op threads, and one thread keeps the suite's timing
    # steady when something else is using the other core.
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _cpu_kernels_per_test(monkeypatch: pytest.MonkeyPatch) -> None:
    """The process's CPU kernel table as it was before each test, whatever the test chose (a CLI
    run with `--cpu-kernels plain` must not send the tests after it down the plain path)."""
    monkeypatch.setattr(kernels, "_active", kernels.active_kernels())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
