"""Per-request decoder state: self-attention KV cache and the cross-attention keys/values.

Shape legend: B rows (requests or beams), R row slots allocated, H heads, C cache capacity, S
encoder positions, T new positions this step, Dh head width, L decoder layers.

An encoder-decoder computes the cross-attention keys/values of a request once, when it is admitted,
and keeps them for every step (STYLE.md §3, TGI `seq2seq_lm.py`). Rows may be at different decode
lengths (continuous batching admits requests at different times), so each row has its own length;
the self-attention cache is preallocated to a capacity and grows geometrically, so a decode step
writes in place instead of concatenating.

Rows live in slots: every tensor is allocated for R >= B rows and the first B are the batch (the
public lists are views of them, so attention reads only live rows, contiguous as before). A request
that finishes leaves by `remove`: the last live rows move into the freed slots, one row copied per
row removed, the others untouched. Newcomers join by `add`: their rows are written into the slots
after the live ones; only when the slots, the cache capacity or the encoder length run out does
every tensor grow (geometrically, so the copies are amortised). Before, every join or leave copied
the whole self- and cross-attention K/V of every row. `select` (beam search: reorder and repeat
rows) still makes a new state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

#: Slots a state keeps however few rows are live (below this, freeing memory is not worth a copy).
MIN_SLOTS_KEPT = 8
#: Each field's position dimension and which length sizes it: the cache capacity ("self") or the
#: encoder length ("cross"). Dimension 0 is the row slot in all of them.
_DIMS = {
    "self_k": (2, "self"),
    "self_v": (2, "self"),
    "cross_k": (2, "cross"),
    "cross_v": (2, "cross"),
    "cross_mask": (3, "cross"),
}


def _region(dim: int, rows: slice, positions: slice) -> tuple[slice, ...]:
    """The index of `rows` x `positions` in a tensor whose positions are dimension `dim`."""
    index = [slice(None)] * (dim + 1)
    index[0], index[dim] = rows, positions
    return tuple(index)


@dataclass
class DecoderState:
    """Decoder cache of a batch of rows; mutated in place by each decode step."""

    self_k: list[torch.Tensor]
    """Per layer (B, H, C, Dh): keys of every decoded position (views of the first B slots)."""
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
    _slots: dict[str, list[torch.Tensor]] = field(init=False, repr=False)
    """The (R, ...) tensors the public fields view, by field name."""

    def __post_init__(self) -> None:
        # The tensors given are the slots: R = B until rows first join or leave.
        self._slots = {name: [*getattr(self, name)] if name != "cross_mask" else [self.cross_mask] for name in _DIMS}

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    @property
    def capacity(self) -> int:
        return self.self_k[0].shape[2] if self.self_k else 0

    @property
    def source_length(self) -> int:
        return self.cross_mask.shape[-1]

    @property
    def num_slots(self) -> int:
        """Rows the tensors hold (live ones first)."""
        return self._slots["cross_mask"][0].shape[0]

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

    # ---- slots ---------------------------------------------------------------------------------

    def _lengths(self) -> dict[str, int]:
        return {"self": self.capacity, "cross": self.source_length}

    def _fill(self, name: str) -> float:
        """What an unused position holds: masked for the encoder mask, zero elsewhere."""
        return torch.finfo(self.cross_mask.dtype).min if name == "cross_mask" else 0.0

    def _refresh_views(self) -> None:
        """Point the public fields at the first `batch_size` slots."""
        B = self.batch_size
        for name, tensors in self._slots.items():
            views = [t[:B] for t in tensors]
            setattr(self, name, views[0] if name == "cross_mask" else views)

    def _resize(self, *, slots: int, capacity: int, source_length: int) -> None:
        """Reallocate every tensor to `slots` rows, `capacity` cache positions and `source_length`
        encoder positions, the live rows copied in (new positions masked or zero)."""
        B, old, new = self.batch_size, self._lengths(), {"self": capacity, "cross": source_length}
        for name, (dim, kind) in _DIMS.items():
            grown = []
            for t in self._slots[name]:
                shape = [slots, *t.shape[1:]]
                shape[dim] = new[kind]
                region = _region(dim, slice(0, B), slice(0, old[kind]))
                t_new = t.new_full(shape, self._fill(name))
                t_new[region] = t[region]
                grown.append(t_new)
            self._slots[name] = grown
        self._refresh_views()

    def reserve(self, num_new: int) -> None:
        """Make room for `num_new` more positions in every row (doubling the capacity if needed)."""
        needed = max(self.lengths, default=0) + num_new
        if needed <= self.capacity:
            return
        self._resize(slots=self.num_slots, capacity=max(needed, 2 * self.capacity), source_length=self.source_length)

    def remove(self, rows: Sequence[int]) -> list[int]:
        """Drop `rows` in place; returns, for each remaining row in its new position, its old index.

        The live rows after the new end move into the freed slots below it (one row copy per row
        removed; the others stay where they are), so the order of the remaining rows changes.
        """
        gone = set(rows)
        B = self.batch_size
        keep = B - len(gone)
        holes = sorted(r for r in gone if r < keep)
        movers = [r for r in range(keep, B) if r not in gone]
        order = list(range(keep))
        for hole, mover in zip(holes, movers, strict=True):
            order[hole] = mover
        if holes:
            device = self.cross_mask.device
            dst, src = torch.tensor(holes, device=device), torch.tensor(movers, device=device)
            for tensors in self._slots.values():
                for t in tensors:
                    t[dst] = t[src]
        self.lengths = [self.lengths[i] for i in order]
        if keep and 4 * keep <= self.num_slots and self.num_slots > MIN_SLOTS_KEPT:
            # Mostly empty after a burst: give the memory back (one copy of the live rows).
            slots = max(2 * keep, MIN_SLOTS_KEPT)
            self._resize(slots=slots, capacity=self.capacity, source_length=self.source_length)
        self._refresh_views()
        return order

    def add(self, other: DecoderState) -> None:
        """Append the rows of `other` (newly prefilled) after the live rows, in place.

        Their K/V are written into free slots; every tensor grows (slots doubled, cache capacity
        and encoder length to what `other` needs) only when one of them runs out.
        """
        B, m = self.batch_size, other.batch_size
        slots = self.num_slots if B + m <= self.num_slots else max(B + m, 2 * self.num_slots)
        capacity = max(self.capacity, other.capacity)
        source = max(self.source_length, other.source_length)
        if (slots, capacity, source) != (self.num_slots, self.capacity, self.source_length):
            self._resize(slots=slots, capacity=capacity, source_length=source)
        theirs = other._lengths()
        for name, (dim, kind) in _DIMS.items():
            n = theirs[kind]
            for t, new in zip(self._slots[name], other._slots[name], strict=True):
                t[_region(dim, slice(B, B + m), slice(0, n))] = new[_region(dim, slice(0, m), slice(0, n))]
                t[_region(dim, slice(B, B + m), slice(n, None))] = self._fill(name)
        self.lengths = self.lengths + list(other.lengths)
        self._refresh_views()

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
