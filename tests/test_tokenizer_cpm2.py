"""CPM-2 tokenizer tests: jieba + greedy WordPiece over a vocab.txt written here, specials, streaming.

The released vocabulary cannot be downloaded, so each test writes a small one laid out like it
(control pieces first, sentinels last). Expected ids are worked out by hand; HF ``tokenizers``'
WordPiece without a continuation prefix is the reference for greedy longest match.
"""

import random
import string
import sys
import tempfile
from pathlib import Path

import pytest

from engine.errors import CheckpointError, Cpm2Error, InputError
from engine.tokenizer import (
    CPM2Tokenizer,
    IncrementalDecoder,
    MissingDependencyError,
    SentencePieceTokenizer,
    Tokenizer,
    check_special_ids,
    decoder_start_id,
    load_tokenizer,
    train_sentencepiece,
)
from engine.tokenizer.cpm2 import _writable_dir
from engine.tokenizer.wordpiece import WordPiece

pytest.importorskip("jieba")

# The head of CPM-2-Pretrain's bpe_cn_en/vocab.txt: <pad> = 5, <eod> = 7, U+2583 = 3, U+2582 = 10.
HEAD = ["<unk>", "<s>", "</s>", "\u2583", "<sep>", "<pad>", "<mask>", "<eod>", "\u2581", ",", "\u2582"]
CHINESE = (
    "的一是了我不人在他有这个上们来到时大地为子中你说生国年着就那和要她出也得里后自以会家可下而过天去能对"
    "小多然于心学么之都好看起发当没成只如事把还用第样道想作种开美总从无情面最女但现前些所同日手又行意动方"
    "期它头经长儿回位分爱老因很给名法间斯知世什两次使身者被高已亲其进此话常与活正感"
)
WORDS = ["北京", "天安门", "北京大学", "你好", "世界", "专家", "混合", "模型", "中文", "今天", "天气", "很好", "我们"]
PUNCT = [*"，。！（）？、；：“”", *string.punctuation]
ENGLISH = ["he", "hell", "hello", "wor", "world", "ing", "the", "MoE", "experts", "routes", "tokens", "to", "100"]
# "爱北" straddles jieba's 爱|北京: WordPiece alone would take it; segmented text never can.
TRAPS = ["爱北", "京天"]
NUM_LISTED_SENTINELS = 220  # bilingual vocabularies list 220; CPM-2 uses the first 190


def vocab_lines(*, head: list[str] = HEAD) -> list[str]:
    chars = dict.fromkeys(
        CHINESE + "北京天安门专家混合模型今气很们界引号问题尾巴" + string.ascii_letters + string.digits
    )
    body = [*chars, *WORDS, *PUNCT, *ENGLISH, *TRAPS]
    # A blank line and a repeated piece, as real vocabularies have: ids must stay line numbers.
    body[40:40] = ["", "hello"]
    return [*head, *body, *(f"<s_{i}>" for i in range(NUM_LISTED_SENTINELS))]


