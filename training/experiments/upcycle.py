"""Upcycled MoE vs continuing the dense model, at equal steps (CPM-2-MoE's recipe, SEED.md).

    python -m training.experiments.upcycle [--dense-steps 200] [--steps 200] [--work-dir DIR]

1. A small dense model (d_model 64, 2+2 layers, d_ff 128: the `tiny` shape without MoE) is
   pretrained with span corruption (`cpm2 train pretrain`'s job) on generated documents (seed 0).
2. From that checkpoint, two runs of `--steps` steps see the same new documents (seed 1), batches,
   optimizer (fresh AdamW) and schedule: (a) the dense model continues (`pretrain` job); (b) the
   model is upcycled (`cpm2 train upcycle`'s job): 8 experts per FFN in every block, each a copy of
   the dense FFN, frozen orthogonal centroids (gain 0.01), balanced (BASE-layer) training routing.
3. Reported at equal steps: the training LM loss (a trailing mean; every batch is new, so it is a
   held-out loss when computed) and the loss on fixed held-out batches (documents of another seed)
   in eval mode, where the MoE routes by argmax as it will when served. Results go to
   bench/results/upcycle.json and docs/upcycle.png.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from engine.tokenizer import load_tokenizer
from engine.weights.init import write_random_model
from engine.weights.loader import load_model
from engine.weights.presets import get_preset
from training.config import parse_job_config
from training.jobs.pretrain import PretrainConfig, held_out_eval_fn, pretrain
from training.jobs.upcycle import UpcycleConfig, upcycle
from training.metrics_log import read_metrics

DENSE = get_preset("tiny").config.replace(moe=None)
SPAN = {"encoder_length": 64, "decoder_length": 16}
SMOOTHING = 20
"""Steps in the trailing mean applied to the training-loss curves."""
NUM_EXPERTS = 8


def _common(out: Path, *, model_dir: Path, steps: int, seed: int, lr: float) -> dict[str, Any]:
    return {
        "model": {"dir": str(model_dir)},
        "optimizer": {"lr": lr},
        "schedule": {"name": "linear", "warmup_steps": 20, "min_lr_ratio": 0.1},
        "steps": steps,
        "batch_size": 16,
        "seed": seed,
        "log_every": 1,
        "eval_every": max(steps // 5, 1),
        "held_out": {"num_batches": 4},
        "span": SPAN,
        "output_dir": str(out),
        "progress": False,
    }


def _curves(run: Path) -> tuple[list[int], list[float], dict[int, float]]:
    records = read_metrics(run / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    steps = [int(r["step"]) for r in train]
    # `lm_loss` (the MoE run's loss without auxiliary terms) when logged, else the loss itself.
    losses = [float(r.get("lm_loss", r["loss"])) for r in train]
    held_out = {int(r["step"]): float(r["eval_loss"]) for r in records if "eval_loss" in r}
    return steps, losses, held_out


def _smooth(values: list[float]) -> list[float]:
    return [
        sum(values[max(0, i - SMOOTHING + 1) : i + 1]) / (i + 1 - max(0, i - SMOOTHING + 1)) for i in range(len(values))
    ]


def held_out_losses(config: PretrainConfig, models: dict[str, Path]) -> dict[str, float]:
    """Held-out loss of each model dir on `config`'s held-out batches; MoE models are scored with
    argmax (inference) routing and, as `<name>_train_routing`, with their training routing."""
    eval_fn = held_out_eval_fn(config, load_tokenizer(next(iter(models.values()))))
    assert eval_fn is not None  # held_out.num_batches > 0 in `_common`
    losses: dict[str, float] = {}
    for name, model_dir in models.items():
        model, _ = load_model(model_dir, pack=False)
        with torch.no_grad():
            losses[name] = eval_fn(model.eval(), 0)["loss"]
            if model.moe_layers():
                for layer in model.moe_layers():
                    layer.train()  # training-mode routing only: the model has no dropout here
                losses[f"{name}_train_routing"] = eval_fn(model, 0)["loss"]
    return losses


def run(*, dense_steps: int, steps: int, work: Path) -> dict[str, Any]:
    """Run the three trainings under `work`; returns the results."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    init_dir = work / "dense-init"
    if not (init_dir / "config.json").exists():
        write_random_model(DENSE, init_dir, progress=False)
    base = pretrain(
        parse_job_config(
            _common(work / "dense", model_dir=init_dir, steps=dense_steps, seed=0, lr=2e-3), PretrainConfig
        )
    )
    timings["dense_pretrain_s"] = time.perf_counter() - start

    runs = {"dense": work / "continue-dense", "moe": work / "upcycled-moe"}
    start = time.perf_counter()
    pretrain(parse_job_config(_common(runs["dense"], model_dir=base, steps=steps, seed=1, lr=1e-3), PretrainConfig))
    timings["continue_dense_s"] = time.perf_counter() - start
    start = time.perf_counter()
    raw = _common(runs["moe"], model_dir=base, steps=steps, seed=1, lr=1e-3)
    raw["upcycle"] = {"num_experts": NUM_EXPERTS, "train_routing": "balanced"}
    upcycle(parse_job_config(raw, UpcycleConfig))
    timings["upcycled_moe_s"] = time.perf_counter() - start

    held_out_config = parse_job_config(
        _common(runs["moe"], model_dir=base, steps=steps, seed=1, lr=1e-3), PretrainConfig
    )
    final = held_out_losses(
        held_out_config, {"start": base, "dense": runs["dense"] / "model", "moe": runs["moe"] / "model"}
    )
    curves = {name: _curves(path) for name, path in runs.items()}
    table = []
    for step in sorted(curves["dense"][2]):
        row: dict[str, Any] = {"step": step}
        for name, (steps_, losses, held_out) in curves.items():
            row[f"{name}_train_loss"] = _smooth(losses)[steps_.index(step)]
            row[f"{name}_held_out_loss"] = held_out.get(step)
        table.append(row)
    return {
        "setup": {
            "dense_model": {"d_model": DENSE.d_model, "layers": "2+2", "d_ff": DENSE.d_ff, "vocab": DENSE.vocab_size},
            "num_experts": NUM_EXPERTS,
            "moe_layers": "every FFN (4)",
            "train_routing": "balanced",
            "dense_pretrain_steps": dense_steps,
            "compared_steps": steps,
            "batch_size": 16,
            "span": SPAN,
            "smoothing_steps": SMOOTHING,
        },
        "table": table,
        "held_out_start_and_final": final,
        "curves": {name: {"steps": c[0], "train_loss": c[1], "held_out": c[2]} for name, c in curves.items()},
        "timings": timings,
    }


