"""Int8 weights: per-output-channel symmetric quantisation, and the one matmul that runs them.

A weight `W` (out, in) is stored as `q` (out, in) int8 and `scale` (out,) float32 with
`W ≈ q * scale[:, None]`, `scale = max|W_row| / 127` and `q = round(W / scale)` clamped to ±127 (the
format CTranslate2 and torch's weight-only int8 matmul use). Only the weight bytes shrink, which is
what bandwidth-bound decoding and expert transfers pay for; activations stay in the compute dtype,
except on the `w8a8` path for many rows, which quantises them per row for torch's int8 matmul.

`int8_linear` is the kernel seam for such weights, as `engine.model.linear.linear` is for float
ones: the CPU path is chosen by `engine.model.kernels` (`int8_path`), CUDA dequantises into the
activation dtype and runs cuBLAS.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.model.kernels import INT8PACK_IN_MULTIPLE, Int8Path, active_kernels

#: Largest magnitude of a quantised value (symmetric: -127..127; -128 is never produced).
QMAX = 127


@dataclass(frozen=True)
class Int8Weight:
    """A (out, in) weight as int8 values and one float32 scale per output row."""

    q: torch.Tensor
    """(out, in) int8."""
    scale: torch.Tensor
    """(out,) float32."""

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def device(self) -> torch.device:
        return self.q.device

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight these bytes stand for, in `dtype`."""
        return (self.q.to(torch.float32) * self.scale.unsqueeze(1)).to(dtype)

    def to(self, device: torch.device | str) -> Int8Weight:
        return Int8Weight(self.q.to(device), self.scale.to(device))


#: Rows quantised at once hold at most this many elements: the float32 temporaries of a whole
#: matrix would be several times its size (NLLB-MoE 54B's 256206 x 2048 tied head: 2 GiB each).
QUANTIZE_CHUNK_ELEMENTS = 1 << 24


def quantize_int8(weight: torch.Tensor) -> Int8Weight:
    """Per-output-channel symmetric int8 of a float (out, in) weight (computed in float32, a block
    of rows at a time: rows are independent, so blocks change no value).

    An all-zero row gets scale 1 (its values are 0 either way), so no scale is ever 0 or NaN.
    """
    rows, cols = weight.shape
    q = torch.empty(rows, cols, dtype=torch.int8, device=weight.device)
    scale = torch.empty(rows, dtype=torch.float32, device=weight.device)
    step = max(1, QUANTIZE_CHUNK_ELEMENTS // max(1, cols))
    for begin in range(0, rows, step):
        w = weight[begin : begin + step].detach().to(torch.float32)
        amax = w.abs().amax(dim=1)
        block_scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
        q[begin : begin + step] = torch.round(w / block_scale.unsqueeze(1)).clamp_(-QMAX, QMAX)
        scale[begin : begin + step] = block_scale
    return Int8Weight(q, scale)


def _int8pack_bf16(x_MK: torch.Tensor, weight: Int8Weight) -> torch.Tensor:
    """The `int8pack-bf16` path: (M, N) in bfloat16."""
    x_MK = x_MK.to(torch.bfloat16).contiguous()
    return torch._weight_int8pack_mm(x_MK, weight.q, weight.scale.to(torch.bfloat16))


def _w8a8(x_MK: torch.Tensor, weight: Int8Weight) -> torch.Tensor:
    """The `w8a8` path: each row of `x` quantised to int8 by its own scale (max |x_row| / 127), the
    exact int32 product with `q` (`torch._int_mm`, reading `q` transposed in place), both scales
    applied to it; (M, N) float32."""
    x_MK = x_MK.to(torch.float32)
    x_scale_M1 = x_MK.abs().amax(dim=1, keepdim=True).clamp_min_(torch.finfo(torch.float32).tiny) / QMAX
    # |x / scale| <= 127 up to float rounding, which `round` takes back to 127: no clamp needed.
    xq_MK = torch.round(x_MK / x_scale_M1).to(torch.int8)
    return torch._int_mm(xq_MK, weight.q.t()) * (x_scale_M1 * weight.scale)


_scratch = threading.local()


def _cast(q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`q` cast to `dtype` into this thread's scratch buffer, valid until the next call.

    A fresh 4-16 MiB tensor per call comes from new pages (glibc serves it by mmap), and faulting
    them in cost as much as the cast and the matmul together: the path took 3.7 ms for a 4096x1024
    float32 weight at one row, 1.7 ms with this buffer (`bench.int8_kernels`). The float matmul keeps
    no reference to it.
    """
    # One buffer per mode too: a tensor made under `torch.inference_mode()` cannot be written
    # outside it (model loading calibrates outside inference mode, decoding runs inside it).
    buffers: dict[tuple[torch.dtype, bool], torch.Tensor] = _scratch.__dict__.setdefault("buffers", {})
    key = (dtype, torch.is_inference_mode_enabled())
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < q.numel():
        buffer = buffers[key] = torch.empty(q.numel(), dtype=dtype)
    return buffer[: q.numel()].view(q.shape).copy_(q)


def _dequant(x_MK: torch.Tensor, weight: Int8Weight) -> torch.Tensor:
    """The `dequant` path: the int8 values cast (exactly) to `x`'s dtype through that dtype's float
    matmul, the row scales applied to the (M, N) product (float32) rather than to the whole weight,
    which would cost one more pass over it."""
    # Imported here: `engine.model.linear` takes int8 weights through this module.
    from engine.model.linear import linear

    if torch.is_grad_enabled() and x_MK.requires_grad:
        return linear(x_MK, weight.q.to(x_MK.dtype)) * weight.scale
    return linear(x_MK, _cast(weight.q, x_MK.dtype)) * weight.scale


def int8_linear(x: torch.Tensor, weight: Int8Weight) -> torch.Tensor:
    """`x @ W.T` for an int8 weight, in `x`'s dtype, by the path this machine runs fastest
    (`engine.model.kernels.Int8Path`); any leading dims, 0 rows included."""
    in_features = weight.q.shape[1]
    x_MK = x.reshape(-1, in_features)  # (M, K)
    if weight.device.type != "cpu":
        # CUDA: the weight dequantised into the activation dtype, then cuBLAS. Scaling the weight
        # first (not the product) keeps float16 in range: a row of +-127 values summed over
        # thousands of inputs can pass float16's 65504 before its scale brings it back.
        y_MN = F.linear(x_MK, weight.q.to(x.dtype) * weight.scale.to(x.dtype).unsqueeze(1))
    elif torch.is_grad_enabled() and x.requires_grad:
        y_MN = _dequant(x_MK, weight)  # the only path autograd runs through
    else:
        path = active_kernels().int8_path(x.dtype, x_MK.shape[0])
        if path is Int8Path.W8A8:
            y_MN = _w8a8(x_MK, weight)
        elif path is Int8Path.INT8PACK_BF16 and in_features % INT8PACK_IN_MULTIPLE == 0:
            y_MN = _int8pack_bf16(x_MK, weight)
        else:
            y_MN = _dequant(x_MK, weight)
    return y_MN.to(x.dtype).reshape(*x.shape[:-1], weight.q.shape[0])
