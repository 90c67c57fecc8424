"""A deterministic synthetic seq2seq stream: the `selftest` job's data and the trainer tests' data.

Sample g of the global stream depends only on (seed, g), and rank r of a world of w takes samples
[k·m·w + r·m, k·m·w + (r+1)·m) for its k-th micro-batch of m. So one process with micro-batch m·w
sees, step for step, exactly the union of what w ranks with micro-batch m see: the property the
DDP-equals-single-process check relies on. The task (copy the first target_len source tokens) is
learnable, so losses fall and a broken optimizer step shows.
"""

from __future__ import annotations

from typing import Any

import torch

from training.trainer import Batch


class SyntheticSeq2Seq:
    """Endless resumable iterator of span-free copy-task batches (no padding)."""

    def __init__(
        self,
        *,
        vocab_size: int,
        source_len: int = 16,
        target_len: int = 8,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        start_token_id: int = 0,
    ) -> None:
        self.vocab_size = vocab_size
        self.source_len = source_len
        self.target_len = target_len
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.start_token_id = start_token_id
        self.position = 0  # micro-batches handed out so far

    def __iter__(self) -> SyntheticSeq2Seq:
        return self

    def __next__(self) -> Batch:
        m = self.micro_batch_size
        first = (self.position * self.world_size + self.rank) * m
        self.position += 1
        rows = []
        for g in range(first, first + m):
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + g)
            rows.append(torch.randint(2, self.vocab_size, (self.source_len,), generator=gen))
        input_ids = torch.stack(rows)  # (B, S)
        labels = input_ids[:, : self.target_len].clone()  # (B, T)
        start = torch.full((m, 1), self.start_token_id, dtype=labels.dtype)
        return {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "decoder_input_ids": torch.cat([start, labels[:, :-1]], dim=1),
            "labels": labels,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])
