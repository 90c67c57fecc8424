"""Decoder cache invariants: incremental decoding equals one full forward pass, whatever the batch.

On the native CPM-2-architecture model (centroid-routed MoE in every block) and a Switch model:
- token-by-token decoding reproduces the teacher-forced logits;
- a batch whose rows are at different decode lengths (continuous batching) matches each row alone;
- a cache that grows past its capacity, rows selected (beam reorder), rows added to and removed from
  a running batch (its slots) all keep every row's numbers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.model import DecoderState, Seq2SeqLM
from engine.weights.loader import load_model

ATOL = 1e-4  # the HF parity criterion; batch shape changes GEMM summation order


# Not the capacity-3 Switch case: a capacity counts tokens per sequence per forward pass, so a full
# pass drops tokens a one-token decode step never drops (HF behaves the same way).
@pytest.fixture(params=["tiny-cpm2", "switch-4e-step2"])
def model(request, tiny_model_dir: Path, hf_model_dirs: dict[str, Path]) -> Seq2SeqLM:
    path = tiny_model_dir if request.param == "tiny-cpm2" else hf_model_dirs[request.param]
    return load_model(path)[0]


def _encode(model: Seq2SeqLM, rows: list[list[int]], capacity: int) -> DecoderState:
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        valid[i, : len(row)] = True
    enc = model.encode(model.embed(ids), valid)
    return model.start_decoding(enc, valid, capacity=capacity)


def _step(model: Seq2SeqLM, state: DecoderState, tokens: list[int]) -> torch.Tensor:
    embeds = model.embed(torch.tensor(tokens).unsqueeze(1))
    return model.logits(model.decode(embeds, state))[:, -1]


def _full_logits(model: Seq2SeqLM, row: list[int], decoder: list[int]) -> torch.Tensor:
    ids = torch.tensor([row])
    return model(ids, torch.ones_like(ids), torch.tensor([decoder]))[0]


@torch.inference_mode()
def test_incremental_equals_full_forward(model: Seq2SeqLM, random_ids) -> None:
    row, decoder = random_ids([11, 9], vocab=150, seed=1)
    decoder[0] = model.config.decoder_start_token_id
    full = _full_logits(model, row, decoder)
    # Capacity 2 forces the cache to grow several times on the way.
    state = _encode(model, [row], capacity=2)
    steps = torch.stack([_step(model, state, [t])[0] for t in decoder])
    assert state.lengths == [len(decoder)]
    assert state.capacity >= len(decoder)
    torch.testing.assert_close(steps, full, atol=ATOL, rtol=0)
    # Several positions at once into a non-empty cache also match.
    state = _encode(model, [row], capacity=4)
    _step(model, state, decoder[:1])
    rest = model.logits(model.decode(model.embed(torch.tensor([decoder[1:]])), state))[0]
    torch.testing.assert_close(rest, full[1:], atol=ATOL, rtol=0)


@torch.inference_mode()
def test_rows_at_different_lengths_match_each_row_alone(model: Seq2SeqLM, random_ids) -> None:
    rows = random_ids([7, 12, 4], vocab=150, seed=2)
    decoders = random_ids([6, 6, 6], vocab=150, seed=3)
    alone = [_full_logits(model, r, d) for r, d in zip(rows, decoders, strict=True)]

    # Row 0 starts first; rows 1 and 2 are admitted two and four steps later (continuous batching).
    running = _encode(model, rows[:1], capacity=3)
    outputs: list[list[torch.Tensor]] = [[], [], []]
    members = [0]
    for step in range(10):
        if step in (2, 4):
            joining = 1 if step == 2 else 2
            running.add(_encode(model, [rows[joining]], capacity=5))
            members.append(joining)
        tokens = [decoders[m][len(outputs[m])] for m in members]
        logits = _step(model, running, tokens)
        for i, m in enumerate(members):
            outputs[m].append(logits[i])
        finished = [i for i, m in enumerate(members) if len(outputs[m]) == 6]
        if finished:
            keep = [i for i in range(len(members)) if i not in finished]
            members = [members[i] for i in keep]
            if not members:
                break
            running = running.select(keep)
    for m in range(3):
        torch.testing.assert_close(torch.stack(outputs[m]), alone[m], atol=ATOL, rtol=0)


@torch.inference_mode()
def test_rows_joining_and_leaving_slots_match_each_row_alone(model: Seq2SeqLM, random_ids) -> None:
    """Continuous batching through slots (`add`, `remove`): rows join with longer inputs and larger
    caches than the batch has (so every tensor grows), leave from the middle (so others move into
    their slots), and each row's logits stay those of the row alone."""
    lengths = [5, 12, 7, 15, 4, 9]
    rows = random_ids(lengths, vocab=150, seed=7)
    decoders = random_ids([5, 3, 6, 4, 5, 3], vocab=150, seed=8)
    alone = [_full_logits(model, r, d) for r, d in zip(rows, decoders, strict=True)]
    joins = {0: [0], 1: [1, 2], 3: [3], 4: [4, 5]}  # step -> rows admitted (together) before it
    running: DecoderState | None = None
    members: list[int] = []
    outputs: list[list[torch.Tensor]] = [[] for _ in rows]
    for step in range(12):
        if step in joins:
            newcomers = _encode(model, [rows[m] for m in joins[step]], capacity=2 + step)
            if running is None or not members:
                running = newcomers
            else:
                running.add(newcomers)
            members += joins[step]
        if not members:
            continue  # everyone finished before the next arrivals
        assert running is not None
        logits = _step(model, running, [decoders[m][len(outputs[m])] for m in members])
        for i, m in enumerate(members):
            outputs[m].append(logits[i])
        finished = [i for i, m in enumerate(members) if len(outputs[m]) == len(decoders[m])]
        if finished:
            order = running.remove(finished)
            members = [members[i] for i in order]
            assert running.batch_size == len(members)
    assert all(len(outputs[m]) == len(decoders[m]) for m in range(len(rows)))
    for m in range(len(rows)):
        torch.testing.assert_close(torch.stack(outputs[m]), alone[m], atol=ATOL, rtol=0)


