"""The CPU matmul seam: which kernel multiplies a weight of a given dtype on this machine.

oneDNN's matmul (`engine.model.linear`) is the fast path for decoding on CPUs, but not every CPU has
it for every dtype: its bfloat16 kernels need AVX512-BF16 / AVX-NE-CONVERT or AVX512BW+VL+DQ on x86
(the BF16 extension on arm64), and on an AVX2-only CPU (AMD Zen 2/3, older Intel, many cloud VMs)
`torch.ops.mkldnn._reorder_linear_weight` and `_linear_pointwise` refuse bfloat16 outright. So each
dtype gets a path, chosen once per process: ask torch (`_is_mkldnn_bf16_supported`, the check those
ops make), then run the ops once on a tiny tensor and compare with `F.linear` (covering what torch
cannot say, e.g. a oneDNN build without the op), and remember the answer.

Paths, fastest first (`MatmulPath`): `onednn-packed` (weights reordered once at load into oneDNN's
blocked layout; dense layers only), `onednn` (oneDNN on the plain (out, in) layout; experts, which
must stay in the expert store's layout), `aten` (`F.linear`: MKL / ATen's own kernels, any dtype).
Every path computes the same product; results differ only by summation order.

`KernelMode` `plain` forces `aten` for every dtype, so the fallback runs (and is tested) on every
machine; `auto` takes the fastest path the CPU supports.

Int8 weights (`engine.model.quant`) get two paths per activation dtype (`Int8Path`), one for up to
`INT8PACK_MAX_ROWS` rows and one for more, measured with `python -m bench.int8_kernels`:
`int8pack-bf16` (torch's weight-only int8 matmul on bfloat16 activations) for few rows where this
CPU has native bfloat16, `w8a8` (activations quantised per row to int8, torch's int8 x int8 matmul)
for more rows on AVX512 CPUs; elsewhere `dequant` (the int8 values cast to the activation dtype,
that dtype's float path, the row scales applied to the output), which runs everywhere, is exact up
to summation order, and is what `plain` forces.

Int4 weights (`engine.model.int4`) take `int4pack-bf16` (torch's int4 weight-only matmul) up to
`INT4PACK_MAX_ROWS` rows and `dequant-bf16` above, when they are stored in the packing this
machine's kernel reads (`engine.model.nibbles`: it differs between AVX512 and AVX2 builds, and is
checked against torch's own converter once per process); else `dequant`, which `plain` forces.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F

from engine.model.nibbles import PACKING_BLOCK, Packing, pack

log = logging.getLogger("cpm2.engine")

KernelMode = Literal["auto", "plain"]
KERNEL_MODES: tuple[str, ...] = get_args(KernelMode)


class MatmulPath(enum.StrEnum):
    ONEDNN_PACKED = "onednn-packed"
    ONEDNN = "onednn"
    ATEN = "aten"


class Int8Path(enum.StrEnum):
    """How an int8 weight (`engine.model.quant`) multiplies activations of a dtype on this CPU."""

    INT8PACK_BF16 = "int8pack-bf16"
    """`torch._weight_int8pack_mm` on bfloat16 activations (it reads one byte per weight: 1.7-2.7x
    faster than a float32 GEMV at one row here); float32 activations are rounded to bf16. Few rows
    only: its kernel streams the weight again every few rows."""
    W8A8 = "w8a8"
    """Activations quantised per row to int8 (symmetric, as CTranslate2's int8 does), `torch._int_mm`'s
    exact int32 product, both scales applied to it. Rows stay independent of each other. Many rows
    only: quantising the activations costs more than it saves at one row."""
    DEQUANT = "dequant"
    """The int8 values cast (exactly) to the activation dtype, that dtype's float path
    (`engine.model.linear`), the per-row scales applied to the (rows, out) result. Runs everywhere."""


class Int4Path(enum.StrEnum):
    """How an int4 weight (`engine.model.int4`) multiplies activations on this CPU."""

    INT4PACK_BF16 = "int4pack-bf16"
    """`torch._weight_int4pack_mm_for_cpu` on bfloat16 activations, reading the weight as stored
    (half a byte per value): 3x faster than a float32 GEMV at one row, 1.5x at 16 rows here. Only
    for weights in the packing this machine's kernel reads (`CpuKernels.int4_packing`)."""
    DEQUANT_BF16 = "dequant-bf16"
    """Many rows: the weight dequantised once into bfloat16 along its stored order, then a bf16
    matmul (activations rounded to bf16 as on `int4pack-bf16`). `int4pack` streams the weight again
    for every few rows; from `INT4PACK_MAX_ROWS` rows on this is faster (2x at 256 rows here)."""
    DEQUANT = "dequant"
    """The weight unpacked and dequantised into the activation dtype, then that dtype's float
    matmul. Runs everywhere, for every packing; a pass over the weight per call, so much slower."""


#: Row counts up to this take the few-rows int8 path (`DtypeKernels.int8`), more the many-rows one
#: (`int8_many`). `_weight_int8pack_mm` streams the weight again every few rows (time grows ~linearly
#: with rows) while `w8a8` pays a fixed cost to quantise the activations: they tie at 4 rows (768x768
#: to 4096x1024 weights); at one row int8pack is 1.14-1.66x faster there (but 1.3x slower on a
#: 32128x768 output head), from 8 rows w8a8 is 1.8-3.9x faster (2-core Xeon with AMX, 2026-12-06).
INT8PACK_MAX_ROWS = 3
#: Int4 weights multiply up to this many rows with `int4pack-bf16`, more with `dequant-bf16`: at 4096 x
#: 1024, int4pack 3.3 / 12.4 ms and dequant-bf16 5.1 / 6.0 ms at 64 / 256 rows, crossing near 110
#: (2-core Xeon, weights cold in memory; `python -m bench.int4_kernels`).
INT4PACK_MAX_ROWS = 128
#: `_weight_int8pack_mm` (torch 2.13, AVX512) returns garbage when `in` is not a multiple of 32, and
#: may crash: such weights take the `dequant` path (`engine.model.quant`).
INT8PACK_IN_MULTIPLE = 32


@dataclass(frozen=True, kw_only=True)
class DtypeKernels:
    """The matmul paths a dtype takes on this CPU, and why."""

    dtype: torch.dtype
    dense: MatmulPath
    """Dense weights (packed once at load where `onednn-packed`)."""
    experts: MatmulPath
    """Expert weights, which stay in the expert store's plain layout."""
    reason: str = ""
    """Why a faster path is not taken (empty when it is)."""
    int8: Int8Path = Int8Path.DEQUANT
    """Int8 weights under activations of this dtype, up to `INT8PACK_MAX_ROWS` rows."""
    int8_many: Int8Path = Int8Path.DEQUANT
    """Int8 weights under activations of this dtype, more rows."""
    int8_reason: str = ""
    """Why int8 weights take the `dequant` path, or how the faster paths round (not exact)."""

    @property
    def is_fastest(self) -> bool:
        """Whether float weights take the fastest paths (int8 ones are reported beside, not here)."""
        return self.dense is MatmulPath.ONEDNN_PACKED and self.experts is MatmulPath.ONEDNN

    def to_dict(self) -> dict[str, str]:
        return {
            "dense": str(self.dense),
            "experts": str(self.experts),
            "reason": self.reason,
            "int8": str(self.int8),
            "int8_many": str(self.int8_many),
            "int8_reason": self.int8_reason,
        }


def cpu_capability() -> str:
    """What torch reports for this CPU's vector unit (`AVX2`, `AVX512`, `DEFAULT` on arm64, ...)."""
    return str(torch.backends.cpu.get_cpu_capability())


def _has_onednn_ops() -> bool:
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def _torch_refusal(dtype: torch.dtype) -> str | None:
    """torch's own answer for `dtype`, before any probe: why oneDNN cannot run it here, or None."""
    if not _has_onednn_ops():
        return "this torch build has no oneDNN linear ops"
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return (
            "oneDNN's bfloat16 matmul needs AVX512-BF16, AVX-NE-CONVERT or AVX512BW+VL+DQ (arm64: BF16); "
            f"this CPU reports {cpu_capability()}"
        )
    if dtype not in (torch.float32, torch.bfloat16):
        return f"cpm2 sends only float32 and bfloat16 to oneDNN on CPUs, not {str(dtype).removeprefix('torch.')}"
    return None


def _probe(dtype: torch.dtype, *, packed: bool) -> str | None:
    """Run oneDNN's matmul once on a tiny tensor; None if it ran and matched `F.linear`."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 32, generator=generator).to(dtype)
    weight = torch.randn(16, 32, generator=generator).to(dtype)
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(weight, None) if packed else weight
        y = torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    except RuntimeError as error:
        layout = "packed" if packed else "plain"
        return f"oneDNN's {layout} {str(dtype).removeprefix('torch.')} matmul failed here: {error}"
    reference = F.linear(x.float(), weight.float())
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    if not torch.allclose(y.float(), reference, rtol=tolerance, atol=tolerance):
        return f"oneDNN's {str(dtype).removeprefix('torch.')} matmul gave wrong results on this CPU"
    return None


def _probe_int8pack() -> str | None:
    """Run `_weight_int8pack_mm` once on bf16 activations; None if it ran and matched the dequantised
    product."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2 * INT8PACK_IN_MULTIPLE, generator=generator).to(torch.bfloat16)
    q = torch.randint(-127, 128, (16, x.shape[1]), generator=generator, dtype=torch.int8)
    scale = torch.rand(16, generator=generator) / 127 + 1e-3
    try:
        y = torch._weight_int8pack_mm(x, q, scale.to(torch.bfloat16))
    except (RuntimeError, AttributeError) as error:
        return f"torch._weight_int8pack_mm failed here: {error}"
    reference = F.linear(x.float(), q.float() * scale.unsqueeze(1))
    if not torch.allclose(y.float(), reference, rtol=5e-2, atol=5e-2):
        return "torch._weight_int8pack_mm gave wrong results on this CPU"
    return None


def _probe_int_mm() -> str | None:
    """Run `torch._int_mm` once; None if it ran and matched the exact integer product."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (5, 40), generator=generator, dtype=torch.int8)
    b = torch.randint(-127, 128, (24, 40), generator=generator, dtype=torch.int8)
    try:
        y = torch._int_mm(a, b.t())
    except (RuntimeError, AttributeError) as error:
        return f"torch._int_mm failed here: {error}"
    if not torch.equal(y.long(), a.long() @ b.long().t()):
        return "torch._int_mm gave wrong results on this CPU"
    return None


def _probe_int4pack() -> tuple[Packing | None, str]:
    """The packing torch's int4 CPU matmul reads here (`engine.model.nibbles`), or None and why not:
    its converter must write exactly one of the known layouts and the matmul must match the
    dequantised product."""
    generator = torch.Generator().manual_seed(0)
    N, K, group = 64, 64, 32
    q = torch.randint(0, 16, (N, K), generator=generator, dtype=torch.int32)
    scale_zero = (torch.rand(K // group, N, 2, generator=generator) / 8).to(torch.bfloat16)
    x = torch.randn(3, K, generator=generator).to(torch.bfloat16)
    try:
        converted = torch._convert_weight_to_int4pack_for_cpu(q, 1).view(torch.uint8).view(N, K // 2)
        found = [p for p in PACKING_BLOCK if torch.equal(converted, pack(q, p))]  # type: ignore[arg-type]
        if not found:
            return None, f"torch's int4 CPU kernel ({cpu_capability()}) reads a packing cpm2 does not write"
        y = torch._weight_int4pack_mm_for_cpu(x, converted, group, scale_zero)
    except (RuntimeError, AttributeError) as error:
        return None, f"torch's int4 CPU matmul failed here: {error}"
    sz = scale_zero.float().transpose(0, 1).repeat_interleave(group, dim=1)  # (N, K, 2)
    reference = x.float() @ ((q.float() - 8) * sz[..., 0] + sz[..., 1]).t()
    if not torch.allclose(y.float(), reference, rtol=5e-2, atol=5e-2):
        return None, "torch's int4 CPU matmul gave wrong results on this CPU"
    return found[0], ""  # type: ignore[return-value]


def _w8a8_refusal(dtype: torch.dtype) -> str | None:
    """Why int8 weights under `dtype` activations cannot take `w8a8` for many rows here, or None."""
    if dtype not in (torch.float32, torch.bfloat16):
        return f"int8 weights take the w8a8 path only under float32 or bfloat16 activations, not {dtype}"
    if not cpu_capability().startswith("AVX512"):
        return f"w8a8 is measured faster only on AVX512 CPUs; this one reports {cpu_capability()}"
    return _probe_int_mm()


def _int8_refusal(dtype: torch.dtype, bf16: DtypeKernels) -> str | None:
    """Why int8 weights under `dtype` activations cannot take `int8pack-bf16` here, or None."""
    if dtype not in (torch.float32, torch.bfloat16):
        return f"int8 weights take the int8pack-bf16 path only under float32 or bfloat16 activations, not {dtype}"
    if not cpu_capability().startswith("AVX512"):
        # Measured only there; elsewhere the fallback is at least never slower than itself.
        return f"int8pack-bf16 is measured faster only on AVX512 CPUs; this one reports {cpu_capability()}"
    if bf16.experts is not MatmulPath.ONEDNN:
        return f"int8pack-bf16 needs oneDNN's bfloat16 kernels: {bf16.reason}"
    if dtype == torch.float32 and not torch.cpu._is_avx512_bf16_supported():
        # Without native bf16 conversions the rounding of activations is emulated; not measured.
        return "float32 activations take int8pack-bf16 only with native bfloat16 (AVX512-BF16)"
    return _probe_int8pack()


# float32 activations on `int8pack-bf16` are rounded to bfloat16 (and so is the product): measured
# max |error| / max |y| <= 0.6 % over the expert shapes against x @ W_deq.T in float64, half what the
# int8 weights themselves already cost against the float weight (1.2 %), for 1.3-5x less time than
# the exact `dequant` path (`bench.int8_kernels`). `w8a8`'s int8 activations cost up to 1.1 % there.
# `cpu_kernels=plain` keeps both exact.
FLOAT32_VIA_BF16 = "float32 activations are rounded to bfloat16 (error <= 0.6% of max |y|; the int8 weights' own: 1.2%)"
W8A8_ROUNDING = f"over {INT8PACK_MAX_ROWS} rows activations are quantised per row to int8 (error <= 1.1% of max |y|)"


def _choose_int8(dtype: torch.dtype, mode: KernelMode, bf16: DtypeKernels) -> tuple[Int8Path, Int8Path, str]:
    """The few-rows and many-rows int8 paths of `dtype` activations, and what they change or why not."""
    if mode == "plain":
        return Int8Path.DEQUANT, Int8Path.DEQUANT, "CPU kernels forced to the plain path (cpu_kernels=plain)"
    few_refusal, many_refusal = _int8_refusal(dtype, bf16), _w8a8_refusal(dtype)
    few = Int8Path.DEQUANT if few_refusal is not None else Int8Path.INT8PACK_BF16
    many = Int8Path.DEQUANT if many_refusal is not None else Int8Path.W8A8
    notes = [
        few_refusal or (FLOAT32_VIA_BF16 if dtype == torch.float32 else ""),
        many_refusal or W8A8_ROUNDING,
    ]
    return few, many, "; ".join(note for note in notes if note)


def _choose(dtype: torch.dtype, mode: KernelMode) -> DtypeKernels:
    if mode == "plain":
        return DtypeKernels(
            dtype=dtype,
            dense=MatmulPath.ATEN,
            experts=MatmulPath.ATEN,
            reason="CPU kernels forced to the plain path (cpu_kernels=plain)",
        )
    reason = _torch_refusal(dtype) or _probe(dtype, packed=False)
    if reason is not None:
        return DtypeKernels(dtype=dtype, dense=MatmulPath.ATEN, experts=MatmulPath.ATEN, reason=reason)
    reason = _probe(dtype, packed=True)
    dense = MatmulPath.ONEDNN if reason is not None else MatmulPath.ONEDNN_PACKED
    return DtypeKernels(dtype=dtype, dense=dense, experts=MatmulPath.ONEDNN, reason=reason or "")


class CpuKernels:
    """The kernel table of one process: a dtype's paths are chosen on first use and kept."""

    def __init__(self, mode: KernelMode = "auto") -> None:
        if mode not in KERNEL_MODES:
            raise ValueError(f"cpu kernel mode {mode!r} is not one of {', '.join(KERNEL_MODES)}")
        self.mode: KernelMode = mode
        # `linear` asks this on every call: a dict lookup once the dtype has been seen.
        self._table: dict[torch.dtype, DtypeKernels] = {}
        self._int4: tuple[Packing | None, str] | None = None

    def for_dtype(self, dtype: torch.dtype) -> DtypeKernels:
        kernels = self._table.get(dtype)
        if kernels is None:
            kernels = _choose(dtype, self.mode)
            # The int8 path of any activation dtype runs on bfloat16's float kernels.
            bf16 = kernels if dtype == torch.bfloat16 else self.for_dtype(torch.bfloat16)
            int8, int8_many, int8_reason = _choose_int8(dtype, self.mode, bf16)
            kernels = self._table[dtype] = dataclasses.replace(
                kernels, int8=int8, int8_many=int8_many, int8_reason=int8_reason
            )
        return kernels

    def uses_onednn(self, dtype: torch.dtype) -> bool:
        """Whether plain weights of `dtype` go to oneDNN's matmul."""
        return self.for_dtype(dtype).experts is MatmulPath.ONEDNN

    def can_pack(self, dtype: torch.dtype) -> bool:
        """Whether weights of `dtype` may be packed into oneDNN's blocked layout."""
        return self.for_dtype(dtype).dense is MatmulPath.ONEDNN_PACKED

    @property
    def int4_packing(self) -> Packing | None:
        """The int4 packing (`engine.model.nibbles`) torch's int4 matmul reads here; None if none."""
        return self._int4_probe()[0]

    @property
    def int4_reason(self) -> str:
        """Why int4 weights take the `dequant` path here (empty when the kernel runs)."""
        return self._int4_probe()[1]

    def _int4_probe(self) -> tuple[Packing | None, str]:
        if self._int4 is None:
            if self.mode == "plain":
                self._int4 = None, "CPU kernels forced to the plain path (cpu_kernels=plain)"
            else:
                self._int4 = _probe_int4pack()
        return self._int4

    def int4_path(self, dtype: torch.dtype, packing: str, rows: int = 1) -> Int4Path:
        """How an int4 weight in `packing` multiplies `rows` rows of activations of `dtype`."""
        if dtype in (torch.float32, torch.bfloat16) and packing == self.int4_packing:
            return Int4Path.INT4PACK_BF16 if rows <= INT4PACK_MAX_ROWS else Int4Path.DEQUANT_BF16
        return Int4Path.DEQUANT

    def int8_path(self, dtype: torch.dtype, rows: int = 1) -> Int8Path:
        """How int8 weights multiply `rows` rows of activations of `dtype`."""
        kernels = self.for_dtype(dtype)
        return kernels.int8 if rows <= INT8PACK_MAX_ROWS else kernels.int8_many


_active = CpuKernels()


def active_kernels() -> CpuKernels:
    """The kernel table this process uses."""
    return _active


def set_kernel_mode(mode: KernelMode) -> CpuKernels:
    """Choose kernels anew under `mode` (for weights packed from now on and every plain weight)."""
    global _active
    if mode != _active.mode:
        _active = CpuKernels(mode)
    return _active


@contextlib.contextmanager
def kernel_mode(mode: KernelMode) -> Iterator[CpuKernels]:
    """A fresh kernel table under `mode` for a block (chosen anew: nothing remembered from before),
    then the previous table again (tests, benchmarks)."""
    global _active
    previous = _active
    _active = CpuKernels(mode)
    try:
        yield _active
    finally:
        _active = previous


_announced: set[tuple[KernelMode, torch.dtype]] = set()


def announce(dtype: torch.dtype) -> DtypeKernels:
    """Log once per process and dtype which path `dtype` takes, when it is not the fastest one, and
    what would be faster on this CPU."""
    kernels = _active.for_dtype(dtype)
    key = (_active.mode, dtype)
    if kernels.is_fastest or key in _announced:
        return kernels
    _announced.add(key)
    name = str(dtype).removeprefix("torch.")
    hint = ""
    if _active.mode == "plain":
        hint = "; cpu_kernels=auto would pick the fastest path this CPU supports"
    elif dtype != torch.float32 and _active.for_dtype(torch.float32).is_fastest:
        hint = "; float32 runs oneDNN's packed kernels on this CPU and is likely faster (--dtype float32)"
    paths = (
        f"the {kernels.dense} path"
        if kernels.dense is kernels.experts
        else f"the {kernels.dense} path (dense weights) and {kernels.experts} (experts)"
    )
    int8 = (
        f" (int8 weights: {kernels.int8} / {kernels.int8_many}, {kernels.int8_reason})" if kernels.int8_reason else ""
    )
    log.warning("%s matmuls take %s on this CPU: %s%s%s", name, paths, kernels.reason, hint, int8)
    return kernels


def describe(dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16)) -> str:
    """One line per dtype: torch's CPU capability and the paths chosen here (CI prints it first)."""
    lines = [f"torch {torch.__version__}, CPU capability {cpu_capability()}, cpu_kernels={_active.mode}"]
    for dtype in dtypes:
        kernels = _active.for_dtype(dtype)
        name = str(dtype).removeprefix("torch.")
        why = f" ({kernels.reason})" if kernels.reason else ""
        int8_why = f" ({kernels.int8_reason})" if kernels.int8_reason else ""
        int8 = f"int8 {kernels.int8} (<= {INT8PACK_MAX_ROWS} rows) / {kernels.int8_many}{int8_why}"
        lines.append(f"  {name}: dense {kernels.dense}, experts {kernels.experts}{why}, {int8}")
    packing = _active.int4_packing
    lines.append(
        f"  int4: {Int4Path.INT4PACK_BF16} (<= {INT4PACK_MAX_ROWS} rows) / {Int4Path.DEQUANT_BF16}, {packing} packing"
        if packing
        else f"  int4: dequant ({_active.int4_reason})"
    )
    return "\n".join(lines)
