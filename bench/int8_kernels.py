"""CPU kernels for int8 expert weights: µs per call, weight GB/s and error of each candidate.

`y = x @ (q * scale[:, None]).T` with `q` (out, in) int8 and one float32 scale per output row
(`engine.model.quant`), for the expert shapes of the bench models (d_model 512 / d_ff 2048 and
1024 / 4096, `wi` (F, D) and `wo` (D, F)), 1-256 rows (tokens per expert), float32 and bfloat16
activations. Candidates:

- `float`: the same weight unquantised in the activation dtype through cpm2's float expert path
  (oneDNN on the plain layout, `engine.model.linear`): what int8 saves or costs at 4x / 2x the bytes.
- `aten-deq`: `F.linear(x, W_deq)`: dequantise the whole matrix, then MKL (the naive fallback).
- `dequant`: cpm2's `dequant` path: `q` cast to the activation dtype (exact), the float path, row
  scales applied to the output.
- `int8pack`: `torch._weight_int8pack_mm` with `x` as it is; `int8pack-bf16` (float32 `x`): `x` cast
  to bfloat16 first. Reads one byte per weight.
- `bf16-onednn` (float32 `x`): `x` and `q` cast to bfloat16, oneDNN's bf16 matmul (AMX), scales after.
- `chunked`: `q` cast to bfloat16 in blocks of 512 output rows (kept in cache), one oneDNN call each.
- `w8a8`: cpm2's `w8a8` path: activations quantised per row to int8, `torch._int_mm` (int32),
  both scales after. Changes the numerics more (int8 activations; outliers in a row cost that row).
- `dyn-x86`: `quantized::linear_dynamic` (fbgemm/x86, uint8 activations per tensor). Needs a prepack
  per weight (`prepack_ms`), i.e. per expert load from the store.
- `qlinear`: `onednn::qlinear_pointwise` (uint8 activations per tensor) on a `qlinear_prepack`ed
  weight: also a prepack per weight.
- `engine`: `engine.model.quant.int8_linear`, the path chosen here (`engine.model.kernels`).

Weights rotate through a pool (`--pool-mib` of int8 per shape; the float copies are 2-4x that) so a
call reads its weight from memory, not from the previous call's cache, as an expert loaded from the
store does. Candidates are interleaved within each repeat; medians are reported. Errors are
max |y - ref| / max |ref| against `x @ W_deq.T` in float64; `int8 vs float` is the same measure
for the exact int8 product against the unquantised weight (what int8 itself costs). A candidate
more than `DROP_RATIO` slower than the best at some row count is not run at larger ones.

Run: `python -m bench.int8_kernels [--quick]` (~20 s on a 2-core Xeon; `--quick` ~8 s).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from bench.machine import CpuMeter, machine_info, publish
from engine.model import kernels
from engine.model.linear import linear
from engine.model.quant import _dequant, _w8a8, int8_linear, quantize_int8

RESULTS = Path("bench/results/int8_kernels.json")
SHAPES: tuple[tuple[int, int], ...] = ((2048, 512), (512, 2048), (4096, 1024), (1024, 4096))
ROWS: tuple[int, ...] = (1, 4, 8, 16, 64, 256)
DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16)
#: A candidate this many times slower than the best is not run at larger row counts.
DROP_RATIO = 8.0
CHUNK_ROWS = 512

Kernel = Callable[[torch.Tensor, dict[str, Any]], torch.Tensor]


def _onednn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return linear(x, w)


def _chunked(x: torch.Tensor, w: dict[str, Any]) -> torch.Tensor:
    q, scale = w["int8"].q, w["int8"].scale
    x16 = x.to(torch.bfloat16)
    parts = [_onednn(x16, q[i : i + CHUNK_ROWS].to(torch.bfloat16)) for i in range(0, q.shape[0], CHUNK_ROWS)]
    return (torch.cat(parts, dim=1) * scale).to(x.dtype)


def _dynamic(x: torch.Tensor, w: dict[str, Any]) -> torch.Tensor:
    return torch.ops.quantized.linear_dynamic(x.float(), w["dynamic"], True).to(x.dtype)


def _qlinear(x: torch.Tensor, w: dict[str, Any]) -> torch.Tensor:
    x32 = x.float()
    lo, hi = x32.min().clamp_max(0), x32.max().clamp_min(0)
    x_scale = float((hi - lo).clamp_min(1e-12) / 255)
    zero = int(torch.round(-lo / x_scale))
    xq = torch.clamp(torch.round(x32 / x_scale) + zero, 0, 255).to(torch.uint8)
    out_dtype = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32
    return torch.ops.onednn.qlinear_pointwise(
        xq, x_scale, zero, w["qlinear"], w["int8"].scale, w["zeros"], None, 1.0, 0, out_dtype, "none", [], ""
    )


def candidates(dtype: torch.dtype) -> dict[str, Kernel]:
    """The kernels measured for activations of `dtype` (each takes x and one pool entry)."""
    found: dict[str, Kernel] = {
        "float": lambda x, w: _onednn(x, w["float"]),
        "aten-deq": lambda x, w: F.linear(x, w["int8"].dequantize(x.dtype)),
        "dequant": lambda x, w: _dequant(x, w["int8"]).to(x.dtype),
        "int8pack": lambda x, w: torch._weight_int8pack_mm(x, w["int8"].q, w["int8"].scale.to(x.dtype)),
    }
    if dtype == torch.float32:
        found["int8pack-bf16"] = lambda x, w: torch._weight_int8pack_mm(
            x.to(torch.bfloat16), w["int8"].q, w["int8"].scale.to(torch.bfloat16)
        ).to(x.dtype)
        found["bf16-onednn"] = lambda x, w: (
            _onednn(x.to(torch.bfloat16), w["int8"].q.to(torch.bfloat16)) * w["int8"].scale
        ).to(x.dtype)
    found["chunked"] = _chunked
    found["w8a8"] = lambda x, w: _w8a8(x, w["int8"]).to(x.dtype)
    found["dyn-x86"] = _dynamic
    found["qlinear"] = _qlinear
    found["engine"] = lambda x, w: int8_linear(x, w["int8"])
    return found


def _make_pool(
    shape: tuple[int, int], *, size: int, dtype: torch.dtype, seed: int
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """`size` random weights of `shape` in every form the candidates read, and the prepack times (ms)."""
    generator = torch.Generator().manual_seed(seed)
    pool: list[dict[str, Any]] = []
    prepack: dict[str, list[float]] = {"dyn-x86": [], "qlinear": []}
    torch.backends.quantized.engine = "x86"
    for _ in range(size):
        w = torch.randn(shape, generator=generator) * 0.02
        int8 = quantize_int8(w)
        entry: dict[str, Any] = {"int8": int8, "float": w.to(dtype), "zeros": torch.zeros(shape[0], dtype=torch.long)}
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qw = torch._make_per_channel_quantized_tensor(int8.q, int8.scale.double(), entry["zeros"], 0)
        entry["dynamic"] = torch.ops.quantized.linear_prepack(qw, None)
        prepack["dyn-x86"].append(time.perf_counter() - start)
        start = time.perf_counter()
        entry["qlinear"] = torch.ops.onednn.qlinear_prepack(int8.q, None)
        prepack["qlinear"].append(time.perf_counter() - start)
        pool.append(entry)
    return pool, {name: 1e3 * statistics.median(t) for name, t in prepack.items()}


def error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max |y - ref| / max |ref|."""
    return float((y.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _weight_bytes(name: str, shape: tuple[int, int], dtype: torch.dtype) -> int:
    numel = shape[0] * shape[1]
    if name == "float":
        return numel * torch.empty((), dtype=dtype).element_size()
    return numel + 4 * shape[0]  # int8 values and float32 scales


def run_candidates(
    active: dict[str, Kernel],
    x: torch.Tensor,
    pool: list[dict[str, Any]],
    *,
    ref: torch.Tensor,
    repeats: int,
    dropped: set[str],
    weight_bytes: Callable[[str], float],
) -> dict[str, dict[str, float]]:
    """Each candidate's median µs, weight GB/s and error against `ref` (its first call, on `pool[0]`,
    is also the warm-up); candidates interleave within each repeat, each call on the next pool
    weight. Those `DROP_RATIO` slower than the best are added to `dropped` (not run at larger row
    counts)."""
    errors = {k: error(fn(x, pool[0]), ref) for k, fn in active.items()}
    times: dict[str, list[float]] = {k: [] for k in active}
    for r in range(repeats):
        for i, (k, fn) in enumerate(active.items()):
            w = pool[(1 + r * len(active) + i) % len(pool)]
            start = time.perf_counter()
            fn(x, w)
            times[k].append(time.perf_counter() - start)
    medians = {k: statistics.median(t) for k, t in times.items()}
    best = min(medians.values())
    dropped |= {k for k, t in medians.items() if t > DROP_RATIO * best and k not in ("float", "engine")}
    return {k: {"us": 1e6 * medians[k], "gb_s": weight_bytes(k) / medians[k] / 1e9, "error": errors[k]} for k in active}


def measure_rows(
    pool: list[dict[str, Any]],
    *,
    fmt: str,
    dtype: torch.dtype,
    rows: Sequence[int],
    candidates: dict[str, Kernel],
    weight_bytes: Callable[[str], float],
    engine_path: Callable[[int], str],
    repeats: int,
    extra: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """One record per row count for the weights of `pool` (entries hold the quantised weight under
    `fmt` and the float one under "float"): each candidate's µs, GB/s and error, what `fmt` itself
    costs against the float weight, and the path the engine takes."""
    shape = tuple(pool[0]["float"].shape)
    meter = CpuMeter()
    dropped: set[str] = set()
    records = []
    for num_rows in rows:
        x = torch.randn(num_rows, shape[1], generator=torch.Generator().manual_seed(num_rows)).to(dtype)
        ref = x.double() @ pool[0][fmt].dequantize().double().T
        float_ref = x.double() @ pool[0]["float"].double().T
        active = {k: fn for k, fn in candidates.items() if k not in dropped}
        meter.start()
        measured = run_candidates(active, x, pool, ref=ref, repeats=repeats, dropped=dropped, weight_bytes=weight_bytes)
        records.append(
            {
                "shape": list(shape),
                "dtype": str(dtype).removeprefix("torch."),
                "rows": num_rows,
                "engine_path": engine_path(num_rows),
                f"{fmt}_vs_float_error": error(ref, float_ref),
                **(extra or {}),
                "foreign_cpu_share": meter.foreign_share(),
                "candidates": measured,
            }
        )
    return records


@torch.inference_mode()
def measure(
    *,
    shapes: Sequence[tuple[int, int]],
    rows: Sequence[int],
    dtypes: Sequence[torch.dtype],
    repeats: int,
    pool_mib: float,
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    """One record per (shape, dtype, rows): each candidate's median µs, GB/s and error."""
    records: list[dict[str, Any]] = []
    for shape in shapes:
        size = max(2, math.ceil(pool_mib * 2**20 / (shape[0] * shape[1])))
        for dtype in dtypes:
            log(f"{shape[0]}x{shape[1]} {str(dtype).removeprefix('torch.')}: pool of {size} weights")
            pool, prepack_ms = _make_pool(shape, size=size, dtype=dtype, seed=shape[0] + shape[1])
            records += measure_rows(
                pool,
                fmt="int8",
                dtype=dtype,
                rows=rows,
                candidates=candidates(dtype),
                weight_bytes=lambda k, shape=shape, dtype=dtype: _weight_bytes(k, shape, dtype),
                engine_path=lambda n, dtype=dtype: str(kernels.active_kernels().int8_path(dtype, n)),
                repeats=repeats,
                extra={"prepack_ms": prepack_ms},
            )
            del pool
    return records


def show(report: dict[str, Any], console: Console) -> None:
    records = report["records"]
    for dtype in dict.fromkeys(r["dtype"] for r in records):
        subset = [r for r in records if r["dtype"] == dtype]
        names = list(dict.fromkeys(k for r in subset for k in r["candidates"]))
        table = Table(
            title=f"{dtype} activations: µs per call (median) / weight GB/s; engine = {subset[0]['engine_path']}"
        )
        table.add_column("out×in")
        table.add_column("rows", justify="right")
        for k in names:
            table.add_column(k, justify="right")
        for r in subset:
            cells = r["candidates"]
            best = min(c["us"] for k, c in cells.items() if k != "engine")
            row = []
            for k in names:
                c = cells.get(k)
                text = "—" if c is None else f"{c['us']:.0f} / {c['gb_s']:.1f}"
                row.append(f"[bold]{text}[/bold]" if c is not None and c["us"] == best else text)
            table.add_row(f"{r['shape'][0]}×{r['shape'][1]}", str(r["rows"]), *row)
        console.print(table)
        errors = Table(
            title=f"{dtype}: max |y - ref| / max |ref| against x @ W_deq.T (float64), worst over shapes and rows"
        )
        fmt = report.get("format", "int8")
        errors.add_column(f"{fmt} vs float W")
        for k in names:
            errors.add_column(k, justify="right")
        worst = {
            k: max((r["candidates"][k]["error"] for r in subset if k in r["candidates"]), default=float("nan"))
            for k in names
        }
        own_error = max(r[f"{fmt}_vs_float_error"] for r in subset)
        errors.add_row(f"{own_error:.2e}", *(f"{worst[k]:.1e}" for k in names))
        console.print(errors)
    prepack = {f"{r['shape'][0]}×{r['shape'][1]}": r["prepack_ms"] for r in records if "prepack_ms" in r}
    if not prepack:
        return
    console.print(
        "prepack per weight (ms, i.e. per expert load): "
        + ", ".join(f"{s}: " + ", ".join(f"{k} {v:.1f}" for k, v in p.items()) for s, p in prepack.items())
    )


Measure = Callable[..., list[dict[str, Any]]]


def run_main(argv: Sequence[str] | None, *, fmt: str, measure: Measure, results: Path, doc: str) -> int:
    """The command line of a weight-format kernel benchmark (`bench.int8_kernels`, `bench.int4_kernels`)."""
    parser = argparse.ArgumentParser(prog=f"python -m bench.{fmt}_kernels", description=doc.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1024/4096 shapes, rows 1,16,256, 5 repeats (~15 s)")
    parser.add_argument("--repeats", type=int, default=None, help="default 15; 5 with --quick")
    parser.add_argument(
        "--pool-mib", type=float, default=64.0, help=f"{fmt} MiB of weights rotated per shape (default 64)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help=f"JSON path (default {results}; .quick.json with --quick)"
    )
    args = parser.parse_args(argv)
    console = Console(width=200)
    started = time.perf_counter()
    records = measure(
        shapes=SHAPES[2:] if args.quick else SHAPES,
        rows=(1, 16, 256) if args.quick else ROWS,
        dtypes=DTYPES,
        repeats=args.repeats or (5 if args.quick else 15),
        pool_mib=args.pool_mib,
        log=lambda msg: console.print(f"[dim]{msg}[/dim]"),
    )
    report = {
        "command": " ".join([f"python -m bench.{fmt}_kernels", *(argv if argv is not None else [])]),
        "format": fmt,
        "machine": machine_info(),
        "kernels": kernels.describe(),
        "seconds": time.perf_counter() - started,
        "records": records,
    }
    out = args.out or (results.with_suffix(".quick.json") if args.quick else results)
    publish(report, out=out, plot=None, show=show, draw=lambda _r, _p: None, width=200)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(argv, fmt="int8", measure=measure, results=RESULTS, doc=__doc__ or "")


if __name__ == "__main__":
    raise SystemExit(main())