@torch.inference_mode()
def test_joining_and_leaving_copy_only_the_rows_that_move(model: Seq2SeqLM, random_ids) -> None:
    rows = random_ids([6, 6, 6, 6, 6], vocab=150, seed=9)
    state = _encode(model, rows[:2], capacity=8)
    state.add(_encode(model, rows[2:3], capacity=8))  # grows the slots (2 -> 4) once
    assert state.num_slots == 4
    storage = state._slots["self_k"][0].data_ptr()
    before = [t.clone() for t in state.self_k]
    state.add(_encode(model, rows[3:4], capacity=8))  # a free slot: written in place
    assert state._slots["self_k"][0].data_ptr() == storage
    assert all(torch.equal(t[:3], b) for t, b in zip(state.self_k, before, strict=True))
    order = state.remove([0])  # the last row moves into slot 0; rows 1 and 2 stay put
    assert order == [3, 1, 2]
    assert state._slots["self_k"][0].data_ptr() == storage
    assert all(torch.equal(t[1:3], b[1:3]) for t, b in zip(state.self_k, before, strict=True))
    assert state.lengths == [0, 0, 0]
    assert state.remove([1, 2]) == [0]  # removing the tail copies nothing
    assert state.batch_size == 1
    assert state.self_k[0].shape[0] == 1  # attention reads only the live rows


@torch.inference_mode()
def test_a_mostly_empty_state_gives_its_memory_back(model: Seq2SeqLM, random_ids) -> None:
    from engine.model.cache import MIN_SLOTS_KEPT

    rows = random_ids([4] * 20, vocab=150, seed=10)
    state = _encode(model, rows[:1], capacity=4)
    state.add(_encode(model, rows[1:], capacity=4))
    assert state.num_slots >= 20
    state.remove(list(range(1, 20)))
    assert state.batch_size == 1
    assert state.num_slots == MIN_SLOTS_KEPT
    logits = _step(model, state, [3])
    torch.testing.assert_close(logits[0], _full_logits(model, rows[0], [3])[-1], atol=ATOL, rtol=0)


@torch.inference_mode()
def test_select_follows_beams(model: Seq2SeqLM, random_ids) -> None:
    row, prefix = random_ids([9, 3], vocab=150, seed=4)
    state = _encode(model, [row], capacity=8)
    for t in prefix:
        _step(model, state, [t])
    beams = state.select([0, 0, 0])  # three beams sharing a prefix
    logits = _step(model, beams, [5, 6, 7])
    for i, t in enumerate([5, 6, 7]):
        torch.testing.assert_close(logits[i], _full_logits(model, row, [*prefix, t])[-1], atol=ATOL, rtol=0)
    # Reordering rows reorders results and nothing else.
    again = beams.select([2, 0])
    logits2 = _step(model, again, [8, 8])
    torch.testing.assert_close(logits2[0], _full_logits(model, row, [*prefix, 7, 8])[-1], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits2[1], _full_logits(model, row, [*prefix, 5, 8])[-1], atol=ATOL, rtol=0)


def test_dropout_only_in_training(tiny_model_dir: Path) -> None:
    model = load_model(tiny_model_dir, pack=False)[0]
    config = model.config.replace(dropout_rate=0.5)
    noisy = Seq2SeqLM(config)
    noisy.load_state_dict(model.state_dict())
    ids = torch.tensor([[5, 6, 7, 1]])
    dec = torch.tensor([[0, 9, 10]])
    with torch.no_grad():
        noisy.eval()
        torch.testing.assert_close(noisy(ids, torch.ones_like(ids), dec), model(ids, torch.ones_like(ids), dec))
        noisy.train()
        assert not torch.allclose(noisy(ids, torch.ones_like(ids), dec), model(ids, torch.ones_like(ids), dec))


def test_decoder_cache_benchmark_writes_its_report(tmp_path: Path) -> None:
    """`bench.decoder_cache` times a join and a leave both ways; only the report's shape is checked."""
    import json

    from bench.decoder_cache import main

    out = tmp_path / "cache.json"
    assert main(["--quick", "--repeats", "1", "--out", str(out)]) == 0
    records = json.loads(out.read_text())["records"]
    assert [r["rows"] for r in records] == [1, 16]
    for r in records:
        assert all(r[k] > 0 for k in ("join_copy_ms", "join_slots_ms", "leave_copy_ms", "leave_slots_ms"))
