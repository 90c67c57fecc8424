"""What the quantisation tests share: the int4 group size of their models (conftest's `int4_dir`) and
loading a model with its experts offloaded."""

from __future__ import annotations

from pathlib import Path

from test_offload import _forward

from engine.offload import InferenceModel, OffloadConfig, load_for_inference
from engine.weights.loader import load_model

#: Inputs per scale and zero of the int4 test models.
INT4_TEST_GROUP = 32


def offloaded(model_dir: Path, **options: object) -> InferenceModel:
    """`model_dir` loaded under `OffloadConfig(**options)`, which must offload its experts."""
    loaded = load_for_inference(model_dir, offload=OffloadConfig(**options), progress=False)  # type: ignore[arg-type]
    assert loaded.is_offloaded
    return loaded


def logit_error(source_dir: Path, quantized_dir: Path) -> tuple[float, float]:
    """How far the quantised model's logits are from the float one's on the same inputs: the mean
    absolute difference over the logits' spread, and the share of positions with the same top-1."""
    float_model, _ = load_model(source_dir)
    quantized = load_for_inference(quantized_dir, progress=False)
    vocab = min(float_model.config.vocab_size, 1000)
    expected, got = _forward(float_model, vocab), _forward(quantized.model, vocab)
    error = (got - expected).abs().mean().item() / expected.std().item()
    return error, (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
