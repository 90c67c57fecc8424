"""NLLB tokenizer tests: fairseq id layout, language-code templates, HF parity, decoding, loading.

The SentencePiece model is trained here like NLLB's (BPE, SentencePiece's default ``<unk> <s> </s>``
ids, NFKC, whitespace collapsed, no byte fallback) and written into a directory laid out like the
hub's ``facebook/nllb-200-*``: ``sentencepiece.bpe.model``, ``tokenizer_config.json`` (with
``added_tokens_decoder``) and ``special_tokens_map.json``. HF transformers' ``AutoTokenizer`` on the
same directory is the reference (``NllbTokenizer``, tokenizers-backed in 5.x).
"""

import io
import itertools
import json
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sentencepiece as spm

from engine.errors import CheckpointError, InputError, UnsupportedModelError
from engine.tokenizer import (
    CPM2Tokenizer,
    DecoderStartTokenizer,
    IncrementalDecoder,
    NLLBTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    TranslationTokenizer,
    builtin_corpus,
    check_special_ids,
    load_tokenizer,
    train_sentencepiece,
)
from engine.tokenizer.nllb import MODEL_FILE, nllb200_language_codes

transformers = pytest.importorskip("transformers")
hf_nllb = pytest.importorskip("transformers.models.nllb.tokenization_nllb")

# Enough for some 300 merges beyond the corpus' ~490 characters (Chinese included).
VOCAB_SIZE = 800
LANGS = ["eng_Latn", "zho_Hans", "fra_Latn", "ace_Arab", "zul_Latn"]
# Lines in scripts the built-in corpus lacks, so that Latin diacritics and Cyrillic get pieces.
EXTRA_LINES = [
    "Bonjour le monde, ça va? Où est la bibliothèque? Très bien, merci.",
    "Guten Tag! Wie geht's? Die Straße ist groß.",
    "Привет, мир! Как дела?",
    "¿Qué tal? ¡Hola, señor!",
]

TEXTS = [
    "Hello, world!",
    " UN Chief Says There Is No Military Solution in Syria",
    "Le chef de l'ONU affirme qu'il n'y a pas de solution militaire en Syrie.",
    "4096 = four thousand ninety-six = 四千零九十六",
    "你好，世界！今天天气很好。",
    "混合专家模型 routes tokens to experts.",
    "Привет, мир! Straße, ça va?",
    "  leading, trailing and   inner   whitespace  ",
    "tabs\tand\nnewlines\r\n",
    "hello ",
    " hello",
    "",
    " ",
    "   ",
    "\t\n",
    "\u200b",
    "😀 emoji and 👩‍💻 and 🇨🇳",  # outside the vocabulary: <unk>, one per run
    "龘齉 ☃☃ x☃y مرحبا नमस्ते",
    "café naïve e\u0301 ﬁ ① 𝔘 ｶﾞ",  # NFKC
    "\x00\x7f\u3000\u00a0x",
    "全角：ＡＢＣ１２３",
    "▁ a▁b ▁▁c",  # SentencePiece's own word mark typed in the text
    "what?!... (yes) [no] {maybe} <tags> a_b @c #d $e %f",
]
# Special tokens typed in the text stay text here; HF parses them unless split_special_tokens=True.
SPECIAL_TEXTS = ["eng_Latn hello", "hello </s> <s> <unk> <pad> <mask> world", "x<mask>", "zho_Hans", "</s>"]

_ALPHABET = [
    *"abcdefgh XYZ 0123 ,.!?'-",
    *("  ", "\t", "\n", "\r\n", "   "),
    *"éßçñПрвет你好世界天气很模型",
    *("龘", "☃", "😀", "👩‍💻", "\u0301", "\u200b", "\u3000", "Ａ", "ﬁ", "▁", "ا", "न"),
]


def random_texts(n: int, *, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choices(_ALPHABET, k=rng.randint(0, 14))) for _ in range(n)]


def train_nllb_like(lines: list[str], *, byte_fallback: bool = False) -> bytes:
    """A BPE model with SentencePiece's defaults (as NLLB's: ids <unk>=0 <s>=1 </s>=2, nmt_nfkc)."""
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buffer,
        vocab_size=VOCAB_SIZE + (256 if byte_fallback else 0),
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=byte_fallback,
        num_threads=1,
        minloglevel=2,
    )
    return buffer.getvalue()


