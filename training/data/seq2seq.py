"""Padding (input, optional text pair, target) examples into the tensors a `Seq2SeqLM` trains on.

Layout follows HF transformers' T5 fine-tuning convention: ``labels`` are the target ids plus eos,
-100 where padded (cross-entropy's ``ignore_index``); ``decoder_input_ids`` are the labels shifted
right behind the model's ``decoder_start_token_id`` (T5: pad, CPM-2: ``<s>``). A sentence pair is
encoded as ``input </s> text_pair </s>`` (HF's T5 pair format).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.errors import ConfigError
from engine.tokenizer import Tokenizer, decoder_start_id
from training.data.example import Example, ResumableIterator

__all__ = ["IGNORE_INDEX", "Seq2SeqBatch", "Seq2SeqCollator", "TokenBudgetBatcher", "collate_ids", "shift_right"]

IGNORE_INDEX = -100
"""Label of positions the loss skips (``torch.nn.functional.cross_entropy``'s default ignore_index)."""

TokenPair = tuple[list[int], list[int]]


@dataclass(frozen=True)
class Seq2SeqBatch:
    """One padded batch. B examples, S encoder positions, T decoder positions."""

    input_ids: torch.Tensor  # (B, S) int64
    attention_mask: torch.Tensor  # (B, S) int64, 1 on real tokens
    decoder_input_ids: torch.Tensor  # (B, T) int64
    decoder_attention_mask: torch.Tensor  # (B, T) int64, 1 where labels are real
    labels: torch.Tensor  # (B, T) int64, IGNORE_INDEX on padding

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments of `Seq2SeqLM.forward` (everything but the labels)."""
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "decoder_input_ids": self.decoder_input_ids,
            "decoder_attention_mask": self.decoder_attention_mask,
        }

    def to(self, device: torch.device | str) -> Seq2SeqBatch:
        """The batch on ``device`` (non-blocking where the source is pinned)."""
        moved = {name: getattr(self, name).to(device, non_blocking=True) for name in self.__dataclass_fields__}
        return Seq2SeqBatch(**moved)

    @property
    def num_target_tokens(self) -> int:
        """Label positions the loss counts (normalise summed losses by it)."""
        return int((self.labels != IGNORE_INDEX).sum())


def shift_right(labels_BT: torch.Tensor, *, decoder_start_id: int, pad_id: int) -> torch.Tensor:
    """Decoder inputs for ``labels_BT``: the start token, then the labels but the last, -100 as pad."""
    shifted_BT = labels_BT.new_full(labels_BT.shape, decoder_start_id)
    shifted_BT[:, 1:] = labels_BT[:, :-1]
    return shifted_BT.masked_fill(shifted_BT == IGNORE_INDEX, pad_id)


def collate_ids(
    pairs: Sequence[TokenPair],
    *,
    pad_id: int,
    decoder_start_id: int,
    input_length: int | None = None,
    target_length: int | None = None,
) -> Seq2SeqBatch:
    """Pad (input ids, target ids) pairs, targets already ending in eos, to a `Seq2SeqBatch`.

    Pads to ``input_length`` / ``target_length`` when given (fixed shapes, e.g. span corruption's
    512/256), else to the longest sequence of the batch.

    Raises:
        ConfigError: If the batch is empty or a sequence is longer than a given length.
    """
    if not pairs:
        raise ConfigError("cannot collate an empty batch")
    longest_input = max(len(inputs) for inputs, _ in pairs)
    longest_target = max(len(targets) for _, targets in pairs)
    num_inputs = longest_input if input_length is None else input_length
    num_targets = longest_target if target_length is None else target_length
    if longest_input > num_inputs or longest_target > num_targets:
        raise ConfigError(
            f"a sequence ({longest_input} input / {longest_target} target tokens) exceeds the padded length "
            f"{num_inputs} / {num_targets}; truncate first or raise the lengths"
        )
    input_ids = torch.full((len(pairs), num_inputs), pad_id, dtype=torch.long)  # (B, S)
    labels = torch.full((len(pairs), num_targets), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for row, (inputs, targets) in enumerate(pairs):
        input_ids[row, : len(inputs)] = torch.tensor(inputs, dtype=torch.long)
        labels[row, : len(targets)] = torch.tensor(targets, dtype=torch.long)
    return Seq2SeqBatch(
        input_ids=input_ids,
        attention_mask=(torch.arange(num_inputs) < torch.tensor([len(i) for i, _ in pairs])[:, None]).long(),
        decoder_input_ids=shift_right(labels, decoder_start_id=decoder_start_id, pad_id=pad_id),
        decoder_attention_mask=(labels != IGNORE_INDEX).long(),
        labels=labels,
    )


def _truncate(ids: list[int], length: int) -> list[int]:
    """The first ``length - 1`` ids and the final eos, so a truncated text still ends like one."""
    return ids if len(ids) <= length else [*ids[: length - 1], ids[-1]]


@dataclass(frozen=True, kw_only=True)
class Seq2SeqCollator:
    """Encodes and pads `Example` lists; call it on a list to get a `Seq2SeqBatch`."""

    tokenizer: Tokenizer
    max_input_length: int = 512
    """Encoder tokens kept per example, eos included; longer inputs are truncated."""
    max_target_length: int = 256
    """Label tokens kept per example, eos included."""
    decoder_start_id: int | None = None
    """The model's ``decoder_start_token_id``; None asks the tokenizer (T5: pad, CPM-2: ``<s>``)."""
    pad_to_max_length: bool = False
    """Pad every batch to the maximum lengths (fixed shapes) instead of its longest sequence."""
    _start_id: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_input_length < 2 or self.max_target_length < 2:
            raise ConfigError("max_input_length and max_target_length must be >= 2 (a token and eos)")
        start = decoder_start_id(self.tokenizer) if self.decoder_start_id is None else self.decoder_start_id
        object.__setattr__(self, "_start_id", start)

    def encode(self, example: Example) -> TokenPair:
        """(input ids, target ids), each ending in eos and truncated; a missing target gives ``[eos]``."""
        inputs, pair, targets = self.encode_segments(example)
        return inputs + pair, targets

    def encode_segments(self, example: Example) -> tuple[list[int], list[int], list[int]]:
        """(input ids, text-pair ids, target ids), truncated; the pair is ``[]`` without a text pair.
        Prompt tuning needs the split to place an infix between the segments.

        The layout is the server's (`server/service.py`, `cpm2 generate --text-pair`): ``input eos``
        alone, ``input pair eos`` with a pair — no eos between the segments — so a model or prompt
        trained here sees exactly what it is served."""
        pair: list[int] = []
        if example.text_pair is None:
            inputs = _truncate(self.tokenizer.encode(example.input), self.max_input_length)
        else:
            inputs = self.tokenizer.encode(example.input, add_eos=False)
            pair = self.tokenizer.encode(example.text_pair)
            # Longest first (HF's default): trim whichever segment is longer until both fit.
            num_inputs, num_pair = len(inputs), len(pair)
            while num_inputs + num_pair > self.max_input_length:
                if num_inputs >= num_pair:
                    num_inputs -= 1
                else:
                    num_pair -= 1
            inputs, pair = inputs[:num_inputs], _truncate(pair, num_pair)
        targets = self.tokenizer.encode(example.target or "")
        return inputs, pair, _truncate(targets, self.max_target_length)

    def collate_ids(self, pairs: Sequence[TokenPair]) -> Seq2SeqBatch:
        """`collate_ids` with this collator's ids and lengths."""
        fixed = self.pad_to_max_length
        return collate_ids(
            pairs,
            pad_id=self.tokenizer.pad_id,
            decoder_start_id=self._start_id,
            input_length=self.max_input_length if fixed else None,
            target_length=self.max_target_length if fixed else None,
        )

    def __call__(self, examples: Sequence[Example]) -> Seq2SeqBatch:
        return self.collate_ids([self.encode(example) for example in examples])


class TokenBudgetBatcher:
    """Groups a stream of examples into batches of at most ``max_tokens`` padded tokens.

    A batch's cost is ``size x (longest input + longest target)``: what the padded tensors hold.
    Batches are filled greedily in stream order (no sorting, so the order stays the reader's); an
    example over the budget on its own becomes a batch of one. A `ResumableIterator`: the example
    that overflowed a batch is carried in the state.
    """

    def __init__(
        self,
        examples: ResumableIterator[Example],
        collator: Seq2SeqCollator,
        *,
        max_tokens: int,
        max_batch_size: int | None = None,
    ) -> None:
        if max_tokens < 1 or (max_batch_size is not None and max_batch_size < 1):
            raise ConfigError(f"max_tokens and max_batch_size must be >= 1, got {max_tokens}, {max_batch_size}")
        self.examples = examples
        self.collator = collator
        self.max_tokens = max_tokens
        self.max_batch_size = max_batch_size
        self._carry: Example | None = None

    def __iter__(self) -> TokenBudgetBatcher:
        return self

    def __next__(self) -> Seq2SeqBatch:
        pairs: list[TokenPair] = []
        longest_input = longest_target = 0
        while self.max_batch_size is None or len(pairs) < self.max_batch_size:
            example = self._carry if self._carry is not None else next(self.examples, None)
            self._carry = None
            if example is None:
                break
            inputs, targets = self.collator.encode(example)
            new_input, new_target = max(longest_input, len(inputs)), max(longest_target, len(targets))
            if pairs and (len(pairs) + 1) * (new_input + new_target) > self.max_tokens:
                self._carry = example
                break
            pairs.append((inputs, targets))
            longest_input, longest_target = new_input, new_target
        if not pairs:
            raise StopIteration
        return self.collator.collate_ids(pairs)

    def state_dict(self) -> dict[str, Any]:
        """The examples' position and the carried example."""
        carry = None if self._carry is None else self._carry.to_dict()
        return {"examples": self.examples.state_dict(), "carry": carry}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (same examples and settings)."""
        self.examples.load_state_dict(state["examples"])
        self._carry = None if state["carry"] is None else Example.from_dict(state["carry"])
