"""Source and target languages of a generation, for translation models (NLLB-200, M2M-100).

The source language is a code token in the encoder input (where depends on the tokenizer's mode,
`engine.tokenizer.nllb`); the target language is forced as the first generated token, right after
the decoder start, as HF's `generate(forced_bos_token_id=...)` does. The CLI and the server resolve
languages here, so both refuse the same things with the same words.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from engine.errors import ConfigError, InputError
from engine.generation import SamplingParams
from engine.tokenizer import Tokenizer, TranslationTokenizer


@dataclass(frozen=True, kw_only=True)
class Languages:
    """The languages a request names (either may be absent)."""

    src_lang: str | None = None
    """Language code of the input text, e.g. `eng_Latn`."""
    tgt_lang: str | None = None
    """Language code to translate into, e.g. `fra_Latn`."""

    @property
    def is_set(self) -> bool:
        return self.src_lang is not None or self.tgt_lang is not None


def translation_tokenizer(tokenizer: Tokenizer | None, *, model: str) -> TranslationTokenizer:
    """`tokenizer` as one with language codes, or a `ConfigError` saying the model has none."""
    if isinstance(tokenizer, TranslationTokenizer):
        return tokenizer
    kind = "no tokenizer" if tokenizer is None else f"a {type(tokenizer).__name__} without language codes"
    raise ConfigError(
        f"{model} has {kind}: source and target languages are for translation models (NLLB-200, "
        "M2M-100) whose tokenizer has language codes; leave the languages out for this model"
    )


def encode_source(tokenizer: TranslationTokenizer, text: str, languages: Languages) -> list[int]:
    """Encoder input ids of `text`: with its language code when `src_lang` is set."""
    if languages.src_lang is None:
        return tokenizer.encode(text)
    return tokenizer.encode_source(text, src_lang=languages.src_lang)


def force_target(params: SamplingParams, tokenizer: TranslationTokenizer, languages: Languages) -> SamplingParams:
    """`params` with the target language forced as the first generated token (when `tgt_lang` is set)."""
    if languages.tgt_lang is None:
        return params
    if params.forced_tokens:
        raise InputError("a target language and forced tokens cannot both be given; keep one")
    return replace(params, forced_tokens=(tokenizer.lang_id(languages.tgt_lang),))
