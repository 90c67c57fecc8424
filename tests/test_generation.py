"""Generation semantics: sampling against HF's warpers, seeds, stop sequences, logprobs, validation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.errors import InputError
from engine.generation import GenerationRequest, Generator, SamplingParams
from engine.generation.sampling import (
    TokenChooser,
    apply_repetition_penalty,
    choose_tokens,
    draw_rows,
    warp_rows,
)
from engine.tokenizer import load_tokenizer
from engine.weights.loader import load_model


@pytest.fixture(scope="module")
def generator(tiny_model_dir: Path) -> Generator:
    model, _ = load_model(tiny_model_dir)
    return Generator(model, load_tokenizer(tiny_model_dir))


def _request(generator: Generator, text: str, **params) -> GenerationRequest:
    assert generator.tokenizer is not None
    return GenerationRequest(tuple(generator.tokenizer.encode(text)), SamplingParams(**params))


def _hf_warp(scores_V: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """One row through HF's warpers, in the order and under the conditions `generate` adds them
    (no top-p warper at top_p 1): the reference."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    scores = scores_V.unsqueeze(0).clone()
    if params.temperature not in (None, 0.0, 1.0):
        scores = TemperatureLogitsWarper(params.temperature)(None, scores)
    if params.top_k is not None:
        scores = TopKLogitsWarper(params.top_k)(None, scores)
    if params.top_p is not None and params.top_p < 1.0:
        scores = TopPLogitsWarper(params.top_p)(None, scores)
    return scores[0]


def test_warpers_match_hf() -> None:
    torch.manual_seed(0)
    scores = torch.randn(1, 300) * 3
    for temperature, top_k, top_p in [(0.7, None, None), (1.0, 20, None), (1.0, None, 0.8), (1.3, 50, 0.9)]:
        params = SamplingParams(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
        expected = _hf_warp(scores[0], params)
        got = warp_rows(scores, [params])[0]
        assert torch.equal(torch.isinf(got), torch.isinf(expected))
        finite = ~torch.isinf(got)
        torch.testing.assert_close(got[finite], expected[finite])


def test_batched_warping_equals_each_row_warped_alone() -> None:
    """Rows of mixed settings warped together keep exactly the tokens HF's warpers keep for each row
    alone, whatever the other rows ask for, and each row equals itself warped alone."""
    generator = torch.Generator().manual_seed(3)
    settings = [
        {"temperature": 0.7},
        {"top_k": 20},
        {"top_p": 0.8},
        {"temperature": 1.3, "top_k": 50, "top_p": 0.9},
        {"top_k": 400},  # more than the vocabulary: keeps everything
        {"top_p": 1.0, "temperature": 0.5},
        {"top_p": 1e-6},  # only the most likely token
        {"temperature": 2.0, "top_p": 0.99},
    ]
    params = [SamplingParams(do_sample=True, **s) for s in settings]
    for scale in (1.0, 3.0, 10.0):
        scores = torch.randn(len(params), 300, generator=generator) * scale
        together = warp_rows(scores, params)
        for i, p in enumerate(params):
            alone = _hf_warp(scores[i], p)
            assert torch.equal(torch.isinf(together[i]), torch.isinf(alone)), (scale, settings[i])
            finite = ~torch.isinf(alone)
            torch.testing.assert_close(together[i][finite], alone[finite])
            torch.testing.assert_close(warp_rows(scores[i : i + 1], [p])[0], together[i], rtol=0, atol=0)


def test_ties_at_the_kth_score_are_kept_as_hf_does() -> None:
    """bf16 logits tie often: HF's top-k keeps every token tied with the k-th score, so the batched
    path must too, whether the ties end inside its candidates or run past them. (Which of several
    tokens tied at a top-p cut stay is the sort's choice, in HF as here: there the kept scores agree.)"""
    generator = torch.Generator().manual_seed(5)
    scores = (torch.randn(4, 2000, generator=generator) * 2).to(torch.bfloat16).float()
    settings = ((5, None), (40, 0.95), (7, 0.5), (40, None))
    params = [SamplingParams(do_sample=True, top_k=k, top_p=p) for k, p in settings]
    together = warp_rows(scores, params)
    for i, p in enumerate(params):
        alone = _hf_warp(scores[i], p)
        for got in (together[i], warp_rows(scores[i : i + 1], [p])[0]):
            if p.top_p is None:
                assert torch.equal(torch.isinf(got), torch.isinf(alone))
            else:
                assert torch.equal(got[~torch.isinf(got)].sort().values, alone[~torch.isinf(alone)].sort().values)
    assert (~torch.isinf(together[3])).sum() > 40  # tied past the 40th score


def test_nucleus_on_a_large_vocabulary_keeps_the_exact_set() -> None:
    """Top-p on 256k tokens keeps a token iff the probability mass strictly above it is < top_p, in
    float64; HF's float32 ascending cumsum over the whole vocabulary drifts by ~1e-5 there and may
    keep a token or two past the cut, which this does not."""
    scores = torch.randn(2, 256_000, generator=torch.Generator().manual_seed(0)) * 3
    params = [SamplingParams(do_sample=True, top_p=0.9), SamplingParams(do_sample=True, top_p=0.5, top_k=3000)]
    warped = warp_rows(scores, params)
    for i, p in enumerate(params):
        row = scores[i].clone()
        if p.top_k is not None:
            row[row < row.topk(p.top_k).values[-1]] = -float("inf")
        probs, order = row.softmax(-1).double().sort(descending=True)
        above = probs.cumsum(0) - probs
        expected = order[above < p.top_p]
        kept = (~torch.isinf(warped[i])).nonzero().flatten()
        assert sorted(kept.tolist()) == sorted(expected.tolist())
        assert 1 < len(kept) < (p.top_k or 256_000)


def test_draws_follow_their_rows_and_skip_impossible_tokens() -> None:
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5], [0.2, 0.0, 0.8, 0.0], [0.0, 0.0, 0.0, 1.0]])
    seen: list[list[int]] = [[], [], []]
    generators = [torch.Generator().manual_seed(i) for i in range(3)]
    for _ in range(2000):
        for row, token in enumerate(draw_rows(probs, generators).tolist()):
            seen[row].append(token)
    assert set(seen[0]) == {1, 3}
    assert set(seen[1]) == {0, 2}
    assert set(seen[2]) == {3}
    assert abs(seen[1].count(2) / 2000 - 0.8) < 0.03
    # a row's draws depend on its generator alone, not on the rows beside it
    mine, others = torch.Generator().manual_seed(7), [torch.Generator().manual_seed(9), generators[2]]
    alone = [draw_rows(probs[1:2], [mine])[0].item() for _ in range(50)]
    mine.manual_seed(7)
    beside = [draw_rows(probs, [others[0], mine, others[1]])[1].item() for _ in range(50)]
    assert beside == alone
    assert len(set(alone)) == 2


