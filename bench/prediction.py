"""Next-layer expert prediction: the plain router against the calibrated predictor, call by call.

    python -m bench.prediction            # ~2 min; --quick: the demo model only, few examples

Prefetch guesses MoE layer L+1's experts from layer L's input (`engine.experts.provider`). This
benchmark scores both predictors the provider can use on the same stream of layer calls,
prequentially (each call is predicted before anything learns from it): `router` applies the next
layer's router to layer L's input; `calibrated` is `engine.experts.predictor.NextLayerPredictor`,
which learns a correction from the routes it has seen and keeps it only where held-out tokens say it
predicts better. Per call, predicted = the experts some token is guessed to pick (each token's
top-k), precision = predicted and needed / predicted, recall = predicted and needed / needed, the
provider's own definitions (`cpm2_expert_layer_predicted_used_total` etc.); over all calls, and over
the calls predicted while a fitted correction was in force (both predictors on the same calls).

Streams: the shipped demo model (trained routers) serving its four tasks with their prompts, greedy,
`batch` requests at a time; and the random-weight bench models (`bench.offload`'s Switch-like and
CPM-2-like checkpoints) decoding teacher-forced seeded random ids, several sequences one after
another. Resident experts: only the routing matters here, not where experts live.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from bench.cache_policies import serve_demo_tasks
from bench.machine import machine_info, publish
from bench.offload_common import load_cpm2, random_ids
from engine.experts.predictor import PredictorChain, stack_input
from engine.experts.provider import rank_experts
from engine.model import MoELayerKey
from engine.model.moe import ExpertDemand, MoEFeedForward

PREDICTORS = ("router", "calibrated")
#: The same two, on the calls predicted while a fitted correction was in force.
FITTED = ("router_while_fitted", "calibrated_while_fitted")


@dataclass
class Tally:
    predicted: int = 0
    used: int = 0
    needed: int = 0

    def add(self, guess: set[int], needed: set[int]) -> None:
        self.predicted += len(guess)
        self.used += len(guess & needed)
        self.needed += len(needed)

    def merge(self, other: Tally) -> None:
        self.predicted += other.predicted
        self.used += other.used
        self.needed += other.needed

    def rates(self) -> dict[str, float]:
        return {
            "precision": self.used / self.predicted if self.predicted else float("nan"),
            "recall": self.used / self.needed if self.needed else float("nan"),
        }


class PredictionScorer:
    """Wraps a model's MoE layers; scores both predictors on every layer call (a stack's first MoE
    layer predicted from the stack's input), then lets the calibrated one learn from it."""

    def __init__(self, layers: Sequence[MoEFeedForward]) -> None:
        self.layers = list(layers)
        self.chain = PredictorChain(self.layers)  # what the provider learns with, depth 1
        self.tallies: dict[str, dict[str, Tally]] = {}
        self._guesses: dict[MoELayerKey, tuple[dict[str, set[int]], bool]] = {}
        for layer in self.layers:
            layer.expert_provider = _Scoring(self, layer.expert_provider)

    def observe(self, layer: MoELayerKey, demand: Sequence[ExpertDemand], hidden_ND: torch.Tensor) -> None:
        made = self._guesses.pop(layer, None)
        if made is not None:
            guesses, was_fitted = made
            needed = {d.expert for d in demand}
            tallies = self.tallies.setdefault(str(layer), {name: Tally() for name in PREDICTORS + FITTED})
            for name, guess in guesses.items():
                tallies[name].add(guess, needed)
                if was_fitted:
                    tallies[f"{name}_while_fitted"].add(guess, needed)
        self.guess(layer, hidden_ND)

    def anticipate(self, layer: MoELayerKey, hidden_ND: torch.Tensor) -> None:
        """The stack's input ahead of its first MoE layer `layer` (`AnticipatingProvider`)."""
        self.guess(stack_input(layer.stack), hidden_ND)

    def guess(self, layer: MoELayerKey, hidden_ND: torch.Tensor) -> None:
        """Both predictors' guesses of the layer after `layer` (a MoE layer or a stack's input) from
        its input, then the calibrated one's learning from that input."""
        ahead = self.chain.ahead(layer)
        if ahead and hidden_ND.shape[0] > 0:
            next_key, predictor = ahead[0]
            guesses = {
                "router": rank_experts(predictor.plain_scores(hidden_ND), predictor.top_k)[0],
                "calibrated": rank_experts(predictor.scores(hidden_ND), predictor.top_k)[0],
            }
            self._guesses[next_key] = (guesses, predictor.fitted is not None)
        # Learns after predicting: each call is scored before anything has learnt from it.
        self.chain.observe(layer, hidden_ND)

    def report(self) -> dict[str, Any]:
        per_layer = {
            layer: {name: t.rates() for name, t in tallies.items()} for layer, tallies in sorted(self.tallies.items())
        }
        total = {name: Tally() for name in PREDICTORS + FITTED}
        for layer, tallies in self.tallies.items():
            if not layer.startswith("decoder"):
                continue  # encoder calls route many tokens each, so nearly every guess is needed
            for name, t in tallies.items():
                total[name].merge(t)
        fits = {
            layer: {
                "tokens_seen": p.tokens_seen,
                "fit_kept": p.fitted is not None,
                "heldout_precision_router": p.precision_plain,
                "heldout_precision_fitted": p.precision_fitted,
            }
            for layer, p in self.chain.by_layer().items()
        }
        return {"per_layer": per_layer, "decoder": {n: t.rates() for n, t in total.items()}, "fits": fits}

    def close(self) -> None:
        for layer in self.layers:
            if isinstance(layer.expert_provider, _Scoring):
                layer.expert_provider = layer.expert_provider.inner


