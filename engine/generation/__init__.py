"""Generation: sampling parameters, batched decoding, beam search."""

from engine.generation.generator import DecodeBatch, Generator, Prefill, Sequence
from engine.generation.params import FinishReason, GenerationRequest, GenerationResult, SamplingParams

__all__ = [
    "DecodeBatch",
    "FinishReason",
    "GenerationRequest",
    "GenerationResult",
    "Generator",
    "Prefill",
    "SamplingParams",
    "Sequence",
]
