"""Start-up calibration of InfMoE's cost model on this machine: α (compute) and β (transfer).

β is the measured time of real expert loads through the transfer engine (tier to pool, packing
included); α(n) = α₀ + α₁·n is fitted to the measured time of one expert on n tokens. The provider
keeps refining both from the loads and computations it then observes.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from engine.experts.order import CostModel
from engine.experts.pool import PoolEntry
from engine.experts.provider import Transfers
from engine.experts.store import ExpertStore
from engine.model import ExpertWeights
from engine.model.ffn import ACTIVATIONS, feed_forward

TOKEN_COUNTS = (1, 8, 32)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        _synchronize(device)
        begin = time.perf_counter()
        fn()
        _synchronize(device)
        best = min(best, time.perf_counter() - begin)
    return best


def calibrate(
    transfers: Transfers,
    store: ExpertStore,
    *,
    activation: str,
    device: torch.device,
    dtype: torch.dtype,
    samples: int = 3,
) -> CostModel:
    """Measure β with `samples` real loads into slot 0 and fit α on the last loaded expert."""
    key = store.keys[0]
    betas = []
    weights: ExpertWeights | None = None
    for e in range(min(samples, store.num_experts)):
        entry = PoolEntry(expert=(key, e), slot=0)
        _synchronize(device)
        begin = time.perf_counter()
        entry.pending = transfers.start(entry)
        weights = transfers.wait(entry)
        _synchronize(device)
        betas.append(time.perf_counter() - begin)
        transfers.release(entry)
    assert weights is not None
    act = ACTIVATIONS[activation]
    points = []
    loaded: ExpertWeights = weights
    for n in TOKEN_COUNTS:
        x = torch.randn(n, store.config.d_model, device=device, dtype=dtype)

        def run(x: torch.Tensor = x) -> object:
            return feed_forward(x, loaded, act)

        points.append((n, _timed(run, device)))
    # Least-squares line through the (tokens, seconds) points.
    mean_n = sum(n for n, _ in points) / len(points)
    mean_t = sum(t for _, t in points) / len(points)
    var = sum((n - mean_n) ** 2 for n, _ in points)
    slope = max(0.0, sum((n - mean_n) * (t - mean_t) for n, t in points) / var) if var else 0.0
    intercept = max(0.0, mean_t - slope * mean_n)
    # The first load may include opening files; the median of the rest is the steady cost.
    steady = sorted(betas[1:] or betas)
    return CostModel(alpha_fixed=intercept, alpha_per_token=slope, beta=steady[len(steady) // 2])
