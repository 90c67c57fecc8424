"""What choosing the next token costs a decode step: every row at once against a row at a time.

    python -m bench.sampling           # ~1 min; results/sampling.json

`per_row` is how `engine.generation.sampling.choose_tokens` chose before (a full log-softmax for the
log-probabilities; per sampled row: `warp`, whose top-p sorts the whole vocabulary, a softmax and
`torch.multinomial`); `batched` is `choose_tokens` now (one `warp_rows` for all sampled rows, top-p
found in a small top-k, one inverse-CDF draw per row, log-probabilities of the chosen tokens only).
Random float32 logits (x3) of a T5/CPM-2 vocabulary (32128) and NLLB's (256206), B rows all with the
same settings; medians of `--repeats` calls, milliseconds per decode step.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from bench.machine import add_rows_options, machine_info, median_ms, publish, rows_options
from engine.generation.params import SamplingParams
from engine.generation.sampling import TokenChooser, choose_tokens

VOCABS = (32128, 256206)
SETTINGS: dict[str, dict[str, Any]] = {
    "greedy": {},
    "temperature 0.8": {"temperature": 0.8},
    "top-p 0.9": {"top_p": 0.9},
    "top-k 50, top-p 0.9": {"top_k": 50, "top_p": 0.9},
}


def warp(scores_V: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The previous per-row warper: temperature, then top-k, then top-p (a sort of the whole vocabulary)
    on one row of float32 logits; removed tokens get -inf."""
    if params.temperature is not None and params.temperature not in (0.0, 1.0):
        scores_V = scores_V / params.temperature
    if params.top_k is not None and params.top_k < scores_V.shape[-1]:
        kth = torch.topk(scores_V, params.top_k).values[-1]
        scores_V = scores_V.masked_fill(scores_V < kth, -float("inf"))
    if params.top_p is not None and params.top_p < 1.0:
        sorted_V, order_V = torch.sort(scores_V, descending=False)
        cumulative_V = sorted_V.softmax(-1).cumsum(-1)
        remove_V = cumulative_V <= (1 - params.top_p)
        remove_V[-1] = False  # always keep the most likely token
        scores_V = scores_V.masked_fill(remove_V.scatter(0, order_V, remove_V), -float("inf"))
    return scores_V


def per_row(logits_BV: torch.Tensor, choosers: list[TokenChooser]) -> list[int]:
    """The previous `choose_tokens` (no penalties, no forced tokens): a row at a time."""
    logits_BV = logits_BV.float()
    logprobs_BV = torch.log_softmax(logits_BV, dim=-1)
    tokens_B = logits_BV.argmax(dim=-1)
    for i, chooser in enumerate(choosers):
        if chooser.generator is not None:
            probs_V = warp(logits_BV[i], chooser.params).softmax(-1)
            tokens_B[i] = int(torch.multinomial(probs_V, 1, generator=chooser.generator).item())
    logprobs_BV.gather(-1, tokens_B.unsqueeze(-1)).tolist()
    return tokens_B.tolist()


def measure(rows: Sequence[int], repeats: int, vocabs: Sequence[int] = VOCABS) -> list[dict[str, Any]]:
    records = []
    generator = torch.Generator().manual_seed(0)
    cpu = torch.device("cpu")
    for vocab in vocabs:
        for batch in rows:
            logits = torch.randn(batch, vocab, generator=generator) * 3
            for name, setting in SETTINGS.items():
                params = SamplingParams(**setting, seed=0) if setting else SamplingParams()
                choosers = [TokenChooser.create(params, start_token=0, device=cpu) for _ in range(batch)]
                before = median_ms(lambda: per_row(logits, choosers), repeats)  # noqa: B023
                now = median_ms(lambda: choose_tokens(logits, choosers), repeats)  # noqa: B023
                records.append(
                    {"vocab": vocab, "rows": batch, "setting": name, "per_row_ms": before, "batched_ms": now}
                )
    return records


def show(report: dict[str, Any], console: Console) -> None:
    table = Table(title="choosing the next token of B rows (ms per decode step, median)")
    for column in ("vocab", "B", "setting", "per row", "batched", "speed-up"):
        table.add_column(column, justify="right")
    for r in report["records"]:
        table.add_row(
            str(r["vocab"]),
            str(r["rows"]),
            r["setting"],
            f"{r['per_row_ms']:.2f}",
            f"{r['batched_ms']:.2f}",
            f"{r['per_row_ms'] / r['batched_ms']:.1f}x",
        )
    console.print(table)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sampling", description=__doc__.split("\n")[0])
    add_rows_options(parser, name="sampling", repeats=7)
    parser.add_argument("--vocab", type=int, nargs="+", default=list(VOCABS), help="vocabulary sizes")
    args = parser.parse_args(argv)
    rows, repeats, out = rows_options(args, argv)
    with torch.inference_mode():
        records = measure(rows, repeats, args.vocab)
    report = {
        "benchmark": "sampling",
        "machine": machine_info(),
        "threads": torch.get_num_threads(),
        "records": records,
    }
    publish(report, out=out, plot=None, show=show, draw=lambda _r, _p: None, width=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
