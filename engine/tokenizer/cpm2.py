"""CPM-2's tokenizer: jieba word segmentation, then WordPiece over the checkpoint's ``vocab.txt``.

Follows ``tokenization_enc_dec.py`` of TsinghuaAI/CPM-2-Finetune (the same algorithm serves the
released checkpoints in OpenBMB/BMInf, ``bminf/arch/t5/tokenizer.py``). Encoding:

1. full-width forms are folded to ASCII (`to_half_width`);
2. jieba segments the text (``cut(text, cut_all=False)``, HMM on);
3. in every segment ``" "`` becomes U+2582 and ``"\\n"`` U+2583, so whitespace survives as tokens.
   The reference translates *after* segmenting. The order does not change the ids: jieba yields
   every character outside its word classes (whitespace, U+2582, U+2583) as a segment of its own,
   except ``"\\r\\n"``, which it keeps together (and ``"\\r"`` is ``<unk>`` either way);
4. each segment is split by greedy longest-match WordPiece (`WordPiece`); unknown characters
   become ``<unk>``.

Decoding joins the pieces and maps U+2582/U+2583 back to a space/newline.

Ids are the line numbers of ``vocab.txt``. Specials are found by name: ``<pad>``, ``<unk>``,
``<eod>`` (end of document, the eos), the sentinels ``<s_0>`` ... ``<s_189>``, and the control
pieces ``<s>``, ``</s>``, ``<sep>``, ``<mask>``, ``<go>`` where the vocabulary has them.

Deliberate differences from the reference:

* ``<s_i>`` typed in the text becomes sentinel ``i``, like ``<extra_id_i>`` for T5 (the reference
  has no text syntax for sentinels; its callers splice ids in). Other specials typed in the text
  stay text: jieba cuts ``<`` and ``>`` into segments of their own, so they never match.
* jieba runs as a private instance with its default dictionary, so words another part of the
  program adds to jieba's global tokenizer cannot change the ids this one produces.
* ``encode(add_eos=True)`` appends ``<eod>`` (the `Tokenizer` contract); the reference appends
  nothing, and CPM-2's encoder never saw ``<eod>`` in training, so CPM-2 inputs want ``add_eos=False``.
* ``vocab_size`` counts lines; the reference counts distinct pieces, which is smaller when the
  file repeats a line. A repeated piece encodes to its last line, as in the reference.

CPM-2-Pretrain's bilingual variant (``bpe_cn_en``) differs further: non-Chinese pieces after the
first in a word carry BERT's ``##`` prefix, and spaces between English words are dropped when
encoding. That variant is not implemented here.
"""

import importlib
import logging
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol, cast

from engine.errors import CheckpointError, ConfigError, Cpm2Error, InputError
from engine.tokenizer.wordpiece import WordPiece, read_vocab, to_half_width

__all__ = ["NUM_SENTINELS", "CPM2Tokenizer", "MissingDependencyError"]

#: Sentinels CPM-2's data pipeline uses (``max_sentinels=190``); bilingual vocabularies list 220.
NUM_SENTINELS = 190

_SPACE, _NEWLINE = "\u2582", "\u2583"
_TO_PIECES = str.maketrans({" ": _SPACE, "\n": _NEWLINE})
_FROM_PIECES = str.maketrans({_SPACE: " ", _NEWLINE: "\n"})
# Exact spelling only, as for <extra_id_i>: "<s_01>" is text, not sentinel 1.
_SENTINEL = re.compile(r"<s_(0|[1-9][0-9]*)>")
_CONTROL_PIECES = frozenset({"<pad>", "<unk>", "<eod>", "<s>", "</s>", "<sep>", "<mask>", "<go>"})
# Decoding starts from the first of these the vocabulary has. CPM-2's code starts every decoder
# input with id 1, "<s>" in all released vocabularies (CPM-2-Pretrain enc_dec_dataset.py, every task
# of CPM-2-Finetune CPM2Datasets.py, WMT en-zh included; BMInf decodes from "<s>"), never "<pad>".
# The bilingual vocab.txt of CPM-2-Finetune also lists "<go>" (line 7), but no released code uses it.
_DECODER_START_PIECES = ("<s>", "<go>", "<pad>")


