"""The prompt store survives `kill -9`: `bench/crash_consistency.py`'s loop with a few kills, plus the
garbage collection at start that the loop depends on.

The full run (`python -m bench.crash_consistency --kills 100`) is a benchmark; here 8 kills of a real
server process keep CI under a minute while still landing kills mid-upload and mid-delete.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from bench.crash_consistency import CrashConfig, inspect_store, run
from engine.prompts import SoftPrompt
from server.prompt_store import STALE_STAGING_SECONDS, PromptStore


def test_kill_9_never_loses_or_corrupts_a_prompt(tiny_model_dir: Path, tmp_path: Path) -> None:
    report = run(CrashConfig(model_dir=tiny_model_dir, workdir=tmp_path, kills=8, seed=1), log=lambda _: None)
    assert report.violations == []
    assert report.kills == 8
    assert report.uploads_acked > 0
    assert report.deletes_acked > 0


def _store(root: Path) -> PromptStore:
    return PromptStore(
        root, d_model=8, dtype=torch.float32, max_virtual_tokens=16, max_upload_bytes=2**20, cache_bytes=2**20
    )


def test_start_keeps_a_fresh_upload_and_removes_stale_leftovers(tmp_path: Path) -> None:
    # Regression: a replica starting on a shared store used to delete every `.tmp-` directory, including
    # another replica's upload in progress (which then failed, or renamed a half-emptied directory in).
    root = tmp_path / "prompts"
    first = _store(root)
    data = SoftPrompt(prefix=torch.randn(2, 8)).to_bytes()
    first.create("kept", data)
    in_progress, stale, deleted = root / ".tmp-live", root / ".tmp-crashed", root / ".deleted-gone-1"
    for leftover in (in_progress, stale, deleted):
        leftover.mkdir()
        (leftover / "prompt.safetensors").write_bytes(data)
    old = time.time() - STALE_STAGING_SECONDS - 60
    os.utime(stale, (old, old))
    second = _store(root)
    assert sorted(p.name for p in root.iterdir()) == [".tmp-live", "kept"]
    assert [r.id for r in second.records()] == ["kept"]  # the live upload is invisible until renamed in
    prompts, problems, leftovers = inspect_store(root, d_model=8)
    assert (set(prompts), problems, leftovers) == ({"kept"}, [], 1)
