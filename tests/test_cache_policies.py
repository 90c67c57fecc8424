"""The cache-policy replay of bench/cache_policies.py: each policy on traces whose answer is known,
Belady never beaten, and the recorder seeing what the provider is asked for."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from bench.cache_policies import POLICIES, history_precision, replay
from engine.experts.pool import ExpertPool
from engine.generation import GenerationRequest, Generator, SamplingParams
from engine.offload import OffloadConfig, load_for_inference
from engine.planner.recording import RoutingRecorder


def _calls(experts: list[int]) -> list[tuple[str, tuple[int, ...]]]:
    return [("decoder.0", (e,)) for e in experts]


def test_a_cyclic_scan_defeats_lru_but_not_belady() -> None:
    scan = _calls([0, 1, 2] * 3)
    assert replay(scan, 2, "lru") == 0.0
    assert replay(scan, 2, "belady") == pytest.approx(3 / 9)  # MIN keeps one of the two each round


def test_frequency_survives_one_off_experts() -> None:
    # Expert 0 comes back every other call between experts used once: LFU / LRFU keep it with one
    # slot to spare for the passers-by, and so does LRU here (it is also the most recent).
    trace = _calls([0, 1, 0, 2, 0, 3, 0, 4, 0, 5])
    for policy in POLICIES:
        assert replay(trace, 2, policy) == pytest.approx(0.4)
    # A burst of 0, then pairs that LRU keeps instead of 0: LFU and LRFU keep 0.
    trace = _calls([0, 0, 0, 0, 1, 2, 0, 3, 4, 0, 5, 6, 0])
    assert replay(trace, 2, "lru") < replay(trace, 2, "lfu") == replay(trace, 2, "lrfu")


def test_request_history_predictions_are_scored_per_request() -> None:
    # Request 1 uses expert 3 at every step, request 2 goes 1, 2, 1. Most used: right 2 of 2 in
    # request 1, 1 of 2 in request 2 (guess 1 misses 2; then 1 and 2 tie, the first used, 1, hits).
    # Last step: 2 of 2, then 0 of 2.
    trace = [
        ("encoder.0", (5,)),
        ("decoder.0", (3,)),
        ("decoder.0", (3,)),
        ("decoder.0", (3,)),
        ("encoder.0", (6,)),  # the next request starts: its history is its own
        ("decoder.0", (1,)),
        ("decoder.0", (2,)),
        ("decoder.0", (1,)),
    ]
    h = history_precision(trace, top_k=1)
    assert h["most_used"] == pytest.approx(3 / 4)
    assert h["last_step"] == pytest.approx(2 / 4)
    assert h["seen_share"] == pytest.approx(3 / 4)  # 3, 3 and the second 1 had been used before


@pytest.mark.parametrize("seed", range(4))
def test_belady_is_never_beaten(seed: int) -> None:
    rng = random.Random(seed)
    trace = [(f"decoder.{t % 3}", tuple(sorted(rng.sample(range(8), rng.randint(1, 3))))) for t in range(300)]
    best = replay(trace, 6, "belady")
    for policy in ("lru", "lfu", "lrfu"):
        assert replay(trace, 6, policy) <= best + 1e-12
    assert replay(trace, 10_000, "lru") == replay(trace, 10_000, "belady")  # room for all: only first uses miss


def test_an_expert_of_the_running_call_is_never_evicted() -> None:
    # One slot, a call needing two experts: the second cannot displace the first (it is pinned), so
    # it is computed without being cached, and the first is still there for the next call.
    trace = [("decoder.0", (0, 1)), ("decoder.0", (0,))]
    assert replay(trace, 1, "lru") == pytest.approx(1 / 3)


def test_the_recorder_sees_every_lookup_of_a_generation(tiny_model_dir: Path) -> None:
    loaded = load_for_inference(
        tiny_model_dir, offload=OffloadConfig(expert_memory="60%", direct_io=True), progress=False
    )
    try:
        provider = loaded.provider
        assert provider is not None
        assert isinstance(provider.pool, ExpertPool)
        recorder = RoutingRecorder(loaded.model.moe_layers())
        before = provider.stats.snapshot()
        request = GenerationRequest(input_ids=(5, 6, 7, 8), params=SamplingParams(max_new_tokens=6, ignore_eos=True))
        Generator(loaded.model).generate([request])
        recorder.close()
        delta = provider.stats - before
        assert sum(len(experts) for _, experts in recorder.calls) == delta.hits + delta.in_place + delta.misses
        assert len(recorder.calls) == delta.layer_calls
        assert {layer for layer, _ in recorder.calls} == {str(layer.key) for layer in loaded.model.moe_layers()}
        assert all(layer.expert_provider is provider for layer in loaded.model.moe_layers())  # unwrapped
    finally:
        loaded.close()
