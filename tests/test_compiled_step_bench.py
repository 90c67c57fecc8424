"""`bench.compiled_step` on a tiny T5: eager and compiled decoders run side by side and report."""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path

import pytest
from rich.console import Console
from torch._dynamo.utils import counters

pytest.importorskip("transformers")

from bench.compiled_step import (
    CANDIDATES,
    VARIANTS,
    CompileBenchConfig,
    _parse_args,
    compile_decoder,
    print_report,
    run,
)
from bench.decode_models import BenchModel
from engine.config import ModelConfig
from engine.errors import ConfigError
from engine.model import Seq2SeqLM

TINY = BenchModel(
    name="t5-tiny",
    hf_class="T5ForConditionalGeneration",
    config={
        "vocab_size": 64,
        "d_model": 32,
        "d_kv": 8,
        "d_ff": 64,
        "num_heads": 4,
        "num_layers": 1,
        "num_decoder_layers": 2,
        "feed_forward_proj": "gated-gelu",
        "tie_word_embeddings": False,
        "decoder_start_token_id": 0,
        "pad_token_id": 0,
        "eos_token_id": 1,
    },
    summary="tiny T5",
    min_prompt_id=3,
)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler")
def test_compiled_step_reports_every_variant(tmp_path: Path) -> None:
    counters.clear()  # dynamo's graph count is per process: count this run's alone
    cfg = CompileBenchConfig(
        model=TINY, cache_root=tmp_path, batch_sizes=(1, 3), new_tokens=3, prompt_length=5, repeats=1
    )
    report = run(cfg, log=lambda _msg: None)
    json.dumps(report)  # what publish writes
    assert [r["batch_size"] for r in report["results"]] == [1, 3]
    for row in report["results"]:
        assert set(VARIANTS) <= row.keys()
        for variant in VARIANTS[1:]:
            # Timings of a 3-token tiny model are noise (t_N may even come in under t_1): only their
            # presence is checked, never their value.
            assert math.isfinite(row["ratio_median"][variant])
            # Float32 on a tiny model: the compiled kernels choose the same greedy tokens.
            assert row["agreement"][variant]["num_compared"] == cfg.new_tokens * row["batch_size"]
    assert set(report["verdict"]["wins"]) == set(CANDIDATES)
    # The compiled variants did compile: graphs before the timed runs, and their first calls paid for it.
    first_row = report["results"][0]
    assert first_row["graphs_compiled_before"] > 0
    assert first_row["graphs_compiled"] >= first_row["graphs_compiled_before"]
    out = io.StringIO()
    print_report(report, Console(file=out, width=200))
    assert "compiled ÷ eager" in out.getvalue()


def test_variants_compile_what_they_name() -> None:
    config = ModelConfig(
        vocab_size=64, d_model=32, num_heads=4, d_kv=8, d_ff=64, num_encoder_layers=1, num_decoder_layers=2
    )
    whole = compile_decoder(Seq2SeqLM(config), "compiled")
    assert whole.decoder._compiled_call_impl is not None
    assert all(block._compiled_call_impl is None for block in whole.decoder.layers())
    parts = compile_decoder(Seq2SeqLM(config), "compiled_sublayers")
    assert parts.decoder._compiled_call_impl is None
    for block in parts.decoder.layers():
        assert block.attn._compiled_call_impl is None  # self-attention writes the cache: stays eager
        for sublayer in (block.attn_norm, block.cross_norm, block.cross, block.ff_norm, block.mlp):
            assert sublayer._compiled_call_impl is not None
    for eager in ("eager", "eager_unpacked"):
        assert compile_decoder(Seq2SeqLM(config), eager).decoder._compiled_call_impl is None


def test_refusals() -> None:
    with pytest.raises(ConfigError, match="unknown variant"):
        compile_decoder(None, "jit")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="new_tokens"):
        CompileBenchConfig(new_tokens=1)
    with pytest.raises(SystemExit):
        _parse_args(["--model", "nope"])
    cfg, out = _parse_args(["--quick"])
    assert (cfg.new_tokens, cfg.repeats, out) == (8, 1, Path("bench/results/compiled_step.quick.json"))
