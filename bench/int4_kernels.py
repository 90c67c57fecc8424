"""CPU kernels for int4 expert weights: µs per call, weight GB/s and error of each candidate.

`y = x @ W_deq.T` with `W` group-wise int4 (`engine.model.int4`: a bfloat16 scale and zero per 64
inputs, values packed in this machine's kernel layout), for the expert shapes of
`bench.int8_kernels`, 1-256 rows, float32 and bfloat16 activations. Candidates:

- `float`: the same weight unquantised in the activation dtype through cpm2's float expert path
  (oneDNN on the plain layout): what int4 saves or costs at 8x / 4x the bytes.
- `int4pack`: `torch._weight_int4pack_mm_for_cpu` with `x` as it is (its float32 variant is the
  slow reference loop); `int4pack-bf16` (float32 `x`): `x` cast to bfloat16 first.
- `dequant-bf16`: cpm2's many-rows path: the weight dequantised into bfloat16 along its stored
  order (`Int4Weight.dequantize_transposed`), then a bf16 matmul.
- `dequant`: cpm2's `dequant` path: the weight unpacked and dequantised into the activation dtype,
  then the float matmul (what a model packed for another CPU, `--cpu-kernels plain` and CUDA run).
- `engine`: `engine.model.int4.int4_linear`, the path chosen here (`engine.model.kernels`).

Weights rotate through a pool as in `bench.int8_kernels` (a call reads its weight from memory, as an
expert loaded from the store does); candidates interleave within each repeat; medians. Errors are
max |y - ref| / max |ref| against `x @ W_deq.T` in float64; `int4 vs float` is the exact int4
product against the unquantised weight (what int4 itself costs).

Run: `python -m bench.int4_kernels [--quick]` (~30 s on a 2-core Xeon; `--quick` ~10 s).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console

from bench.int8_kernels import DTYPES, ROWS, SHAPES, error, run_candidates, show
from bench.machine import CpuMeter, machine_info, publish
from engine.model import kernels
from engine.model.int4 import DEFAULT_GROUP_SIZE, Int4Weight, int4_linear, quantize_int4
from engine.model.linear import linear

RESULTS = Path("bench/results/int4_kernels.json")

Kernel = Callable[[torch.Tensor, dict[str, Any]], torch.Tensor]


def _int4pack(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    return torch._weight_int4pack_mm_for_cpu(x, w.packed, w.group_size, w.scale_zero.to(x.dtype))


def candidates(dtype: torch.dtype, packing: str | None) -> dict[str, Kernel]:
    """The kernels measured for activations of `dtype` (each takes x and one pool entry)."""
    found: dict[str, Kernel] = {"float": lambda x, w: linear(x, w["float"])}
    if packing is not None:
        found["int4pack"] = lambda x, w: _int4pack(x, w["int4"])
        if dtype == torch.float32:
            found["int4pack-bf16"] = lambda x, w: _int4pack(x.to(torch.bfloat16), w["int4"]).to(x.dtype)
        found["dequant-bf16"] = lambda x, w: torch.matmul(
            x.to(torch.bfloat16), w["int4"].dequantize_transposed(torch.bfloat16)
        ).to(x.dtype)
    found["dequant"] = lambda x, w: F.linear(x, w["int4"].dequantize(x.dtype))
    found["engine"] = lambda x, w: int4_linear(x, w["int4"])
    return found


def _weight_bytes(name: str, shape: tuple[int, int], dtype: torch.dtype) -> float:
    numel = shape[0] * shape[1]
    if name == "float":
        return numel * torch.empty((), dtype=dtype).element_size()
    return numel / 2 + 4 * numel / DEFAULT_GROUP_SIZE  # packed values, bf16 scale and zero per group


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
    packing = kernels.active_kernels().int4_packing
    records: list[dict[str, Any]] = []
    meter = CpuMeter()
    for shape in shapes:
        size = max(2, math.ceil(pool_mib * 2**20 / (shape[0] * shape[1] / 2)))
        generator = torch.Generator().manual_seed(shape[0] + shape[1])
        weights = [torch.randn(shape, generator=generator) * 0.02 for _ in range(size)]
        int4 = [quantize_int4(w, group_size=DEFAULT_GROUP_SIZE, packing=packing or "plain") for w in weights]
        for dtype in dtypes:
            name = str(dtype).removeprefix("torch.")
            log(f"{shape[0]}x{shape[1]} {name}: pool of {size} weights, {packing or 'plain'} packing")
            pool = [{"int4": q, "float": w.to(dtype)} for q, w in zip(int4, weights, strict=True)]
            w0 = pool[0]
            dropped: set[str] = set()
            for num_rows in rows:
                x = torch.randn(num_rows, shape[1], generator=torch.Generator().manual_seed(num_rows)).to(dtype)
                ref = x.double() @ w0["int4"].dequantize().double().T
                float_ref = x.double() @ w0["float"].double().T
                active = {k: fn for k, fn in candidates(dtype, packing).items() if k not in dropped}
                meter.start()
                measured = run_candidates(
                    active,
                    x,
                    pool,
                    ref=ref,
                    repeats=repeats,
                    dropped=dropped,
                    weight_bytes=lambda k, shape=shape, dtype=dtype: _weight_bytes(k, shape, dtype),
                )
                records.append(
                    {
                        "shape": list(shape),
                        "dtype": name,
                        "rows": num_rows,
                        "engine_path": str(
                            kernels.active_kernels().int4_path(dtype, packing or "plain", rows=num_rows)
                        ),
                        "int4_vs_float_error": error(ref, float_ref),
                        "foreign_cpu_share": meter.foreign_share(),
                        "candidates": measured,
                    }
                )
            del pool
    return records


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.int4_kernels", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1024/4096 shapes, rows 1,16,256, 5 repeats")
    parser.add_argument("--repeats", type=int, default=None, help="default 15; 5 with --quick")
    parser.add_argument("--pool-mib", type=float, default=64.0, help="int4 MiB of weights rotated per shape")
    parser.add_argument("--out", type=Path, default=None, help=f"JSON path (default {RESULTS})")
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
        "command": " ".join(["python -m bench.int4_kernels", *(argv if argv is not None else [])]),
        "format": "int4",
        "machine": machine_info(),
        "kernels": kernels.describe(),
        "seconds": time.perf_counter() - started,
        "records": records,
    }
    out = args.out or (RESULTS.with_suffix(".quick.json") if args.quick else RESULTS)
    publish(report, out=out, plot=None, show=show, draw=lambda _r, _p: None, width=200)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
