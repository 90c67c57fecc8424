"""Built-in tasks mirroring CPM-2's evaluations on a world of numbers, and a matching pretraining corpus.

CPM-2 was evaluated on translation (WMT20 en→zh), math word problems (Math23K) and sentence-pair
matching (LCQMC). These tasks probe the same skills with answers a program can check:

* ``num2zh`` ("4096" → "四千零九十六") and ``zh2num`` (the reverse): translation.
* ``add`` ("37 + 58" → "95"): arithmetic.
* ``same`` ("4096" + "四千零九十六" → "yes"/"no"): sentence-pair classification, balanced, with hard
  negatives (a near number: one digit changed, off by a little, a zero added or dropped).

Splits never overlap: a number (or, for ``add``, an unordered operand pair) belongs to one split by
a hash of its value, for every task at once, so a test number is never seen reversed in another
task's training data nor in `pretraining_documents`. Numbers below 100 (and sums of one-digit
numbers) are always ``train``: they are the words every larger number is built from and the
built-in sentences use them. Example ``k`` of a stream depends only on ``(task, split, seed, k)``, so
streams are reproducible and resume from a counter. Numbers are spelled by `engine.tokenizer.corpus`.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import ConfigError
from engine.tokenizer.corpus import builtin_corpus, chinese_number, english_number
from training.data.example import Example

__all__ = [
    "MAX_NUMBER",
    "SPLITS",
    "TASKS",
    "GeneratedDocuments",
    "Task",
    "TaskStream",
    "generate_task",
    "iter_documents",
    "split_of",
    "write_jsonl",
]

SPLITS = ("train", "validation", "test")
MAX_NUMBER = 99_999_999  # the spellers stop below 亿 (10^8)
_MAX_ADD_DIGITS = 4
_MAX_DRAWS = 1000  # rejection sampling finds a validation/test value in ~10 draws


def split_of(key: tuple[int, ...]) -> str:
    """The split of a number ``(n,)`` or an operand pair ``(a, b)`` (order does not matter): 80/10/10."""
    values = tuple(sorted(key))
    if (len(values) == 1 and values[0] < 100) or max(values) < 10:
        return "train"
    digest = hashlib.blake2b(repr(values).encode(), digest_size=8).digest()
    bucket = int.from_bytes(digest, "big") % 10
    return "train" if bucket < 8 else "validation" if bucket == 8 else "test"


def _draw_number(rng: random.Random, max_digits: int = 8) -> int:
    # Uniform over digit counts, not values: otherwise nearly every number would have 8 digits.
    digits = rng.randint(1, max_digits)
    return rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10**digits)


def _draw_in_split(rng: random.Random, split: str, draw: Callable[[random.Random], tuple[int, ...]]) -> tuple[int, ...]:
    for _ in range(_MAX_DRAWS):
        key = draw(rng)
        if split_of(key) == split:
            return key
    raise AssertionError(f"no {split} value in {_MAX_DRAWS} draws")  # 10% of values: practically impossible


def _one_number(rng: random.Random) -> tuple[int, ...]:
    return (_draw_number(rng),)


def _two_numbers(rng: random.Random) -> tuple[int, ...]:
    return (_draw_number(rng, _MAX_ADD_DIGITS), _draw_number(rng, _MAX_ADD_DIGITS))


def _near_number(n: int, rng: random.Random) -> int:
    """A different number a careless reader could take for ``n``."""
    while True:
        digits = list(str(n))
        way = rng.randrange(3)
        if way == 0:  # one digit changed
            position = rng.randrange(len(digits))
            # No leading zero: "0123" would be a different, shorter number, not a misread digit.
            lowest = 1 if position == 0 and len(digits) > 1 else 0
            digits[position] = str(rng.choice([d for d in range(lowest, 10) if str(d) != digits[position]]))
            candidate = int("".join(digits))
        elif way == 1:  # off by a little
            candidate = n + rng.choice([-1, 1]) * rng.randint(1, 10)
        else:  # a zero added or dropped: the 零 and unit placement matters
            candidate = n * 10 if rng.random() < 0.5 else n // 10
        if candidate != n and 0 <= candidate <= MAX_NUMBER:
            return candidate


def _num2zh(rng: random.Random, split: str, index: int) -> Example:
    (n,) = _draw_in_split(rng, split, _one_number)
    return Example(input=str(n), target=chinese_number(n), task="num2zh")


def _zh2num(rng: random.Random, split: str, index: int) -> Example:
    (n,) = _draw_in_split(rng, split, _one_number)
    return Example(input=chinese_number(n), target=str(n), task="zh2num")


def _add(rng: random.Random, split: str, index: int) -> Example:
    a, b = _draw_in_split(rng, split, _two_numbers)
    return Example(input=f"{a} + {b}", target=str(a + b), task="add")


def _same(rng: random.Random, split: str, index: int) -> Example:
    (n,) = _draw_in_split(rng, split, _one_number)
    is_same = index % 2 == 0  # exactly balanced over any even-length prefix
    shown = n if is_same else _near_number(n, rng)
    return Example(input=str(n), text_pair=chinese_number(shown), target="yes" if is_same else "no", task="same")


@dataclass(frozen=True)
class Task:
    """A built-in task: its name, the skill it probes and its example maker."""

    name: str
    kind: str
    """``translation``, ``arithmetic`` or ``classification``."""
    make: Callable[[random.Random, str, int], Example]


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("num2zh", "translation", _num2zh),
        Task("zh2num", "translation", _zh2num),
        Task("add", "arithmetic", _add),
        Task("same", "classification", _same),
    )
}


class TaskStream:
    """Endless examples of one task and split; a `ResumableIterator` whose state is a counter."""

    def __init__(self, name: str, split: str, *, seed: int = 0) -> None:
        """Raises ConfigError for an unknown task or split."""
        if name not in TASKS:
            raise ConfigError(f"unknown task {name!r}; built-in tasks are {sorted(TASKS)}")
        if split not in SPLITS:
            raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
        self.task, self.split, self.seed = TASKS[name], split, seed
        self._index = 0

    def __iter__(self) -> TaskStream:
        return self

    def __next__(self) -> Example:
        rng = random.Random(f"{self.task.name}:{self.split}:{self.seed}:{self._index}")
        example = self.task.make(rng, self.split, self._index)
        self._index += 1
        return example

    def state_dict(self) -> dict[str, Any]:
        """How many examples were drawn."""
        return {"index": self._index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after ``state["index"]`` examples."""
        self._index = state["index"]


