"""Trainable soft prompts (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning";
CPM-2 §prompt tuning) and the batched forward pass that places them exactly as the server does.

The encoder input of an example is ``prefix | input | infix | text_pair </s> | suffix`` (one eos,
closing the last segment, as the server tokenizes pairs; ``prefix | input </s> | suffix`` without a
pair), the layout `engine.prompts.assemble_encoder_embeds` builds one request at a time. Here the
same layout is built for a padded batch with one gather, so gradients reach the prompt rows and a
prompt trained here gives the served model the same encoder input (tests/test_prompt_job.py checks
the logits against the engine's serving path).

Shape legend: B rows, S token positions (input + pair, padded), L encoder positions with the
prompt, P prompt rows, D model width, T decoder positions, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import ConfigError
from engine.model import Seq2SeqLM
from engine.prompts import ENCODER_KEYS, SoftPrompt
from training.data.seq2seq import IGNORE_INDEX
from training.trainer import Batch, Metrics

PARTS: tuple[str, ...] = ENCODER_KEYS  # prefix, infix, suffix (no decoder prefix: PEFT and CPM-2 use none)


class TrainableSoftPrompt(nn.Module):
    """Prompt rows ``prefix`` / ``infix`` / ``suffix``, each an ``[n, d_model]`` parameter (absent when n = 0)."""

    def __init__(self, lengths: Mapping[str, int], d_model: int) -> None:
        super().__init__()
        unknown = sorted(set(lengths) - set(PARTS))
        if unknown or any(n < 0 for n in lengths.values()):
            raise ConfigError(f"prompt lengths must be >= 0 for parts {list(PARTS)}, got {dict(lengths)}")
        if not any(lengths.values()):
            raise ConfigError("the prompt has no virtual token; give prefix, infix or suffix a length > 0")
        self.lengths = {part: int(lengths.get(part, 0)) for part in PARTS}
        self.rows = nn.ParameterDict(
            {part: nn.Parameter(torch.zeros(n, d_model)) for part, n in self.lengths.items() if n}
        )

    @classmethod
    def from_embeddings(
        cls,
        embed: nn.Embedding,
        lengths: Mapping[str, int],
        *,
        init_ids: Mapping[str, Sequence[int]] | None = None,
        sample_range: tuple[int, int] | None = None,
        seed: int = 0,
    ) -> TrainableSoftPrompt:
        """A prompt whose rows are token embeddings: of ``init_ids[part]`` (cycled to the part's length:
        initialisation from text), else of ids drawn uniformly from ``sample_range`` (default: the
        whole vocabulary). Lester et al. found both far better than random vectors."""
        prompt = cls(lengths, embed.embedding_dim)
        generator = torch.Generator().manual_seed(seed)
        low, high = sample_range or (0, embed.num_embeddings)
        with torch.no_grad():
            for part, param in prompt.rows.items():
                n = param.shape[0]
                given = list((init_ids or {}).get(part, ()))
                if given:
                    ids = torch.tensor([given[i % len(given)] for i in range(n)], dtype=torch.long)
                else:
                    ids = torch.randint(low, high, (n,), generator=generator)
                # Through the module, not `embed.weight[ids]`: an embedding scaled by sqrt(d_model)
                # (M2M-100 / NLLB) hands the encoder scaled vectors, and the prompt sits among them.
                param.copy_(embed(ids.to(embed.weight.device)).float().cpu())
        return prompt

    @property
    def num_virtual_tokens(self) -> int:
        return sum(self.lengths.values())

    def part(self, name: str) -> torch.Tensor | None:
        return self.rows.get(name)

    def to_soft_prompt(self, **metadata: str) -> SoftPrompt:
        """The engine's (serving) form of this prompt, detached on the CPU."""
        tensors = {part: p.detach().cpu().clone() for part, p in self.rows.items()}
        return SoftPrompt(**tensors, metadata=dict(metadata))


