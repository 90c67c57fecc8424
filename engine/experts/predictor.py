"""Next-layer expert prediction, calibrated on the traffic the provider serves.

The provider guesses MoE layer L+1's experts from layer L's input: the latest state from which a load
still has layer L's experts and the dense work up to L+1 to hide behind. The plain guess applies the
next router to that state, which is right only as far as the residual stream changes little in
between (attention, cross-attention and L's own experts add to it). `NextLayerPredictor` learns a
linear correction to that router from what the routes then really were: for the tokens it sees it
accumulates the least-squares statistics of (L's input -> the next router's logits on L+1's input,
less its logits on L's input), refits at a few geometric token counts, and keeps the fit only if it
predicts better than the plain router on tokens held out from the fit (every `HOLDOUT_EVERY`-th).
Once `max_tokens` have been seen it fits a last time and frees its statistics.

Measured offline (decode steps on random token ids; precision of the top-1 guess on held-out
sequences, 1-2k tokens per layer): on the shipped demo model, whose routers are trained, decoder
layer 0 -> 1 0.32 -> 0.57 and 1 -> 2 0.44 -> 0.95; on the random-weight bench models the fit never
beat the plain router (0.20-0.54 plain, 0.16-0.49 fitted: a random network's layers are not near-
linear in each other), which is why a layer keeps the router unless its held-out precision improves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from engine.model.moe import CentroidRouter, LearnedRouter, MoEFeedForward, MoELayerKey

#: Every this-many-th token is held out of the fit to judge it.
HOLDOUT_EVERY = 4
#: Held-out tokens kept per layer (the most recent ones; each costs a row of d_model floats).
MAX_HOLDOUT = 1024
#: Ridge strengths tried, as multiples of the statistics' mean diagonal.
RIDGE = (1e-3, 1e-2, 1e-1, 1.0)
#: A fit replaces the plain router only when its held-out precision is at least this much higher.
MIN_GAIN = 0.02
#: Tokens gathered before the routers score them and they join the statistics: at d_model 2048 on 2
#: cores a one-row `learn` took 0.37 ms adding each row as it came, 0.10 ms adding them 64 at a time
#: (scored one by one); scoring them 64 at a time too leaves the copy of a row (see `learn`).
FLUSH_ROWS = 64


def stack_input(stack: Literal["encoder", "decoder"]) -> MoELayerKey:
    """The stack's input, before its first block, as the layer that predicts the stack's first MoE
    layer (`AnticipatingProvider`): block -1."""
    return MoELayerKey(stack, -1)


def is_stack_input(key: MoELayerKey) -> bool:
    return key.block < 0


def _held_out(first: int, count: int) -> int:
    """How many of the tokens numbered `first` .. `first + count - 1` are held out of the fit."""
    return (first + count + HOLDOUT_EVERY - 1) // HOLDOUT_EVERY - (first + HOLDOUT_EVERY - 1) // HOLDOUT_EVERY


def router_linear(router: CentroidRouter | LearnedRouter) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The router's scores as one linear map: weight (E, D) and bias (E,) or None, in float32."""
    if isinstance(router, CentroidRouter):
        return router.centroids.float(), None
    bias = router.classifier.bias
    return router.classifier.weight.float(), None if bias is None else bias.float()


def overlap(scores_NE: torch.Tensor, truth_NE: torch.Tensor, top_k: int) -> float:
    """Mean share of each token's true top-k experts found in the top-k of `scores_NE`."""
    guess_NK = scores_NE.topk(top_k, dim=-1).indices
    true_NK = truth_NE.topk(top_k, dim=-1).indices
    hits_N = (guess_NK.unsqueeze(-1) == true_NK.unsqueeze(-2)).any(-1).sum(-1)
    return float(hits_N.float().mean()) / top_k


