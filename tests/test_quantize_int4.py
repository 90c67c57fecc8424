"""`cpm2 quantize --experts int4`: the format, its budget, its refusals and its packings.

Offloaded = resident for int4 runs with int8's tests (tests/test_quantize.py, every budget and
transfer mode, both sources). Two sources cover both kernel paths here: the tiny CPM-2 model
(64 x 128 experts) is packed for this machine's int4 kernel; the tiny Switch model (32 x 64) fits no
AVX512 block and falls back to the portable packing and the dequant path (on an AVX2 machine it fits
that kernel).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from quantized_models import INT4_TEST_GROUP, logit_error
from test_offload import _forward, _requests

from cpm2.cli import main as cpm2_main
from engine.errors import CheckpointError, ConfigError
from engine.experts.blob import INT4
from engine.experts.store import ExpertStore
from engine.generation import Generator
from engine.model.int4 import Int4Weight
from engine.model.kernels import active_kernels
from engine.model.nibbles import fits
from engine.offload import OffloadConfig, load_for_inference
from engine.summary import expert_bytes_by_format, summarize
from engine.weights.loader import inspect_checkpoint
from engine.weights.quantize import REPORT_FILE, quantize_model, quantized_experts


def test_the_directory_records_int4_experts(source_dir: Path, int4_dir: Path) -> None:
    config = inspect_checkpoint(int4_dir).config
    assert quantized_experts(config) == "int4"
    record = config.extra["quantization"]
    store = ExpertStore.open(int4_dir, config)
    assert store.dtype == INT4
    assert (
        (store.layout.group_size, store.layout.packing)
        == (INT4_TEST_GROUP, record["packing"])
        == (record["group_size"], record["packing"])
    )
    # Packed for this machine's kernel wherever the expert matrices fit its blocks.
    native = active_kernels().int4_packing
    fits_native = native is not None and all(
        fits(native, r, c) for r, c in [(config.d_ff, config.d_model), (config.d_model, config.d_ff)]
    )
    assert store.layout.packing == (native if fits_native else "plain")
    weights = store.mapped(store.keys[0], 0)
    assert isinstance(weights.wi_0, Int4Weight)
    # Half a byte per value plus a bfloat16 scale and zero per 32 inputs: 0.5 + 4 / 32 bytes per weight.
    source_bytes = (
        store.layout.part_bytes
        * 2
        * len(store.layout.part_names)
        * inspect_checkpoint(source_dir).stored_dtype.itemsize
    )
    assert (
        store.layout.payload_bytes
        <= source_bytes * (0.5 + 4 / INT4_TEST_GROUP) / inspect_checkpoint(source_dir).stored_dtype.itemsize + 16
    )
    report = json.loads((int4_dir / REPORT_FILE).read_text())
    assert report["group_size"] == INT4_TEST_GROUP
    assert len(report["tensors"]) == len(store.keys) * store.num_experts * len(store.layout.part_names)
    assert 0 < report["mean_abs"] <= report["max_abs"]
    assert report["expert_bytes_after"] < 0.2 * report["expert_bytes_before"]  # float32 source


def test_int4_is_close_to_float(source_dir: Path, int4_dir: Path) -> None:
    error, agreement = logit_error(source_dir, int4_dir)
    # Random weights at 4 bits: about 9 % noise on each weight, still well under the logits' spread.
    assert error < 0.25
    assert agreement >= 0.7


def test_the_budget_counts_int4_bytes(int8_dir: Path, int4_dir: Path) -> None:
    int8_expert = ExpertStore.open(int8_dir, inspect_checkpoint(int8_dir).config).layout.payload_bytes
    budget = OffloadConfig(expert_memory=3 * int8_expert)  # room for three int8 experts
    as_int8 = load_for_inference(int8_dir, offload=budget, progress=False)
    as_int4 = load_for_inference(int4_dir, offload=budget, progress=False)
    try:
        assert as_int8.plan is not None
        assert as_int4.plan is not None
        assert as_int4.is_offloaded
        # Int4 blobs are a bit over half of int8 ones (the scales), so the budget holds more of them.
        assert as_int4.plan.bytes_per_expert < 0.7 * as_int8.plan.bytes_per_expert
        assert as_int4.plan.num_slots > as_int8.plan.num_slots
    finally:
        as_int8.close()
        as_int4.close()


def test_cpm2_info_counts_int4_bytes_as_the_store_does(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "g64"
    quantize_model(tiny_model_dir, out, experts="int4", check_inputs=0, progress=False)  # the default group, 64
    config = inspect_checkpoint(out).config
    layout = ExpertStore.open(out, config).layout
    assert layout.group_size == 64
    # The store aligns the scales to 16 bytes after the values; otherwise the same count.
    assert 0 <= layout.payload_bytes - expert_bytes_by_format(summarize(config))["int4"] < 16


def test_refusals_write_nothing(source_dir: Path, int4_dir: Path, tmp_path: Path) -> None:
    cases = [
        ({"experts": "int4", "group_size": 48}, "not one of"),
        ({"experts": "int4", "group_size": 128}, "do not divide"),
        ({"experts": "int8", "group_size": 32}, "--experts int4 only"),
        ({"experts": "int4", "group_size": 32, "packing": "int4-odd"}, "unknown"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            quantize_model(source_dir, tmp_path / "out", progress=False, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="already quantised"):
        quantize_model(int4_dir, tmp_path / "out", experts="int4", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_packing_the_shapes_do_not_fit_is_refused(hf_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    # 32 x 64 experts: 32 rows are half an AVX512 block.
    with pytest.raises(ConfigError, match="use --packing plain"):
        quantize_model(
            hf_model_dirs["switch-8e-capacity"],
            tmp_path / "out",
            experts="int4",
            group_size=32,
            packing="torch-avx512",
            progress=False,
        )
    assert list(tmp_path.iterdir()) == []


def test_a_model_packed_for_another_machine_runs_by_dequant(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Every packing computes the same weights: a store packed for another vector unit (or plain)
    gives the same greedy tokens as the one packed for this machine, up to bfloat16 rounding."""
    native = active_kernels().int4_packing
    others = [p for p in ("plain", "torch-avx2", "torch-avx512") if p != native]
    native_dir = tmp_path / "native"
    quantize_model(
        tiny_model_dir, native_dir, experts="int4", group_size=INT4_TEST_GROUP, check_inputs=0, progress=False
    )
    reference = load_for_inference(native_dir, progress=False)
    vocab = min(reference.model.config.vocab_size, 1000)
    expected = _forward(reference.model, vocab)
    for packing in others:
        out = tmp_path / packing
        quantize_model(
            tiny_model_dir,
            out,
            experts="int4",
            group_size=INT4_TEST_GROUP,
            packing=packing,
            check_inputs=0,
            progress=False,
        )
        assert ExpertStore.open(out, inspect_checkpoint(out).config).layout.packing == packing
        got = _forward(load_for_inference(out, progress=False).model, vocab)
        assert (got - expected).abs().max() < 0.05 * expected.abs().max()