def test_repetition_penalty_matches_hf() -> None:
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(1)
    scores = torch.randn(1, 50)
    seen = [0, 3, 3, 17, 42]
    expected = RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor([seen]), scores.clone())
    torch.testing.assert_close(apply_repetition_penalty(scores[0], set(seen), 1.5), expected[0])


def test_sampling_follows_the_distribution() -> None:
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    logits = probs.log().expand(4000, 4).contiguous()
    params = SamplingParams(do_sample=True, seed=123)
    choosers = [TokenChooser.create(params, start_token=0, device=torch.device("cpu")) for _ in range(4000)]
    for i, chooser in enumerate(choosers):
        assert chooser.generator is not None
        chooser.generator.manual_seed(i)
    tokens, logprobs = choose_tokens(logits, choosers)
    frequencies = torch.bincount(torch.tensor(tokens), minlength=4).float() / 4000
    assert (frequencies - probs).abs().max() < 0.03
    torch.testing.assert_close(torch.tensor(logprobs), probs.log()[torch.tensor(tokens)])


def test_seeded_sampling_is_reproducible_and_batch_independent(generator: Generator) -> None:
    params = {"do_sample": True, "temperature": 0.9, "max_new_tokens": 12, "seed": 7}
    alone = generator.generate([_request(generator, "四千零九十六", **params)])[0]
    batched = generator.generate(
        [
            _request(generator, "seventy two", do_sample=True, seed=1, max_new_tokens=5),
            _request(generator, "四千零九十六", **params),
            _request(generator, "37 + 58 = ", max_new_tokens=3),
        ]
    )[1]
    assert alone.token_ids == batched.token_ids
    assert alone.seed == 7
    other = generator.generate([_request(generator, "四千零九十六", **{**params, "seed": 8})])[0]
    assert other.token_ids != alone.token_ids


def test_unseeded_sampling_reports_a_seed_that_reproduces(generator: Generator) -> None:
    first = generator.generate([_request(generator, "hello", do_sample=True, max_new_tokens=10)])[0]
    assert first.seed is not None
    again = generator.generate([_request(generator, "hello", do_sample=True, seed=first.seed, max_new_tokens=10)])
    assert again[0].token_ids == first.token_ids


def test_degenerate_sampling_is_greedy(generator: Generator) -> None:
    greedy = generator.generate([_request(generator, "one two three", max_new_tokens=10)])[0]
    for params in ({"top_k": 1}, {"top_p": 1e-6}, {"temperature": 0.0, "do_sample": True}):
        sampled = generator.generate([_request(generator, "one two three", max_new_tokens=10, **params)])[0]
        assert sampled.token_ids == greedy.token_ids


def test_logprobs_are_the_model_distribution(generator: Generator) -> None:
    request = _request(generator, "37 + 58 = 95", max_new_tokens=8, ignore_eos=True)
    result = generator.generate([request])[0]
    assert len(result.token_ids) == 8
    assert result.finish_reason == "length"
    model = generator.model
    ids = torch.tensor([request.input_ids])
    decoder = torch.tensor([[model.config.decoder_start_token_id, *result.token_ids[:-1]]])
    with torch.no_grad():
        logits = model(ids, torch.ones_like(ids), decoder)[0, :, : generator.num_choosable]
    expected = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(result.token_ids).unsqueeze(-1))
    torch.testing.assert_close(torch.tensor(result.logprobs), expected.squeeze(-1), atol=1e-4, rtol=1e-4)


