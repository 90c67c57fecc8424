"""The training loop every cpm2 job shares.

A job supplies the model, which of its parameters train, a loss function and a resumable batch
iterator; the trainer owns everything else: gradient accumulation, clipping, optimizer and schedule
steps, bf16 autocast, data-parallel wrapping, a progress bar, the JSONL metrics log, eval hooks and
checkpoints from which a run resumes exactly (same losses, bit for bit on CPU fp32) — which is why
the RNG and data-reader states are checkpointed and eval hooks run with RNG preserved.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from engine.errors import CheckpointError, ConfigError
from training.checkpoint import TrainingState, latest_checkpoint, load_checkpoint, preserved_rng, save_checkpoint
from training.config import JobConfig
from training.distributed import DistContext, mean_across_ranks, parallelize, sum_across_ranks
from training.metrics_log import MetricsLog
from training.optim import build_optimizer, build_scheduler

Batch = Mapping[str, torch.Tensor]
Metrics = Mapping[str, float | torch.Tensor]
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, Metrics]]
"""`(model, batch) -> (scalar loss to minimise, extra metrics to log)`; the loss is a mean over the
micro-batch, and micro-batches (and ranks) weigh equally."""
EvalFn = Callable[[nn.Module, int], Mapping[str, float]]
"""`(model, step) -> metrics`, called on every rank in eval mode without gradients."""


@runtime_checkable
class ResumableIterator(Protocol):
    """A batch iterator whose position can be saved and restored (training/data readers)."""

    def __iter__(self) -> Iterator[Batch]: ...
    def __next__(self) -> Batch: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def count_tokens(batch: Batch) -> int:
    """Tokens a seq2seq batch feeds the model: unpadded encoder inputs plus scored decoder targets."""
    total = 0
    if "attention_mask" in batch:
        total += int(batch["attention_mask"].sum())
    if "labels" in batch:
        total += int((batch["labels"] != -100).sum())
    return total


class Trainer:
    """Runs `config.steps` optimizer steps of `loss_fn` over `data`; see the module docstring."""

    def __init__(
        self,
        *,
        config: JobConfig,
        model: nn.Module,
        loss_fn: LossFn,
        data: ResumableIterator,
        ctx: DistContext | None = None,
        trainable: Callable[[str], bool] | None = None,
        eval_fn: EvalFn | None = None,
        token_counter: Callable[[Batch], int] = count_tokens,
    ) -> None:
        """`trainable(name)` picks the parameters to train (all others are frozen); None keeps the
        model's own `requires_grad` flags. Frozen models (prompt tuning) and teachers held by the
        loss function (KI) need nothing else."""
        self.config = config
        self.ctx = ctx or DistContext()
        self.loss_fn = loss_fn
        self.data = data
        self.eval_fn = eval_fn
        self.token_counter = token_counter
        if trainable is not None:
            for name, param in model.named_parameters():
                param.requires_grad_(trainable(name))
        if not any(p.requires_grad for p in model.parameters()):
            raise ConfigError("no parameter of the model is trainable; check the job's `trainable` selection")
        config.micro_batch_size(self.ctx.world_size)  # fail before any work if the batch does not split
        self.model = parallelize(model.to(self.ctx.device), self.ctx, strategy=config.parallel)
        # Built after wrapping: FSDP replaces parameters with sharded ones.
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(
            ((n, p) for n, p in self.model.named_parameters() if p.requires_grad), config.optimizer
        )
        self.scheduler = build_scheduler(self.optimizer, config.schedule, config.steps)
        self.state = TrainingState(step=0, tokens=0, elapsed=0.0, data_state=None)
        self._pending_tokens = 0  # this rank's tokens not yet summed over ranks into state.tokens
        self._last_lr = 0.0
        self.checkpoint_dir = config.output_dir / "checkpoints"
        self.log = MetricsLog(config.output_dir / "metrics.jsonl", enabled=self.ctx.is_main)

    @property
    def step(self) -> int:
        """Optimizer steps done so far (including those before a resume)."""
        return self.state.step

    def resume(self) -> bool:
        """Restore from the checkpoint `config.resume` names; returns whether one was loaded."""
        resume = self.config.resume
        found = latest_checkpoint(self.checkpoint_dir)
        if resume == "never":
            if found is not None:
                raise ConfigError(
                    f"{self.config.output_dir} already has checkpoint {found.name}; set resume: auto to continue "
                    "it or choose a new output_dir"
                )
            return False
        path = found if resume == "auto" else Path(resume)
        if path is None:
            return False
        if not path.is_dir():
            raise CheckpointError(f"resume checkpoint {path} does not exist")
        self.state = load_checkpoint(
            path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, ctx=self.ctx
        )
        if self.state.data_state is not None:
            self.data.load_state_dict(self.state.data_state)
        elif self.ctx.is_main:
            tqdm.write(f"{path.name} was written at another world size: data readers start from their beginning")
        self.log.truncate_after(self.state.step)
        return True

    def fit(self) -> None:
        """Train until `config.steps`; checkpoints at the interval and at the end."""
        cfg = self.config
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", disable=not (self.ctx.is_main and cfg.progress))
        start, elapsed_before = time.perf_counter(), self.state.elapsed
        window_start, window_tokens = start, 0
        sums: dict[str, torch.Tensor] = {}
        window_steps = 0
        try:
            while self.step < cfg.steps:
                for key, value in self._train_step().items():
                    sums[key] = sums.get(key, 0) + value
                window_steps += 1
                self.state.step += 1
                self.state.elapsed = elapsed_before + time.perf_counter() - start
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    window_tokens += self._flush_tokens()
                    record = self._log_record(sums, window_steps)
                    now = time.perf_counter()
                    record.update(
                        tokens=self.state.tokens,
                        tokens_per_s=window_tokens / max(now - window_start, 1e-9),
                        elapsed=self.state.elapsed,
                    )
                    self.log.write(record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                    sums, window_steps, window_start, window_tokens = {}, 0, now, 0
                if cfg.eval_every and self.step % cfg.eval_every == 0:
                    self.evaluate()
                if (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0) or self.step == cfg.steps:
                    window_tokens += self._flush_tokens()
                    self.save()
        finally:
            bar.close()
            self.log.close()

    def _train_step(self) -> dict[str, torch.Tensor]:
        """One optimizer step over `grad_accum` micro-batches; returns the step's mean metrics."""
        cfg = self.config
        self.model.train()
        sums: dict[str, torch.Tensor] = {}
        for micro in range(cfg.grad_accum):
            batch = self._next_batch()
            self._pending_tokens += self.token_counter(batch)
            # DDP all-reduces gradients only on the last micro-batch of the step.
            is_last = micro == cfg.grad_accum - 1
            sync = (
                self.model.no_sync()
                if isinstance(self.model, DistributedDataParallel) and not is_last
                else contextlib.nullcontext()
            )
            with sync:
                with torch.autocast(self.ctx.device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16"):
                    loss, metrics = self.loss_fn(self.model, batch)
                (loss / cfg.grad_accum).backward()
            for key, value in {"loss": loss, **metrics}.items():
                value = torch.as_tensor(value).detach().float().to(self.ctx.device)
                sums[key] = sums.get(key, 0) + value / cfg.grad_accum
        if cfg.optimizer.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.optimizer.grad_clip)
            if isinstance(norm, DTensor):  # FSDP: the norm of sharded gradients is itself sharded
                norm = norm.full_tensor()
            sums["grad_norm"] = norm.detach().float().to(self.ctx.device)
        self._last_lr = float(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return sums

    def _next_batch(self) -> dict[str, torch.Tensor]:
        try:
            batch = next(self.data)
        except StopIteration:
            raise ConfigError(
                f"the data ran out at step {self.step} of {self.config.steps}; lower steps or let the reader "
                "loop over epochs"
            ) from None
        return {k: v.to(self.ctx.device, non_blocking=True) for k, v in batch.items()}

    def _flush_tokens(self) -> int:
        """Add every rank's pending token count to `state.tokens`; returns the global count added."""
        pending = torch.tensor([self._pending_tokens], device=self.ctx.device)
        total = int(sum_across_ranks(pending, self.ctx).item())
        self.state.tokens += total
        self._pending_tokens = 0
        return total

    def _log_record(self, sums: dict[str, torch.Tensor], steps: int) -> dict[str, Any]:
        # One collective for all metrics, only on logging steps, so other steps never wait for a
        # device-to-host sync. Logged values are means over the steps since the previous line.
        keys = sorted(sums)
        means = mean_across_ranks(torch.stack([sums[k] for k in keys]) / steps, self.ctx).tolist()
        record: dict[str, Any] = {"step": self.step, "loss": means[keys.index("loss")], "lr": self._last_lr}
        record.update({k: v for k, v in zip(keys, means, strict=True) if k != "loss"})
        return record

    def evaluate(self) -> dict[str, float]:
        """Run the eval hook (RNG preserved, eval mode, no gradients) and log its metrics."""
        if self.eval_fn is None:
            return {}
        self.model.eval()
        with preserved_rng(), torch.no_grad():
            metrics = dict(self.eval_fn(self.model, self.step))
        self.model.train()
        self.log.write({"step": self.step, **{f"eval_{k}": float(v) for k, v in metrics.items()}})
        return metrics

    def save(self) -> None:
        """Checkpoint now (collective: every rank calls it)."""
        self.state.data_state = self.data.state_dict()
        save_checkpoint(
            self.checkpoint_dir,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            state=self.state,
            ctx=self.ctx,
            keep=self.config.keep_checkpoints,
        )
