"""Task evaluation: answers are what the engine's Generator gives (as `cpm2 generate` builds requests),
batching and soft prompts change nothing but what they should, and scores reach the eval hook."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from engine.cli_generate import _request
from engine.errors import ConfigError
from engine.generation import Generator, SamplingParams
from engine.model import Seq2SeqLM
from engine.prompts import SoftPrompt
from engine.tokenizer import Tokenizer, load_tokenizer
from engine.weights.loader import load_model
from training.data.example import Example
from training.evaluate import build_request, evaluate_tasks, find_seq2seq, generate_answers, task_eval_fn
from training.tasks import generate_task

EXAMPLES = [
    *generate_task("num2zh", "validation", num_examples=3, seed=1),
    *generate_task("same", "validation", num_examples=3, seed=1),
    *generate_task("add", "validation", num_examples=2, seed=1),
]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> tuple[Seq2SeqLM, Tokenizer]:
    model, _ = load_model(tiny_model_dir, dtype="float32", device="cpu", pack=False)
    return model, load_tokenizer(tiny_model_dir)


def _reference(model: Seq2SeqLM, tokenizer: Tokenizer, example: Example, prompt: SoftPrompt | None) -> str:
    # One request at a time, built by the CLI's own code: the reference for batched evaluation.
    request = _request(tokenizer, example.input, example.text_pair, SamplingParams(max_new_tokens=8), prompt)
    return Generator(model, tokenizer).generate([request])[0].text


def test_answers_equal_one_by_one_cli_generation(loaded: tuple[Seq2SeqLM, Tokenizer]) -> None:
    model, tokenizer = loaded
    answers = generate_answers(model, tokenizer, EXAMPLES, batch_size=3, max_new_tokens=8)
    assert answers == [_reference(model, tokenizer, e, None) for e in EXAMPLES]
    assert any(answers), "a random model still says something"


def test_soft_prompt_is_placed_as_the_server_places_it(loaded: tuple[Seq2SeqLM, Tokenizer]) -> None:
    model, tokenizer = loaded
    gen = torch.Generator().manual_seed(0)
    d = model.config.d_model
    # A trainable prompt (requires_grad, float64) must be detached and cast, not rejected.
    prompt = SoftPrompt(
        prefix=(torch.randn(3, d, generator=gen, dtype=torch.float64) * 5).requires_grad_(),
        infix=torch.randn(2, d, generator=gen) * 5,
    )
    with_prompt = generate_answers(model, tokenizer, EXAMPLES, prompt=prompt, batch_size=4, max_new_tokens=8)
    assert prompt.prefix is not None
    assert prompt.infix is not None
    plain = SoftPrompt(prefix=prompt.prefix.detach().float(), infix=prompt.infix)
    assert with_prompt == [_reference(model, tokenizer, e, plain) for e in EXAMPLES]
    assert with_prompt != generate_answers(model, tokenizer, EXAMPLES, batch_size=4, max_new_tokens=8)


def test_mode_is_restored_and_no_graph_is_built(loaded: tuple[Seq2SeqLM, Tokenizer]) -> None:
    model, tokenizer = loaded
    model.train()
    try:
        generate_answers(model, tokenizer, EXAMPLES[:2], max_new_tokens=4)
        assert model.training
    finally:
        model.eval()
    generate_answers(model, tokenizer, EXAMPLES[:2], max_new_tokens=4)
    assert not model.training
    assert all(p.grad is None for p in model.parameters())


def test_scores_count_exact_matches_per_task(loaded: tuple[Seq2SeqLM, Tokenizer]) -> None:
    model, tokenizer = loaded
    answers = generate_answers(model, tokenizer, EXAMPLES, max_new_tokens=8)
    # Targets set to the model's own answers (with CJK spacing the scorer ignores) score 1; the
    # real targets of a random model score 0 on the free-text tasks.
    echoed = [
        Example(input=e.input, text_pair=e.text_pair, target=f"  {a} ", task=e.task)
        for e, a in zip(EXAMPLES, answers, strict=True)
    ]
    assert {t: s.accuracy for t, s in evaluate_tasks(model, tokenizer, echoed, max_new_tokens=8).items()} == {
        "add": 1.0,
        "num2zh": 1.0,
        "same": 1.0,
    }
    scores = evaluate_tasks(model, tokenizer, EXAMPLES, max_new_tokens=8)
    assert [(s.task, s.num_examples) for s in scores.values()] == [("add", 2), ("num2zh", 3), ("same", 3)]
    assert scores["num2zh"].num_correct == 0


class _PromptWrapper(nn.Module):
    """What a prompt-tuning job trains: a frozen model and a prompt parameter."""

    def __init__(self, model: Seq2SeqLM) -> None:
        super().__init__()
        self.model = model
        self.prefix = nn.Parameter(torch.randn(2, model.config.d_model, generator=torch.Generator().manual_seed(3)))


def test_eval_fn_finds_the_model_and_asks_for_the_prompt(loaded: tuple[Seq2SeqLM, Tokenizer]) -> None:
    model, tokenizer = loaded
    wrapper = _PromptWrapper(model)
    seen: list[nn.Module] = []

    def provider(module: nn.Module) -> SoftPrompt:
        seen.append(module)
        assert isinstance(module, _PromptWrapper)
        return SoftPrompt(prefix=module.prefix)

    eval_fn = task_eval_fn(tokenizer, EXAMPLES, prompt_provider=provider, max_new_tokens=8)
    metrics = eval_fn(wrapper, 10)
    assert seen == [wrapper]
    assert set(metrics) == {"acc/add", "acc/num2zh", "acc/same", "acc/mean"}
    assert metrics["acc/mean"] == pytest.approx(sum(metrics[f"acc/{t}"] for t in ("add", "num2zh", "same")) / 3)
    assert find_seq2seq(wrapper) is model
    with pytest.raises(ConfigError, match="no Seq2SeqLM"):
        find_seq2seq(nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="empty"):
        task_eval_fn(tokenizer, [])


def test_requests_are_built_as_the_cli_builds_them(loaded: tuple[Seq2SeqLM, Tokenizer]) -> None:
    _, tokenizer = loaded
    params = SamplingParams(max_new_tokens=5)
    for example in (EXAMPLES[0], EXAMPLES[3]):  # a single input and a sentence pair
        assert build_request(tokenizer, example, params, None) == _request(
            tokenizer, example.input, example.text_pair, params, None
        )
