"""Process-group setup and model wrapping for runs under `torchrun`.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; without them the run is
a single process and every helper here degrades to a no-op. Following torchtitan, the model is
plain single-device code and parallelism is applied from outside: DDP replicates it, FSDP2
(`fully_shard`, one unit per transformer block plus the root) shards parameters and optimizer
state for models that do not fit one device.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from engine.errors import ConfigError
from engine.model.moe import MoEFeedForward


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, shows progress and writes checkpoints."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistContext:
    """Join the torchrun job described by the environment (or run alone without one).

    gloo on CPU, NCCL on CUDA; each rank takes the GPU of its LOCAL_RANK. `device` forces `cpu`
    or `cuda`; by default CUDA is used when present.
    """
    use_cuda = torch.cuda.is_available() if device is None else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was requested but no CUDA device is available")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        target = torch.device("cuda", local_rank)
    else:
        target = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=target if use_cuda else None)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=target)


def shutdown_distributed() -> None:
    """Leave the process group (safe to call when there is none)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def parallelize(model: nn.Module, ctx: DistContext, *, strategy: Literal["ddp", "fsdp"]) -> nn.Module:
    """Wrap `model` for data-parallel training; the model itself when running alone.

    Frozen parameters (prompt tuning's backbone) are skipped by DDP's gradient all-reduce, so only
    the trainable ones cost communication.
    """
    if not ctx.is_distributed:
        return model
    if strategy == "ddp":
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        # Top-1 routing leaves some experts without tokens in a given batch; DDP must then be told
        # to look for parameters the backward pass did not reach (a graph walk, so dense skips it).
        has_moe = any(isinstance(m, MoEFeedForward) for m in model.modules())
        return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=has_moe)
    if any(isinstance(m, MoEFeedForward) for m in model.modules()):
        # Ranks route different tokens, so expert units issue mismatched collectives (gloo aborts
        # with a size mismatch); expert parallelism is the right tool and is not written yet.
        raise ConfigError("parallel: fsdp does not support MoE models yet; use parallel: ddp")
    from torch.distributed.fsdp import fully_shard

    # One unit per block bounds peak memory to one block's gathered parameters at a time. The
    # decoder's cross-attention K/V projections run in `start_decoding`, outside the block's forward
    # (so FSDP's hooks would not gather them): decoder blocks shard their self-attention and FFN,
    # and their cross-attention and norms stay with the root unit, gathered for the whole step.
    encoder, decoder = getattr(model, "encoder", None), getattr(model, "decoder", None)
    for block in getattr(encoder, "blocks", []):
        fully_shard(block)
    for block in getattr(decoder, "blocks", []):
        fully_shard(block.attn)
        fully_shard(block.mlp)
    fully_shard(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper (FSDP2 shards in place and needs no unwrapping)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def mean_across_ranks(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Average a tensor of per-rank values over all ranks (for logging; one collective per call)."""
    if not ctx.is_distributed:
        return values
    values = values.detach().clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values / ctx.world_size


def sum_across_ranks(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum a tensor over all ranks (token counts)."""
    if not ctx.is_distributed:
        return values
    values = values.detach().clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def gather_objects(obj: object, ctx: DistContext) -> list[object]:
    """Every rank's `obj`, in rank order, on every rank (per-rank RNG and data-reader states)."""
    if not ctx.is_distributed:
        return [obj]
    # all_gather_object cannot unpickle tensors here (UntypedStorage has no dtype), so objects
    # travel as torch.save bytes and are read back with weights_only, like checkpoint files.
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    out: list[object] = [None] * ctx.world_size
    dist.all_gather_object(out, buffer.getvalue())
    return [torch.load(io.BytesIO(payload), weights_only=True) for payload in out]  # type: ignore[arg-type]


def barrier(ctx: DistContext) -> None:
    if ctx.is_distributed:
        dist.barrier()
