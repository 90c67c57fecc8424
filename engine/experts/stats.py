"""Counters of the offloaded expert path, for benchmarks, per-request details and Prometheus.

Cumulative since start-up; `snapshot()` and subtraction give the figures of one step or request.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


class _Rates:
    """Hit rate, prefetch precision and recall from the lookup and prediction counters."""

    hits: int
    in_place: int
    misses: int
    predicted: int
    predicted_used: int
    needed_after_prediction: int

    @property
    def hit_rate(self) -> float:
        """Share of needed experts that did not have to be transferred (pool hits and in place)."""
        looked_up = self.hits + self.in_place + self.misses
        return (self.hits + self.in_place) / looked_up if looked_up else 1.0

    @property
    def prefetch_precision(self) -> float:
        return self.predicted_used / self.predicted if self.predicted else 0.0

    @property
    def prefetch_recall(self) -> float:
        return self.predicted_used / self.needed_after_prediction if self.needed_after_prediction else 0.0

    def rates(self) -> dict[str, float]:
        return {
            "hit_rate": self.hit_rate,
            "prefetch_precision": self.prefetch_precision,
            "prefetch_recall": self.prefetch_recall,
        }


def _fields(a: Any, b: Any | None = None, sign: int = 0) -> dict[str, Any]:
    """The dataclass fields of `a` (plus `sign` times `b`'s), the `layers` table left out."""
    return {
        f.name: getattr(a, f.name) + (sign * getattr(b, f.name) if b is not None else 0)
        for f in dataclasses.fields(a)
        if f.name != "layers"
    }


@dataclass
class LayerCounts(_Rates):
    """One MoE layer's share of the lookup and prediction counters (`ExpertStats.layers`)."""

    hits: int = 0
    in_place: int = 0
    misses: int = 0
    predicted: int = 0
    predicted_used: int = 0
    needed_after_prediction: int = 0

    def to_dict(self) -> dict[str, float]:
        return {**_fields(self), **self.rates()}


def _combine_layers(a: dict[str, LayerCounts], b: dict[str, LayerCounts], sign: int) -> dict[str, LayerCounts]:
    return {
        name: LayerCounts(**_fields(a.get(name, LayerCounts()), b.get(name, LayerCounts()), sign)) for name in a | b
    }


@dataclass
class ExpertStats(_Rates):
    """What the expert provider did: hits, transfers, prefetch accuracy, time spent waiting."""

    layer_calls: int = 0
    """MoE layer forward passes served."""
    experts_run: int = 0
    """Expert computations (one per expert with tokens per layer call)."""
    hits: int = 0
    """Experts already in the fast pool (or already loading because of a prefetch) when a layer asked."""
    in_place: int = 0
    """CPU: experts computed straight from page-cached store pages (no copy, no pool slot)."""
    misses: int = 0
    """Experts a layer had to load on demand."""
    transfers: int = 0
    """Expert loads into the pool (demand and prefetch)."""
    bytes_moved: int = 0
    """Bytes copied into the pool (disk or host tier → fast pool)."""
    evictions: int = 0
    prefetches: int = 0
    """Loads started by next-layer prediction."""
    predicted: int = 0
    """Experts predicted for a layer before it ran (precision denominator)."""
    predicted_used: int = 0
    """Predicted experts the layer then needed (true positives)."""
    needed_after_prediction: int = 0
    """Experts needed by layers that had a prediction (recall denominator)."""
    stall_seconds: float = 0.0
    """Time expert compute waited for a transfer to finish."""
    transfer_seconds: float = 0.0
    """Time the I/O workers (or copy stream) spent moving experts."""
    compute_seconds: float = 0.0
    """Time spent computing experts (CPU; wall time between handing out weights and the next request)."""
    layers: dict[str, LayerCounts] = field(default_factory=dict)
    """The lookup and prediction counters per MoE layer ("decoder.3"), for per-layer precision,
    recall and hit rate."""

    def layer(self, name: str) -> LayerCounts:
        """`name`'s counters, created on first use."""
        counts = self.layers.get(name)
        if counts is None:
            counts = self.layers[name] = LayerCounts()
        return counts

    def snapshot(self) -> ExpertStats:
        return dataclasses.replace(self, layers={k: dataclasses.replace(v) for k, v in self.layers.items()})

    def totals(self) -> ExpertStats:
        """A snapshot without the per-layer table: what a step's or a request's share needs, at the
        cost of the scalar fields alone (the generator takes two per step)."""
        return ExpertStats(**_fields(self))

    def _combine(self, other: ExpertStats, sign: int) -> ExpertStats:
        return ExpertStats(**_fields(self, other, sign), layers=_combine_layers(self.layers, other.layers, sign))

    def __sub__(self, other: ExpertStats) -> ExpertStats:
        return self._combine(other, -1)

    def __add__(self, other: ExpertStats) -> ExpertStats:
        return self._combine(other, +1)

    @property
    def overlap(self) -> float:
        """Share of transfer time hidden behind compute: 1 − stall / transfer (1.0 with no transfers)."""
        if self.transfer_seconds <= 0:
            return 1.0
        return max(0.0, 1.0 - self.stall_seconds / self.transfer_seconds)

    def layers_to_dict(self) -> dict[str, dict[str, float]]:
        """Per-layer counters and rates, layers in model order (encoder first, then by block)."""

        def order(name: str) -> tuple[bool, int]:
            stack, _, block = name.partition(".")
            return (stack != "encoder", int(block) if block.isdigit() else 0)

        return {name: self.layers[name].to_dict() for name in sorted(self.layers, key=order)}

    def to_dict(self) -> dict[str, Any]:
        """The totals and rates (per-layer figures: `layers_to_dict`)."""
        return {**_fields(self), **self.rates(), "overlap": self.overlap}