def generate_task(name: str, split: str, *, num_examples: int, seed: int = 0) -> list[Example]:
    """The first ``num_examples`` distinct examples of a `TaskStream` (an evaluation set); labels of a
    classification task are balanced (half "yes", half "no").

    Raises:
        ConfigError: For an unknown task or split.
    """
    seen: set[Example] = set()
    examples: list[Example] = []
    stream = TaskStream(name, split, seed=seed)
    # Dropping duplicates could unbalance a classification set, so each label gets half the places.
    label_quota = -(-num_examples // 2) if stream.task.kind == "classification" else num_examples
    label_counts: dict[str | None, int] = {}
    # Duplicates are rare (values spread over 10^8); the cap only stops an impossible request.
    for _ in range(10 * num_examples + 100):
        if len(examples) == num_examples:
            return examples
        example = next(stream)
        if example not in seen and label_counts.get(example.target, 0) < label_quota:
            seen.add(example)
            examples.append(example)
            label_counts[example.target] = label_counts.get(example.target, 0) + 1
    raise ConfigError(f"{name}/{split} has fewer than {num_examples} distinct examples; ask for fewer")


def _spells_numbers(line: str) -> bool:
    """Whether a built-in corpus line spells numbers of any split: its number lines carry digits, its
    sum lines "plus" or "等于". The lines left spell only numbers below 100 (always ``train``)."""
    return any(char.isdigit() for char in line) or " plus " in line or "等于" in line


class GeneratedDocuments:
    """Endless pretraining documents from the tasks' world; a `ResumableIterator` (state: a counter).

    A document is 4 to 8 sentences mixing number spellings (digits, English, Chinese), sums in all
    three forms and the built-in corpus' sentences. Only ``train``-split numbers and sums appear (the
    built-in number and sum lines are left out: they spell numbers of every split), so no evaluation
    answer leaks in.
    """

    def __init__(self, *, seed: int = 0) -> None:
        self.seed = seed
        self._index = 0
        self._sentences = [line for line in builtin_corpus() if not _spells_numbers(line)]

    def __iter__(self) -> GeneratedDocuments:
        return self

    def __next__(self) -> Example:
        rng = random.Random(f"documents:{self.seed}:{self._index}")
        self._index += 1
        makers = (self._number_sentence, self._sum_sentence, self._corpus_sentence)
        sentences = [rng.choice(makers)(rng) for _ in range(rng.randint(4, 8))]
        return Example(input=" ".join(sentences))

    def state_dict(self) -> dict[str, Any]:
        """How many documents were made."""
        return {"index": self._index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after ``state["index"]`` documents."""
        self._index = state["index"]

    def _number_sentence(self, rng: random.Random) -> str:
        (n,) = _draw_in_split(rng, "train", _one_number)
        return rng.choice(
            (
                f"{n} = {english_number(n)} = {chinese_number(n)}",
                f"The number {n} is written {chinese_number(n)} in Chinese.",
                f"数字{n}读作{chinese_number(n)}。",
            )
        )

    def _sum_sentence(self, rng: random.Random) -> str:
        # The operands and the result are spelled out too, so all of them must be train numbers.
        while True:
            a, b = _draw_in_split(rng, "train", _two_numbers)
            if split_of((a,)) == split_of((b,)) == split_of((a + b,)) == "train":
                break
        return rng.choice(
            (
                f"{a} + {b} = {a + b}",
                f"{english_number(a).capitalize()} plus {english_number(b)} is {english_number(a + b)}.",
                f"{chinese_number(a)}加{chinese_number(b)}等于{chinese_number(a + b)}。",
            )
        )

    def _corpus_sentence(self, rng: random.Random) -> str:
        return rng.choice(self._sentences)


def write_jsonl(examples: Iterable[Example], path: Path) -> Path:
    """Write ``examples`` as JSONL with fields input / target / text_pair / task (read them back with
    ``ReaderConfig(paths=(str(path),), target_field="target", input_field="input")``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as file:
        for example in examples:
            file.write(json.dumps(example.to_dict(), ensure_ascii=False) + "\n")
    return path


def iter_documents(num_documents: int, *, seed: int = 0) -> Iterator[str]:
    """Text of the first ``num_documents`` `GeneratedDocuments` (e.g. to train a tokenizer on)."""
    documents = GeneratedDocuments(seed=seed)
    for _ in range(num_documents):
        yield next(documents).input
