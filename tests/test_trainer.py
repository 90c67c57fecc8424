"""The trainer core: configs, schedules, checkpoints, and exact resume on a tiny seeded model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from engine.config import ModelConfig
from engine.errors import CheckpointError, ConfigError
from engine.model.transformer import Seq2SeqLM
from training.checkpoint import MODEL_FILE, latest_checkpoint, list_checkpoints
from training.config import JobConfig, ScheduleSpec, load_job_config, parse_job_config
from training.losses import seq2seq_lm_loss
from training.metrics_log import read_metrics
from training.optim import lr_factor
from training.synthetic import SyntheticSeq2Seq
from training.trainer import Batch, EvalFn, Trainer

TINY = ModelConfig(
    vocab_size=64,
    d_model=32,
    num_heads=4,
    d_kv=8,
    d_ff=64,
    num_encoder_layers=2,
    num_decoder_layers=2,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
    dropout_rate=0.1,  # on, so that resuming must restore the RNG to reproduce the dropout masks
)


def _config(out: Path, **overrides: Any) -> JobConfig:
    data: dict[str, Any] = {
        "model": {"preset": "tiny"},
        "optimizer": {"lr": 3e-3, "weight_decay": 0.01, "grad_clip": 1.0},
        "schedule": {"name": "linear", "warmup_steps": 2},
        "steps": 6,
        "batch_size": 4,
        "grad_accum": 2,
        "log_every": 1,
        "checkpoint_every": 3,
        "output_dir": str(out),
        "progress": False,
    }
    data.update(overrides)
    return parse_job_config(data, JobConfig)


class _CrashAfter(SyntheticSeq2Seq):
    """Data that fails once `limit` micro-batches are consumed: a job killed mid-run."""

    limit = 0

    def __next__(self) -> Batch:
        if self.position >= self.limit:
            raise KeyboardInterrupt
        return super().__next__()


def _trainer(config: JobConfig, *, data_cls: type[SyntheticSeq2Seq] = SyntheticSeq2Seq, **kwargs: Any) -> Trainer:
    torch.manual_seed(0)
    model = Seq2SeqLM(TINY)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    data = data_cls(vocab_size=TINY.vocab_size, micro_batch_size=config.micro_batch_size(1), seed=7)
    torch.manual_seed(123)  # the training RNG stream (dropout), distinct from the init
    return Trainer(config=config, model=model, loss_fn=seq2seq_lm_loss, data=data, **kwargs)


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(tmp_path: Path) -> None:
    straight = _trainer(_config(tmp_path / "a"))
    straight.fit()
    expected = _losses(tmp_path / "a")

    crashed = _trainer(_config(tmp_path / "b"), data_cls=_CrashAfter)
    assert isinstance(crashed.data, _CrashAfter)
    crashed.data.limit = 4 * 2  # two micro-batches per step; dies at the first batch of step 5
    with pytest.raises(KeyboardInterrupt):
        crashed.fit()
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "checkpoints")] == ["step_00000003"]

    resumed = _trainer(_config(tmp_path / "b"))
    assert resumed.resume()
    assert resumed.step == 3
    resumed.fit()
    got = _losses(tmp_path / "b")
    print("uninterrupted:", expected, "\nresumed:      ", got)
    assert len(expected) == 6
    assert got == expected  # exact equality: same RNG, data position, optimizer and schedule state
    assert expected[-1] < expected[0]
    params = dict(straight.model.named_parameters())
    for name, p in resumed.model.named_parameters():
        assert torch.equal(p, params[name]), name


def test_eval_hook_does_not_move_the_training_rng(tmp_path: Path) -> None:
    calls: list[int] = []

    def noisy_eval(model: torch.nn.Module, step: int) -> dict[str, float]:
        calls.append(step)
        assert not model.training
        return {"noise": float(torch.rand(()))}

    plain = _trainer(_config(tmp_path / "a", steps=3, checkpoint_every=0))
    plain.fit()
    hook: EvalFn = noisy_eval
    evaluated = _trainer(_config(tmp_path / "b", steps=3, checkpoint_every=0, eval_every=1), eval_fn=hook)
    evaluated.fit()
    assert calls == [1, 2, 3]
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    records = read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert sum("eval_noise" in r for r in records) == 3


def test_metrics_log_lines(tmp_path: Path) -> None:
    trainer = _trainer(_config(tmp_path, steps=4, log_every=2, checkpoint_every=0))
    trainer.fit()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 4]
    for r in records:
        assert {"step", "loss", "lr", "tokens", "tokens_per_s", "elapsed", "accuracy", "grad_norm"} <= set(r)
    # 4 sequences x (16 source + 8 target tokens) per step.
    assert [r["tokens"] for r in records] == [2 * 4 * 24, 4 * 4 * 24]


def test_only_selected_parameters_train_and_are_checkpointed(tmp_path: Path) -> None:
    def is_head(name: str) -> bool:
        return name.startswith("lm_head")

    trainer = _trainer(_config(tmp_path, steps=2, checkpoint_every=0), trainable=is_head)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.fit()
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p, before[name]) != is_head(name), name
    checkpoint = latest_checkpoint(tmp_path / "checkpoints")
    assert checkpoint is not None
    assert set(load_file(str(checkpoint / MODEL_FILE))) == {"lm_head.weight"}


def test_keeps_last_checkpoints_and_refuses_to_overwrite(tmp_path: Path) -> None:
    _trainer(_config(tmp_path, steps=4, checkpoint_every=1, keep_checkpoints=2)).fit()
    names = [p.name for p in (tmp_path / "checkpoints").iterdir()]
    assert sorted(names) == ["step_00000003", "step_00000004"]  # no temporary directories left
    with pytest.raises(ConfigError, match="already has checkpoint"):
        _trainer(_config(tmp_path, steps=4, resume="never")).resume()
    with pytest.raises(CheckpointError, match="does not exist"):
        _trainer(_config(tmp_path, resume=str(tmp_path / "nope"))).resume()


def test_bf16_autocast_and_adafactor_train(tmp_path: Path) -> None:
    config = _config(tmp_path, steps=3, dtype="bfloat16", optimizer={"name": "adafactor", "lr": 1e-2})
    trainer = _trainer(config)
    trainer.fit()
    losses = _losses(tmp_path)
    assert len(losses) == 3
    assert all(torch.isfinite(torch.tensor(losses)))
    assert next(trainer.model.parameters()).dtype == torch.float32


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("constant", [0.5, 1.0, 1.0, 1.0, 1.0]),
        ("linear", [0.5, 1.0, 2 / 3, 1 / 3, 0.0]),
        ("inverse_sqrt", [0.5, 1.0, (2 / 3) ** 0.5, (2 / 4) ** 0.5, (2 / 5) ** 0.5]),
    ],
)
def test_schedules(name: str, expected: list[float]) -> None:
    spec = ScheduleSpec.model_validate({"name": name, "warmup_steps": 2})
    assert [lr_factor(spec, s, 5) for s in range(5)] == pytest.approx(expected)


@pytest.mark.parametrize("suffix", [".yaml", ".json", ".toml"])
def test_config_files_load(tmp_path: Path, suffix: str) -> None:
    if suffix == ".toml":
        text = 'steps = 10\nbatch_size = 8\noutput_dir = "out"\n[model]\npreset = "tiny"\n'
    else:  # JSON is also valid YAML
        text = json.dumps({"model": {"preset": "tiny"}, "steps": 10, "batch_size": 8, "output_dir": "out"})
    path = tmp_path / f"job{suffix}"
    path.write_text(text)
    config = load_job_config(path)
    assert config.steps == 10
    assert config.optimizer.name == "adamw"


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    base = {"model": {"preset": "tiny"}, "steps": 10, "batch_size": 8, "output_dir": "out"}
    with pytest.raises(ConfigError, match=r"optimizer\.lerning_rate: Extra inputs are not permitted"):
        parse_job_config({**base, "optimizer": {"lerning_rate": 1e-3}}, JobConfig)
    with pytest.raises(ConfigError, match=r"model: .*exactly one of model\.dir"):
        parse_job_config({**base, "model": {}}, JobConfig)
    with pytest.raises(ConfigError, match=r"steps: Input should be greater than 0"):
        parse_job_config({**base, "steps": 0}, JobConfig)
    config = parse_job_config({**base, "grad_accum": 3}, JobConfig)
    with pytest.raises(ConfigError, match="use a multiple of 6"):
        config.micro_batch_size(2)
    bad = tmp_path / "job.ini"
    bad.write_text("x")
    with pytest.raises(ConfigError, match="unknown config format"):
        load_job_config(bad)
