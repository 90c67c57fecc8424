"""Where a predicted request's tokens go: each MoE layer call's experts, replayed from a recorded
run or drawn from what one showed (each layer's popularity, how much a request returns to the
experts of its earlier calls, and how much its tokens in one call share experts).

Shape legend: E experts of a layer, C calls of it, R requests of a call, T tokens of a call.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch

from engine.config import MoEConfig
from engine.errors import ConfigError

#: A recorded run's routing, call by call: for each MoE layer (keyed like `decoder.3`), its calls in
#: order (the encoder pass's, then each decode step's), each the (expert, tokens) pairs it needed.
RoutingTrace = Mapping[str, Sequence[Sequence[tuple[int, int]]]]


def _weights(counts: Sequence[float], prior: float) -> torch.Tensor:
    """A layer's recorded tokens per expert plus `prior` each: what draws are made in proportion to.
    Floored above 0: with no prior, a layer whose recording saw fewer experts than its top-k (or
    none) can still be drawn from."""
    return (torch.tensor(counts, dtype=torch.float64) + prior).clamp_min(1e-9)


def _tokens_per_expert(call: Sequence[tuple[int, int]], num_experts: int) -> torch.Tensor:
    counts = torch.zeros(num_experts, dtype=torch.float64)
    for expert, tokens in call:
        counts[expert] += tokens
    return counts


@dataclass
class Routing:
    """The calls of one predicted request, layer by layer: the next recorded call of the layer while
    the trace has one, else drawn (`next_call`)."""

    moe: MoEConfig
    generator: torch.Generator
    popularity: dict[str, torch.Tensor] = field(default_factory=dict)
    """Per layer, weights to draw its experts in proportion to (uniform where absent)."""
    reuse: Mapping[str, float] = field(default_factory=dict)
    """Per layer, the share of a drawn call's choices sent to experts the request's earlier calls of
    the layer chose (`routing_reuse`); the rest are drawn from the layer's popularity."""
    concentration: Mapping[str, float] = field(default_factory=dict)
    """Per layer, how alike a request's tokens in one call (its encoder pass) route: the Dirichlet
    concentration α its expert preferences are drawn with around the call's weights
    (`routing_concentration`); absent: every token drawn on its own."""
    preferences: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))
    """Draws the requests' preferences, apart from `generator` (an α leaves the draws of calls
    without one as they were)."""
    trace: dict[str, deque[Sequence[tuple[int, int]]]] = field(default_factory=dict)
    """Each layer's recorded calls still to replay; a layer's calls beyond them are drawn."""
    history: dict[str, torch.Tensor] = field(default_factory=dict)
    """Each layer's calls so far: tokens per expert."""

    @classmethod
    def create(
        cls,
        moe: MoEConfig,
        *,
        seed: int,
        popularity: Mapping[str, Sequence[float]] | None = None,
        prior: float = 1.0,
        reuse: Mapping[str, float] | None = None,
        concentration: Mapping[str, float] | None = None,
        trace: RoutingTrace | None = None,
    ) -> Routing:
        """See `engine.planner.predict.predict` for what each argument means."""
        if prior < 0:
            raise ConfigError(f"routing prior {prior}: must be >= 0")
        for layer, share in (reuse or {}).items():
            if not 0 <= share <= 1:
                raise ConfigError(f"routing reuse of {layer}: {share} is not a share in [0, 1]")
        for layer, alpha in (concentration or {}).items():
            if not alpha > 0:
                raise ConfigError(f"routing concentration of {layer}: {alpha} must be > 0")
        return cls(
            moe,
            torch.Generator().manual_seed(seed),
            popularity={k: _weights(v, prior) for k, v in (popularity or {}).items()},
            reuse=dict(reuse or {}),
            concentration=dict(concentration or {}),
            preferences=np.random.default_rng(seed),
            trace={layer: deque(calls) for layer, calls in (trace or {}).items()},
        )

    def next_call(self, layer: str, rows: int, requests: int = 1) -> list[tuple[int, int]]:
        """(expert, tokens) pairs of the layer's next call on `rows` tokens of `requests` requests
        (each an equal share of the rows), by expert."""
        recorded = self.trace.get(layer)
        call = (
            sorted((int(e), int(n)) for e, n in recorded.popleft()) if recorded else self._draw(layer, rows, requests)
        )
        counts = _tokens_per_expert(call, self.moe.num_experts)
        self.history[layer] = counts + self.history[layer] if layer in self.history else counts
        return call

    def _draw(self, layer: str, rows: int, requests: int) -> list[tuple[int, int]]:
        """`rows` tokens each sent to the layer's top-k, drawn from its popularity, or, for a share
        `reuse` of the choices, from the experts the layer's earlier calls chose (in proportion to
        their tokens); with a `concentration`, each request's tokens from preferences of its own."""
        p_E = self.popularity.get(layer)
        if p_E is None:
            p_E = torch.ones(self.moe.num_experts)
        reuse = self.reuse.get(layer, 0.0)
        history = self.history.get(layer)
        if reuse > 0 and history is not None:
            p_E = (1 - reuse) * p_E / p_E.sum() + reuse * history / history.sum()
        counts = _draw_counts(
            p_E,
            rows=rows,
            requests=requests,
            top_k=self.moe.top_k,
            alpha=self.concentration.get(layer),
            generator=self.generator,
            preferences=self.preferences,
        )
        return [(int(e), int(n)) for e, n in enumerate(counts.tolist()) if n]


