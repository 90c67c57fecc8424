"""Int4 weights: group-wise asymmetric quantisation, and the one matmul that runs them.

A weight `W` (N out, K in) is cut into groups of `group_size` consecutive inputs per row; each group
keeps a scale `s` and a zero `z` (bfloat16) and its values as 4-bit integers `q` in 0..15 with
`W ≈ (q - 8) * s + z`, `s = (max - min) / 15` and `z = min + 8 s` of the group: torch's int4
weight-only matmul format (the one torchao's int4 weight-only quantisation writes), which MoQE and
mixtral-offloading's HQQ experts resemble (per-group scales and zero points, no retraining). The
values are packed two to a byte in a layout `engine.model.nibbles` names; scales and zeros sit as
`(K // group_size, N, 2)`, the shape torch's kernel reads. At group size 64 a weight costs 4.5 bits
per value, 28 % of bfloat16.

`int4_linear` is the kernel seam for such weights, as `engine.model.quant.int8_linear` is for int8
ones: on CPUs `engine.model.kernels` says whether torch's `_weight_int4pack_mm_for_cpu` reads this
weight's packing here (`int4pack-bf16`), else the weight is unpacked and dequantised into the
activation dtype for a float matmul (`dequant`, every machine, and CUDA).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.model.kernels import Int4Path, active_kernels
from engine.model.nibbles import Packing, fits, pack, unpack_transposed

#: Group sizes `cpm2 quantize --group-size` takes (inputs per scale and zero).
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 64
#: The middle of 0..15: a group's values are stored as `q - MIDPOINT` times its scale plus its zero.
MIDPOINT = 8
QMAX = 15


@dataclass(frozen=True)
class Int4Weight:
    """A (out, in) weight as packed 4-bit values with a bfloat16 scale and zero per group of inputs."""

    packed: torch.Tensor
    """(out, in // 2) uint8, in `packing`."""
    scale_zero: torch.Tensor
    """(in // group_size, out, 2) bfloat16: each group's scale, then its zero."""
    group_size: int
    packing: Packing

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.packed.shape[0], 2 * self.packed.shape[1]))

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + 2 * self.scale_zero.numel()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) float weight these bytes stand for, in `dtype` (computed in float32)."""
        return self.dequantize_transposed(torch.float32).t().contiguous().to(dtype)

    def dequantize_transposed(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The (in, out) weight, computed in `dtype`: the order torch's packings store the values in
        (each block column by column), so one contiguous pass; in bfloat16 (the many-rows path)
        rounding the products costs well under the int4 values' own error."""
        N, K = self.shape
        G = self.group_size
        q_KN = unpack_transposed(self.packed, N, K, self.packing)
        sz_G1N2 = self.scale_zero.to(dtype).unsqueeze(1)  # (K / G, 1, N, 2)
        scale, zero = sz_G1N2[..., 0], sz_G1N2[..., 1]
        w_GgN = torch.addcmul(zero - MIDPOINT * scale, q_KN.view(K // G, G, N).to(dtype), scale)
        return w_GgN.view(K, N)

    def to(self, device: torch.device | str) -> Int4Weight:
        return Int4Weight(self.packed.to(device), self.scale_zero.to(device), self.group_size, self.packing)


def check_group_size(group_size: int, in_features: int | None = None) -> None:
    """Raise ValueError unless `group_size` is one `cpm2 quantize` takes and divides `in_features`."""
    if group_size not in GROUP_SIZES:
        raise ValueError(f"int4 group size {group_size} is not one of {', '.join(map(str, GROUP_SIZES))}")
    if in_features is not None and in_features % group_size:
        dividing = ", ".join(str(g) for g in GROUP_SIZES if in_features % g == 0) or "none"
        raise ValueError(
            f"int4 groups of {group_size} do not divide a matrix of {in_features} inputs; "
            f"choose a group size that does ({dividing})"
        )


def quantize_int4(weight: torch.Tensor, *, group_size: int = DEFAULT_GROUP_SIZE, packing: Packing) -> Int4Weight:
    """Group-wise asymmetric int4 of a float (out, in) weight (computed in float32).

    The scale and zero are rounded to bfloat16 before the values are chosen against them, so the
    stored triple reconstructs as closely as it can; a constant group gets scale 1 (never 0).
    """
    N, K = weight.shape
    check_group_size(group_size, K)
    if not fits(packing, N, K):
        raise ValueError(f"a ({N}, {K}) weight cannot be packed as {packing}")
    w_NGg = weight.detach().to(torch.float32).reshape(N, K // group_size, group_size)
    low, high = w_NGg.amin(dim=-1), w_NGg.amax(dim=-1)
    scale = torch.where(high > low, (high - low) / QMAX, torch.ones_like(low)).to(torch.bfloat16)
    zero = (low + MIDPOINT * scale.to(torch.float32)).to(torch.bfloat16)
    s, z = scale.to(torch.float32).unsqueeze(-1), zero.to(torch.float32).unsqueeze(-1)
    q_NGg = torch.round((w_NGg - z) / s + MIDPOINT).clamp_(0, QMAX)
    scale_zero = torch.stack((scale, zero), dim=-1).transpose(0, 1).contiguous()  # (G, N, 2)
    return Int4Weight(pack(q_NGg.view(N, K), packing), scale_zero, group_size, packing)


def int4_linear(x: torch.Tensor, weight: Int4Weight) -> torch.Tensor:
    """`x @ W.T` for an int4 weight, in `x`'s dtype, by the path this machine runs fastest
    (`engine.model.kernels.Int4Path`); any leading dims, 0 rows included."""
    N, K = weight.shape
    x_MK = x.reshape(-1, K)  # (M, K)
    if x_MK.shape[0] == 0:
        return x.new_zeros(*x.shape[:-1], N)
    path = Int4Path.DEQUANT
    if weight.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad):
        path = active_kernels().int4_path(x.dtype, weight.packing, rows=x_MK.shape[0])
    if path is Int4Path.INT4PACK_BF16:
        # float32 activations are rounded to bfloat16: the kernel's float32 variant is 30x slower here.
        x_MK = x_MK.to(torch.bfloat16).contiguous()
        y_MN = torch._weight_int4pack_mm_for_cpu(x_MK, weight.packed, weight.group_size, weight.scale_zero)
    elif path is Int4Path.DEQUANT_BF16:
        # Many rows: the weight dequantised once into bfloat16, then oneDNN's bf16 matmul.
        y_MN = torch.matmul(x_MK.to(torch.bfloat16), weight.dequantize_transposed(torch.bfloat16))
    else:
        # Dequantised in float32 (exact but for summation order), multiplied in the activation dtype.
        y_MN = torch.matmul(x_MK, weight.dequantize_transposed(torch.float32).to(x.dtype))
    return y_MN.to(x.dtype).reshape(*x.shape[:-1], N)
