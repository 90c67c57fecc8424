"""The offloading expert provider: InfMoE's per-layer schedule over a cached pool, with prefetch.

For each MoE layer call (`fetch`): look up the needed experts in the pool (hits), order them
(`order.py`: InfMoE's order by default), keep up to `window` loads in flight ahead of compute, hand
each expert to the layer as soon as it is ready, and release it once computed. Across layers and
steps the pool caches experts (LRU / LFU), and after each layer the next MoE layer's router is
applied to this layer's input to prefetch the experts it will probably need (mixtral-offloading's
speculative loading), with precision and recall counted when that layer runs.

The provider only decides *which* experts move *when*; a transfer engine (`cpu.py`, `cuda.py`)
moves the bytes, and the layer does the math. Results are bit-identical to resident experts.
"""

from __future__ import annotations

import time
from collections.abc import Container, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from engine.experts.order import CostModel, OrderPolicy, jobs_for, order_jobs
from engine.experts.pool import ExpertId, ExpertPool, PoolEntry
from engine.experts.predictor import PredictorChain, is_stack_input, stack_input
from engine.experts.stats import ExpertStats, LayerCounts
from engine.model import ExpertWeights, MoELayerKey
from engine.model.moe import ExpertDemand, MoEFeedForward

#: Below this running precision, predictions no longer trigger loads (they would mostly be wasted).
PREFETCH_MIN_PRECISION = 0.3
#: How many MoE layers ahead prefetch predicts.
PREFETCH_DEPTH = 1
#: A layer whose last this many calls found every expert in RAM without a guessed load is taken to
#: be cached, and prediction for it idles (below). One such call is not enough: where the pool holds
#: a fraction of the experts, the calls that need loads and those that do not alternate (measured on
#: NLLB-MoE 54B's shape at batch 1, int4 experts, when one call sufficed and a call served by guesses
#: counted as in RAM: guesses right 96 % of the time, made for every other call, hit rate 0.47).
CACHED_AFTER_CALLS = 8
#: While a prediction could not start a load (no guessed load would pay: too little link time before
#: the next layer or too low a precision, and the lower tier takes no hints; or the next layer looks
#: cached, above), the next layer's experts are predicted on one call in this many,
#: enough to keep the precision that decides it current: predicting cost ~0.2 ms per layer at batch
#: 1 (a router matmul and a dozen small ops), 1.2 ms of a 12 ms int4 step on the `small` preset.
IDLE_PREDICTION_EVERY = 4


class Transfers(Protocol):
    """What the provider needs from a transfer engine."""

    @property
    def busy_seconds(self) -> float:
        """Time the link spent moving experts (at least one load in flight), so that busy time per
        load is the link time of one expert, however many loads share it."""
        ...

    @property
    def loads_done(self) -> int:
        """Loads finished so far."""
        ...

    def in_place(self, expert: ExpertId) -> ExpertWeights | None:
        """Weights usable where they already are (no transfer), or None."""
        ...

    def hint(self, expert: ExpertId) -> bool:
        """Ask the lower tier to stage `expert` on its own; True if that is all prefetch needs."""
        ...

    @property
    def takes_hints(self) -> bool:
        """Whether `hint` does anything here (page-cache mode reads hinted experts ahead)."""
        ...

    def memory(self, held_bytes: int) -> tuple[int, int]:
        """(pool bytes, mapped-store bytes in RAM) now; `held_bytes` are the experts the pool holds in
        memory of their own (converted ones), which preallocated slots already count."""
        ...

    def start(self, entry: PoolEntry, *, prefetch: bool = False) -> object:
        """Begin moving `entry.expert` into `entry.slot` (prefetches may yield to demand loads)."""
        ...

    def wait(self, entry: PoolEntry) -> ExpertWeights: ...
    def release(self, entry: PoolEntry) -> None: ...
    def close(self) -> None: ...


