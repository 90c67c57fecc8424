"""Int8 weights (`engine.model.quant`) and the CPU path chosen for them (`engine.model.kernels`).

Every path is compared with the float reference `x @ W_deq.T` (float64), as max |y - ref| / max |ref|:
- `dequant` in float32: exact up to summation order (1e-5);
- `dequant` in bfloat16, and `int8pack-bf16` under either dtype: bfloat16 activations, weights
  (exact: int8 values) and product, so a few units of bf16's 2^-8 precision (2e-2);
- `w8a8` under either dtype: activations rounded to int8 per row (half a step of max |x_row| / 127
  each), the product exact (3e-2);
and the same on the AVX2-only imitation of `test_cpu_kernels` (which must pick `dequant`) and under
`cpu_kernels=plain`. No timing is checked here (STYLE.md §14): `python -m bench.int8_kernels` measures.
"""

from __future__ import annotations

import pytest
import torch
from test_cpu_kernels import _like_avx2

from engine.model import kernels
from engine.model.kernels import INT8PACK_IN_MULTIPLE, INT8PACK_MAX_ROWS, Int8Path, kernel_mode
from engine.model.quant import Int8Weight, _dequant, _int8pack_bf16, _w8a8, int8_linear, quantize_int8

DTYPES = [torch.float32, torch.bfloat16]
ROWS = [0, 1, INT8PACK_MAX_ROWS, INT8PACK_MAX_ROWS + 1, 70]
#: max |y - ref| / max |ref| per (path, activation dtype); see the module docstring.
TOLERANCE = {
    (Int8Path.DEQUANT, torch.float32): 1e-5,
    (Int8Path.DEQUANT, torch.bfloat16): 2e-2,
    (Int8Path.INT8PACK_BF16, torch.float32): 2e-2,
    (Int8Path.INT8PACK_BF16, torch.bfloat16): 2e-2,
    (Int8Path.W8A8, torch.float32): 3e-2,
    (Int8Path.W8A8, torch.bfloat16): 3e-2,
}
PATHS = {Int8Path.DEQUANT: _dequant, Int8Path.INT8PACK_BF16: _int8pack_bf16, Int8Path.W8A8: _w8a8}


def _weight(out_features: int = 96, in_features: int = 2 * INT8PACK_IN_MULTIPLE, seed: int = 0) -> Int8Weight:
    generator = torch.Generator().manual_seed(seed)
    return quantize_int8(torch.randn(out_features, in_features, generator=generator) * 0.05)


