"""`cpm2 train upcycle`: turn a dense model into an MoE model and continue span-corruption pretraining.

CPM-2-MoE (SEED.md) was made this way from the dense bilingual CPM-2: every expert an exact copy of
the dense FFN, fresh frozen orthogonal centroids (gain 0.01), then pretraining with the BASE-layer
balanced assignment. The surgery is `training.upcycle`; the data, tokenizer and settings are those
of `cpm2 train pretrain` (`PretrainConfig`), plus an `upcycle` section. At the end the final
checkpoint is written as a native MoE model directory (experts in the expert store, as `cpm2 init`
writes them) that `cpm2 generate` and `cpm2 serve` load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from safetensors.torch import load_file

from engine.errors import CheckpointError
from engine.model import Seq2SeqLM
from engine.tokenizer import load_tokenizer
from training.checkpoint import MODEL_FILE, latest_checkpoint
from training.config import Section
from training.job import DataShard, build_model, run_job
from training.jobs.command import add_job_command
from training.jobs.export import write_model_dir
from training.jobs.mixture import MixedBatches
from training.jobs.pretrain import (
    PretrainConfig,
    SpanCorruptionBatches,
    build_batches,
    held_out_eval_fn,
    tokenizer_dir,
)
from training.moe_losses import seq2seq_moe_loss
from training.upcycle import upcycle_config, upcycle_model

__all__ = ["UpcycleConfig", "UpcycleSpec", "add_upcycle_command", "build_upcycled_model", "upcycle"]

PRODUCER = "cpm2 train upcycle"


class UpcycleSpec(Section):
    """How the dense model becomes an MoE model, and how the MoE trains."""

    num_experts: int = Field(8, ge=1)
    """Experts per MoE layer, each a copy of that block's dense FFN (CPM-2-MoE: 32)."""
    encoder_layers: tuple[int, ...] | None = None
    """Encoder blocks that become MoE layers; null: every block (CPM-2-MoE)."""
    decoder_layers: tuple[int, ...] | None = None
    """Decoder blocks that become MoE layers; null: every block."""
    router: Literal["centroid", "learned"] = "centroid"
    """`centroid`: CPM-2's frozen orthogonal centroids; `learned`: a Switch router (trains)."""
    train_routing: Literal["balanced", "top1", "inference"] = "balanced"
    """`balanced`: CPM-2 / BASE-layer balanced assignment; `top1`: Switch top-1 with the
    load-balancing loss (needs `router: learned`); `inference`: argmax routing, no auxiliary loss."""
    centroid_gain: float = Field(0.01, gt=0)
    """Gain of the fresh orthogonal centroids (CPM-2: 0.01)."""
    aux_loss_coef: float = Field(0.01, ge=0)
    """Weight of the load-balancing loss (`train_routing: top1`; Switch used 0.01)."""
    router_seed: int = 0
    """Seed of the fresh router tensors (the same seed rebuilds the same centroids on resume)."""


class UpcycleConfig(PretrainConfig):
    """An upcycling run: a pretraining run whose `model` is a dense model directory, plus `upcycle`."""

    upcycle: UpcycleSpec = UpcycleSpec()


def build_upcycled_model(config: UpcycleConfig, device: torch.device) -> Seq2SeqLM:
    """The dense model of `config.model`, upcycled per `config.upcycle`, on `device`, in train mode."""
    dense = build_model(config.model, device)
    spec = config.upcycle
    moe_config = upcycle_config(
        dense.config,
        num_experts=spec.num_experts,
        encoder_layers=spec.encoder_layers,
        decoder_layers=spec.decoder_layers,
        router=spec.router,
        train_routing=spec.train_routing,
        centroid_gain=spec.centroid_gain,
        aux_loss_coef=spec.aux_loss_coef,
    )
    if config.model.dropout_rate is not None:
        moe_config = moe_config.replace(dropout_rate=config.model.dropout_rate)
    return upcycle_model(dense, moe_config, seed=spec.router_seed).train().requires_grad_(True)


def upcycle(config: UpcycleConfig, *, device: str | None = None) -> Path:
    """Run (or resume) `config` to its last step and export the MoE model; returns its directory."""
    tok_dir = tokenizer_dir(config)
    tokenizer = load_tokenizer(tok_dir)

    def data_factory(cfg: UpcycleConfig, shard: DataShard) -> SpanCorruptionBatches | MixedBatches:
        return build_batches(cfg, shard, tokenizer)

    # Held-out loss runs in eval mode, i.e. with inference (argmax) routing: what serving will get.
    eval_fn = held_out_eval_fn(config, tokenizer)
    trainer = run_job(config, build_upcycled_model, seq2seq_moe_loss, data_factory, eval_fn=eval_fn, device=device)
    out_dir = config.export_dir or config.output_dir / "model"
    if trainer.ctx.is_main:
        # The starting MoE again, on CPU (same router seed: same frozen centroids, which are buffers),
        # with the final checkpoint's trained tensors loaded over it.
        base = build_upcycled_model(config, torch.device("cpu"))
        latest = latest_checkpoint(trainer.checkpoint_dir)
        if latest is None:
            raise CheckpointError(f"no checkpoint under {trainer.checkpoint_dir} to export; did training run?")
        base.load_state_dict(load_file(str(latest / MODEL_FILE)), strict=False)
        extra = {
            "upcycled_from": str(config.model.dir),
            "trained_steps": trainer.step,
            "trained_tokens": trainer.state.tokens,
        }
        write_model_dir(base.eval(), out_dir, tokenizer_dir=tok_dir, producer=PRODUCER, extra=extra)
    return out_dir


def add_upcycle_command(commands: Any) -> None:
    """``cpm2 train upcycle``."""
    add_job_command(
        commands,
        "upcycle",
        help="dense → MoE (experts copy the dense FFN) and continue span-corruption pretraining",
        description="Upcycle a dense model directory into an MoE model and pretrain it; see "
        "training/configs/upcycle.yaml.",
        config_cls=UpcycleConfig,
        run=upcycle,
    )
