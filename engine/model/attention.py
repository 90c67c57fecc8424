"""Multi-head attention of T5 (unscaled scores) and of fairseq's Transformer (M2M-100, NLLB-200).

Shape legend: B batch rows, S encoder positions, T new decoder positions, K attended key positions,
H heads, Dh head width, D model width, X the width of a fused projection (q, k, v side by side).

T5 (and CPM-2, SEED.md) put the 1/sqrt(d_kv) scale into the initialisation instead of the scores,
so `scaled_dot_product_attention` is called with `scale=1.0`; M2M-100 scales the scores by
1/sqrt(d_kv) and has biases on every projection (HF `M2M100Attention`), which `scale` and `has_bias`
select. The relative position bias (where the model has one) and the padding/causal mask are one
additive float tensor, built once per stack and step and shared by every layer. Query/key/value
projections are fused (`qkv`, `kv`, biases alike) so a decode step reads each matrix in one GEMV, and
the layout matches CPM-2's fused `project` / `project_kv` weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.model.cache import DecoderState
from engine.model.linear import Linear


def _split_heads(x_BTX: torch.Tensor, num_heads: int) -> torch.Tensor:
    B, T, _ = x_BTX.shape
    return x_BTX.view(B, T, num_heads, -1).transpose(1, 2)  # (B, H, T, Dh)


def _merge_heads(x_BHTDh: torch.Tensor) -> torch.Tensor:
    B, _, T, _ = x_BHTDh.shape
    return x_BHTDh.transpose(1, 2).reshape(B, T, -1)  # (B, T, H*Dh)


class SelfAttention(nn.Module):
    """Self-attention of an encoder block, or causal self-attention of a decoder block."""

    def __init__(self, d_model: int, num_heads: int, d_kv: int, *, has_bias: bool = False, scale: float = 1.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.inner_dim = num_heads * d_kv
        self.scale = scale
        self.qkv = Linear(d_model, 3 * self.inner_dim, bias=has_bias)
        self.o = Linear(self.inner_dim, d_model, bias=has_bias)

    def forward(
        self,
        x_BTD: torch.Tensor,
        bias_BHTK: torch.Tensor,
        *,
        state: DecoderState | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        """Attend `x` to itself (and, with a decoder `state`, to the cached keys of earlier steps).

        `bias_BHTK` is the position bias plus mask for the K keys attended to (batch and head dims may
        be 1).
        With a `state`, this step's keys and values are written into the cache of `layer`.
        """
        q_BTX, k_BTX, v_BTX = self.qkv(x_BTD).chunk(3, dim=-1)
        q_BHTDh = _split_heads(q_BTX, self.num_heads)
        k_BHTDh = _split_heads(k_BTX, self.num_heads)
        v_BHTDh = _split_heads(v_BTX, self.num_heads)
        if state is not None:
            k_BHTDh, v_BHTDh = state.append_self_kv(layer, k_BHTDh, v_BHTDh)
        out_BHTDh = F.scaled_dot_product_attention(
            q_BHTDh, k_BHTDh, v_BHTDh, attn_mask=bias_BHTK.to(q_BHTDh.dtype), scale=self.scale
        )
        return self.o(_merge_heads(out_BHTDh))


class CrossAttention(nn.Module):
    """Decoder attention over the encoder output; its keys/values are computed once per request."""

    def __init__(self, d_model: int, num_heads: int, d_kv: int, *, has_bias: bool = False, scale: float = 1.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.inner_dim = num_heads * d_kv
        self.scale = scale
        self.q = Linear(d_model, self.inner_dim, bias=has_bias)
        self.kv = Linear(d_model, 2 * self.inner_dim, bias=has_bias)
        self.o = Linear(self.inner_dim, d_model, bias=has_bias)

    def project_kv(self, enc_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, H, S, Dh) of the encoder output, cached for the whole request."""
        k_BSX, v_BSX = self.kv(enc_BSD).chunk(2, dim=-1)
        # Contiguous copies: every later decode step reads these, so they should be dense.
        return (
            _split_heads(k_BSX, self.num_heads).contiguous(),
            _split_heads(v_BSX, self.num_heads).contiguous(),
        )

    def forward(
        self,
        x_BTD: torch.Tensor,
        k_BHSDh: torch.Tensor,
        v_BHSDh: torch.Tensor,
        mask_B11S: torch.Tensor,
    ) -> torch.Tensor:
        """Attend decoder states to encoder keys/values (`mask_B11S`: 0 for tokens, min for padding)."""
        q_BHTDh = _split_heads(self.q(x_BTD), self.num_heads)
        out_BHTDh = F.scaled_dot_product_attention(
            q_BHTDh, k_BHSDh, v_BHSDh, attn_mask=mask_B11S.to(q_BHTDh.dtype), scale=self.scale
        )
        return self.o(_merge_heads(out_BHTDh))
