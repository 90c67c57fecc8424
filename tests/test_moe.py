"""MoE layer: routing semantics against references, and the expert-provider seam.

- CPM-2 centroid routing: argmax of RMSNorm(x) @ centroids^T, expert output not gate-scaled.
- Switch routing: HF's `SwitchTransformersSparseMLP` (gate scaling, per-sequence capacity).
- Upcycling invariant: experts that are copies of one FFN compute exactly that FFN.
- Provider seam: a provider that keeps experts elsewhere and yields them in another order gives
  identical numbers, sees exactly the experts and token counts routing asked for, and plugs into a
  model loaded without resident experts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from moe_layers import KEY, random_moe_layer
from torch import nn

from engine.config import MoEConfig
from engine.experts.store import ExpertStore
from engine.generation import GenerationRequest, Generator, SamplingParams
from engine.model import ExpertWeights, MoELayerKey
from engine.model.ffn import ACTIVATIONS, FeedForward, feed_forward
from engine.model.moe import ExpertDemand, MoEFeedForward, ResidentExpertProvider
from engine.weights.loader import load_model


def _layer(router: str, *, experts: int = 4, capacity: int | None = None, gated: bool = True) -> MoEFeedForward:
    return random_moe_layer(router, experts=experts, capacity=capacity, gated=gated).eval()


@torch.no_grad()
def test_centroid_routing_matches_reference() -> None:
    layer = _layer("centroid")
    x = torch.randn(3, 7, 16)
    got = layer(x)
    for b in range(3):
        for s in range(7):
            expert = int((x[b, s] @ layer.router.centroids.T).argmax())
            module = layer.experts[expert]
            assert isinstance(module, FeedForward)
            torch.testing.assert_close(got[b, s], module(x[b, s]), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_identical_experts_compute_the_dense_ffn() -> None:
    layer = _layer("centroid", experts=8)
    dense = layer.experts[3]
    for expert in layer.experts:
        expert.load_state_dict(dense.state_dict())
    layer, dense = layer.double(), dense.double()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    # float64: only summation order (GEMM blocking differs with the token count) can differ.
    torch.testing.assert_close(layer(x), dense(x), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("capacity", [64, 2])
@torch.no_grad()
def test_learned_router_matches_hf_switch(capacity: int) -> None:
    from transformers import SwitchTransformersConfig
    from transformers.models.switch_transformers.modeling_switch_transformers import (
        SwitchTransformersSparseMLP,
    )

    hf_config = SwitchTransformersConfig(d_model=16, d_ff=32, num_experts=4, expert_capacity=capacity)
    hf = SwitchTransformersSparseMLP(hf_config).eval()
    torch.manual_seed(1)
    for p in hf.parameters():
        p.normal_(0, 0.5)
    moe = MoEConfig(num_experts=4, router="learned", encoder_layers=(0,), decoder_layers=(), expert_capacity=capacity)
    ours = MoEFeedForward(KEY, moe, d_model=16, d_ff=32, activation="relu", is_gated=False).eval()
    state = {"router.classifier.weight": hf.router.classifier.weight}
    for e in range(4):
        state[f"experts.{e}.wi.weight"] = hf.experts[f"expert_{e}"].wi.weight
        state[f"experts.{e}.wo.weight"] = hf.experts[f"expert_{e}"].wo.weight
    ours.load_state_dict(state)
    x = torch.randn(3, 11, 16)
    expected = hf(x)
    if capacity == 2:
        assert (expected.abs().sum(-1) == 0).any(), "the capacity should drop some tokens"
    torch.testing.assert_close(ours(x), expected, atol=1e-6, rtol=1e-5)


class ElsewhereProvider:
    """Keeps copies of the experts in its own store and yields them in reverse order."""

    def __init__(self, store: dict[tuple[MoELayerKey, int], ExpertWeights]) -> None:
        self.store = store
        self.calls: list[tuple[MoELayerKey, list[ExpertDemand], int]] = []

    def fetch(
        self, layer: MoELayerKey, demand: Sequence[ExpertDemand], hidden_ND: torch.Tensor
    ) -> Iterable[tuple[int, ExpertWeights]]:
        self.calls.append((layer, list(demand), hidden_ND.shape[0]))
        for item in reversed(demand):
            yield item.expert, self.store[(layer, item.expert)]


@torch.no_grad()
def test_provider_order_and_location_do_not_change_results() -> None:
    layer = _layer("learned", experts=6, capacity=None)
    x = torch.randn(2, 10, 16)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, 6:] = False
    resident = layer(x, valid)
    store = {}
    for e, expert in enumerate(layer.experts):
        assert isinstance(expert, FeedForward)
        store[(KEY, e)] = ExpertWeights(*(None if w is None else w.clone() for w in expert.weights()))
    provider = ElsewhereProvider(store)
    layer.expert_provider = provider
    offloaded = layer(x, valid)
    assert torch.equal(offloaded, resident)
    ((key, demand, num_tokens),) = provider.calls
    assert key == KEY
    expert_BS = layer.route(x, valid)[0][..., 0]  # top-1: one choice per token
    counts = torch.bincount(expert_BS[valid], minlength=6)
    assert {d.expert: d.num_tokens for d in demand} == {e: int(n) for e, n in enumerate(counts) if n > 0}
    assert num_tokens == int(valid.sum()) == sum(d.num_tokens for d in demand)
    assert torch.equal(offloaded[1, 6:], torch.zeros(4, 16)), "padding is not routed"


@torch.no_grad()
def test_model_without_resident_experts_runs_on_a_provider(tiny_model_dir: Path) -> None:
    resident, _ = load_model(tiny_model_dir)
    bare, _ = load_model(tiny_model_dir, load_experts=False)
    expert_store = ExpertStore.open(tiny_model_dir, bare.config)
    act = ACTIVATIONS[bare.config.activation]
    for layer in bare.moe_layers():
        assert all(p.is_meta for p in layer.experts.parameters())
        store = {(layer.key, e): expert_store.mapped(layer.key, e) for e in range(layer.num_experts)}
        layer.expert_provider = ElsewhereProvider(store)
    ids = torch.tensor([[5, 17, 300, 42, 1]])
    dec = torch.tensor([[0, 8, 9, 10]])
    mask = torch.ones_like(ids)
    torch.testing.assert_close(bare(ids, mask, dec), resident(ids, mask, dec), atol=1e-5, rtol=1e-5)
    x = torch.randn(4, bare.config.d_model)
    w = next(iter(bare.moe_layers()[0].expert_provider.store.values()))  # type: ignore[attr-defined]
    assert feed_forward(x, w, act).shape == x.shape


class _Anticipating:
    """Serves `inner`'s experts and records what the model hands it, in order."""

    def __init__(self, inner: object, events: list[tuple[str, MoELayerKey, torch.Tensor]]) -> None:
        self.inner = inner
        self.events = events

    def anticipate(self, layer: MoELayerKey, hidden_ND: torch.Tensor) -> None:
        self.events.append(("anticipate", layer, hidden_ND.clone()))

    def fetch(
        self, layer: MoELayerKey, demand: Sequence[ExpertDemand], hidden_ND: torch.Tensor
    ) -> Iterable[tuple[int, ExpertWeights]]:
        self.events.append(("fetch", layer, hidden_ND.clone()))
        assert isinstance(self.inner, ResidentExpertProvider)
        yield from self.inner.fetch(layer, demand, hidden_ND)


