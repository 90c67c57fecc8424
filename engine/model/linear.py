"""Linear layers (bias-free unless a model asks for biases), and the CPU matmul paths that decode
speed depends on.

Decoding reads every weight matrix once per token with one (or a few) input rows: it is a chain of
GEMVs bound by memory bandwidth. On CPUs, `F.linear` goes to MKL, which serves these shapes poorly
(measured on a 2-core EPYC, fp32, weights not in cache: 10 GB/s at one row, 6-8 GB/s at 4-16 rows).
oneDNN's matmul (`mkldnn::_linear_pointwise`, the op torch.compile's CPU path emits) reaches
22-28 GB/s at one row on the plain (out, in) layout, and 17-28 GB/s at 1-16 rows on weights
reordered into its blocked layout (`pack_for_cpu`). So `linear` sends CPU inference to oneDNN:
packed weights for the dense layers (packed once at load), plain ones for experts, which arrive
from the expert store at run time and must stay in the store's layout to move as one copy. Whether
a dtype may take oneDNN on this CPU at all is `engine.model.kernels`' decision; elsewhere `F.linear`.

Packing is an inference-only transformation applied from outside; autograd always takes
`F.linear` (oneDNN's op has no backward). Results differ from `F.linear` only by summation order.
A bias (M2M-100, NLLB-200) stays a plain vector beside a packed or plain weight and goes into the
same oneDNN call, which adds it in the matmul's epilogue.

oneDNN JIT-compiles one primitive per input shape and keeps it in two LRU caches of 1024 entries
(its own and ideep's), 0.3-0.6 MiB each (measured, torch 2.13 / oneDNN 3.12, fp32). A server meets
every row count from 1 to thousands (batch x input length, tokens routed to an expert), so its heap
grew for as long as new counts turned up: +6.8 % RSS over a 30-minute soak, still 130 MiB/h at the
end (`bench/soak.py`). Row counts above `EXACT_ROWS` are therefore padded to one of eight sizes per
octave (at most 12.5 % more rows), which bounds the shapes and with them the caches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.model.int4 import Int4Weight, int4_linear
from engine.model.kernels import active_kernels
from engine.model.quant import Int8Weight, int8_linear, quantize_int8

#: Row counts up to this run unpadded: every decode batch size (the default batch limit is 32).
EXACT_ROWS = 32


def padded_rows(rows: int) -> int:
    """The row count a oneDNN matmul of `rows` rows runs with: exact up to `EXACT_ROWS`, then one of
    eight sizes per octave, e.g. 33 -> 36, 100 -> 104, 1000 -> 1024."""
    if rows <= EXACT_ROWS:
        return rows
    step = 1 << ((rows - 1).bit_length() - 4)  # rows in (2^(k-1), 2^k]: multiples of 2^(k-4)
    return -(-rows // step) * step


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    padded = padded_rows(rows)
    if padded == rows:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    # Padding rows in, their rows out (zeros, or the bias): the real rows' results do not depend on them.
    x_MK = F.pad(x.reshape(rows, x.shape[-1]), (0, 0, 0, padded - rows))
    y_MN = torch.ops.mkldnn._linear_pointwise(x_MK, weight, bias, "none", [], "")
    return y_MN[:rows].reshape(*x.shape[:-1], y_MN.shape[-1])


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def linear(
    x: torch.Tensor, weight: torch.Tensor | Int8Weight | Int4Weight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`x @ weight.T (+ bias)` for a plain (out, in) weight, one packed by `pack_weight`, or an int8
    or int4 one (`engine.model.quant`, `engine.model.int4`; computed in `x`'s dtype)."""
    if not isinstance(weight, torch.Tensor):
        y = int8_linear(x, weight) if isinstance(weight, Int8Weight) else int4_linear(x, weight)
        return y if bias is None else y + bias.to(y.dtype)
    if weight.is_mkldnn:
        return _onednn_linear(x, weight, bias)
    if (
        weight.device.type == "cpu"
        and x.dtype == weight.dtype
        and weight.is_contiguous()
        and (bias is None or (bias.dtype == weight.dtype and bias.device.type == "cpu"))
        and not _needs_grad(x, weight, bias)
        and active_kernels().uses_onednn(weight.dtype)
    ):
        return _onednn_linear(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """`nn.Linear`, bias-free unless `bias`, whose weight may be packed for the CPU or quantised to
    int8 (`quantize_linears`)."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = False) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.int8: Int8Weight | None = None
        """The weight as int8 once quantised; `weight` is then an empty placeholder of its dtype."""

    @property
    def matrix(self) -> torch.Tensor | Int8Weight:
        """What this layer multiplies by: its int8 weight when quantised, else `weight`."""
        return self.int8 if self.int8 is not None else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.matrix, self.bias)


def quantize_linear(module: Linear, weight: torch.Tensor | None = None) -> None:
    """Make `module` compute with int8 (per-row, `engine.model.quant`) from `weight` (default: its own),
    freeing its float weight; inference only (an int8 layer takes no gradients and is not saved)."""
    source = unpack_weight(module.weight if weight is None else weight)
    module.int8 = quantize_int8(source)
    # An empty placeholder keeps the parameter's name and dtype (the dtype activations are cast to).
    module.weight = nn.Parameter(torch.empty(0, dtype=source.dtype, device=source.device), requires_grad=False)


def quantize_linears(model: nn.Module, *, skip: str | None = None) -> int:
    """`quantize_linear` every `Linear` of `model` not yet quantised, except under names containing
    `skip`; returns how many."""
    count = 0
    for name, module in model.named_modules():
        if skip is not None and skip in name:
            continue
        if isinstance(module, Linear) and module.int8 is None:
            quantize_linear(module)
            count += 1
    return count


def can_pack(weight: torch.Tensor) -> bool:
    """Whether `weight` can use the oneDNN packed layout here (a CPU matrix whose dtype this CPU's
    oneDNN packs, `engine.model.kernels`)."""
    return (
        weight.device.type == "cpu"
        and not weight.is_mkldnn
        and weight.dim() == 2
        and active_kernels().can_pack(weight.dtype)
    )


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight in oneDNN's blocked layout (a new tensor; a copy of the data).

    No batch-size hint: the layout oneDNN picks for a hint of 1 is ~5% faster at one row but
    ~40% slower at 16 rows (measured, fp32, 2-core EPYC), and a server decodes batches.
    """
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


def unpack_weight(weight: torch.Tensor) -> torch.Tensor:
    """A plain (out, in) tensor for a packed or plain weight."""
    return weight.to_dense() if weight.is_mkldnn else weight


def pack_for_cpu(model: nn.Module, *, skip: str | None = None) -> int:
    """Pack every `Linear` weight of `model` in place, except under names containing `skip`.

    Biases stay plain vectors. Returns how many weights were packed. Call after loading, for inference
    only (packed weights take no gradients and are not saved).
    """
    count = 0
    for name, module in model.named_modules():
        if skip is not None and skip in name:
            continue
        if isinstance(module, Linear) and module.int8 is None and can_pack(module.weight):
            module.weight = nn.Parameter(pack_weight(module.weight), requires_grad=False)
            count += 1
    return count