def write_vocab(directory: Path, lines: list[str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "vocab.txt"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("jieba-cache")


@pytest.fixture(scope="module")
def lines() -> list[str]:
    return vocab_lines()


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory, lines: list[str], cache_dir: Path) -> CPM2Tokenizer:
    return CPM2Tokenizer(write_vocab(tmp_path_factory.mktemp("cpm2"), lines), jieba_cache_dir=cache_dir)


def ids_of(lines: list[str], *pieces: str) -> list[int]:
    """Ids of ``pieces``: their last line, as the reference's dict keeps it."""
    last = {piece: i for i, piece in enumerate(lines)}
    return [last[piece] for piece in pieces]


ROUND_TRIP_TEXTS = [
    "我爱北京天安门",
    "你好，世界！今天天气很好。",
    "混合专家模型 routes tokens to experts.",
    "hello world\nhello  world\n\n  leading and trailing  ",
    "北京大学 MoE 100% a.b foo-bar (x) [y] {z} a_b @c #d $e ^f &g *h ~i `j` |k| \\l 'm' \"n\"",
    "中文：ABC123，“引号”；问题？、",
    "",
    " ",
    "\n",
]


def test_special_token_api(tok: CPM2Tokenizer, lines: list[str]) -> None:
    assert isinstance(tok, Tokenizer)
    assert (tok.unk_id, tok.pad_id, tok.eos_id) == (0, 5, 7)
    assert tok.vocab_size == len(lines)
    assert tok.num_sentinels == 190
    for id in (0, 1, 2, 4, 5, 6, 7, tok.sentinel_id(0), tok.sentinel_id(189), *ids_of(lines, "<s_219>")):
        assert tok.is_special(id), lines[id]
    for piece in ("的", "hello", "\u2582", "\u2583", "<", ","):
        assert not tok.is_special(ids_of(lines, piece)[0])
    assert tok.id_to_piece(3) == "\u2583"
    for bad in (-1, tok.vocab_size):
        with pytest.raises(InputError):
            tok.is_special(bad)
        with pytest.raises(InputError):
            tok.id_to_piece(bad)
        with pytest.raises(InputError):
            tok.decode([bad])


def test_ids_are_line_numbers(tok: CPM2Tokenizer, lines: list[str]) -> None:
    blank = len(HEAD) + 40
    assert lines[blank] == ""
    assert tok.id_to_piece(blank) == ""
    assert tok.encode("的", add_eos=False) == [lines.index("的")]
    # "hello" is listed twice; the later line wins, the earlier id still decodes.
    first, last = (i for i, piece in enumerate(lines) if piece == "hello")
    assert tok.encode("hello", add_eos=False) == [last]
    assert tok.decode([first, last]) == "hellohello"


def test_sentinels_map_both_ways(tok: CPM2Tokenizer, lines: list[str]) -> None:
    for i in (0, 1, 99, 189):
        assert tok.sentinel_id(i) == lines.index(f"<s_{i}>")
        assert tok.id_to_piece(tok.sentinel_id(i)) == f"<s_{i}>"
    for bad in (-1, 190):
        with pytest.raises(InputError):
            tok.sentinel_id(bad)
    ids = tok.encode("北京<s_0>天气<s_189>", add_eos=False)
    assert ids == [*ids_of(lines, "北京"), tok.sentinel_id(0), *ids_of(lines, "天气"), tok.sentinel_id(189)]
    assert tok.decode(ids, skip_special=False) == "北京<s_0>天气<s_189>"
    assert tok.decode(ids) == "北京天气"
    # Beyond num_sentinels, or not the exact spelling: plain text, piece by piece.
    assert tok.encode("<s_190>", add_eos=False) == ids_of(lines, "<", "s", "_", "1", "9", "0", ">")
    assert tok.decode(tok.encode("<s_01><s_190>")) == "<s_01><s_190>"


def test_round_trip_mixed_text(tok: CPM2Tokenizer, lines: list[str]) -> None:
    for text in ROUND_TRIP_TEXTS:
        ids = tok.encode(text)
        assert ids[-1] == tok.eos_id
        assert tok.unk_id not in ids, text
        assert tok.decode(ids) == text
        assert tok.decode(ids, skip_special=False) == text + "<eod>"
    space, newline = ids_of(lines, "\u2582", "\u2583")
    assert tok.encode("a b\nc", add_eos=False) == [
        *ids_of(lines, "a"),
        space,
        *ids_of(lines, "b"),
        newline,
        *ids_of(lines, "c"),
    ]


def test_full_width_input_is_folded(tok: CPM2Tokenizer, lines: list[str]) -> None:
    assert tok.encode("ＡＢＣ１２３\u3000ｘ＠") == tok.encode("ABC123 x@")
    # The Chinese punctuation the vocabulary has stays full-width, as in the reference.
    text = "你好，世界！（今天）？、；："
    assert tok.decode(tok.encode(text)) == text
    assert ids_of(lines, "，")[0] in tok.encode(text)


def test_jieba_segments_before_wordpiece(tok: CPM2Tokenizer, lines: list[str]) -> None:
    # jieba: 我|爱|北京|天安门. Greedy matching over the raw text would take "爱北" and "京天".
    assert tok.encode("我爱北京天安门", add_eos=False) == ids_of(lines, "我", "爱", "北京", "天安门")
    assert tok.encode("北京大学", add_eos=False) == ids_of(lines, "北京大学")


def test_greedy_longest_match(tok: CPM2Tokenizer, lines: list[str]) -> None:
    # jieba keeps a run of letters together; WordPiece then takes the longest piece at each step.
    assert tok.encode("hellow", add_eos=False) == ids_of(lines, "hello", "w")
    assert tok.encode("helloworld", add_eos=False) == ids_of(lines, "hello", "world")
    assert tok.encode("hellhe", add_eos=False) == ids_of(lines, "hell", "he")
    pieces = {"a": 1, "b": 2, "c": 3, "ab": 4, "abc": 5, "d": 6}
    wordpiece = WordPiece(pieces, unk_id=0)
    assert wordpiece.encode("abcd") == [5, 6]
    assert wordpiece.encode("abab") == [4, 4]
    assert wordpiece.encode("xab") == [0, 4]  # BERT's WordPiece would give one [UNK] for the word


def test_wordpiece_matches_hf_without_continuation_prefix(lines: list[str]) -> None:
    models = pytest.importorskip("tokenizers.models")
    piece_to_id = {piece: i for i, piece in enumerate(lines) if piece}
    hf = models.WordPiece(piece_to_id, unk_token="<unk>", max_input_chars_per_word=200, continuing_subword_prefix="")
    ours = WordPiece(piece_to_id, unk_id=0)
    rng = random.Random(0)
    alphabet = "helowrdingt北京天安门大学爱你好世界"  # every character is a piece: HF never falls back to [UNK]
    for _ in range(500):
        word = "".join(rng.choices(alphabet, k=rng.randint(1, 12)))
        assert ours.encode(word) == [token.id for token in hf.tokenize(word)], word


def test_unknown_characters_become_unk(tok: CPM2Tokenizer, lines: list[str]) -> None:
    a, b = ids_of(lines, "a", "b")
    assert tok.encode("a龘b", add_eos=False) == [a, tok.unk_id, b]
    assert tok.encode("😀", add_eos=False) == [tok.unk_id]
    assert tok.decode(tok.encode("a龘b😀")) == "ab"
    assert tok.decode(tok.encode("a龘b"), skip_special=False) == "a<unk>b<eod>"
    # Reference quirks kept for id parity: jieba keeps "\r\n" together and "\r" has no piece;
    # a segment over 200 characters is one <unk>.
    assert tok.encode("a\r\nb", add_eos=False) == [a, tok.unk_id, *ids_of(lines, "\u2583"), b]
    assert tok.encode("a" * 201, add_eos=False) == [tok.unk_id]
    assert tok.encode("a" * 200, add_eos=False) == [a] * 200


def test_incremental_decoding_matches_full_decode(tok: CPM2Tokenizer) -> None:
    ids = [tok.decoder_start_id]
    for text in ROUND_TRIP_TEXTS:
        ids += tok.encode(text + "龘<s_3>", add_eos=True)
    ids += [tok.pad_id, *tok.encode("尾巴 tail")]
    for skip_special in (True, False):
        decoder = IncrementalDecoder(tok, skip_special=skip_special)
        streamed = "".join(decoder.push(token_id) for token_id in ids) + decoder.finish()
        assert streamed == tok.decode(ids, skip_special=skip_special)
        assert decoder.text == streamed


def test_decoder_start(tmp_path: Path, tok: CPM2Tokenizer, lines: list[str], cache_dir: Path) -> None:
    # CPM-2's code starts the decoder with id 1 ("<s>"), also for the vocabulary that lists "<go>".
    assert tok.decoder_start_id == decoder_start_id(tok) == 1
    with_go = ["<unk>", "<pad>", "<go>", "<s>", "<eod>"]
    go_only = ["<unk>", "<pad>", "<eod>", "<go>"]
    neither = ["<unk>", "<eod>", "<pad>"]
    for name, head, expected in (("with-go", with_go, 3), ("go-only", go_only, 3), ("neither", neither, 2)):
        other = CPM2Tokenizer(write_vocab(tmp_path / name, vocab_lines(head=head)), jieba_cache_dir=cache_dir)
        assert decoder_start_id(other) == expected
        assert other.is_special(head.index("<pad>"))
    # Tokenizers without the notion start from <pad>, as T5 does.
    spiece = train_sentencepiece(
        ["hello world", "the quick brown fox"] * 20,
        tmp_path / "sp" / "spiece.model",
        vocab_size=22,
        byte_fallback=False,
    )
    assert decoder_start_id(SentencePieceTokenizer(spiece)) == 0


def test_load_tokenizer_picks_vocab_txt(tmp_path: Path, lines: list[str]) -> None:
    write_vocab(tmp_path / "cpm2", lines)
    loaded = load_tokenizer(tmp_path / "cpm2")
    assert isinstance(loaded, CPM2Tokenizer)
    assert loaded.encode("你好 world") == [*ids_of(lines, "你好", "\u2582", "world"), loaded.eos_id]
    # A directory with both files is a T5-family export: spiece.model is checked first.
    both = tmp_path / "both"
    write_vocab(both, lines)
    train_sentencepiece(
        ["hello world", "the quick brown fox"] * 20, both / "spiece.model", vocab_size=22, byte_fallback=False
    )
    assert isinstance(load_tokenizer(both), SentencePieceTokenizer)


def test_not_a_cpm2_vocabulary(tmp_path: Path) -> None:
    bert = write_vocab(tmp_path / "bert", ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "hello", "##lo"])
    with pytest.raises(CheckpointError, match=r"lacks <pad>, <unk>, <eod>, <s_0>, <s_1> and 188 more"):
        CPM2Tokenizer(bert)
    with pytest.raises(CheckpointError, match="does not exist"):
        CPM2Tokenizer(tmp_path / "missing.txt")
    (tmp_path / "latin1").mkdir()
    (tmp_path / "latin1" / "vocab.txt").write_bytes(b"<pad>\n\xe9\n")
    with pytest.raises(CheckpointError, match="not a readable UTF-8"):
        load_tokenizer(tmp_path / "latin1")