def prompted_embeds(
    embed: nn.Embedding,
    prompt: TrainableSoftPrompt | None,
    input_ids_BS: torch.Tensor,
    attention_mask_BS: torch.Tensor,
    pair_start_B: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder input embeddings (B, L, D) and validity (B, L): per row prefix | ids[:pair_start] | infix |
    ids[pair_start:length] | suffix, right-padded with zeros (as `engine.generation.inputs` pads)."""
    tokens_BSD = embed(input_ids_BS)
    batch, width, d_model = tokens_BSD.shape
    rows = [] if prompt is None else [(name, prompt.part(name)) for name in PARTS]
    present = [(name, t) for name, t in rows if t is not None]
    # One source table: every token embedding, then every prompt row, then a zero row for padding.
    offsets, start = {}, batch * width
    for name, t in present:
        offsets[name], start = start, start + t.shape[0]
    zero_row = start
    source_ND = torch.cat(
        [tokens_BSD.reshape(-1, d_model)]
        + [t.to(tokens_BSD.dtype) for _, t in present]
        + [tokens_BSD.new_zeros(1, d_model)]
    )

    def virtual(name: str) -> list[int]:
        t = prompt.part(name) if prompt is not None else None
        return [] if t is None else list(range(offsets[name], offsets[name] + t.shape[0]))

    lengths = attention_mask_BS.sum(-1).tolist()
    splits = pair_start_B.tolist()
    index_rows = []
    for row, (length, split) in enumerate(zip(lengths, splits, strict=True)):
        base = row * width
        index_rows.append(
            virtual("prefix")
            + list(range(base, base + split))
            + virtual("infix")
            + list(range(base + split, base + length))
            + virtual("suffix")
        )
    longest = max(len(r) for r in index_rows)
    index_BL = torch.tensor([r + [zero_row] * (longest - len(r)) for r in index_rows], device=tokens_BSD.device)
    valid_BL = torch.tensor([[True] * len(r) + [False] * (longest - len(r)) for r in index_rows])
    return source_ND[index_BL], valid_BL.to(tokens_BSD.device)  # (B, L, D), (B, L)


class PromptedSeq2SeqLM(nn.Module):
    """A `Seq2SeqLM` (``.model``) with an optional trainable prompt (``.prompt``): parameter names start
    with ``model.`` or ``prompt.``, which is what the jobs' `trainable` predicates select on."""

    def __init__(self, model: Seq2SeqLM, prompt: TrainableSoftPrompt | None = None) -> None:
        super().__init__()
        self.model = model
        self.prompt = prompt

    def encode_batch(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pair_start: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder outputs (B, L, D) and validity (B, L) with the prompt in place."""
        embeds_BLD, valid_BL = prompted_embeds(self.model.embed, self.prompt, input_ids, attention_mask, pair_start)
        return self.model.encode(embeds_BLD, valid_BL), valid_BL

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        decoder_input_ids: torch.Tensor,
        pair_start: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Teacher-forced logits (B, T, V); without ``pair_start`` the whole input is one segment."""
        if pair_start is None:
            pair_start = attention_mask.sum(-1)
        enc_BLD, valid_BL = self.encode_batch(input_ids, attention_mask, pair_start)
        state = self.model.start_decoding(enc_BLD, valid_BL, capacity=decoder_input_ids.shape[1])
        valid_BT = None if decoder_attention_mask is None else decoder_attention_mask.bool()
        return self.model.logits(self.model.decode(self.model.embed(decoder_input_ids), state, valid_BT))

    @torch.no_grad()
    def greedy(self, batch: Batch, *, max_new_tokens: int, eos_id: int, num_choosable: int) -> list[list[int]]:
        """Greedy decoding by full decoder re-computation each step, independent of the engine's
        incremental cache (a cross-check of the served path); ids end with eos when it was produced."""
        enc_BLD, valid_BL = self.encode_batch(batch["input_ids"], batch["attention_mask"], batch["pair_start"])
        start = self.model.config.decoder_start_token_id
        out_BT = torch.full((enc_BLD.shape[0], 1), start, dtype=torch.long, device=enc_BLD.device)
        done_B = torch.zeros(enc_BLD.shape[0], dtype=torch.bool, device=enc_BLD.device)
        for _ in range(max_new_tokens):
            state = self.model.start_decoding(enc_BLD, valid_BL, capacity=out_BT.shape[1])
            logits_BV = self.model.logits(self.model.decode(self.model.embed(out_BT), state))[:, -1]
            next_B = logits_BV[:, :num_choosable].argmax(-1).masked_fill(done_B, eos_id)
            out_BT = torch.cat([out_BT, next_B[:, None]], dim=1)
            done_B |= next_B == eos_id
            if bool(done_B.all()):
                break
        results = []
        for row in out_BT[:, 1:].tolist():
            results.append(row[: row.index(eos_id) + 1] if eos_id in row else row)
        return results


def prompted_lm_loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, Metrics]:
    """Token-mean cross-entropy (float32) of the prompted model over labels != -100, plus token accuracy."""
    logits_BTV = model(
        batch["input_ids"],
        batch["attention_mask"],
        batch["decoder_input_ids"],
        batch["pair_start"],
        batch["decoder_attention_mask"],
    )
    labels_BT = batch["labels"]
    loss = F.cross_entropy(logits_BTV.float().flatten(0, 1), labels_BT.flatten(), ignore_index=IGNORE_INDEX)
    with torch.no_grad():
        scored = labels_BT != IGNORE_INDEX
        accuracy = ((logits_BTV.argmax(-1) == labels_BT) & scored).sum() / scored.sum().clamp(min=1)
    return loss, {"accuracy": accuracy}
