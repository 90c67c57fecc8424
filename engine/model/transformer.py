"""Pre-norm encoder-decoder with optional MoE feed-forward layers (CPM-2, T5, mT5, Switch, M2M-100,
NLLB-200).

Shape legend: B batch rows, S encoder positions, T decoder positions of this call, K attended
decoder key positions, H heads, D model width, V vocabulary.

Follows the T5 reference (Raffel et al. 2020) as HF transformers implements it, and CPM-2
(SEED.md): pre-norm sublayers with residuals, relative position bias owned by the first block of
each stack, a final norm per stack, one embedding shared by encoder and decoder, and an output head
that is either the tied embedding (scaled by d_model^-0.5) or a separate matrix. fairseq's
pre-norm Transformer (M2M-100, NLLB-200; HF `modeling_m2m_100.py`) is the same computation with the
config's other switches: LayerNorm with bias, biased projections, scores scaled by 1/sqrt(d_kv),
embeddings scaled by sqrt(d_model), and sinusoidal positions added to each stack's input instead of a
relative bias. Dropout and LayerDrop act only in training (LayerDrop is not implemented).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig
from engine.model.attention import CrossAttention, SelfAttention
from engine.model.cache import DecoderState
from engine.model.embedding import TokenEmbedding
from engine.model.ffn import FeedForward
from engine.model.linear import Linear, linear
from engine.model.moe import MoEFeedForward, MoELayerKey
from engine.model.norm import build_norm
from engine.model.position import RelativePositionBias, SinusoidalPositions, absolute_positions

AttentionT = TypeVar("AttentionT", SelfAttention, CrossAttention)


def _additive_mask(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where `valid`, the dtype's most negative value elsewhere (finite, so softmax stays defined)."""
    return torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill(~valid, torch.finfo(dtype).min)


def build_mlp(config: ModelConfig, key: MoELayerKey) -> FeedForward | MoEFeedForward:
    """The feed-forward network of one block: dense, or MoE where the config places one."""
    if config.moe is not None and key.block in config.moe_layers(key.stack):
        return MoEFeedForward(
            key,
            config.moe,
            d_model=config.d_model,
            d_ff=config.d_ff,
            activation=config.activation,
            is_gated=config.is_gated_ffn,
            has_bias=config.has_ffn_bias,
        )
    return FeedForward(
        config.d_model,
        config.d_ff,
        activation=config.activation,
        is_gated=config.is_gated_ffn,
        has_bias=config.has_ffn_bias,
    )


def build_attention(config: ModelConfig, kind: type[AttentionT]) -> AttentionT:
    """Self- or cross-attention of a block, with the config's projection biases and score scale."""
    scale = config.d_kv**-0.5 if config.scale_attention_scores else 1.0
    return kind(config.d_model, config.num_heads, config.d_kv, has_bias=config.has_attention_bias, scale=scale)