@torch.no_grad()
def test_a_stack_hands_its_input_to_its_first_moe_layers_provider(tiny_model_dir: Path) -> None:
    """An `AnticipatingProvider` gets each stack's input, normed by the first MoE layer's norm, on
    every pass of the stack and before that layer's call, in the rows the call then gets (padding
    left out); what the model computes does not change."""
    model, _ = load_model(tiny_model_dir)
    # Norm weights apart from one another, so that rows through any norm but the first MoE layer's
    # own would differ.
    generator = torch.Generator().manual_seed(0)
    for name, parameter in model.named_parameters():
        if "norm" in name:
            parameter.data = 0.5 + torch.rand(parameter.shape, generator=generator)
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)
    requests = [GenerationRequest((5, 9, 13, 2, 7)[: 2 + i], params) for i in range(3)]  # ragged: padding
    expected = [r.token_ids for r in Generator(model).generate(requests)]
    events: list[tuple[str, MoELayerKey, torch.Tensor]] = []
    for layer in model.moe_layers():
        layer.expert_provider = _Anticipating(layer.expert_provider, events)
    # Each stack's input, as its first block gets it, and the rows the stack's first MoE layer sees.
    expected_rows: list[torch.Tensor] = []
    for stack, valid_at in ((model.encoder, 2), (model.decoder, 3)):
        assert stack.first_moe is not None
        first = stack.blocks[stack.first_moe]

        def record(
            module: nn.Module, args: tuple[Any, ...], first: nn.Module = first, valid_at: int = valid_at
        ) -> None:
            x_BTD, valid_BT = args[0], args[valid_at]
            rows = first.ff_norm(x_BTD).reshape(-1, x_BTD.shape[-1])
            expected_rows.append(rows if valid_BT is None or bool(valid_BT.all()) else rows[valid_BT.reshape(-1)])

        stack.blocks[0].register_forward_pre_hook(record)
    assert [r.token_ids for r in Generator(model).generate(requests)] == expected
    firsts = {f"{s.blocks[s.first_moe].mlp.key}" for s in (model.encoder, model.decoder) if s.first_moe is not None}
    anticipated = [(i, key, rows) for i, (kind, key, rows) in enumerate(events) if kind == "anticipate"]
    assert len(anticipated) == len(expected_rows) > 2  # the encoder pass and every decode step
    for (i, key, rows), wanted in zip(anticipated, expected_rows, strict=True):
        assert str(key) in firsts
        torch.testing.assert_close(rows, wanted)
        # The next call to that layer is this pass's, with the same rows.
        kind, _, fetched = next(e for e in events[i + 1 :] if e[1] == key)
        assert kind == "fetch"
        assert fetched.shape == rows.shape