class MissingDependencyError(Cpm2Error, ImportError):
    """An optional package a feature needs is not installed; the message names the extra to install."""


class _Segmenter(Protocol):
    """The part of ``jieba.Tokenizer`` this module uses."""

    tmp_dir: str | None

    def initialize(self) -> None: ...

    def cut(self, sentence: str, cut_all: bool = False) -> Iterator[str]: ...


def _writable_dir(requested: Path | None) -> str:
    """``requested`` if it exists or can be made and is writable, else the system temp directory."""
    if requested is not None:
        try:
            requested.mkdir(parents=True, exist_ok=True)
        except OSError:
            pass
        else:
            if os.access(requested, os.W_OK):
                return str(requested)
    # gettempdir() only returns a directory it could create a file in.
    return tempfile.gettempdir()


def _load_jieba(cache_dir: Path | None) -> _Segmenter:
    try:
        jieba = importlib.import_module("jieba")
    except ImportError as err:
        raise MissingDependencyError(
            "the CPM-2 tokenizer (a model directory with vocab.txt) needs jieba; install it with "
            "pip install 'cpm2[cpm2]'"
        ) from err
    # jieba attaches its own stderr handler at DEBUG and narrates every dictionary load.
    logging.getLogger("jieba").setLevel(logging.WARNING)
    segmenter = cast(_Segmenter, jieba.Tokenizer())
    # jieba caches its prefix dictionary in tmp_dir (default: the system temp directory, read-only
    # in some containers; a failed write would log a traceback on every start).
    segmenter.tmp_dir = _writable_dir(cache_dir)
    # Build (or load from the cache) now, so the first request does not pay ~1 s for it.
    segmenter.initialize()
    return segmenter


