"""Vocabulary growth: give a trained model a larger tokenizer without losing what its embeddings learned.

CPM-2 (SEED.md) started its bilingual model from the Chinese one, initialising the new tokens'
embeddings from existing pieces. Here, for an old and a new SentencePiece model:

* a piece both vocabularies hold (same string: pieces, bytes, specials, ``<extra_id_i>``) keeps the
  model's row for it, whatever its id in the new tokenizer;
* a new piece starts as the mean of the old rows of its segmentation under the old tokenizer,
  in the input embedding and in an untied output head alike.

The segmentation is the Viterbi path over the old model's pieces and scores, which is exactly
SentencePiece's own unigram segmentation (`encode` cannot segment a mid-word piece without the
word-start mark it adds); characters no old piece covers fall back to their UTF-8 byte pieces, or
to unk, as the old tokenizer would encode them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
import torch

from engine.errors import ConfigError
from engine.model.transformer import Seq2SeqLM

__all__ = ["VocabGrowthPlan", "find_sentencepiece_model", "grow_vocabulary", "plan_vocab_growth", "segment_piece"]

_SP_FILES = ("spiece.model", "tokenizer.model")
_UNK_PENALTY = 10.0  # SentencePiece scores an unknown character min_score - 10 (kUnkPenalty)


@dataclass(frozen=True)
class VocabGrowthPlan:
    """Where each id of the new tokenizer (pieces, then sentinels) takes its initial rows from."""

    sources: tuple[tuple[int, ...], ...]
    """Old ids whose rows are averaged into new id `i`: one id for a kept piece."""
    is_kept: tuple[bool, ...]
    """Whether new id `i` is a piece of the old vocabulary (its row is copied, not averaged)."""
    old_vocab_size: int
    """Ids of the old tokenizer (pieces + sentinels)."""

    @property
    def new_vocab_size(self) -> int:
        """Ids of the new tokenizer (pieces + sentinels)."""
        return len(self.sources)

    @property
    def num_new(self) -> int:
        """Pieces the old vocabulary lacks."""
        return self.is_kept.count(False)

    def new_to_old(self) -> torch.Tensor:
        """For each new id, the old id of the same piece, or −1 for a new piece (a KI vocab map)."""
        return torch.tensor([src[0] if kept else -1 for src, kept in zip(self.sources, self.is_kept, strict=True)])


def find_sentencepiece_model(model_dir: Path) -> Path:
    """The SentencePiece file of a model or tokenizer directory.

    Raises:
        ConfigError: If the directory holds none (CPM-2's WordPiece `vocab.txt` cannot grow this way).
    """
    for name in _SP_FILES:
        if (model_dir / name).is_file():
            return model_dir / name
    raise ConfigError(
        f"{model_dir} holds no SentencePiece model ({', '.join(_SP_FILES)}); vocabulary growth needs one "
        "for the old and the new tokenizer"
    )


def _normal_pieces(sp: spm.SentencePieceProcessor) -> dict[str, tuple[int, float]]:
    special = (sp.is_control, sp.is_unknown, sp.is_byte, sp.is_unused)
    return {
        str(sp.id_to_piece(i)): (i, float(sp.get_score(i)))
        for i in range(sp.get_piece_size())
        if not any(check(i) for check in special)
    }


def segment_piece(piece: str, sp: spm.SentencePieceProcessor) -> list[int]:
    """Old ids of `piece` (a new piece's string, "▁" marking a word start) under the model `sp`."""
    pieces = _normal_pieces(sp)
    return _viterbi(piece, pieces, sp)


def _viterbi(text: str, pieces: dict[str, tuple[int, float]], sp: spm.SentencePieceProcessor) -> list[int]:
    longest = max(map(len, pieces))
    unk_score = min(score for _, score in pieces.values()) - _UNK_PENALTY
    best: list[tuple[float, int, list[int]]] = [(0.0, 0, [])]  # per prefix length: (score, start, ids)
    for end in range(1, len(text) + 1):
        char = text[end - 1]
        candidates = [
            (best[start][0] + pieces[text[start:end]][1], start, [pieces[text[start:end]][0]])
            for start in range(max(0, end - longest), end)
            if text[start:end] in pieces
        ]
        if char not in pieces:
            # An uncovered character becomes its UTF-8 byte pieces (byte fallback), or unk.
            byte_ids = [sp.piece_to_id(f"<0x{b:02X}>") for b in char.encode("utf-8")]
            has_bytes = all(sp.is_byte(i) for i in byte_ids)
            candidates.append((best[end - 1][0] + unk_score, end - 1, byte_ids if has_bytes else [sp.unk_id()]))
        best.append(max(candidates, key=lambda c: c[0]))
    ids: list[int] = []
    end = len(text)
    while end > 0:
        _, start, step_ids = best[end]
        ids[:0] = step_ids
        end = start
    return ids


def plan_vocab_growth(old_model: Path, new_model: Path, *, num_sentinels: int = 100) -> VocabGrowthPlan:
    """Plan rows for the tokenizer `new_model` from a model trained with `old_model` (both `.model` files,
    each followed by `num_sentinels` T5 sentinels, as `SentencePieceTokenizer` lays them out)."""
    old = spm.SentencePieceProcessor(model_file=str(old_model))
    new = spm.SentencePieceProcessor(model_file=str(new_model))
    num_old, num_new = old.get_piece_size(), new.get_piece_size()
    old_ids = {str(old.id_to_piece(i)): i for i in range(num_old)}
    old_pieces = _normal_pieces(old)
    sources: list[tuple[int, ...]] = []
    kept: list[bool] = []
    for i in range(num_new):
        piece = str(new.id_to_piece(i))
        if piece in old_ids:
            sources.append((old_ids[piece],))
            kept.append(True)
        elif new.is_byte(i) or new.is_control(i) or new.is_unknown(i) or new.is_unused(i):
            sources.append((old.unk_id(),))  # a special the old model lacks: nothing to average
            kept.append(False)
        else:
            sources.append(tuple(_viterbi(piece, old_pieces, old)))
            kept.append(False)
    # Sentinels count down from each vocabulary's end, so the k-th id after the pieces is the same
    # sentinel in both tokenizers.
    for k in range(num_sentinels):
        sources.append((num_old + k,))
        kept.append(True)
    return VocabGrowthPlan(sources=tuple(sources), is_kept=tuple(kept), old_vocab_size=num_old + num_sentinels)


def _grow_rows(old_VD: torch.Tensor, plan: VocabGrowthPlan, num_rows: int) -> torch.Tensor:
    new_VD = old_VD.new_zeros(num_rows, old_VD.shape[1])  # padding rows beyond the tokenizer stay zero
    for new_id, source in enumerate(plan.sources):
        new_VD[new_id] = old_VD[list(source)].mean(0)
    return new_VD


def grow_vocabulary(model: Seq2SeqLM, plan: VocabGrowthPlan, *, pad_to_multiple: int = 128) -> Seq2SeqLM:
    """A copy of `model` whose embedding (and untied head) cover the plan's new tokenizer.

    The new vocabulary size is the tokenizer's rounded up to `pad_to_multiple` (the presets' layout);
    rows past the tokenizer are zero. Every other tensor is shared with `model`.

    Raises:
        ConfigError: If `model` has fewer rows than the old tokenizer has ids.
    """
    if model.config.vocab_size < plan.old_vocab_size:
        raise ConfigError(
            f"the model has {model.config.vocab_size} vocabulary rows but the old tokenizer has "
            f"{plan.old_vocab_size} ids; grow from the tokenizer the model was trained with"
        )
    num_rows = -(-plan.new_vocab_size // pad_to_multiple) * pad_to_multiple
    state = dict(model.state_dict())
    with torch.no_grad():
        for key in ("embed.weight", "lm_head.weight"):
            if key in state:
                state[key] = _grow_rows(state[key], plan, num_rows)
    with torch.device("meta"):
        grown = Seq2SeqLM(model.config.replace(vocab_size=num_rows))
    grown.load_state_dict(state, assign=True)
    return grown.train(model.training)
