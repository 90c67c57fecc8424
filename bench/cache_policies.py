"""Expert cache policies replayed on recorded routing traces, against Belady's offline optimum.

    python -m bench.cache_policies          # ~2 min on 2 cores; --quick for a smoke run

A trace is the sequence of MoE layer calls a model makes, each with the experts it needs, recorded
from the model itself (`engine.planner.recording.RoutingRecorder` wraps its expert providers; the
experts stay resident, only the routing is kept). Each trace is replayed through a pool of `slots`
experts shared by all layers, as the offloading provider's pool is: every expert a call needs is
looked up (hit) or brought in (miss), and while a call runs its own experts are never evicted (the
provider pins them). Policies:

- `lru`, `lfu` (ties by recency): the pool's two policies (`engine/experts/pool.py`);
- `lrfu`: each use adds weight 1 that halves every `half_life` expert uses (Lee et al.'s LRFU;
  between LRU, half-life 0, and LFU, infinite), a cache that remembers what a request used;
- `belady`: evict the expert whose next use is farthest away, the offline optimum no online policy
  can beat; its gap to each policy is what a better policy could still win.

Traces: the benchmark models of `bench.offload` (random weights, teacher-forced random tokens, as
their decode benchmarks run; batch 1 and 16), and the shipped demo model serving its four tasks
(its own trained routers, real prompts, greedy decoding, requests back to back at batch 1 and 16).
Budgets are shares of all the model's experts. Hit rates only: no timing is involved, so the result
is exact and repeatable.
"""

from __future__ import annotations

import argparse
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from bench.machine import machine_info, publish
from bench.offload_common import Call, load_cpm2, random_ids
from engine.experts.pool import LRFU_HALF_LIFE
from engine.model import Seq2SeqLM
from engine.planner.recording import RoutingRecorder
from engine.summary import summarize
from engine.weights.loader import inspect_checkpoint

POLICIES = ("lru", "lfu", "lrfu", "belady")


def replay(calls: Sequence[Call], slots: int, policy: str, *, half_life: float = LRFU_HALF_LIFE) -> float:
    """The hit rate of `policy` with `slots` experts on `calls` (every needed expert is one lookup)."""
    next_use = _next_uses(calls) if policy == "belady" else []
    # key -> (score, time of the score): LFU counts uses, LRFU's weight halves every `half_life`
    # calls; Belady's "score" is the key's next use. The dict's order is recency (LRU first).
    cache: OrderedDict[tuple[str, int], tuple[float, int]] = OrderedDict()
    hits = lookups = 0
    for t, (layer, experts) in enumerate(calls):
        now = {(layer, e) for e in experts}
        for i, key in enumerate((layer, e) for e in experts):
            lookups += 1  # the pool's clock: one tick per expert use
            if key in cache:
                hits += 1
            elif len(cache) >= slots:
                victims = [k for k in cache if k not in now]
                if not victims:
                    continue  # every slot holds an expert of this call: computed without caching
                del cache[_victim(cache, victims, policy, lookups, half_life)]
            score, at = cache.get(key, (0.0, lookups))
            if policy == "lfu":
                score += 1
            elif policy == "lrfu":
                score = score * 0.5 ** ((lookups - at) / half_life) + 1
            elif policy == "belady":
                score = next_use[t][i]
            cache[key] = (score, lookups)
            cache.move_to_end(key)
    return hits / lookups if lookups else 1.0


def _victim(
    cache: OrderedDict[tuple[str, int], tuple[float, int]],
    victims: list[tuple[str, int]],
    policy: str,
    t: int,
    half_life: float,
) -> tuple[str, int]:
    """`victims` are in recency order, so ties go to the least recently used."""
    if policy == "lru":
        return victims[0]
    if policy == "belady":
        return max(victims, key=lambda k: cache[k][0])  # needed again farthest in the future
    if policy == "lrfu":
        return min(victims, key=lambda k: cache[k][0] * 0.5 ** ((t - cache[k][1]) / half_life))
    return min(victims, key=lambda k: cache[k][0])


def _next_uses(calls: Sequence[Call]) -> list[list[float]]:
    """For each call and each of its experts, the index of the next call needing it (inf: never)."""
    following: dict[tuple[str, int], float] = {}
    out: list[list[float]] = [[] for _ in calls]
    for t in range(len(calls) - 1, -1, -1):
        layer, experts = calls[t]
        out[t] = [following.get((layer, e), math.inf) for e in experts]
        for e in experts:
            following[(layer, e)] = t
    return out