def test_stop_sequence_cuts_the_output(generator: Generator) -> None:
    full = generator.generate([_request(generator, "四千零九十六", max_new_tokens=20, ignore_eos=True)])[0]
    assert len(full.text) > 6
    stop = full.text[3:5]
    assert stop.strip(), "pick a visible stop string"
    stopped = generator.generate([_request(generator, "四千零九十六", max_new_tokens=20, stop=(stop,))])[0]
    assert stopped.finish_reason == "stop_sequence"
    assert stopped.text.endswith(stop)
    assert full.text.startswith(stopped.text)
    assert stopped.text.count(stop) == 1
    assert stopped.token_ids == full.token_ids[: len(stopped.token_ids)]


def test_generated_ids_stay_inside_the_tokenizer(generator: Generator) -> None:
    assert generator.tokenizer is not None
    assert generator.num_choosable == generator.tokenizer.vocab_size < generator.model.config.vocab_size
    results = generator.generate(
        [_request(generator, text, do_sample=True, max_new_tokens=30, seed=i) for i, text in enumerate("abcd")]
    )
    assert all(t < generator.tokenizer.vocab_size for r in results for t in r.token_ids)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"num_beams": 0}, "num_beams"),
        ({"num_beams": 2, "do_sample": True}, "beam search"),
        ({"num_beams": 2, "num_return_sequences": 3}, "raise num_beams"),
        ({"num_return_sequences": 0}, "num_return_sequences"),
        ({"stop": ("",)}, "stop"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_sampling_params_are_refused(params: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        SamplingParams(**params)


def test_bad_inputs_are_refused(generator: Generator) -> None:
    with pytest.raises(InputError, match="empty"):
        GenerationRequest(())
    vocab = generator.model.config.vocab_size
    with pytest.raises(InputError, match="outside the vocabulary"):
        generator.generate([GenerationRequest((5, vocab))])
    bare = Generator(generator.model)
    with pytest.raises(InputError, match="tokenizer"):
        bare.generate([GenerationRequest((5, 6), SamplingParams(stop=("x",)))])


def test_bfloat16_generation_runs_and_tracks_fp32(tiny_model_dir: Path) -> None:
    model, _ = load_model(tiny_model_dir, dtype="bfloat16")
    assert model.embed.weight.dtype == torch.bfloat16
    reference, _ = load_model(tiny_model_dir)
    ids = torch.tensor([[5, 17, 300, 42, 1]])
    dec = torch.tensor([[0, 8, 9, 10]])
    with torch.no_grad():
        low = model(ids, torch.ones_like(ids), dec).float()
        high = reference(ids, torch.ones_like(ids), dec)
    # bf16 keeps 8 bits of mantissa: compare the distributions, not the bits.
    assert torch.nn.functional.cosine_similarity(low.flatten(), high.flatten(), dim=0) > 0.99
    result = Generator(model).generate([GenerationRequest((5, 17, 300, 1), SamplingParams(max_new_tokens=5))])
    assert len(result[0].token_ids) >= 1


@pytest.mark.parametrize("field", ["temperature", "repetition_penalty"])
def test_tiny_logit_divisors_are_refused_up_front(field: str) -> None:
    # Below 1e-4 the float32 quotient overflows and sampling would fail mid-generation; every caller
    # (server, CLI, training evaluation) gets the refusal from the engine's own parameter check.
    with pytest.raises(InputError, match=f"{field} must be at least 0.0001"):
        SamplingParams(max_new_tokens=4, do_sample=True, **{field: 1e-40})
    SamplingParams(max_new_tokens=4, do_sample=True, **{field: 1e-3})


def test_sampling_benchmark_writes_its_report(tmp_path: Path) -> None:
    """`bench.sampling` times the row-at-a-time chooser against `choose_tokens`; both pick the same
    greedy tokens (its baseline is the previous code path, kept in the benchmark)."""
    import json

    from bench.sampling import main, per_row

    out = tmp_path / "sampling.json"
    assert main(["--quick", "--repeats", "1", "--vocab", "500", "--out", str(out)]) == 0
    records = json.loads(out.read_text())["records"]
    assert {(r["rows"], r["setting"]) for r in records} >= {(1, "greedy"), (16, "top-k 50, top-p 0.9")}
    assert all(r["per_row_ms"] > 0 and r["batched_ms"] > 0 for r in records)
    logits = torch.randn(8, 500)
    choosers = [TokenChooser.create(SamplingParams(), start_token=0, device=torch.device("cpu")) for _ in range(8)]
    assert per_row(logits, choosers) == choose_tokens(logits, choosers)[0] == logits.argmax(-1).tolist()
