"""What a request joining or leaving the running batch costs the decoder cache.

    python -m bench.decoder_cache           # ~5 s; results/decoder_cache.json

The serving benchmark's shape (the `small` preset: 6 decoder layers, 8 heads of 64, a 100-token soft
prompt plus a 15-token input = 215 encoder positions, a cache of 64 positions), float32, B rows
running. `copy` is how the batch changed before slots (every tensor concatenated with the newcomer's
rows to join, `select` of the others to leave: every row's self- and cross-attention K/V copied);
`slots` is `DecoderState.add` / `remove`
(the newcomer written into a free slot; the last row moved into the leaver's slot). Medians of
`--repeats` fresh states.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from bench.machine import machine_info, publish
from engine.model.cache import DecoderState

LAYERS, HEADS, HEAD_DIM, SOURCE, CAPACITY = 6, 8, 64, 215, 64


def _state(rows: int, *, spare: int = 0) -> DecoderState:
    """A state of `rows` live rows (and `spare` free slots after them)."""

    def kv() -> list[torch.Tensor]:
        return [torch.randn(rows + spare, HEADS, SOURCE, HEAD_DIM) for _ in range(LAYERS)]

    state = DecoderState.allocate(
        cross_k=kv(), cross_v=kv(), cross_mask=torch.zeros(rows + spare, 1, 1, SOURCE), capacity=CAPACITY
    )
    state.lengths = [CAPACITY // 2] * (rows + spare)
    if spare:
        state.remove(list(range(rows, rows + spare)))
    return state


def _join_by_copy(state: DecoderState, newcomer: DecoderState) -> list[torch.Tensor]:
    """A join as it was before slots: every tensor rebuilt with the newcomer's rows after the batch's
    (same encoder length and cache capacity here, so nothing to pad)."""
    fields = ("self_k", "self_v", "cross_k", "cross_v")
    joined = [
        torch.cat([a, b]) for name in fields for a, b in zip(getattr(state, name), getattr(newcomer, name), strict=True)
    ]
    return [*joined, torch.cat([state.cross_mask, newcomer.cross_mask])]


def _median_ms(action: Callable[[], object], prepare: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        prepare()
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _record(num_rows: int, newcomer: DecoderState, repeats: int) -> dict[str, Any]:
    box: dict[str, DecoderState] = {}

    def fresh(spare: int = 0) -> None:
        box["state"] = _state(num_rows, spare=spare)

    middle = num_rows // 2
    rest = [i for i in range(num_rows) if i != middle]
    return {
        "rows": num_rows,
        "join_copy_ms": _median_ms(lambda: _join_by_copy(box["state"], newcomer), fresh, repeats),
        "join_slots_ms": _median_ms(lambda: box["state"].add(newcomer), lambda: fresh(spare=1), repeats),
        "leave_copy_ms": _median_ms(lambda: box["state"].select(rest), fresh, repeats),
        "leave_slots_ms": _median_ms(lambda: box["state"].remove([middle]), fresh, repeats),
        "row_kv_bytes": 2 * LAYERS * HEADS * HEAD_DIM * (SOURCE + CAPACITY) * 4,
    }


def measure(rows: Sequence[int], repeats: int) -> list[dict[str, Any]]:
    newcomer = _state(1)
    return [_record(num_rows, newcomer, repeats) for num_rows in rows]


def show(report: dict[str, Any], console: Console) -> None:
    table = Table(title="decoder cache: one request joining / leaving a batch of B rows (ms, median)")
    for column in ("B", "join: copy", "join: slots", "leave: copy", "leave: slots", "K/V per row"):
        table.add_column(column, justify="right")
    for r in report["records"]:
        table.add_row(
            str(r["rows"]),
            f"{r['join_copy_ms']:.2f}",
            f"{r['join_slots_ms']:.2f}",
            f"{r['leave_copy_ms']:.2f}",
            f"{r['leave_slots_ms']:.2f}",
            f"{r['row_kv_bytes'] / 2**20:.1f} MiB",
        )
    console.print(table)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.decoder_cache", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="B = 1 and 16, 3 repeats")
    parser.add_argument("--repeats", type=int, default=None, help="default 11; 3 with --quick")
    parser.add_argument("--out", type=Path, default=Path("bench/results/decoder_cache.json"))
    args = parser.parse_args(argv)
    rows = (1, 16) if args.quick else (1, 16, 64)
    out = args.out.with_suffix(".quick.json") if args.quick and argv is None else args.out
    with torch.inference_mode():
        records = measure(rows, args.repeats or (3 if args.quick else 11))
    report = {"benchmark": "decoder_cache", "machine": machine_info(), "records": records}
    publish(report, out=out, plot=None, show=show, draw=lambda _r, _p: None, width=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
