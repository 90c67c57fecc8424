"""`NextLayerPredictor`: a correction to the next router, learned from the routes it then sees, kept
only where it predicts better on held-out tokens."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from engine.errors import ConfigError
from engine.experts.predictor import FLUSH_ROWS, MAX_HOLDOUT, NextLayerPredictor, overlap, router_linear
from engine.generation import GenerationRequest, Generator, SamplingParams
from engine.model.moe import CentroidRouter, LearnedRouter
from engine.offload import OffloadConfig, load_for_inference
from engine.weights.loader import load_model

D, E = 16, 8


def _router(seed: int, *, bias: bool = True) -> LearnedRouter:
    torch.manual_seed(seed)
    router = LearnedRouter(D, E, bias=bias, dtype=torch.float32)
    torch.nn.init.normal_(router.classifier.weight)
    return router


def _stream(num: int, seed: int, map_DD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Previous-layer inputs and the next layer's inputs, a fixed linear map of them plus noise."""
    g = torch.Generator().manual_seed(seed)
    previous = torch.randn(num, D, generator=g)
    return previous, previous @ map_DD + 0.05 * torch.randn(num, D, generator=g)


def _precision(predictor: NextLayerPredictor, previous: torch.Tensor, following: torch.Tensor) -> float:
    truth = predictor.router.scores(following.unsqueeze(0))[0]
    return overlap(predictor.scores(previous), truth, predictor.top_k)


def test_learns_a_linear_change_of_state_the_plain_router_misses() -> None:
    router = _router(0)
    map_DD = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(1)))[0]
    predictor = NextLayerPredictor(router, top_k=1)
    test_prev, test_next = _stream(2000, seed=9, map_DD=map_DD)
    plain = _precision(predictor, test_prev, test_next)  # nothing fitted yet: the plain router
    assert plain < 0.5
    for step in range(40):  # tokens arrive a few at a time, as decode steps bring them
        predictor.learn(*_stream(16, seed=100 + step, map_DD=map_DD))
    assert predictor.fitted is not None
    assert predictor.precision_fitted is not None
    assert predictor.precision_plain is not None
    assert predictor.precision_fitted > predictor.precision_plain + 0.3
    assert _precision(predictor, test_prev, test_next) > 0.9
    # Held-out tokens are capped and never part of the fit.
    assert sum(x.shape[0] for x in predictor.holdout_inputs) <= MAX_HOLDOUT
    assert predictor.tokens_fitted == predictor.tokens_seen - predictor.tokens_seen // 4


def test_keeps_the_plain_router_where_the_fit_does_not_help() -> None:
    """Next inputs unrelated to the previous ones: no fit beats the router, scores stay the router's."""
    router = _router(2)
    predictor = NextLayerPredictor(router, top_k=2)
    g = torch.Generator().manual_seed(3)
    for _ in range(40):
        predictor.learn(torch.randn(16, D, generator=g), torch.randn(16, D, generator=g))
    assert predictor.precision_plain is not None  # it did refit and judge
    assert predictor.fitted is None
    x = torch.randn(5, D, generator=g)
    assert torch.equal(predictor.scores(x), router.scores(x.unsqueeze(0))[0])


def test_stops_learning_and_frees_its_statistics_at_max_tokens() -> None:
    torch.manual_seed(4)
    router = CentroidRouter(D, E)
    router.centroids.normal_()
    map_DD = torch.eye(D).roll(1, dims=0)  # the next layer sees the features permuted
    predictor = NextLayerPredictor(router, top_k=1, max_tokens=600)
    for step in range(20):
        predictor.learn(*_stream(32, seed=200 + step, map_DD=map_DD))
    assert not predictor.is_learning
    assert predictor.gram_FF is None
    assert not predictor.holdout_inputs
    assert predictor.fitted is not None  # the centroid router has no bias; the fit adds one
    seen = predictor.tokens_seen
    predictor.learn(*_stream(32, seed=999, map_DD=map_DD))
    assert predictor.tokens_seen == seen
    assert _precision(predictor, *_stream(500, seed=7, map_DD=map_DD)) > 0.9


