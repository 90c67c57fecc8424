"""The decode benchmark runs end to end on a tiny Switch model and writes the report it promises.

No timing is checked here (STYLE.md §14): only that the code runs and the JSON has its keys.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

pytest.importorskip("transformers")

from bench.decode_report import print_report, write_plot
from bench.decode_vs_hf import DecodeBenchConfig, ensure_checkpoint, run

TINY_SWITCH = {
    "vocab_size": 96,
    "d_model": 16,
    "d_kv": 4,
    "d_ff": 32,
    "num_heads": 2,
    "num_layers": 2,
    "num_decoder_layers": 2,
    "num_sparse_encoder_layers": 1,
    "num_sparse_decoder_layers": 1,
    "num_experts": 4,
    "expert_capacity": 8,
    "relative_attention_num_buckets": 8,
    "decoder_start_token_id": 0,
    "pad_token_id": 0,
    "eos_token_id": 1,
}


def test_decode_benchmark_writes_report(tmp_path: Path) -> None:
    cfg = DecodeBenchConfig(
        cache_dir=tmp_path / "ckpt",
        model=TINY_SWITCH,
        batch_sizes=(1, 2),
        new_tokens=3,
        prompt_length=5,
        repeats=1,
        warmup=0,
        gemv_bytes=2**20,
    )
    report = json.loads(json.dumps(run(cfg, log=lambda _: None)))

    assert {"benchmark", "timestamp", "machine", "config", "results", "bandwidth", "target"} <= report.keys()
    assert {"cpu_model", "torch", "transformers", "torch_num_threads"} <= report["machine"].keys()
    assert [r["batch_size"] for r in report["results"]] == [1, 2]
    for result in report["results"]:
        for system in ("hf", "cpm2"):
            timing = result[system]
            assert {
                "t_1_s",
                "t_n_s",
                "tokens_per_s",
                "median_tokens_per_s",
                "best_tokens_per_s",
            } <= timing.keys()
            # One clean repeat wanted; a loaded machine makes the benchmark retry (up to 3 attempts).
            assert 1 <= len(timing["tokens_per_s"]) <= cfg.attempts_per_repeat * cfg.repeats
        assert {"ratio_median", "ratio_best", "tokens_match", "weight_bytes_per_step", "achieved_gb_s"} <= (
            result.keys()
        )
        assert result["tokens_match"] is True
    assert result["experts_per_moe_layer_per_step"] >= 1
    assert {"gemv", "reference_gb_s", "gemv_chain", "batch1"} <= report["bandwidth"].keys()
    assert report["bandwidth"]["batch1"]["weight_bytes_per_step"] > 0
    assert report["target"]["ratio_batch1_min"] == 1.5

    console = Console(file=io.StringIO(), width=120)
    print_report(report, console)
    assert "cpm2" in console.file.getvalue()
    pytest.importorskip("matplotlib")
    assert write_plot(report, tmp_path / "plot.png") == tmp_path / "plot.png"


def test_checkpoint_is_reused(tmp_path: Path) -> None:
    path = ensure_checkpoint(tmp_path / "ckpt", TINY_SWITCH, seed=0)
    stamp = (path / "config.json").stat().st_mtime_ns
    assert ensure_checkpoint(tmp_path / "ckpt", TINY_SWITCH, seed=0) == path
    assert (path / "config.json").stat().st_mtime_ns == stamp
