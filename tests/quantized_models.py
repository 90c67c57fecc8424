"""What the quantisation tests share: the int4 group size of their models (conftest's `int4_dir`) and
loading a model with its experts offloaded."""

from __future__ import annotations

from pathlib import Path

from engine.offload import InferenceModel, OffloadConfig, load_for_inference

#: Inputs per scale and zero of the int4 test models.
INT4_TEST_GROUP = 32


def offloaded(model_dir: Path, **options: object) -> InferenceModel:
    """`model_dir` loaded under `OffloadConfig(**options)`, which must offload its experts."""
    loaded = load_for_inference(model_dir, offload=OffloadConfig(**options), progress=False)  # type: ignore[arg-type]
    assert loaded.is_offloaded
    return loaded
