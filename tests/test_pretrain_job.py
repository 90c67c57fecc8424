"""`cpm2 train pretrain`: span corruption lowers the loss, the exported directory is a loadable model
equal to the final checkpoint, and an interrupted run resumes to exactly the uninterrupted losses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from cpm2.cli import main
from engine.errors import ConfigError
from engine.experts.store import ExpertStore
from engine.generation import GenerationRequest, Generator, SamplingParams
from engine.tokenizer import check_special_ids, load_tokenizer
from engine.weights.loader import load_model
from training.checkpoint import MODEL_FILE, list_checkpoints
from training.config import parse_job_config
from training.job import build_model
from training.jobs.pretrain import PretrainConfig, pretrain

LOGGED = ("loss", "accuracy", "grad_norm", "lr", "tokens")


def _config(tmp_path: Path, **changes: Any) -> PretrainConfig:
    data: dict[str, Any] = {
        "model": {"preset": "tiny"},
        "steps": 12,
        "batch_size": 4,
        "log_every": 1,
        "checkpoint_every": 6,
        "keep_checkpoints": 3,
        "optimizer": {"lr": 0.003},
        "schedule": {"name": "linear", "warmup_steps": 2},
        "span": {"encoder_length": 32, "decoder_length": 8},
        "progress": False,
        "output_dir": str(tmp_path / "run"),
        **changes,
    }
    return parse_job_config(data, PretrainConfig)


def _log(config: PretrainConfig) -> list[dict[str, Any]]:
    lines = (config.output_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _losses(config: PretrainConfig) -> list[float]:
    return [r["loss"] for r in _log(config) if "loss" in r]


def test_from_scratch_loss_falls_and_the_model_dir_loads(tmp_path: Path) -> None:
    config = _config(tmp_path)  # no tokenizer given: the built-in one is trained into the run
    out = pretrain(config, device="cpu")
    assert out == tmp_path / "run" / "model"
    losses = _losses(config)
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses

    # What `cpm2 generate` / `cpm2 serve` do with a model directory.
    model, _ = load_model(out, dtype="float32", device="cpu", pack=False)
    tokenizer = load_tokenizer(out)
    check_special_ids(
        tokenizer, eos=model.config.eos_token_id, decoder_start=model.config.decoder_start_token_id, source=out
    )
    assert (out / "spiece.model").read_bytes() == (tmp_path / "run" / "tokenizer" / "spiece.model").read_bytes()
    assert model.config.extra["trained_steps"] == 12
    assert ExpertStore.exists(out)  # experts stored as `cpm2 init` stores them, ready to offload
    final = load_file(str(list_checkpoints(tmp_path / "run" / "checkpoints")[-1] / MODEL_FILE))
    exported = model.state_dict()
    assert all(torch.equal(final[k], exported[k]) for k in final)
    # Frozen tensors (the CPM-2 router centroids) are not in the checkpoint: they keep their init.
    frozen = sorted(set(exported) - set(final))
    assert frozen == sorted(k for k in exported if k.endswith("router.centroids"))
    initial = build_model(config.model, torch.device("cpu")).state_dict()
    assert all(torch.equal(initial[k], exported[k]) for k in frozen)
    request = GenerationRequest(tuple(tokenizer.encode("The number 42 is")), SamplingParams(max_new_tokens=4))
    assert len(Generator(model, tokenizer).generate([request])[0].token_ids) >= 1


def test_interrupted_run_resumes_exactly(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = _config(tmp_path, tokenizer=str(tiny_model_dir), model={"preset": "tiny", "dropout_rate": 0.1})
    pretrain(config, device="cpu")
    uninterrupted = [{k: r[k] for k in LOGGED} for r in _log(config)]
    first_half = (config.output_dir / "metrics.jsonl").read_text().splitlines()[:6]
    reference = load_file(str(config.output_dir / "model" / "model.safetensors"))

    # Lose everything after step 6, as a crash between checkpoints would, and run the same command.
    checkpoints = list_checkpoints(config.output_dir / "checkpoints")
    assert [c.name for c in checkpoints] == ["step_00000006", "step_00000012"]
    shutil.rmtree(checkpoints[-1])
    shutil.rmtree(config.output_dir / "model")
    pretrain(config, device="cpu")

    # Steps 1-6 were not run again (their lines, timings included, are untouched): it resumed.
    assert (config.output_dir / "metrics.jsonl").read_text().splitlines()[:6] == first_half
    resumed = [{k: r[k] for k in LOGGED} for r in _log(config)]
    assert resumed == uninterrupted  # dropout on: the RNG and the data position were both restored
    again = load_file(str(config.output_dir / "model" / "model.safetensors"))
    assert all(torch.equal(reference[k], again[k]) for k in reference)


def test_cli_continues_a_model_dir_on_files_with_held_out_loss(tmp_path: Path, tiny_model_dir: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"Line {i}: the number {i * 37} is written {i * 37}." for i in range(40)) + "\n")
    held_out = tmp_path / "held.jsonl"
    held_out.write_text("\n".join(json.dumps({"text": f"The number {i} is here."}) for i in range(60)) + "\n")
    path = tmp_path / "pretrain.yaml"
    data = {
        "model": {"dir": str(tiny_model_dir)},
        "corpus": {"source": "files", "paths": [str(corpus)]},
        "held_out": {"num_batches": 1, "paths": [str(held_out)]},
        "span": {"encoder_length": 32, "decoder_length": 8},
        "steps": 4,
        "batch_size": 4,
        "eval_every": 2,
        "log_every": 2,
        "progress": False,
        "output_dir": str(tmp_path / "run"),
        "export_dir": str(tmp_path / "continued"),
    }
    path.write_text(yaml.safe_dump(data))
    assert main(["train", "pretrain", "--config", str(path)]) == 0
    evals = [r for r in _log(parse_job_config(data, PretrainConfig)) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert 0 < evals[-1]["eval_loss"] < 50
    start, _ = load_model(tiny_model_dir, dtype="float32", pack=False)
    trained, _ = load_model(tmp_path / "continued", dtype="float32", pack=False)
    assert not torch.equal(start.embed.weight, trained.embed.weight)
    assert (tmp_path / "continued" / "spiece.model").read_bytes() == (tiny_model_dir / "spiece.model").read_bytes()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"corpus": {"paths": ["x.txt"]}}, "set source: files"),
        ({"corpus": {"source": "files"}}, "corpus.paths is empty"),
        ({"steps": 50, "corpus": {"source": "files", "paths": ["SMALL"], "num_epochs": 1}}, "data ran out"),
    ],
)
def test_config_mistakes_say_what_to_change(
    tmp_path: Path, tiny_model_dir: Path, changes: dict[str, Any], message: str
) -> None:
    small = tmp_path / "small.txt"
    small.write_text("one two three four five six seven eight nine ten\n")
    if "corpus" in changes:
        changes["corpus"] = {k: [str(small)] if v == ["SMALL"] else v for k, v in changes["corpus"].items()}
    config = _config(tmp_path, tokenizer=str(tiny_model_dir), **changes)
    with pytest.raises(ConfigError, match=message):
        pretrain(config, device="cpu")
