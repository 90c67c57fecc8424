"""Report of a `cpm2 train pretrain` run: loss curves, held-out span filling, JSON and a plot.

Run after the job (`cpm2 train pretrain --config training/configs/pretrain.yaml`):

    python -m bench.pretrain_report --config training/configs/pretrain.yaml

Held-out span filling: span-corrupted chunks of documents the run never trained on (the config's
held-out documents) are decoded greedily, by the exported model and by its untrained initialisation,
and compared with the true targets (every masked span behind its sentinel): exact match of the whole
target, and accuracy of the target tokens position by position.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from bench.machine import machine_info, publish
from engine.generation import GenerationRequest, Generator, SamplingParams
from engine.model import Seq2SeqLM
from engine.tokenizer import Tokenizer, load_tokenizer
from engine.weights.loader import load_model
from training.config import load_job_config
from training.job import DataShard, build_model
from training.jobs.pretrain import PretrainConfig, build_batches
from training.plot import plot_metrics


def span_filling(
    model: Seq2SeqLM, tokenizer: Tokenizer, pairs: list[tuple[list[int], list[int]]], *, max_new_tokens: int
) -> dict[str, Any]:
    """Exact match and positional token accuracy of greedy targets for span-corrupted `pairs`."""
    params = SamplingParams(max_new_tokens=max_new_tokens)
    results = Generator(model, tokenizer).generate([GenerationRequest(tuple(i), params) for i, _ in pairs])
    exact = sum(r.token_ids == t for r, (_, t) in zip(results, pairs, strict=True))
    hits = sum(a == b for r, (_, t) in zip(results, pairs, strict=True) for a, b in zip(r.token_ids, t, strict=False))
    total = sum(len(t) for _, t in pairs)
    samples = [
        {
            "input": tokenizer.decode(i, skip_special=False),
            "target": tokenizer.decode(t, skip_special=False),
            "output": tokenizer.decode(r.token_ids, skip_special=False),
        }
        for r, (i, t) in list(zip(results, pairs, strict=True))[:3]
    ]
    return {"exact_match": exact / len(pairs), "token_accuracy": hits / total, "samples": samples}


def build_report(config: PretrainConfig, *, num_examples: int) -> dict[str, Any]:
    run = config.output_dir
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    model_dir = config.export_dir or run / "model"
    tokenizer = load_tokenizer(model_dir)
    trained, _ = load_model(model_dir, dtype="float32", pack=False)
    initial = build_model(config.model, torch.device("cpu")).eval()
    shard = DataShard(rank=0, world_size=1, micro_batch_size=1, seed=config.seed)
    stream = build_batches(config, shard, tokenizer, held_out=True).stream
    pairs = [next(stream) for _ in range(num_examples)]
    with torch.no_grad():
        filled = {
            name: span_filling(model, tokenizer, pairs, max_new_tokens=config.span.decoder_length)
            for name, model in (("initial", initial), ("trained", trained))
        }
    return {
        "machine": machine_info(),
        "config": json.loads(config.model_dump_json()),
        "steps": train[-1]["step"],
        "tokens": train[-1]["tokens"],
        "train_seconds": train[-1]["elapsed"],
        "first_logged_loss": {"step": train[0]["step"], "loss": train[0]["loss"]},
        "final_loss": train[-1]["loss"],
        "final_accuracy": train[-1]["accuracy"],
        "eval": [{"step": r["step"], "loss": r["eval_loss"], "accuracy": r["eval_accuracy"]} for r in evals],
        "held_out_span_filling": {"num_examples": num_examples, **filled},
    }


def show(report: dict[str, Any], console: Console) -> None:
    table = Table(title=f"pretraining: {report['steps']} steps, {report['tokens']:,} tokens")
    for column in ("step", "held-out loss", "held-out token acc."):
        table.add_column(column, justify="right")
    for row in report["eval"]:
        table.add_row(str(row["step"]), f"{row['loss']:.3f}", f"{row['accuracy']:.3f}")
    console.print(table)
    filling = report["held_out_span_filling"]
    for name in ("initial", "trained"):
        result = filling[name]
        console.print(
            f"span filling ({name}): exact match {result['exact_match']:.3f}, "
            f"token accuracy {result['token_accuracy']:.3f} on {filling['num_examples']} held-out chunks"
        )


def draw(config: PretrainConfig, out: Path) -> Path:
    log = config.output_dir / "metrics.jsonl"
    plot_metrics([log], out, metrics=["*loss", "*accuracy"], labels=["tiny"], title="span-corruption pretraining")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("training/configs/pretrain.yaml"))
    parser.add_argument("--examples", type=int, default=128, help="held-out chunks decoded")
    parser.add_argument("--json", type=Path, default=Path("bench/results/pretrain.json"))
    parser.add_argument("--plot", type=Path, default=None, help="also draw the curves (as `cpm2 plot` does)")
    args = parser.parse_args()
    config = load_job_config(args.config, PretrainConfig)
    report = build_report(config, num_examples=args.examples)
    publish(report, out=args.json, plot=args.plot, show=show, draw=lambda _, p: draw(config, p), width=100)


if __name__ == "__main__":
    main()