class CPM2Tokenizer:
    """A `Tokenizer` over CPM-2's ``vocab.txt``; needs the optional ``jieba`` package."""

    def __init__(self, path: Path, *, num_sentinels: int = NUM_SENTINELS, jieba_cache_dir: Path | None = None) -> None:
        """Load ``path`` (a ``vocab.txt``).

        Args:
            path: The vocabulary, one piece per line; a piece's id is its line number.
            num_sentinels: Sentinels ``<s_0>`` ... the model was trained with (CPM-2: 190).
            jieba_cache_dir: Where jieba caches its dictionary (``jieba.cache``, ~5 MB); the system
                temp directory when ``None`` or not writable.

        Raises:
            CheckpointError: If the file is missing or unreadable, or lacks ``<pad>``, ``<unk>``,
                ``<eod>`` or one of the sentinels.
            ConfigError: If ``num_sentinels`` is negative.
            MissingDependencyError: If ``jieba`` is not installed.
        """
        if not path.is_file():
            raise CheckpointError(f"CPM-2 vocabulary {path} does not exist")
        if num_sentinels < 0:
            raise ConfigError(f"num_sentinels must be >= 0, got {num_sentinels}")
        self._path = path
        self._pieces = read_vocab(path)
        piece_to_id = {piece: id for id, piece in enumerate(self._pieces)}  # a repeated piece: last line
        sentinels = [f"<s_{i}>" for i in range(num_sentinels)]
        missing = [piece for piece in ("<pad>", "<unk>", "<eod>", *sentinels) if piece not in piece_to_id]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise CheckpointError(
                f"{path} is not a CPM-2 vocabulary: it lacks {shown}; use the vocab.txt released with "
                "the checkpoint (or pass num_sentinels for a vocabulary with fewer sentinels)"
            )
        self._pad_id = piece_to_id["<pad>"]
        self._unk_id = piece_to_id["<unk>"]
        self._eos_id = piece_to_id["<eod>"]
        self._sentinel_ids = tuple(piece_to_id[piece] for piece in sentinels)
        self._decoder_start_id = next(piece_to_id[p] for p in _DECODER_START_PIECES if p in piece_to_id)
        self._special_ids = frozenset(
            id
            for id, piece in enumerate(self._pieces)
            if piece in _CONTROL_PIECES or re.fullmatch(r"<s_[0-9]+>", piece)
        )
        # Control pieces are left out of matching so that no text can ever become one.
        self._wordpiece = WordPiece(
            {piece: id for piece, id in piece_to_id.items() if id not in self._special_ids}, unk_id=self._unk_id
        )
        self._segmenter = _load_jieba(jieba_cache_dir)

    def __repr__(self) -> str:
        return f"CPM2Tokenizer({str(self._path)!r}, num_sentinels={len(self._sentinel_ids)})"

    @property
    def vocab_size(self) -> int:
        """Number of lines of ``vocab.txt`` (sentinels are among them)."""
        return len(self._pieces)

    @property
    def eos_id(self) -> int:
        """Id of ``<eod>`` (end of document), where CPM-2 ends a generation."""
        return self._eos_id

    @property
    def pad_id(self) -> int:
        """Id of ``<pad>``."""
        return self._pad_id

    @property
    def unk_id(self) -> int:
        """Id of ``<unk>``."""
        return self._unk_id

    @property
    def num_sentinels(self) -> int:
        """Number of ``<s_i>`` sentinels."""
        return len(self._sentinel_ids)

    @property
    def decoder_start_id(self) -> int:
        """First decoder input: ``<s>`` (what CPM-2 was trained with), else ``<go>``, else ``<pad>``."""
        return self._decoder_start_id

    def encode(self, text: str, *, add_eos: bool = True) -> list[int]:
        """Token ids of ``text``, ending with ``<eod>`` when ``add_eos``.

        ``<s_i>`` (``i < num_sentinels``) becomes sentinel ``i``; the text between sentinels is
        segmented and encoded on its own.
        """
        ids: list[int] = []
        start = 0
        for match in _SENTINEL.finditer(text):
            index = int(match.group(1))
            if index >= len(self._sentinel_ids):
                continue
            ids += self._encode_text(text[start : match.start()])
            ids.append(self._sentinel_ids[index])
            start = match.end()
        ids += self._encode_text(text[start:])
        if add_eos:
            ids.append(self._eos_id)
        return ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        """Text of ``ids``; specials are dropped with ``skip_special``, else written as their pieces.

        Every id decodes to the same text wherever it stands, so streaming (`IncrementalDecoder`)
        is exact.

        Raises:
            InputError: If an id is outside ``[0, vocab_size)``.
        """
        pieces = [self._pieces[id] for id in ids if not (self.is_special(id) and skip_special)]
        return "".join(pieces).translate(_FROM_PIECES)

    def id_to_piece(self, id: int) -> str:
        """The ``vocab.txt`` entry of ``id`` (spaces and newlines as U+2582 and U+2583).

        Raises:
            InputError: If ``id`` is outside ``[0, vocab_size)``.
        """
        self._check_id(id)
        return self._pieces[id]

    def is_special(self, id: int) -> bool:
        """Whether ``id`` is ``<pad>``, ``<unk>``, ``<eod>``, a sentinel or another control piece.

        Raises:
            InputError: If ``id`` is outside ``[0, vocab_size)``.
        """
        self._check_id(id)
        return id in self._special_ids

    def sentinel_id(self, i: int) -> int:
        """Id of ``<s_{i}>``.

        Raises:
            InputError: If ``i`` is outside ``[0, num_sentinels)``.
        """
        if not 0 <= i < len(self._sentinel_ids):
            raise InputError(f"sentinel index must be in [0, {len(self._sentinel_ids)}), got {i}")
        return self._sentinel_ids[i]

    def _check_id(self, id: int) -> None:
        if not 0 <= id < len(self._pieces):
            raise InputError(f"token id {id} is outside the vocabulary [0, {len(self._pieces)})")

    def _encode_text(self, text: str) -> list[int]:
        ids: list[int] = []
        for word in self._segmenter.cut(to_half_width(text), cut_all=False):
            ids += self._wordpiece.encode(word.translate(_TO_PIECES))
        return ids
