"""Generation: sampling parameters, batched decoding, beam search."""

from engine.generation.generator import DecodeBatch, Generator, Sequence
from engine.generation.params import FinishReason, GenerationRequest, GenerationResult, SamplingParams

__all__ = [
    "DecodeBatch",
    "FinishReason",
    "GenerationRequest",
    "GenerationResult",
    "Generator",
    "SamplingParams",
    "Sequence",
]
