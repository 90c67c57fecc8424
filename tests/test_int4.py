"""Int4 weights (`engine.model.int4`), their byte layouts (`engine.model.nibbles`) and the CPU path
chosen for them (`engine.model.kernels`).

The layouts are checked against torch's own converter on this machine's vector unit and, in a child
process with `ATEN_CPU_CAPABILITY=avx2`, on the AVX2 kernels every x86 build also carries (the
variable picks which ones torch dispatches to), so both branches run wherever the suite runs.
Products are compared with `x @ W_deq.T` in float64, as max |y - ref| / max |ref|: the dequant path
in float32 is exact up to summation order; `int4pack-bf16` rounds activations and product to
bfloat16. No timing is checked here (STYLE.md §14).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from engine.model import kernels
from engine.model.int4 import GROUP_SIZES, MIDPOINT, Int4Weight, int4_linear, quantize_int4
from engine.model.kernels import INT4PACK_MAX_ROWS, Int4Path, kernel_mode
from engine.model.nibbles import PACKING_BLOCK, PACKINGS, fits, pack, unpack, unpack_transposed

SHAPES = [(64, 64), (128, 256), (192, 128)]


def _weight(out_features: int = 128, in_features: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)) * 0.05


def _relative_error(y: torch.Tensor, x: torch.Tensor, weight: Int4Weight) -> float:
    reference = x.double() @ weight.dequantize().double().T
    return float((y.double() - reference).abs().max() / reference.abs().max())


@pytest.mark.parametrize("packing", PACKINGS)
@pytest.mark.parametrize("shape", SHAPES)
def test_unpack_inverts_pack(packing: str, shape: tuple[int, int]) -> None:
    if not fits(packing, *shape):
        pytest.skip(f"{shape} does not fit {packing}")
    values = torch.randint(0, 16, shape, generator=torch.Generator().manual_seed(0))
    packed = pack(values, packing)  # type: ignore[arg-type]
    assert packed.dtype == torch.uint8
    assert packed.shape == (shape[0], shape[1] // 2)
    assert torch.equal(unpack(packed, *shape, packing), values.to(torch.uint8))  # type: ignore[arg-type]


@pytest.mark.parametrize("packing", PACKINGS)
def test_transposed_unpacking_and_dequantisation_agree(packing: str) -> None:
    values = torch.randint(0, 16, (128, 192), generator=torch.Generator().manual_seed(3))
    packed = pack(values, packing)  # type: ignore[arg-type]
    assert torch.equal(unpack_transposed(packed, 128, 192, packing), values.t().to(torch.uint8))  # type: ignore[arg-type]
    weight = quantize_int4(_weight(128, 192), group_size=64, packing=packing)  # type: ignore[arg-type]
    # The format's own formula, w = (q - 8) * scale + zero per group, from the unpacked values.
    q_NK = unpack(weight.packed, 128, 192, packing).float()  # type: ignore[arg-type]
    scale, zero = (weight.scale_zero[..., i].float().t().repeat_interleave(64, dim=1) for i in (0, 1))
    assert torch.allclose(weight.dequantize(), (q_NK - MIDPOINT) * scale + zero, rtol=0, atol=1e-6)
    assert torch.equal(weight.dequantize(), weight.dequantize_transposed(torch.float32).t())
    # bfloat16 rounds the zero and the products: an error of a few 2^-8 of the weights' magnitude.
    bf16 = weight.dequantize_transposed(torch.bfloat16).float()
    exact = weight.dequantize().t()
    assert (bf16 - exact).abs().max() <= 2e-2 * exact.abs().max()


def test_many_rows_take_the_dequant_bf16_path() -> None:
    table = kernels.CpuKernels("auto")
    packing = table.int4_packing
    if packing is None:
        pytest.skip("no int4 kernel on this CPU")
    assert table.int4_path(torch.float32, packing, rows=INT4PACK_MAX_ROWS) is Int4Path.INT4PACK_BF16
    assert table.int4_path(torch.float32, packing, rows=INT4PACK_MAX_ROWS + 1) is Int4Path.DEQUANT_BF16
    assert table.int4_path(torch.float32, "plain", rows=1000) is Int4Path.DEQUANT


def test_plain_packing_is_low_nibble_first() -> None:
    values = torch.tensor([[1, 2, 3, 4]])
    assert pack(values, "plain").tolist() == [[0x21, 0x43]]


def _torch_packing_check() -> str:
    """Python source that prints which of cpm2's packings torch's converter writes for each shape."""
    return textwrap.dedent(
        f"""
        import torch
        from engine.model.nibbles import PACKING_BLOCK, fits, pack
        for shape in {SHAPES!r}:
            q = torch.randint(0, 16, shape, dtype=torch.int32, generator=torch.Generator().manual_seed(1))
            got = torch._convert_weight_to_int4pack_for_cpu(q, 1).view(torch.uint8).view(shape[0], -1)
            same = [p for p in PACKING_BLOCK if fits(p, *shape) and torch.equal(pack(q, p), got)]
            print(torch.backends.cpu.get_cpu_capability(), shape, ",".join(same))
        """
    )


@pytest.mark.parametrize("capability", ["", "avx2"])
def test_torch_writes_the_packing_named_for_its_vector_unit(capability: str) -> None:
    if not capability and not str(torch.backends.cpu.get_cpu_capability()).startswith(("AVX512", "AVX2")):
        pytest.skip("torch's int4 CPU kernel has no vectorised packing on this CPU")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability} if capability else dict(os.environ)
    out = subprocess.run(
        [sys.executable, "-c", _torch_packing_check()], env=env, capture_output=True, text=True, check=True
    ).stdout
    lines = out.splitlines()
    assert len(lines) == len(SHAPES)
    for line in lines:
        unit, *_, found = line.split()
        expected = "torch-avx512" if unit.startswith("AVX512") else "torch-avx2"
        # (192, 128) has 192 rows: three AVX512 blocks, six AVX2 ones; every shape fits its unit.
        assert found == expected, line


def test_the_kernel_table_names_this_machines_packing() -> None:
    table = kernels.CpuKernels("auto")
    unit = kernels.cpu_capability()
    if unit.startswith("AVX512"):
        assert table.int4_packing == "torch-avx512"
    elif unit.startswith("AVX2"):
        assert table.int4_packing == "torch-avx2"
    if table.int4_packing is None:
        assert table.int4_reason
    else:
        assert table.int4_path(torch.float32, table.int4_packing) is Int4Path.INT4PACK_BF16
    for other in PACKINGS:
        if other != table.int4_packing:
            assert table.int4_path(torch.float32, other) is Int4Path.DEQUANT
    assert table.int4_path(torch.float16, table.int4_packing or "plain") is Int4Path.DEQUANT
    assert "int4" in kernels.describe()


def test_plain_mode_takes_dequant() -> None:
    with kernel_mode("plain") as table:
        assert table.int4_packing is None
        assert "cpu_kernels=plain" in table.int4_reason
        for packing in PACKINGS:
            assert table.int4_path(torch.bfloat16, packing) is Int4Path.DEQUANT


def test_an_unknown_torch_layout_is_caught_by_the_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "_convert_weight_to_int4pack_for_cpu", lambda q, tiles: pack(q, "plain"))
    table = kernels.CpuKernels("auto")
    assert table.int4_packing is None
    assert "packing cpm2 does not write" in table.int4_reason


@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_quantisation_is_within_half_a_step_per_group(group_size: int) -> None:
    w = _weight(64, 256)
    q = quantize_int4(w, group_size=group_size, packing="plain")
    assert q.scale_zero.shape == (256 // group_size, 64, 2)
    assert q.scale_zero.dtype == torch.bfloat16
    assert q.nbytes == 64 * 128 + 4 * 64 * (256 // group_size)
    scale = q.scale_zero[..., 0].float().t().repeat_interleave(group_size, dim=1)  # (N, K)
    # Half a step, plus what rounding the zero to bfloat16 moved the grid by (< a step).
    assert ((q.dequantize() - w).abs() <= scale).all()
    assert (q.dequantize() - w).abs().mean() < 0.3 * scale.mean()
    values = unpack(q.packed, 64, 256, "plain")
    # The min and max of each group are on the grid.
    assert values.min() == 0
    assert values.max() == 15


def test_constant_groups_get_a_nonzero_scale() -> None:
    w = torch.zeros(64, 64)
    w[1] = 3.0
    q = quantize_int4(w, group_size=32, packing="plain")
    assert (q.scale_zero[..., 0] != 0).all()
    assert torch.equal(q.dequantize(), w)
    # A constant group's value is its minimum: q = 0, zero = value + MIDPOINT * scale.
    assert int(unpack(q.packed, 64, 64, "plain")[0, 0]) == 0
    assert float(q.scale_zero[0, 0, 1]) == MIDPOINT


def test_every_packing_stands_for_the_same_weight() -> None:
    w = _weight(128, 128)
    plain = quantize_int4(w, group_size=64, packing="plain").dequantize()
    for packing in PACKING_BLOCK:
        assert torch.equal(quantize_int4(w, group_size=64, packing=packing).dequantize(), plain)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["auto", "plain"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [0, 1, 3, 17, INT4PACK_MAX_ROWS + 1])
def test_int4_linear_matches_the_dequantised_reference(mode: str, dtype: torch.dtype, rows: int) -> None:
    with kernel_mode(mode) as table:
        packing = table.int4_packing or "plain"
        weight = quantize_int4(_weight(), group_size=64, packing=packing)
        x = torch.randn(2, rows, 256, generator=torch.Generator().manual_seed(1)).to(dtype)
        y = int4_linear(x, weight)
        assert y.dtype == dtype
        assert y.shape == (2, rows, 128)
        if rows == 0:
            return
        path = table.int4_path(dtype, packing, rows=2 * rows)
        exact = path is Int4Path.DEQUANT and dtype == torch.float32
        assert _relative_error(y, x, weight) <= (1e-5 if exact else 2e-2)


def test_a_packing_this_machine_does_not_read_takes_dequant_and_computes() -> None:
    native = kernels.active_kernels().int4_packing
    for packing in PACKINGS:
        if packing == native:
            continue
        weight = quantize_int4(_weight(), group_size=32, packing=packing)  # type: ignore[arg-type]
        x = torch.randn(3, 256, generator=torch.Generator().manual_seed(2))
        assert _relative_error(int4_linear(x, weight), x, weight) <= 1e-5


def test_gradients_flow_to_the_activations() -> None:
    weight = quantize_int4(_weight(), group_size=64, packing=kernels.active_kernels().int4_packing or "plain")
    x = torch.randn(2, 256, requires_grad=True)
    int4_linear(x, weight).sum().backward()
    assert x.grad is not None
    assert torch.allclose(x.grad, weight.dequantize().sum(dim=0).expand(2, -1), atol=1e-5)


def test_bad_group_sizes_and_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="not one of"):
        quantize_int4(_weight(), group_size=48, packing="plain")
    with pytest.raises(ValueError, match="do not divide"):
        quantize_int4(_weight(64, 96), group_size=64, packing="plain")
    with pytest.raises(ValueError, match="cannot be packed"):
        quantize_int4(_weight(96, 128), group_size=64, packing="torch-avx512")
