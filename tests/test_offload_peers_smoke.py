"""The peers benchmark runs end to end on a tiny Switch model and writes the report it promises.

No timing is checked (STYLE.md §14): only that every system decodes, routes like cpm2 and the
JSON has its keys. The real run needs the 3 GB checkpoint (`python -m bench.offload_peers`).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from bench.offload_hf import expert_granular_device_map, model_bytes
from bench.offload_peers import SYSTEMS, PeersBenchConfig, print_report, run, write_plot
from engine.weights.convert import convert_hf

TINY_SWITCH = {
    "vocab_size": 96,
    "d_model": 16,
    "d_kv": 4,
    "d_ff": 32,
    "num_heads": 2,
    "num_layers": 2,
    "num_decoder_layers": 2,
    "num_sparse_encoder_layers": 2,
    "num_sparse_decoder_layers": 2,
    "num_experts": 8,
    "expert_capacity": 64,
    "relative_attention_num_buckets": 8,
    "decoder_start_token_id": 0,
    "pad_token_id": 0,
    "eos_token_id": 1,
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    root = tmp_path_factory.mktemp("peers")
    torch.manual_seed(0)
    model = SwitchTransformersForConditionalGeneration(SwitchTransformersConfig(**TINY_SWITCH))
    model.to(torch.bfloat16).save_pretrained(root / "hf")
    return root / "hf", convert_hf(root / "hf", root / "cpm2", progress=False)


def test_expert_granular_map_puts_experts_on_disk(checkpoints: tuple[Path, Path]) -> None:
    hf_dir, _ = checkpoints
    device_map = expert_granular_device_map(hf_dir)
    experts = {k: v for k, v in device_map.items() if ".experts.expert_" in k}
    assert len(experts) == 4 * 8
    assert set(experts.values()) == {"disk"}
    assert {v for k, v in device_map.items() if k not in experts} == {"cpu"}
    half = expert_granular_device_map(hf_dir, resident_share=0.5)
    assert sum(v == "cpu" for k, v in half.items() if k in experts) == 4 * 4
    sizes = model_bytes(hf_dir)
    assert sizes.num_experts == 32
    assert 0 < sizes.experts < sizes.total


def test_peers_benchmark_writes_report(checkpoints: tuple[Path, Path], tmp_path: Path) -> None:
    cfg = PeersBenchConfig(
        batches=(1, 2),
        steps=2,
        warmup=1,
        repeats=1,
        measure_bandwidth=False,
        cache_root=tmp_path,
        log=lambda _: None,
    )
    report = json.loads(json.dumps(run(cfg, checkpoints=checkpoints), default=str))

    assert {
        "benchmark",
        "machine",
        "config",
        "model",
        "ram_budget",
        "results",
        "target",
        "systems",
    } <= report.keys()
    assert {"cpu_model", "torch", "transformers", "accelerate"} <= report["machine"].keys()
    assert len(report["results"]) == 2 * 2 * len(SYSTEMS)
    for row in report["results"]:
        assert row["tokens_per_second"] > 0
        assert {
            "tokens_per_second_all",
            "storage_bytes_per_token",
            "runs",
            "cpm2_speedup",
            "routing",
        } <= row.keys()
        assert row["routing_agreement_with_cpm2"] >= 0.5  # same ids; bf16 may flip near-ties
        assert row["routed_expert_bytes_per_token"] > 0
    assert {(t["batch"], t["cpm2"]) for t in report["target"]["rows"]} == {
        (b, s) for b in (1, 2) for s in ("cpm2-strict", "cpm2-page-cache")
    }

    console = Console(file=io.StringIO(), width=200)
    print_report(report, console)
    assert "accelerate-expert" in console.file.getvalue()
    pytest.importorskip("matplotlib")
    assert write_plot(report, tmp_path / "plot.png") == tmp_path / "plot.png"
