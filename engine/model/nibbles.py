"""How int4 values sit two to a byte: the plain layout, and the layouts torch's CPU int4 matmul reads.

A (N, K) matrix of 4-bit values (0..15) takes N * K / 2 bytes in every layout; only the order
differs. `plain` is row-major with two neighbouring columns per byte (the low nibble the even one),
readable anywhere. torch's `_weight_int4pack_mm_for_cpu` reads the order its
`_convert_weight_to_int4pack_for_cpu` writes, which depends on the vector unit the kernel was built
for (aten/src/ATen/native/cpu/int4mm_kernel.cpp, `weight_to_int4pack_kernel`): rows are taken in
blocks of 64 (AVX512) or 32 (AVX2), each block stored column by column (K-major), and byte `j` of a
column holds row `j` of the block in its low nibble and row `j + 32` (AVX512: rows 0-15 / 32-47 in
the first 16 bytes, 16-31 / 48-63 in the next 16) or `j + 16` (AVX2) in its high one.

Storing experts in the layout the kernel reads means a blob read from disk is multiplied as it is,
with no repacking per transfer. The layouts are written here (not by calling torch's converter,
which needs the values as int32, 8x the bytes, and answers only for this machine's vector unit) so
a model can be packed for another machine, and unpacked anywhere; `engine.model.kernels` checks
that torch's converter agrees with `PACKING_BLOCK` on this machine before it trusts a packing.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

Packing = Literal["plain", "torch-avx512", "torch-avx2"]
PACKINGS: tuple[str, ...] = get_args(Packing)
#: Rows per block of each of torch's packings (the row count must be a multiple of it).
PACKING_BLOCK: dict[str, int] = {"torch-avx512": 64, "torch-avx2": 32}
_LANE = 16


def check_packing(packing: str) -> Packing:
    if packing not in PACKINGS:
        raise ValueError(f"int4 packing {packing!r} is not one of {', '.join(PACKINGS)}")
    return packing  # type: ignore[return-value]


def fits(packing: str, rows: int, cols: int) -> bool:
    """Whether a (rows, cols) matrix can be stored in `packing`."""
    return cols % 2 == 0 and rows % PACKING_BLOCK.get(packing, 1) == 0


def pack(values_NK: torch.Tensor, packing: Packing) -> torch.Tensor:
    """(N, K) integer values in 0..15 as (N, K // 2) uint8 in `packing`."""
    N, K = values_NK.shape
    if not fits(packing, N, K):
        raise ValueError(f"a ({N}, {K}) matrix cannot be packed as {packing}")
    v = values_NK.to(torch.uint8)
    if packing == "plain":
        return (v[:, 1::2] << 4 | v[:, 0::2]).contiguous()
    block = PACKING_BLOCK[packing]
    pairs = block // (2 * _LANE)
    v_BnLjK = v.view(N // block, 2, pairs, _LANE, K)  # (blocks, low/high nibble, lane pair, lane, K)
    bytes_BnPjK = v_BnLjK[:, 1] << 4 | v_BnLjK[:, 0]
    return bytes_BnPjK.permute(0, 3, 1, 2).contiguous().view(N, K // 2)


def unpack_transposed(packed: torch.Tensor, rows: int, cols: int, packing: Packing) -> torch.Tensor:
    """The (cols, rows) uint8 values of `unpack`, transposed, contiguous: torch's packings store each
    block column by column, so this order is the cheap one to produce from them (whole 32/64-row
    runs per column instead of a transpose of every byte)."""
    if packing == "plain":
        return unpack(packed, rows, cols, packing).t().contiguous()
    block = PACKING_BLOCK[packing]
    b_BKP = packed.reshape(rows // block, cols, block // 2)
    v_BKr = torch.stack((b_BKP & 15, b_BKP >> 4), dim=2).view(rows // block, cols, block)
    return v_BKr.permute(1, 0, 2).reshape(cols, rows)


def unpack(packed: torch.Tensor, rows: int, cols: int, packing: Packing) -> torch.Tensor:
    """The (rows, cols) uint8 values (0..15) of `rows * cols // 2` packed bytes (any shape)."""
    N, K = rows, cols
    b = packed.reshape(-1)
    if packing == "plain":
        return torch.stack((b & 15, b >> 4), dim=-1).view(N, K)
    block = PACKING_BLOCK[packing]
    pairs = block // (2 * _LANE)
    b_BKPj = b.view(N // block, K, pairs, _LANE)
    v_BKnPj = torch.stack((b_BKPj & 15, b_BKPj >> 4), dim=2)  # nibble before lane pair: row order
    return v_BKnPj.view(N // block, K, block).permute(0, 2, 1).reshape(N, K)
