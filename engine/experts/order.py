"""In which order a layer runs its experts, so that transfers hide behind compute (InfMoE, SEED.md).

Each needed expert i has a transfer time β_i (0 when it is already in the pool) and a compute time
α_i that grows with its token count. Transfers run one after another on one link (copy stream or
I/O), into at most K slots; compute runs one expert after another. InfMoE orders the experts so that
for every t:

    Σ_{i<t} α_i ≥ (t−1)·β          (each load hides behind the compute before it)
    Σ_{i<t} α_i ≤ (t+K−1)·β        (never more than K experts resident)

That is a two-machine flow shop (link, then compute). Johnson's rule (1954) gives the order of
minimum makespan with unbounded buffers: jobs whose transfer is at most their compute first, by
increasing transfer time; then the rest, by decreasing compute time. Cached experts (β = 0) come
first, which is mixtral-offloading's cached-first order as a special case. With K slots the rule is
a heuristic; `simulate` measures any order under the slot limit, and `satisfies_infmoe` checks the
inequalities above (when no order satisfies them, the batch is too small or too skewed to hide the
transfers: batch more tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

OrderPolicy = Literal["infmoe", "cached-first", "index"]
ORDER_POLICIES: tuple[OrderPolicy, ...] = ("infmoe", "cached-first", "index")


@dataclass(frozen=True)
class CostModel:
    """Calibrated times: compute α(n) = alpha_fixed + alpha_per_token·n, transfer β per expert."""

    alpha_fixed: float
    alpha_per_token: float
    beta: float

    def alpha(self, num_tokens: int) -> float:
        return self.alpha_fixed + self.alpha_per_token * num_tokens


@dataclass(frozen=True)
class Job:
    """One expert to run: its index, compute time and transfer time (0 if cached)."""

    expert: int
    compute: float
    transfer: float


def jobs_for(demand: Sequence[tuple[int, int]], cached: set[int], cost: CostModel) -> list[Job]:
    """Jobs for `(expert, num_tokens)` pairs under `cost`."""
    return [Job(e, cost.alpha(n), 0.0 if e in cached else cost.beta) for e, n in demand]


def johnson_order(jobs: Sequence[Job]) -> list[Job]:
    """Johnson's rule; ties broken by expert index for a deterministic order."""
    first = sorted((j for j in jobs if j.transfer <= j.compute), key=lambda j: (j.transfer, j.expert))
    last = sorted((j for j in jobs if j.transfer > j.compute), key=lambda j: (-j.compute, j.expert))
    return first + last


def spread_cached_order(jobs: Sequence[Job]) -> list[Job]:
    """Loads in Johnson order with the cached experts spread between them, each covering a load.

    With one slot, putting every cached expert first hides only the first load; spreading them
    lets each one hide the next load instead.
    """
    loads = johnson_order([j for j in jobs if j.transfer > 0])
    cached = sorted((j for j in jobs if j.transfer == 0), key=lambda j: (-j.compute, j.expert))
    if not loads or not cached:
        return loads + cached
    order: list[Job] = []
    per_gap = -(-len(cached) // len(loads))
    for load in loads:
        order += cached[:per_gap]
        cached = cached[per_gap:]
        order.append(load)
    return order + cached


def order_jobs(jobs: Sequence[Job], policy: OrderPolicy, *, slots: int | None = None) -> list[Job]:
    """The jobs in the order `policy` runs them.

    `infmoe` with a known slot count returns whichever of Johnson's order, the spread-cached order
    and index order simulates fastest under that limit (Johnson's rule alone is optimal only with
    unbounded slots).
    """
    if policy == "index":
        return sorted(jobs, key=lambda j: j.expert)
    if policy == "cached-first":
        return sorted(jobs, key=lambda j: (j.transfer > 0, j.expert))
    johnson = johnson_order(jobs)
    if slots is None or slots >= len(jobs):
        return johnson
    candidates = [johnson, spread_cached_order(jobs), sorted(jobs, key=lambda j: j.expert)]
    return min(candidates, key=lambda order: simulate(order, slots=slots).makespan)


@dataclass(frozen=True)
class Schedule:
    """Simulated timeline of an order: when everything ends and how long compute waited."""

    makespan: float
    stall: float
    compute: float
    transfer: float
    link_end: float = 0.0
    """When the link is free again: its last transfer done (or the read in flight at the start)."""

    @property
    def bound(self) -> float:
        """The physical limit: neither the link nor the compute can finish sooner."""
        return max(self.compute, self.transfer)


def simulate(jobs: Sequence[Job], *, slots: int, link_busy: float = 0.0) -> Schedule:
    """Run `jobs` in the given order: one link, one compute unit, at most `slots` loaded-not-computed.

    A transfer may start when the link is free (after `link_busy`: a read already in flight) and a
    slot is free; a slot is freed when the compute of the expert in it finishes (cached experts
    occupy no new slot).
    """
    if slots < 1:
        raise ValueError("need at least one slot")
    link_free = link_busy
    compute_free = 0.0
    stall = 0.0
    slot_release: list[float] = []  # compute-finish times of experts holding a slot, oldest first
    for job in jobs:
        ready = 0.0
        if job.transfer > 0:
            start = link_free
            if len(slot_release) >= slots:
                start = max(start, slot_release[-slots])
            link_free = start + job.transfer
            ready = link_free
        begin = max(compute_free, ready)
        stall += max(0.0, ready - compute_free)
        compute_free = begin + job.compute
        if job.transfer > 0:
            slot_release.append(compute_free)
    return Schedule(
        makespan=compute_free,
        stall=stall,
        compute=sum(j.compute for j in jobs),
        transfer=sum(j.transfer for j in jobs),
        link_end=link_free,
    )


def satisfies_infmoe(jobs: Sequence[Job], *, slots: int) -> bool:
    """Whether the order meets InfMoE's two inequalities over its transferred experts."""
    loads = [j for j in jobs if j.transfer > 0]
    if not loads:
        return True
    beta = max(j.transfer for j in loads)
    cover = 0.0  # compute of every expert before this one in the order, cached ones included
    t = 0
    for job in jobs:
        if job.transfer > 0:
            t += 1
            if not (t - 1) * beta <= cover <= (t + slots - 1) * beta:
                return False
        cover += job.compute
    return True
