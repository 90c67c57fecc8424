"""training.data: streaming readers (sharding, shuffling, exact resume), seq2seq collation, token budgets."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from training_fakes import EOS, PAD, DigitTokenizer, ListStream

from engine.config import ModelConfig
from engine.errors import ConfigError, InputError
from engine.model.transformer import Seq2SeqLM
from training.data import IGNORE_INDEX, Example, FileReader, ReaderConfig, Seq2SeqCollator, TokenBudgetBatcher


def _write_lines(path: Path, lines: list[str]) -> Path:
    data = "".join(line + "\n" for line in lines).encode()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[Path, list[str]]:
    """Three files (one gzipped, one with blank lines): 25 documents in glob order."""
    _write_lines(tmp_path / "a.txt", [f"a{i}" for i in range(10)])
    _write_lines(tmp_path / "b.txt.gz", [f"b{i}" for i in range(10)])
    _write_lines(tmp_path / "c.txt", ["", "c0", "  ", "c1", "c2", "c3", "c4", ""])
    return tmp_path, [f"{p}{i}" for p in "ab" for i in range(10)] + [f"c{i}" for i in range(5)]


def _texts(reader: FileReader) -> list[str]:
    return [example.input for example in reader]


def test_reads_lines_over_globs_and_gzip_skipping_blank_lines(corpus: tuple[Path, list[str]]) -> None:
    root, expected = corpus
    assert _texts(FileReader(ReaderConfig(paths=(str(root / "*.txt*"),)))) == expected
    twice = FileReader(ReaderConfig(paths=(str(root / "a.txt"),), num_epochs=2))
    assert _texts(twice) == [f"a{i}" for i in range(10)] * 2


def test_reads_blank_line_separated_paragraphs(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "p.txt", ["one", "two", "", "", "three", "", "four", "five"])
    reader = FileReader(ReaderConfig(paths=(str(path),), documents="paragraph"))
    assert _texts(reader) == ["one\ntwo", "three", "four\nfive"]


def test_reads_jsonl_text_or_task_fields(tmp_path: Path) -> None:
    rows = [{"q": "4096", "a": "四千零九十六", "p": "x"}, {"q": "7", "a": "七", "p": "y"}]
    path = _write_lines(tmp_path / "t.jsonl.gz", [json.dumps(row, ensure_ascii=False) for row in rows])
    config = ReaderConfig(paths=(str(path),), input_field="q", target_field="a", text_pair_field="p")
    assert next(iter(FileReader(config))) == Example(input="4096", target="四千零九十六", text_pair="x")
    assert _texts(FileReader(ReaderConfig(paths=(str(path),), input_field="a"))) == ["四千零九十六", "七"]
    with pytest.raises(InputError, match=r"t.jsonl.gz line 1 has no string field 'text'"):
        list(FileReader(ReaderConfig(paths=(str(path),))))
    bad = _write_lines(tmp_path / "bad.jsonl", ['{"text": "ok"}', "{oops"])
    with pytest.raises(InputError, match=r"bad.jsonl line 2 is not valid JSON"):
        list(FileReader(ReaderConfig(paths=(str(bad),))))


def test_shards_are_disjoint_deterministic_and_cover_everything(corpus: tuple[Path, list[str]]) -> None:
    root, expected = corpus
    shards = [_texts(FileReader(ReaderConfig(paths=(str(root / "*.txt*"),), rank=r, world_size=3))) for r in range(3)]
    assert shards[0] == expected[0::3]
    assert shards[1] == expected[1::3]
    assert shards[2] == expected[2::3]


def test_shuffle_is_a_seeded_permutation(corpus: tuple[Path, list[str]]) -> None:
    root, expected = corpus

    def order(seed: int) -> list[str]:
        return _texts(FileReader(ReaderConfig(paths=(str(root / "*.txt*"),), shuffle_buffer_size=8, seed=seed)))

    assert sorted(order(0)) == sorted(expected)
    assert order(0) != expected
    assert order(0) == order(0)
    assert order(0) != order(1)


@pytest.mark.parametrize(("documents", "world_size", "buffer"), [("line", 1, 0), ("line", 2, 5), ("paragraph", 1, 3)])
def test_resume_yields_exactly_the_remaining_examples(
    corpus: tuple[Path, list[str]], documents: str, world_size: int, buffer: int
) -> None:
    root, _ = corpus
    config = ReaderConfig(
        paths=(str(root / "*.txt*"),),
        documents=documents,
        world_size=world_size,
        rank=world_size - 1,
        shuffle_buffer_size=buffer,
        seed=7,
        num_epochs=2,
    )
    full = _texts(FileReader(config))
    for stop in range(len(full) + 1):
        reader = FileReader(config)
        head = [next(reader).input for _ in range(stop)]
        state = json.loads(json.dumps(reader.state_dict()))  # states must survive any checkpoint format
        resumed = FileReader(config)
        resumed.load_state_dict(state)
        assert head + _texts(resumed) == full, stop


def test_reader_errors_say_what_to_change(corpus: tuple[Path, list[str]], tmp_path: Path) -> None:
    root, _ = corpus
    with pytest.raises(ConfigError, match="no file matches"):
        FileReader(ReaderConfig(paths=(str(root / "missing*.txt"),)))
    with pytest.raises(ConfigError, match="rank"):
        ReaderConfig(paths=("x",), rank=2, world_size=2)
    other = FileReader(ReaderConfig(paths=(str(root / "a.txt"),), rank=1, world_size=2))
    with pytest.raises(ConfigError, match="same data config"):
        other.load_state_dict(FileReader(ReaderConfig(paths=(str(root / "a.txt"),))).state_dict())
    empty = _write_lines(tmp_path / "empty.txt", ["", " "])
    with pytest.raises(InputError, match="got no documents"):
        next(FileReader(ReaderConfig(paths=(str(empty),), num_epochs=None)))


# Seq2seq collation -----------------------------------------------------------------------------


def test_collator_pads_labels_and_shifts_right_with_the_decoder_start() -> None:
    collator = Seq2SeqCollator(tokenizer=DigitTokenizer(), decoder_start_id=5)
    batch = collator([Example(input="7 8 9", target="40 41"), Example(input="7", target="42")])
    assert batch.input_ids.tolist() == [[7, 8, 9, EOS], [7, EOS, PAD, PAD]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch.labels.tolist() == [[40, 41, EOS], [42, EOS, IGNORE_INDEX]]
    assert batch.decoder_input_ids.tolist() == [[5, 40, 41], [5, 42, EOS]]
    assert batch.decoder_attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch.num_target_tokens == 5
    assert Seq2SeqCollator(tokenizer=DigitTokenizer())([Example(input="7", target="8")]).decoder_input_ids[0, 0] == PAD


def test_collator_pairs_truncates_and_pads_to_fixed_length() -> None:
    collator = Seq2SeqCollator(tokenizer=DigitTokenizer(), max_input_length=6, max_target_length=3)
    encoded = collator.encode(Example(input="10 11 12 13 14", text_pair="20 21", target="30 31 32 33"))
    # Longest first: the input shrinks to 3 tokens while the pair keeps 2 + eos. As served, no eos
    # between the segments and one at the end.
    assert encoded == ([10, 11, 12, 20, 21, EOS], [30, 31, EOS])
    long_pair = collator.encode(Example(input="10", text_pair="20 21 22 23 24 25", target="30"))
    assert long_pair == ([10, 20, 21, 22, 23, EOS], [30, EOS])
    fixed = Seq2SeqCollator(tokenizer=DigitTokenizer(), max_input_length=8, max_target_length=4, pad_to_max_length=True)
    assert fixed([Example(input="3", target="4")]).input_ids.shape == (1, 8)


def test_token_budget_batches_stay_under_budget_keep_order_and_resume() -> None:
    examples = [Example(input=" ".join(["5"] * (1 + i % 7)), target=str(10 + i)) for i in range(30)]
    collator = Seq2SeqCollator(tokenizer=DigitTokenizer())

    def batcher() -> TokenBudgetBatcher:
        return TokenBudgetBatcher(ListStream(examples), collator, max_tokens=40, max_batch_size=6)

    batches = list(batcher())
    assert all(b.input_ids.numel() + b.labels.numel() <= 40 for b in batches)
    assert max(b.input_ids.shape[0] for b in batches) > 1
    assert [int(t) for b in batches for t in b.labels[:, 0]] == [10 + i for i in range(30)]
    first = batcher()
    head = [next(first) for _ in range(3)]
    resumed = batcher()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    rest = list(resumed)
    assert [b.labels.tolist() for b in head + rest] == [b.labels.tolist() for b in batches]


def test_batch_trains_a_tiny_model() -> None:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=DigitTokenizer.vocab_size, d_model=16, num_heads=2, d_kv=8, d_ff=32,
        num_encoder_layers=1, num_decoder_layers=1,
    )  # fmt: skip
    model = Seq2SeqLM(config)
    collator = Seq2SeqCollator(tokenizer=DigitTokenizer(), decoder_start_id=config.decoder_start_token_id)
    batch = collator([Example(input="40 96", target="4 10 9 6"), Example(input="7 8", target="15")])
    logits = model(**batch.model_inputs())  # (B, T, V)
    loss = F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), ignore_index=IGNORE_INDEX)
    loss.backward()
    assert torch.isfinite(loss)
    assert logits.shape[:2] == batch.labels.shape
    assert all(p.grad is not None for p in model.parameters())
