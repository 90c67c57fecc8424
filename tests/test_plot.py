"""`cpm2 plot`: curves come from the metrics logs as written, and the PNG is a real image."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import pytest

from cpm2.cli import main
from engine.errors import ConfigError, InputError
from training.plot import plot_metrics, read_curves


def _write_log(path: Path, *, scale: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(10, 110, 10):
        lines.append({"step": step, "loss": scale * 10 / step, "lr": 0.01, "tokens": step * 100})
        if step % 50 == 0:
            lines.append({"step": step, "eval_acc/add": step / 200, "eval_acc/same": step / 100 * scale})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_curves_are_the_logged_values(tmp_path: Path) -> None:
    log = _write_log(tmp_path / "a" / "metrics.jsonl", scale=1.0)
    (loss,) = read_curves(log, ["loss"], label="a")
    assert loss.steps == list(range(10, 110, 10))
    assert loss.values == pytest.approx([10 / s for s in loss.steps])
    accuracy = read_curves(log, ["eval_acc/*"], label="a")
    assert [(c.metric, c.steps, c.values) for c in accuracy] == [
        ("eval_acc/add", [50, 100], [0.25, 0.5]),
        ("eval_acc/same", [50, 100], [0.5, 1.0]),
    ]
    assert read_curves(log, ["missing"], label="a") == []


def test_png_is_written_and_reads_back(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = _write_log(tmp_path / "scratch" / "metrics.jsonl", scale=1.0)
    second = _write_log(tmp_path / "ki" / "metrics.jsonl", scale=0.5)
    out = tmp_path / "plots" / "curves.png"
    argv = ["plot", str(first), str(second), "--out", str(out), "--metric", "loss", "--metric", "eval_acc/*"]
    assert main([*argv, "--labels", "from scratch", "KI", "--log-y"]) == 0
    assert "from scratch loss: 10 points" in capsys.readouterr().out
    assert out.stat().st_size > 10_000
    image = matplotlib.image.imread(out)
    assert image.shape[:2] == (864, 840)  # two panels: 7 x 7.2 inches at 120 dpi
    assert float(image[..., :3].std()) > 0.01  # curves, axes and text, not a blank canvas

    curves = plot_metrics([first, second], tmp_path / "default.png")
    assert [c.label for c in curves] == ["scratch", "ki"]  # labelled by the run directory


def test_mistakes_are_reported(tmp_path: Path) -> None:
    log = _write_log(tmp_path / "a" / "metrics.jsonl", scale=1.0)
    with pytest.raises(ConfigError, match="one label per log"):
        plot_metrics([log], tmp_path / "x.png", labels=["a", "b"])
    with pytest.raises(ConfigError, match="has a metric matching"):
        plot_metrics([log], tmp_path / "x.png", metrics=["perplexity"])
    with pytest.raises(ConfigError, match="does not exist"):
        plot_metrics([tmp_path / "nope.jsonl"], tmp_path / "x.png")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"step": 1, "loss": 2.0}\nnot json\n')
    with pytest.raises(InputError, match=r"broken\.jsonl:2"):
        plot_metrics([broken], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
