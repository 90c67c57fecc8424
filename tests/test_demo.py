"""`cpm2 train demo` end to end at toy scale: every stage runs through the real jobs, the shipped
directory is an MoE model in the shipping dtype with one prompt per task, its eval.json scores the
shipped files, the server serves its bundled prompts, and a rerun resumes instead of retraining."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from fastapi.testclient import TestClient
from safetensors.torch import load_file

from cpm2.cli import main
from engine.errors import ConfigError
from engine.experts.store import ExpertStore
from engine.weights.loader import inspect_checkpoint
from server.app import create_app
from server.settings import Settings
from training.config import parse_job_config, read_config_file
from training.demo import DemoConfig, DemoPlan

CONFIG = Path(__file__).resolve().parents[1] / "training" / "configs" / "demo.yaml"


def _toy(tmp_path: Path) -> dict[str, Any]:
    """The shipped config with every stage cut to a few steps."""
    data = read_config_file(CONFIG)
    data.update(
        out=str(tmp_path / "demo"), work_dir=str(tmp_path / "runs"), tokenizer_documents=600, tokenizer_pieces=800
    )
    data["num_eval_examples"] = 4
    for stage in ("pretrain", "upcycle"):
        data[stage].update(steps=3, batch_size=8, log_every=1, checkpoint_every=3, progress=False)
        data[stage]["schedule"]["warmup_steps"] = 1
    data["prompt"].update(steps=2, batch_size=4, log_every=1, eval_every=0, checkpoint_every=2, progress=False)
    for overrides in data["prompt_tasks"].values():  # per-task step budgets would override the toy's
        for key in ("steps", "eval_every", "checkpoint_every"):
            overrides.pop(key, None)
    return data


def test_the_shipped_config_validates_every_stage() -> None:
    plan = DemoPlan(parse_job_config(read_config_file(CONFIG), DemoConfig))
    assert sorted(plan.prompts) == ["add", "num2zh", "same", "zh2num"]
    assert plan.upcycle.upcycle.num_experts >= 8
    assert plan.prompts["same"].prompt.infix_length > 0  # the sentence-pair task gets an infix
    assert all(p.prompt.init_from_instruction for p in plan.prompts.values())


def test_demo_pipeline_ships_a_servable_moe_model_with_its_prompts(tmp_path: Path) -> None:
    config_file = tmp_path / "demo.yaml"
    config_file.write_text(yaml.safe_dump(_toy(tmp_path), allow_unicode=True))
    assert main(["train", "demo", "--config", str(config_file), "--device", "cpu"]) == 0

    out = tmp_path / "demo"
    config = inspect_checkpoint(out).config
    assert config.moe is not None
    assert config.moe.num_experts >= 8
    assert ExpertStore.exists(out)
    assert {p.name for p in (out / "prompts").iterdir()} == {
        f"{t}.safetensors" for t in ("num2zh", "zh2num", "add", "same")
    }
    report = json.loads((out / "eval.json").read_text())
    assert report["split"] == "test"
    assert set(report["exact_match_with_prompt"]) == {"num2zh", "zh2num", "add", "same"}
    assert all(0.0 <= v <= 1.0 for v in report["exact_match_with_prompt"].values())
    assert report["dtype"] == "float32"
    assert set(report["stage_seconds"]) >= {"tokenizer", "pretrain (dense, multi-task)", "upcycle (MoE)", "prompt same"}

    settings = Settings(model=str(out), prompt_store=tmp_path / "store", max_batch_size=2)  # type: ignore[call-arg]
    with TestClient(create_app(settings)) as client:
        assert sorted(p["id"] for p in client.get("/prompts").json()["data"]) == ["add", "num2zh", "same", "zh2num"]
        body = {"inputs": "4096", "parameters": {"max_new_tokens": 4, "prompt_id": "num2zh"}}
        assert client.post("/generate", json=body).status_code == 200
        pair = {"inputs": "4096", "parameters": {"max_new_tokens": 2, "prompt_id": "same", "text_pair": "四千零九十六"}}
        assert client.post("/generate", json=pair).status_code == 200

    # A second run finds every stage finished: nothing is retrained, the same model is shipped.
    # (Tensors, not bytes: safetensors orders the header's metadata map differently run to run.)
    before = load_file(str(out / "model.safetensors"))
    assert main(["train", "demo", "--config", str(config_file), "--device", "cpu"]) == 0
    after = load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    again = json.loads((out / "eval.json").read_text())
    timing = ("stage_seconds", "total_seconds")
    assert {k: v for k, v in again.items() if k not in timing} == {k: v for k, v in report.items() if k not in timing}
    # Stage times add up over resumed runs: the report states what building the model cost.
    assert again["total_seconds"] >= report["total_seconds"]


def test_demo_config_mistakes_say_what_to_change(tmp_path: Path) -> None:
    data = _toy(tmp_path)
    data["prompt_tasks"]["translate"] = {}
    with pytest.raises(ConfigError, match="unknown task"):
        DemoPlan(parse_job_config(data, DemoConfig))
    data = _toy(tmp_path)
    data["upcycle"]["upcycle"]["num_experts"] = 0
    with pytest.raises(ConfigError, match=r"upcycle\.num_experts"):
        DemoPlan(parse_job_config(data, DemoConfig))