def test_dense_int8_on_an_int4_model_carries_the_experts_byte_for_byte(int4_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "dense-int8"
    quantize_model(int4_dir, out, experts=None, dense="int8", check_inputs=0, progress=False)
    config = inspect_checkpoint(out).config
    assert config.extra["quantization"]["experts"] == "int4"
    assert config.extra["quantization"]["dense"] == "int8"
    for path in (int4_dir / "experts").iterdir():
        assert (out / "experts" / path.name).read_bytes() == path.read_bytes()
    loaded = load_for_inference(out, progress=False)
    vocab = min(loaded.model.config.vocab_size, 1000)
    assert all(r.token_ids for r in Generator(loaded.model).generate(_requests(vocab)))


def test_a_store_whose_layers_disagree_is_refused(int4_dir: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(int4_dir, tmp_path / "copy"))
    first = sorted((copy / "experts").iterdir())[0]
    data = first.read_bytes()
    old = f'"group_size":"{INT4_TEST_GROUP}"'.encode()
    assert old in data
    first.write_bytes(data.replace(old, b'"group_size":"64"', 1))
    with pytest.raises(CheckpointError, match="differs from the other layers"):
        ExpertStore.open(copy, inspect_checkpoint(copy).config)


def test_cli_quantize_int4(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "q"
    argv = ["quantize", "--model", str(tiny_model_dir), "--out", str(out), "--experts", "int4", "--group-size", "32"]
    assert cpm2_main([*argv, "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "experts: int4, groups of 32" in printed
    assert "top-1 agreement" in printed
    bad = ["quantize", "--model", str(tiny_model_dir), "--out", str(tmp_path / "bad"), "--experts", "int4"]
    assert cpm2_main([*bad, "--group-size", "100"]) == 2
    assert "--group-size" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
