"""Per-request decoder state: self-attention KV cache and the cross-attention keys/values.

Shape legend: B rows (requests or beams), H heads, C cache capacity, S encoder positions,
T new positions this step, Dh head width, L decoder layers.

An encoder-decoder computes the cross-attention keys/values of a request once, when it is admitted,
and keeps them for every step (STYLE.md §3, TGI `seq2seq_lm.py`). Rows may be at different decode
lengths (continuous batching admits requests at different times), so each row has its own length;
the self-attention cache is preallocated to a capacity and grows geometrically, so a decode step
writes in place instead of concatenating. Rows can be selected (beam reordering, dropping finished
requests) and states concatenated (admitting new requests into a running batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class DecoderState:
    """Decoder cache of a batch of rows; mutated in place by each decode step."""

    self_k: list[torch.Tensor]
    """Per layer (B, H, C, Dh): keys of every decoded position."""
    self_v: list[torch.Tensor]
    """Per layer (B, H, C, Dh): values of every decoded position."""
    cross_k: list[torch.Tensor]
    """Per layer (B, H, S, Dh): encoder keys."""
    cross_v: list[torch.Tensor]
    """Per layer (B, H, S, Dh): encoder values."""
    cross_mask: torch.Tensor
    """(B, 1, 1, S) additive mask: 0 for encoder tokens, the dtype's minimum for padding."""
    lengths: list[int]
    """Positions already in the self-attention cache, per row."""

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    @property
    def capacity(self) -> int:
        return self.self_k[0].shape[2] if self.self_k else 0

    @property
    def is_uniform(self) -> bool:
        """Whether every row is at the same decode length (the common, faster case)."""
        return len(set(self.lengths)) <= 1

    @classmethod
    def allocate(
        cls,
        *,
        cross_k: list[torch.Tensor],
        cross_v: list[torch.Tensor],
        cross_mask: torch.Tensor,
        capacity: int,
    ) -> DecoderState:
        """An empty cache for the rows of `cross_k`, able to hold `capacity` positions before growing."""
        B, H, _, Dh = cross_k[0].shape
        like = cross_k[0]
        self_k = [like.new_zeros(B, H, capacity, Dh) for _ in cross_k]
        self_v = [like.new_zeros(B, H, capacity, Dh) for _ in cross_k]
        return cls(self_k, self_v, cross_k, cross_v, cross_mask, [0] * B)

    def reserve(self, num_new: int) -> None:
        """Make room for `num_new` more positions in every row (doubling the capacity if needed)."""
        needed = max(self.lengths, default=0) + num_new
        if needed <= self.capacity:
            return
        capacity = max(needed, 2 * self.capacity)
        for cache in (self.self_k, self.self_v):
            for i, old in enumerate(cache):
                B, H, C, Dh = old.shape
                grown = old.new_zeros(B, H, capacity, Dh)
                grown[:, :, :C] = old
                cache[i] = grown

    def query_positions(self, num_new: int) -> torch.Tensor:
        """Positions (B, T) of the `num_new` tokens about to be appended to each row."""
        device = self.cross_mask.device
        steps = torch.arange(num_new, device=device)
        if self.is_uniform:
            return (steps + self.lengths[0]).unsqueeze(0)  # (1, T): same for every row
        return torch.tensor(self.lengths, device=device).unsqueeze(1) + steps  # (B, T)

    def key_length(self, num_new: int) -> int:
        """How many cache positions the attention of the next `num_new` tokens reads."""
        return max(self.lengths, default=0) + num_new

    def append_self_kv(
        self, layer: int, k_BHTDh: torch.Tensor, v_BHTDh: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys/values of `layer`; return the (B, H, K, Dh) views to attend to.

        The lengths are advanced once per step by `advance`, after every layer has written.
        """
        T = k_BHTDh.shape[2]
        k_cache, v_cache = self.self_k[layer], self.self_v[layer]
        if self.is_uniform:
            start = self.lengths[0] if self.lengths else 0
            k_cache[:, :, start : start + T] = k_BHTDh
            v_cache[:, :, start : start + T] = v_BHTDh
        else:
            device = k_cache.device
            rows_B1 = torch.arange(self.batch_size, device=device).unsqueeze(1)
            cols_BT = torch.tensor(self.lengths, device=device).unsqueeze(1) + torch.arange(T, device=device)
            # Advanced indices around a slice put the indexed dims first: (B, T, H, Dh).
            k_cache[rows_B1, :, cols_BT] = k_BHTDh.transpose(1, 2)
            v_cache[rows_B1, :, cols_BT] = v_BHTDh.transpose(1, 2)
        K = self.key_length(T)
        return k_cache[:, :, :K], v_cache[:, :, :K]

    def advance(self, num_new: int) -> None:
        """Record that `num_new` positions were appended to every row."""
        self.lengths = [n + num_new for n in self.lengths]

    def select(self, rows: Sequence[int]) -> DecoderState:
        """A new state holding `rows` (in that order; repeats allowed, as beam search needs)."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.cross_mask.device)

        def pick(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
            return [t.index_select(0, index) for t in tensors]

        return DecoderState(
            self_k=pick(self.self_k),
            self_v=pick(self.self_v),
            cross_k=pick(self.cross_k),
            cross_v=pick(self.cross_v),
            cross_mask=self.cross_mask.index_select(0, index),
            lengths=[self.lengths[i] for i in rows],
        )

    @classmethod
    def concat(cls, states: Sequence[DecoderState]) -> DecoderState:
        """Stack the rows of several states (padding caches and encoder lengths to the largest)."""
        if len(states) == 1:
            return states[0]
        capacity = max(s.capacity for s in states)
        source_len = max(s.cross_mask.shape[-1] for s in states)
        fill = torch.finfo(states[0].cross_mask.dtype).min

        def pad(t: torch.Tensor, dim: int, size: int, value: float = 0.0) -> torch.Tensor:
            missing = size - t.shape[dim]
            if missing == 0:
                return t
            shape = list(t.shape)
            shape[dim] = missing
            return torch.cat([t, t.new_full(shape, value)], dim=dim)

        num_layers = len(states[0].self_k)
        return cls(
            self_k=[torch.cat([pad(s.self_k[i], 2, capacity) for s in states]) for i in range(num_layers)],
            self_v=[torch.cat([pad(s.self_v[i], 2, capacity) for s in states]) for i in range(num_layers)],
            cross_k=[torch.cat([pad(s.cross_k[i], 2, source_len) for s in states]) for i in range(num_layers)],
            cross_v=[torch.cat([pad(s.cross_v[i], 2, source_len) for s in states]) for i in range(num_layers)],
            cross_mask=torch.cat([pad(s.cross_mask, 3, source_len, fill) for s in states]),
            lengths=[n for s in states for n in s.lengths],
        )
