"""Multi-task pretraining: task rows mixed into span-corruption batches with their instructions,
fixed shapes, exact resume; the prompt job can start from a task's instruction words."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.errors import ConfigError
from engine.tokenizer import load_tokenizer
from training.checkpoint import list_checkpoints
from training.config import parse_job_config
from training.data.example import Example
from training.job import DataShard
from training.jobs.mixture import MixedBatches
from training.jobs.pretrain import PretrainConfig, build_batches, pretrain
from training.jobs.prompt import PromptJobConfig, build_prompted_model
from training.losses import IGNORE_INDEX
from training.tasks.instructions import INSTRUCTIONS, instruction_for, with_instruction


def _config(tmp_path: Path, tokenizer: Path, **changes: Any) -> PretrainConfig:
    data: dict[str, Any] = {
        "model": {"preset": "tiny"},
        "tokenizer": str(tokenizer),
        "steps": 8,
        "batch_size": 8,
        "log_every": 1,
        "checkpoint_every": 4,
        "optimizer": {"lr": 0.003},
        "span": {"encoder_length": 48, "decoder_length": 16},
        "mixture": {"tasks": {"num2zh": 1, "add": 2, "same": 1}, "fraction": 0.75},
        "progress": False,
        "output_dir": str(tmp_path / "run"),
        **changes,
    }
    return parse_job_config(data, PretrainConfig)


def _shard(config: PretrainConfig) -> DataShard:
    return DataShard(rank=0, world_size=1, micro_batch_size=config.batch_size, seed=config.seed)


def test_every_task_has_instruction_words_that_wrap_the_served_layout() -> None:
    pair = with_instruction(Example(input="4096", text_pair="四千零九十六", target="yes", task="same"))
    assert pair == Example(input="判断：4096 和 四千零九十六 是同一个数吗？", target="yes", task="same")
    single = with_instruction(Example(input="37 + 58", target="95", task="add"))
    assert single.input == "计算：37 + 58 等于几？"
    assert single.target == "95"
    assert set(INSTRUCTIONS) == {"num2zh", "zh2num", "add", "same"}
    with pytest.raises(ConfigError, match="built-in tasks are"):
        instruction_for("translate")


def test_batches_hold_instructed_task_rows_and_span_rows_in_fixed_shapes(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = _config(tmp_path, tiny_model_dir)
    tokenizer = load_tokenizer(tiny_model_dir)
    batches = build_batches(config, _shard(config), tokenizer)
    assert isinstance(batches, MixedBatches)
    sentinel = tokenizer.sentinel_id(0)
    prefixes = tuple(words.prefix for words in INSTRUCTIONS.values())
    for _ in range(3):
        batch = next(batches)
        assert batch["input_ids"].shape == (8, 48)
        assert batch["labels"].shape == (8, 16)
        texts = [tokenizer.decode([t for t in row.tolist() if t != tokenizer.pad_id]) for row in batch["input_ids"]]
        instructed = [text for text in texts if text.startswith(prefixes)]
        corrupted = [row for row in batch["input_ids"].tolist() if sentinel in row]
        assert len(instructed) == 6, texts  # round(0.75 · 8) task rows
        assert len(corrupted) == 2, texts
        assert all(not text.startswith(INSTRUCTIONS["zh2num"].prefix) for text in instructed)  # not in the mix
        assert (batch["labels"] != IGNORE_INDEX).sum(1).min() >= 2  # every row has an answer and eos


def test_mixture_off_or_held_out_is_plain_span_corruption(tmp_path: Path, tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    config = _config(tmp_path, tiny_model_dir)
    assert not isinstance(build_batches(config, _shard(config), tokenizer, held_out=True), MixedBatches)
    off = _config(tmp_path, tiny_model_dir, mixture={"tasks": {"add": 1}, "fraction": 0.0})
    assert not isinstance(build_batches(off, _shard(off), tokenizer), MixedBatches)


def test_batch_stream_resumes_exactly(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = _config(tmp_path, tiny_model_dir)
    tokenizer = load_tokenizer(tiny_model_dir)
    first = build_batches(config, _shard(config), tokenizer)
    for _ in range(2):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    expected = [next(first) for _ in range(2)]
    second = build_batches(config, _shard(config), tokenizer)
    second.load_state_dict(state)
    for want in expected:
        got = next(second)
        assert all(torch.equal(want[k], got[k]) for k in want)


def test_pretraining_with_a_mixture_resumes_to_the_same_losses(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = _config(tmp_path, tiny_model_dir)
    pretrain(config, device="cpu")
    log = config.output_dir / "metrics.jsonl"
    losses = [json.loads(line)["loss"] for line in log.read_text().splitlines() if '"loss"' in line]
    shutil.rmtree(list_checkpoints(config.output_dir / "checkpoints")[-1])
    shutil.rmtree(config.output_dir / "model")
    pretrain(config, device="cpu")
    again = [json.loads(line)["loss"] for line in log.read_text().splitlines() if '"loss"' in line]
    assert again == losses
    assert len(losses) == 8


@pytest.mark.parametrize(
    ("mixture", "message"),
    [
        ({"tasks": {"translate": 1}}, "unknown task"),
        ({"tasks": {"add": 0}}, "weights must be > 0"),
        ({"tasks": {"add": 1}, "fraction": 1.5}, "less than or equal to 1"),
    ],
)
def test_mixture_mistakes_say_what_to_change(
    tmp_path: Path, tiny_model_dir: Path, mixture: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path, tiny_model_dir, mixture=mixture)


def test_prompt_starts_from_the_instruction_words(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = {
        "model": {"dir": str(tiny_model_dir)},
        "task": {"name": "same"},
        "prompt": {"prefix_length": 3, "infix_length": 2, "suffix_length": 4, "init_from_instruction": True},
        "steps": 1,
        "batch_size": 2,
        "output_dir": str(tmp_path / "prompt"),
    }
    config = parse_job_config(data, PromptJobConfig)
    module = build_prompted_model(config, torch.device("cpu"))
    tokenizer = load_tokenizer(tiny_model_dir)
    embed = module.model.embed.weight
    for part, text in INSTRUCTIONS["same"].parts().items():
        ids = tokenizer.encode(text, add_eos=False)
        rows = module.prompt.rows[part]
        want = torch.stack([embed[ids[i % len(ids)]] for i in range(rows.shape[0])])
        assert torch.equal(rows.detach(), want), part

    with pytest.raises(ConfigError, match="at most one of"):
        parse_job_config(
            {**data, "prompt": {"prefix_length": 2, "init_from_instruction": True, "init_text": "x"}}, PromptJobConfig
        )
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text('{"input": "1", "target": "一"}\n')
    files = {**data, "task": {"train_file": str(jsonl), "eval_file": str(jsonl)}}
    with pytest.raises(ConfigError, match="needs a built-in task"):
        build_prompted_model(parse_job_config(files, PromptJobConfig), torch.device("cpu"))


def test_without_instructions_task_rows_are_the_bare_served_input(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = _config(tmp_path, tiny_model_dir, mixture={"tasks": {"add": 1}, "fraction": 1.0, "instructions": False})
    tokenizer = load_tokenizer(tiny_model_dir)
    batch = next(build_batches(config, _shard(config), tokenizer))
    texts = [tokenizer.decode([t for t in row.tolist() if t != tokenizer.pad_id]) for row in batch["input_ids"]]
    assert len(texts) == 8
    assert all(" + " in text for text in texts), texts
    assert not any(text.startswith(INSTRUCTIONS["add"].prefix) for text in texts)
