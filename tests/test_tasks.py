"""training.tasks (number tasks, splits, pretraining documents, scoring) and `cpm2 train tokenizer`."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

from cpm2.cli import main
from engine.errors import ConfigError, InputError
from engine.tokenizer import load_tokenizer
from engine.tokenizer.corpus import chinese_number
from training.data import Example
from training.tasks import (
    SPLITS,
    TASKS,
    GeneratedDocuments,
    TaskStream,
    generate_task,
    normalize_answer,
    score_predictions,
    split_of,
)

_ZH_DIGITS = {c: d for d, c in enumerate("零一二三四五六七八九")}
_ZH_UNITS = {"十": 10, "百": 100, "千": 1000}


def parse_chinese(text: str) -> int:
    """Reference reader of Chinese numerals below 10^8, independent of the speller."""
    total = section = digit = 0
    for char in text:
        if char in _ZH_DIGITS:
            digit = _ZH_DIGITS[char]
        elif char in _ZH_UNITS:
            section += max(digit, 1) * _ZH_UNITS[char]  # 十五: a bare 十 means 一十
            digit = 0
        else:
            assert char == "万", text
            total, section, digit = (section + digit) * 10_000, 0, 0
    return total + section + digit


@pytest.mark.parametrize(
    ("number", "spelled"),
    [
        (0, "零"),
        (10, "十"),
        (15, "十五"),
        (110, "一百一十"),
        (1004, "一千零四"),
        (1010, "一千零一十"),
        (4096, "四千零九十六"),
        (10010, "一万零一十"),
        (10100, "一万零一百"),
        (100000, "十万"),
        (100010, "十万零一十"),
        (203000, "二十万三千"),  # zeros at the end of the 万 group are silent (小学数学读数规则)
        (1000010, "一百万零一十"),
        (30056000, "三千零五万六千"),
        (99999999, "九千九百九十九万九千九百九十九"),
    ],
)
def test_chinese_number_places_zero_like_the_reading_rules(number: int, spelled: str) -> None:
    assert chinese_number(number) == spelled


def test_chinese_number_round_trips_so_every_spelling_is_unique() -> None:
    numbers = [*range(0, 30_000, 7), *range(99_000, 121_000, 13), *(10**k + j for k in range(3, 8) for j in range(12))]
    numbers += [k * 10_000_019 % 10**8 for k in range(3000)]
    assert all(parse_chinese(chinese_number(n)) == n for n in numbers)


def test_tasks_are_correct_and_deterministic() -> None:
    for name in TASKS:
        examples = generate_task(name, "train", num_examples=200, seed=1)
        assert len(set(examples)) == 200
        assert examples == generate_task(name, "train", num_examples=200, seed=1)
        assert examples != generate_task(name, "train", num_examples=200, seed=2)
        assert all(example.task == name for example in examples)
    for example in generate_task("num2zh", "test", num_examples=200):
        assert parse_chinese(str(example.target)) == int(example.input)
    for example in generate_task("zh2num", "test", num_examples=200):
        assert int(str(example.target)) == parse_chinese(example.input)
    for example in generate_task("add", "test", num_examples=200):
        a, b = (int(part) for part in example.input.split(" + "))
        assert int(str(example.target)) == a + b
    assert len({len(example.input) for example in generate_task("num2zh", "train", num_examples=200)}) == 8


def _keys(example: Example) -> tuple[int, ...]:
    if example.task == "add":
        return tuple(sorted(int(part) for part in example.input.split(" + ")))
    return (parse_chinese(example.input),) if example.task == "zh2num" else (int(example.input),)


def test_splits_never_overlap_within_or_across_tasks() -> None:
    by_split = {split: set() for split in SPLITS}  # type: ignore[var-annotated]
    for name in TASKS:
        for split in SPLITS:
            keys = {_keys(example) for example in generate_task(name, split, num_examples=300)}
            assert all(split_of(key) == split for key in keys)
            by_split[split] |= {(name == "add", key) for key in keys}
    assert not by_split["train"] & by_split["test"]
    assert not by_split["train"] & by_split["validation"]
    assert not by_split["validation"] & by_split["test"]
    fractions = [sum(split_of((n,)) == s for n in range(100, 20_100)) / 20_000 for s in SPLITS]
    assert fractions == pytest.approx([0.8, 0.1, 0.1], abs=0.01)
    assert split_of((37, 58)) == split_of((58, 37))


def _is_near(n: int, m: int) -> bool:
    one_digit = len(str(n)) == len(str(m)) and sum(a != b for a, b in zip(str(n), str(m), strict=True)) == 1
    return one_digit or 0 < abs(n - m) <= 10 or m in (n * 10, n // 10)


def test_same_is_balanced_with_hard_negatives() -> None:
    examples = generate_task("same", "validation", num_examples=200)
    assert sum(example.target == "yes" for example in examples) == 100
    for example in examples:
        shown = parse_chinese(str(example.text_pair))
        if example.target == "yes":
            assert shown == int(example.input)
        else:
            assert shown != int(example.input)
            assert _is_near(int(example.input), shown), example


def test_streams_resume_from_their_state() -> None:
    for stream_of in (lambda: TaskStream("same", "train", seed=3), lambda: GeneratedDocuments(seed=3)):
        first = stream_of()
        head = [next(first) for _ in range(7)]
        resumed = stream_of()
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        whole = stream_of()
        assert head + [next(resumed) for _ in range(5)] == [next(whole) for _ in range(12)]
    with pytest.raises(ConfigError, match="unknown task"):
        TaskStream("mul", "train")
    with pytest.raises(ConfigError, match="split"):
        TaskStream("add", "dev")


def test_pretraining_documents_hold_only_train_numbers() -> None:
    documents = [next(stream).input for stream in [GeneratedDocuments(seed=0)] for _ in range(1000)]
    text = "\n".join(documents)
    assert "四千" in text or "千" in text
    assert " plus " in text
    assert "加" in text
    assert " = " in text
    for number in re.findall(r"\d+", text):
        assert split_of((int(number),)) == "train", number
    for numeral in re.findall(r"[零一二三四五六七八九十百千万]{2,}", text):
        assert split_of((parse_chinese(numeral),)) == "train", numeral


def test_scoring_normalises_whitespace_and_counts_per_task() -> None:
    assert normalize_answer("  四千 零九十六 \n") == "四千零九十六"
    assert normalize_answer(" 40  96 ") == "40 96"
    examples = [
        Example(input="1", target="一", task="num2zh"),
        Example(input="2", target="二", task="num2zh"),
        Example(input="1 + 1", target="2", task="add"),
    ]
    scores = score_predictions(examples, [" 一 ", "三", "2"])
    assert list(scores) == ["add", "num2zh"]
    assert scores["num2zh"].accuracy == 0.5
    assert scores["add"].accuracy == 1.0
    with pytest.raises(InputError, match="one per example"):
        score_predictions(examples, ["一"])


def test_cli_trains_a_tokenizer_from_builtin_or_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "tokenizer", "--out", str(tmp_path / "builtin")]) == 0
    assert "spiece.model" in capsys.readouterr().out
    tokenizer = load_tokenizer(tmp_path / "builtin")
    assert tokenizer.decode(tokenizer.encode("4096 = 四千零九十六")) == "4096 = 四千零九十六"

    lines = [f"line {i} of the file corpus, with words and numbers {i * 7}." for i in range(200)]
    (tmp_path / "a.txt").write_text("\n".join(lines[:100]))
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as file:
        file.writelines(json.dumps({"body": line}) + "\n" for line in lines[100:])
    out = tmp_path / "files"
    argv = ["train", "tokenizer", "--out", str(out), "--vocab-size", "320", "--text-field", "body", "--corpus"]
    assert main([*argv, str(tmp_path / "a.txt"), str(tmp_path / "*.jsonl.gz")]) == 0
    assert load_tokenizer(out).vocab_size == 320 + 100

    assert main(["train", "tokenizer", "--out", str(out), "--corpus", str(tmp_path / "missing.txt")]) == 2
    assert "no file matches" in capsys.readouterr().err