def _x(*shape: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _relative_error(y: torch.Tensor, x: torch.Tensor, weight: Int8Weight) -> float:
    reference = x.double() @ weight.dequantize().double().T
    if reference.numel() == 0:
        return 0.0
    return float((y.double() - reference).abs().max() / reference.abs().max())


def _check(y: torch.Tensor, x: torch.Tensor, weight: Int8Weight, tolerance: float) -> None:
    assert y.dtype == x.dtype
    assert y.shape == (*x.shape[:-1], weight.shape[0])
    assert _relative_error(y, x, weight) <= tolerance


def _taken(dtype: torch.dtype, rows: int = 1) -> Int8Path:
    return kernels.active_kernels().int8_path(dtype, rows)


def _tolerance(dtype: torch.dtype, rows: int) -> float:
    """The tolerance of the path `int8_linear` takes for `rows` rows here."""
    return TOLERANCE[_taken(dtype, rows), dtype]


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", ROWS)
def test_every_path_matches_the_dequantised_reference(path: Int8Path, dtype: torch.dtype, rows: int) -> None:
    if path is Int8Path.INT8PACK_BF16:
        with kernel_mode("auto") as table:
            if table.int8_path(dtype) is not path:
                pytest.skip(f"{path} is not available on this CPU: {table.for_dtype(dtype).int8_reason}")
    if path is Int8Path.W8A8 and (refusal := kernels._probe_int_mm()) is not None:
        pytest.skip(refusal)
    weight, x = _weight(), _x(rows, 2 * INT8PACK_IN_MULTIPLE, dtype=dtype)
    y_MN = PATHS[path](x, weight).to(dtype)
    _check(y_MN, x, weight, TOLERANCE[path, dtype])


@pytest.mark.parametrize("mode", ["auto", "plain"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(0, 5), (1, 1), (3, 1), (2, 7), (4, 30)], ids=str)
def test_int8_linear_takes_any_leading_dims(mode: str, dtype: torch.dtype, shape: tuple[int, int]) -> None:
    weight = _weight()
    x = _x(*shape, weight.shape[1], dtype=dtype)
    with kernel_mode(mode):  # type: ignore[arg-type]
        _check(int8_linear(x, weight), x, weight, _tolerance(dtype, x.numel() // x.shape[-1]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_in_features_int8pack_gets_wrong_take_dequant(dtype: torch.dtype) -> None:
    # torch 2.13's `_weight_int8pack_mm` returns garbage (or crashes) when `in` % 32 != 0.
    weight = _weight(out_features=7, in_features=INT8PACK_IN_MULTIPLE + 1)
    x = _x(3, weight.shape[1], dtype=dtype)
    with kernel_mode("auto"):
        _check(int8_linear(x, weight), x, weight, _tolerance(dtype, 3))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_beyond_the_few_rows_path_take_the_many_rows_path(dtype: torch.dtype) -> None:
    weight = _weight()
    with kernel_mode("auto") as table:
        choice = table.for_dtype(dtype)
        assert table.int8_path(dtype, INT8PACK_MAX_ROWS) is choice.int8
        assert table.int8_path(dtype, INT8PACK_MAX_ROWS + 1) is choice.int8_many
        for rows in (INT8PACK_MAX_ROWS, INT8PACK_MAX_ROWS + 1):
            x = _x(rows, weight.shape[1], dtype=dtype)
            y = int8_linear(x, weight)
            # The very function of the path chosen, bit for bit.
            assert torch.equal(y, PATHS[table.int8_path(dtype, rows)](x, weight).to(dtype))


def test_w8a8_rows_do_not_depend_on_each_other() -> None:
    """Each row is quantised by its own scale: a row with a 1000x larger activation beside it gets
    exactly the result it gets alone (a per-tensor scale would crush it)."""
    if (refusal := kernels._probe_int_mm()) is not None:
        pytest.skip(refusal)
    weight, x = _weight(), _x(6, 2 * INT8PACK_IN_MULTIPLE, dtype=torch.float32)
    x[0] *= 1000
    together = _w8a8(x, weight)
    for row in range(1, 6):
        assert torch.equal(together[row], _w8a8(x[row : row + 1], weight)[0])
    _check(together[1:], x[1:], weight, TOLERANCE[Int8Path.W8A8, torch.float32])


def test_successive_weights_through_the_scratch_buffer() -> None:
    # The dequant path casts every weight into one reused buffer: each result must be its own.
    x = _x(40, 2 * INT8PACK_IN_MULTIPLE, dtype=torch.float32)
    small, large, other = _weight(16, seed=2), _weight(128, seed=3), _weight(16, seed=4)
    with kernel_mode("plain"):
        for weight in (small, large, other, small):
            _check(int8_linear(x, weight), x, weight, TOLERANCE[Int8Path.DEQUANT, torch.float32])


def test_gradients_flow_to_the_activations() -> None:
    weight, x = _weight(), _x(5, 2 * INT8PACK_IN_MULTIPLE, dtype=torch.float32).requires_grad_()
    int8_linear(x, weight).sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad, weight.dequantize().sum(0).expand_as(x), rtol=1e-5, atol=1e-5)


def test_choice_on_this_machine() -> None:
    """What torch says about this CPU decides the path; the reason says why and what changes."""
    with kernel_mode("auto") as table:
        fast = (
            torch.backends.cpu.get_cpu_capability().startswith("AVX512")
            and table.uses_onednn(torch.bfloat16)
            and torch.cpu._is_avx512_bf16_supported()
        )
        for dtype in DTYPES:
            choice = table.for_dtype(dtype)
            assert choice.to_dict()["int8"] == str(choice.int8)
            assert choice.to_dict()["int8_many"] == str(choice.int8_many)
            if fast:
                assert choice.int8 is Int8Path.INT8PACK_BF16, choice.int8_reason
            else:
                assert choice.int8 is Int8Path.DEQUANT
                assert choice.int8_reason
            if torch.backends.cpu.get_cpu_capability().startswith("AVX512") and kernels._probe_int_mm() is None:
                assert choice.int8_many is Int8Path.W8A8
                assert "quantised per row" in choice.int8_reason
            else:
                assert choice.int8_many is Int8Path.DEQUANT
        if fast:
            assert "bfloat16" in table.for_dtype(torch.float32).int8_reason
        assert "int8" in kernels.describe().splitlines()[1]


def test_plain_mode_takes_dequant() -> None:
    with kernel_mode("plain") as table:
        for dtype in DTYPES:
            assert table.int8_path(dtype) is Int8Path.DEQUANT
            assert table.int8_path(dtype, 100) is Int8Path.DEQUANT
            assert "cpu_kernels=plain" in table.for_dtype(dtype).int8_reason


@pytest.mark.parametrize("torch_says_so", [True, False], ids=["torch-check", "op-probe"])
def test_cpu_without_bf16_kernels_takes_dequant_and_computes(
    monkeypatch: pytest.MonkeyPatch, torch_says_so: bool
) -> None:
    _like_avx2(monkeypatch, torch_says_so=torch_says_so)
    weight = _weight()
    with kernel_mode("auto") as table:
        for dtype in DTYPES:
            assert table.int8_path(dtype) is Int8Path.DEQUANT
            assert table.int8_path(dtype, 70) is Int8Path.DEQUANT
            assert "reports AVX2" in table.for_dtype(dtype).int8_reason
            for rows in (0, 1, 70):
                x = _x(2, rows, weight.shape[1], dtype=dtype)
                # bf16 runs F.linear here (oneDNN refuses it), float32 keeps oneDNN.
                _check(int8_linear(x, weight), x, weight, TOLERANCE[Int8Path.DEQUANT, dtype])


def test_failing_int8pack_is_caught_by_the_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("no int8pack kernel here")

    monkeypatch.setattr(torch, "_weight_int8pack_mm", broken)
    with kernel_mode("auto") as table:
        choice = table.for_dtype(torch.bfloat16)
        weight, x = _weight(), _x(3, 2 * INT8PACK_IN_MULTIPLE, dtype=torch.bfloat16)
        assert choice.int8 is Int8Path.DEQUANT
        assert choice.int8_reason
        _check(int8_linear(x, weight), x, weight, TOLERANCE[Int8Path.DEQUANT, torch.bfloat16])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_round_trip_is_within_half_a_step(dtype: torch.dtype) -> None:
    w = (torch.randn(33, 70, generator=torch.Generator().manual_seed(5)) * 3).to(dtype)
    w[4] = 0  # a zero row: scale 1, values 0
    weight = quantize_int8(w)
    assert weight.q.dtype == torch.int8
    assert weight.scale.dtype == torch.float32
    assert weight.q.abs().max() <= 127
    assert weight.scale[4] == 1
    assert not weight.q[4].any()
    assert torch.all(weight.scale > 0)
    error = (w.float() - weight.dequantize()).abs()
    # Half a step, plus float32's rounding of q * scale (a unit or two in the last place of |w|).
    assert torch.all(error <= weight.scale.unsqueeze(1) / 2 + w.float().abs() * 2**-22)
    assert weight.dequantize(torch.bfloat16).dtype == torch.bfloat16


def test_the_dequant_path_works_in_and_out_of_inference_mode() -> None:
    """Its scratch buffer, made under `torch.inference_mode()`, must not be written outside it
    (loading calibrates outside inference mode after a decode ran inside it)."""
    weight = quantize_int8(torch.randn(64, 64))
    x = torch.randn(64, 64)  # 64 rows: more than the int8pack path takes, so `dequant` runs
    with torch.inference_mode():
        inside = int8_linear(x, weight)
    with torch.no_grad():
        outside = int8_linear(x, weight)
    assert torch.equal(inside, outside)


def test_quantizing_a_block_of_rows_at_a_time_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """`quantize_int8` works through a large matrix in blocks of rows (bounded temporaries): the
    values and scales are those of the whole matrix at once, as rows are independent."""
    w = torch.randn(37, 64, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 3, 37).unsqueeze(1)
    w[5] = 0  # an all-zero row keeps scale 1
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    q = torch.round(w / scale.unsqueeze(1)).clamp(-127, 127).to(torch.int8)
    monkeypatch.setattr("engine.model.quant.QUANTIZE_CHUNK_ELEMENTS", 5 * 64)  # 8 blocks, the last short
    blocked = quantize_int8(w)
    assert torch.equal(blocked.q, q)
    assert torch.equal(blocked.scale, scale)
