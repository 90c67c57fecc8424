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
machine; `auto` takes the fastest path the CPU supports. Quantised weight formats (int8 / int4
experts) are meant to enter here as further rows of the same table.
"""

from __future__ import annotations

import contextlib
import enum
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F

log = logging.getLogger("cpm2.engine")

KernelMode = Literal["auto", "plain"]
KERNEL_MODES: tuple[str, ...] = get_args(KernelMode)


class MatmulPath(enum.StrEnum):
    ONEDNN_PACKED = "onednn-packed"
    ONEDNN = "onednn"
    ATEN = "aten"


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

    @property
    def is_fastest(self) -> bool:
        return self.dense is MatmulPath.ONEDNN_PACKED and self.experts is MatmulPath.ONEDNN

    def to_dict(self) -> dict[str, str]:
        return {"dense": str(self.dense), "experts": str(self.experts), "reason": self.reason}


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

    def for_dtype(self, dtype: torch.dtype) -> DtypeKernels:
        kernels = self._table.get(dtype)
        if kernels is None:
            kernels = self._table[dtype] = _choose(dtype, self.mode)
        return kernels

    def uses_onednn(self, dtype: torch.dtype) -> bool:
        """Whether plain weights of `dtype` go to oneDNN's matmul."""
        return self.for_dtype(dtype).experts is MatmulPath.ONEDNN

    def can_pack(self, dtype: torch.dtype) -> bool:
        """Whether weights of `dtype` may be packed into oneDNN's blocked layout."""
        return self.for_dtype(dtype).dense is MatmulPath.ONEDNN_PACKED


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
    log.warning("%s matmuls take %s on this CPU: %s%s", name, paths, kernels.reason, hint)
    return kernels


def describe(dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16)) -> str:
    """One line per dtype: torch's CPU capability and the paths chosen here (CI prints it first)."""
    lines = [f"torch {torch.__version__}, CPU capability {cpu_capability()}, cpu_kernels={_active.mode}"]
    for dtype in dtypes:
        kernels = _active.for_dtype(dtype)
        name = str(dtype).removeprefix("torch.")
        why = f" ({kernels.reason})" if kernels.reason else ""
        lines.append(f"  {name}: dense {kernels.dense}, experts {kernels.experts}{why}")
    return "\n".join(lines)
