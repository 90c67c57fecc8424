"""What a multilingual translation tokenizer adds to `Tokenizer`: language codes as tokens.

NLLB-200 (NLLB Team, 2022, https://arxiv.org/abs/2207.04672, section 6.1.1) and M2M-100 mark the
language of a text with a code token (``eng_Latn``, ``__en__``): the encoder input carries the
source language's code, and generation is forced to emit the target language's code first, right
after the decoder start token. HF transformers passes the latter to ``generate`` as
``forced_bos_token_id`` (``NllbTokenizer._build_translation_inputs``).
"""

import difflib
from typing import Protocol, runtime_checkable

from engine.errors import InputError
from engine.tokenizer.base import DecoderStartTokenizer

__all__ = ["TranslationTokenizer", "unknown_language_error"]


@runtime_checkable
class TranslationTokenizer(DecoderStartTokenizer, Protocol):
    """A `Tokenizer` whose model translates between languages named by code tokens."""

    @property
    def language_codes(self) -> tuple[str, ...]:
        """Every language code the tokenizer knows, in id order (e.g. ``ace_Arab`` ... ``zul_Latn``)."""
        ...

    def lang_id(self, code: str) -> int:
        """Token id of language ``code``; for a target language, the forced first generated token.

        Raises:
            InputError: If ``code`` is not one of `language_codes` (the message suggests close ones).
        """
        ...

    def encode_source(self, text: str, *, src_lang: str) -> list[int]:
        """Encoder input ids of ``text`` in language ``src_lang``, language code and ``</s>`` included."""
        ...

    def encode_target(self, text: str, *, tgt_lang: str) -> list[int]:
        """Label ids of ``text`` in language ``tgt_lang`` (what a model is trained to generate)."""
        ...

    def target_prefix(self, tgt_lang: str) -> list[int]:
        """The ids a generation in ``tgt_lang`` starts with: the decoder start, then the language code."""
        ...


def unknown_language_error(code: str, known: tuple[str, ...], *, example: str) -> InputError:
    """The error for a language ``code`` outside ``known``, naming close matches and how to list all.

    ``example`` shows the code format of the model (``eng_Latn`` for NLLB), for when nothing is close.
    """
    folded = code.casefold()
    # A wrong case ("ENG_LATN") or a bare language ("zho" for zho_Hans / zho_Hant) are the likely slips.
    close = [c for c in known if c.casefold() == folded or c.casefold().split("_")[0] == folded]
    close = close or difflib.get_close_matches(code, known, n=3)
    hint = f"did you mean {' or '.join(repr(c) for c in close[:3])}? " if close else ""
    return InputError(
        f"unknown language code {code!r}; {hint}codes look like {example!r} and the tokenizer's "
        f"language_codes lists all {len(known)} it knows"
    )
