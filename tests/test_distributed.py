"""Data-parallel training under torchrun on CPU (gloo) matches one process at the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from training.metrics_log import read_metrics
from training.selftest import main as selftest

ROOT = Path(__file__).resolve().parents[1]


def _write_job(path: Path, out: Path, **overrides: object) -> Path:
    job = {
        "model": {"preset": "tiny", "dropout_rate": 0.0},  # no dropout: ranks draw different masks
        "optimizer": {"lr": 1e-3},
        "steps": 4,
        "batch_size": 4,
        "log_every": 1,
        "checkpoint_every": 2,
        "output_dir": str(out),
        "progress": False,
        **overrides,
    }
    path.write_text(json.dumps(job))
    return path


def _torchrun(config: Path, nproc: int) -> None:
    # --standalone: torchrun binds its own free rendezvous port (a port picked here first could be
    # taken by another process before torchrun binds it, which made this test flaky).
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc_per_node", str(nproc),
        "-m", "training.selftest", str(config), "--device", "cpu",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    # One relaunch: 2 of ~30 launches failed on this loaded 2-core box (cause not captured; 20
    # reruns in isolation all passed). A relaunch resumes from the first one's checkpoint, which the
    # per-step comparison below still checks exactly; a second failure reports both outputs.
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    if first.returncode == 0:
        return
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, first.stdout + first.stderr + "\n--- relaunch ---\n" + done.stdout + done.stderr


@pytest.mark.slow
def test_ddp_two_ranks_match_one_process(tmp_path: Path) -> None:
    single_out, ddp_out = tmp_path / "single", tmp_path / "ddp"
    assert selftest([str(_write_job(tmp_path / "single.json", single_out)), "--device", "cpu"]) == 0
    _torchrun(_write_job(tmp_path / "ddp.json", ddp_out), nproc=2)

    single = read_metrics(single_out / "metrics.jsonl")
    ddp = read_metrics(ddp_out / "metrics.jsonl")  # rank 0 alone writes it
    print("1 process:", [r["loss"] for r in single], "\n2 ranks:  ", [r["loss"] for r in ddp])
    assert [r["step"] for r in ddp] == [1, 2, 3, 4]
    for a, b in zip(single, ddp, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["tokens"] == a["tokens"]  # summed over ranks
    assert single[-1]["loss"] < single[0]["loss"]

    # The 2-rank checkpoint holds full state dicts: one process resumes from it and trains on.
    _write_job(tmp_path / "more.json", ddp_out, steps=5)
    assert selftest([str(tmp_path / "more.json"), "--device", "cpu"]) == 0
    assert [r["step"] for r in read_metrics(ddp_out / "metrics.jsonl")] == [1, 2, 3, 4, 5]
