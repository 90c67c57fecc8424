"""The decode benchmark runs end to end on tiny Switch and NLLB-shaped models and writes the report it
promises; its NLLB-200-distilled-600M spec is the published config.

No timing is checked here (STYLE.md §14): only that the code runs and the JSON has its keys.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

pytest.importorskip("transformers")

from test_parity_m2m100 import NLLB_200_DISTILLED_600M as PUBLISHED_NLLB_600M

from bench.decode_models import BENCH_MODELS, BenchModel
from bench.decode_report import print_report, write_plot
from bench.decode_vs_hf import DecodeBenchConfig, default_out, ensure_checkpoint, run
from engine.errors import ConfigError
from engine.model import Seq2SeqLM
from engine.weights.hf import hf_to_config

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

NLLB = BENCH_MODELS["nllb-200-distilled-600m"]
TINY_MODELS = {
    "switch": dataclasses.replace(BENCH_MODELS["switch-d512-e64"], name="tiny-switch", config=TINY_SWITCH),
    # The NLLB spec (class, special ids, targets) at a tiny size.
    "nllb": dataclasses.replace(
        NLLB,
        name="tiny-nllb",
        config={
            **NLLB.config,
            "vocab_size": 96,
            "d_model": 16,
            "encoder_layers": 2,
            "decoder_layers": 2,
            "encoder_attention_heads": 2,
            "decoder_attention_heads": 2,
            "encoder_ffn_dim": 32,
            "decoder_ffn_dim": 32,
            "max_position_embeddings": 64,
        },
        forced_first_token=90,
    ),
}


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_decode_benchmark_writes_report(tmp_path: Path, name: str) -> None:
    model = TINY_MODELS[name]
    cfg = DecodeBenchConfig(
        cache_dir=tmp_path / "ckpt",
        model=model,
        batch_sizes=(1, 2),
        new_tokens=3,
        prompt_length=5,
        repeats=1,
        warmup=0,
        gemv_bytes=2**20,
        int8=name == "nllb",  # the dense translation model, as `make bench` runs it
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
        assert result["num_compared_tokens"] > 0
        parts = result["weight_bytes_per_step"]
        if name == "switch":
            assert result["experts_per_moe_layer_per_step"] >= 1
            assert parts["experts"] > 0
        else:
            assert result["experts_per_moe_layer_per_step"] is None
            assert parts["experts"] == parts["routers"] == 0
            assert parts["lm_head"] > 0
    assert {"gemv", "reference_gb_s", "gemv_chain", "batch1"} <= report["bandwidth"].keys()
    assert report["bandwidth"]["batch1"]["weight_bytes_per_step"] > 0
    target = report["target"]
    assert target["ratio_min"] == 1.5
    assert list(target["ratio_median"]) == [str(b) for b in model.target_batch_sizes if b in cfg.batch_sizes]
    assert report["config"]["model"]["name"] == model.name
    if cfg.int8:
        for result in report["results"]:
            # Timed like the others (no timing is checked: 3 tokens at warm-up 0 can even come out negative).
            assert {"t_1_s", "t_n_s", "median_tokens_per_s"} <= result["cpm2_int8"].keys()
            assert isinstance(result["ratio_int8_median"], float)
            assert 0 <= result["int8_tokens"]["same_position_fraction"] <= 1
            assert result["int8_tokens"]["num_compared"] > 0  # the int8 system's tokens were really compared
        assert list(report["target_int8"]["ratio_median"]) == list(target["ratio_median"])
        assert (tmp_path / "ckpt.int8" / "config.json").exists()
    else:
        assert "target_int8" not in report

    console = Console(file=io.StringIO(), width=120)
    print_report(report, console)
    assert "cpm2" in console.file.getvalue()
    assert ("cpm2 --dense int8" in console.file.getvalue()) == cfg.int8
    pytest.importorskip("matplotlib")
    assert write_plot(report, tmp_path / "plot.png") == tmp_path / "plot.png"


def test_checkpoint_is_reused(tmp_path: Path) -> None:
    model = TINY_MODELS["switch"]
    path = ensure_checkpoint(tmp_path / "ckpt", model, seed=0)
    stamp = (path / "config.json").stat().st_mtime_ns
    assert ensure_checkpoint(tmp_path / "ckpt", model, seed=0) == path
    assert (path / "config.json").stat().st_mtime_ns == stamp
    # Another spec in the same directory is rebuilt, not reused.
    ensure_checkpoint(tmp_path / "ckpt", dataclasses.replace(model, config={**TINY_SWITCH, "d_ff": 48}), seed=0)
    assert json.loads((path / "config.json").read_text())["d_ff"] == 48


def test_nllb_spec_is_the_published_config() -> None:
    """Every field of the spec is as published, every architecture field published is in the spec,
    and the shape has the published model's 615M parameters."""
    left_out = {"architectures", "model_type", "max_length", "num_hidden_layers", "tokenizer_class", "torch_dtype"}
    assert dict(NLLB.config) == {k: v for k, v in PUBLISHED_NLLB_600M.items() if k not in left_out}
    hf_config = NLLB.hf_config().to_dict()
    assert all(hf_config[k] == v for k, v in NLLB.config.items())
    config = hf_to_config(hf_config, has_lm_head=True, source=NLLB.name)
    with torch.device("meta"):
        model = Seq2SeqLM(config)
    assert sum(p.numel() for p in model.parameters()) == 615_073_792


def test_results_paths() -> None:
    assert default_out("switch-d512-e64", quick=False) == Path("bench/results/decode_vs_hf.json")
    assert default_out("switch-d512-e64", quick=True) == Path("bench/results/decode_vs_hf.quick.json")
    assert default_out(NLLB.name, quick=False) == Path("bench/results/decode_vs_hf_nllb-200-distilled-600m.json")


def test_unknown_hf_class_is_refused() -> None:
    model = BenchModel(name="x", hf_class="NoSuchModelForConditionalGeneration", config={}, summary="x")
    with pytest.raises(ConfigError, match="NoSuchModel"):
        model.hf_model_class()
