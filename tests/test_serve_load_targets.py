"""bench.serve_load's targets, computed from results (no server: the arithmetic the report prints)."""

from __future__ import annotations

import pytest

from bench.serve_load import LoadResult, _targets


def _result(concurrency: int, tok_s: float, step_ms: float, encode_share: float) -> LoadResult:
    return LoadResult(
        concurrency=concurrency,
        scenario="one prompt",
        requests=32,
        tokens=1024,
        wall_seconds=1024 / tok_s,
        tokens_per_second=tok_s,
        ttft_ms={},
        itl_ms={},
        e2e_ms={},
        mean_batch_size=float(concurrency),
        mean_distinct_prompts=1.0,
        decode_step_ms=step_ms,
        encode_seconds_share=encode_share,
    )


def test_the_share_of_the_step_bound_and_what_encoding_leaves_of_it() -> None:
    # One client: 5 ms steps, 20 % of the time encoding. Sixteen: 20 ms steps (bound 16 x 5 / 20 = 4x),
    # 3x the tok/s (0.75 of the bound), 40 % encoding (at most 0.6 / 0.8 = 0.75 of the bound).
    targets = _targets([_result(1, 100.0, 5.0, 0.2), _result(16, 300.0, 20.0, 0.4)])
    assert targets["c16_over_c1 (one prompt)"] == pytest.approx(3.0)
    assert targets["c16_decode_step_bound (one prompt)"] == pytest.approx(4.0)
    assert targets["share of the decode-step bound (C=16, one prompt)"] == pytest.approx(0.75)
    assert targets["most of the bound encoding leaves (C=16, one prompt)"] == pytest.approx(0.75)
    assert not any("C=1," in name for name in targets)  # one client is the reference, not a row