def _run_mlp(mlp: FeedForward | MoEFeedForward, h: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    return mlp(h, valid) if isinstance(mlp, MoEFeedForward) else mlp(h)


class EncoderBlock(nn.Module):
    def __init__(self, config: ModelConfig, index: int) -> None:
        super().__init__()
        self.attn_norm = build_norm(config)
        self.attn = build_attention(config, SelfAttention)
        # The pre-norm is shared by all experts of an MoE layer (SEED.md), so it lives here.
        self.ff_norm = build_norm(config)
        self.mlp = build_mlp(config, MoELayerKey("encoder", index))
        self.dropout = config.dropout_rate

    def forward(self, x_BSD: torch.Tensor, bias_BHSS: torch.Tensor, valid_BS: torch.Tensor) -> torch.Tensor:
        x_BSD = x_BSD + F.dropout(self.attn(self.attn_norm(x_BSD), bias_BHSS), self.dropout, self.training)
        mlp = _run_mlp(self.mlp, self.ff_norm(x_BSD), valid_BS)
        return x_BSD + F.dropout(mlp, self.dropout, self.training)


class DecoderBlock(nn.Module):
    def __init__(self, config: ModelConfig, index: int) -> None:
        super().__init__()
        self.index = index
        self.attn_norm = build_norm(config)
        self.attn = build_attention(config, SelfAttention)
        self.cross_norm = build_norm(config)
        self.cross = build_attention(config, CrossAttention)
        self.ff_norm = build_norm(config)
        self.mlp = build_mlp(config, MoELayerKey("decoder", index))
        self.dropout = config.dropout_rate

    def forward(
        self, x_BTD: torch.Tensor, bias_BHTK: torch.Tensor, state: DecoderState, valid_BT: torch.Tensor | None
    ) -> torch.Tensor:
        attn = self.attn(self.attn_norm(x_BTD), bias_BHTK, state=state, layer=self.index)
        x_BTD = x_BTD + F.dropout(attn, self.dropout, self.training)
        cross = self.cross(
            self.cross_norm(x_BTD), state.cross_k[self.index], state.cross_v[self.index], state.cross_mask
        )
        x_BTD = x_BTD + F.dropout(cross, self.dropout, self.training)
        mlp = _run_mlp(self.mlp, self.ff_norm(x_BTD), valid_BT)
        return x_BTD + F.dropout(mlp, self.dropout, self.training)


class _Stack(nn.Module):
    """What the encoder and decoder share: positions (a relative-bias table owned by the stack, or
    sinusoids added to the input), blocks, a final norm."""

    def __init__(self, config: ModelConfig, blocks: list[nn.Module], *, bidirectional: bool) -> None:
        super().__init__()
        self.relative_bias: RelativePositionBias | None = None
        self.positions: SinusoidalPositions | None = None
        if config.position_embedding == "relative":
            self.relative_bias = RelativePositionBias(
                config.num_heads,
                num_buckets=config.relative_attention_num_buckets,
                max_distance=config.relative_attention_max_distance,
                bidirectional=bidirectional,
            )
        else:
            self.positions = SinusoidalPositions(config.d_model, padding_idx=config.pad_token_id)
        self.blocks = nn.ModuleList(blocks)
        self.final_norm = build_norm(config)
        self.dropout = config.dropout_rate
        # The block of the stack's first MoE layer (an index: a second reference to the block would
        # register it twice as a submodule).
        self.first_moe = next((i for i, b in enumerate(blocks) if isinstance(b.mlp, MoEFeedForward)), None)

    def anticipate_experts(self, x_BTD: torch.Tensor, valid_BT: torch.Tensor | None) -> None:
        """Hand the stack's input `x_BTD` to its first MoE layer's provider, if that provider guesses
        experts ahead (`AnticipatingProvider`): nothing before that layer foretells its routes."""
        if self.first_moe is None or self.training:
            return
        block = self.blocks[self.first_moe]
        assert isinstance(block, EncoderBlock | DecoderBlock)
        assert isinstance(block.mlp, MoEFeedForward)
        block.mlp.anticipate(x_BTD, valid_BT, norm=block.ff_norm)

    def add_positions(
        self, x_BTD: torch.Tensor, valid_BT: torch.Tensor | None, start_B1: torch.Tensor, *, longest: int
    ) -> torch.Tensor:
        """`x` plus sinusoidal position vectors (unchanged with a relative bias); the T positions of a
        row follow `start_B1` earlier ones, and no row is longer than `longest` after them."""
        if self.positions is None:
            return x_BTD
        ids_BT = absolute_positions(valid_BT, start_B1, x_BTD.shape[1], padding_idx=self.positions.padding_idx)
        vectors_BTD = self.positions(ids_BT, limit=self.positions.padding_idx + longest + 1)
        return x_BTD + vectors_BTD.to(x_BTD.dtype)


@dataclass
class EncoderPass:
    """An encoder pass in progress: the states after `blocks_done` blocks (`Encoder.advance`):
    `hidden` (B, S, D), the attention bias `bias` (B, H or 1, S, S), `valid` (B, S) False on padding.

    A server runs a newcomer's encoder a few blocks between two decode steps, so that a long or
    large admission delays the running rows by a bounded slice each step instead of one whole pass.
    """

    hidden: torch.Tensor
    bias: torch.Tensor
    valid: torch.Tensor
    blocks_done: int = 0


class Encoder(_Stack):
    def __init__(self, config: ModelConfig) -> None:
        blocks: list[nn.Module] = [EncoderBlock(config, i) for i in range(config.num_encoder_layers)]
        super().__init__(config, blocks, bidirectional=True)

    def forward(self, x_BSD: torch.Tensor, valid_BS: torch.Tensor) -> torch.Tensor:
        state = self.begin(x_BSD, valid_BS)
        self.advance(state, len(self.blocks))
        return self.finish(state)

    def begin(self, x_BSD: torch.Tensor, valid_BS: torch.Tensor) -> EncoderPass:
        """A pass over input embeddings `x_BSD` (`valid_BS` False on padding), no block run yet."""
        S = x_BSD.shape[1]
        if self.relative_bias is not None:
            positions = torch.arange(S, device=x_BSD.device)
            bias_1HSS = self.relative_bias(positions, positions).unsqueeze(0)
            bias_BHSS = bias_1HSS + _additive_mask(valid_BS, bias_1HSS.dtype)[:, None, None, :]
        else:
            bias_BHSS = _additive_mask(valid_BS, x_BSD.dtype)[:, None, None, :]  # (B, 1, 1, S)
        start_11 = torch.zeros(1, 1, dtype=torch.long, device=x_BSD.device)
        x_BSD = self.add_positions(x_BSD, valid_BS, start_11, longest=S)
        x_BSD = F.dropout(x_BSD, self.dropout, self.training)
        self.anticipate_experts(x_BSD, valid_BS)
        return EncoderPass(x_BSD, bias_BHSS, valid_BS)

    def advance(self, state: EncoderPass, blocks: int) -> bool:
        """Run up to `blocks` more blocks of `state`; True once every block has run."""
        stop = min(len(self.blocks), state.blocks_done + blocks)
        for block in self.blocks[state.blocks_done : stop]:
            state.hidden = block(state.hidden, state.bias, state.valid)
        state.blocks_done = stop
        return stop == len(self.blocks)

    def finish(self, state: EncoderPass) -> torch.Tensor:
        """The encoder output (B, S, D) of a pass whose blocks have all run."""
        if state.blocks_done != len(self.blocks):
            raise ValueError(f"the encoder pass has run {state.blocks_done} of {len(self.blocks)} blocks")
        return F.dropout(self.final_norm(state.hidden), self.dropout, self.training)


class Decoder(_Stack):
    def __init__(self, config: ModelConfig) -> None:
        blocks: list[nn.Module] = [DecoderBlock(config, i) for i in range(config.num_decoder_layers)]
        super().__init__(config, blocks, bidirectional=False)

    def layers(self) -> list[DecoderBlock]:
        """The blocks, typed."""
        return [block for block in self.blocks if isinstance(block, DecoderBlock)]

    def forward(self, x_BTD: torch.Tensor, state: DecoderState, valid_BT: torch.Tensor | None) -> torch.Tensor:
        T = x_BTD.shape[1]
        state.reserve(T)
        query_pos = state.query_positions(T)  # (1 or B, T): cache slots, which count every position
        K = state.key_length(T)
        key_pos = torch.arange(K, device=x_BTD.device)
        # Causal: a query sees keys at or before its own position (which also hides the unwritten
        # tail of shorter rows in a ragged batch).
        causal_BTK = key_pos <= query_pos.unsqueeze(-1)
        if self.relative_bias is not None:
            bias_BHTK = self.relative_bias(query_pos, key_pos)
            bias_BHTK = bias_BHTK + _additive_mask(causal_BTK, bias_BHTK.dtype).unsqueeze(1)
        else:
            bias_BHTK = _additive_mask(causal_BTK, x_BTD.dtype).unsqueeze(1)  # (1 or B, 1, T, K)
        # A row's cache length is HF's past length for it; this call's positions continue from there.
        x_BTD = self.add_positions(x_BTD, valid_BT, query_pos[:, :1], longest=K)
        x_BTD = F.dropout(x_BTD, self.dropout, self.training)
        self.anticipate_experts(x_BTD, valid_BT)
        for block in self.blocks:
            x_BTD = block(x_BTD, bias_BHTK, state, valid_BT)
        state.advance(T)
        return F.dropout(self.final_norm(x_BTD), self.dropout, self.training)


class Seq2SeqLM(nn.Module):
    """The full model. Inference goes `embed` → `encode` → `start_decoding` → `decode`* → `logits`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0
        self.embed = TokenEmbedding(config.vocab_size, config.d_model, scale=scale)
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.lm_head = None if config.tie_word_embeddings else Linear(config.d_model, config.vocab_size)

    def moe_layers(self) -> list[MoEFeedForward]:
        """Every MoE layer, encoder first, in block order."""
        return [m for m in self.modules() if isinstance(m, MoEFeedForward)]

    def encode(self, embeds_BSD: torch.Tensor, valid_BS: torch.Tensor) -> torch.Tensor:
        """Encoder output (B, S, D) for input embeddings; `valid_BS` is False on padding."""
        return self.encoder(embeds_BSD, valid_BS)

    def start_decoding(self, enc_BSD: torch.Tensor, valid_BS: torch.Tensor, *, capacity: int) -> DecoderState:
        """Decoder state for these encoder outputs: cross-attention K/V computed once, empty cache."""
        cross = [block.cross.project_kv(enc_BSD) for block in self.decoder.layers()]
        return DecoderState.allocate(
            cross_k=[k for k, _ in cross],
            cross_v=[v for _, v in cross],
            cross_mask=_additive_mask(valid_BS, enc_BSD.dtype)[:, None, None, :],
            capacity=capacity,
        )

    def decode(
        self, embeds_BTD: torch.Tensor, state: DecoderState, valid_BT: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run T new decoder positions per row, appending them to `state`; returns (B, T, D) states."""
        return self.decoder(embeds_BTD, state, valid_BT)

    def logits(self, hidden_BTD: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits (B, T, V) for final decoder states."""
        if self.config.scale_decoder_output:
            hidden_BTD = hidden_BTD * (self.config.d_model**-0.5)
        weight = self.embed.weight if self.lm_head is None else self.lm_head.matrix
        return linear(hidden_BTD, weight)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        decoder_input_ids: torch.Tensor,
        decoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Teacher-forced logits (B, T, V): the whole decoder sequence in one pass (training, tests)."""
        valid_BS = attention_mask.bool()
        enc_BSD = self.encode(self.embed(input_ids), valid_BS)
        state = self.start_decoding(enc_BSD, valid_BS, capacity=decoder_input_ids.shape[1])
        valid_BT = None if decoder_attention_mask is None else decoder_attention_mask.bool()
        return self.logits(self.decode(self.embed(decoder_input_ids), state, valid_BT))
