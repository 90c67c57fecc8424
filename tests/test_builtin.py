"""`builtin:<preset>` model names: written once into the cache, then reused; bad names explained."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.errors import ConfigError
from engine.weights.builtin import resolve_model
from engine.weights.loader import inspect_checkpoint


def test_builtin_model_is_written_once_and_reused(tmp_path: Path) -> None:
    first = resolve_model("builtin:tiny", cache_dir=tmp_path)
    assert first == tmp_path / "models" / "tiny"
    assert inspect_checkpoint(first).config.d_model == 64
    stamp = (first / "config.json").stat().st_mtime_ns
    assert resolve_model("builtin:tiny", cache_dir=tmp_path) == first
    assert (first / "config.json").stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["tiny"]  # no partial directories left


def test_paths_pass_through_and_unknown_presets_are_listed(tmp_path: Path) -> None:
    assert resolve_model(tmp_path / "m") == tmp_path / "m"
    assert resolve_model("models/x") == Path("models/x")
    with pytest.raises(ConfigError, match="tiny"):
        resolve_model("builtin:nope", cache_dir=tmp_path)
    assert not (tmp_path / "models").exists()
