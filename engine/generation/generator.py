"""Batched generation: encode a batch once, then decode step by step, dropping rows as they finish.

Each request keeps its own sampling state (`TokenChooser`) and stop conditions (`Sequence`); the
tensors of all running requests form one `DecodeBatch`. `prefill` admits requests and `step` runs
one decoder step for every running row: the step-shaped interface a continuous-batching scheduler
drives (vLLM v1 `EngineCore.step`, TGI `Seq2SeqLM.generate_token`). `generate` is the simple loop
over both for callers that have all their requests up front.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch

from engine.errors import InputError
from engine.experts.stats import ExpertStats
from engine.generation.beam import beam_search
from engine.generation.inputs import embed_requests, feed_decoder_prefixes
from engine.generation.params import FinishReason, GenerationRequest, GenerationResult
from engine.generation.sampling import TokenChooser, choose_tokens
from engine.model import DecoderState, EncoderPass, Seq2SeqLM
from engine.tokenizer import IncrementalDecoder, Tokenizer


@dataclass
class Sequence:
    """One request being generated: its tokens so far and why it stopped, if it has."""

    request: GenerationRequest
    chooser: TokenChooser
    detokenizer: IncrementalDecoder | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_text_end: int | None = None
    experts: dict[str, float] = field(default_factory=dict)
    last_text: str = ""
    """Text the latest token added (for streaming), cut at a matched stop sequence."""

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, token: int, logprob: float, eos_token_id: int) -> None:
        """Record a new token and decide whether the sequence is done."""
        self.token_ids.append(token)
        self.logprobs.append(logprob)
        self.last_text = ""
        params = self.request.params
        if token == eos_token_id and not params.ignore_eos:
            self.finish_reason = "eos_token"
        elif self.detokenizer is not None:
            previous = len(self.detokenizer.text)
            self.last_text = self.detokenizer.push(token)
            if params.stop:
                self._check_stop(previous)
                if self.stop_text_end is not None:
                    emitted = len(self.detokenizer.text) - len(self.last_text)
                    self.last_text = self.last_text[: max(0, self.stop_text_end - emitted)]
        if self.finish_reason is None and len(self.token_ids) >= params.max_new_tokens:
            self.finish_reason = "length"

    def _check_stop(self, previous_length: int) -> None:
        assert self.detokenizer is not None
        text = self.detokenizer.text
        longest = max(len(s) for s in self.request.params.stop)
        # Only the new text, plus enough of the old to catch a stop string spanning the boundary.
        window_start = max(0, previous_length - longest + 1)
        ends = [found + len(stop) for stop in self.request.params.stop if (found := text.find(stop, window_start)) >= 0]
        if ends:
            self.finish_reason = "stop_sequence"
            self.stop_text_end = min(ends)

    def result(self, tokenizer: Tokenizer | None) -> GenerationResult:
        assert self.finish_reason is not None
        text = ""
        if tokenizer is not None:
            text = tokenizer.decode(self.token_ids)
            if self.stop_text_end is not None:
                text = text[: self.stop_text_end]
        return GenerationResult(
            token_ids=list(self.token_ids),
            logprobs=list(self.logprobs),
            finish_reason=self.finish_reason,
            seed=self.chooser.seed,
            text=text,
            num_input_tokens=len(self.request.input_ids),
            experts=dict(self.experts),
        )


#: Per-request expert counters (a step's counters are shared evenly by its rows).
EXPERT_FIELDS = ("bytes_moved", "hits", "misses", "transfers", "stall_seconds")


def share_expert_stats(sequences: Seq[Sequence], delta: ExpertStats) -> None:
    """Add an equal share of `delta` to every sequence's expert counters."""
    if not sequences:
        return
    for name in EXPERT_FIELDS:
        value = float(getattr(delta, name)) / len(sequences)
        for sequence in sequences:
            sequence.experts[name] = sequence.experts.get(name, 0.0) + value


