"""`python -m training.selftest CONFIG`: train a preset model on synthetic data through `run_job`.

It exercises the whole trainer stack (config, torchrun/DDP/FSDP, checkpoints, resume, metrics
log) with nothing to download, e.g. to check a multi-GPU node before a real job:

    torchrun --nproc_per_node 8 -m training.selftest job.yaml

The config is a normal job config (`model.preset`, usually `tiny`) plus a `synthetic` section.
"""

from __future__ import annotations

import argparse
import sys

import torch
from pydantic import Field

from engine.errors import Cpm2Error
from training.config import JobConfig, Section, load_job_config
from training.job import DataShard, build_model, run_job
from training.losses import seq2seq_lm_loss
from training.synthetic import SyntheticSeq2Seq


class SyntheticSpec(Section):
    """Shape of the synthetic copy task."""

    vocab_size: int = Field(1000, ge=3)
    """Token ids are drawn from [2, vocab_size): keep it within the model's vocabulary."""
    source_len: int = Field(16, ge=1)
    target_len: int = Field(8, ge=1)


class SelftestConfig(JobConfig):
    synthetic: SyntheticSpec = SyntheticSpec()


def _model(config: SelftestConfig, device: torch.device) -> torch.nn.Module:
    return build_model(config.model, device)


def _data(config: SelftestConfig, shard: DataShard) -> SyntheticSeq2Seq:
    return SyntheticSeq2Seq(
        vocab_size=config.synthetic.vocab_size,
        source_len=config.synthetic.source_len,
        target_len=config.synthetic.target_len,
        micro_batch_size=shard.micro_batch_size,
        rank=shard.rank,
        world_size=shard.world_size,
        seed=shard.seed,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.selftest", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="job config file (.yaml, .json or .toml) with model.preset set")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when present")
    args = parser.parse_args(argv)
    try:
        config = load_job_config(args.config, SelftestConfig)
        run_job(config, _model, seq2seq_lm_loss, _data, device=args.device)
    except Cpm2Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
