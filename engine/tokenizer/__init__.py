"""Tokenizers for T5-family models, CPM-2 and NLLB, and `load_tokenizer` to find the one in a model directory."""

from collections.abc import Callable
from pathlib import Path

from engine.errors import CheckpointError
from engine.tokenizer.base import (
    DecoderStartTokenizer,
    IncrementalDecoder,
    Tokenizer,
    decoder_start_id,
    longest_token_chars,
)
from engine.tokenizer.corpus import builtin_corpus
from engine.tokenizer.cpm2 import CPM2Tokenizer, MissingDependencyError
from engine.tokenizer.nllb import NLLBTokenizer, load_nllb_dir
from engine.tokenizer.sentencepiece import SentencePieceTokenizer
from engine.tokenizer.train import train_sentencepiece
from engine.tokenizer.translation import TranslationTokenizer

__all__ = [
    "CPM2Tokenizer",
    "DecoderStartTokenizer",
    "IncrementalDecoder",
    "MissingDependencyError",
    "NLLBTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "TranslationTokenizer",
    "builtin_corpus",
    "check_special_ids",
    "decoder_start_id",
    "load_tokenizer",
    "longest_token_chars",
    "train_sentencepiece",
]


def _load_sentencepiece(path: Path, num_extra_ids: int) -> Tokenizer:
    return SentencePieceTokenizer(path, num_extra_ids=num_extra_ids)


def _load_cpm2(path: Path, num_extra_ids: int) -> Tokenizer:
    # num_extra_ids counts T5's appended <extra_id_i>; CPM-2's sentinels are lines of vocab.txt.
    return CPM2Tokenizer(path)


def _load_nllb(path: Path, num_extra_ids: int) -> Tokenizer:
    # NLLB has no sentinels; its language codes and their ids come from the directory's configs.
    return load_nllb_dir(path.parent)


# Checked in order; the first file present wins. T5/mT5/Switch checkpoints ship `spiece.model`,
# Llama-style exports `tokenizer.model`, CPM-2 checkpoints a jieba + WordPiece `vocab.txt`, NLLB
# hub directories a fairseq-layout `sentencepiece.bpe.model` beside tokenizer_config.json.
_TOKENIZER_FILES: tuple[tuple[str, Callable[[Path, int], Tokenizer]], ...] = (
    ("spiece.model", _load_sentencepiece),
    ("tokenizer.model", _load_sentencepiece),
    ("vocab.txt", _load_cpm2),
    ("sentencepiece.bpe.model", _load_nllb),
)


def load_tokenizer(model_dir: Path, *, num_extra_ids: int = 100) -> Tokenizer:
    """Load the tokenizer stored in ``model_dir``.

    Args:
        model_dir: A model directory holding ``spiece.model``, ``tokenizer.model``, (CPM-2)
            ``vocab.txt`` or (NLLB) ``sentencepiece.bpe.model`` with the hub's tokenizer configs.
            For NLLB the result is a `TranslationTokenizer`.
        num_extra_ids: Number of ``<extra_id_i>`` sentinels the model was trained with (T5: 100).
            Not used for ``vocab.txt``, whose sentinels ``<s_i>`` are lines of the file, nor for
            NLLB, which has none.

    Raises:
        CheckpointError: If the directory does not exist, holds none of the files, or the file
            found is corrupt (the message names it).
        UnsupportedModelError: If ``sentencepiece.bpe.model``'s configs name a tokenizer other
            than NLLB's (mBART, XLM-R, ...).
        MissingDependencyError: If the directory holds a CPM-2 ``vocab.txt`` and jieba is missing.
    """
    if not model_dir.is_dir():
        raise CheckpointError(f"model directory {model_dir} does not exist or is not a directory")
    for file_name, load in _TOKENIZER_FILES:
        path = model_dir / file_name
        if path.is_file():
            return load(path, num_extra_ids)
    looked_for = ", ".join(name for name, _ in _TOKENIZER_FILES)
    raise CheckpointError(
        f"no tokenizer in {model_dir}: looked for {looked_for}; copy the tokenizer file of the "
        "checkpoint there (or train one with engine.tokenizer.train_sentencepiece)"
    )


def check_special_ids(tokenizer: Tokenizer, *, eos: int, decoder_start: int, source: object) -> None:
    """Fail at load, not mid-request, when a model's config and its tokenizer disagree on the ids
    generation starts and stops with (a CPM-2 model starts from `<s>` and ends at `<eod>`)."""
    found = {"eos_token_id": tokenizer.eos_id, "decoder_start_token_id": decoder_start_id(tokenizer)}
    expected = {"eos_token_id": eos, "decoder_start_token_id": decoder_start}
    wrong = [f"{k}={expected[k]} but the tokenizer's is {found[k]}" for k in found if found[k] != expected[k]]
    if wrong:
        raise CheckpointError(
            f"{source}: config.json and the tokenizer disagree: {'; '.join(wrong)}. "
            "Fix config.json (or convert the model again with its own tokenizer files)."
        )