class NextLayerPredictor:
    """Scores the experts of one MoE layer (the next) from the previous MoE layer's input."""

    def __init__(
        self,
        router: CentroidRouter | LearnedRouter,
        top_k: int,
        *,
        learns: bool = True,
        max_tokens: int | None = None,
    ) -> None:
        self.router = router
        self.top_k = top_k
        E, D = router_linear(router)[0].shape
        self.num_features = D + 1  # the input and a constant, for the bias
        # Enough tokens to fit D + 1 unknowns per expert several times over (the demo model's fit held
        # out 0.69-0.81 after 14x; a random model's does not improve with more).
        self.max_tokens = max_tokens if max_tokens is not None else 16 * self.num_features
        # The statistics, (D + 1)^2 + (D + 1) E floats, exist only while it learns: never when it does not.
        n = self.num_features
        self.gram_FF: torch.Tensor | None = torch.zeros(n, n) if learns else None
        self.cross_FE: torch.Tensor | None = torch.zeros(n, E) if learns else None
        self.holdout_inputs: list[torch.Tensor] = []  # rows of the previous layer's input
        self.holdout_truth: list[torch.Tensor] = []  # the next router's logits on its own input
        # (previous layer's input, next layer's input) of tokens counted but not yet scored and added.
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._pending_rows = 0
        self.tokens_seen = 0
        self.tokens_fitted = 0
        self._next_refit = 2 * self.num_features
        # The correction in force: None while the plain router predicts better.
        self.fitted: tuple[torch.Tensor, torch.Tensor] | None = None
        self.precision_plain: float | None = None  # on the held-out tokens at the last refit
        self.precision_fitted: float | None = None

    @property
    def is_learning(self) -> bool:
        return self.gram_FF is not None

    @torch.no_grad()
    def plain_scores(self, hidden_ND: torch.Tensor) -> torch.Tensor:
        """The next router's own scores (N, E), float32, for rows `hidden_ND`."""
        return self.router.scores(hidden_ND.unsqueeze(0))[0].float()

    @torch.no_grad()
    def scores(self, hidden_ND: torch.Tensor) -> torch.Tensor:
        """The next layer's expert scores (N, E) for the previous layer's input rows."""
        if self.fitted is None:
            return self.plain_scores(hidden_ND)
        weight_ED, bias_E = self.fitted
        return F.linear(hidden_ND.float(), weight_ED, bias_E)

    @torch.no_grad()
    def learn(self, previous_ND: torch.Tensor, next_ND: torch.Tensor) -> None:
        """Add tokens whose input to the previous layer was `previous_ND` and to the next `next_ND`.

        Tokens are counted at once but scored and added `FLUSH_ROWS` at a time: at batch 1 a call is
        one token, and scoring it alone (two router matmuls and a dozen small ops) cost 54 / 95 us a
        call at d_model 512 / 2048 on 2 vCPUs, against 8 / 39 us now. A refit that is due adds what
        is pending first, so refits happen at the same token counts as row by row.
        """
        if self.gram_FF is None or self.cross_FE is None:
            return
        N = previous_ND.shape[0]
        first = self.tokens_seen
        self.tokens_seen += N
        self.tokens_fitted += N - _held_out(first, N)
        final = self.tokens_seen >= self.max_tokens
        due = self.tokens_fitted >= self._next_refit
        kept = self._pending_rows + N < FLUSH_ROWS and not (final or due)
        # Rows kept for later are copied: the caller's tensors may be views of buffers it reuses.
        self._pending.append((previous_ND.clone(), next_ND.clone()) if kept else (previous_ND, next_ND))
        self._pending_rows += N
        if not kept:
            self._add_pending()
        if final:
            self.refit()
            self.gram_FF = self.cross_FE = None
            self.holdout_inputs, self.holdout_truth = [], []
        elif due:
            self.refit()
            self._next_refit *= 4

    def _add_pending(self) -> None:
        """Score the pending tokens and add them to the statistics or the held-out set."""
        if not self._pending or self.gram_FF is None or self.cross_FE is None:
            return
        x_ND = torch.cat([previous for previous, _ in self._pending]).float()
        next_ND = torch.cat([following for _, following in self._pending])
        first = self.tokens_seen - self._pending_rows
        self._pending, self._pending_rows = [], 0
        truth_NE = self.plain_scores(next_ND)
        residual_NE = truth_NE - self.plain_scores(x_ND)
        held_N = (torch.arange(x_ND.shape[0]) + first) % HOLDOUT_EVERY == 0
        if bool(held_N.any()):
            self.holdout_inputs.append(x_ND[held_N])
            self.holdout_truth.append(truth_NE[held_N])
            self._trim_holdout()
        fit_N = ~held_N
        if bool(fit_N.any()):
            features_NF = F.pad(x_ND[fit_N], (0, 1), value=1.0)
            self.gram_FF.addmm_(features_NF.T, features_NF)
            self.cross_FE.addmm_(features_NF.T, residual_NE[fit_N])

    def _trim_holdout(self) -> None:
        rows = sum(x.shape[0] for x in self.holdout_inputs)
        while rows - self.holdout_inputs[0].shape[0] >= MAX_HOLDOUT:
            rows -= self.holdout_inputs.pop(0).shape[0]
            self.holdout_truth.pop(0)

    @torch.no_grad()
    def refit(self) -> None:
        """Fit the correction at each ridge strength; keep the best if it beats the plain router on
        the held-out tokens."""
        self._add_pending()
        if self.gram_FF is None or self.cross_FE is None or not self.holdout_inputs:
            return
        x_ND = torch.cat(self.holdout_inputs)
        truth_NE = torch.cat(self.holdout_truth)
        plain_NE = self.plain_scores(x_ND)
        self.precision_plain = overlap(plain_NE, truth_NE, self.top_k)
        gram = self.gram_FF.double()
        cross = self.cross_FE.double()
        scale = float(gram.diagonal().mean())
        best: tuple[float, torch.Tensor] | None = None
        for strength in RIDGE:
            eye = torch.eye(self.num_features, dtype=torch.float64) * (strength * scale)
            # Positive definite (a Gram matrix plus a ridge): Cholesky, not a general solve (a refit of
            # the 4 strengths took 0.41 s against 0.46 s at d_model 2048 on 2 cores; it stalls a step).
            factor, info = torch.linalg.cholesky_ex(gram + eye)
            if int(info) != 0:
                continue
            delta_FE = torch.cholesky_solve(cross, factor).float()
            guess_NE = plain_NE + x_ND @ delta_FE[:-1] + delta_FE[-1]
            precision = overlap(guess_NE, truth_NE, self.top_k)
            if best is None or precision > best[0]:
                best = (precision, delta_FE)
        if best is None:
            return
        self.precision_fitted = best[0]
        if best[0] < self.precision_plain + MIN_GAIN:
            self.fitted = None
            return
        weight_ED, bias_E = router_linear(self.router)
        delta_FE = best[1]
        bias = delta_FE[-1] if bias_E is None else bias_E + delta_FE[-1]
        self.fitted = (weight_ED + delta_FE[:-1].T, bias)


