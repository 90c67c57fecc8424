"""T5 span corruption: the pre-training objective of T5, mT5 and CPM-2 (15% noise, mean span 3).

Follows ``random_spans_noise_mask``, ``noise_span_to_unique_sentinel`` and ``random_spans_helper`` of
google-research/text-to-text-transfer-transformer (``t5/data/preprocessors.py``), re-written for
Python lists:

* ``num_noise = round(length * density)`` (clamped to ``[1, length - 1]``), ``num_spans =
  round(num_noise / mean_span)`` (at least 1); noise and non-noise tokens are each cut into
  ``num_spans`` random non-empty pieces, which alternate starting with non-noise, so the text always
  starts clean and ends inside a noise span.
* inputs: the text with each noise span replaced by one sentinel, then eos; targets: each noise
  span behind its sentinel, then eos. Sentinel ``i`` marks span ``i`` (``<extra_id_i>`` / ``<s_i>``).
* documents are concatenated and cut into chunks of `raw_length_for` tokens: the longest chunk whose
  corrupted inputs and targets fit the encoder and decoder lengths (T5's ``random_spans_helper``),
  so nothing is truncated after corruption.

Every chunk's randomness comes from ``(seed, chunk index)``, so a chunk is the same whichever
process makes it and a resumed stream needs no generator state.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from engine.errors import ConfigError
from engine.tokenizer import Tokenizer
from training.data.example import Example, ResumableIterator

__all__ = [
    "SpanCorruptionConfig",
    "SpanCorruptionStream",
    "corrupt_spans",
    "random_spans_noise_mask",
    "raw_length_for",
]


def _random_segmentation(num_items: int, num_segments: int, rng: random.Random) -> list[int]:
    """Lengths of ``num_segments`` non-empty pieces of ``num_items``, uniformly over all cuttings."""
    # T5 shuffles (num_segments - 1) ones among (num_items - 1) slots; a one marks a piece start.
    cuts = sorted(rng.sample(range(1, num_items), num_segments - 1))
    bounds = [0, *cuts, num_items]
    return [end - start for start, end in itertools.pairwise(bounds)]


def _span_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of a text of ``length`` tokens, as T5 rounds them."""
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    num_spans = max(round(num_noise / mean_noise_span_length), 1)
    # T5 would fail when a long mean span or a high density leaves fewer clean tokens than spans;
    # cap instead, which changes nothing in the intended range (density 0.15, mean 3).
    return num_noise, min(num_spans, num_noise, length - num_noise)


def random_spans_noise_mask(
    length: int, *, rng: random.Random, noise_density: float = 0.15, mean_noise_span_length: float = 3.0
) -> list[bool]:
    """Which of ``length`` tokens are noise: ``round(length * density)`` of them in random spans.

    Raises:
        ConfigError: If ``length < 2`` (a text needs a clean and a noise token).
    """
    if length < 2:
        raise ConfigError(f"span corruption needs at least 2 tokens, got {length}")
    num_noise, num_spans = _span_counts(length, noise_density, mean_noise_span_length)
    noise_lengths = _random_segmentation(num_noise, num_spans, rng)
    clean_lengths = _random_segmentation(length - num_noise, num_spans, rng)
    mask: list[bool] = []
    for clean, noise in zip(clean_lengths, noise_lengths, strict=True):
        mask += [False] * clean + [True] * noise
    return mask


def corrupt_spans(
    token_ids: list[int], noise_mask: list[bool], *, sentinel_id: Callable[[int], int], eos_id: int
) -> tuple[list[int], list[int]]:
    """(inputs, targets) of ``token_ids``: span ``i`` becomes ``sentinel_id(i)`` in the inputs and
    ``sentinel_id(i)`` + the span in the targets; both end with ``eos_id``."""
    inputs: list[int] = []
    targets: list[int] = []
    num_spans = 0
    for index, (token, is_noise) in enumerate(zip(token_ids, noise_mask, strict=True)):
        if not is_noise:
            inputs.append(token)
            continue
        if index == 0 or not noise_mask[index - 1]:
            inputs.append(sentinel_id(num_spans))
            targets.append(sentinel_id(num_spans))
            num_spans += 1
        targets.append(token)
    return [*inputs, eos_id], [*targets, eos_id]


