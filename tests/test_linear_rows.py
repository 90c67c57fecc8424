"""`linear` pads row counts to a bounded set of sizes (oneDNN caches one primitive per shape) without
changing any result: the real rows come out as `F.linear` computes them, in the input's shape."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.model.linear import EXACT_ROWS, linear, pack_weight, padded_rows


def test_padded_rows_are_exact_for_decode_batches_and_few_above() -> None:
    assert [padded_rows(r) for r in range(EXACT_ROWS + 1)] == list(range(EXACT_ROWS + 1))
    sizes = {padded_rows(r) for r in range(1, 4097)}
    assert len(sizes) == EXACT_ROWS + 8 * 7  # eight sizes per octave from 33 to 4096
    assert all(r <= padded_rows(r) <= 1.125 * r for r in range(1, 4097))
    assert padded_rows(padded_rows(1000)) == padded_rows(1000) == 1024


@pytest.mark.parametrize("is_packed", [True, False])
@pytest.mark.parametrize("shape", [(1, 64), (33, 64), (3, 37, 64), (0, 64)])
def test_padded_linear_matches_f_linear(is_packed: bool, shape: tuple[int, ...]) -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 64, generator=generator)
    x = torch.randn(*shape, generator=generator)
    with torch.inference_mode():
        y = linear(x, pack_weight(weight) if is_packed else weight)
    assert y.shape == (*shape[:-1], 48)
    torch.testing.assert_close(y, F.linear(x, weight), rtol=1e-5, atol=1e-5)
