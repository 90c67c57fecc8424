"""Tokenizer tests: T5 id layout, HF parity, lossless round trips, streaming decode, loading errors.

Every SentencePiece model here is trained from the built-in corpus in the test session; HF
transformers' `T5Tokenizer` built from the same `spiece.model` is the reference.
"""

import functools
import itertools
import random
import re
from pathlib import Path
from typing import Any

import pytest

from engine.errors import CheckpointError, ConfigError, InputError
from engine.tokenizer import (
    IncrementalDecoder,
    SentencePieceTokenizer,
    Tokenizer,
    builtin_corpus,
    load_tokenizer,
    train_sentencepiece,
)
from engine.tokenizer.corpus import chinese_number, english_number

VOCAB_SIZE = 1000

# In-vocabulary text: HF must agree with us exactly on ids and on decoded text.
PARITY_TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "4096 = four thousand ninety-six = 四千零九十六",
    "37 + 58 = 95",
    "你好，世界！今天天气很好。",
    "混合专家模型 routes tokens to experts.",
    "  leading, trailing and   inner   whitespace  ",
    "tabs\tand\nnewlines\r\n",
    "what?!... (yes) [no] {maybe} <tags> a_b @c #d $e %f ^g &h *i ~j `k` |l| \\m",
    'Tom\'s "quoted" text -- really?',
    "中文：ＡＢＣ１２３",  # NFKC folds these to ASCII in both
    "hello <extra_id_0> world",
    "<extra_id_0>",
    "a<extra_id_1>b<extra_id_99>",
    "<extra_id_0> x <extra_id_1> y<extra_id_2>",
    "x<extra_id_100>",  # beyond the 100 sentinels: plain text
    "<extra_id_01>",  # not a sentinel's exact spelling: plain text
    "<extra_id_0><extra_id_1>",
    "",
    " ",
]

# Anything at all: emoji (byte fallback), combining marks, ZWJ sequences, control characters.
UNICODE_TEXTS = [
    "😀 emoji and 👩‍💻 and 🇨🇳",
    "café naïve e\u0301 ﬁ ① 𝔘",
    "  two leading spaces, two trailing  ",
    "a  b\t\tc\n\nd\r\n",
    "\x00\x7f\u200b\u3000\u00a0",
    "全角：ＡＢＣ１２３，生僻字：龘齉",
    "\ufffd is a real replacement character",
]


def _train(tmp_path_factory: pytest.TempPathFactory, name: str, **kwargs: Any) -> Path:
    model_dir = tmp_path_factory.mktemp(name)
    train_sentencepiece(builtin_corpus(), model_dir / "spiece.model", vocab_size=VOCAB_SIZE, **kwargs)
    return model_dir


@pytest.fixture(scope="session")
def t5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model normalized like T5's released ones (NFKC, whitespace collapsed)."""
    return _train(tmp_path_factory, "t5", normalization_rule_name="nmt_nfkc", remove_extra_whitespaces=True)


@pytest.fixture(scope="session")
def lossless_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model with train_sentencepiece's defaults, as `cpm2 init` ships it."""
    return _train(tmp_path_factory, "lossless")


@pytest.fixture(scope="session")
def t5_tok(t5_dir: Path) -> SentencePieceTokenizer:
    return SentencePieceTokenizer(t5_dir / "spiece.model")


@pytest.fixture(scope="session")
def lossless_tok(lossless_dir: Path) -> SentencePieceTokenizer:
    return SentencePieceTokenizer(lossless_dir / "spiece.model")


@pytest.fixture(scope="session")
def hf_tok(t5_dir: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    # `T5Tokenizer(vocab_file=...)` silently ignores the file in transformers 5.x and builds a
    # 104-token placeholder vocabulary; from_pretrained on the directory converts spiece.model.
    return transformers.T5Tokenizer.from_pretrained(str(t5_dir))


@functools.cache
def _id_pools(tok: SentencePieceTokenizer) -> dict[str, list[int]]:
    pieces = [tok.id_to_piece(i) for i in range(tok.vocab_size)]
    byte_ids = [i for i, p in enumerate(pieces) if p.startswith("<0x")]
    return {
        "bytes": byte_ids,
        "spaces": [i for i, p in enumerate(pieces) if set(p) == {"▁"}],
        "plain": [i for i, p in enumerate(pieces) if not tok.is_special(i) and i not in byte_ids],
        "specials": [tok.pad_id, tok.eos_id, tok.unk_id, *(tok.sentinel_id(i) for i in range(3))],
    }


def _random_ids(tok: SentencePieceTokenizer, rng: random.Random, *, allow_bytes: bool = True) -> list[int]:
    """Mostly byte pieces, specials and lone "▁": where decoding has its edge cases."""
    pools = _id_pools(tok)
    names = ["specials", "spaces", "plain"] + (["bytes", "bytes"] if allow_bytes else [])
    return [rng.choice(pools[rng.choice(names)]) for _ in range(rng.randrange(1, 16))]


# --- corpus and training ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "english", "chinese"),
    [
        (0, "zero", "零"),
        (15, "fifteen", "十五"),
        (110, "one hundred ten", "一百一十"),
        (1005, "one thousand five", "一千零五"),
        (4096, "four thousand ninety-six", "四千零九十六"),
        (10010, "ten thousand ten", "一万零一十"),
        (150000, "one hundred fifty thousand", "十五万"),
        (
            1234567,
            "one million two hundred thirty-four thousand five hundred sixty-seven",
            "一百二十三万四千五百六十七",
        ),
    ],
)
def test_number_spelling(n: int, english: str, chinese: str) -> None:
    assert english_number(n) == english
    assert chinese_number(n) == chinese


