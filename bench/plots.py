"""matplotlib for the benchmarks' plots: headless, optional, and every figure saved the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pyplot() -> Any | None:
    """`matplotlib.pyplot` on the headless Agg backend, or None when matplotlib is not installed (a
    benchmark then writes its JSON without a plot)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save(fig: Any, path: Path, *, dpi: int = 110) -> Path:
    """Lay out `fig`, write it to `path` (its folder made if needed), free it; returns `path`."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
