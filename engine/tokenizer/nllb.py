"""NLLB-200's tokenizer: SentencePiece BPE in fairseq's id layout, plus language-code tokens.

Follows HF transformers 5.x ``NllbTokenizer`` (``models/nllb/tokenization_nllb.py``; from a
``sentencepiece.bpe.model`` it is rebuilt as a ``tokenizers`` BPE by ``convert_slow_tokenizer``'s
``NllbConverter``) and the fairseq dictionary NLLB (NLLB Team, 2022,
https://arxiv.org/abs/2207.04672) was trained with. Ids, for N SentencePiece pieces (NLLB-200:
N = 256000, so ``eng_Latn`` = 256047 and ``<mask>`` = 256203)::

    0 <s>   1 <pad>   2 </s>   3 <unk>   4..N: pieces 3..N-1   N+1..N+202: language codes   <mask>

The language codes are the list the directory's files carry (``tokenizer_config.json``'s
``extra_special_tokens`` / ``additional_special_tokens``, else ``special_tokens_map.json``'s),
else the 202 of NLLB-200 (``data/nllb200_language_codes.txt``, HF's ``FAIRSEQ_LANGUAGE_CODES``).
Their ids are the ones ``tokenizer.json``'s ``added_tokens`` or ``tokenizer_config.json``'s
``added_tokens_decoder`` give, else the layout above.

Templates (HF ``set_src_lang_special_tokens`` / ``set_tgt_lang_special_tokens``): sources and
labels are ``lang tokens </s>``; with ``legacy_behaviour=True`` (HF's only behaviour before April
2023, still read from ``tokenizer_config.json``) they are ``tokens </s> lang``. Generation starts
from ``</s>`` (``decoder_start_token_id`` = 2) and is forced to emit the target language next.

Text is encoded as HF 5.x's pipeline does, which is not what SentencePiece does on its own:

1. SentencePiece's character map (NFKC for NLLB) normalizes the text, without its whitespace rules;
2. runs of spaces collapse to one (HF's ``Replace(" {2,}", " ")``), but a trailing space stays:
   ``"hello "`` ends with a ``▁`` piece, where SentencePiece (and so 4.x's slow ``NllbTokenizer``)
   strips it; 4.x's fast tokenizer agrees with 5.x;
3. spaces become ``▁``, one ``▁`` is put in front unless the text starts with one, and the text is
   split before every ``▁`` (HF's ``Metaspace(prepend_scheme="always", split=True)``);
4. each word is BPE-encoded by SentencePiece; characters outside the vocabulary become one ``<unk>``
   per run (HF's ``fuse_unk``), byte pieces included (HF builds its BPE with ``byte_fallback=False``).

Step 4 lets SentencePiece normalize each word a second time, harmless as NFKC is idempotent;
tests/test_tokenizer_nllb.py checks the ids against HF on Latin, CJK, emoji and control text.

Decoding is HF's ``Metaspace`` decoder: pieces are joined, ``▁`` becomes a space and the first
piece's leading one is dropped. 4.x also cleaned up the text (``" ,"`` -> ``","``) under
``clean_up_tokenization_spaces``, on by default for most of 4.x; 5.x skips that for BPE models.

Deliberate differences from HF, each checked in tests/test_tokenizer_nllb.py:

* step 1 is SentencePiece's normalizer, as fairseq applied it to NLLB's training data and 4.x's slow
  tokenizer does. HF's ``Precompiled`` normalizer applies the same character map per grapheme
  cluster: after a rewritten first character it drops the rest of a cluster under 6 bytes
  (``e`` + two accents -> ``é``, a lam-alef ligature loses its vowel mark) and in longer clusters
  it applies no multi-character rule (conjoining Hangul jamo stay apart, ``ｶﾞ`` -> ``カ`` + U+3099).
  Such text encodes as HF encodes the SentencePiece-normalized text.
* special strings in the text (``</s>``, ``<mask>``, ``eng_Latn``) stay text, as with HF's
  ``split_special_tokens=True``; HF's default turns them into control ids, which would let a prompt
  end the encoder input or switch the language.
* without ``tokenizer.json`` and ``added_tokens_decoder`` (a directory saved by transformers older
  than 4.34), ids follow fairseq's layout as 4.x's slow tokenizer did and the checkpoints expect.
  5.x gives ``<mask>`` the first id after the pieces, shifting every language code by one, and
  ignores codes listed only in ``special_tokens_map.json`` (they become ``<unk>``).
"""

import functools
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import sentencepiece as spm