def test_number_spelling_rejects_out_of_range() -> None:
    with pytest.raises(InputError, match="can only spell"):
        chinese_number(10**8)


def test_builtin_corpus_is_deterministic_and_bilingual() -> None:
    lines = list(builtin_corpus())
    assert lines == list(builtin_corpus())
    assert lines != list(builtin_corpus(seed=1))
    assert "4096 = four thousand ninety-six = 四千零九十六" in lines
    assert any("加" in line and "等于" in line for line in lines)
    assert any(line.startswith("The Chinese word for") for line in lines)


def test_training_is_deterministic(tmp_path: Path) -> None:
    lines = list(itertools.islice(builtin_corpus(), 2000))
    first = train_sentencepiece(lines, tmp_path / "a" / "spiece.model", vocab_size=400)
    second = train_sentencepiece(iter(lines), tmp_path / "b" / "spiece.model", vocab_size=400)
    assert first.read_bytes() == second.read_bytes()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"vocab_size": 400, "model_type": "wordpiece"}, "model_type"),
        ({"vocab_size": 3}, "vocab_size"),
        ({"vocab_size": 100}, "training failed"),  # fewer than 256 byte pieces + characters
    ],
)
def test_training_rejects_bad_arguments(tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InputError, match=message):
        train_sentencepiece(["some text", "更多文字"], tmp_path / "spiece.model", **kwargs)


# --- T5 id layout -----------------------------------------------------------------------------