@dataclass
class DecodeBatch:
    """The running rows: host-side sequences and the decoder cache, row i of one is row i of the other."""

    sequences: list[Sequence]
    state: DecoderState

    def __len__(self) -> int:
        return len(self.sequences)

    def drop_finished(self) -> list[Sequence]:
        """Remove finished rows and return them (their cache slots are reused; the rows that remain
        may change places, see `DecoderState.remove`)."""
        done = [s for s in self.sequences if s.is_finished]
        if done:
            self.remove([i for i, s in enumerate(self.sequences) if s.is_finished])
        return done

    def remove(self, rows: Seq[int]) -> None:
        """Drop `rows` from the batch, sequences and cache alike."""
        order = self.state.remove(rows)
        self.sequences = [self.sequences[i] for i in order]

    def extend(self, other: DecodeBatch) -> None:
        """Admit the rows of `other` (already prefilled) into this batch."""
        if self.sequences:
            self.state.add(other.state)
        else:
            self.state = other.state
        self.sequences = self.sequences + other.sequences


@dataclass
class Prefill:
    """Requests on their way into a decode batch: their encoder pass, which may run a few blocks at a
    time between decode steps (`Generator.advance_prefill`)."""

    requests: list[GenerationRequest]
    encoder: EncoderPass
    experts: ExpertStats | None = None
    """What the expert provider did for this pass so far (shared out to the rows at the end)."""

    def count(self, delta: ExpertStats) -> None:
        self.experts = delta if self.experts is None else self.experts + delta