@dataclass
class _Scoring:
    scorer: PredictionScorer
    inner: Any

    def anticipate(self, layer: MoELayerKey, hidden_ND: torch.Tensor) -> None:
        self.scorer.anticipate(layer, hidden_ND)

    def fetch(self, layer: MoELayerKey, demand: Sequence[ExpertDemand], hidden_ND: torch.Tensor) -> Iterator[Any]:
        self.scorer.observe(layer, demand, hidden_ND)
        yield from self.inner.fetch(layer, demand, hidden_ND)


def score_demo(demo_dir: Path, *, batch: int, examples_per_task: int) -> dict[str, Any]:
    """The demo model serving its tasks with their prompts, `batch` requests at a time, greedy."""
    scorer = serve_demo_tasks(
        demo_dir, lambda model: PredictionScorer(model.moe_layers()), batch=batch, examples_per_task=examples_per_task
    )
    return scorer.report()


def score_random(model_dir: Path, *, batch: int, steps: int, sequences: int, source_len: int = 32) -> dict[str, Any]:
    """`sequences` encoder passes, each followed by `steps` teacher-forced decode steps of random ids."""
    loaded = load_cpm2(model_dir, budget=None)
    model = loaded.model
    scorer = PredictionScorer(model.moe_layers())
    try:
        vocab = model.config.vocab_size
        with torch.inference_mode():
            for seq in range(sequences):
                ids = random_ids((batch, source_len), vocab=vocab, seed=2 * seq)
                valid = torch.ones_like(ids, dtype=torch.bool)
                state = model.start_decoding(model.encode(model.embed(ids), valid), valid, capacity=steps)
                forced = random_ids((steps, batch), vocab=vocab, seed=2 * seq + 1)
                for t in range(steps):
                    model.decode(model.embed(forced[t].unsqueeze(1)), state)
        return scorer.report()
    finally:
        scorer.close()
        loaded.close()


@dataclass
class PredictionBenchConfig:
    models: tuple[str, ...] = ("demo", "switch", "cpm2")
    batches: tuple[int, ...] = (1, 16)
    steps: int = 64
    sequences: int = 4
    demo_dir: Path = Path("models/demo")
    demo_examples: int = 64
    out: Path = Path("bench/results/prediction.json")
    log: Callable[[str], object] = field(default=print, repr=False)


def run(cfg: PredictionBenchConfig) -> dict[str, Any]:
    from bench.offload import MODELS

    report: dict[str, Any] = {
        "benchmark": "prediction",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k != "log"},
        "machine": machine_info(),
        "rows": [],
    }
    for name in cfg.models:
        for batch in cfg.batches:
            cfg.log(f"{name}: batch {batch}")
            if name == "demo":
                scores = score_demo(cfg.demo_dir, batch=batch, examples_per_task=cfg.demo_examples)
            else:
                # Batch 1 sees 16x fewer tokens a step; more sequences give its predictor as many.
                sequences = cfg.sequences * (4 if batch == 1 else 1)
                scores = score_random(MODELS[name](), batch=batch, steps=cfg.steps, sequences=sequences)
            report["rows"].append({"model": name, "batch": batch, **scores})
    return report


def _rates(rates: dict[str, float]) -> str:
    if rates["precision"] != rates["precision"]:  # NaN: no such call
        return ""
    return f"{rates['precision']:.2f} / {rates['recall']:.2f}"


def print_report(report: dict[str, Any], console: Console) -> None:
    table = Table(title="next-layer prediction, scored before learning (precision / recall)")
    columns = ("router", "calibrated", "router, fitted calls", "calibrated, fitted calls", "fit kept", "tokens")
    for col in ("model", "batch", "layer", *columns, "held-out r / fit"):
        table.add_column(col, justify="right")
    for row in report["rows"]:
        layers = {**row["per_layer"], "decoder": row["decoder"]}
        for layer, rates in layers.items():
            fit = row["fits"].get(layer, {})
            heldout = ""
            if fit.get("heldout_precision_router") is not None:
                heldout = f"{fit['heldout_precision_router']:.2f} / {fit['heldout_precision_fitted']:.2f}"
            table.add_row(
                row["model"],
                str(row["batch"]),
                layer,
                *(_rates(rates[n]) for n in PREDICTORS + FITTED),
                {True: "yes", False: "no"}.get(fit.get("fit_kept"), ""),
                str(fit.get("tokens_seen", "")),
                heldout,
            )
    console.print(table)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(PredictionBenchConfig.models))
    parser.add_argument("--steps", type=int, default=PredictionBenchConfig.steps)
    parser.add_argument("--demo-examples", type=int, default=PredictionBenchConfig.demo_examples)
    parser.add_argument("--demo-dir", type=Path, default=PredictionBenchConfig.demo_dir)
    parser.add_argument("--quick", action="store_true", help="the demo model only, 8 examples per task")
    parser.add_argument("--out", type=Path, default=PredictionBenchConfig.out)
    args = parser.parse_args(argv)
    cfg = PredictionBenchConfig(
        models=tuple(args.models),
        steps=args.steps,
        demo_dir=args.demo_dir,
        demo_examples=args.demo_examples,
        out=args.out,
    )
    if args.quick:
        cfg.models, cfg.out = ("demo",), args.out.with_suffix(".quick.json")
        cfg.demo_examples = min(cfg.demo_examples, 8)
    report = run(cfg)
    publish(report, out=cfg.out, plot=None, show=print_report, draw=lambda r, p: None, width=150)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