def test_t5_id_layout(t5_tok: SentencePieceTokenizer) -> None:
    assert isinstance(t5_tok, Tokenizer)
    assert (t5_tok.pad_id, t5_tok.eos_id, t5_tok.unk_id) == (0, 1, 2)
    assert [t5_tok.id_to_piece(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
    assert t5_tok.num_sentinels == 100
    assert t5_tok.vocab_size == VOCAB_SIZE + 100
    assert t5_tok.sentinel_id(0) == VOCAB_SIZE + 99
    assert t5_tok.sentinel_id(99) == VOCAB_SIZE
    for i in (0, 7, 99):
        assert t5_tok.id_to_piece(t5_tok.sentinel_id(i)) == f"<extra_id_{i}>"
        assert t5_tok.is_special(t5_tok.sentinel_id(i))
    assert all(t5_tok.is_special(i) for i in range(3))
    assert not any(t5_tok.is_special(i) for i in range(3, VOCAB_SIZE))


def test_out_of_range_ids_raise(t5_tok: SentencePieceTokenizer) -> None:
    with pytest.raises(InputError, match="sentinel index"):
        t5_tok.sentinel_id(100)
    for bad in (-1, t5_tok.vocab_size):
        with pytest.raises(InputError, match="outside the vocabulary"):
            t5_tok.decode([5, bad])
        with pytest.raises(InputError, match="outside the vocabulary"):
            t5_tok.id_to_piece(bad)


def test_encode_appends_eos_and_maps_sentinels(t5_tok: SentencePieceTokenizer) -> None:
    assert t5_tok.encode("hello")[-1] == t5_tok.eos_id
    assert t5_tok.eos_id not in t5_tok.encode("hello", add_eos=False)
    ids = t5_tok.encode("The <extra_id_0> walks in <extra_id_1> park", add_eos=False)
    assert ids.count(t5_tok.sentinel_id(0)) == ids.count(t5_tok.sentinel_id(1)) == 1
    assert t5_tok.decode(ids) == "The walks in park"
    assert t5_tok.decode(ids, skip_special=False) == "The<extra_id_0> walks in<extra_id_1> park"


def test_specials_typed_as_text_stay_text(t5_tok: SentencePieceTokenizer, hf_tok: Any) -> None:
    # Deliberate difference from HF, which turns "</s>" in a prompt into a real end of sequence.
    ids = t5_tok.encode("a </s> b <pad>", add_eos=False)
    assert not any(t5_tok.is_special(i) for i in ids)
    assert t5_tok.decode(ids) == "a </s> b <pad>"
    assert hf_tok.encode("a </s> b", add_special_tokens=False).count(t5_tok.eos_id) == 1


def test_decode_writes_specials_like_hf_generate_output(t5_tok: SentencePieceTokenizer) -> None:
    ids = [t5_tok.pad_id, *t5_tok.encode("Das Haus ist wunderbar.")]
    assert t5_tok.decode(ids, skip_special=False) == "<pad> Das Haus ist wunderbar.</s>"
    assert t5_tok.decode(ids) == "Das Haus ist wunderbar."
    assert t5_tok.decode([t5_tok.unk_id, *ids], skip_special=False).startswith("<unk><pad> Das")


def test_no_sentinels(t5_dir: Path) -> None:
    tok = SentencePieceTokenizer(t5_dir / "spiece.model", num_extra_ids=0)
    assert tok.vocab_size == VOCAB_SIZE
    assert tok.decode(tok.encode("<extra_id_0>")) == "<extra_id_0>"
    with pytest.raises(InputError):
        tok.sentinel_id(0)
    with pytest.raises(ConfigError, match="num_extra_ids"):
        SentencePieceTokenizer(t5_dir / "spiece.model", num_extra_ids=-1)


# --- HF parity --------------------------------------------------------------------------------


@pytest.mark.parametrize("text", PARITY_TEXTS)
def test_matches_hf_t5_tokenizer(t5_tok: SentencePieceTokenizer, hf_tok: Any, text: str) -> None:
    ids = t5_tok.encode(text)
    assert not any(t5_tok.id_to_piece(i).startswith("<0x") for i in ids), "use in-vocabulary text"
    assert ids == hf_tok.encode(text)
    for skip in (True, False):
        expected = hf_tok.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
        assert t5_tok.decode(ids, skip_special=skip) == expected


def test_decode_matches_hf_on_arbitrary_ids(t5_tok: SentencePieceTokenizer, hf_tok: Any) -> None:
    # Byte pieces excluded: HF's T5 tokenizer has no byte-fallback decoder (see next test).
    # Lone "▁" pieces at the start are included: SentencePiece itself would strip all of them.
    rng = random.Random(0)
    for _ in range(300):
        ids = _random_ids(t5_tok, rng, allow_bytes=False)
        for skip in (True, False):
            expected = hf_tok.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
            assert t5_tok.decode(ids, skip_special=skip) == expected, [t5_tok.id_to_piece(i) for i in ids]


def test_byte_fallback_where_hf_gives_unk(t5_tok: SentencePieceTokenizer, hf_tok: Any) -> None:
    # transformers 5.x rebuilds the SentencePiece model with byte_fallback=False: characters
    # outside the vocabulary become <unk> and byte pieces decode as the literal "<0xF0>".
    text = "café 😀"
    ids = t5_tok.encode(text)
    assert t5_tok.unk_id not in ids
    assert t5_tok.decode(ids) == text
    assert t5_tok.unk_id in hf_tok.encode(text)
    assert "<0xF0>" in hf_tok.decode(ids)


def test_whitespace_follows_the_model_not_hf(lossless_dir: Path, lossless_tok: SentencePieceTokenizer) -> None:
    # HF's T5 tokenizer splits on whitespace before SentencePiece sees the text, whatever the model
    # was trained with; a model trained to keep whitespace keeps it here.
    transformers = pytest.importorskip("transformers")
    hf_lossless = transformers.T5Tokenizer.from_pretrained(str(lossless_dir))
    text = "a  b\tc"
    assert lossless_tok.decode(lossless_tok.encode(text)) == text
    assert hf_lossless.decode(hf_lossless.encode(text), skip_special_tokens=True) == "a b c"


# --- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("text", PARITY_TEXTS[:10] + UNICODE_TEXTS)
def test_lossless_round_trip(lossless_tok: SentencePieceTokenizer, text: str) -> None:
    ids = lossless_tok.encode(text)
    assert lossless_tok.unk_id not in ids
    assert lossless_tok.decode(ids) == text


def test_lossless_round_trip_random_unicode(lossless_tok: SentencePieceTokenizer) -> None:
    rng = random.Random(0)
    alphabet = [
        *"aZ9 ,.!?()<>_\t\n\r\x00",
        *"中文字符你好，。！",
        "😀",
        "👩‍💻",
        "e\u0301",
        "ﬁ",
        "𝔘",
        "\ufffd",
    ]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(20)))
        assert lossless_tok.decode(lossless_tok.encode(text)) == text


def test_t5_style_round_trip_normalizes(t5_tok: SentencePieceTokenizer) -> None:
    assert t5_tok.decode(t5_tok.encode("  a   b  ")) == "a b"
    assert t5_tok.decode(t5_tok.encode("全角：ＡＢＣ，😀")) == "全角:ABC,😀"


