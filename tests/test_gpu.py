"""CUDA paths: fp16 / bf16 models on a GPU track the fp32 CPU reference. Skipped without CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.generation import GenerationRequest, Generator, SamplingParams
from engine.weights.loader import load_model

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("name", ["t5-v1.1", "switch-4e-step2"])
def test_cuda_logits_track_cpu_fp32(name: str, dtype: str, hf_model_dirs: dict[str, Path]) -> None:
    reference, _ = load_model(hf_model_dirs[name])
    model, _ = load_model(hf_model_dirs[name], dtype=dtype, device="cuda")
    assert model.embed.weight.device.type == "cuda"
    assert not any(p.is_mkldnn for p in model.parameters()), "packing is a CPU-only transformation"
    ids = torch.tensor([[5, 17, 30, 42, 1], [7, 8, 9, 1, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    dec = torch.tensor([[0, 8, 9, 10], [0, 3, 4, 5]])
    with torch.no_grad():
        expected = reference(ids, mask, dec)
        got = model(ids.cuda(), mask.cuda(), dec.cuda()).float().cpu()
    tolerance = 1e-4 if dtype == "float32" else 5e-2
    assert (got - expected).abs().max().item() <= tolerance * max(1.0, expected.abs().max().item())


def test_cuda_greedy_generation_matches_cpu(hf_model_dirs: dict[str, Path]) -> None:
    cpu, _ = load_model(hf_model_dirs["switch-4e-step2"])
    gpu, _ = load_model(hf_model_dirs["switch-4e-step2"], dtype="float32", device="cuda")
    requests = [GenerationRequest((5, 17, 30, 42, 1), SamplingParams(max_new_tokens=10))]
    assert Generator(gpu).generate(requests)[0].token_ids == Generator(cpu).generate(requests)[0].token_ids


@pytest.mark.parametrize("host_tier", ["pinned", "disk"])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_cuda_offloaded_matches_cuda_resident(host_tier: str, dtype: str, tiny_model_dir: Path) -> None:
    from engine.offload import OffloadConfig, load_for_inference

    resident, _ = load_model(tiny_model_dir, dtype=dtype, device="cuda")
    loaded = load_for_inference(
        tiny_model_dir,
        dtype=dtype,
        device="cuda",
        offload=OffloadConfig(expert_memory="40%", host_tier=host_tier),
        progress=False,
    )
    try:
        assert loaded.is_offloaded
        ids = torch.tensor([[5, 17, 30, 42, 1], [7, 8, 9, 1, 0]], device="cuda")
        mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]], device="cuda")
        dec = torch.tensor([[0, 8, 9, 10], [0, 3, 4, 5]], device="cuda")
        with torch.no_grad():
            expected = resident(ids, mask, dec).float()
            got = loaded.model(ids, mask, dec).float()
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        requests = [GenerationRequest((5, 17, 30, 42, 1), SamplingParams(max_new_tokens=10))]
        assert (
            Generator(loaded.model).generate(requests)[0].token_ids
            == Generator(resident).generate(requests)[0].token_ids
        )
        assert loaded.provider is not None
        assert loaded.provider.stats.transfers > 0
    finally:
        loaded.close()


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("host_tier", ["pinned", "disk"])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_cuda_quantized_offloaded_matches_cuda_quantized_resident(
    host_tier: str, dtype: str, fmt: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Int8 / int4 experts on a GPU: quantised blobs over the link, the same kernel (dequantise into
    the activation dtype, then cuBLAS) resident and offloaded, and close to the CPU's model of the
    same bytes (whose int4 kernel rounds activations to bfloat16, hence the wider int4 tolerance)."""
    from engine.offload import OffloadConfig, load_for_inference
    from engine.weights.quantize import quantize_model

    int8_dir = tmp_path / fmt
    group = {"group_size": 32} if fmt == "int4" else {}
    quantize_model(tiny_model_dir, int8_dir, experts=fmt, check_inputs=0, progress=False, **group)
    resident = load_for_inference(int8_dir, dtype=dtype, device="cuda", progress=False)
    loaded = load_for_inference(
        int8_dir,
        dtype=dtype,
        device="cuda",
        offload=OffloadConfig(expert_memory="40%", host_tier=host_tier),
        progress=False,
    )
    cpu = load_for_inference(int8_dir, dtype="float32", progress=False)
    try:
        assert not resident.is_offloaded
        assert loaded.is_offloaded
        ids = torch.tensor([[5, 17, 30, 42, 1], [7, 8, 9, 1, 0]])
        mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
        dec = torch.tensor([[0, 8, 9, 10], [0, 3, 4, 5]])
        with torch.no_grad():
            expected = resident.model(ids.cuda(), mask.cuda(), dec.cuda()).float()
            got = loaded.model(ids.cuda(), mask.cuda(), dec.cuda()).float()
            reference = cpu.model(ids, mask, dec)
        assert torch.equal(got, expected)
        tolerance = 2e-2 if dtype == "float32" and fmt == "int8" else 5e-2
        assert (expected.cpu() - reference).abs().max().item() <= tolerance * max(1.0, reference.abs().max().item())
        assert loaded.provider is not None
        assert loaded.provider.stats.bytes_moved == loaded.provider.stats.transfers * loaded.provider.bytes_per_expert
    finally:
        loaded.close()
