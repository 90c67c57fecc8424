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

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench.int8_kernels import measure_rows, run_main
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
    native = kernels.active_kernels().int4_packing
    packing = native or "plain"
    records: list[dict[str, Any]] = []
    for shape in shapes:
        size = max(2, math.ceil(pool_mib * 2**20 / (shape[0] * shape[1] / 2)))
        generator = torch.Generator().manual_seed(shape[0] + shape[1])
        weights = [torch.randn(shape, generator=generator) * 0.02 for _ in range(size)]
        int4 = [quantize_int4(w, group_size=DEFAULT_GROUP_SIZE, packing=packing) for w in weights]
        for dtype in dtypes:
            log(f"{shape[0]}x{shape[1]} {str(dtype).removeprefix('torch.')}: pool of {size} weights, {packing} packing")
            pool = [{"int4": q, "float": w.to(dtype)} for q, w in zip(int4, weights, strict=True)]
            records += measure_rows(
                pool,
                fmt="int4",
                dtype=dtype,
                rows=rows,
                candidates=candidates(dtype, native),
                weight_bytes=lambda k, shape=shape, dtype=dtype: _weight_bytes(k, shape, dtype),
                engine_path=lambda n, dtype=dtype: str(kernels.active_kernels().int4_path(dtype, packing, rows=n)),
                repeats=repeats,
            )
            del pool
    return records


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(argv, fmt="int4", measure=measure, results=RESULTS, doc=__doc__ or "")


if __name__ == "__main__":
    raise SystemExit(main())