def test_one_token_at_a_time_learns_what_whole_batches_do() -> None:
    """Batch-1 decoding hands the predictor one token a call: it counts each at once, scores them
    `FLUSH_ROWS` at a time, and refits at the same token counts as when tokens come in bulk, with the
    same statistics, held-out set and fit (up to float rounding of the scores)."""
    router = _router(5)
    map_DD = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(6)))[0]
    previous, following = _stream(700, seed=11, map_DD=map_DD)
    single = NextLayerPredictor(router, top_k=1, max_tokens=650)
    bulk = NextLayerPredictor(router, top_k=1, max_tokens=650)
    refits_single, refits_bulk = [], []
    for i in range(40):  # below FLUSH_ROWS and before the first refit is due (34 fitted tokens)
        single.learn(previous[i : i + 1], following[i : i + 1])
    assert FLUSH_ROWS > 40
    assert single.tokens_seen == 40
    assert single.gram_FF is not None
    assert not single.gram_FF.any(), "nothing scored before a flush"
    for i in range(40, 700):
        judged = single.precision_plain
        single.learn(previous[i : i + 1], following[i : i + 1])
        if single.precision_plain is not judged:
            refits_single.append(single.tokens_seen)
    for i in range(0, 700, 5):
        judged = bulk.precision_plain
        bulk.learn(previous[i : i + 5], following[i : i + 5])
        if bulk.precision_plain is not judged:
            refits_bulk.append(bulk.tokens_seen)
    # Refits at 2 x 17 fitted tokens (token 46), 8 x 17 (182) and the last at max_tokens; a bulk call
    # of 5 tokens reaches each count within its call.
    assert refits_single == [46, 182, 650]
    assert [-(-t // 5) * 5 for t in refits_single] == refits_bulk
    assert not single.is_learning
    assert not bulk.is_learning
    assert single.fitted is not None
    assert bulk.fitted is not None
    torch.testing.assert_close(single.fitted[0], bulk.fitted[0], atol=2e-3, rtol=2e-3)
    # What the batched path adds is what each token adds on its own: the statistics of every token
    # not numbered 4k, and the 4k-th ones held out, whatever the calls' boundaries.
    counted = NextLayerPredictor(router, top_k=1, max_tokens=10**6)
    for i in range(301):
        counted.learn(previous[i : i + 1], following[i : i + 1])
    counted.refit()  # adds what is pending
    fit = torch.arange(301) % 4 != 0
    features = torch.nn.functional.pad(previous[:301][fit], (0, 1), value=1.0)
    assert counted.gram_FF is not None
    torch.testing.assert_close(counted.gram_FF, features.T @ features, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(torch.cat(counted.holdout_inputs), previous[:301][~fit])


def test_overlap_counts_shared_top_k() -> None:
    truth = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    guess = torch.tensor([[3.0, 0.0, 2.0, 1.0], [0.0, 1.0, 2.0, 3.0]])
    assert overlap(guess, truth, 1) == 1.0
    assert overlap(guess, truth, 2) == 0.75


@pytest.mark.parametrize("prediction", ["calibrated", "router"])
def test_the_provider_teaches_each_predictor_the_tokens_it_serves(
    tiny_model_dir: Path, tmp_path: Path, prediction: str
) -> None:
    """Every MoE layer gets a predictor (of the layer before it in its stack, or of the stack's input
    for the stack's first MoE layer); under `calibrated` it learns
    from every token that reaches it (the same rows at both layers), under `router` from none; the
    outputs are those of resident experts either way (prediction only decides what loads early)."""
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    requests = [GenerationRequest((5, 9, 13, 2, 7)[: 2 + i], params) for i in range(3)]
    resident, _ = load_model(tiny_model_dir)
    expected = [r.token_ids for r in Generator(resident).generate(requests)]
    offload = OffloadConfig(store_dir=tmp_path / "store", expert_memory="40%", direct_io=True, prediction=prediction)
    loaded = load_for_inference(tiny_model_dir, offload=offload, progress=False)
    try:
        provider = loaded.provider
        assert provider is not None
        layers = loaded.model.moe_layers()
        predictors = provider.predictors.by_layer()
        assert set(predictors) == {str(layer.key) for layer in layers}
        assert [r.token_ids for r in Generator(loaded.model).generate(requests)] == expected
        seen = {name: p.tokens_seen for name, p in predictors.items()}
        if prediction == "router":
            assert set(seen.values()) == {0}
            assert all(p.gram_FF is None and p.cross_FE is None for p in predictors.values())  # nothing held
            return
        input_tokens = sum(len(r.input_ids) for r in requests)
        decoded = sum(r.params.max_new_tokens for r in requests)
        for name, count in seen.items():
            assert count == (input_tokens if name.startswith("encoder") else decoded), name
    finally:
        loaded.close()


def test_prediction_choice_is_checked() -> None:
    with pytest.raises(ConfigError, match="expert prediction must be one of calibrated, router"):
        OffloadConfig(prediction="oracle")  # type: ignore[arg-type]


def test_the_server_takes_the_choice_from_its_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from pydantic import ValidationError

    from server.settings import Settings

    monkeypatch.setenv("CPM2_EXPERT_PREDICTION", "router")
    assert Settings().engine_config(tmp_path).offload.prediction == "router"
    monkeypatch.setenv("CPM2_EXPERT_PREDICTION", "oracle")
    with pytest.raises(ValidationError, match="calibrated"):
        Settings()


def test_a_kept_fit_decides_what_the_provider_guesses(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The provider's guesses come from each predictor's scores: a fit that sends every token to
    expert 3 makes every guess expert 3."""
    from engine.experts import provider as provider_module

    guessed: list[int] = []
    rank = provider_module.rank_experts

    def recording(scores_NE: torch.Tensor, top_k: int) -> tuple[set[int], list[int]]:
        predicted, ranked = rank(scores_NE, top_k)
        guessed.extend(predicted)
        return predicted, ranked

    monkeypatch.setattr(provider_module, "rank_experts", recording)
    offload = OffloadConfig(store_dir=tmp_path / "store", expert_memory="40%", direct_io=True, prediction="router")
    loaded = load_for_inference(tiny_model_dir, offload=offload, progress=False)
    try:
        provider = loaded.provider
        assert provider is not None
        provider.cost = dataclasses.replace(provider.cost, beta=1e-9)  # every guess pays
        requests = [GenerationRequest((5, 9, 13, 2, 7), SamplingParams(max_new_tokens=4, ignore_eos=True))]
        predictors = provider.predictors.by_layer().values()
        for fitted in (False, True):
            for p in predictors:
                E, D = router_linear(p.router)[0].shape
                to_3 = torch.nn.functional.one_hot(torch.tensor(3), E).float()
                p.fitted = (torch.zeros(E, D), to_3) if fitted else None
            guessed.clear()
            provider._precision = 1.0
            provider._cached.in_ram.clear()
            Generator(loaded.model).generate(requests)
            assert guessed
            assert (set(guessed) == {3}) == fitted, guessed
    finally:
        loaded.close()
