"""`cpm2 train ki`: knowledge inheritance — span-corruption pretraining of a student that also learns
from a trained teacher of another size (Qin et al. 2021; the loss and its schedule are in
`training.distill`).

The student is a preset (optionally reshaped by `ki.student_overrides`: wider, deeper, dense) or a
model directory; with `ki.grow_vocab` its vocabulary first grows to the run's tokenizer, new pieces
starting from their old sub-pieces (`training.vocab_growth`, CPM-2's bilingual-from-Chinese start).
Data, trainer, checkpoints and export are pretraining's (`training.jobs.pretrain`); the teacher is
held by the loss, so it is neither trained nor checkpointed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from engine.config import ModelConfig
from engine.errors import ConfigError
from engine.model import Seq2SeqLM
from engine.tokenizer import Tokenizer, load_tokenizer
from engine.weights.init import random_tensor
from engine.weights.loader import load_model
from engine.weights.presets import get_preset
from training.config import Section
from training.distill import STEP_KEY, KILoss, vocab_map_between
from training.job import DataShard, build_model, run_job
from training.jobs.command import add_job_command
from training.jobs.export import export_trained
from training.jobs.pretrain import PretrainConfig, build_batches, check_vocab_fits, held_out_eval_fn
from training.trainer import Batch, ResumableIterator
from training.vocab_growth import find_sentencepiece_model, grow_vocabulary, plan_vocab_growth

__all__ = ["KIConfig", "KISpec", "StepStampedBatches", "add_ki_command", "build_student", "train_ki"]

PRODUCER = "cpm2 train ki"


class KISpec(Section):
    """The teacher and the distillation schedule."""

    teacher: Path
    """Model directory of the trained teacher (any size; frozen)."""
    temperature: float = Field(2.0, gt=0)
    """Softmax temperature T of both distributions (the KI paper: 2)."""
    alpha0: float = Field(1.0, ge=0, le=1)
    """Weight of the teacher term at step 0 (0 trains the student alone: the from-scratch baseline)."""
    distill_steps: int | None = Field(None, ge=0)
    """Step at which α reaches 0 and the teacher is no longer run; null: 44% of `steps` (the KI
    paper's script). A multiple of `log_every` keeps every logged `kd_loss` a mean over whole windows."""
    student_overrides: dict[str, Any] = Field(default_factory=dict)
    """ModelConfig fields replacing the preset's (e.g. `{d_model: 128, d_kv: 32, moe: null}`)."""
    grow_vocab: bool = False
    """Grow the student's vocabulary from its own tokenizer (its model dir's, else the teacher's) to
    the run's `tokenizer`, new pieces initialised from their old sub-pieces."""


class KIConfig(PretrainConfig):
    """Pretraining settings (corpus, span corruption, export) plus the teacher. `tokenizer` is the
    student's; null: the student model dir's, else the teacher's."""

    ki: KISpec

    def distill_steps(self) -> int:
        """α's zero crossing (`ki.distill_steps`, default 44% of the run)."""
        return self.ki.distill_steps if self.ki.distill_steps is not None else round(0.44 * self.steps)


class StepStampedBatches:
    """Adds the 0-based optimizer step to every micro-batch, so the loss can read α's schedule.

    The count lives in the data state, which checkpoints restore exactly (at the same world size);
    the trainer draws `micro_batches_per_step` batches per step (its `grad_accum`)."""

    def __init__(self, inner: ResumableIterator, *, micro_batches_per_step: int) -> None:
        self.inner = inner
        self.micro_batches_per_step = micro_batches_per_step
        self.num_batches = 0

    def __iter__(self) -> StepStampedBatches:
        return self

    def __next__(self) -> Batch:
        batch = next(self.inner)
        step = self.num_batches // self.micro_batches_per_step
        self.num_batches += 1
        return {**batch, STEP_KEY: torch.tensor(step)}

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "num_batches": self.num_batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state["inner"])
        self.num_batches = state["num_batches"]


def _student_tokenizer_dir(config: KIConfig) -> Path:
    if config.tokenizer is not None:
        return config.tokenizer
    return config.model.dir if config.model.dir is not None else config.ki.teacher


