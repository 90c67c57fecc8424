"""One predicted request's MoE layer calls through the provider's own pool, order and prefetch rule.

`engine.planner.predict` walks a request's blocks and hands each MoE layer call to `Replay.layer`,
which decides hits and misses with the provider's pool (`engine.experts.pool.ExpertPool`), times
the call with the InfMoE order and its simulation (`engine.experts.order`) and, where the layer
after it is predicted, makes the guessed loads the provider would (`engine.experts.provider`: the
next layer's predicted experts, as many as `guesses_that_pay` allows, never evicting what the call
needs, only while that layer does not look cached: `CachedLayers`).

What a prediction gets right is a property of the model's weights, not something the planner can
know: `precision` gives it per predicted layer (the share of the provider's predictions of that
layer that were right: `cpm2 generate --record-routing` records it, `cpm2 plan --precision` sets
it), and each expert the next call needs is guessed right with that probability, the others
guessed wrong. A layer without one is not prefetched for, as with prefetch off.

Time here is one clock: dense work between calls advances it (`advance`), a call advances it by
its makespan. Guessed loads occupy the one link after the call's demand loads, in the order made;
the next call's demand loads go before queued guesses (the reader's priority queue), but wait for
the one whose read is in flight.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from engine.errors import ConfigError
from engine.experts.order import Job, order_jobs, simulate
from engine.experts.pool import ExpertId, ExpertPool
from engine.experts.provider import PREFETCH_MIN_PRECISION, CachedLayers, guesses_that_pay
from engine.model import MoELayerKey
from engine.planner.profile import MatmulRates
from engine.planner.routing import Routing


@dataclass(frozen=True)
class Costs:
    """The per-call costs one prediction uses, from the profile and the case."""

    dense: MatmulRates
    experts: MatmulRates
    dense_bytes_per_parameter: float
    act_bytes: int
    memcpy_gb_s: float
    load_latency_seconds: float
    """One read's fixed latency (submission, completion, the first sector) and the provider's
    hand-offs for it (`OverheadProfile.load_parts`): overlaps between reads in flight."""
    load_link_seconds: float
    """One expert's bytes over the link (at the rate measured with reads in flight) and the provider's
    bookkeeping for it (on the engine's thread, so it does not overlap)."""
    expert_call_seconds: float
    """Per expert computed, beyond its matmuls."""
    read_contention: float
    """Matmuls' slowdown while reads are in flight (`HardwareProfile.read_contention`; 1 on a GPU)."""
    expert_parameters: int
    expert_bytes: int
    """One expert in memory (what its kernel streams)."""
    blob_bytes: float
    """One expert as stored (what a load reads)."""
    expert_matrices: int

    @property
    def guess_seconds(self) -> float:
        """One guessed load on the link: a load alone (nothing of the call's shares its latency)."""
        return self.load_link_seconds + self.load_latency_seconds


class LayerCall(NamedTuple):
    """One MoE layer call as replayed."""

    makespan: float
    compute: float
    transfer: float
    """Link time of the loads this call made: its demand loads and the guesses it issued."""
    stall: float
    loads: int
    """Experts read: demand loads and guesses."""


@dataclass
class _Guess:
    expert: ExpertId
    start: float
    end: float


@dataclass
class Replay:
    """The pool, routing and link of one replayed request, shared by its encoder pass and decode steps."""

    costs: Costs
    pool: ExpertPool
    window: int
    routing: Routing
    requests: int
    """Requests in the batch (a call's rows are theirs in equal shares)."""
    resident: bool = False
    """Every expert loaded at start (a budget that holds them all): no layer reads."""
    precision: dict[str, float] = field(default_factory=dict)
    """Per predicted MoE layer (`decoder.3`), the share of the provider's predictions that were right."""
    guesser: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))
    """Draws which guesses are right, apart from the routing's draws."""
    hits: int = 0
    looked: int = 0
    clock: float = 0.0
    _guesses: list[_Guess] = field(default_factory=list)
    """Guessed loads not yet landed, in link order."""
    _drawn: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    """Calls drawn ahead, when their layer was predicted."""
    _cached: CachedLayers = field(default_factory=CachedLayers)
    """The layers that look cached, counted as the provider counts them."""

    def __post_init__(self) -> None:
        for layer, share in self.precision.items():
            if not 0 <= share <= 1:
                raise ConfigError(f"prediction precision of {layer}: {share} is not a share in [0, 1]")

    def advance(self, seconds: float) -> float:
        """Dense work of `seconds` (alone) between MoE layer calls; how long it takes. The part that
        runs while guessed loads are on the link is slowed by the reads (`Costs.read_contention`)."""
        link_busy_until = max((guess.end for guess in self._guesses), default=self.clock)
        contention = self.costs.read_contention
        overlapped = min(seconds * contention, max(0.0, link_busy_until - self.clock))
        taken = overlapped + (seconds - overlapped / contention)
        self.clock += taken
        return taken

    def layer(self, key: MoELayerKey, rows: int, *, ahead: tuple[MoELayerKey, float] | None = None) -> LayerCall:
        """One MoE layer on `rows` tokens of the batch, then the guesses for `ahead`: the next MoE
        layer of the stack and the dense seconds before it."""
        name = str(key)
        drawn = self._drawn.pop(name, None)
        demand = drawn if drawn is not None else self.routing.next_call(name, rows, self.requests)
        upcoming = [(key, e) for e, _ in demand]
        hits = []
        from_guesses = 0  # hits a guessed load brought in
        for i, (expert, _) in enumerate(demand):
            if (held := self.pool.get((key, expert))) is not None and held.prefetched:
                from_guesses += 1
                held.prefetched = False
            hits.append(self.resident or self.pool.record_use((key, expert), upcoming=upcoming[i + 1 :]))
        self.hits += sum(hits)
        self.looked += len(demand)
        landing, busy, queued = self._guesses_now(set(upcoming))
        link_busy = busy.end - self.clock if busy is not None else 0.0
        # β: a load alone pays its read latency and the provider's hand-offs in full; with n of a
        # layer's loads queued, up to `window` are in flight together and their latencies and
        # wake-ups overlap (bytes and the engine thread's bookkeeping do not). One load a layer is
        # decoding at batch 1; dozens are an encoder pass.
        misses = len(hits) - sum(hits)
        beta = self.costs.load_link_seconds + self.costs.load_latency_seconds / max(1, min(misses, self.window))
        # A CPU layer that reads computes its experts while the reader's threads share the cores.
        reading = misses or landing or link_busy > 0
        slowdown = self.costs.read_contention if reading else 1.0
        jobs = []
        for (expert, tokens), hit in zip(demand, hits, strict=True):
            matrices = self.costs.expert_matrices  # each its own call, streamed at its own size's rate
            compute = self.costs.expert_call_seconds + slowdown * matrices * self.costs.experts.seconds(
                rows=tokens,
                weight_bytes=self.costs.expert_bytes / matrices,
                parameters=self.costs.expert_parameters // matrices,
            )
            transfer = landing.get((key, expert), 0.0) if hit else beta
            jobs.append(Job(expert, compute, transfer))
        schedule = simulate(order_jobs(jobs, "infmoe", slots=self.window), slots=self.window, link_busy=link_busy)
        self._cached.note(name, loaded=misses > 0 or from_guesses > 0)
        # Guesses left from before queue behind this call's demand loads; this call's own go after them.
        link_free = self.clock + schedule.link_end
        self._guesses = [busy] if busy is not None else []
        for guess in queued:
            self._queue_guess(guess.expert, link_free, guess.end - guess.start)
            link_free = self._guesses[-1].end
        made = self._guess(ahead, rows, misses=misses, protect=upcoming, start=link_free) if ahead else 0
        self.clock += schedule.makespan
        demand_link = schedule.transfer - sum(landing.values())  # landing guesses were counted when made
        return LayerCall(
            schedule.makespan,
            schedule.compute,
            demand_link + made * self.costs.guess_seconds,
            schedule.stall,
            misses + made,
        )

    def anticipate(self, ahead: tuple[MoELayerKey, float], rows: int) -> int:
        """The provider's guesses for a stack's first MoE layer from the stack's input
        (`OffloadedExpertProvider.anticipate`): `ahead` is that layer and the dense seconds before
        it. They queue behind any guessed loads still on the link; how many were made."""
        start = max([self.clock] + [guess.end for guess in self._guesses])
        return self._guess(ahead, rows, misses=0, protect=[], start=start)

    def _guesses_now(self, needed: set[ExpertId]) -> tuple[dict[ExpertId, float], _Guess | None, list[_Guess]]:
        """Guessed loads not yet landed at this call's start: those it needs (their link time left,
        or a whole load for one still queued), the one in flight that it does not need (the link
        stays busy with it), and the unneeded ones still queued."""
        landing: dict[ExpertId, float] = {}
        busy = None
        queued = []
        for guess in self._guesses:
            if guess.end <= self.clock:
                continue  # landed
            in_flight = guess.start < self.clock
            if guess.expert in needed:
                landing[guess.expert] = guess.end - self.clock if in_flight else guess.end - guess.start
            elif in_flight:
                busy = guess
            else:
                queued.append(guess)
        return landing, busy, queued

    def _queue_guess(self, expert: ExpertId, start: float, seconds: float) -> None:
        self._guesses.append(_Guess(expert, start, start + seconds))

    def _guess(
        self, ahead: tuple[MoELayerKey, float], rows: int, *, misses: int, protect: list[ExpertId], start: float
    ) -> int:
        """The provider's guessed loads for the next layer (`_prefetch_next`); how many were made."""
        next_key, gap = ahead
        name = str(next_key)
        p = self.precision.get(name)
        if self.resident or p is None or p < PREFETCH_MIN_PRECISION or self._cached.looks_cached(name):
            return 0
        seconds = self.costs.guess_seconds
        pays = guesses_that_pay(gap, beta=seconds, precision=p, window=self.window)
        budget = max(0, min(pays, self.pool.num_slots - 1 - len(self._guesses)))
        if budget == 0:
            return 0
        call = self.routing.next_call(name, rows, self.requests)
        self._drawn[name] = call
        needed = [e for e, _ in call]
        right = [e for e in needed if self.guesser.random() < p]
        # The rest of the predictions are experts the call does not need. The runners-up the
        # provider adds while its window has room are left out: how often they are right is not
        # recorded, and counted as wrong they read more than the runs do (bench NLLB-MoE-shaped
        # model, batch 1: 5.0 MB a token predicted, 2.6 measured, 3.8 without them).
        others = np.setdiff1d(np.arange(self.routing.moe.num_experts), needed)
        wrong = self.guesser.choice(others, size=min(len(needed) - len(right), len(others)), replace=False)
        predictions = right + [int(e) for e in wrong]
        self.guesser.shuffle(predictions)
        made = 0
        for expert in predictions:
            guessed = (next_key, int(expert))
            if guessed in self.pool:
                continue
            admitted = self.pool.admit(guessed, upcoming=protect, spare_upcoming=True)
            if admitted is None:
                break
            admitted[0].simulated = admitted[0].prefetched = True
            self._queue_guess(guessed, start, seconds)
            start += seconds
            made += 1
            if made == budget:
                break
        return made
