"""Built-in models: `builtin:<preset>` names a random model of that preset, written once into a cache.

`cpm2 serve` with no `--model` (and `make serve`) runs `builtin:tiny`, so a fresh machine can start
the server without any download; every `--model` flag of the `cpm2` command takes the same names.
The model is untrained: its text is random, but every route, prompt and metric works.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from engine.weights.init import write_random_model
from engine.weights.presets import get_preset

BUILTIN_PREFIX = "builtin:"


def default_cache_dir() -> Path:
    """`$CPM2_CACHE_DIR`, else `$XDG_CACHE_HOME/cpm2`, else `~/.cache/cpm2`."""
    if explicit := os.environ.get("CPM2_CACHE_DIR"):
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cpm2"


def resolve_model(spec: str | Path, *, cache_dir: Path | None = None) -> Path:
    """A model directory for `spec`: a path as given, or `builtin:<preset>` (written on first use)."""
    text = str(spec)
    if not text.startswith(BUILTIN_PREFIX):
        return Path(spec)
    name = text.removeprefix(BUILTIN_PREFIX)
    preset = get_preset(name)  # an unknown name fails here, listing the presets
    target = (cache_dir or default_cache_dir()) / "models" / name
    if (target / "config.json").exists():
        return target
    # Written aside and renamed into place: a crash leaves no half model, and of two processes
    # starting at once one rename wins and the other uses its result.
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{name}.{uuid.uuid4().hex}.partial")
    write_random_model(preset.config, partial, dtype=preset.dtype, seed=0, progress=False)
    try:
        partial.rename(target)
    except OSError:
        if not (target / "config.json").exists():
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target
