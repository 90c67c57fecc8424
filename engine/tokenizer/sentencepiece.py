"""SentencePiece tokenizer with T5's id layout: pad 0, eos 1, unk 2, sentinels after the vocabulary.

Matches HF transformers' ``T5Tokenizer`` (``models/t5/tokenization_t5.py``): ``<extra_id_i>`` has id
``sp_vocab_size + num_extra_ids - 1 - i``, text is split at sentinel strings and each piece of text
in between is encoded on its own, and decoding puts back the word-start space that SentencePiece
drops at the start of a text after a special token (``<pad> Das Haus</s>``). Deliberate
differences from HF, each checked in tests/test_tokenizer.py:

* byte fallback is honoured. HF 5.x rebuilds the model with ``byte_fallback=False``, so characters
  outside the vocabulary become ``<unk>`` there and byte pieces decode as literal ``<0xE4>``.
* ``</s>``, ``<pad>`` and ``<unk>`` typed in the text stay text; HF turns them into control ids,
  which would let a user's prompt end the encoder input early. Only sentinels are parsed.
* whitespace follows the model's own normalizer spec; HF always collapses whitespace runs, even
  for a model trained with ``remove_extra_whitespaces=False``.

Decoding follows HF rather than SentencePiece in one corner: SentencePiece drops *every* leading
space piece of a whitespace-collapsing model (``["▁", "▁Nine"]`` -> ``"Nine"``), HF and this class
only the first (-> ``" Nine"``). Encoders never produce such ids; a model may generate them, and
the HF rule keeps decoding local, which streaming (`IncrementalDecoder`) relies on.
"""

import re
from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm

from engine.errors import CheckpointError, ConfigError, InputError

__all__ = ["SentencePieceTokenizer"]

# HF matches added tokens as exact strings, so "<extra_id_01>" is text, not sentinel 1.
_SENTINEL = re.compile(r"<extra_id_(0|[1-9][0-9]*)>")
_T5_SPECIALS = (("pad", 0, "<pad>"), ("eos", 1, "</s>"), ("unk", 2, "<unk>"))


