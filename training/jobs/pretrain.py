"""`cpm2 train pretrain`: T5 / CPM-2 span-corruption pretraining, from scratch or from a model dir.

Documents (the built-in generated corpus of `training.tasks`, or text / JSONL files) are tokenized,
concatenated, cut and corrupted by `SpanCorruptionStream` (15% noise, mean span 3: Raffel et al.
2020, CPM-2 §3), padded to fixed encoder / decoder lengths and trained with the token-mean
cross-entropy. The trainer gives the progress bar, metrics log, checkpoints and exact resume; at the
end the final checkpoint is exported as a native model directory (`output_dir/model` by default)
that `cpm2 generate`, `cpm2 serve` and the other jobs' `model.dir` load.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from engine.errors import ConfigError
from engine.model import Seq2SeqLM
from engine.tokenizer import Tokenizer, check_special_ids, decoder_start_id, load_tokenizer
from engine.weights.init import write_tokenizer
from training.config import JobConfig, Section
from training.data.example import Example, ResumableIterator
from training.data.readers import FileReader, ReaderConfig
from training.data.span_corruption import SpanCorruptionConfig, SpanCorruptionStream
from training.job import DataShard, build_model, run_job
from training.jobs.command import add_job_command
from training.jobs.export import export_trained
from training.jobs.mixture import MixedBatches, MixtureSpec
from training.jobs.span_batches import RankSlice, SpanCorruptionBatches
from training.losses import seq2seq_lm_loss
from training.tasks import GeneratedDocuments
from training.trainer import EvalFn

__all__ = [
    "CorpusSpec",
    "HeldOutSpec",
    "PretrainConfig",
    "SpanCorruptionBatches",
    "SpanSpec",
    "add_pretrain_command",
    "build_batches",
    "held_out_eval_fn",
    "pretrain",
    "tokenizer_dir",
]

PRODUCER = "cpm2 train pretrain"


class CorpusSpec(Section):
    """The documents to pretrain on."""

    source: Literal["generated", "files"] = "generated"
    """`generated`: the endless built-in documents of `training.tasks` (numbers in digits, English and
    Chinese; no evaluation answer appears); `files`: the text / JSONL `paths`."""
    paths: tuple[str, ...] = ()
    """Files or globs (`.gz` allowed) for `source: files`."""
    format: Literal["auto", "text", "jsonl"] = "auto"
    """`auto` reads `.jsonl`/`.json` as JSONL and everything else as text."""
    documents: Literal["line", "paragraph"] = "line"
    """Text files: one document per line, or per blank-line-separated paragraph."""
    text_field: str = "text"
    """JSONL field holding the document."""
    shuffle_buffer_size: int = Field(0, ge=0)
    """Documents held for shuffling (files only); 0 keeps file order."""
    num_epochs: int | None = Field(None, ge=1)
    """Passes over the files; null repeats them for as many steps as the run has."""


class SpanSpec(Section):
    """Span-corruption shapes and noise (`training.data.span_corruption`)."""

    encoder_length: int = Field(128, ge=4)
    """Encoder tokens per example, eos included (CPM-2: 512)."""
    decoder_length: int = Field(32, ge=2)
    """Decoder tokens per example, eos included (CPM-2: 256)."""
    noise_density: float = Field(0.15, gt=0, lt=1)
    """Fraction of the tokens masked."""
    mean_noise_span_length: float = Field(3.0, ge=1)
    """Average masked span length."""


class HeldOutSpec(Section):
    """Held-out span-corruption loss, logged as `eval_loss` every `eval_every` steps."""

    num_batches: int = Field(0, ge=0)
    """Batches of `batch_size` sequences scored; 0 turns the evaluation off."""
    paths: tuple[str, ...] = ()
    """Held-out text / JSONL files (read like `corpus`); empty: generated documents of another seed
    (the training documents are never among them)."""


class PretrainConfig(JobConfig):
    """A pretraining run: the trainer's settings plus corpus, span corruption, tokenizer and export."""

    corpus: CorpusSpec = CorpusSpec()
    span: SpanSpec = SpanSpec()
    held_out: HeldOutSpec = HeldOutSpec()
    mixture: MixtureSpec = MixtureSpec()
    """Built-in task examples mixed into the batches (multi-task pretraining); off by default."""
    tokenizer: Path | None = None
    """Directory holding the tokenizer (e.g. written by `cpm2 train tokenizer --out DIR`). Null: the
    model directory's; for a preset, the built-in tokenizer of `cpm2 init` (trained into
    `output_dir/tokenizer`)."""
    export_dir: Path | None = None
    """Where the trained model directory goes; null: `output_dir/model`."""


def tokenizer_dir(config: PretrainConfig) -> Path:
    """The directory the run's tokenizer is read from (trains the built-in one there if needed)."""
    if config.tokenizer is not None:
        return config.tokenizer
    if config.model.dir is not None:
        return config.model.dir
    target = config.output_dir / "tokenizer"
    if not (target / "spiece.model").is_file():
        # Every rank may get here at once; training is deterministic and the rename atomic, so the
        # last writer leaves the same bytes.
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target) as tmp:
            os.replace(write_tokenizer(Path(tmp)), target / "spiece.model")
    return target


