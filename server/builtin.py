"""The built-in default model: a small random CPM-2-architecture model written on first use.

`cpm2 serve` with no `--model` (and `make serve`) run it, so a fresh machine can start the server
without any download. It is untrained: its text is random, but every route, prompt and metric works.
"""

from __future__ import annotations

import os
from pathlib import Path

from engine.weights.init import write_random_model
from engine.weights.presets import get_preset

BUILTIN_PREFIX = "builtin:"


def cache_root() -> Path:
    base = os.environ.get("CPM2_CACHE_DIR") or os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / ("cpm2" if "CPM2_CACHE_DIR" not in os.environ else "")


def resolve_model(spec: str) -> Path:
    """A model directory for `spec`: a path, or `builtin:<preset>` (written once into the cache)."""
    if not spec.startswith(BUILTIN_PREFIX):
        return Path(spec)
    preset = spec.removeprefix(BUILTIN_PREFIX)
    target = cache_root() / "models" / preset
    if not (target / "config.json").exists():
        partial = target.with_name(f".{preset}.partial")
        if partial.exists():
            import shutil

            shutil.rmtree(partial)
        write_random_model(get_preset(preset).config, partial, seed=0, progress=False)
        partial.rename(target)
    return target
