"""The open-loop serving bench runs end to end on the tiny model, two arms of one request plan, and
writes the report it promises. Only structure and the absence of errors are checked (STYLE.md §14)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.serve_open_loop import main, schedule


def test_the_plan_is_seeded_and_in_bounds() -> None:
    plan = schedule(5.0, 50, seed=3)
    assert plan == schedule(5.0, 50, seed=3)
    assert [at for at, _, _ in plan] == sorted(at for at, _, _ in plan)
    assert all(8 <= tokens <= 64 for _, tokens, _ in plan)


@pytest.mark.slow
def test_open_loop_runs_and_reports(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "open.json"
    arms = ["whole=--encoder-step-share 0", "sliced=--encoder-step-share 0.000001"]
    argv = ["--model", str(tiny_model_dir), "--rate", "20", "--requests", "6", "--rounds", "1", "--virtual-tokens", "4"]
    assert main([*argv, "--arms", *arms, "--out", str(out)]) == 0

    report = json.loads(out.read_text())
    planned = sum(tokens for _, tokens, _ in schedule(20.0, 6, seed=0))
    assert [r["arm"] for r in report["results"]] == ["whole", "sliced"]
    for result in report["results"]:
        assert result["errors"] == 0
        assert result["requests"] == 6
        assert result["tokens"] == planned  # ignore_eos: every request generates what it asked for
        assert {"p50", "p90", "p99"} <= result["ttft_ms"].keys() == result["itl_ms"].keys()
        assert result["decode_step_ms"] > 0
    assert {"cpu_model", "torch"} <= report["machine"].keys()


def test_a_malformed_arm_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--arms", "no equals sign"])
    assert "is not name=flags" in capsys.readouterr().err