from engine.errors import CheckpointError, InputError, UnsupportedModelError
from engine.tokenizer.nllb_files import CONFIG_FILE as _CONFIG_FILE
from engine.tokenizer.nllb_files import TOKENIZER_JSON as _TOKENIZER_JSON
from engine.tokenizer.nllb_files import HubFiles, read_hub_files
from engine.tokenizer.translation import unknown_language_error

__all__ = ["MODEL_FILE", "NLLBTokenizer", "load_nllb_dir", "nllb200_language_codes"]

#: The SentencePiece model of an NLLB (and M2M-100) hub directory.
MODEL_FILE = "sentencepiece.bpe.model"

# fairseq's dictionary puts these first; SentencePiece's own <unk>, <s>, </s> (ids 0-2) are dropped.
_FAIRSEQ_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
_SPM_SPECIALS = ("<unk>", "<s>", "</s>")
_BOS, _PAD, _EOS, _UNK = range(4)
_META = "\u2581"  # SentencePiece's word-start mark "▁"
_SPACE_RUN = re.compile(" {2,}")
# ISO 639-3 language + ISO 15924 script, the form of all of NLLB-200's codes.
_NLLB_CODE = re.compile(r"[a-z]{3}_[A-Z][a-z]{3}")


@functools.cache
def nllb200_language_codes() -> tuple[str, ...]:
    """NLLB-200's 202 language codes in id order (HF ``tokenization_nllb.FAIRSEQ_LANGUAGE_CODES``)."""
    text = resources.files("engine.tokenizer").joinpath("data/nllb200_language_codes.txt").read_text("utf-8")
    return tuple(text.split())