# ---- traces ----------------------------------------------------------------------------------------


@torch.inference_mode()
def random_model_trace(model_dir: Path, *, batch: int, steps: int, source_len: int = 32, seed: int = 0) -> list[Call]:
    """A bench model's encoder pass and `steps` teacher-forced decode steps on seeded random ids."""
    loaded = load_cpm2(model_dir, budget=None)
    model = loaded.model
    recorder = RoutingRecorder(model.moe_layers())
    try:
        vocab = model.config.vocab_size
        ids = random_ids((batch, source_len), vocab=vocab, seed=seed)
        valid = torch.ones_like(ids, dtype=torch.bool)
        state = model.start_decoding(model.encode(model.embed(ids), valid), valid, capacity=steps)
        forced = random_ids((steps, batch), vocab=vocab, seed=seed + 1)
        for t in range(steps):
            model.logits(model.decode(model.embed(forced[t].unsqueeze(1)), state))
        return recorder.calls
    finally:
        recorder.close()


def serve_demo_tasks(demo_dir: Path, watch: Callable[[Seq2SeqLM], Any], *, batch: int, examples_per_task: int) -> Any:
    """The demo model serving its tasks with their prompts, `batch` requests at a time, greedy;
    `watch(model)` wraps its layers first and returns a watcher with `close()`, which is returned."""
    from engine.prompts import parse_soft_prompt
    from training.demo import load_served
    from training.evaluate import evaluate_tasks
    from training.tasks import generate_task

    model, tokenizer = load_served(demo_dir)
    watcher = watch(model)
    try:
        for prompt_path in sorted((demo_dir / "prompts").glob("*.safetensors")):
            soft = parse_soft_prompt(
                prompt_path.read_bytes(),
                d_model=model.config.d_model,
                dtype=model.embed.weight.dtype,
                max_virtual_tokens=512,
            )
            examples = generate_task(prompt_path.stem, "test", num_examples=examples_per_task)
            evaluate_tasks(model, tokenizer, examples, prompt=soft, batch_size=batch, max_new_tokens=24)
        return watcher
    finally:
        watcher.close()


def demo_trace(demo_dir: Path, *, batch: int, examples_per_task: int) -> list[Call]:
    """The demo model's routing while it serves its tasks (`serve_demo_tasks`)."""
    recorder = serve_demo_tasks(
        demo_dir, lambda model: RoutingRecorder(model.moe_layers()), batch=batch, examples_per_task=examples_per_task
    )
    return list(recorder.calls)


def history_precision(calls: Sequence[Call], top_k: int) -> dict[str, float]:
    """How well a request's own history predicts the experts each decoder layer needs next (issue
    27's request-level prior, MoE-Infinity's traces), on a batch-1 trace (a request starts at an
    encoder call after decoder calls). From the second step on, each decoder layer call is
    predicted by the `top_k` experts that layer used most in the request so far (`most_used`; ties
    by first use) or by the ones it used at the last step (`last_step`); precision = predicted and
    needed / predicted. `seen_share`: the needed experts the request had already used at that layer."""
    hits = {"most_used": 0, "last_step": 0}
    predicted = {"most_used": 0, "last_step": 0}
    needed = seen = 0
    history: dict[str, dict[int, int]] = {}
    last: dict[str, tuple[int, ...]] = {}
    in_decoder = False
    for layer, experts in calls:
        if layer.startswith("encoder"):
            if in_decoder:  # a new request
                history, last, in_decoder = {}, {}, False
            continue
        in_decoder = True
        counts = history.setdefault(layer, {})
        if counts:
            guesses = {
                "most_used": set(sorted(counts, key=lambda e: -counts[e])[:top_k]),
                "last_step": set(last[layer]),
            }
            for name, guess in guesses.items():
                hits[name] += len(guess & set(experts))
                predicted[name] += len(guess)
            needed += len(experts)
            seen += len(set(counts) & set(experts))
        for e in experts:
            counts[e] = counts.get(e, 0) + 1
        last[layer] = experts
    precision = {name: hits[name] / predicted[name] if predicted[name] else math.nan for name in hits}
    return {**precision, "seen_share": seen / needed if needed else math.nan}


# ---- the benchmark --------------------------------------------------------------------------------


