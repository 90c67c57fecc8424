"""`bench.prediction` scores both predictors on the demo model's served stream and on a random
model's decode steps, and writes the report it promises (structure only, no figure is asserted)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from bench.prediction import FITTED, PREDICTORS, main, score_random


def _check_scores(scores: dict, layers: set[str]) -> None:
    assert set(scores["per_layer"]) == layers
    for rates in [*scores["per_layer"].values(), scores["decoder"]]:
        assert set(rates) == set(PREDICTORS + FITTED)
        for name in PREDICTORS:
            assert 0.0 <= rates[name]["precision"] <= 1.0
            assert 0.0 <= rates[name]["recall"] <= 1.0
    for fit in scores["fits"].values():
        assert fit["tokens_seen"] > 0


def test_scores_a_random_models_decode_steps(tiny_model_dir: Path) -> None:
    scores = score_random(tiny_model_dir, batch=2, steps=4, sequences=2)
    # Every MoE layer is predicted (the first of its stack from the stack's input) and scored.
    _check_scores(scores, set(scores["fits"]))
    assert any(layer.startswith("decoder") for layer in scores["fits"])
    # Nothing fitted in so few tokens: the calibrated guesses are the router's.
    assert not any(f["fit_kept"] for f in scores["fits"].values())
    for rates in scores["per_layer"].values():
        assert rates["router"] == rates["calibrated"]
        assert math.isnan(rates["calibrated_while_fitted"]["precision"])


def test_quick_run_writes_the_demo_report(tmp_path: Path) -> None:
    out = tmp_path / "prediction.json"
    assert main(["--quick", "--demo-examples", "2", "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".quick.json").read_text())
    assert report["benchmark"] == "prediction"
    assert [(r["model"], r["batch"]) for r in report["rows"]] == [("demo", 1), ("demo", 16)]
    for row in report["rows"]:
        _check_scores(row, set(row["fits"]))
