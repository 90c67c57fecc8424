"""Fakes shared by the training data tests: a hand-checkable tokenizer and a resumable list stream."""

from __future__ import annotations

from collections.abc import Sequence

from training.data import Example

EOS, PAD = 1, 0


class DigitTokenizer:
    """A fake tokenizer: each whitespace-separated integer is its own id; sentinels count up from 900,
    unlike SentencePiece's (which count down), to show the collators ask the tokenizer."""

    vocab_size, eos_id, pad_id, unk_id, num_sentinels = 1000, EOS, PAD, 2, 50

    def encode(self, text: str, *, add_eos: bool = True) -> list[int]:
        return [int(word) for word in text.split()] + ([EOS] if add_eos else [])

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        return " ".join(map(str, ids))

    def id_to_piece(self, id: int) -> str:
        return str(id)

    def is_special(self, id: int) -> bool:
        return id < 3 or id >= 900

    def sentinel_id(self, i: int) -> int:
        return 900 + i


class ListStream:
    """A resumable list of examples."""

    def __init__(self, items: list[Example]) -> None:
        self.items, self.index = items, 0

    def __iter__(self) -> ListStream:
        return self

    def __next__(self) -> Example:
        if self.index == len(self.items):
            raise StopIteration
        self.index += 1
        return self.items[self.index - 1]

    def state_dict(self) -> dict[str, int]:
        return {"index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.index = state["index"]
