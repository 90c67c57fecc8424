"""The JSONL metrics log: one JSON object per logged step, appended and flushed as it is written.

On resume the lines past the checkpoint's step are dropped first, so the file always reads as one
curve (the steps after the checkpoint are about to be trained again).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import IO, Any


class MetricsLog:
    """Appends records to `path`; a no-op object on ranks other than 0 (pass `enabled=False`)."""

    def __init__(self, path: Path, *, enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled
        self._file: IO[str] | None = None

    def truncate_after(self, step: int) -> None:
        """Keep only records with `step <= step` (call before the first `write` of a resumed run)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (JSON has no NaN/inf: those are written as null)."""
        if not self.enabled:
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every record of a metrics log, in order."""
    return [json.loads(line) for line in path.read_text().splitlines() if line]
