"""Vocabulary growth between two SentencePiece models trained here on the built-in corpus: kept pieces
keep their rows, new pieces start from the mean of their old segmentation (SentencePiece's own)."""

from __future__ import annotations

from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from engine.config import ModelConfig
from engine.errors import ConfigError
from engine.model import Seq2SeqLM
from engine.tokenizer import SentencePieceTokenizer, builtin_corpus, train_sentencepiece
from training.vocab_growth import VocabGrowthPlan, find_sentencepiece_model, grow_vocabulary, plan_vocab_growth

OLD_PIECES, NEW_PIECES, SENTINELS = 800, 1200, 100


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("spm")
    old = train_sentencepiece(builtin_corpus(), root / "old" / "spiece.model", vocab_size=OLD_PIECES)
    new = train_sentencepiece(builtin_corpus(), root / "new" / "spiece.model", vocab_size=NEW_PIECES)
    return old, new


@pytest.fixture(scope="module")
def plan(models: tuple[Path, Path]) -> VocabGrowthPlan:
    return plan_vocab_growth(*models, num_sentinels=SENTINELS)


def _tiny(vocab_size: int, *, tied: bool = False) -> Seq2SeqLM:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=vocab_size,
        d_model=16,
        num_heads=2,
        d_kv=8,
        d_ff=32,
        num_encoder_layers=1,
        num_decoder_layers=1,
        tie_word_embeddings=tied,
    )
    model = Seq2SeqLM(config)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return model


def test_plan_keeps_shared_pieces_and_sentinels(models: tuple[Path, Path], plan: VocabGrowthPlan) -> None:
    old = SentencePieceTokenizer(models[0], num_extra_ids=SENTINELS)
    new = SentencePieceTokenizer(models[1], num_extra_ids=SENTINELS)
    assert plan.new_vocab_size == new.vocab_size
    assert plan.old_vocab_size == old.vocab_size
    assert 0 < plan.num_new < NEW_PIECES
    for new_id, (source, kept) in enumerate(zip(plan.sources, plan.is_kept, strict=True)):
        if kept:
            assert len(source) == 1
            assert old.id_to_piece(source[0]) == new.id_to_piece(new_id)
    # pad / eos / unk, the byte pieces and every sentinel are kept.
    assert plan.sources[:3] == ((0,), (1,), (2,))
    for i in (0, 7, SENTINELS - 1):
        assert plan.sources[new.sentinel_id(i)] == (old.sentinel_id(i),)
    assert plan.new_to_old()[new.sentinel_id(5)] == old.sentinel_id(5)


def test_new_word_start_pieces_are_segmented_as_the_old_tokenizer_encodes_them(
    models: tuple[Path, Path], plan: VocabGrowthPlan
) -> None:
    old = spm.SentencePieceProcessor(model_file=str(models[0]))
    new = spm.SentencePieceProcessor(model_file=str(models[1]))
    checked = 0
    for new_id in range(NEW_PIECES):
        piece = new.id_to_piece(new_id)
        if plan.is_kept[new_id] or not piece.startswith("▁") or len(piece) < 2:
            continue
        # SentencePiece adds the word-start mark itself, so encoding the bare word segments "▁word".
        assert list(plan.sources[new_id]) == old.encode(piece[1:]), piece
        checked += 1
    assert checked > 50
    # Mid-word pieces (no "▁") cannot go through `encode`; their sources spell the piece exactly.
    for new_id in range(NEW_PIECES):
        piece = new.id_to_piece(new_id)
        if not plan.is_kept[new_id] and not new.is_byte(new_id) and "▁" not in piece:
            assert "".join(old.id_to_piece(i) for i in plan.sources[new_id]) == piece


def test_grown_rows_are_old_rows_or_means_of_the_segmentation(plan: VocabGrowthPlan) -> None:
    old = _tiny(1024)  # 900 ids used, padded
    grown = grow_vocabulary(old, plan)
    assert grown.config.vocab_size == 1408  # 1300 ids rounded up to a multiple of 128
    for key in ("embed.weight", "lm_head.weight"):
        old_VD, new_VD = old.state_dict()[key], grown.state_dict()[key]
        expected = torch.stack([old_VD[list(source)].mean(0) for source in plan.sources])
        torch.testing.assert_close(new_VD[: plan.new_vocab_size], expected)
        assert new_VD[plan.new_vocab_size :].abs().max() == 0  # padding rows
    untouched = {k: v for k, v in old.state_dict().items() if k not in ("embed.weight", "lm_head.weight")}
    for key, value in untouched.items():
        assert torch.equal(grown.state_dict()[key], value)


def test_grown_model_computes_the_same_function_on_kept_pieces(plan: VocabGrowthPlan) -> None:
    old = _tiny(1024, tied=True).eval()
    grown = grow_vocabulary(old, plan).eval()
    kept_new = [i for i, kept in enumerate(plan.is_kept) if kept]
    kept_old = [plan.sources[i][0] for i in kept_new]
    generator = torch.Generator().manual_seed(0)
    pick = torch.randint(len(kept_new), (2, 12), generator=generator)
    new_ids, old_ids = torch.tensor(kept_new)[pick], torch.tensor(kept_old)[pick]
    mask = torch.ones_like(new_ids)
    with torch.no_grad():
        new_logits = grown(new_ids, mask, new_ids[:, :5])[..., kept_new]
        old_logits = old(old_ids, mask, old_ids[:, :5])[..., kept_old]
    torch.testing.assert_close(new_logits, old_logits)


def test_growth_refuses_a_model_smaller_than_the_old_tokenizer(plan: VocabGrowthPlan, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="grow from the tokenizer the model was trained with"):
        grow_vocabulary(_tiny(512), plan)
    with pytest.raises(ConfigError, match="no SentencePiece model"):
        find_sentencepiece_model(tmp_path)
