"""cpm2 against HF transformers (the reference) on random-weight T5 v1.0 / v1.1, mT5 and Switch models.

Checks: teacher-forced logits within 1e-4 (fp32) on a ragged, padded batch; greedy generation of 20
tokens identical; ragged batched generation identical to HF one-by-one; beam search identical. Every
check runs with CPU-packed weights (the serving path) and plain weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import HF_CASES, build_hf_model

from engine.generation import GenerationRequest, Generator, SamplingParams
from engine.weights.loader import load_model

CASES = list(HF_CASES)


def _hf_generate(hf, ids: list[int], **kwargs) -> list[int]:
    out = hf.generate(torch.tensor([ids]), do_sample=False, **kwargs)[0].tolist()[1:]
    # HF pads finished sequences; cut after the first EOS.
    return out[: out.index(1) + 1] if 1 in out else out


def _padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "plain"])
@pytest.mark.parametrize("name", CASES)
def test_logits_match_hf(name: str, pack: bool, hf_model_dirs: dict[str, Path], random_ids) -> None:
    hf = build_hf_model(name, seed=CASES.index(name))
    model, info = load_model(hf_model_dirs[name], pack=pack)
    assert info.source_format == "hf"
    ids, mask = _padded(random_ids([23, 9, 1, 16], seed=1))
    decoder_ids = torch.tensor(random_ids([7] * 4, seed=2))
    decoder_ids[:, 0] = 0
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
        got = model(ids, mask, decoder_ids)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", CASES)
def test_greedy_and_ragged_batch_match_hf(name: str, hf_model_dirs: dict[str, Path], random_ids) -> None:
    hf = build_hf_model(name, seed=CASES.index(name))
    model, _ = load_model(hf_model_dirs[name])
    rows = random_ids([5, 17, 9, 30], seed=3)
    expected = [_hf_generate(hf, row, max_new_tokens=20) for row in rows]
    assert all(len(e) > 1 for e in expected)
    generator = Generator(model)
    params = SamplingParams(max_new_tokens=20)
    batched = generator.generate([GenerationRequest(tuple(r), params) for r in rows])
    assert [r.token_ids for r in batched] == expected
    one_by_one = [generator.generate([GenerationRequest(tuple(r), params)])[0] for r in rows]
    assert [r.token_ids for r in one_by_one] == expected
    for result in batched:
        assert result.finish_reason == ("eos_token" if result.token_ids[-1] == 1 else "length")


@pytest.mark.parametrize("num_beams", [2, 4])
@pytest.mark.parametrize("name", ["t5-v1.1", "switch-4e-step2"])
def test_beam_search_matches_hf(name: str, num_beams: int, hf_model_dirs: dict[str, Path], random_ids) -> None:
    hf = build_hf_model(name, seed=CASES.index(name))
    model, _ = load_model(hf_model_dirs[name])
    generator = Generator(model)
    for row in random_ids([6, 13, 21], seed=4):
        for length_penalty in (1.0, 0.5):
            expected = _hf_generate(hf, row, max_new_tokens=15, num_beams=num_beams, length_penalty=length_penalty)
            params = SamplingParams(max_new_tokens=15, num_beams=num_beams, length_penalty=length_penalty)
            got = generator.generate([GenerationRequest(tuple(row), params)])[0]
            assert got.token_ids == expected


def test_repetition_penalty_greedy_matches_hf(hf_model_dirs: dict[str, Path], random_ids) -> None:
    hf = build_hf_model("t5-v1.0", seed=CASES.index("t5-v1.0"))
    model, _ = load_model(hf_model_dirs["t5-v1.0"])
    generator = Generator(model)
    for row in random_ids([8, 19], seed=5):
        expected = _hf_generate(hf, row, max_new_tokens=20, repetition_penalty=1.7)
        params = SamplingParams(max_new_tokens=20, repetition_penalty=1.7)
        assert generator.generate([GenerationRequest(tuple(row), params)])[0].token_ids == expected


@pytest.mark.parametrize("name", ["t5-v1.1", "switch-4e-step2"])
def test_beam_alternatives_match_hf_num_return_sequences(name: str, hf_model_dirs: dict[str, Path], random_ids) -> None:
    hf = build_hf_model(name, seed=CASES.index(name))
    model, _ = load_model(hf_model_dirs[name])
    generator = Generator(model)
    for row in random_ids([6, 13, 21], seed=6):
        for length_penalty, max_new_tokens in ((1.0, 15), (0.5, 15), (1.0, 4)):
            out = hf.generate(
                torch.tensor([row]),
                do_sample=False,
                num_beams=4,
                num_return_sequences=3,
                max_new_tokens=max_new_tokens,
                length_penalty=length_penalty,
                output_scores=True,
                return_dict_in_generate=True,
            )
            expected = [s[1:] for s in out.sequences.tolist()]
            expected = [s[: s.index(1) + 1] if 1 in s else s for s in expected]
            params = SamplingParams(
                max_new_tokens=max_new_tokens, num_beams=4, num_return_sequences=3, length_penalty=length_penalty
            )
            got = generator.generate([GenerationRequest(tuple(row), params)])[0]
            assert [got.token_ids, *[list(a.token_ids) for a in got.alternatives]] == expected
            # The scores HF reports for the returned sequences are the same normalised beam scores.
            assert [a.score for a in got.alternatives] == pytest.approx(out.sequences_scores.tolist()[1:], abs=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_equals_t5_layer_norm_bit_for_bit(dtype: torch.dtype) -> None:
    """`RMSNorm` takes torch's fused kernel in float32 and HF's four ops in half precision: both give
    exactly HF `T5LayerNorm`'s values, forward and (float32) backward."""
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    from engine.model.norm import RMSNorm

    torch.manual_seed(0)
    ours, theirs = RMSNorm(768, 1e-6), T5LayerNorm(768, eps=1e-6)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        theirs.weight.copy_(ours.weight)
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    for shape in [(1, 1, 768), (16, 1, 768), (3, 37, 768)]:
        x = (torch.randn(*shape) * 3).to(dtype)
        assert torch.equal(ours(x), theirs(x))
    if dtype == torch.float32:
        x = torch.randn(4, 9, 768, requires_grad=True)
        grads = [torch.autograd.grad(norm(x).square().sum(), (x, norm.weight)) for norm in (ours, theirs)]
        for a, b in zip(*grads, strict=True):
            torch.testing.assert_close(a, b)
