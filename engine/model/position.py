"""T5 relative position bias (Raffel et al. 2020; Mesh TensorFlow `_relative_position_bucket`).

The bias table belongs to the first block of each stack and is shared by all later blocks; the
encoder's buckets are bidirectional, the decoder's causal, and cross-attention has none (SEED.md).
Bucket ids depend only on the signed distance, so they are computed once for every distance up to
`max_distance` (all larger distances share the last bucket) and looked up per step.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def relative_position_bucket(
    relative_position: torch.Tensor, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """Bucket id of each `memory_position - query_position` (same arithmetic as T5's reference)."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = -torch.clamp(relative_position, max=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # Half of the buckets are exact offsets, the other half grow logarithmically up to max_distance.
    large = (
        max_exact
        + (
            torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
        ).long()
    )
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, large)


class RelativePositionBias(nn.Module):
    """Learned per-head bias added to attention scores, indexed by relative-position bucket."""

    def __init__(self, num_heads: int, *, num_buckets: int, max_distance: int, bidirectional: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_buckets, num_heads))
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.bidirectional = bidirectional
        self._tables: dict[torch.device, torch.Tensor] = {}

    def _bucket_table(self, device: torch.device) -> torch.Tensor:
        # Bucket of every signed distance -max_distance..max_distance; beyond that every distance
        # falls in the last bucket, so clamping the distance is exact. Kept per device outside the
        # state dict so a model built on the meta device and loaded with assign=True needs no fix-up.
        table = self._tables.get(device)
        if table is None:
            offsets = torch.arange(-self.max_distance, self.max_distance + 1, device=device)
            table = relative_position_bucket(
                offsets,
                bidirectional=self.bidirectional,
                num_buckets=self.num_buckets,
                max_distance=self.max_distance,
            )
            self._tables[device] = table
        return table

    def forward(self, query_pos: torch.Tensor, key_pos: torch.Tensor) -> torch.Tensor:
        """Bias (..., H, Q, K) for query positions (..., Q) against key positions (K,)."""
        relative = key_pos - query_pos.unsqueeze(-1)  # (..., Q, K)
        index = relative.clamp(-self.max_distance, self.max_distance) + self.max_distance
        values = self.weight[self._bucket_table(self.weight.device)[index]]  # (..., Q, K, H)
        return values.movedim(-1, -3)
