"""Turning requests into model inputs: encoder embeddings (with soft prompts) and decoder prefixes.

Shape legend: B rows, S encoder positions, P decoder-prefix positions, D model width.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.generation.params import GenerationRequest
from engine.model import DecoderState, Seq2SeqLM
from engine.prompts import assemble_encoder_embeds


def embed_requests(model: Seq2SeqLM, requests: Sequence[GenerationRequest]) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder input embeddings (B, S, D) and validity mask (B, S) of `requests`, right-padded.

    Each row is its own prefix | input | infix | pair | suffix sequence, so requests with
    different soft prompts (or none) share one batch and each gets exactly what it would alone.
    """
    rows = [assemble_encoder_embeds(model.embed, list(r.input_ids), list(r.pair_ids), r.prompt) for r in requests]
    width = max(row.shape[0] for row in rows)
    embeds_BSD = rows[0].new_zeros(len(rows), width, rows[0].shape[-1])
    valid_BS = torch.zeros(len(rows), width, dtype=torch.bool, device=embeds_BSD.device)
    for i, row in enumerate(rows):
        embeds_BSD[i, : row.shape[0]] = row
        valid_BS[i, : row.shape[0]] = True
    return embeds_BSD, valid_BS


def encode_requests(model: Seq2SeqLM, requests: Sequence[GenerationRequest]) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder outputs (B, S, D) and validity mask (B, S) of `requests` (see `embed_requests`)."""
    embeds_BSD, valid_BS = embed_requests(model, requests)
    return model.encode(embeds_BSD, valid_BS), valid_BS


def feed_decoder_prefixes(model: Seq2SeqLM, state: DecoderState, prefixes: Sequence[torch.Tensor]) -> None:
    """Run each row's decoder prefix (all of equal length P) through the decoder cache.

    The prefix positions come before the decoder start token, as TGIS places enc-dec decoder
    prompts; no token is chosen from them.
    """
    weight = model.embed.weight
    embeds_BPD = torch.stack([p.to(device=weight.device, dtype=weight.dtype) for p in prefixes])
    model.decode(embeds_BPD, state)
