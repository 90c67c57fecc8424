"""training.data.span_corruption: T5's noise mask, sentinel layout, chunk length, packing and resume."""

from __future__ import annotations

import itertools
import json
import random

import pytest
from training_fakes import EOS, DigitTokenizer, ListStream

from engine.errors import ConfigError
from engine.tokenizer import SentencePieceTokenizer, builtin_corpus, train_sentencepiece
from training.data import (
    Example,
    SpanCorruptionConfig,
    SpanCorruptionStream,
    corrupt_spans,
    random_spans_noise_mask,
    raw_length_for,
)
from training.tasks import GeneratedDocuments


def test_noise_mask_hand_computed_cases() -> None:
    # 20 tokens: round(3.0) = 3 noise tokens in round(3 / 3) = 1 span, which T5 always puts last.
    assert random_spans_noise_mask(20, rng=random.Random(0)) == [False] * 17 + [True] * 3
    # 2 tokens: at least 1 noise and 1 clean token.
    assert random_spans_noise_mask(2, rng=random.Random(0)) == [False, True]
    with pytest.raises(ConfigError):
        random_spans_noise_mask(1, rng=random.Random(0))


def test_corrupt_spans_hand_computed() -> None:
    tokens = [10, 11, 12, 13, 14, 15, 16]
    mask = [False, True, True, False, False, True, False]
    inputs, targets = corrupt_spans(tokens, mask, sentinel_id=lambda i: 900 + i, eos_id=EOS)
    assert inputs == [10, 900, 13, 14, 901, 16, EOS]
    assert targets == [900, 11, 12, 901, 15, EOS]


def _spans(mask: list[bool]) -> list[int]:
    lengths: list[int] = []
    for index, is_noise in enumerate(mask):
        if is_noise and (index == 0 or not mask[index - 1]):
            lengths.append(0)
        if is_noise:
            lengths[-1] += 1
    return lengths


def _uncorrupt(inputs: list[int], targets: list[int], is_sentinel: set[int]) -> list[int]:
    """Interleave: replace each sentinel of the inputs by the span behind it in the targets."""
    spans: dict[int, list[int]] = {}
    for token in targets[:-1]:
        if token in is_sentinel:
            current = spans.setdefault(token, [])
        else:
            current.append(token)
    return [t for token in inputs[:-1] for t in (spans[token] if token in is_sentinel else [token])]


@pytest.mark.parametrize("length", [2, 3, 7, 20, 33, 100, 568])
def test_span_corruption_invariants(length: int) -> None:
    sentinels = {900 + i for i in range(100)}
    tokens = list(range(10, 10 + length))
    for seed in range(20):
        mask = random_spans_noise_mask(length, rng=random.Random(seed))
        num_noise = min(max(round(length * 0.15), 1), length - 1)
        num_spans = max(round(num_noise / 3), 1)
        assert sum(mask) == num_noise
        assert len(_spans(mask)) == num_spans
        assert not mask[0]
        assert mask[-1]
        inputs, targets = corrupt_spans(tokens, mask, sentinel_id=lambda i: 900 + i, eos_id=EOS)
        assert len(inputs) == length - num_noise + num_spans + 1
        assert len(targets) == num_noise + num_spans + 1
        assert _uncorrupt(inputs, targets, sentinels) == tokens
    # Over many draws the spans average the requested 3 tokens and vary in length.
    lengths = [n for seed in range(200) for n in _spans(random_spans_noise_mask(100, rng=random.Random(seed)))]
    assert sum(lengths) / len(lengths) == 3.0
    assert len(set(lengths)) > 3


def test_raw_length_matches_t5() -> None:
    # T5's random_spans_helper: 568 raw tokens -> 512 inputs and 114 targets.
    assert raw_length_for(encoder_length=512, decoder_length=256) == 568
    assert raw_length_for(encoder_length=512, decoder_length=114) == 568
    assert raw_length_for(encoder_length=512, decoder_length=60) < 568


def test_span_corruption_stream_packs_fits_round_trips_and_resumes() -> None:
    tokenizer = DigitTokenizer()
    docs = [Example(input=" ".join(str(10 + (7 * d + i) % 800) for i in range(5 + 13 * d))) for d in range(12)]
    all_tokens = [t for doc in docs for t in tokenizer.encode(doc.input, add_eos=False)]
    config = SpanCorruptionConfig(encoder_length=40, decoder_length=16, seed=3)

    def stream() -> SpanCorruptionStream:
        return SpanCorruptionStream(ListStream(docs), tokenizer, config)

    chunks = list(stream())
    sentinels = {tokenizer.sentinel_id(i) for i in range(tokenizer.num_sentinels)}
    assert all(len(inputs) <= 40 and len(targets) <= 16 for inputs, targets in chunks)
    assert len(chunks[0][0]) == 40  # full chunks fill the encoder
    assert [t for i, o in chunks for t in _uncorrupt(i, o, sentinels)] == all_tokens
    assert chunks == list(stream())
    for stop in (0, 1, 4, len(chunks)):
        first = stream()
        head = [next(first) for _ in range(stop)]
        resumed = stream()
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        assert head + list(resumed) == chunks


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> SentencePieceTokenizer:
    # The built-in corpus' number lines only: few distinct characters, so a small vocabulary trains fast
    # (other text falls back to bytes).
    lines = itertools.islice(builtin_corpus(), 2000)
    path = tmp_path_factory.mktemp("spm") / "spiece.model"
    return SentencePieceTokenizer(train_sentencepiece(lines, path, vocab_size=400))


def test_span_corruption_with_sentencepiece_on_generated_documents(sp_tokenizer: SentencePieceTokenizer) -> None:
    config = SpanCorruptionConfig(encoder_length=64, decoder_length=32)
    stream = SpanCorruptionStream(GeneratedDocuments(seed=0), sp_tokenizer, config)
    inputs, targets = next(stream)
    assert len(inputs) == 64
    assert inputs[-1] == sp_tokenizer.eos_id
    text = sp_tokenizer.decode(targets, skip_special=False)
    assert text.startswith("<extra_id_0>")
    assert "<extra_id_1>" in text
    assert text.endswith("</s>")
