"""`run_job`: the one function a training job calls, so that each job is only its factories.

A job (pretrain, KI, upcycle, prompt, finetune) provides a config class, a model factory, a loss
function and a data factory; `run_job` joins the torchrun group, seeds, builds and wraps the model,
resumes, trains, and leaves the group.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from torch import nn

from engine.model.transformer import Seq2SeqLM
from engine.weights.init import random_tensor
from engine.weights.loader import load_model
from engine.weights.presets import get_preset
from training.config import JobConfig, ModelSpec
from training.distributed import init_distributed, shutdown_distributed
from training.trainer import EvalFn, LossFn, ResumableIterator, Trainer

C = TypeVar("C", bound=JobConfig)


@dataclass(frozen=True)
class DataShard:
    """What a data factory needs to produce this rank's part of every global batch."""

    rank: int
    world_size: int
    micro_batch_size: int
    """Sequences per `__next__` on this rank."""
    seed: int


ModelFactory = Callable[[C, torch.device], nn.Module]
DataFactory = Callable[[C, DataShard], ResumableIterator]


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(spec: ModelSpec, device: torch.device) -> Seq2SeqLM:
    """A trainable float32 model: loaded from `spec.dir`, or a preset with T5's random init."""
    if spec.dir is not None:
        model, _ = load_model(spec.dir, dtype="float32", device=device, pack=False)
        if spec.dropout_rate is not None:
            # Blocks copy config.dropout_rate at construction; the loaded model's config is fixed.
            for module in model.modules():
                if isinstance(getattr(module, "dropout", None), float):
                    setattr(module, "dropout", spec.dropout_rate)  # noqa: B010
        return model.train().requires_grad_(True)
    assert spec.preset is not None  # ModelSpec guarantees exactly one of dir / preset
    config = get_preset(spec.preset).config
    if spec.dropout_rate is not None:
        config = dataclasses.replace(config, dropout_rate=spec.dropout_rate)
    with torch.device("meta"):
        model = Seq2SeqLM(config)
    state = {k: random_tensor(config, k, v.shape, seed=spec.init_seed) for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    return model.to(device).train()


def run_job(
    config: C,
    model_factory: ModelFactory[C],
    loss_fn: LossFn,
    data_factory: DataFactory[C],
    *,
    trainable: Callable[[str], bool] | None = None,
    eval_fn: EvalFn | None = None,
    device: str | None = None,
) -> Trainer:
    """Train `config` to its last step (resuming per `config.resume`) and return the trainer."""
    ctx = init_distributed(device)
    try:
        # The same seed on every rank builds the same initial model; training randomness (dropout)
        # then differs per rank, as independent replicas' would.
        seed_everything(config.seed)
        model = model_factory(config, ctx.device)
        shard = DataShard(
            rank=ctx.rank,
            world_size=ctx.world_size,
            micro_batch_size=config.micro_batch_size(ctx.world_size),
            seed=config.seed,
        )
        data = data_factory(config, shard)
        trainer = Trainer(
            config=config, model=model, loss_fn=loss_fn, data=data, ctx=ctx, trainable=trainable, eval_fn=eval_fn
        )
        seed_everything(config.seed + ctx.rank)
        trainer.resume()
        trainer.fit()
        return trainer
    finally:
        shutdown_distributed()