def plot(results: dict[str, Any], path: Path) -> None:
    """Training loss (smoothed) and held-out loss of both runs against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    labels = {"dense": "continue dense", "moe": f"upcycled MoE ({NUM_EXPERTS} experts, balanced)"}
    for name, curve in results["curves"].items():
        axes[0].plot(curve["steps"], _smooth(curve["train_loss"]), label=labels[name])
        # Step 0: both runs start from the same function (the upcycled MoE computes the dense one).
        start = [(0, results["held_out_start_and_final"]["start"])]
        held = start + sorted((int(k), v) for k, v in curve["held_out"].items())
        axes[1].plot([s for s, _ in held], [v for _, v in held], marker="o", label=labels[name])
    axes[0].set(title=f"training LM loss (trailing mean of {SMOOTHING})", xlabel="step after upcycling", ylabel="loss")
    axes[1].set(title="held-out loss (eval mode: argmax routing)", xlabel="step after upcycling", ylabel="loss")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dense-steps", type=int, default=200)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=Path("bench/results/upcycle.json"))
    parser.add_argument("--plot", type=Path, default=Path("docs/upcycle.png"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = run(dense_steps=args.dense_steps, steps=args.steps, work=args.work_dir or Path(tmp))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1) + "\n")
    plot(results, args.plot)
    print(f"{'step':>5} {'dense train':>12} {'MoE train':>10} {'dense held-out':>15} {'MoE held-out':>13}")
    for row in results["table"]:
        print(
            f"{row['step']:>5} {row['dense_train_loss']:>12.4f} {row['moe_train_loss']:>10.4f} "
            f"{row['dense_held_out_loss']:>15.4f} {row['moe_held_out_loss']:>13.4f}"
        )
    print("held-out loss at the start and the end:", json.dumps(results["held_out_start_and_final"]))
    print(json.dumps(results["timings"]))


if __name__ == "__main__":
    main()
