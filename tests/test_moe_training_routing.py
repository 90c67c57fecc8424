"""MoE training-mode routing: balanced (CPM-2 / BASE layers) and Switch top-1 with its aux loss.

- The balanced assignment against brute force: exactly optimal on integer scores with a small
  tolerance, within its stated bound N · tolerance · (score range) on float scores, loads capped.
- A balanced training forward gives every expert the same number of valid tokens, skips padding,
  and leaves inference (eval mode) routing untouched.
- The load-balancing loss against a direct computation of Fedus et al. eq. 4-6 and against HF
  transformers' `load_balancing_loss_func` on the same router probabilities; gradients reach the
  router and the experts (and never the frozen centroids).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from moe_layers import random_moe_layer
from transformers.models.switch_transformers.modeling_switch_transformers import load_balancing_loss_func

from engine.config import ModelConfig, MoEConfig
from engine.errors import ConfigError
from engine.model import Seq2SeqLM
from engine.model.assignment import balanced_assignment
from engine.model.moe import LearnedRouter, MoEFeedForward
from training.moe_losses import moe_aux_loss, seq2seq_moe_loss


def _brute_force_best(scores: torch.Tensor) -> float:
    N, E = scores.shape
    cap = math.ceil(N / E)
    best = -math.inf
    for choice in itertools.product(range(E), repeat=N):
        if max(choice.count(e) for e in range(E)) <= cap:
            best = max(best, sum(float(scores[i, e]) for i, e in enumerate(choice)))
    return best


def _total(scores: torch.Tensor, expert: torch.Tensor) -> float:
    return float(scores[torch.arange(scores.shape[0]), expert].sum())


def test_balanced_assignment_is_optimal_on_integer_scores() -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        N, E = int(torch.randint(1, 8, (1,), generator=gen)), int(torch.randint(1, 4, (1,), generator=gen))
        scores = torch.randint(-5, 6, (N, E), generator=gen).double()
        # Integer scores: epsilon below 1 / N (here: tolerance · range < 1 / N) gives the optimum.
        expert = balanced_assignment(scores, tolerance=1.0 / (N * 11 + 11) / 11)
        assert torch.bincount(expert, minlength=E).max() <= math.ceil(N / E)
        assert _total(scores, expert) == _brute_force_best(scores)


def test_balanced_assignment_is_within_its_bound_on_float_scores() -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(30):
        scores = torch.randn(6, 3, generator=gen)
        expert = balanced_assignment(scores)  # default tolerance 1e-2
        bound = 6 * 1e-2 * float(scores.max() - scores.min())
        assert _total(scores, expert) >= _brute_force_best(scores) - bound - 1e-9
        assert torch.bincount(expert, minlength=3).tolist() == [2, 2, 2]


def _greedy_with_capacity(scores: torch.Tensor) -> torch.Tensor:
    """A feasible assignment: best (token, expert) pairs first while the expert has room."""
    N, E = scores.shape
    cap = math.ceil(N / E)
    expert = torch.full((N,), -1)
    load = [0] * E
    for flat in scores.flatten().argsort(descending=True).tolist():
        token, e = divmod(flat, E)
        if expert[token] < 0 and load[e] < cap:
            expert[token], load[e] = e, load[e] + 1
    return expert


def test_balanced_assignment_at_training_scale() -> None:
    # Scores that all prefer expert 0 (argmax would send every token there), as centroids can.
    scores = torch.randn(512, 8, generator=torch.Generator().manual_seed(2)) * 0.01
    scores[:, 0] += 0.02
    expert = balanced_assignment(scores)
    assert torch.bincount(expert, minlength=8).tolist() == [64] * 8
    # The optimum is at least any feasible assignment's total, so ours is within the bound of it.
    bound = 512 * 1e-2 * float(scores.max() - scores.min())
    assert _total(scores, expert) >= _total(scores, _greedy_with_capacity(scores)) - bound


def _layer(router: str, train_routing: str, *, experts: int = 4) -> MoEFeedForward:
    return random_moe_layer(router, experts=experts, train_routing=train_routing)


def test_balanced_training_forward_splits_valid_tokens_evenly() -> None:
    layer = _layer("centroid", "balanced").train()
    x = torch.randn(3, 8, 16)
    valid = torch.ones(3, 8, dtype=torch.bool)
    valid[2, 4:] = False  # 20 valid tokens over 4 experts: 5 each
    expert_BSK, gate, keep_BSK = layer.route(x, valid)
    assert gate is None
    expert, keep = expert_BSK[..., 0], keep_BSK[..., 0]  # top-1: one choice per token
    assert torch.equal(keep, valid)
    assert torch.bincount(expert[valid], minlength=4).tolist() == [5, 5, 5, 5]
    out = layer(x, valid)
    assert torch.all(out[2, 4:] == 0)
    for b, s in valid.nonzero().tolist():
        module = layer.experts[int(expert[b, s])]
        torch.testing.assert_close(out[b, s], module(x[b, s]), atol=1e-5, rtol=1e-5)


def test_training_routing_leaves_inference_untouched() -> None:
    x = torch.randn(2, 9, 16)
    for router, routing in (("centroid", "balanced"), ("learned", "top1"), ("learned", "balanced")):
        reference = _layer(router, "inference").eval()
        layer = _layer(router, routing)
        layer.train()
        layer(x)
        layer.eval()
        with torch.no_grad():
            assert torch.equal(layer(x), reference(x))
        assert layer.aux_loss is None


def test_inference_routing_in_training_routes_like_eval() -> None:
    layer = _layer("learned", "inference")
    x = torch.randn(2, 9, 16)
    train_route = layer.train().route(x, None)
    train_out = layer(x)
    assert layer.aux_loss is None
    with torch.no_grad():
        eval_route = layer.eval().route(x, None)
        for got, want in zip(train_route, eval_route, strict=True):
            assert got is not None
            assert want is not None
            assert torch.equal(got, want)
        # With autograd on, `linear` takes F.linear instead of oneDNN: equal up to summation order.
        torch.testing.assert_close(train_out, layer(x), atol=1e-5, rtol=1e-5)


def test_load_balancing_loss_matches_direct_formula_and_hf() -> None:
    layer = _layer("learned", "top1", experts=4).train()
    x = torch.randn(3, 10, 16)
    layer(x)
    assert layer.aux_loss is not None
    assert isinstance(layer.router, LearnedRouter)
    probs = layer.router.probabilities(x).detach()
    expert = probs.argmax(-1)
    # Fedus et al. eq. 4-6 per sequence, averaged over the batch.
    direct = torch.stack(
        [4 * sum((expert[b] == e).float().mean() * probs[b, :, e].mean() for e in range(4)) for b in range(3)]
    ).mean()
    torch.testing.assert_close(layer.aux_loss.detach(), direct, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(layer.aux_loss.detach(), load_balancing_loss_func(probs, expert), atol=1e-6, rtol=1e-6)


def test_load_balancing_loss_skips_padding() -> None:
    layer = _layer("learned", "top1").train()
    x = torch.randn(2, 6, 16)
    valid = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    layer(x, valid)
    assert isinstance(layer.router, LearnedRouter)
    assert layer.aux_loss is not None
    probs = layer.router.probabilities(x).detach()
    # Row 0 counts only its 4 real tokens: the same as a batch of that row alone, unpadded.
    expected = torch.stack(
        [
            load_balancing_loss_func(probs[:1, :4], probs[:1, :4].argmax(-1)),
            load_balancing_loss_func(probs[1:], probs[1:].argmax(-1)),
        ]
    ).mean()
    torch.testing.assert_close(layer.aux_loss.detach(), expected, atol=1e-6, rtol=1e-6)


def test_gradients_reach_router_and_experts_but_not_centroids() -> None:
    switch = _layer("learned", "top1").train()
    x = torch.randn(2, 16, 16)
    out = switch(x)
    assert switch.aux_loss is not None
    (out.square().mean() + 0.01 * switch.aux_loss).backward()
    assert isinstance(switch.router, LearnedRouter)
    grad = switch.router.classifier.weight.grad
    assert grad is not None
    assert grad.abs().sum() > 0
    used = {int(e) for e in switch.route(x, None)[0].unique()}
    for e in used:
        assert switch.experts[e].wi_0.weight.grad is not None

    cpm2 = _layer("centroid", "balanced").train()
    cpm2(x).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cpm2.experts.parameters())
    assert "router.centroids" not in dict(cpm2.named_parameters())
    assert not cpm2.router.centroids.requires_grad


def test_aux_loss_helper_weighs_each_layer() -> None:
    model = torch.nn.ModuleList([_layer("learned", "top1"), _layer("learned", "top1")]).train()
    x = torch.randn(1, 5, 16)
    for layer in model:
        layer(x)
    total = moe_aux_loss(model)
    assert total is not None
    torch.testing.assert_close(total, 0.01 * (model[0].aux_loss + model[1].aux_loss))
    model.eval()
    for layer in model:
        layer(x)
    assert moe_aux_loss(model) is None


def test_seq2seq_moe_loss_adds_the_aux_loss() -> None:
    moe = MoEConfig(num_experts=2, router="learned", encoder_layers=(0,), decoder_layers=(0,), train_routing="top1")
    config = ModelConfig(
        vocab_size=40, d_model=16, num_heads=2, d_kv=8, d_ff=32, num_encoder_layers=1, num_decoder_layers=1, moe=moe
    )
    torch.manual_seed(0)
    model = Seq2SeqLM(config).train()
    batch = {
        "input_ids": torch.randint(2, 40, (2, 7)),
        "attention_mask": torch.ones(2, 7, dtype=torch.long),
        "decoder_input_ids": torch.randint(2, 40, (2, 5)),
        "labels": torch.randint(2, 40, (2, 5)),
    }
    loss, metrics = seq2seq_moe_loss(model, batch)
    aux = metrics["aux_loss"]
    assert isinstance(aux, torch.Tensor)
    assert aux > 0
    torch.testing.assert_close(loss.detach(), metrics["lm_loss"] + aux)


def test_train_routing_config_is_validated_and_round_trips(tmp_path: object) -> None:
    with pytest.raises(ConfigError, match="router: learned"):
        MoEConfig(num_experts=4, router="centroid", encoder_layers=(0,), decoder_layers=(), train_routing="top1")
    with pytest.raises(ConfigError, match="aux_loss_coef"):
        MoEConfig(num_experts=4, router="learned", encoder_layers=(0,), decoder_layers=(), aux_loss_coef=-1.0)
    moe = MoEConfig(
        num_experts=4,
        router="learned",
        encoder_layers=(0,),
        decoder_layers=(),
        train_routing="top1",
        aux_loss_coef=0.05,
    )
    config = ModelConfig(
        vocab_size=40, d_model=16, num_heads=2, d_kv=8, d_ff=32, num_encoder_layers=1, num_decoder_layers=1, moe=moe
    )
    assert ModelConfig.from_dict(config.to_dict()) == config
    old = config.to_dict()
    del old["moe"]["train_routing"], old["moe"]["aux_loss_coef"]
    assert ModelConfig.from_dict(old).moe == MoEConfig(
        num_experts=4, router="learned", encoder_layers=(0,), decoder_layers=()
    )  # configs written before these fields keep today's behaviour