class OffloadedExpertProvider:
    """Serves every MoE layer of one model from a bounded pool fed by `transfers`."""

    def __init__(
        self,
        transfers: Transfers,
        pool: ExpertPool,
        *,
        bytes_per_expert: int,
        cost: CostModel,
        order: OrderPolicy = "infmoe",
        window: int = 2,
        prefetch: bool = True,
        calibrate_prediction: bool = True,
    ) -> None:
        self.transfers = transfers
        self.pool = pool
        self.bytes_per_expert = bytes_per_expert
        self.cost = cost
        self.order: OrderPolicy = order
        # At least one slot must stay free of loads-ahead for the expert being computed.
        self.window = max(1, min(window, pool.num_slots - 1))
        self.prefetch = prefetch
        self.calibrate_prediction = calibrate_prediction and prefetch
        self.stats = ExpertStats()
        # For each MoE layer, the next `PREFETCH_DEPTH` MoE layers of the same stack and their
        # predictors (each one's router, corrected from the traffic while `calibrate_prediction`).
        self.predictors = PredictorChain([], learns=False)
        self._predicted: dict[MoELayerKey, set[int]] = {}  # the experts predicted for a layer
        self._precision = 1.0  # running precision of next-layer predictions
        # ... and of predictions of a stack's first MoE layer from the stack's input (`anticipate`),
        # kept apart: that guess skips the dense blocks in between, and its misses must not stop
        # the next-layer guesses.
        self._input_precision = 1.0
        self._idle_calls = 0  # layer calls since a prediction was last made with nothing to load
        self._cached = CachedLayers()
        # Per MoE layer, the running time from the end of its fetch to the next fetch (the dense work
        # in between: the link's idle time unless guesses fill it), and when the last fetch ended.
        self._gap: dict[MoELayerKey, float] = {}
        self._last_fetch: tuple[MoELayerKey, float] | None = None
        # Loads before this provider existed (calibration) are not its traffic.
        self._loads_seen = transfers.loads_done
        self._busy_seen = transfers.busy_seconds

    def memory(self) -> dict[str, int]:
        """Expert bytes in RAM now: the pool (its slots, or staging buffers plus the converted experts
        it holds) and the memory-mapped store's pages the page cache holds (`mincore`), which
        page-cache mode computes from in place and no budget bounds yet."""
        pool, mapped = self.transfers.memory(len(self.pool.entries) * self.bytes_per_expert)
        return {"pool_bytes": pool, "mapped_resident_bytes": mapped, "resident_bytes": pool + mapped}

    # ---- wiring ------------------------------------------------------------------------------

    def attach(self, layers: Sequence[MoEFeedForward]) -> None:
        """Serve `layers` (a model's MoE layers, in order) and learn each one's successor's router."""
        for layer in layers:
            layer.expert_provider = self
        self.predictors = PredictorChain(layers, depth=PREFETCH_DEPTH, learns=self.calibrate_prediction)

    # ---- the per-layer schedule --------------------------------------------------------------

    def fetch(
        self, layer: MoELayerKey, demand: Sequence[ExpertDemand], hidden_ND: torch.Tensor
    ) -> Iterator[tuple[int, ExpertWeights]]:
        stats = self.stats
        stats.layer_calls += 1
        counts = stats.layer(str(layer))
        self._note_gap()
        self._score_prediction(layer, demand, counts)
        cached = set()
        from_guesses = 0  # hits that a guessed load brought in: misses without prefetch
        # Experts whose pages the OS already holds are used where they are (CPU; see cpu.py).
        in_place: dict[ExpertId, ExpertWeights] = {}
        for item in demand:
            key = (layer, item.expert)
            if (held := self.pool.get(key)) is not None:
                cached.add(item.expert)
                from_guesses += held.prefetched
                stats.hits += 1
                counts.hits += 1
            elif (mapped := self.transfers.in_place(key)) is not None:
                cached.add(item.expert)
                in_place[key] = mapped
                stats.in_place += 1
                counts.in_place += 1
            else:
                stats.misses += 1
                counts.misses += 1
        self._cached.note(layer, loaded=from_guesses > 0 or len(cached) < len(demand))
        jobs = order_jobs(
            jobs_for([(d.expert, d.num_tokens) for d in demand], cached, self.cost),
            self.order,
            slots=self.window,
        )
        order: list[ExpertId] = [(layer, job.expert) for job in jobs]
        tokens = {d.expert: d.num_tokens for d in demand}
        # Demand loads first, then the next layer's likely experts as soon as every demand load of
        # this one is issued (guesses queue behind them on the link), before that compute: at small
        # batches a layer computes in well under one transfer time, so a prefetch issued only
        # after this layer would rarely arrive before the next layer needs it.
        demand_loads = len(order) - len(cached)
        guessed = not self.prefetch

        def issue(position: int) -> None:
            nonlocal guessed
            self._issue(order, position, skip=in_place)
            if not guessed and all(e in self.pool or e in in_place for e in order[position:]):
                guessed = True
                self._prefetch_next(layer, hidden_ND, demand_loads=demand_loads, protect=order)

        issue(0)
        # Learning from this call's input waits until its demand loads are on the link: it then
        # overlaps their reads instead of delaying them (a refit can take tens of ms).
        self.predictors.observe(layer, hidden_ND)
        for position, expert in enumerate(order):
            entry = None
            if expert in in_place:
                weights = in_place[expert]
                issue(position + 1)
            else:
                entry = self._ensure_issued(order, position)
                entry.pins += 1
                issue(position + 1)
                weights = self._ready(entry)
                self.pool.touch(entry)
                entry.prefetched = False
            begin = time.perf_counter()
            yield expert[1], weights
            elapsed = time.perf_counter() - begin
            stats.compute_seconds += elapsed
            stats.experts_run += 1
            self._learn_alpha(tokens[expert[1]], elapsed)
            if entry is not None:
                entry.pins -= 1
                self.transfers.release(entry)
        self._learn_beta()
        self._last_fetch = (layer, time.perf_counter())

    def anticipate(self, layer: MoELayerKey, hidden_ND: torch.Tensor) -> None:
        """Guess the experts of `layer`, its stack's first MoE layer, from the stack's input
        (`AnticipatingProvider`), as a layer's call guesses the next layer's: loads while they pay
        for themselves in the time the blocks before `layer` take (their running gap)."""
        source = stack_input(layer.stack)
        self._note_gap()
        self.predictors.observe(source, hidden_ND)
        if self.prefetch:
            self._prefetch_next(source, hidden_ND, demand_loads=0, protect=())
        self._last_fetch = (source, time.perf_counter())

    def _note_gap(self) -> None:
        """Fold the time since the previous fetch ended into that layer's running gap."""
        if self._last_fetch is None:
            return
        previous, ended = self._last_fetch
        gap = time.perf_counter() - ended
        known = self._gap.get(previous)
        self._gap[previous] = gap if known is None else 0.8 * known + 0.2 * gap
        self._last_fetch = None

    def _issue(self, order: Sequence[ExpertId], position: int, *, skip: Container[ExpertId] = ()) -> None:
        """Start loads for the not-yet-resident experts among the `window` from `position` on."""
        upcoming = [e for e in order[position:] if e not in skip]
        for expert in upcoming[: self.window]:
            if expert in self.pool:
                continue
            # Loads ahead never evict another expert this layer still needs.
            if not self._load(expert, upcoming=upcoming, spare_upcoming=True):
                return  # no slot now; the expert being computed will free one

    def _ensure_issued(self, order: Sequence[ExpertId], position: int) -> PoolEntry:
        """The pool entry of `order[position]`, starting its load (waiting for a slot) if needed."""
        expert = order[position]
        while expert not in self.pool:
            if not self._load(expert, upcoming=order[position:], spare_upcoming=False):
                # Every slot is pinned or loading: wait for the oldest load, then retry.
                loading = self.pool.loading()
                assert loading, "pool exhausted with nothing in flight (window too large for the pool)"
                self._ready(loading[0])
        entry = self.pool.get(expert)
        assert entry is not None
        return entry

    def _load(
        self, expert: ExpertId, *, upcoming: Sequence[ExpertId], spare_upcoming: bool, prefetch: bool = False
    ) -> bool:
        admitted = self.pool.admit(expert, upcoming=upcoming, spare_upcoming=spare_upcoming)
        if admitted is None:
            return False
        entry, evicted = admitted
        if evicted is not None:
            self.stats.evictions += 1
        entry.pending = self.transfers.start(entry, prefetch=prefetch)
        self.stats.transfers += 1
        self.stats.bytes_moved += self.bytes_per_expert
        return True

    def _ready(self, entry: PoolEntry) -> ExpertWeights:
        """Wait for `entry`'s load (counting the wait as stall) and install its weights."""
        if entry.weights is None:
            begin = time.perf_counter()
            entry.weights = self.transfers.wait(entry)
            entry.pending = None
            self.stats.stall_seconds += time.perf_counter() - begin
        return entry.weights

    # ---- prediction ----------------------------------------------------------------------------

    def _prefetch_next(
        self, layer: MoELayerKey, hidden_ND: torch.Tensor, *, demand_loads: int, protect: Sequence[ExpertId]
    ) -> None:
        """Start loads for the experts the next MoE layers will probably need (never evicting `protect`).

        The next `PREFETCH_DEPTH` layers' predictors (each one's router, corrected where the traffic
        has shown a correction predicts better: `engine.experts.predictor`) score this layer's input. Their
        top-k experts (k = the layer's `top_k`: the second choice of a top-2 router is the runner-up
        of its logits) are the predictions (the next layer's are scored for precision and recall);
        loads go to the next layer's predictions, then further layers' predictions, then the next
        layer's runners-up by probability mass (at small batches one missed expert stalls a whole
        layer). Looking two layers ahead measured no better than one on the benchmark models
        (random routers, 2-core CPU), so the depth is 1.
        """
        following = self.predictors.ahead(layer)
        if not following or hidden_ND.shape[0] == 0:
            return
        # Loads are spent on guesses only while they keep paying off, and only as many as pay.
        from_input = is_stack_input(layer)
        precision = self._input_precision if from_input else self._precision
        pays = precision >= PREFETCH_MIN_PRECISION
        guesses = self._guesses_that_pay(self._gap.get(layer, 0.0), precision) if pays else 0
        budget = max(0, min(guesses, self.pool.num_slots - 1 - len(self.pool.loading())))
        may_load = budget > 0 or (pays and self.transfers.takes_hints)
        if not (may_load and not self._cached.looks_cached(following[0][0])):
            self._idle_calls += 1
            if self._idle_calls % IDLE_PREDICTION_EVERY:
                return  # nothing would be loaded or hinted: predict only to keep the precision current
        candidates: list[tuple[ExpertId, bool]] = []
        runners_up: list[tuple[ExpertId, bool]] = []
        for depth, (next_key, predictor) in enumerate(following):
            predicted, ranked_list = rank_experts(predictor.scores(hidden_ND), predictor.top_k)
            if depth == 0:
                self._predicted[next_key] = predicted
            candidates += [((next_key, e), True) for e in ranked_list[: len(predicted)]]
            if depth == 0:
                # Only the next few by mass: going further down the ranking evicts more useful
                # experts from the pool than it saves (measured: hit rate 0.72 → 0.62).
                cut = max(len(predicted), self.window - demand_loads)
                runners_up = [((next_key, e), False) for e in ranked_list[len(predicted) : cut]]
        if not pays:
            return
        for key, is_prediction in candidates + runners_up:
            if key in self.pool or self.transfers.in_place(key) is not None:
                continue  # already in RAM
            # Page-cache mode: the OS reads the predicted experts ahead (a hint cannot be
            # deprioritised behind demand reads, so runners-up get none).
            if is_prediction and self.transfers.hint(key):
                continue
            if budget == 0 or not self._load(key, upcoming=protect, spare_upcoming=True, prefetch=True):
                break
            budget -= 1
            entry = self.pool.get(key)
            assert entry is not None
            entry.prefetched = True
            self.stats.prefetches += 1

    def _guesses_that_pay(self, gap: float, precision: float) -> int:
        return guesses_that_pay(gap, beta=self.cost.beta, precision=precision, window=self.window)

    def _score_prediction(self, layer: MoELayerKey, demand: Sequence[ExpertDemand], layer_counts: LayerCounts) -> None:
        """Score the prediction made for `layer`, in the totals and in the layer's own counters."""
        predicted = self._predicted.pop(layer, None)
        if predicted is None:
            return
        needed = {d.expert for d in demand}
        used = len(predicted & needed)
        for counts in (self.stats, layer_counts):
            counts.predicted += len(predicted)
            counts.predicted_used += used
            counts.needed_after_prediction += len(needed)
        if predicted and self.predictors.predicted_from_input(layer):
            self._input_precision = 0.9 * self._input_precision + 0.1 * used / len(predicted)
        elif predicted:
            self._precision = 0.9 * self._precision + 0.1 * used / len(predicted)

    # ---- calibration -------------------------------------------------------------------------

    def _learn_beta(self) -> None:
        """Follow the measured transfer time per expert (loads finish in the background)."""
        busy, loads = self.transfers.busy_seconds, self.transfers.loads_done
        new_loads, new_busy = loads - self._loads_seen, busy - self._busy_seen
        if new_loads > 0:
            beta = 0.8 * self.cost.beta + 0.2 * (new_busy / new_loads)
            self.cost = CostModel(self.cost.alpha_fixed, self.cost.alpha_per_token, beta)
        self.stats.transfer_seconds += new_busy
        self._loads_seen, self._busy_seen = loads, busy

    def _learn_alpha(self, num_tokens: int, seconds: float) -> None:
        """Track compute time per expert online (exponential average of the per-token slope)."""
        cost = self.cost
        predicted = cost.alpha(num_tokens)
        if predicted <= 0:
            return
        scale = 0.9 + 0.1 * (seconds / predicted)
        self.cost = CostModel(cost.alpha_fixed * scale, cost.alpha_per_token * scale, cost.beta)

    def close(self) -> None:
        """Finish in-flight loads and stop the transfer engine."""
        for entry in self.pool.loading():
            self._ready(entry)
        self.transfers.close()


