"""`cpm2 train prompt` and the trainable soft prompt: served == trained, files, learning, resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.errors import ConfigError
from engine.generation import Generator, SamplingParams
from engine.generation.inputs import encode_requests
from engine.model.embedding import TokenEmbedding
from engine.model.moe import MoEFeedForward
from engine.peft import read_peft_dir
from engine.prompts import parse_soft_prompt
from engine.tokenizer import load_tokenizer
from engine.weights.init import write_random_model
from engine.weights.loader import load_model
from engine.weights.presets import get_preset
from training.config import parse_job_config
from training.data.example import Example
from training.data.seq2seq import Seq2SeqCollator
from training.evaluate import build_request
from training.jobs.prompt import PromptJobConfig, build_prompted_model, run_prompt_job
from training.jobs.task_data import collate_examples
from training.metrics_log import read_metrics
from training.soft_prompt import PromptedSeq2SeqLM, TrainableSoftPrompt, prompted_lm_loss
from training.tasks import generate_task, write_jsonl

EXAMPLES = [
    Example(input="4096", text_pair="四千零九十六", target="yes", task="same"),
    Example(input="12 + 7", target="19", task="add"),
    Example(input="31", text_pair="三百一十", target="no", task="same"),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "model"
    write_random_model(get_preset("tiny").config, out, progress=False)
    return out


def _prompted(model_dir: Path, lengths: dict[str, int]) -> PromptedSeq2SeqLM:
    model, _ = load_model(model_dir, dtype="float32", pack=False)
    prompt = TrainableSoftPrompt.from_embeddings(model.embed, lengths, sample_range=(3, 1000), seed=1)
    with torch.no_grad():  # move the rows off the embedding table, so a misplaced row would show
        for param in prompt.rows.values():
            param.add_(0.5 * torch.randn_like(param))
    return PromptedSeq2SeqLM(model, prompt).eval()


def test_training_forward_equals_serving_path(model_dir: Path) -> None:
    prompted = _prompted(model_dir, {"prefix": 3, "infix": 2, "suffix": 2})
    tokenizer = load_tokenizer(model_dir)
    start = prompted.model.config.decoder_start_token_id
    batch = collate_examples(Seq2SeqCollator(tokenizer=tokenizer), EXAMPLES, decoder_start_id=start)
    logits = prompted(batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"], batch["pair_start"])
    # The serving path: requests built as `cpm2 generate` builds them, encoded by the engine.
    assert prompted.prompt is not None
    served = prompted.prompt.to_soft_prompt()
    requests = [build_request(tokenizer, e, SamplingParams(), served) for e in EXAMPLES]
    with torch.no_grad():
        enc, valid = encode_requests(prompted.model, requests)
        state = prompted.model.start_decoding(enc, valid, capacity=batch["decoder_input_ids"].shape[1])
        expected = prompted.model.logits(prompted.model.decode(prompted.model.embed(batch["decoder_input_ids"]), state))
    scored = batch["labels"] != -100
    torch.testing.assert_close(logits[scored], expected[scored], rtol=1e-5, atol=1e-5)
    # Only the prompt receives gradients; every part does (the infix sits in the pair rows).
    prompted.model.requires_grad_(False)
    loss, _ = prompted_lm_loss(prompted, batch)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in prompted.prompt.rows.values())


def test_prompt_initialised_from_token_embeddings(model_dir: Path) -> None:
    model, _ = load_model(model_dir, dtype="float32", pack=False)
    prompt = TrainableSoftPrompt.from_embeddings(model.embed, {"prefix": 5, "suffix": 2}, init_ids={"prefix": [7, 9]})
    torch.testing.assert_close(prompt.rows["prefix"].data, model.embed.weight[[7, 9, 7, 9, 7]])
    rows = prompt.rows["suffix"].data
    assert all(any(torch.equal(row, e) for e in model.embed.weight) for row in rows)  # sampled vocabulary rows
    with pytest.raises(ConfigError, match="no virtual token"):
        TrainableSoftPrompt({"prefix": 0}, 64)


def test_prompt_initialised_from_scaled_embeddings() -> None:
    # M2M-100 / NLLB scale token embeddings by sqrt(d_model) on the way in; a prompt taken from
    # them must sit among the vectors the encoder really sees.
    embed = TokenEmbedding(50, 16, scale=4.0)
    prompt = TrainableSoftPrompt.from_embeddings(embed, {"prefix": 2}, init_ids={"prefix": [3, 8]})
    torch.testing.assert_close(prompt.rows["prefix"].data, embed.weight[[3, 8]] * 4.0)


def _config(model_dir: Path, out: Path, **overrides: Any) -> PromptJobConfig:
    data: dict[str, Any] = {
        "model": {"dir": str(model_dir)},
        "task": {"name": "same", "num_eval_examples": 8, "max_new_tokens": 3, "eval_batch_size": 8},
        "prompt": {"prefix_length": 3},
        "optimizer": {"name": "adamw", "lr": 0.3, "weight_decay": 0.01},
        "steps": 8,
        "batch_size": 8,
        "log_every": 1,
        "eval_every": 4,
        "checkpoint_every": 4,
        "output_dir": str(out),
        "progress": False,
    }
    for key, value in overrides.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return parse_job_config(data, PromptJobConfig)


def test_job_writes_servable_prompt_and_learns(model_dir: Path, tmp_path: Path) -> None:
    held = generate_task("same", "validation", num_examples=16)
    tokenizer = load_tokenizer(model_dir)
    start = get_preset("tiny").config.decoder_start_token_id
    held_batch = collate_examples(Seq2SeqCollator(tokenizer=tokenizer), held, decoder_start_id=start)

    config = _config(model_dir, tmp_path / "run", prompt={"prefix_length": 3, "infix_length": 2})
    initial = PromptedSeq2SeqLM(*_build(config)).eval()
    result = run_prompt_job(config, device="cpu")
    assert result.peft_dir is None  # an infix has no PEFT form

    served = parse_soft_prompt(result.prompt_path.read_bytes(), d_model=64, dtype=torch.float32, max_virtual_tokens=100)
    assert served.num_virtual_tokens == {"prefix": 3, "infix": 2}
    assert served.metadata["task"] == "same"
    rows = TrainableSoftPrompt({"prefix": 3, "infix": 2}, 64)
    rows.rows["prefix"].data.copy_(served.prefix)
    rows.rows["infix"].data.copy_(served.infix)
    trained = PromptedSeq2SeqLM(initial.model, rows).eval()
    with torch.no_grad():
        before, _ = prompted_lm_loss(initial, held_batch)
        after, _ = prompted_lm_loss(trained, held_batch)
    assert after < before - 0.5, (before, after)  # the held-out loss falls well beyond noise

    # The engine's Generator with the loaded file decodes exactly what the training module decodes.
    params = SamplingParams(max_new_tokens=5)
    results = Generator(trained.model, tokenizer).generate([build_request(tokenizer, e, params, served) for e in held])
    own = trained.greedy(held_batch, max_new_tokens=5, eos_id=tokenizer.eos_id, num_choosable=tokenizer.vocab_size)
    assert [r.token_ids for r in results] == own
    evals = [r for r in read_metrics(config.output_dir / "metrics.jsonl") if "eval_acc/same" in r]
    assert [r["step"] for r in evals] == [4, 8]


def _build(config: PromptJobConfig) -> tuple[Any, Any]:
    from training.jobs.prompt import build_prompted_model

    built = build_prompted_model(config, torch.device("cpu"))
    return built.model, built.prompt


def test_prefix_prompt_gets_peft_copy_and_resumes_exactly(model_dir: Path, tmp_path: Path) -> None:
    straight = run_prompt_job(_config(model_dir, tmp_path / "a", eval_every=0), device="cpu")
    assert straight.peft_dir is not None
    peft = read_peft_dir(straight.peft_dir, d_model=64)
    served = parse_soft_prompt(straight.prompt_path.read_bytes(), d_model=64, dtype=torch.float32, max_virtual_tokens=9)
    assert served.prefix is not None
    assert peft.prefix is not None
    assert torch.equal(peft.prefix, served.prefix)

    run_prompt_job(_config(model_dir, tmp_path / "b", eval_every=0, steps=4), device="cpu")
    resumed = run_prompt_job(_config(model_dir, tmp_path / "b", eval_every=0), device="cpu")
    again = parse_soft_prompt(resumed.prompt_path.read_bytes(), d_model=64, dtype=torch.float32, max_virtual_tokens=9)
    assert again.prefix is not None
    assert torch.equal(again.prefix, served.prefix)
    losses = [[r["loss"] for r in read_metrics(tmp_path / d / "metrics.jsonl")] for d in ("a", "b")]
    assert losses[0] == losses[1]


def test_config_refuses_a_schedule_other_than_constant(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="constant learning rate"):
        _config(model_dir, tmp_path, schedule={"name": "linear"})


def test_job_trains_on_jsonl_files_with_adafactor(model_dir: Path, tmp_path: Path) -> None:
    train = write_jsonl(generate_task("same", "train", num_examples=16), tmp_path / "train.jsonl")
    held = write_jsonl(generate_task("same", "validation", num_examples=4), tmp_path / "eval.jsonl")
    task = {"name": None, "train_file": str(train), "eval_file": str(held), "text_pair_field": "text_pair"}
    config = _config(model_dir, tmp_path / "run", task=task, steps=2, eval_every=2, optimizer={"name": "adafactor"})
    run_prompt_job(config, device="cpu")
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records if "eval_acc/mean" in r] == [2]


def test_frozen_moe_routes_as_served_while_the_prompt_trains(tmp_path: Path, tiny_model_dir: Path) -> None:
    # An upcycled model's config keeps its training routing (balanced); with frozen experts the
    # prompt must learn against the argmax routing the server uses, not a balancing assignment.
    model_dir = tmp_path / "balanced"
    shutil.copytree(tiny_model_dir, model_dir)
    config_file = model_dir / "config.json"
    config = json.loads(config_file.read_text())
    config["moe"]["train_routing"] = "balanced"
    config_file.write_text(json.dumps(config))
    job = _config(model_dir, tmp_path / "run")
    module = build_prompted_model(job, torch.device("cpu"))
    layers = [m for m in module.modules() if isinstance(m, MoEFeedForward)]
    assert layers
    assert module.model.training  # dropout as configured; only the routing is the server's
    assert {layer.train_routing for layer in layers} == {"inference"}