class SentencePieceTokenizer:
    """A `Tokenizer` over a SentencePiece ``.model`` file trained with T5's special ids.

    Build a compatible model with `engine.tokenizer.train_sentencepiece`; T5's, mT5's and Switch
    Transformers' released ``spiece.model`` files load as they are.
    """

    def __init__(self, path: Path, *, num_extra_ids: int = 100) -> None:
        """Load ``path`` and append ``num_extra_ids`` sentinels after its pieces.

        Raises:
            ConfigError: If ``num_extra_ids`` is negative.
            CheckpointError: If the file is missing, is not a SentencePiece model, or its pad/eos/unk
                ids are not T5's 0/1/2.
        """
        if num_extra_ids < 0:
            raise ConfigError(f"num_extra_ids must be >= 0 (T5 uses 100), got {num_extra_ids}")
        if not path.is_file():
            raise CheckpointError(f"SentencePiece model {path} does not exist")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as err:
            raise CheckpointError(
                f"{path} is not a readable SentencePiece model ({err}); replace it with the tokenizer "
                "file the checkpoint was trained with"
            ) from err
        for name, expected_id, piece in _T5_SPECIALS:
            actual_id = getattr(self._sp, f"{name}_id")()
            if actual_id != expected_id:
                raise CheckpointError(
                    f"{path} has {piece} at id {actual_id}, but T5-family models expect it at "
                    f"{expected_id} (pad=0, eos=1, unk=2); retrain it with train_sentencepiece"
                )
        self._path = path
        self._num_pieces: int = self._sp.get_piece_size()
        self._num_sentinels = num_extra_ids
        # Whether SentencePiece puts a "▁" before the text (and so strips one when decoding).
        self._has_dummy_prefix = str(self._sp.encode("a", out_type=str)[0]).startswith("▁")
        self._anchor_id = self._find_anchor(path)
        self._anchor_text = str(self._sp.decode([self._anchor_id]))

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({str(self._path)!r}, num_extra_ids={self._num_sentinels})"

    @property
    def vocab_size(self) -> int:
        """SentencePiece pieces plus sentinels (HF T5's checkpoints pad embeddings further, to 32128)."""
        return self._num_pieces + self._num_sentinels

    @property
    def eos_id(self) -> int:
        """Id of ``</s>`` (1)."""
        return 1

    @property
    def pad_id(self) -> int:
        """Id of ``<pad>`` (0)."""
        return 0

    @property
    def unk_id(self) -> int:
        """Id of ``<unk>`` (2)."""
        return 2

    @property
    def num_sentinels(self) -> int:
        """Number of ``<extra_id_i>`` sentinels."""
        return self._num_sentinels

    def encode(self, text: str, *, add_eos: bool = True) -> list[int]:
        """Token ids of ``text``, ending with ``</s>`` when ``add_eos``.

        ``<extra_id_i>`` (``i < num_sentinels``) becomes sentinel ``i``; the text between sentinels
        is encoded piece by piece, each with SentencePiece's word-start prefix, like HF.
        """
        ids: list[int] = []
        start = 0
        for match in _SENTINEL.finditer(text):
            index = int(match.group(1))
            if index >= self._num_sentinels:
                continue
            ids += self._sp.encode(text[start : match.start()])
            ids.append(self.sentinel_id(index))
            start = match.end()
        ids += self._sp.encode(text[start:])
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        """Text of ``ids``; specials are dropped with ``skip_special``, else written as their pieces.

        Raises:
            InputError: If an id is outside ``[0, vocab_size)``.
        """
        parts: list[str] = []
        run: list[int] = []
        for token_id in ids:
            if not self.is_special(token_id):
                run.append(token_id)
            elif not skip_special:
                self._flush(run, parts)
                parts.append(self.id_to_piece(token_id))
        self._flush(run, parts)
        return "".join(parts)

    def id_to_piece(self, id: int) -> str:
        """The piece of ``id``: ``▁word``, ``<0xE4>``, ``</s>`` or ``<extra_id_i>``.

        Raises:
            InputError: If ``id`` is outside ``[0, vocab_size)``.
        """
        self._check_id(id)
        if id >= self._num_pieces:
            return f"<extra_id_{self.vocab_size - 1 - id}>"
        return str(self._sp.id_to_piece(id))

    def is_special(self, id: int) -> bool:
        """Whether ``id`` is pad, eos, unk or a sentinel.

        Raises:
            InputError: If ``id`` is outside ``[0, vocab_size)``.
        """
        self._check_id(id)
        return id <= self.unk_id or id >= self._num_pieces

    def sentinel_id(self, i: int) -> int:
        """Id of ``<extra_id_{i}>``: sentinels count down from the last id, as in T5.

        Raises:
            InputError: If ``i`` is outside ``[0, num_sentinels)``.
        """
        if not 0 <= i < self._num_sentinels:
            raise InputError(f"sentinel index must be in [0, {self._num_sentinels}), got {i}")
        return self.vocab_size - 1 - i

    def _check_id(self, id: int) -> None:
        if not 0 <= id < self.vocab_size:
            raise InputError(f"token id {id} is outside the vocabulary [0, {self.vocab_size})")

    def _find_anchor(self, path: Path) -> int:
        """Id of a plain piece without "▁", decoded in front of every run (see `_flush`)."""
        for id in range(self._num_pieces):
            is_plain = not (
                self._sp.is_control(id) or self._sp.is_unknown(id) or self._sp.is_byte(id) or self._sp.is_unused(id)
            )
            if is_plain and "▁" not in str(self._sp.id_to_piece(id)):
                return id
        raise CheckpointError(f"{path} has no piece without a word-start mark; it is not a usable vocabulary")

    def _flush(self, run: list[int], parts: list[str]) -> None:
        """Decode the pending run of ordinary pieces into ``parts`` and clear it."""
        if not run:
            return
        # SentencePiece strips every leading space of a text when its model collapses whitespace
        # (["▁", "▁Nine"] -> "Nine"), so the text of a run would depend on where it starts and
        # streaming could not decode a window of it. Decoding behind a plain anchor piece gives the
        # run's text in mid-sentence; then, like HF's Metaspace decoder, only the word-start space
        # of the text's very first piece is dropped (" Nine" here, "<pad> Das" after a special).
        text = str(self._sp.decode([self._anchor_id, *run]))[len(self._anchor_text) :]
        if not parts and self._has_dummy_prefix and str(self._sp.id_to_piece(run[0])).startswith("▁"):
            text = text[1:]
        parts.append(text)
        run.clear()
