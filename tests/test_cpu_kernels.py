"""CPU matmul paths chosen per machine and dtype (`engine.model.kernels`).

On every machine: the plain path (`cpu_kernels=plain`, `F.linear`) runs, and a CPU without oneDNN's
bfloat16 kernels (an AVX2-only CPU: AMD Zen 2/3, older Intel; imitated here by refusing bf16 in the
oneDNN ops exactly as torch does there) loads and generates bfloat16 on the plain path, with the same
greedy tokens. Where this CPU has the packed path, it is compared with the plain one; where not, those
tests skip with the reason.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from cpm2.cli import main
from engine.generation import GenerationRequest, Generator, SamplingParams
from engine.model import Seq2SeqLM, kernels
from engine.model.kernels import MatmulPath, active_kernels, announce, kernel_mode
from engine.offload import OffloadConfig, load_for_inference
from engine.serving.engine import AsyncEngine
from engine.tokenizer import load_tokenizer
from engine.weights.loader import load_model
from server.app import create_app
from server.settings import Settings

# What torch 2.x raises on a CPU without AVX512BW/VL/DQ or AVX-NE-CONVERT.
AVX2_REFUSAL = "bf16 path needs the cpu support avx_ne_convert or avx512bw, avx512vl and avx512dq"
TEXTS = ["hello world", "你好，世界", "37 + 5 ="]


def _like_avx2(monkeypatch: pytest.MonkeyPatch, *, torch_says_so: bool) -> None:
    """oneDNN's ops refuse bfloat16 as on an AVX2-only CPU; with `torch_says_so`, torch's own check
    says so too (as it does there), otherwise only the ops fail (what the probe must catch)."""
    ops = torch.ops.mkldnn

    def refusing_bf16(op):  # type: ignore[no-untyped-def]
        def call(x: torch.Tensor, *args: object) -> torch.Tensor:
            if x.dtype == torch.bfloat16:
                raise RuntimeError(f"mkldnn_linear_pointwise: {AVX2_REFUSAL}")
            return op(x, *args)

        return call

    monkeypatch.setattr(ops, "_reorder_linear_weight", refusing_bf16(ops._reorder_linear_weight))
    monkeypatch.setattr(ops, "_linear_pointwise", refusing_bf16(ops._linear_pointwise))
    monkeypatch.setattr(ops, "_is_mkldnn_bf16_supported", lambda: not torch_says_so)
    # What torch reports there too (the int8 paths measured only on AVX512 are refused by it).
    monkeypatch.setattr(kernels, "cpu_capability", lambda: "AVX2")


def _packed_or_skip(dtype: torch.dtype) -> None:
    with kernel_mode("auto") as table:
        choice = table.for_dtype(dtype)
    if choice.dense is not MatmulPath.ONEDNN_PACKED:
        pytest.skip(f"{dtype} has no packed oneDNN kernel on this CPU: {choice.reason}")


def _num_packed(model: torch.nn.Module) -> int:
    return sum(p.is_mkldnn for p in model.parameters())


def _logits(model: Seq2SeqLM) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 1000, (3, 17), generator=gen)
    mask = torch.ones_like(ids)
    mask[2, 11:] = 0
    dec = torch.randint(2, 1000, (3, 6), generator=gen)
    with torch.no_grad():
        return model(ids, mask, dec).float()


def _greedy(model: Seq2SeqLM, model_dir: Path) -> list[list[int]]:
    tokenizer = load_tokenizer(model_dir)
    requests = [
        GenerationRequest(tuple(tokenizer.encode(t)), SamplingParams(max_new_tokens=12, ignore_eos=True)) for t in TEXTS
    ]
    return [r.token_ids for r in Generator(model, tokenizer).generate(requests)]


def _load(model_dir: Path, dtype: str, mode: kernels.KernelMode) -> Seq2SeqLM:
    with kernel_mode(mode):
        model, _ = load_model(model_dir, dtype=dtype)
    return model


def test_plain_mode_takes_f_linear_for_every_dtype(tiny_model_dir: Path) -> None:
    with kernel_mode("plain") as table:
        for dtype in (torch.float32, torch.bfloat16):
            choice = table.for_dtype(dtype)
            assert (choice.dense, choice.experts) == (MatmulPath.ATEN, MatmulPath.ATEN)
            assert "cpu_kernels=plain" in choice.reason
            model, _ = load_model(tiny_model_dir, dtype=dtype)
            assert _num_packed(model) == 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_packed_path_where_this_cpu_has_it(tiny_model_dir: Path, dtype: str) -> None:
    _packed_or_skip(getattr(torch, dtype))
    model = _load(tiny_model_dir, dtype, "auto")
    dense = [
        m.weight for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".experts." not in name
    ]
    assert dense
    assert all(w.is_mkldnn for w in dense)
    assert not any(p.is_mkldnn for name, p in model.named_parameters() if ".experts." in name)


# bf16: two units in the last place (2^-7 relative) of the largest logits (|logit| <= ~34 here).
@pytest.mark.parametrize(("dtype", "rtol", "atol"), [("float32", 1e-5, 1e-4), ("bfloat16", 2**-7, 0.25)])
def test_packed_equals_plain(tiny_model_dir: Path, dtype: str, rtol: float, atol: float) -> None:
    _packed_or_skip(getattr(torch, dtype))
    packed, plain = _load(tiny_model_dir, dtype, "auto"), _load(tiny_model_dir, dtype, "plain")
    assert _num_packed(packed) > 0
    assert _num_packed(plain) == 0
    # Same weights, same dtype: only the summation order differs (bf16 rounds each partial sum).
    torch.testing.assert_close(_logits(packed), _logits(plain), rtol=rtol, atol=atol)
    assert _greedy(packed, tiny_model_dir) == _greedy(plain, tiny_model_dir)


@pytest.mark.parametrize("torch_says_so", [True, False], ids=["torch-check", "op-probe"])
def test_cpu_without_bf16_kernels_generates_on_the_plain_path(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, torch_says_so: bool
) -> None:
    reference = _greedy(_load(tiny_model_dir, "bfloat16", "plain"), tiny_model_dir)
    _like_avx2(monkeypatch, torch_says_so=torch_says_so)
    with kernel_mode("auto") as table:
        loaded = load_for_inference(tiny_model_dir, dtype="bfloat16", progress=False)
        assert loaded.kernels is not None
        assert (loaded.kernels.dense, loaded.kernels.experts) == (MatmulPath.ATEN, MatmulPath.ATEN)
        assert ("AVX512-BF16" if torch_says_so else AVX2_REFUSAL) in loaded.kernels.reason
        assert _num_packed(loaded.model) == 0
        assert _greedy(loaded.model, tiny_model_dir) == reference
        # float32 keeps oneDNN on such a CPU.
        assert table.for_dtype(torch.float32).experts is MatmulPath.ONEDNN or not torch.backends.mkldnn.is_available()


def test_cpu_without_bf16_kernels_offloads_bf16_experts(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _like_avx2(monkeypatch, torch_says_so=True)
    with kernel_mode("auto"):
        resident, _ = load_model(tiny_model_dir, dtype="bfloat16")
        loaded = load_for_inference(
            tiny_model_dir,
            dtype="bfloat16",
            offload=OffloadConfig(expert_memory="60%", store_dir=tmp_path / "store"),
            progress=False,
        )
        try:
            assert loaded.is_offloaded
            assert torch.equal(_logits(loaded.model), _logits(resident))
        finally:
            loaded.close()


def test_slow_path_is_announced_once_with_what_is_faster(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _like_avx2(monkeypatch, torch_says_so=True)
    monkeypatch.setattr(kernels, "_announced", set())
    with caplog.at_level(logging.WARNING, logger="cpm2.engine"), kernel_mode("auto") as table:
        announce(torch.bfloat16)
        announce(torch.bfloat16)
        fp32_is_fastest = table.for_dtype(torch.float32).is_fastest
        announce(torch.float32)
    records = [r.getMessage() for r in caplog.records if r.name == "cpm2.engine"]
    if not fp32_is_fastest:
        pytest.skip(f"float32 has no packed kernel on this CPU either: {table.for_dtype(torch.float32).reason}")
    assert len(records) == 1, records  # once, and nothing for the dtype that is on its fastest path
    assert "bfloat16 matmuls take the aten path" in records[0]
    assert "AVX512-BF16" in records[0]
    assert "--dtype float32" in records[0]


def test_info_reports_kernel_paths(tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["info", "--model", str(tiny_model_dir), "--json", "--dtype", "bf16"]) == 0
    reported = json.loads(capsys.readouterr().out)["cpu_kernels"]
    expected = active_kernels().for_dtype(torch.bfloat16)
    assert reported["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert (reported["dense"], reported["experts"]) == (expected.dense, expected.experts)

    assert main(["info", "--model", str(tiny_model_dir)]) == 0
    assert "CPU kernels" in capsys.readouterr().out

    # What .ci/run prints at the top of its log.
    lines = kernels.describe().splitlines()
    assert f"CPU capability {torch.backends.cpu.get_cpu_capability()}" in lines[0]
    assert [line.split(":")[0].strip() for line in lines[1:]] == ["float32", "bfloat16", "int4"]
    assert reported["int4_packing"] == (active_kernels().int4_packing or "")


def test_cli_generate_plain_equals_auto(tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    outputs = {}
    for mode in ("auto", "plain"):
        capsys.readouterr()
        argv = ["generate", "--model", str(tiny_model_dir), "--json", "--dtype", "bf16", "--cpu-kernels", mode, *TEXTS]
        assert main(argv) == 0
        outputs[mode] = [json.loads(line)["token_ids"] for line in capsys.readouterr().out.splitlines()]
        assert active_kernels().mode == mode
    assert outputs["auto"] == outputs["plain"]


@pytest.fixture
def plain_server(tiny_model_dir: Path, tmp_path: Path) -> Iterator[TestClient]:
    # Function-scoped, so the plain table it chooses ends with the test (conftest restores it).
    settings = Settings(prompt_store=tmp_path / "store", cpu_kernels="plain")
    engine = AsyncEngine.from_config(settings.engine_config(tiny_model_dir))
    with TestClient(create_app(settings, engine)) as client:
        yield client


def test_server_reports_and_uses_the_plain_path(plain_server: TestClient) -> None:
    info = plain_server.get("/info").json()
    assert info["cpu_kernels"]["mode"] == "plain"
    assert info["cpu_kernels"]["dense"] == "aten"
    assert info["cpu_kernels"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    r = plain_server.post("/generate", json={"inputs": "hello", "parameters": {"max_new_tokens": 3}})
    assert r.status_code == 200, r.text
    # The path changes bf16 numbers (summation order), so OpenAI's fingerprint names it.
    r = plain_server.post("/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["system_fingerprint"].endswith("-float32-cpu-aten")


def test_unknown_kernel_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="cpu_kernels"):
        Settings(cpu_kernels="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="auto, plain"):
        kernels.CpuKernels("fast")  # type: ignore[arg-type]