class Generator:
    """Runs generation requests on a model (greedy, sampling and beam search)."""

    def __init__(
        self,
        model: Seq2SeqLM,
        tokenizer: Tokenizer | None = None,
        *,
        expert_stats: Callable[[], ExpertStats] | None = None,
    ) -> None:
        """`expert_stats` returns the expert provider's cumulative counters when experts are offloaded."""
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        self.expert_stats = expert_stats
        # Models often have more embedding rows than the tokenizer has pieces (T5: 32128 vs 32100);
        # the extra rows are never trained, and an id the tokenizer cannot print must not be chosen.
        self.num_choosable = model.config.vocab_size
        if tokenizer is not None:
            self.num_choosable = min(self.num_choosable, tokenizer.vocab_size)

    @property
    def device(self) -> torch.device:
        return self.model.embed.weight.device

    def prefill(self, requests: Seq[GenerationRequest]) -> DecodeBatch:
        """Encode `requests` (right-padded, soft prompts in place) and set up their decoder state."""
        pending = self.begin_prefill(requests)
        self.advance_prefill(pending, len(self.model.encoder.blocks))
        return self.finish_prefill(pending)

    def begin_prefill(self, requests: Seq[GenerationRequest]) -> Prefill:
        """Start the encoder pass of `requests`, all in one batch; no block has run yet."""
        self._check_inputs(requests)
        embeds_BSD, valid_BS = embed_requests(self.model, requests)
        return Prefill(list(requests), self.model.encoder.begin(embeds_BSD, valid_BS))

    def advance_prefill(self, pending: Prefill, blocks: int) -> bool:
        """Run up to `blocks` more encoder blocks of `pending`; True once all have run."""
        before = self.expert_stats() if self.expert_stats else None
        done = self.model.encoder.advance(pending.encoder, blocks)
        if before is not None and self.expert_stats is not None:
            pending.count(self.expert_stats() - before)
        return done

    def finish_prefill(self, pending: Prefill) -> DecodeBatch:
        """The decode batch of a finished encoder pass: its requests' decoder states and sequences.

        Requests whose prompts carry a decoder prefix of the same length are prefilled together
        (the prefix runs through the decoder before the start token); the groups then form one batch.
        """
        before = self.expert_stats() if self.expert_stats else None
        enc_BSD = self.model.encoder.finish(pending.encoder)
        valid_BS = pending.encoder.valid
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(pending.requests):
            groups.setdefault(r.prompt.decoder_tokens if r.prompt is not None else 0, []).append(i)
        batch: DecodeBatch | None = None
        for prefix_len, rows in groups.items():
            members = [pending.requests[i] for i in rows]
            group_enc_BSD, group_valid_BS = enc_BSD, valid_BS
            if len(groups) > 1:  # rows of other prefix lengths leave (a copy, so only when there are any)
                index = torch.tensor(rows, device=enc_BSD.device)
                group_enc_BSD, group_valid_BS = enc_BSD[index], valid_BS[index]
            capacity = max(r.params.max_new_tokens for r in members) + prefix_len
            state = self.model.start_decoding(group_enc_BSD, group_valid_BS, capacity=capacity)
            if prefix_len:
                prefixes = [r.prompt.decoder_prefix for r in members if r.prompt is not None]
                feed_decoder_prefixes(self.model, state, [p for p in prefixes if p is not None])
            sequences = [
                Sequence(
                    request=r,
                    chooser=TokenChooser.create(
                        r.params, start_token=self.config.decoder_start_token_id, device=self.device
                    ),
                    detokenizer=IncrementalDecoder(self.tokenizer) if self.tokenizer is not None else None,
                )
                for r in members
            ]
            group = DecodeBatch(sequences, state)
            if batch is None:
                batch = group
            else:
                batch.extend(group)
        assert batch is not None
        if before is not None and self.expert_stats is not None:
            pending.count(self.expert_stats() - before)
            assert pending.experts is not None
            share_expert_stats(batch.sequences, pending.experts)
        return batch

    def _check_inputs(self, requests: Seq[GenerationRequest]) -> None:
        vocab = self.config.vocab_size
        if not requests:
            raise InputError("no requests to generate for")
        for r in requests:
            bad = [t for t in (*r.input_ids, *r.pair_ids) if not 0 <= t < vocab]
            if bad:
                raise InputError(f"input token id {bad[0]} is outside the vocabulary [0, {vocab})")
            forced = [t for t in r.params.forced_tokens if t >= self.num_choosable]
            if forced:
                raise InputError(f"forced token id {forced[0]} is outside the choosable ids [0, {self.num_choosable})")
            if r.params.stop and self.tokenizer is None:
                raise InputError("stop sequences need a tokenizer; load the model with its tokenizer")

    def step(self, batch: DecodeBatch) -> None:
        """One decoder step for every row of `batch`; appends a token to each sequence."""
        before = self.expert_stats() if self.expert_stats else None
        start = self.config.decoder_start_token_id
        last = [s.token_ids[-1] if s.token_ids else start for s in batch.sequences]
        tokens_B1 = torch.tensor(last, dtype=torch.long, device=self.device).unsqueeze(1)
        hidden_B1D = self.model.decode(self.model.embed(tokens_B1), batch.state)
        logits_BV = self.model.logits(hidden_B1D)[:, -1, : self.num_choosable]
        tokens, logprobs = choose_tokens(logits_BV, [s.chooser for s in batch.sequences])
        if before is not None and self.expert_stats is not None:
            share_expert_stats(batch.sequences, self.expert_stats() - before)
        eos = self.config.eos_token_id
        for sequence, token, logprob in zip(batch.sequences, tokens, logprobs, strict=True):
            sequence.append(token, logprob, eos)

    @torch.inference_mode()
    def generate(self, requests: Seq[GenerationRequest]) -> list[GenerationResult]:
        """Generate for every request; results are in request order.

        Greedy and sampling requests run together as one batch; beam-search requests run one at a time.
        """
        self._check_inputs(requests)  # beam requests too, which skip `prefill`
        results: dict[int, GenerationResult] = {}
        batched = [i for i, r in enumerate(requests) if r.params.num_beams == 1]
        for i, r in enumerate(requests):
            if r.params.num_beams > 1:
                before = self.expert_stats() if self.expert_stats else None
                results[i] = beam_search(self.model, r, tokenizer=self.tokenizer, num_choosable=self.num_choosable)
                if before is not None and self.expert_stats is not None:
                    delta = self.expert_stats() - before
                    results[i].experts = {name: float(getattr(delta, name)) for name in EXPERT_FIELDS}
        if batched:
            batch = self.prefill([requests[i] for i in batched])
            index_of = {id(s): i for s, i in zip(batch.sequences, batched, strict=True)}
            while len(batch):
                self.step(batch)
                for sequence in batch.drop_finished():
                    results[index_of[id(sequence)]] = sequence.result(self.tokenizer)
        return [results[i] for i in range(len(requests))]
