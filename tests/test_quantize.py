"""`cpm2 quantize --experts int8`: quantise → load → generate, offloaded equal to resident (the
offloaded = resident tests run for int4 experts too; the rest of int4 is tests/test_quantize_int4.py).

A quantised model's experts live only in its int8 store. Resident (they fit the budget) they are
read into RAM once; offloaded they move through the pool as int8 blobs. Both compute the same
kernel on the same bytes, so every budget and transfer mode gives the resident model's tokens and
logits exactly, as for float experts (tests/test_offload.py). The budget counts int8 bytes.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch
from quantized_models import logit_error, offloaded
from test_offload import _drop_page_cache, _forward, _requests

from cpm2.cli import main as cpm2_main
from engine.errors import CheckpointError, ConfigError
from engine.experts.store import ExpertStore
from engine.generation import Generator
from engine.offload import OffloadConfig, load_for_inference
from engine.weights.loader import inspect_checkpoint, load_model
from engine.weights.quantize import REPORT_FILE, quantize_model, quantized_experts


@pytest.fixture(scope="module", params=["int8", "int4"])
def quantized_dir(request: pytest.FixtureRequest, int8_dir: Path, int4_dir: Path) -> Path:
    """The source with int8 experts, and with int4 ones (conftest's `int8_dir`, `int4_dir`)."""
    return int8_dir if request.param == "int8" else int4_dir


@pytest.fixture(scope="module")
def resident(quantized_dir: Path) -> tuple[list[list[int]], torch.Tensor, int]:
    loaded = load_for_inference(quantized_dir, progress=False)
    assert not loaded.is_offloaded
    vocab = min(loaded.model.config.vocab_size, 1000)
    tokens = [r.token_ids for r in Generator(loaded.model).generate(_requests(vocab))]
    return tokens, _forward(loaded.model, vocab), vocab


def test_the_directory_records_int8_experts(source_dir: Path, int8_dir: Path) -> None:
    info = inspect_checkpoint(int8_dir)
    assert quantized_experts(info.config) == "int8"
    store = ExpertStore.open(int8_dir, info.config)
    assert store.dtype == torch.int8
    source = inspect_checkpoint(source_dir)
    layout = store.layout
    per_expert_float = layout.part_bytes * len(layout.part_names) * source.stored_dtype.itemsize
    # int8 values plus one float32 scale per row: about a quarter of float32.
    assert layout.payload_bytes < 0.3 * per_expert_float
    report = json.loads((int8_dir / REPORT_FILE).read_text())
    num_parts = len(layout.part_names)
    assert len(report["tensors"]) == len(store.keys) * store.num_experts * num_parts
    assert 0 < report["mean_abs"] <= report["max_abs"]
    assert 0 <= report["top1_agreement"] <= 1
    assert report["logit_max_abs_diff"] >= 0
    assert report["num_inputs"] == 2


def test_int8_is_close_to_float(source_dir: Path, int8_dir: Path) -> None:
    error, agreement = logit_error(source_dir, int8_dir)
    # Random weights: the error is rounding noise, well under the logits' spread on average. A few
    # positions can differ more: a learned router may send a token to another expert once its
    # input moved by that noise (Switch).
    assert error < 0.1
    assert agreement >= 0.9


@pytest.mark.parametrize(
    "options",
    [
        {"expert_memory": "40%", "direct_io": True},
        {"expert_memory": "75%", "direct_io": True, "order": "index", "window": 1},
        {"expert_memory": "40%"},  # page-cache mode: quantised blobs computed in place from the mapping
    ],
)
def test_offloaded_equals_resident(quantized_dir: Path, resident, options: dict[str, object]) -> None:
    tokens, logits, vocab = resident
    loaded = offloaded(quantized_dir, **options)
    try:
        provider = loaded.provider
        assert provider is not None
        assert [r.token_ids for r in Generator(loaded.model).generate(_requests(vocab))] == tokens
        assert torch.equal(_forward(loaded.model, vocab), logits)
        if options.get("direct_io"):
            assert provider.stats.misses > 0
            # What moves is the quantised blob: each transfer is one blob's payload.
            store = ExpertStore.open(quantized_dir, loaded.info.config)
            assert store.layout.is_quantized
            assert provider.bytes_per_expert == store.layout.payload_bytes
            assert provider.stats.bytes_moved == provider.stats.transfers * provider.bytes_per_expert
    finally:
        loaded.close()


def test_cold_store_reads_quantized_blobs(quantized_dir: Path, resident, tmp_path: Path) -> None:
    import shutil

    tokens, _, vocab = resident
    copy = Path(shutil.copytree(quantized_dir, tmp_path / "copy"))
    loaded = offloaded(copy, expert_memory="40%")
    _drop_page_cache(copy)
    try:
        assert [r.token_ids for r in Generator(loaded.model).generate(_requests(vocab))] == tokens
        assert loaded.provider is not None
        assert loaded.provider.stats.misses > 0
    finally:
        loaded.close()


def test_bfloat16_compute_offloaded_equals_resident(quantized_dir: Path) -> None:
    resident = load_for_inference(quantized_dir, dtype="bfloat16", progress=False)
    loaded = load_for_inference(
        quantized_dir, dtype="bfloat16", offload=OffloadConfig(expert_memory="40%", direct_io=True), progress=False
    )
    try:
        vocab = min(resident.model.config.vocab_size, 1000)
        assert torch.equal(_forward(loaded.model, vocab), _forward(resident.model, vocab))
    finally:
        loaded.close()


def test_the_budget_counts_int8_bytes(source_dir: Path, int8_dir: Path) -> None:
    from engine.summary import summarize

    float_expert = summarize(inspect_checkpoint(source_dir).config).bytes_per_expert
    # Room for three float experts: both models must offload, the int8 one into about 4x the slots.
    budget = OffloadConfig(expert_memory=3 * float_expert)
    as_float = load_for_inference(source_dir, offload=budget, progress=False)
    as_int8 = load_for_inference(int8_dir, offload=budget, progress=False)
    try:
        assert as_float.plan is not None
        assert as_int8.plan is not None
        assert as_float.is_offloaded
        assert as_int8.is_offloaded
        assert as_int8.plan.bytes_per_expert < 0.3 * as_float.plan.bytes_per_expert
        assert as_int8.plan.expert_bytes < 0.3 * as_float.plan.expert_bytes
        assert as_float.plan.num_slots == 3
        assert as_int8.plan.num_slots >= 3 * as_float.plan.num_slots
    finally:
        as_float.close()
        as_int8.close()


def test_refusals_write_nothing(source_dir: Path, int8_dir: Path, tmp_path: Path) -> None:
    cases = [
        ({"experts": "int3"}, ConfigError, "unknown format"),
        ({"experts": "int8", "dense": "int4"}, ConfigError, "unknown format"),
        ({"experts": None}, ConfigError, "nothing to quantise"),
        ({"experts": None, "dense": "int8", "group_size": 32}, ConfigError, "apply to --experts int4 only"),
        ({"experts": "int8", "packing": "torch-avx2"}, ConfigError, "apply to --experts int4 only"),
        ({"experts": "int4", "packing": "nibbles"}, ConfigError, "--packing nibbles: unknown"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            quantize_model(source_dir, tmp_path / "out", progress=False, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="already quantised"):
        quantize_model(int8_dir, tmp_path / "out", progress=False)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not empty"):
        quantize_model(source_dir, taken, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no output, no temporary left


def test_a_dense_model_has_no_experts_to_quantise(hf_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no experts"):
        quantize_model(hf_model_dirs["t5-v1.1"], tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["t5-v1.0", "t5-v1.1", "switch-8e-capacity"])
def test_dense_int8_runs_every_matmul_in_int8(name: str, hf_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """`--dense int8`: every linear layer (and a tied output head) computes with int8 weights, close to
    the float model; the experts of an MoE model stay as they were asked (here float)."""
    out = tmp_path / "dense-int8"
    report = quantize_model(hf_model_dirs[name], out, experts=None, dense="int8", check_inputs=0, progress=False)
    assert report.tensors
    assert all(".experts." not in t.name for t in report.tensors)
    float_model, _ = load_model(hf_model_dirs[name])
    loaded = load_for_inference(out, progress=False)
    from engine.model.linear import Linear

    linears = [m for n, m in loaded.model.named_modules() if isinstance(m, Linear) and ".experts." not in n]
    assert linears
    assert all(m.int8 is not None for m in linears)
    assert loaded.model.lm_head is not None
    assert loaded.model.lm_head.int8 is not None
    # The float tensors left (embedding, norms) were copied out of the checkpoint's mapping, so
    # nothing keeps it (and every page quantising read) in this process.
    maps = Path("/proc/self/maps")
    if maps.exists():
        gc.collect()
        mapped = maps.read_text()
        assert not [p.name for p in out.glob("*.safetensors") if str(p.resolve()) in mapped]
    vocab = min(float_model.config.vocab_size, 1000)
    expected, got = _forward(float_model, vocab), _forward(loaded.model, vocab)
    assert (got - expected).abs().mean().item() < 0.1 * expected.std().item()
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean().item() >= 0.85
    tokens = [r.token_ids for r in Generator(loaded.model).generate(_requests(vocab))]
    assert all(tokens)


def test_dense_and_experts_int8_offloaded_equals_resident(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "all-int8"
    quantize_model(tiny_model_dir, out, experts="int8", dense="int8", check_inputs=2, progress=False)
    again = tmp_path / "again"
    with pytest.raises(ConfigError, match="already quantised"):
        quantize_model(out, again, experts=None, dense="int8", progress=False)
    resident = load_for_inference(out, progress=False)
    loaded = offloaded(out, expert_memory="40%", direct_io=True)
    try:
        vocab = min(resident.model.config.vocab_size, 1000)
        assert torch.equal(_forward(loaded.model, vocab), _forward(resident.model, vocab))
        expected = [r.token_ids for r in Generator(resident.model).generate(_requests(vocab))]
        assert [r.token_ids for r in Generator(loaded.model).generate(_requests(vocab))] == expected
    finally:
        loaded.close()


def test_cli_quantize(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "q"
    assert (
        cpm2_main(["quantize", "--model", str(tiny_model_dir), "--out", str(out), "--experts", "int8", "--quiet"]) == 0
    )
    printed = capsys.readouterr().out
    assert "experts: int8" in printed
    assert "top-1 agreement" in printed
    assert (out / REPORT_FILE).exists()
    assert cpm2_main(["quantize", "--model", str(out), "--out", str(tmp_path / "again"), "--experts", "int8"]) == 2
    assert "already quantised" in capsys.readouterr().err


def test_cpm2_info_counts_int8_bytes_as_the_store_does(int8_dir: Path) -> None:
    from engine.summary import expert_bytes_by_format, summarize

    config = inspect_checkpoint(int8_dir).config
    layout = ExpertStore.open(int8_dir, config).layout
    # The store aligns the scales to 16 bytes after the values; otherwise the same count.
    assert 0 <= layout.payload_bytes - expert_bytes_by_format(summarize(config))["int8"] < 16


def test_the_server_says_what_was_quantised(tiny_model_dir: Path, tmp_path: Path) -> None:
    from server_fakes import local_client

    from engine.serving.engine import AsyncEngine, EngineConfig
    from server.app import create_app
    from server.settings import Settings

    out = tmp_path / "int8"
    quantize_model(tiny_model_dir, out, experts="int8", dense="int8", check_inputs=0, progress=False)
    settings = Settings(prompt_store=tmp_path / "prompts")
    with local_client(create_app(settings, AsyncEngine.from_config(EngineConfig(model=out)))) as client:
        assert client.get("/info").json()["quantization"] == {"experts": "int8", "dense": "int8"}
        r = client.post("/generate", json={"inputs": "hello", "parameters": {"max_new_tokens": 4}})
        assert r.status_code == 200, r.text
    with local_client(create_app(settings, AsyncEngine.from_config(EngineConfig(model=tiny_model_dir)))) as client:
        assert client.get("/info").json()["quantization"] == {}