class PredictorChain:
    """Each MoE layer's predictors of the next `depth` MoE layers of its stack (and each stack
    input's predictor of the stack's first MoE layer: `stack_input`), and the learning that pairs one
    call's input rows with the next layer call's (the same tokens: an MoE layer hands its provider
    its input rows in token order). Only the next layer's predictor learns."""

    def __init__(self, layers: Sequence[MoEFeedForward], *, depth: int = 1, learns: bool = True) -> None:
        self._ahead: dict[MoELayerKey, list[tuple[MoELayerKey, NextLayerPredictor]]] = {}
        # A stack's input predicts its first MoE layer (one layer ahead: the blocks before it are
        # the time there is; the next MoE layer is the first one's to predict).
        firsts: dict[str, MoEFeedForward] = {}
        for layer in layers:
            firsts.setdefault(layer.key.stack, layer)
        for first in firsts.values():
            self._ahead[stack_input(first.key.stack)] = [
                (first.key, NextLayerPredictor(first.router, first.moe.top_k, learns=learns))
            ]
        for i, current in enumerate(layers):
            following = [m for m in layers[i + 1 : i + 1 + depth] if m.key.stack == current.key.stack]
            self._ahead[current.key] = [
                (m.key, NextLayerPredictor(m.router, m.moe.top_k, learns=learns and d == 0))
                for d, m in enumerate(following)
            ]
        # The last layer call's input while its successor's predictor learns: (layer, its input rows).
        self._last_input: tuple[MoELayerKey, torch.Tensor] | None = None

    def ahead(self, layer: MoELayerKey) -> list[tuple[MoELayerKey, NextLayerPredictor]]:
        """The next MoE layers of `layer`'s stack and their predictors, nearest first."""
        return self._ahead.get(layer, [])

    def predicted_from_input(self, layer: MoELayerKey) -> bool:
        """Whether `layer` is predicted from its stack's input (it is the stack's first MoE layer)."""
        return any(key == layer for key, _ in self.ahead(stack_input(layer.stack)))

    def by_layer(self) -> dict[str, NextLayerPredictor]:
        """Each next-layer predictor, by the name of the layer it predicts."""
        return {str(ahead[0][0]): ahead[0][1] for ahead in self._ahead.values() if ahead}

    def observe(self, layer: MoELayerKey, hidden_ND: torch.Tensor) -> None:
        """Teach `layer`'s predictor with the previous call's input, if that was its predecessor's with
        the same rows; then keep this call's input while the next layer's predictor still learns."""
        last, self._last_input = self._last_input, None
        if last is not None and last[1].shape[0] == hidden_ND.shape[0]:
            ahead = self.ahead(last[0])
            if ahead and ahead[0][0] == layer:
                ahead[0][1].learn(last[1], hidden_ND)
        ahead = self.ahead(layer)
        if ahead and ahead[0][1].is_learning and hidden_ND.shape[0] > 0:
            self._last_input = (layer, hidden_ND)