@dataclass
class CachedLayers:
    """Which MoE layers look cached, so that predicting for them can idle: those whose last
    `CACHED_AFTER_CALLS` calls found every expert in RAM without a guessed load. The provider and
    the planner's replay (`engine.planner.replay`) each keep one, so the two gate alike."""

    in_ram: dict[Hashable, int] = field(default_factory=dict)
    """Per layer, its calls in a row that found every expert in RAM without a guessed load."""

    def note(self, layer: Hashable, *, loaded: bool) -> None:
        """One call of `layer`; `loaded`: it read an expert, or used one a guessed load brought in."""
        self.in_ram[layer] = 0 if loaded else self.in_ram.get(layer, 0) + 1

    def looks_cached(self, layer: Hashable) -> bool:
        return self.in_ram.get(layer, 0) >= CACHED_AFTER_CALLS


def guesses_that_pay(gap: float, *, beta: float, precision: float, window: int) -> int:
    """How many guessed loads the link can take before the next layer's demand loads.

    Guesses queue behind this layer's demand loads and run while the dense work up to the next
    MoE layer (`gap`) leaves the link idle. Those that fit in the gap cost the link nothing;
    one more is made only if it is likely to save more than it delays the next layer: with
    precision p it saves the part of a transfer that fits (r) and, when wrong, makes the next
    demand load wait for the rest (beta - r). Measured on the benchmark's Switch-like model in
    strict mode (one disk, beta 2.3-3.9 ms per 4 MiB expert depending on the hour): at batch 1
    (gaps 1.1 ms, p 0.4) no guess pays, and the old rule's up to `window` guesses per layer read
    2x the bytes and decoded 10-12 % slower than no prefetch at all; at batch 16 (gaps 1.9 ms,
    p 0.52) one guess per layer pays, where the old rule made none and the disk idled.
    """
    if beta <= 0:
        return window
    free = int(gap // beta)
    rest = gap - free * beta
    return free + (1 if precision * rest > (1 - precision) * (beta - rest) else 0)


def rank_experts(scores_NE: torch.Tensor, top_k: int) -> tuple[set[int], list[int]]:
    """The experts a router's scores (N tokens, E experts) send some token to (each token's top
    `top_k`), and every expert ranked by how many tokens chose it, then by probability mass."""
    N, E = scores_NE.shape
    if N == 1:
        # One token (batch-1 decoding): its own ranking, in Python; a dozen tensor ops on 1 x E
        # values cost more than the sort.
        row = scores_NE[0].tolist()
        ranked = sorted(range(E), key=row.__getitem__, reverse=True)
        return set(ranked[:top_k]), ranked
    chosen = scores_NE.topk(top_k, dim=-1).indices.reshape(-1)
    votes = torch.bincount(chosen, minlength=E)
    predicted = set(votes.nonzero().flatten().tolist())
    # Rank by votes, then by probability mass (one argsort, not a Python sort).
    mass_E = scores_NE.softmax(dim=-1).sum(dim=0)
    rank_key_E = votes.double() * (N + 1) + mass_E.double()
    return predicted, torch.argsort(rank_key_E, descending=True).tolist()