def _draw_counts(
    p_E: torch.Tensor,
    *,
    rows: int,
    requests: int,
    top_k: int,
    alpha: float | None,
    generator: torch.Generator,
    preferences: np.random.Generator,
) -> torch.Tensor:
    """Tokens per expert of `rows` tokens each sent to `top_k` experts drawn in proportion to `p_E`.
    With `alpha`, a request's tokens share experts: each of the `requests` (an equal share of the
    rows; only where a request has more than one) draws its preferences from Dirichlet(alpha * p),
    the Pólya urn of its tokens (a small alpha: few experts per request; a large one: independent)."""
    num_experts = len(p_E)
    k = min(top_k, num_experts)
    if alpha is None or rows <= requests:
        weights_TE = p_E.expand(rows, -1)
    else:
        p = (p_E / p_E.sum()).double().numpy()
        # numpy's Dirichlet, unlike torch's, draws small concentrations without underflowing to 0.
        theta_RE = torch.from_numpy(preferences.dirichlet(alpha * p + 1e-12, size=requests))
        owner_T = torch.arange(rows) * requests // rows  # each request's rows together
        # Floored above 0: top-k without replacement needs k experts that can be drawn.
        weights_TE = theta_RE[owner_T].clamp_min(1e-12)
    picks = torch.multinomial(weights_TE, k, replacement=False, generator=generator)
    return torch.bincount(picks.flatten(), minlength=num_experts)


def routing_reuse(
    trace: RoutingTrace, popularity: Mapping[str, Sequence[float]], *, prior: float = 1.0
) -> dict[str, float]:
    """Per MoE layer of a recorded `trace`, how much its calls return to the experts of the calls
    before: the share r that `Routing` draws with (a choice goes, with probability r, to an expert
    the request's earlier calls of the layer chose, in proportion to their tokens, else to one drawn
    from the layer's `popularity` plus `prior`).

    A request's decode steps keep returning to a few experts per layer (MoE-Infinity's request-level
    traces), which independent draws from the totals do not: drawn alone, the CPM-2-like and
    NLLB-MoE-shaped bench runs were predicted to read 1.6x to 8x the bytes they read. r is the
    maximum-likelihood share under that mixture (its log-likelihood is concave in r: the root of its
    derivative, by bisection). Layers called once (an encoder's, in one pass) have nothing to reuse
    and are left out."""
    reuse = {}
    for layer, calls in trace.items():
        if layer not in popularity or len(calls) < 2:
            continue
        p_E = _weights(popularity[layer], prior)
        p_E = p_E / p_E.sum()
        counts_CE = torch.stack([_tokens_per_expert(call, len(p_E)) for call in calls])
        history_CE = counts_CE.cumsum(0)[:-1]  # each call's earlier calls
        earlier_CE = history_CE / history_CE.sum(-1, keepdim=True).clamp_min(1)
        reuse[layer] = _likeliest_share(counts_CE[1:], earlier_CE, p_E)
    return reuse


