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
from collections.abc import Sequence
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from bench.machine import add_rows_options, machine_info, median_ms, publish, rows_options
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


def _record(num_rows: int, newcomer: DecoderState, repeats: int) -> dict[str, Any]:
    box: dict[str, DecoderState] = {}

    def fresh(spare: int = 0) -> None:
        box["state"] = _state(num_rows, spare=spare)

    middle = num_rows // 2
    rest = [i for i in range(num_rows) if i != middle]
    return {
        "rows": num_rows,
        "join_copy_ms": median_ms(lambda: _join_by_copy(box["state"], newcomer), repeats, prepare=fresh),
        "join_slots_ms": median_ms(lambda: box["state"].add(newcomer), repeats, prepare=lambda: fresh(spare=1)),
        "leave_copy_ms": median_ms(lambda: box["state"].select(rest), repeats, prepare=fresh),
        "leave_slots_ms": median_ms(lambda: box["state"].remove([middle]), repeats, prepare=fresh),
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
    add_rows_options(parser, name="decoder_cache", repeats=11)
    args = parser.parse_args(argv)
    rows, repeats, out = rows_options(args, argv)
    with torch.inference_mode():
        records = measure(rows, repeats)
    report = {"benchmark": "decoder_cache", "machine": machine_info(), "records": records}
    publish(report, out=out, plot=None, show=show, draw=lambda _r, _p: None, width=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
