"""`bench.decode_vs_ct2` runs end to end on a tiny T5 v1.1 and writes the report it promises.

No timing is checked (STYLE.md §14): only the report's structure. Skipped when CTranslate2 is not
installed, unless `CPM2_REQUIRE_CT2=1` (then its absence fails).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from pathlib import Path

import pytest
from rich.console import Console

pytest.importorskip("transformers")
if os.environ.get("CPM2_REQUIRE_CT2") != "1":
    pytest.importorskip("ctranslate2", reason="ctranslate2 is not installed (pip install ctranslate2)")

from bench.decode_vs_ct2 import MODELS, Ct2BenchConfig, print_report, run

TINY_T5 = dataclasses.replace(
    MODELS["t5-v1_1-d512"],
    name="tiny-t5-v1_1",
    config={
        **MODELS["t5-v1_1-d512"].config,
        "vocab_size": 96,
        "d_model": 32,
        "d_kv": 8,
        "d_ff": 64,
        "num_heads": 4,
        "num_layers": 2,
        "num_decoder_layers": 2,
        "relative_attention_num_buckets": 8,
    },
)
SYSTEMS = ("ct2_float32", "cpm2_float32", "ct2_int8", "cpm2_int8")


def test_ct2_benchmark_writes_report(tmp_path: Path) -> None:
    cfg = Ct2BenchConfig(
        models=(TINY_T5,), cache_root=tmp_path, batch_sizes=(1, 2), new_tokens=3, prompt_length=5, repeats=1, warmup=0
    )
    report = json.loads(json.dumps(run(cfg, log=lambda _: None)))

    assert {"benchmark", "timestamp", "machine", "config", "results", "target"} <= report.keys()
    assert {"cpu_model", "torch", "ctranslate2", "torch_num_threads"} <= report["machine"].keys()
    assert [(r["model"], r["batch_size"]) for r in report["results"]] == [(TINY_T5.name, 1), (TINY_T5.name, 2)]
    for result in report["results"]:
        for system in SYSTEMS:
            assert {"t_1_s", "t_n_s", "median_tokens_per_s", "best_tokens_per_s"} <= result[system].keys()
            # Exactly N tokens per row from every system.
            assert result["generated_lengths"][system] == [cfg.new_tokens]
        for precision in ("float32", "int8"):
            # A tiny model's t_N - t_1 is noise (may even be negative): only its presence is checked.
            assert isinstance(result["ratio_median"][precision], float)
            assert result["agreement"][precision]["num_compared"] >= 0
            assert 0 <= result["agreement"][precision]["same_position_fraction"] <= 1
    target = report["target"]
    assert target["ratio_min"] == 1.0
    assert list(target["ratio_median"]) == [f"{TINY_T5.name}/1", f"{TINY_T5.name}/2"]
    assert isinstance(target["is_met"], bool)

    console = Console(file=io.StringIO(), width=160)
    print_report(report, console)
    assert "cpm2" in console.file.getvalue()
