"""Token embeddings, optionally scaled by sqrt(d_model) on the way in (fairseq's `embed_scale`; HF
`M2M100ScaledWordEmbedding`). T5 does not scale; a tied output head always reads the unscaled matrix.

The scale lives in the embedding itself, so everything that embeds tokens through the model (the
encoder and decoder inputs, soft prompts built from token embeddings) sees the same vectors.
"""

from __future__ import annotations

import torch
from torch import nn


class TokenEmbedding(nn.Embedding):
    """`nn.Embedding` whose lookups are multiplied by `scale` (a no-op at 1)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, scale: float = 1.0) -> None:
        super().__init__(num_embeddings, embedding_dim)
        self.scale = scale

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        embeds = super().forward(input)
        return embeds if self.scale == 1.0 else embeds * self.scale