def raw_length_for(
    *, encoder_length: int, decoder_length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0
) -> int:
    """The longest chunk whose corrupted inputs fit ``encoder_length`` and targets ``decoder_length``.

    CPM-2's 512/256 gives 568 tokens (512 inputs, 114 targets), as T5's ``random_spans_helper``.

    Raises:
        ConfigError: If not even 2 tokens fit.
    """

    def fits(length: int) -> bool:
        num_noise, num_spans = _span_counts(length, noise_density, mean_noise_span_length)
        # Each span adds one sentinel to both sides; eos adds one more.
        inputs_length = length - num_noise + num_spans + 1
        targets_length = num_noise + num_spans + 1
        return inputs_length <= encoder_length and targets_length <= decoder_length

    if not fits(2):
        raise ConfigError(
            f"encoder_length={encoder_length} / decoder_length={decoder_length} cannot hold a corrupted "
            "2-token text; use at least 3 and 3"
        )
    length = 2
    while fits(length + 1):
        length += 1
    return length


@dataclass(frozen=True, kw_only=True)
class SpanCorruptionConfig:
    """Span-corruption settings (defaults: T5 and CPM-2)."""

    encoder_length: int = 512
    """Encoder tokens per example, eos included (CPM-2: 512)."""
    decoder_length: int = 256
    """Decoder tokens per example, eos included (CPM-2: 256)."""
    noise_density: float = 0.15
    """Fraction of the tokens masked."""
    mean_noise_span_length: float = 3.0
    """Average length of a masked span."""
    seed: int = 0
    """Seed of the masks; chunk ``k`` always gets the same mask for the same seed."""

    def __post_init__(self) -> None:
        if not 0.0 < self.noise_density < 1.0:
            raise ConfigError(f"noise_density must be in (0, 1), got {self.noise_density}")
        if self.mean_noise_span_length < 1.0:
            raise ConfigError(f"mean_noise_span_length must be >= 1, got {self.mean_noise_span_length}")

    @property
    def raw_length(self) -> int:
        """Tokens of text per example before corruption (`raw_length_for` of these settings)."""
        return raw_length_for(
            encoder_length=self.encoder_length,
            decoder_length=self.decoder_length,
            noise_density=self.noise_density,
            mean_noise_span_length=self.mean_noise_span_length,
        )


class SpanCorruptionStream:
    """Turns a stream of documents into (inputs, targets) token lists; a `ResumableIterator`.

    Documents are tokenized without eos and concatenated (T5 does not mark document boundaries),
    cut into `SpanCorruptionConfig.raw_length` chunks and corrupted. The last, shorter chunk of a
    finite source is kept if it has at least 2 tokens. Batch the pairs with
    ``training.data.seq2seq.collate_ids(pairs, pad_id=..., decoder_start_id=..., input_length=
    config.encoder_length, target_length=config.decoder_length)`` for fixed shapes.
    """

    def __init__(self, documents: ResumableIterator[Example], tokenizer: Tokenizer, config: SpanCorruptionConfig):
        """Wrap ``documents`` (e.g. a `FileReader`).

        Raises:
            ConfigError: If the tokenizer has fewer sentinels than a chunk can have spans.
        """
        self.documents = documents
        self.tokenizer = tokenizer
        self.config = config
        self.raw_length = config.raw_length
        _, max_spans = _span_counts(self.raw_length, config.noise_density, config.mean_noise_span_length)
        if max_spans > tokenizer.num_sentinels:
            raise ConfigError(
                f"a {self.raw_length}-token chunk has up to {max_spans} noise spans but the tokenizer has "
                f"{tokenizer.num_sentinels} sentinels; shorten encoder_length or raise mean_noise_span_length"
            )
        self._pending: list[int] = []
        self._num_chunks = 0

    def __iter__(self) -> Iterator[tuple[list[int], list[int]]]:
        return self

    def __next__(self) -> tuple[list[int], list[int]]:
        while len(self._pending) < self.raw_length:
            document = next(self.documents, None)
            if document is None:
                break
            self._pending += self.tokenizer.encode(document.input, add_eos=False)
        if len(self._pending) < 2:
            raise StopIteration
        chunk, self._pending = self._pending[: self.raw_length], self._pending[self.raw_length :]
        rng = random.Random(f"span-corruption:{self.config.seed}:{self._num_chunks}")
        self._num_chunks += 1
        mask = random_spans_noise_mask(
            len(chunk),
            rng=rng,
            noise_density=self.config.noise_density,
            mean_noise_span_length=self.config.mean_noise_span_length,
        )
        return corrupt_spans(chunk, mask, sentinel_id=self.tokenizer.sentinel_id, eos_id=self.tokenizer.eos_id)

    def state_dict(self) -> dict[str, Any]:
        """Position of the documents, the tokens of the current document not yet used, the chunk count."""
        return {
            "documents": self.documents.state_dict(),
            "pending": list(self._pending),
            "num_chunks": self._num_chunks,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (same documents, tokenizer and config)."""
        self.documents.load_state_dict(state["documents"])
        self._pending = list(state["pending"])
        self._num_chunks = state["num_chunks"]
