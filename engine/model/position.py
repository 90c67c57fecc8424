"""Positions: T5's relative position bias, or fairseq's sinusoidal absolute positions.

Relative (Raffel et al. 2020; Mesh TensorFlow `_relative_position_bucket`): the bias table belongs to
the first block of each stack and is shared by all later blocks; the encoder's buckets are
bidirectional, the decoder's causal, and cross-attention has none (SEED.md). Bucket ids depend only on
the signed distance, so they are computed once for every distance up to `max_distance` (all larger
distances share the last bucket) and looked up per step.

Sinusoidal (Vaswani et al. 2017 as tensor2tensor and fairseq compute it; M2M-100, NLLB-200): a fixed
table added to the input embeddings. fairseq numbers a row's tokens from `padding_idx + 1`, counting
only non-padding positions, and gives padding `padding_idx`, whose row is zero (`make_positions`; HF
`create_position_ids_from_input_ids`, which also adds the cache length while decoding). Here padding
is what the attention mask says it is, so soft-prompt positions and decoder prefixes count like
tokens: HF computes the same numbers for `inputs_embeds`, and for token ids wherever the padding id
occurs only where the mask is 0, which is how every tokenizer pads.
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


def sinusoidal_table(num_positions: int, dim: int, padding_idx: int) -> torch.Tensor:
    """The (num_positions, dim) float32 sinusoids, row `padding_idx` zero, computed on the CPU exactly
    as HF's `M2M100SinusoidalPositionalEmbedding.get_embedding` does (sines, then cosines)."""
    half = dim // 2
    step = math.log(10000) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.int64).float() * -step)
    angles = torch.arange(num_positions, dtype=torch.int64).float().unsqueeze(1) * freqs.unsqueeze(0)
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).view(num_positions, -1)
    if dim % 2 == 1:
        table = torch.cat([table, torch.zeros(num_positions, 1)], dim=1)
    table[padding_idx] = 0
    return table


def absolute_positions(
    valid_BT: torch.Tensor | None, start_B1: torch.Tensor, num_new: int, *, padding_idx: int
) -> torch.Tensor:
    """fairseq position ids (B or 1, T) of `num_new` positions following `start_B1` earlier ones.

    `(start + number of valid positions up to here) + padding_idx` where valid, `padding_idx` where
    not; every position is valid when `valid_BT` is None.
    """
    if valid_BT is None:
        return start_B1 + torch.arange(1, num_new + 1, device=start_B1.device) + padding_idx
    mask_BT = valid_BT.long()
    return (mask_BT.cumsum(dim=1) + start_B1) * mask_BT + padding_idx


class SinusoidalPositions(nn.Module):
    """Sinusoidal position vectors for position ids; no parameters (nothing in the state dict)."""

    def __init__(self, dim: int, *, padding_idx: int) -> None:
        super().__init__()
        self.dim = dim
        self.padding_idx = padding_idx
        self._tables: dict[torch.device, torch.Tensor] = {}

    def _table(self, device: torch.device, num_positions: int) -> torch.Tensor:
        # Kept per device outside the state dict (a meta-built model loaded with assign=True needs no
        # fix-up) and regrown when a longer sequence comes, as HF regrows its own table; the values of a
        # row do not depend on the table's size (tests/test_parity_m2m100.py checks them bitwise).
        table = self._tables.get(device)
        if table is None or table.shape[0] < num_positions:
            size = max(num_positions, 256, 0 if table is None else 2 * table.shape[0])
            table = sinusoidal_table(size, self.dim, self.padding_idx).to(device)
            self._tables[device] = table
        return table

    def forward(self, position_ids: torch.Tensor, *, limit: int) -> torch.Tensor:
        """Float32 vectors (..., dim) for `position_ids`, every one of which is below `limit`."""
        return self._table(position_ids.device, limit)[position_ids]


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
