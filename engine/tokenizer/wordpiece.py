"""CPM-2's WordPiece: a line-numbered ``vocab.txt``, full-width folding and greedy longest match.

Follows ``tokenization_enc_dec.py`` of TsinghuaAI/CPM-2-Finetune (the same code ships in
OpenBMB/BMInf, which served the released checkpoints). Unlike BERT's WordPiece there is no ``##``
continuation prefix: every piece is matched greedily from the left against the whole vocabulary,
and a character no piece starts with becomes ``<unk>`` on its own (BERT turns the whole word into
``[UNK]``).
"""

from collections.abc import Mapping
from pathlib import Path

from engine.errors import CheckpointError

__all__ = ["MAX_CHARS_PER_WORD", "WordPiece", "read_vocab", "to_half_width"]

#: A jieba segment longer than this becomes a single ``<unk>``, as in the reference. Keeping the
#: quirk keeps ids identical to what the model was trained on (and bounds the matching cost).
MAX_CHARS_PER_WORD = 200

# Full-width punctuation the reference keeps as is: the vocabulary has these Chinese forms, and
# folding them to ASCII would change the ids of almost every Chinese sentence.
_KEPT_FULL_WIDTH = frozenset("，。！（）？、；：")
_IDEOGRAPHIC_SPACE = 0x3000
_FULL_WIDTH_OFFSET = 0xFEE0  # U+FF01..U+FF5E are ASCII 0x21..0x7E shifted by this


def _fold(char: str) -> str:
    if char in _KEPT_FULL_WIDTH:
        return char
    code = ord(char)
    if code == _IDEOGRAPHIC_SPACE:
        return " "
    if 0x21 <= code - _FULL_WIDTH_OFFSET <= 0x7E:
        return chr(code - _FULL_WIDTH_OFFSET)
    return char


def to_half_width(text: str) -> str:
    """``text`` with full-width ASCII forms and U+3000 folded to ASCII, except ``，。！（）？、；：``."""
    return "".join(_fold(char) for char in text)


def read_vocab(path: Path) -> list[str]:
    """The pieces of a ``vocab.txt``: one per line, the id of a piece is its line number (from 0).

    Lines are split and stripped as the reference's ``readline()``/``strip()`` loop does: universal
    newlines, surrounding whitespace removed, blank lines kept (they still take an id, so the ids of
    later pieces keep matching the embedding rows).

    Raises:
        CheckpointError: If the file cannot be read as UTF-8 or holds no pieces.
    """
    try:
        with path.open(encoding="utf-8") as lines:
            pieces = [line.strip() for line in lines]
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not a readable UTF-8 vocabulary ({err})") from err
    if not pieces:
        raise CheckpointError(f"{path} is empty; a vocab.txt lists one piece per line")
    return pieces


class WordPiece:
    """Greedy longest-match-first segmentation of one word into vocabulary pieces."""

    def __init__(self, piece_to_id: Mapping[str, int], *, unk_id: int) -> None:
        """Match against ``piece_to_id``; characters no piece covers become ``unk_id``."""
        self._piece_to_id = piece_to_id
        self._unk_id = unk_id
        # No piece is longer than this, so a match never needs to look further ahead (the
        # reference tries every end down from the end of the word; the result is the same).
        self._max_piece_chars = max((len(piece) for piece in piece_to_id), default=1)

    def encode(self, word: str) -> list[int]:
        """Ids of ``word``'s pieces, longest vocabulary match first, left to right."""
        if len(word) > MAX_CHARS_PER_WORD:
            return [self._unk_id]
        ids: list[int] = []
        start = 0
        while start < len(word):
            end = min(len(word), start + self._max_piece_chars)
            while end > start and word[start:end] not in self._piece_to_id:
                end -= 1
            if end == start:
                ids.append(self._unk_id)
                start += 1
            else:
                ids.append(self._piece_to_id[word[start:end]])
                start = end
        return ids
