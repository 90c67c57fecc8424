"""Train a SentencePiece model with T5's special ids, in process and reproducibly.

T5 (Raffel et al., 2020, https://github.com/google-research/text-to-text-transfer-transformer) and
mT5 use a SentencePiece model whose ids 0, 1, 2 are ``<pad>``, ``</s>``, ``<unk>`` and which has no
BOS; the 100 ``<extra_id_i>`` sentinels are appended by the tokenizer, not stored in the model.
"""

import io
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

from engine.errors import InputError
from engine.tokenizer.corpus import builtin_corpus

__all__ = ["builtin_corpus", "train_sentencepiece"]

_MODEL_TYPES = ("unigram", "bpe", "char", "word")


def train_sentencepiece(
    lines: Iterable[str],
    out_path: Path,
    *,
    vocab_size: int,
    model_type: str = "unigram",
    byte_fallback: bool = True,
    character_coverage: float = 1.0,
    normalization_rule_name: str = "identity",
    remove_extra_whitespaces: bool = False,
    split_digits: bool = False,
    user_defined_symbols: Sequence[str] = (),
) -> Path:
    """Train a SentencePiece model on ``lines`` and write it to ``out_path`` (e.g. ``spiece.model``).

    Args:
        lines: Training text, one sentence per item. Empty lines are skipped.
        out_path: Where to write the serialized model; parent directories are created.
        vocab_size: Number of SentencePiece pieces including ``<pad>``, ``</s>``, ``<unk>`` and, with
            ``byte_fallback``, the 256 byte pieces. Sentinels are not counted: the tokenizer adds them.
        model_type: ``unigram`` (T5, mT5), ``bpe``, ``char`` or ``word``.
        byte_fallback: Encode characters missing from the vocabulary as UTF-8 byte pieces instead
            of ``<unk>``, so any Unicode text survives ``decode(encode(text))``.
        character_coverage: Fraction of the corpus' characters that get their own piece. 1.0 keeps
            every character seen, which a small Chinese corpus needs.
        normalization_rule_name: ``identity`` keeps the text as written (lossless round trips);
            ``nmt_nfkc`` is what T5/mT5's released models use (NFKC folds e.g. full-width
            punctuation, so ``，`` decodes back as ``,``).
        remove_extra_whitespaces: Collapse whitespace runs and strip the ends before encoding, as
            T5's released models do (and as HF's T5 tokenizer always does). The default keeps
            whitespace so that code and formatted text round-trip.
        split_digits: Split numbers into single digits (helps arithmetic, costs sequence length).
        user_defined_symbols: Pieces always cut out as one token, never merged with neighbours (e.g.
            the Chinese numeral characters, so 九千九百 is four tokens a model can align with digits).

    Returns:
        ``out_path``. The same lines and arguments give a byte-for-byte identical file on any machine.

    Raises:
        InputError: If an argument is out of range, or SentencePiece rejects the corpus (for
            example a ``vocab_size`` smaller than the number of distinct characters).
    """
    if model_type not in _MODEL_TYPES:
        raise InputError(f"model_type must be one of {_MODEL_TYPES}, got {model_type!r}")
    if vocab_size <= 3:
        raise InputError(f"vocab_size must leave room beyond <pad>, </s>, <unk>; got {vocab_size}")
    if not 0.0 < character_coverage <= 1.0:
        raise InputError(f"character_coverage must be in (0, 1], got {character_coverage}")

    buffer = io.BytesIO()
    # Only sentence sampling draws random numbers (unused here: every line is kept); fix the seed
    # anyway so a future sampling option cannot make runs differ.
    spm.set_random_generator_seed(0)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=(line for line in lines if line),
            model_writer=buffer,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=byte_fallback,
            character_coverage=character_coverage,
            normalization_rule_name=normalization_rule_name,
            remove_extra_whitespaces=remove_extra_whitespaces,
            split_digits=split_digits,
            user_defined_symbols=list(user_defined_symbols),
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            pad_piece="<pad>",
            eos_piece="</s>",
            unk_piece="<unk>",
            # Unigram EM adds per-thread partial sums, so the model depends on the thread count;
            # one thread makes it the same on every machine (and the corpus is small).
            num_threads=1,
            # Lines longer than the default 4192 bytes would be silently dropped.
            max_sentence_length=1 << 16,
            minloglevel=2,
        )
    except RuntimeError as err:
        raise InputError(
            f"SentencePiece training failed ({err}); check vocab_size={vocab_size} against the corpus "
            "(it must exceed the number of distinct characters plus 256 byte pieces with byte_fallback)"
        ) from err
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(buffer.getvalue())
    return out_path