def _token(content: str, **overrides: bool) -> dict[str, Any]:
    token = {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    return {**token, "special": True, **overrides}


def write_hub_dir(
    directory: Path,
    model: bytes,
    *,
    legacy: bool | None = None,
    codes: list[str] | None = None,
    with_ids: bool = True,
    tokenizer_class: str | None = "NllbTokenizer",
) -> Path:
    """A directory like facebook/nllb-200-distilled-600M's (tokenizer.json left out).

    ``with_ids=False`` writes what transformers < 4.34 saved: no ``added_tokens_decoder``, the
    codes only in ``special_tokens_map.json``.
    """
    codes = list(nllb200_language_codes()) if codes is None else codes
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MODEL_FILE).write_bytes(model)
    num_pieces = spm.SentencePieceProcessor(model_proto=model).get_piece_size()
    added = {str(i): _token(t) for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>"])}
    added |= {str(num_pieces + 1 + i): _token(code) for i, code in enumerate(codes)}
    added[str(num_pieces + 1 + len(codes))] = _token("<mask>", lstrip=True, normalized=True)
    config: dict[str, Any] = {
        "additional_special_tokens": codes if with_ids else None,
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": True,
        "cls_token": "<s>",
        "eos_token": "</s>",
        "mask_token": "<mask>",
        "model_max_length": 1024,
        "pad_token": "<pad>",
        "sep_token": "</s>",
        "sp_model_kwargs": {},
        "src_lang": None,
        "tgt_lang": None,
        "unk_token": "<unk>",
    }
    if with_ids:
        config["added_tokens_decoder"] = added
    if tokenizer_class is not None:
        config["tokenizer_class"] = tokenizer_class
    if legacy is not None:
        config["legacy_behaviour"] = legacy
    special_map = {
        "additional_special_tokens": codes,
        "bos_token": "<s>",
        "cls_token": "<s>",
        "eos_token": "</s>",
        "mask_token": _token("<mask>", lstrip=True, normalized=True),
        "pad_token": "<pad>",
        "sep_token": "</s>",
        "unk_token": "<unk>",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (directory / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))
    return directory


@pytest.fixture(scope="session")
def nllb_model() -> bytes:
    return train_nllb_like([*builtin_corpus(), *EXTRA_LINES])


@pytest.fixture(scope="session")
def make_dir(tmp_path_factory: pytest.TempPathFactory, nllb_model: bytes) -> Callable[..., Path]:
    def make(name: str, **kwargs: Any) -> Path:
        return write_hub_dir(tmp_path_factory.mktemp(name), nllb_model, **kwargs)

    return make


@pytest.fixture(scope="session")
def hub_dir(make_dir: Callable[..., Path]) -> Path:
    return make_dir("nllb")


@pytest.fixture(scope="session")
def legacy_dir(make_dir: Callable[..., Path]) -> Path:
    return make_dir("nllb-legacy", legacy=True)


def make_charmap(model: bytes) -> Callable[[str], str]:
    """SentencePiece's character map alone, with HF's collapse of space runs after it."""
    normalizer = spm.SentencePieceNormalizer(
        model_proto=model, add_dummy_prefix=False, escape_whitespaces=False, remove_extra_whitespaces=False
    )
    return lambda text: re.sub(" {2,}", " ", normalizer.normalize(text))


@pytest.fixture(scope="session")
def charmap(nllb_model: bytes) -> Callable[[str], str]:
    return make_charmap(nllb_model)


def hf_text(hf: Any, charmap: Callable[[str], str], text: str) -> str:
    """``text``, or SentencePiece's normalization of it where HF's differs (see
    test_normalization_is_sentencepieces)."""
    normalized = charmap(text)
    return text if hf.backend_tokenizer.normalizer.normalize_str(text) == normalized else normalized


def hf_tokenizer(model_dir: Path) -> Any:
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    assert isinstance(tokenizer, hf_nllb.NllbTokenizer)
    return tokenizer


@pytest.fixture(scope="session")
def hf_current(hub_dir: Path) -> Any:
    return hf_tokenizer(hub_dir)


@pytest.fixture(scope="session")
def hf_legacy(legacy_dir: Path) -> Any:
    tokenizer = hf_tokenizer(legacy_dir)
    assert tokenizer.legacy_behaviour
    return tokenizer


def nllb(model_dir: Path) -> NLLBTokenizer:
    tokenizer = load_tokenizer(model_dir)
    assert isinstance(tokenizer, NLLBTokenizer)
    return tokenizer


def hf_source(hf: Any, texts: str | list[str], lang: str) -> Any:
    hf.src_lang = lang
    return hf(texts, split_special_tokens=True)["input_ids"]


def test_layout_is_fairseqs(hub_dir: Path, hf_current: Any, nllb_model: bytes) -> None:
    tok = nllb(hub_dir)
    num_pieces = spm.SentencePieceProcessor(model_proto=nllb_model).get_piece_size()
    codes = nllb200_language_codes()
    assert len(codes) == 202 == len(set(codes))
    assert tok.language_codes == codes
    assert (tok.id_to_piece(0), tok.pad_id, tok.eos_id, tok.unk_id) == ("<s>", 1, 2, 3)
    assert tok.lang_id("ace_Arab") == num_pieces + 1
    assert tok.lang_id("zul_Latn") == num_pieces + 202
    assert tok.id_to_piece(num_pieces + 203) == "<mask>"
    assert tok.vocab_size == num_pieces + 204
    # NLLB-200 (256000 pieces): the ids its model card and HF's docs use.
    assert 256001 + codes.index("eng_Latn") == 256047
    assert 256001 + codes.index("fra_Latn") == 256057
    assert tok.vocab_size == len(hf_current)
    hf_pieces = hf_current.convert_ids_to_tokens(list(range(len(hf_current))))
    assert [tok.id_to_piece(i) for i in range(tok.vocab_size)] == hf_pieces
    specials = set(hf_current.all_special_ids)
    assert {i for i in range(tok.vocab_size) if tok.is_special(i)} == specials
    assert tok.num_sentinels == 0
    assert tok.decoder_start_id == tok.eos_id == 2
    assert isinstance(tok, TranslationTokenizer)
    assert isinstance(tok, DecoderStartTokenizer)


@pytest.mark.parametrize("legacy", [False, True], ids=["current", "legacy"])
def test_source_and_target_ids_match_hf(
    legacy: bool, request: pytest.FixtureRequest, charmap: Callable[[str], str]
) -> None:
    model_dir = request.getfixturevalue("legacy_dir" if legacy else "hub_dir")
    hf = request.getfixturevalue("hf_legacy" if legacy else "hf_current")
    tok = nllb(model_dir)
    assert tok.legacy_behaviour is legacy
    texts = [*TEXTS, *SPECIAL_TEXTS, *random_texts(150)]
    as_given = [text for text in texts if hf_text(hf, charmap, text) == text]
    assert len(as_given) > 0.9 * len(texts)  # the normalizers' corner stays a corner
    for lang in LANGS:
        hf.src_lang, hf.tgt_lang = lang, lang
        for text in texts:
            reference = hf_text(hf, charmap, text)
            source = tok.encode_source(text, src_lang=lang)
            assert source == hf(reference, split_special_tokens=True)["input_ids"], (lang, text)
            target = tok.encode_target(text, tgt_lang=lang)
            assert target == hf(text_target=reference, split_special_tokens=True)["input_ids"], (lang, text)
            code = tok.lang_id(lang)
            body = tok.encode(text, add_eos=False)
            expected = [*body, 2, code] if legacy else [code, *body, 2]
            assert source == target == expected
            assert tok.encode(text) == [*body, 2]
    # Text without special strings: HF's default agrees too.
    hf.src_lang = "eng_Latn"
    for text in TEXTS:
        assert tok.encode_source(text, src_lang="eng_Latn") == hf(hf_text(hf, charmap, text))["input_ids"]


def test_batch_encode_matches_hf(hub_dir: Path, hf_current: Any, charmap: Callable[[str], str]) -> None:
    tok = nllb(hub_dir)
    texts = [*TEXTS, *random_texts(40, seed=1)]
    references = [hf_text(hf_current, charmap, text) for text in texts]
    for lang in ("zho_Hans", "eng_Latn"):
        assert [tok.encode_source(t, src_lang=lang) for t in texts] == hf_source(hf_current, references, lang)


def test_whitespace_follows_transformers_5(hub_dir: Path, hf_current: Any, nllb_model: bytes) -> None:
    """A trailing space stays (a ▁ piece); 4.x's slow tokenizer (SentencePiece) strips it."""
    tok = nllb(hub_dir)
    sp = spm.SentencePieceProcessor(model_proto=nllb_model)
    for text in ("hello ", "hello  ", " hello", "\thello\n", "a  \t b"):
        ids = tok.encode(text, add_eos=False)
        assert ids == hf_current(text, add_special_tokens=False)["input_ids"]
        slow_4x = [i + 1 for i in sp.encode(text)]  # 4.x: sp_model.encode, then fairseq's offset
        assert (ids == slow_4x) is (text in (" hello", "a  \t b")), text


@pytest.mark.parametrize("text", ["e\u0301\u0302", "Ａ\u0301", "ﬁ\u0301", "\ufefb\u064e", "\u1100\u1161", "ｶﾞ"])
def test_normalization_is_sentencepieces(
    hub_dir: Path, hf_current: Any, charmap: Callable[[str], str], text: str
) -> None:
    """HF's Precompiled normalizer applies the character map per grapheme cluster, so it drops the
    rest of a short cluster after a rewritten start (e + two accents -> é) and skips multi-character
    rules in long ones (conjoining jamo stay apart). Here SentencePiece normalizes, as for NLLB's
    training data and in 4.x's slow tokenizer: the ids are HF's on SentencePiece-normalized text."""
    assert hf_current.backend_tokenizer.normalizer.normalize_str(text) != charmap(text)
    tok = nllb(hub_dir)
    assert tok.encode(text) == tok.encode(charmap(text))
    assert tok.encode_source(text, src_lang="eng_Latn") == hf_source(hf_current, charmap(text), "eng_Latn")


def test_special_strings_stay_text(hub_dir: Path, hf_current: Any) -> None:
    tok = nllb(hub_dir)
    hf_current.src_lang = "eng_Latn"
    control = {0, 1, 2, *(tok.lang_id(code) for code in tok.language_codes), tok.vocab_size - 1}
    for text in SPECIAL_TEXTS:
        assert not control & set(tok.encode(text, add_eos=False)), text
        # HF's default parses them: a prompt could switch the language or end the input.
        assert tok.encode_source(text, src_lang="eng_Latn") != hf_current(text)["input_ids"]
    assert tok.decode(tok.encode("say eng_Latn </s>")) == "say eng_Latn </s>"


def test_decode_matches_hf(hub_dir: Path, hf_current: Any) -> None:
    tok = nllb(hub_dir)
    rng = random.Random(0)
    sequences = [tok.encode_target(t, tgt_lang=rng.choice(LANGS)) for t in [*TEXTS, *random_texts(60, seed=2)]]
    special = [i for i in range(tok.vocab_size) if tok.is_special(i)]
    meta = tok.encode(" ", add_eos=False)
    for _ in range(200):  # any ids at all: specials anywhere, "▁" first, codes mid-sentence
        pool = rng.choice([range(tok.vocab_size), special + meta * 20 + list(range(4, 60))])
        sequences.append(rng.choices(pool, k=rng.randint(0, 12)))
    for ids in sequences:
        for skip in (True, False):
            assert tok.decode(ids, skip_special=skip) == hf_current.decode(ids, skip_special_tokens=skip), ids


@pytest.mark.parametrize(
    "text",
    ["Hello, world!", "你好，世界！今天天气很好。", "Привет, мир! Straße, ça va?", "a  b", "tabs\tand\nnewlines"],
)
def test_round_trip(hub_dir: Path, text: str) -> None:
    tok = nllb(hub_dir)
    for lang in ("eng_Latn", "rus_Cyrl"):
        ids = tok.encode_source(text, src_lang=lang)
        # NFKC folds the full-width punctuation; whitespace runs collapse, tabs and newlines included.
        expected = " ".join(text.replace("，", ",").replace("！", "!").split())
        assert tok.decode(ids) == expected
        assert tok.decode(ids, skip_special=False) == f"{lang} {expected}</s>"


def test_streaming_equals_decode(hub_dir: Path) -> None:
    tok = nllb(hub_dir)
    rng = random.Random(3)
    sequences = [tok.encode_target(text, tgt_lang="fra_Latn") for text in [*TEXTS, *random_texts(30, seed=3)]]
    sequences += [rng.choices(range(tok.vocab_size), k=rng.randint(1, 10)) for _ in range(100)]
    for ids in sequences:
        for skip in (True, False):
            stream = IncrementalDecoder(tok, skip_special=skip)
            assert "".join(stream.push(i) for i in ids) + stream.finish() == tok.decode(ids, skip_special=skip)


def test_generation_start_matches_hf(hub_dir: Path, hf_current: Any) -> None:
    tok = nllb(hub_dir)
    config = transformers.M2M100Config()  # NLLB's config class: decoding starts from </s>
    assert tok.decoder_start_id == config.decoder_start_token_id
    check_special_ids(tok, eos=config.eos_token_id, decoder_start=config.decoder_start_token_id, source="nllb")
    for lang in LANGS:
        inputs = hf_current._build_translation_inputs(
            ["Hello"], return_tensors=None, src_lang="eng_Latn", tgt_lang=lang
        )
        assert tok.target_prefix(lang) == [config.decoder_start_token_id, inputs["forced_bos_token_id"]]
        assert inputs["input_ids"] == [tok.encode_source("Hello", src_lang="eng_Latn")]
        # Generation emits the label sequence after the decoder start: </s> lang tokens </s>.
        labels = tok.encode_target("Bonjour", tgt_lang=lang)
        assert labels[:1] == tok.target_prefix(lang)[1:]


@pytest.mark.parametrize(
    ("code", "suggested"),
    [
        ("eng_latn", "'eng_Latn'"),
        ("ENG_LATN", "'eng_Latn'"),
        ("zho", "'zho_Hans' or 'zho_Hant'"),
        ("fra_Lat", "'fra_Latn' or 'fur_Latn' or 'fao_Latn'"),
    ],
)
def test_unknown_language_suggests_close_codes(hub_dir: Path, code: str, suggested: str) -> None:
    tok = nllb(hub_dir)
    calls: list[Callable[[], object]] = [
        lambda: tok.lang_id(code),
        lambda: tok.encode_source("hi", src_lang=code),
        lambda: tok.encode_target("hi", tgt_lang=code),
        lambda: tok.target_prefix(code),
    ]
    for call in calls:
        with pytest.raises(InputError, match=f"unknown language code '{code}'; did you mean {suggested}\\?"):
            call()


def test_unknown_language_without_close_codes(hub_dir: Path) -> None:
    with pytest.raises(InputError, match=r"'en'; codes look like 'eng_Latn' .*language_codes lists all 202"):
        nllb(hub_dir).lang_id("en")


def test_legacy_behaviour_from_config_or_argument(hub_dir: Path, legacy_dir: Path) -> None:
    assert not nllb(hub_dir).legacy_behaviour
    assert nllb(legacy_dir).legacy_behaviour
    tok = NLLBTokenizer(hub_dir, legacy_behaviour=True)
    assert tok.encode_source("hi", src_lang="eng_Latn") == nllb(legacy_dir).encode_source("hi", src_lang="eng_Latn")


def test_files_saved_by_transformers_5(hub_dir: Path, hf_current: Any, tmp_path: Path) -> None:
    """save_pretrained writes tokenizer.json and extra_special_tokens (but no .model: copied in)."""
    hf_current.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    assert not (tmp_path / MODEL_FILE).exists()
    shutil.copy(hub_dir / MODEL_FILE, tmp_path / MODEL_FILE)
    hf = hf_tokenizer(tmp_path)
    tok = nllb(tmp_path)
    assert tok.vocab_size == len(hf)
    assert tok.language_codes == nllb(hub_dir).language_codes
    for lang in ("eng_Latn", "zul_Latn"):
        assert [tok.encode_source(t, src_lang=lang) for t in TEXTS] == hf_source(hf, TEXTS, lang)


def test_old_files_follow_fairseq_layout(make_dir: Callable[..., Path], hub_dir: Path, hf_current: Any) -> None:
    """Codes only in special_tokens_map.json, no ids: the ids the hub's files (and 4.x) give."""
    old = nllb(make_dir("nllb-old", with_ids=False))
    assert old.language_codes == nllb200_language_codes()
    hf_ids = hf_current.convert_tokens_to_ids([*old.language_codes, "<mask>"])
    assert [old.lang_id(c) for c in old.language_codes] + [old.vocab_size - 1] == hf_ids
    assert old.encode_source("Hello", src_lang="zho_Hans") == hf_source(hf_current, "Hello", "zho_Hans")


def test_own_language_codes(make_dir: Callable[..., Path]) -> None:
    codes = ["eng_Latn", "fra_Latn", "tok_Latn"]  # a fine-tune's list, with a code NLLB-200 lacks
    model_dir = make_dir("nllb-own", codes=codes)
    tok, hf = nllb(model_dir), hf_tokenizer(model_dir)
    assert tok.language_codes == tuple(codes)
    assert tok.vocab_size == len(hf)
    assert [tok.lang_id(c) for c in codes] == hf.convert_tokens_to_ids(codes)
    assert tok.encode_source("Bonjour", src_lang="tok_Latn") == hf_source(hf, "Bonjour", "tok_Latn")
    with pytest.raises(InputError, match="'zho_Hans'"):
        tok.lang_id("zho_Hans")


def test_byte_fallback_model_matches_hf(tmp_path: Path) -> None:
    """HF's BPE has no byte fallback: bytes SentencePiece would emit are one <unk> per run there."""
    model = train_nllb_like([*builtin_corpus(), *EXTRA_LINES], byte_fallback=True)
    model_dir = write_hub_dir(tmp_path, model)
    tok, hf, charmap = nllb(model_dir), hf_tokenizer(model_dir), make_charmap(model)
    texts = [*TEXTS, *random_texts(50, seed=4)]
    references = [hf_text(hf, charmap, text) for text in texts]
    assert [tok.encode_source(t, src_lang="eng_Latn") for t in texts] == hf_source(hf, references, "eng_Latn")


def test_load_tokenizer_picks_each_kind(
    hub_dir: Path, make_dir: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    t5_dir = tmp_path_factory.mktemp("t5")
    train_sentencepiece(itertools.islice(builtin_corpus(), 1000), t5_dir / "spiece.model", vocab_size=400)
    assert type(load_tokenizer(t5_dir)) is SentencePieceTokenizer
    # Without a tokenizer_class, NLLB-style codes in special_tokens_map.json mark NLLB.
    unnamed = make_dir("nllb-unnamed", with_ids=False, tokenizer_class=None)
    for model_dir in (hub_dir, unnamed):
        assert type(load_tokenizer(model_dir)) is NLLBTokenizer
    pytest.importorskip("jieba")
    cpm2_dir = tmp_path_factory.mktemp("cpm2")
    lines = ["<pad>", "<unk>", "<s>", "<eod>", "你", "好", *(f"<s_{i}>" for i in range(190))]
    (cpm2_dir / "vocab.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert isinstance(load_tokenizer(cpm2_dir), CPM2Tokenizer)


def test_load_refuses_other_sentencepiece_bpe_dirs(make_dir: Callable[..., Path]) -> None:
    mbart = make_dir("mbart", tokenizer_class="MBart50Tokenizer", codes=["en_XX", "fr_XX"])
    with pytest.raises(UnsupportedModelError, match=r"tokenizer_class 'MBart50Tokenizer'.*only for NllbTokenizer"):
        load_tokenizer(mbart)
    xlmr = make_dir("xlmr", tokenizer_class=None, codes=["<extra>"])
    with pytest.raises(CheckpointError, match='"tokenizer_class": "NllbTokenizer"'):
        load_tokenizer(xlmr)
    assert type(load_tokenizer(make_dir("fast", tokenizer_class="NllbTokenizerFast"))) is NLLBTokenizer


def test_broken_files_are_named(make_dir: Callable[..., Path], tmp_path: Path) -> None:
    model_dir = make_dir("broken")
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["legacy_behaviour"] = "yes"
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="legacy_behaviour must be true or false"):
        load_tokenizer(model_dir)
    config_path.write_text("{not json")
    with pytest.raises(CheckpointError, match=r"tokenizer_config\.json is not readable JSON"):
        load_tokenizer(model_dir)
    del config["legacy_behaviour"]
    config["added_tokens_decoder"]["1"]["content"] = "<mask>"
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="put '<mask>' at id 1, which fairseq's layout gives to '<pad>'"):
        load_tokenizer(model_dir)
    config["added_tokens_decoder"]["1"]["content"] = "<pad>"
    config["additional_special_tokens"] = [*config["additional_special_tokens"], "tok_Latn"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"language codes \['tok_Latn'\] are listed but have no token id"):
        load_tokenizer(model_dir)
    # A T5-layout model (pad 0, eos 1, unk 2) is not fairseq's.
    train_sentencepiece(itertools.islice(builtin_corpus(), 1000), tmp_path / MODEL_FILE, vocab_size=400)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "NllbTokenizer"}))
    with pytest.raises(CheckpointError, match="not an NLLB tokenizer"):
        load_tokenizer(tmp_path)


def test_ids_outside_the_vocabulary(hub_dir: Path) -> None:
    tok: Tokenizer = nllb(hub_dir)
    for bad in (-1, tok.vocab_size):
        with pytest.raises(InputError, match="outside the vocabulary"):
            tok.decode([4, bad])
    with pytest.raises(InputError, match="NLLB has no sentinel"):
        tok.sentinel_id(0)