@dataclass
class CachePolicyBenchConfig:
    models: tuple[str, ...] = ("switch", "cpm2", "nllb-moe", "demo")
    batches: tuple[int, ...] = (1, 16)
    budgets: tuple[float, ...] = (0.10, 0.25, 0.50)
    steps: int = 64
    demo_dir: Path = Path("models/demo")
    demo_examples: int = 24
    half_life: float = LRFU_HALF_LIFE
    out: Path = Path("bench/results/cache_policies.json")
    log: Callable[[str], None] = print


def run(cfg: CachePolicyBenchConfig) -> dict[str, Any]:
    from bench.offload import MODELS

    report: dict[str, Any] = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k != "log"},
        "machine": machine_info(),
        "rows": [],
    }
    for name in cfg.models:
        model_dir = cfg.demo_dir if name == "demo" else MODELS[name]()
        info = inspect_checkpoint(model_dir)
        # Budgets are shares of all the model's experts (a trace may not touch every one).
        summary = summarize(info.config, info.stored_dtype)
        total = summary.num_moe_layers * summary.num_experts_per_layer
        for batch in cfg.batches:
            cfg.log(f"{name}: recording a batch-{batch} trace")
            if name == "demo":
                calls = demo_trace(model_dir, batch=batch, examples_per_task=cfg.demo_examples)
            else:
                calls = random_model_trace(model_dir, batch=batch, steps=cfg.steps)
            experts = {(layer, e) for layer, needed in calls for e in needed}
            top_k = info.config.moe.top_k if info.config.moe is not None else 1
            history = history_precision(calls, top_k) if batch == 1 else None
            for share in cfg.budgets:
                slots = max(1, round(share * total))
                rates = {p: replay(calls, slots, p, half_life=cfg.half_life) for p in POLICIES}
                report["rows"].append(
                    {
                        "model": name,
                        "batch": batch,
                        "budget": share,
                        "slots": slots,
                        "experts": total,
                        "distinct_experts_used": len(experts),
                        "calls": len(calls),
                        "lookups": sum(len(e) for _, e in calls),
                        "hit_rate": rates,
                        "gap_to_belady": {p: rates["belady"] - rates[p] for p in POLICIES if p != "belady"},
                        "history_precision": history,
                    }
                )
    return report


def print_report(report: dict[str, Any], console: Console) -> None:
    table = Table(title="expert cache hit rate by policy (gap to Belady's optimum)")
    for col in ("model", "batch", "budget", "slots", *POLICIES, "best online"):
        table.add_column(col, justify="right")
    for r in report["rows"]:
        rates, gaps = r["hit_rate"], r["gap_to_belady"]
        online = {p: rates[p] for p in POLICIES if p != "belady"}
        best = max(online, key=lambda p: online[p])
        table.add_row(
            r["model"],
            str(r["batch"]),
            f"{r['budget']:.0%}",
            str(r["slots"]),
            *[f"{rates[p]:.3f} ({-gaps[p]:+.3f})" for p in online],
            f"{rates['belady']:.3f}",
            best,
        )
    console.print(table)
    history = Table(title="request history as a predictor of the next decoder step's experts (batch 1)")
    for col in ("model", "most-used precision", "last-step precision", "needed already used"):
        history.add_column(col, justify="right")
    shown = set()
    for r in report["rows"]:
        h = r.get("history_precision")
        if h and r["model"] not in shown:
            shown.add(r["model"])
            history.add_row(r["model"], f"{h['most_used']:.2f}", f"{h['last_step']:.2f}", f"{h['seen_share']:.2f}")
    console.print(history)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(CachePolicyBenchConfig.models))
    parser.add_argument("--steps", type=int, default=CachePolicyBenchConfig.steps)
    parser.add_argument("--half-life", type=float, default=CachePolicyBenchConfig.half_life)
    parser.add_argument("--quick", action="store_true", help="short traces of the CPM-2 model only")
    parser.add_argument("--out", type=Path, default=CachePolicyBenchConfig.out)
    args = parser.parse_args(argv)
    cfg = CachePolicyBenchConfig(models=tuple(args.models), steps=args.steps, half_life=args.half_life, out=args.out)
    if args.quick:
        cfg = CachePolicyBenchConfig(
            models=("cpm2",), steps=8, demo_examples=4, out=args.out.with_suffix(".quick.json")
        )
    report = run(cfg)
    publish(report, out=cfg.out, plot=None, show=print_report, draw=lambda r, p: None, width=140)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