def _documents(config: PretrainConfig, shard: DataShard, *, held_out: bool = False) -> ResumableIterator[Example]:
    corpus = config.corpus
    if held_out and not config.held_out.paths:
        return GeneratedDocuments(seed=config.seed + 1)
    if held_out:
        corpus = corpus.model_copy(update={"source": "files", "paths": config.held_out.paths, "num_epochs": 1})
    if corpus.source == "generated":
        if corpus.paths:
            raise ConfigError("corpus.paths is set but corpus.source is 'generated'; set source: files to read them")
        return RankSlice(GeneratedDocuments(seed=config.seed), start=shard.rank, step=shard.world_size)
    if not corpus.paths:
        raise ConfigError("corpus.source is 'files' but corpus.paths is empty; list the text or JSONL files")
    reader = ReaderConfig(
        paths=corpus.paths,
        format=corpus.format,
        documents=corpus.documents,
        input_field=corpus.text_field,
        rank=shard.rank,
        world_size=shard.world_size,
        shuffle_buffer_size=corpus.shuffle_buffer_size,
        seed=config.seed,
        num_epochs=corpus.num_epochs,
    )
    return FileReader(reader)


def build_batches(
    config: PretrainConfig, shard: DataShard, tokenizer: Tokenizer, *, held_out: bool = False
) -> SpanCorruptionBatches | MixedBatches:
    """This rank's batch stream, with `mixture`'s task rows if set (or, with `held_out`, the held-out
    documents' span corruption only)."""
    span = SpanCorruptionConfig(
        encoder_length=config.span.encoder_length,
        decoder_length=config.span.decoder_length,
        noise_density=config.span.noise_density,
        mean_noise_span_length=config.span.mean_noise_span_length,
        seed=config.seed,
    )
    stream = SpanCorruptionStream(_documents(config, shard, held_out=held_out), tokenizer, span)
    start = decoder_start_id(tokenizer)
    if config.mixture.active and not held_out:
        return MixedBatches(
            stream,
            config.mixture,
            batch_size=shard.micro_batch_size,
            decoder_start_id=start,
            seed=config.seed,
            rank=shard.rank,
        )
    return SpanCorruptionBatches(stream, batch_size=shard.micro_batch_size, decoder_start_id=start)


def held_out_eval_fn(config: PretrainConfig, tokenizer: Tokenizer) -> EvalFn | None:
    """Mean loss and token accuracy of the held-out batches (the same batches at every evaluation)."""
    if not config.held_out.num_batches:
        return None
    # Every rank scores all held-out batches: they are few, and the numbers agree across ranks.
    shard = DataShard(rank=0, world_size=1, micro_batch_size=config.batch_size, seed=config.seed)
    stream = build_batches(config, shard, tokenizer, held_out=True)
    batches = list(itertools.islice(stream, config.held_out.num_batches))
    if not batches:
        raise ConfigError("the held-out documents are too short for one batch; add held_out.paths or lower batch_size")

    def eval_fn(model: nn.Module, step: int) -> dict[str, float]:
        device = next(model.parameters()).device
        totals = {"loss": 0.0, "accuracy": 0.0}
        for batch in batches:
            loss, metrics = seq2seq_lm_loss(model, {k: v.to(device) for k, v in batch.items()})
            totals["loss"] += float(loss) / len(batches)
            totals["accuracy"] += float(metrics["accuracy"]) / len(batches)
        return totals

    return eval_fn


def check_vocab_fits(
    model: Seq2SeqLM,
    tokenizer: Tokenizer,
    source: Path,
    *,
    fix: str = "use a smaller tokenizer or a model with a larger vocab_size",
) -> None:
    """ConfigError (ending in `fix`) when the tokenizer has more ids than the model has embeddings."""
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ConfigError(
            f"the tokenizer in {source} has {tokenizer.vocab_size} ids but the model only "
            f"{model.config.vocab_size} embeddings; {fix}"
        )


def _check_tokenizer(model: Seq2SeqLM, tokenizer: Tokenizer, source: Path) -> None:
    check_vocab_fits(model, tokenizer, source)
    check_special_ids(
        tokenizer, eos=model.config.eos_token_id, decoder_start=model.config.decoder_start_token_id, source=source
    )


def pretrain(config: PretrainConfig, *, device: str | None = None) -> Path:
    """Run (or resume) `config` to its last step and export the model; returns the model directory."""
    tok_dir = tokenizer_dir(config)
    tokenizer = load_tokenizer(tok_dir)

    def model_factory(cfg: PretrainConfig, dev: torch.device) -> Seq2SeqLM:
        model = build_model(cfg.model, dev)
        _check_tokenizer(model, tokenizer, tok_dir)
        return model

    def data_factory(cfg: PretrainConfig, shard: DataShard) -> SpanCorruptionBatches | MixedBatches:
        return build_batches(cfg, shard, tokenizer)

    eval_fn = held_out_eval_fn(config, tokenizer)
    trainer = run_job(config, model_factory, seq2seq_lm_loss, data_factory, eval_fn=eval_fn, device=device)
    return export_trained(
        trainer,
        config.export_dir or config.output_dir / "model",
        lambda: build_model(config.model, torch.device("cpu")),
        tokenizer_dir=tok_dir,
        producer=PRODUCER,
        extra={"trained_tokens": trainer.state.tokens},
    )


def add_pretrain_command(commands: Any) -> None:
    """``cpm2 train pretrain``."""
    add_job_command(
        commands,
        "pretrain",
        help="span-corruption pretraining (from scratch or a model dir); writes a model directory",
        description="Pretrain with T5/CPM-2 span corruption; see training/configs/pretrain.yaml.",
        config_cls=PretrainConfig,
        run=pretrain,
    )