def test_missing_jieba_raises_typed_error(tmp_path: Path, lines: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "jieba", None)  # makes `import jieba` fail
    with pytest.raises(MissingDependencyError, match=r"pip install 'cpm2\[cpm2\]'") as caught:
        load_tokenizer(write_vocab(tmp_path, lines).parent)
    assert isinstance(caught.value, Cpm2Error)
    assert isinstance(caught.value, ImportError)


def test_jieba_cache_dir_and_quiet_logging(tmp_path: Path, lines: list[str], capfd: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "fresh" / "cache"  # does not exist yet: created, and jieba builds its dictionary
    CPM2Tokenizer(write_vocab(tmp_path / "model", lines), jieba_cache_dir=cache)
    assert (cache / "jieba.cache").is_file()
    assert capfd.readouterr().err == ""
    # A directory that cannot be made falls back to the system temp directory.
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert _writable_dir(blocker / "cache") == tempfile.gettempdir()


def test_config_that_disagrees_with_the_tokenizer_fails_at_load(tok: CPM2Tokenizer, lines: list[str]) -> None:
    eod, start = ids_of(lines, "<eod>", "<s>")
    check_special_ids(tok, eos=eod, decoder_start=start, source="m")  # agrees: nothing raised
    with pytest.raises(CheckpointError, match=r"m: config.json and the tokenizer disagree: eos_token_id=1 .*Fix"):
        check_special_ids(tok, eos=1, decoder_start=start, source="m")
