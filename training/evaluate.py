"""Task evaluation: greedy answers through the engine's `Generator`, scored by exact match.

Answers are generated exactly the way `cpm2 generate` and the server produce them (same request
building, same soft-prompt placement, same decoding loop), so an accuracy measured during training
is the accuracy a served model gives. Two-part examples (`text_pair`) are encoded as the CLI does:
the end-of-sequence token closes the pair, not the first segment.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from engine.errors import ConfigError, InputError
from engine.generation import GenerationRequest, Generator, SamplingParams
from engine.model import Seq2SeqLM
from engine.prompts import SoftPrompt
from engine.tokenizer import Tokenizer
from training.data.example import Example
from training.tasks.scoring import TaskScore, score_predictions

__all__ = [
    "EvalFn",
    "PromptProvider",
    "build_request",
    "evaluate_tasks",
    "find_seq2seq",
    "generate_answers",
    "task_eval_fn",
    "task_metrics",
]

EvalFn = Callable[[nn.Module, int], Mapping[str, float]]
"""`(model, step) -> metrics`, the Trainer's eval hook (same as `training.trainer.EvalFn`)."""
PromptProvider = Callable[[nn.Module], SoftPrompt | None]
"""Given the (possibly wrapped) training module, the soft prompt to evaluate with (prompt tuning)."""


def build_request(
    tokenizer: Tokenizer, example: Example, params: SamplingParams, prompt: SoftPrompt | None
) -> GenerationRequest:
    """The generation request of `example`, built as `cpm2 generate` builds it."""
    if example.text_pair is None:
        return GenerationRequest(tuple(tokenizer.encode(example.input)), params, prompt=prompt)
    first = tuple(tokenizer.encode(example.input, add_eos=False))
    return GenerationRequest(first, params, pair_ids=tuple(tokenizer.encode(example.text_pair)), prompt=prompt)


def find_seq2seq(module: nn.Module) -> Seq2SeqLM:
    """The `Seq2SeqLM` inside `module`: itself, under a DDP `.module`, or the first such submodule
    of a job's wrapper (a prompt-tuning module holding a frozen model)."""
    if isinstance(module, Seq2SeqLM):
        return module
    for sub in module.modules():
        if isinstance(sub, Seq2SeqLM):
            return sub
    raise ConfigError(f"{type(module).__name__} holds no Seq2SeqLM to generate with")


def _prompt_for(model: Seq2SeqLM, prompt: SoftPrompt | None) -> SoftPrompt | None:
    # Trainable prompts are leaf tensors with gradients; generation wants plain tensors on the
    # model's device and dtype, exactly as the server holds a parsed prompt.
    if prompt is None:
        return None
    weight = model.embed.weight
    detached = SoftPrompt(**{k: t.detach() for k, t in prompt.tensors().items()}, metadata=dict(prompt.metadata))
    return detached.to(dtype=weight.dtype, device=weight.device)


def generate_answers(
    model: Seq2SeqLM,
    tokenizer: Tokenizer,
    examples: Sequence[Example],
    *,
    prompt: SoftPrompt | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 24,
) -> list[str]:
    """Greedy answers to `examples`, in order (the model is put in eval mode and restored after)."""
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    params = SamplingParams(max_new_tokens=max_new_tokens)
    generator = Generator(model, tokenizer)
    soft = _prompt_for(model, prompt)
    was_training = model.training
    model.eval()
    answers: list[str] = []
    try:
        with torch.no_grad():
            for start in range(0, len(examples), batch_size):
                chunk = examples[start : start + batch_size]
                requests = [build_request(tokenizer, e, params, soft) for e in chunk]
                answers.extend(result.text for result in generator.generate(requests))
    finally:
        model.train(was_training)
    return answers


def evaluate_tasks(
    model: Seq2SeqLM,
    tokenizer: Tokenizer,
    examples: Sequence[Example],
    *,
    prompt: SoftPrompt | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 24,
) -> dict[str, TaskScore]:
    """Per-task exact-match scores of the model's greedy answers to `examples`."""
    answers = generate_answers(
        model, tokenizer, examples, prompt=prompt, batch_size=batch_size, max_new_tokens=max_new_tokens
    )
    return score_predictions(examples, answers)


def task_metrics(scores: Mapping[str, TaskScore]) -> dict[str, float]:
    """`{"acc/<task>": accuracy, ..., "acc/mean": mean over tasks}` (what the metrics log holds)."""
    metrics = {f"acc/{task}": score.accuracy for task, score in scores.items()}
    if scores:
        metrics["acc/mean"] = sum(s.accuracy for s in scores.values()) / len(scores)
    return metrics


def task_eval_fn(
    tokenizer: Tokenizer,
    examples: Sequence[Example],
    *,
    prompt_provider: PromptProvider | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 24,
) -> EvalFn:
    """A Trainer eval hook scoring `examples`; metrics as `task_metrics` names them."""
    if not examples:
        raise ConfigError("the evaluation set is empty; give at least one example or disable eval_every")
    held = list(examples)

    def eval_fn(module: nn.Module, step: int) -> Mapping[str, float]:
        model = find_seq2seq(module)
        prompt = prompt_provider(module) if prompt_provider is not None else None
        scores = evaluate_tasks(
            model, tokenizer, held, prompt=prompt, batch_size=batch_size, max_new_tokens=max_new_tokens
        )
        return task_metrics(scores)

    return eval_fn