class NLLBTokenizer:
    """A `TranslationTokenizer` over an NLLB hub directory (``sentencepiece.bpe.model`` and its configs)."""

    def __init__(self, model_dir: Path, *, legacy_behaviour: bool | None = None) -> None:
        """Load the tokenizer files in ``model_dir``.

        Args:
            model_dir: Holds ``sentencepiece.bpe.model`` and, as a hub directory does,
                ``tokenizer_config.json``, ``special_tokens_map.json`` and ``tokenizer.json``.
            legacy_behaviour: Put the language code after ``</s>`` (True) or first (False);
                ``None`` reads it from ``tokenizer_config.json`` (default False, as HF).

        Raises:
            CheckpointError: If the model file is missing or not a fairseq-layout SentencePiece
                model, a config file is malformed, or the files' token ids disagree with the model.
        """
        path = model_dir / MODEL_FILE
        if not path.is_file():
            raise CheckpointError(f"{model_dir} has no {MODEL_FILE}; copy it from the NLLB checkpoint")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(path))
            # The character map alone: whitespace is handled the way HF does (see the module docstring).
            self._normalizer = spm.SentencePieceNormalizer(
                model_file=str(path), add_dummy_prefix=False, escape_whitespaces=False, remove_extra_whitespaces=False
            )
        except (RuntimeError, OSError) as err:
            raise CheckpointError(
                f"{path} is not a readable SentencePiece model ({err}); copy it again from the checkpoint"
            ) from err
        found = tuple(str(self._sp.id_to_piece(i)) for i in range(min(3, self._sp.get_piece_size())))
        if found != _SPM_SPECIALS or self._sp.unk_id() != 0:
            raise CheckpointError(
                f"{path} starts with pieces {found}, but fairseq's layout (NLLB, M2M-100) needs "
                f"{_SPM_SPECIALS} at ids 0-2; it is not an NLLB tokenizer"
            )
        files = read_hub_files(model_dir)
        self._model_dir = model_dir
        self._legacy = files.legacy_behaviour if legacy_behaviour is None else legacy_behaviour
        self._num_pieces: int = self._sp.get_piece_size()
        self._has_dummy_prefix = str(self._sp.encode("a", out_type=str)[0]).startswith(_META)
        # HF's BPE has no byte fallback: a byte piece SentencePiece would emit is <unk> there.
        byte_ids = (int(self._sp.piece_to_id(f"<0x{b:02X}>")) for b in range(256))
        self._unknown_spm_ids = frozenset({0, *(i for i in byte_ids if self._sp.is_byte(i))})
        self._meta_id = self._to_id(int(self._sp.piece_to_id(_META)))
        codes = files.language_codes or nllb200_language_codes()
        self._codes = tuple(c for c in codes if c not in _FAIRSEQ_SPECIALS and c != files.mask_token)
        self._added = self._place_added_tokens(files)
        added_ids = {text: id for id, (text, _) in self._added.items()}
        missing = [code for code in self._codes if code not in added_ids]
        if missing:
            raise CheckpointError(
                f"{model_dir}: language codes {missing[:5]} are listed but have no token id in "
                f"{_TOKENIZER_JSON} or {_CONFIG_FILE}'s added_tokens_decoder; add them there or drop them from the list"
            )
        self._lang_ids = {code: added_ids[code] for code in self._codes}
        self._codes = tuple(sorted(self._codes, key=self._lang_ids.__getitem__))
        self._vocab_size = self._num_pieces + 1 + len(self._added)

    def _place_added_tokens(self, files: HubFiles) -> dict[int, tuple[str, bool]]:
        """Id -> (text, is special) of the tokens after the pieces: from the files, else fairseq's layout."""
        first = self._num_pieces + 1
        if files.added_tokens is None:
            layout = [*self._codes, files.mask_token]
            added = {first + i: (token, True) for i, token in enumerate(layout)}
        else:
            added = {id: token for id, token in files.added_tokens.items() if id >= first}
            where = f"{self._model_dir}: the added tokens of {_TOKENIZER_JSON} or {_CONFIG_FILE}"
            for id, (text, _) in files.added_tokens.items():
                if id < first and (id >= len(_FAIRSEQ_SPECIALS) or text != _FAIRSEQ_SPECIALS[id]):
                    raise CheckpointError(
                        f"{where} put {text!r} at id {id}, which fairseq's layout gives to "
                        f"{self._fairseq_piece(id)!r}; the files do not belong to this {MODEL_FILE}"
                    )
            if sorted(added) != list(range(first, first + len(added))):
                raise CheckpointError(
                    f"{where} must follow the pieces of {MODEL_FILE} without gaps, at ids {first}, "
                    f"{first + 1}, ...; found ids {sorted(added)[:5]}...; copy the files again from the checkpoint"
                )
        return added

    def __repr__(self) -> str:
        return f"NLLBTokenizer({str(self._model_dir)!r}, legacy_behaviour={self._legacy})"

    @property
    def vocab_size(self) -> int:
        """Specials, pieces, language codes and ``<mask>`` (NLLB-200: 256204; its embeddings have 256206 rows)."""
        return self._vocab_size

    @property
    def eos_id(self) -> int:
        """Id of ``</s>`` (2)."""
        return _EOS

    @property
    def pad_id(self) -> int:
        """Id of ``<pad>`` (1)."""
        return _PAD

    @property
    def unk_id(self) -> int:
        """Id of ``<unk>`` (3)."""
        return _UNK

    @property
    def num_sentinels(self) -> int:
        """NLLB has no span-corruption sentinels (0)."""
        return 0

    @property
    def decoder_start_id(self) -> int:
        """``</s>`` (2): NLLB's ``decoder_start_token_id``, as fairseq shifts ``</s>`` into the decoder."""
        return _EOS

    @property
    def legacy_behaviour(self) -> bool:
        """Whether sources and labels end ``</s> lang`` (legacy) rather than start with ``lang``."""
        return self._legacy

    @property
    def language_codes(self) -> tuple[str, ...]:
        """The language codes, in id order (NLLB-200: ``ace_Arab`` ... ``zul_Latn``, 202 of them)."""
        return self._codes

    def lang_id(self, code: str) -> int:
        """Token id of language ``code`` (e.g. ``eng_Latn``); for a target, the forced first token.

        Raises:
            InputError: If ``code`` is not one of `language_codes` (the message suggests close ones).
        """
        try:
            return self._lang_ids[code]
        except KeyError:
            raise unknown_language_error(code, self._codes, example="eng_Latn") from None

    def encode(self, text: str, *, add_eos: bool = True) -> list[int]:
        """Token ids of ``text`` without a language code, ending with ``</s>`` when ``add_eos``."""
        ids = self._encode_text(text)
        if add_eos:
            ids.append(_EOS)
        return ids

    def encode_source(self, text: str, *, src_lang: str) -> list[int]:
        """Encoder input: ``src_lang text </s>``, or ``text </s> src_lang`` in legacy mode.

        Raises:
            InputError: If ``src_lang`` is not one of `language_codes`.
        """
        return self._with_language(self._encode_text(text), self.lang_id(src_lang))

    def encode_target(self, text: str, *, tgt_lang: str) -> list[int]:
        """Labels: ``tgt_lang text </s>``, or ``text </s> tgt_lang`` in legacy mode (HF's ``text_target``).

        Raises:
            InputError: If ``tgt_lang`` is not one of `language_codes`.
        """
        return self._with_language(self._encode_text(text), self.lang_id(tgt_lang))

    def target_prefix(self, tgt_lang: str) -> list[int]:
        """``[</s>, tgt_lang]``: the decoder start and the forced first token, in both modes.

        Raises:
            InputError: If ``tgt_lang`` is not one of `language_codes`.
        """
        return [self.decoder_start_id, self.lang_id(tgt_lang)]

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        """Text of ``ids``; with ``skip_special`` specials, language codes and ``<unk>`` are left out.

        Raises:
            InputError: If an id is outside ``[0, vocab_size)`` (HF skips such ids silently).
        """
        pieces = [self.id_to_piece(id) for id in ids if not (skip_special and self.is_special(id))]
        text = "".join(pieces).replace(_META, " ")
        return text[1:] if pieces and pieces[0].startswith(_META) else text

    def id_to_piece(self, id: int) -> str:
        """The token of ``id``: ``</s>``, a piece such as ``▁hello``, ``eng_Latn`` or ``<mask>``.

        Raises:
            InputError: If ``id`` is outside ``[0, vocab_size)``.
        """
        self._check_id(id)
        if id > self._num_pieces:
            return self._added[id][0]
        return self._fairseq_piece(id)

    def is_special(self, id: int) -> bool:
        """Whether ``id`` is ``<s>``, ``<pad>``, ``</s>``, ``<unk>``, a language code or ``<mask>``.

        Raises:
            InputError: If ``id`` is outside ``[0, vocab_size)``.
        """
        self._check_id(id)
        return id < len(_FAIRSEQ_SPECIALS) or (id > self._num_pieces and self._added[id][1])

    def sentinel_id(self, i: int) -> int:
        """NLLB has no sentinels.

        Raises:
            InputError: Always.
        """
        raise InputError(f"sentinel index must be in [0, 0): NLLB has no sentinel tokens, got {i}")

    def _check_id(self, id: int) -> None:
        if not 0 <= id < self._vocab_size:
            raise InputError(f"token id {id} is outside the vocabulary [0, {self._vocab_size})")

    def _fairseq_piece(self, id: int) -> str:
        return _FAIRSEQ_SPECIALS[id] if id < len(_FAIRSEQ_SPECIALS) else str(self._sp.id_to_piece(id - 1))

    def _to_id(self, spm_id: int) -> int:
        return _UNK if spm_id in self._unknown_spm_ids else spm_id + 1

    def _with_language(self, ids: list[int], lang: int) -> list[int]:
        return [*ids, _EOS, lang] if self._legacy else [lang, *ids, _EOS]

    def _encode_text(self, text: str) -> list[int]:
        """Ids of ``text`` with HF's normalizer, Metaspace pre-tokenizer and BPE (module docstring)."""
        normalized = _SPACE_RUN.sub(" ", str(self._normalizer.normalize(text)))
        if not normalized:
            return []
        marked = normalized.replace(" ", _META)
        words = (marked if marked.startswith(_META) else _META + marked).split(_META)[1:]
        bodies = [word if self._has_dummy_prefix else _META + word for word in words if word]
        encoded = iter(self._sp.encode(bodies))
        ids: list[int] = []
        for word in words:
            if not word:  # a lone "▁": HF's BPE looks the mark up on its own
                ids.append(self._meta_id)
                continue
            start = len(ids)
            for spm_id in next(encoded):
                id = self._to_id(spm_id)
                if not (id == _UNK and len(ids) > start and ids[-1] == _UNK):  # fuse_unk, within a word
                    ids.append(id)
        return ids


