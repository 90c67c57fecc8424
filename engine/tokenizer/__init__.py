"""Tokenizers for T5-family models, and `load_tokenizer` to find the one in a model directory."""

from collections.abc import Callable
from pathlib import Path

from engine.errors import CheckpointError
from engine.tokenizer.base import IncrementalDecoder, Tokenizer
from engine.tokenizer.corpus import builtin_corpus
from engine.tokenizer.sentencepiece import SentencePieceTokenizer
from engine.tokenizer.train import train_sentencepiece

__all__ = [
    "IncrementalDecoder",
    "SentencePieceTokenizer",
    "Tokenizer",
    "builtin_corpus",
    "load_tokenizer",
    "train_sentencepiece",
]


def _load_sentencepiece(path: Path, num_extra_ids: int) -> Tokenizer:
    return SentencePieceTokenizer(path, num_extra_ids=num_extra_ids)


# Checked in order; the first file present wins. T5/mT5/Switch checkpoints ship `spiece.model`,
# Llama-style exports `tokenizer.model`. CPM-2's WordPiece `vocab.txt` becomes one more row here.
_TOKENIZER_FILES: tuple[tuple[str, Callable[[Path, int], Tokenizer]], ...] = (
    ("spiece.model", _load_sentencepiece),
    ("tokenizer.model", _load_sentencepiece),
)


def load_tokenizer(model_dir: Path, *, num_extra_ids: int = 100) -> Tokenizer:
    """Load the tokenizer stored in ``model_dir``.

    Args:
        model_dir: A model directory holding ``spiece.model`` or ``tokenizer.model``.
        num_extra_ids: Number of ``<extra_id_i>`` sentinels the model was trained with (T5: 100).

    Raises:
        CheckpointError: If the directory does not exist, holds none of the files, or the file
            found is corrupt (the message names it).
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
