"""Soft prompts: the safetensors format, its validation, and their exact place in the encoder input.

A prompt whose rows are the embeddings of some tokens must behave exactly like those tokens written
into the input (prefix, infix, suffix) or forced before the decoder start (decoder_prefix): that is
the reference the batched, mixed-prompt generation is checked against.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_safetensors

from engine.generation import GenerationRequest, Generator, SamplingParams
from engine.generation.inputs import encode_requests
from engine.prompts import PromptError, SoftPrompt, assemble_encoder_embeds, parse_soft_prompt
from engine.weights.loader import load_model

D = 64


def _parse(data: bytes, **kwargs):  # type: ignore[no-untyped-def]
    options = {"d_model": D, "dtype": torch.float32, "max_virtual_tokens": 100, **kwargs}
    return parse_soft_prompt(data, **options)


def test_round_trip_keeps_tensors_and_metadata() -> None:
    prompt = SoftPrompt(
        prefix=torch.randn(3, D),
        suffix=torch.randn(2, D),
        decoder_prefix=torch.randn(1, D),
        metadata={"description": "qa", "trained_by": "cpm2 train prompt"},
    )
    parsed = _parse(prompt.to_bytes())
    assert parsed.num_virtual_tokens == {"prefix": 3, "suffix": 2, "decoder_prefix": 1}
    assert parsed.encoder_tokens == 5
    assert parsed.decoder_tokens == 1
    assert torch.equal(parsed.prefix, prompt.prefix)  # type: ignore[arg-type]
    assert parsed.metadata == {"description": "qa", "trained_by": "cpm2 train prompt"}


def test_cast_to_serving_dtype() -> None:
    parsed = _parse(SoftPrompt(prefix=torch.randn(2, D)).to_bytes(), dtype=torch.bfloat16)
    assert parsed.prefix is not None
    assert parsed.prefix.dtype == torch.bfloat16


class _Boom:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path("/tmp/cpm2-should-not-exist").touch, ())


@pytest.mark.parametrize(
    ("data", "problem", "message"),
    [
        (pickle.dumps({"prefix": torch.randn(2, D)}), "format", "pickled"),
        (pickle.dumps(_Boom(), protocol=4), "format", "pickled"),
        (b"PK\x03\x04 zip archive from torch.save", "format", "pickled"),
        (b"not a tensor file at all", "format", "safetensors"),
        (b"\xff" * 8 + b"{}", "format", "header"),
        (
            save_safetensors({"prefix": torch.randn(2, D), "lm_head": torch.randn(2, D)}),
            "shape",
            "unknown tensor",
        ),
        (save_safetensors({"prefix": torch.randn(D)}), "shape", "2-D"),
        (save_safetensors({"prefix": torch.randn(0, D)}), "shape", "no rows"),
        (save_safetensors({"prefix": torch.randn(2, D + 1)}), "shape", "d_model is 64"),
        (save_safetensors({"prefix": torch.ones(2, D, dtype=torch.int32)}), "shape", "floating point"),
        (save_safetensors({"prefix": torch.full((2, D), float("nan"))}), "values", "NaN"),
        (save_safetensors({"prefix": torch.randn(101, D)}), "too_large", "at most 100"),
    ],
)
def test_bad_files_are_refused(data: bytes, problem: str, message: str) -> None:
    with pytest.raises(PromptError, match=message) as excinfo:
        _parse(data)
    assert excinfo.value.problem == problem
    assert not Path("/tmp/cpm2-should-not-exist").exists()


def test_overflow_after_cast_is_refused() -> None:
    data = save_safetensors({"suffix": torch.full((1, D), 1e6)})
    assert _parse(data).suffix is not None  # fine in float32
    with pytest.raises(PromptError, match="after casting") as excinfo:
        _parse(data, dtype=torch.float16)
    assert excinfo.value.problem == "values"


def test_byte_limit() -> None:
    data = SoftPrompt(prefix=torch.randn(10, D)).to_bytes()
    with pytest.raises(PromptError, match="limit") as excinfo:
        _parse(data, max_bytes=len(data) - 1)
    assert excinfo.value.problem == "too_large"


def test_encoder_input_order() -> None:
    embed = torch.nn.Embedding(10, 4)
    with torch.no_grad():
        embed.weight.copy_(torch.arange(10).float().unsqueeze(1).expand(10, 4))
    marker = {k: torch.full((1, 4), v) for k, v in (("prefix", 100.0), ("infix", 200.0), ("suffix", 300.0))}
    out = assemble_encoder_embeds(embed, [1, 2], [3], SoftPrompt(**marker))
    assert out[:, 0].tolist() == [100.0, 1.0, 2.0, 200.0, 3.0, 300.0]


@pytest.fixture(scope="module")
def generator(tiny_model_dir: Path) -> Generator:
    return Generator(load_model(tiny_model_dir)[0])


def _embed_rows(generator: Generator, ids: list[int]) -> torch.Tensor:
    return generator.model.embed(torch.tensor(ids)).detach().clone()


def test_prompt_of_token_embeddings_equals_the_tokens(generator: Generator) -> None:
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    a, b, pre, mid, post = [7, 8, 9], [10, 11, 1], [20, 21], [30], [40, 41]
    prompt = SoftPrompt(
        prefix=_embed_rows(generator, pre),
        infix=_embed_rows(generator, mid),
        suffix=_embed_rows(generator, post),
    )
    with_prompt = GenerationRequest(tuple(a), params, pair_ids=tuple(b), prompt=prompt)
    written_out = GenerationRequest(tuple(pre + a + mid + b + post), params)
    results = generator.generate([with_prompt, written_out])
    assert results[0].token_ids == results[1].token_ids
    enc_prompt, _ = encode_requests(generator.model, [with_prompt])
    enc_text, _ = encode_requests(generator.model, [written_out])
    torch.testing.assert_close(enc_prompt, enc_text)


def test_decoder_prefix_equals_forced_decoder_tokens(generator: Generator) -> None:
    model = generator.model
    forced = [0, 55, 56]  # what the decoder reads before choosing: the prefix rows, then the start token
    prompt = SoftPrompt(decoder_prefix=_embed_rows(generator, forced[:2]))
    ids = torch.tensor([[5, 6, 7, 1]])
    with torch.no_grad():
        full = model(ids, torch.ones_like(ids), torch.tensor([[*forced[:2], 0]]))[0, -1]
    result = generator.generate([GenerationRequest((5, 6, 7, 1), SamplingParams(max_new_tokens=1), prompt=prompt)])
    assert result[0].token_ids == [int(full.argmax())]


def test_mixed_prompts_in_one_batch_equal_one_by_one(generator: Generator) -> None:
    torch.manual_seed(0)
    prompts = [
        None,
        SoftPrompt(prefix=torch.randn(3, D) * 0.5),
        SoftPrompt(suffix=torch.randn(5, D) * 0.5, infix=torch.randn(2, D) * 0.5),
        SoftPrompt(prefix=torch.randn(1, D) * 0.5, decoder_prefix=torch.randn(2, D) * 0.5),
        SoftPrompt(decoder_prefix=torch.randn(4, D) * 0.5),
    ]
    requests = [
        GenerationRequest(
            tuple(range(5, 5 + 3 * (i + 1))),
            SamplingParams(max_new_tokens=10, do_sample=i % 2 == 1, seed=i, ignore_eos=True),
            pair_ids=(9, 10, 1) if i == 2 else (),
            prompt=p,
        )
        for i, p in enumerate(prompts)
    ]
    batched = [r.token_ids for r in generator.generate(requests)]
    alone = [generator.generate([r])[0].token_ids for r in requests]
    assert batched == alone
    assert len({tuple(t) for t in batched}) > 1