def load_nllb_dir(model_dir: Path) -> NLLBTokenizer:
    """The tokenizer of a directory holding ``sentencepiece.bpe.model``, chosen as transformers does.

    ``tokenizer_config.json``'s ``tokenizer_class`` decides (AutoTokenizer reads it first; NLLB's
    ``config.json`` says ``model_type: m2m_100`` either way). Without one, a list of NLLB-style
    language codes (``eng_Latn``) in the files marks an NLLB directory.

    Raises:
        UnsupportedModelError: If the directory belongs to another tokenizer (mBART, XLM-R, ...).
        CheckpointError: If nothing in the directory says which tokenizer it is, or its files are
            malformed.
    """
    files = read_hub_files(model_dir, read_ids=False)
    name = files.tokenizer_class
    if name is not None and name.removesuffix("Fast") != "NllbTokenizer":
        raise UnsupportedModelError(
            f"{model_dir / _CONFIG_FILE} names tokenizer_class {name!r}; cpm2 reads {MODEL_FILE} only "
            "for NllbTokenizer (NLLB-200)"
        )
    if name is None and not any(_NLLB_CODE.fullmatch(code) for code in files.language_codes or ()):
        raise CheckpointError(
            f"{model_dir} holds {MODEL_FILE} but no {_CONFIG_FILE} naming its tokenizer_class and no "
            "NLLB language codes (eng_Latn, ...); copy tokenizer_config.json from the checkpoint, or write "
            '{"tokenizer_class": "NllbTokenizer"} there for an NLLB model'
        )
    return NLLBTokenizer(model_dir)
