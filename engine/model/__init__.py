"""Model math: plain single-device PyTorch for T5-style encoder-decoder (MoE) models.

Nothing here knows where weights live or how requests are scheduled: MoE layers ask an
`ExpertProvider` for expert weights, and the caller owns the decoder cache (`DecoderState`).
"""

from engine.model.cache import DecoderState
from engine.model.ffn import ExpertWeights
from engine.model.moe import ExpertProvider, MoELayerKey, ResidentExpertProvider
from engine.model.transformer import EncoderPass, Seq2SeqLM

__all__ = [
    "DecoderState",
    "EncoderPass",
    "ExpertProvider",
    "ExpertWeights",
    "MoELayerKey",
    "ResidentExpertProvider",
    "Seq2SeqLM",
]
