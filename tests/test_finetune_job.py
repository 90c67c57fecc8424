"""`cpm2 train finetune`: every parameter trains, the model directory is written and loads, resume is exact."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.weights.init import write_random_model
from engine.weights.loader import load_model
from engine.weights.presets import get_preset
from training.cli import register
from training.config import parse_job_config
from training.evaluate import evaluate_tasks
from training.jobs.finetune import FinetuneJobConfig, run_finetune_job
from training.metrics_log import read_metrics
from training.tasks import generate_task


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "model"
    write_random_model(get_preset("tiny").config, out, progress=False)
    return out


def _config(model_dir: Path, out: Path, **overrides: Any) -> FinetuneJobConfig:
    data: dict[str, Any] = {
        "model": {"dir": str(model_dir)},
        "task": {"name": "add", "num_eval_examples": 8, "max_new_tokens": 4, "eval_batch_size": 8},
        "optimizer": {"name": "adamw", "lr": 1e-3},
        "steps": 4,
        "batch_size": 8,
        "log_every": 1,
        "eval_every": 2,
        "checkpoint_every": 2,
        "output_dir": str(out),
        "progress": False,
        **overrides,
    }
    return parse_job_config(data, FinetuneJobConfig)


def test_finetune_trains_every_parameter_and_writes_a_model_dir(model_dir: Path, tmp_path: Path) -> None:
    out_dir = run_finetune_job(_config(model_dir, tmp_path / "run"), device="cpu")
    before, _ = load_model(model_dir, dtype="float32", pack=False)
    after, _ = load_model(out_dir, dtype="float32", pack=False)
    before_state, after_state = before.state_dict(), after.state_dict()
    assert before_state.keys() == after_state.keys()
    # Every trainable tensor moved (the frozen orthogonal centroids are buffers-like and may not).
    changed = [k for k in before_state if not torch.equal(before_state[k], after_state[k])]
    assert {"embed.weight", "lm_head.weight"} <= set(changed)
    assert len(changed) >= len(before_state) - sum("centroid" in k for k in before_state)
    assert (out_dir / "spiece.model").is_file()
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records if "eval_acc/add" in r] == [2, 4]
    # The exported directory is usable as is: it evaluates through the engine.
    scores = evaluate_tasks(after, _tokenizer(out_dir), generate_task("add", "test", num_examples=4), max_new_tokens=4)
    assert scores["add"].num_examples == 4


def _tokenizer(path: Path) -> Any:
    from engine.tokenizer import load_tokenizer

    return load_tokenizer(path)


def test_finetune_resumes_exactly(model_dir: Path, tmp_path: Path) -> None:
    straight = run_finetune_job(_config(model_dir, tmp_path / "a", eval_every=0), device="cpu")
    run_finetune_job(_config(model_dir, tmp_path / "b", eval_every=0, steps=2), device="cpu")
    resumed = run_finetune_job(_config(model_dir, tmp_path / "b", eval_every=0), device="cpu")
    a, _ = load_model(straight, dtype="float32", pack=False)
    b, _ = load_model(resumed, dtype="float32", pack=False)
    for key, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[key]), key
    losses = [[r["loss"] for r in read_metrics(tmp_path / d / "metrics.jsonl")] for d in ("a", "b")]
    assert losses[0] == losses[1]


def test_cli_registers_the_adaptation_jobs() -> None:
    parser = argparse.ArgumentParser(prog="cpm2")
    register(parser.add_subparsers(dest="command"))
    for job in ("prompt", "finetune", "pretrain", "ki", "upcycle"):
        args = parser.parse_args(["train", job, "--config", "job.yaml", "--device", "cpu"])
        assert callable(args.handler)
        assert (args.config, args.device) == (Path("job.yaml"), "cpu")