def _old_tokenizer_dir(config: KIConfig) -> Path:
    """The tokenizer the student's starting weights were trained with (what vocab growth grows from)."""
    return config.model.dir if config.model.dir is not None else config.ki.teacher


def _preset_model(config: KIConfig, device: torch.device) -> Seq2SeqLM:
    spec = config.model
    assert spec.preset is not None  # only called for presets
    base = get_preset(spec.preset).config.to_dict()
    model_config = ModelConfig.from_dict({**base, **config.ki.student_overrides}, source="ki.student_overrides")
    if spec.dropout_rate is not None:
        model_config = model_config.replace(dropout_rate=spec.dropout_rate)
    with torch.device("meta"):
        model = Seq2SeqLM(model_config)
    state = {k: random_tensor(model_config, k, v.shape, seed=spec.init_seed) for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    return model.to(device).train()


def build_student(config: KIConfig, device: torch.device) -> Seq2SeqLM:
    """The student at step 0: preset (reshaped) or model dir, its vocabulary grown if asked."""
    if config.ki.student_overrides:
        if config.model.preset is None:
            raise ConfigError("ki.student_overrides reshape a preset; remove them or set model.preset")
        model = _preset_model(config, device)
    else:
        model = build_model(config.model, device)
    if config.ki.grow_vocab:
        if config.tokenizer is None:
            raise ConfigError("ki.grow_vocab needs `tokenizer`: the directory of the larger tokenizer to grow to")
        old_dir = _old_tokenizer_dir(config)
        plan = plan_vocab_growth(find_sentencepiece_model(old_dir), find_sentencepiece_model(config.tokenizer))
        model = grow_vocabulary(model, plan).to(device)
    return model


def build_loss(config: KIConfig, student_tokenizer: Tokenizer) -> KILoss:
    """The KI loss with the teacher loaded (float32, CPU until the first batch moves it)."""
    teacher, _ = load_model(config.ki.teacher, dtype="float32", device="cpu", pack=False)
    teacher_tokenizer = load_tokenizer(config.ki.teacher)
    return KILoss(
        teacher,
        vocab_map=vocab_map_between(student_tokenizer, teacher_tokenizer),
        temperature=config.ki.temperature,
        alpha0=config.ki.alpha0,
        distill_steps=config.distill_steps(),
        teacher_unk_id=teacher_tokenizer.unk_id,
    )


def train_ki(config: KIConfig, *, device: str | None = None, export: bool = True) -> Path:
    """Run (or resume) `config` to its last step and export the student; returns the model directory."""
    tok_dir = _student_tokenizer_dir(config)
    tokenizer = load_tokenizer(tok_dir)
    loss = build_loss(config, tokenizer)

    def model_factory(cfg: KIConfig, dev: torch.device) -> Seq2SeqLM:
        model = build_student(cfg, dev)
        check_vocab_fits(model, tokenizer, tok_dir, fix="set ki.grow_vocab: true to grow them from the old pieces")
        return model

    def data_factory(cfg: KIConfig, shard: DataShard) -> StepStampedBatches:
        batches = build_batches(cfg, shard, tokenizer)
        return StepStampedBatches(batches, micro_batches_per_step=cfg.grad_accum)

    eval_fn = held_out_eval_fn(config, tokenizer)
    trainer = run_job(config, model_factory, loss, data_factory, eval_fn=eval_fn, device=device)
    out_dir = config.export_dir or config.output_dir / "model"
    if not export:
        return out_dir
    return export_trained(
        trainer,
        out_dir,
        lambda: build_student(config, torch.device("cpu")),
        tokenizer_dir=tok_dir,
        producer=PRODUCER,
        extra={"teacher": str(config.ki.teacher)},
    )


def add_ki_command(commands: Any) -> None:
    """``cpm2 train ki``."""
    add_job_command(
        commands,
        "ki",
        help="knowledge inheritance: pretrain a student with a trained teacher's soft targets",
        description="KI (Qin et al. 2021): (1-α)·LM + α·T²·KL(teacher‖student), α annealed to 0; "
        "see training/configs/ki.yaml.",
        config_cls=KIConfig,
        run=train_ki,
    )