def _likeliest_share(chosen_CE: torch.Tensor, earlier_CE: torch.Tensor, p_E: torch.Tensor) -> float:
    """The r in [0, 1] that makes the choices `chosen_CE` (tokens per expert of each call) likeliest
    when each goes to `earlier_CE` (the call's earlier experts, as shares) with probability r, else
    to `p_E`: the root of the log-likelihood's derivative, which falls as r grows."""

    def slope(r: float) -> float:
        mixed_CE = (r * earlier_CE + (1 - r) * p_E).clamp_min(1e-300)
        return float((chosen_CE * (earlier_CE - p_E) / mixed_CE).sum())

    if slope(0.0) <= 0:
        return 0.0
    if slope(1.0) >= 0:
        return 1.0
    return _bisect(lambda r: slope(r) > 0, 0.0, 1.0, steps=40)


def _bisect(below: Callable[[float], bool], low: float, high: float, *, steps: int) -> float:
    """The point in [low, high] where `below` turns from True to False (it must turn once), to
    within (high - low) / 2**steps: each step keeps the half where it turns."""
    for _ in range(steps):
        middle = (low + high) / 2
        low, high = (middle, high) if below(middle) else (low, middle)
    return (low + high) / 2


def routing_concentration(
    trace: RoutingTrace,
    popularity: Mapping[str, Sequence[float]],
    *,
    top_k: int,
    requests: int,
    prior: float = 1.0,
    seed: int = 0,
    draws: int = 16,
) -> dict[str, float]:
    """Per MoE layer of a recorded `trace` whose first call held several tokens of each of its
    `requests` (an encoder pass), the concentration α with which `Routing` draws that call so that it
    touches, on average over `draws`, as many distinct experts as the recording did: what an encoder
    pass reads.

    A request's tokens in one pass share experts: the NLLB-MoE-shaped bench model's encoder layers
    sent 64 choices of a 32-token input to 22-27 of 128 experts, where drawing each token on its own
    from the recorded totals plus the prior touched about twice as many and predicted its prefill
    +74 % and +76 %. The distinct count grows with α (a large α: independent tokens), so α is found by
    bisection on log α over the planner's own draws, the same seeds at every α. Layers whose
    recording touched no fewer experts than independent draws do are left out (independent)."""
    concentration = {}
    for layer, calls in trace.items():
        if layer not in popularity or not calls:
            continue
        first = calls[0]
        rows = round(sum(n for _, n in first) / top_k)
        if rows <= requests:
            continue  # one token a request (a decode step): nothing shared within the call
        p_E = _weights(popularity[layer], prior)
        distinct = partial(_mean_distinct, p_E, rows=rows, requests=requests, top_k=top_k, seed=seed, draws=draws)
        target = len(first)
        if target >= distinct(alpha=None):
            continue
        # On log10 α from -3 (a request's tokens on one expert set) to 6 (independent tokens).
        fewer = partial(_touches_fewer, distinct, target)
        concentration[layer] = 10 ** _bisect(fewer, -3.0, 6.0, steps=24)
    return concentration


def _touches_fewer(distinct: Callable[..., float], target: float, log_alpha: float) -> bool:
    """Whether draws at α = 10**`log_alpha` touch fewer distinct experts than `target`."""
    return distinct(alpha=10**log_alpha) < target


def _mean_distinct(
    p_E: torch.Tensor, *, rows: int, requests: int, top_k: int, alpha: float | None, seed: int, draws: int
) -> float:
    """Distinct experts a call drawn as `_draw_counts` does touches, averaged over `draws` draws made
    from `seed` afresh (the same random numbers at every `alpha`, so the count moves with α alone)."""
    generator, preferences = torch.Generator().manual_seed(seed), np.random.default_rng(seed)
    touched = 0
    for _ in range(draws):
        counts = _draw_counts(
            p_E,
            rows=rows,
            requests=requests,
            top_k=top_k,
            alpha=alpha,
            generator=generator,
            preferences=preferences,
        )
        touched += int((counts > 0).sum())
    return touched / draws