# --- streaming ----------------------------------------------------------------------------------


def _stream(tok: Tokenizer, ids: list[int], *, skip_special: bool = True) -> tuple[list[str], str]:
    decoder = IncrementalDecoder(tok, skip_special=skip_special)
    chunks = [decoder.push(i) for i in ids]
    tail = decoder.finish()
    assert decoder.text == "".join(chunks) + tail
    return chunks, tail


@pytest.mark.parametrize("text", PARITY_TEXTS[:10] + UNICODE_TEXTS)
@pytest.mark.parametrize("skip_special", [True, False])
def test_incremental_decode_equals_full_decode(
    lossless_tok: SentencePieceTokenizer, t5_tok: SentencePieceTokenizer, text: str, skip_special: bool
) -> None:
    for tok in (lossless_tok, t5_tok):
        ids = tok.encode(text)
        chunks, tail = _stream(tok, ids, skip_special=skip_special)
        assert "".join(chunks) == tok.decode(ids, skip_special=skip_special)
        assert tail == ""
        if "\ufffd" not in text:
            assert not any("\ufffd" in chunk for chunk in chunks)


def test_incremental_decode_holds_partial_characters(lossless_tok: SentencePieceTokenizer) -> None:
    ids = lossless_tok.encode("😀中", add_eos=False)
    pieces = [lossless_tok.id_to_piece(i) for i in ids]
    assert pieces[1:5] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"], "the emoji must use byte fallback"
    chunks, _ = _stream(lossless_tok, ids)
    assert chunks[:5] == ["", "", "", "", "😀"]
    # A stream cut inside a character: nothing while bytes may follow, the replacement at the end.
    chunks, tail = _stream(lossless_tok, ids[:3])
    assert chunks == ["", "", ""]
    assert tail == lossless_tok.decode(ids[:3]) == "\ufffd\ufffd"


def test_incremental_decode_on_arbitrary_ids(
    lossless_tok: SentencePieceTokenizer, t5_tok: SentencePieceTokenizer
) -> None:
    # Invalid UTF-8, sentinels inside byte sequences, lone spaces, specials in both skip modes.
    rng = random.Random(0)
    for tok in (lossless_tok, t5_tok):
        for _ in range(500):
            ids = _random_ids(tok, rng)
            for skip in (True, False):
                chunks, tail = _stream(tok, ids, skip_special=skip)
                assert "".join(chunks) + tail == tok.decode(ids, skip_special=skip)


# --- loading ------------------------------------------------------------------------------------


def test_load_tokenizer_finds_either_file(t5_dir: Path, tmp_path: Path) -> None:
    assert load_tokenizer(t5_dir).encode("hi") == SentencePieceTokenizer(t5_dir / "spiece.model").encode("hi")
    (tmp_path / "tokenizer.model").write_bytes((t5_dir / "spiece.model").read_bytes())
    assert load_tokenizer(tmp_path, num_extra_ids=10).vocab_size == VOCAB_SIZE + 10
    # spiece.model wins over tokenizer.model.
    (tmp_path / "spiece.model").write_bytes(b"corrupt")
    with pytest.raises(CheckpointError, match=r"spiece\.model"):
        load_tokenizer(tmp_path)


def test_load_tokenizer_missing(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(CheckpointError, match=r"spiece\.model, tokenizer\.model"):
        load_tokenizer(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        SentencePieceTokenizer(tmp_path / "spiece.model")


@pytest.mark.parametrize("content", [b"", b"not a sentencepiece model"])
def test_load_tokenizer_corrupt(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "spiece.model"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load_tokenizer(tmp_path)


def test_rejects_non_t5_special_ids(tmp_path: Path) -> None:
    import sentencepiece as spm

    # SentencePiece's own defaults: unk=0, bos=1, eos=2, no pad.
    path = tmp_path / "spiece.model"
    with path.open("wb") as out:
        spm.SentencePieceTrainer.train(
            sentence_iterator=itertools.islice(builtin_corpus(), 500),
            model_writer=out,
            vocab_size=100,
            minloglevel=2,
        )
    with pytest.raises(CheckpointError, match="T5-family models expect"):
        SentencePieceTokenizer(path)


def test_incremental_decoder_rejects_bad_ids(t5_tok: SentencePieceTokenizer) -> None:
    decoder = IncrementalDecoder(t5_tok)
    for token_id in t5_tok.encode("Hello", add_eos=False):
        decoder.push(token_id)
    with pytest.raises(InputError):
        decoder.push(t5_tok.vocab_size)
    for token_id in t5_tok.encode("world", add_eos=False):
        decoder.push(token_id)
    assert decoder.text == "Hello world"
