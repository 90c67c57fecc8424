"""The tokenizer interface the engine depends on, and streaming detokenization on top of it.

`IncrementalDecoder` follows text-generation-inference's prefix/read offsets
(`server/text_generation_server/models/model.py`, ``Model.decode_token``): each new token is
decoded together with a few tokens before it, so that SentencePiece's leading-space pieces and
UTF-8 characters split over several byte-fallback pieces come out exactly as a full decode would.
"""

import codecs
import re
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

__all__ = ["DecoderStartTokenizer", "IncrementalDecoder", "Tokenizer", "decoder_start_id", "longest_token_chars"]


@runtime_checkable
class Tokenizer(Protocol):
    """Text <-> token ids for a T5-family model; ids of sentinels and specials follow T5's layout."""

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, sentinels included (ids are ``0..vocab_size-1``)."""
        ...

    @property
    def eos_id(self) -> int:
        """Id of ``</s>``, appended by `encode` and the id that ends generation."""
        ...

    @property
    def pad_id(self) -> int:
        """Id of ``<pad>``; T5 also starts decoding with it."""
        ...

    @property
    def unk_id(self) -> int:
        """Id of ``<unk>``, produced for text the vocabulary cannot represent."""
        ...

    @property
    def num_sentinels(self) -> int:
        """Number of ``<extra_id_i>`` sentinel tokens (span-corruption masks)."""
        ...

    def encode(self, text: str, *, add_eos: bool = True) -> list[int]:
        """Token ids of ``text``; sentinel strings such as ``<extra_id_0>`` map to their ids."""
        ...

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        """Text of ``ids``; with ``skip_special`` pad/eos/unk/sentinels are left out."""
        ...

    def id_to_piece(self, id: int) -> str:
        """The vocabulary entry of ``id`` (e.g. ``▁hello``, ``<0xE4>``, ``<extra_id_3>``)."""
        ...

    def is_special(self, id: int) -> bool:
        """Whether ``id`` is pad, eos, unk or a sentinel."""
        ...

    def sentinel_id(self, i: int) -> int:
        """Id of ``<extra_id_{i}>``."""
        ...


@runtime_checkable
class DecoderStartTokenizer(Tokenizer, Protocol):
    """A `Tokenizer` whose model starts decoding from a token other than ``<pad>`` (CPM-2: ``<s>``).

    Kept apart from `Tokenizer` so that tokenizers without the notion (T5's) stay valid; read it
    through `decoder_start_id`.
    """

    @property
    def decoder_start_id(self) -> int:
        """Id of the first decoder input token."""
        ...


def decoder_start_id(tokenizer: Tokenizer) -> int:
    """The id ``tokenizer``'s model starts decoding from: its ``decoder_start_id``, else ``pad_id`` (T5)."""
    if isinstance(tokenizer, DecoderStartTokenizer):
        return tokenizer.decoder_start_id
    return tokenizer.pad_id


# SentencePiece (and HF's byte-fallback tokenizers) name the 256 byte pieces <0x00> ... <0xFF>.
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class IncrementalDecoder:
    """Turns a stream of token ids into text, one token at a time.

    ``"".join(push(i) for i in ids) + finish()`` equals ``tokenizer.decode(ids)``; the ``finish()``
    part is non-empty only when the stream stops in the middle of a UTF-8 character. A push never
    returns a U+FFFD replacement character that later bytes could still complete.

    Cost per token is a decode of the tokens since the previous emitted chunk, not of the whole
    sequence.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = True) -> None:
        """Start an empty stream decoded with ``tokenizer.decode(..., skip_special=skip_special)``."""
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._ids: list[int] = []
        # Text of ids[prefix_offset:read_offset] has been emitted; it is re-decoded as context.
        self._prefix_offset = 0
        self._read_offset = 0
        self._chunks: list[str] = []

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._chunks)

    def push(self, token_id: int) -> str:
        """Add one token and return the text it completes (possibly ``""``).

        Raises:
            InputError: If ``token_id`` is outside the vocabulary (the stream is left unchanged).
        """
        self._tokenizer.is_special(token_id)  # validates the id before it enters the stream
        self._ids.append(token_id)
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset, len(self._ids))
        if len(new_text) <= len(prefix_text) or self._is_awaiting_bytes(new_text):
            return ""
        # Decoding is local to a piece and its neighbours, so the context decodes the same way
        # with and without the new token; a mismatch would mean the tokenizer breaks that.
        assert new_text.startswith(prefix_text), (prefix_text, new_text)
        delta = new_text[len(prefix_text) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._chunks.append(delta)
        return delta

    def finish(self) -> str:
        """Flush what a push held back (an unfinished UTF-8 character, as U+FFFD) and return it."""
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset, len(self._ids))
        delta = new_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset = len(self._ids)
        if delta:
            self._chunks.append(delta)
        return delta

    def _decode(self, start: int, stop: int) -> str:
        return self._tokenizer.decode(self._ids[start:stop], skip_special=self._skip_special)

    def _is_awaiting_bytes(self, text: str) -> bool:
        """Whether ``text`` ends in U+FFFD only because the trailing byte pieces are incomplete."""
        if not text.endswith("\ufffd"):
            return False
        trailing = bytearray()
        for token_id in reversed(self._ids[self._read_offset :]):
            if self._skip_special and self._tokenizer.is_special(token_id):
                # Skipped specials vanish before decoding, so bytes on both sides still join up.
                continue
            match = _BYTE_PIECE.fullmatch(self._tokenizer.id_to_piece(token_id))
            if match is None:
                break
            trailing.insert(0, int(match.group(1), 16))
        if not trailing:
            # The replacement character is in the text itself (or from a non-byte piece): final.
            return False
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        decoder.decode(bytes(trailing), final=False)
        pending, _ = decoder.getstate()
        return bool(pending)


def longest_token_chars(tokenizer: Tokenizer) -> int:
    """The length of the longest vocabulary entry: no token stands for more characters of text.

    An upper bound, never an underestimate: markers count as characters (``▁`` for a space, the
    ``##`` of a continuation), and a byte-fallback entry ``<0xE4>`` (six) stands for one byte.
    """
    return max(1, max((len(tokenizer.id_to_piece(i)) for i in range(tokenizer.vocab_size)), default=1))
