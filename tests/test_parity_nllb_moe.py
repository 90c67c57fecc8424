"""cpm2 against HF transformers on random-weight NLLB-MoE models (`NllbMoeForConditionalGeneration`).

NLLB-MoE (Costa-jussà et al. 2022, fairseq's `Top2Gate`) routes every token to two experts: the
argmax of the router probabilities and the argmax of the logits without it, gated by their
renormalised probabilities; at inference each expert takes at most ceil(fraction x tokens of the
forward pass) tokens, and every expert output is scaled by 1 - `moe_token_dropout`.

Checks, on tiny models built here (fp32, eval mode, one per routing option: capacity dropping in
token order and batch-prioritised, gates normalised before dropping, padding routed, no token
dropout, a router bias, MoE in every block or one block per stack): teacher-forced logits within
1e-4 of HF's on a ragged, padded batch, packed and plain weights (with the capacity cases asserting
that HF's router really dropped tokens, so the case means something); greedy and beam tokens equal
to HF's on a ragged batch; the translated config (top-2, MoE blocks, output scale, routing flags);
the refusal of the random second-expert policies.

The reference is HF's router as it stands but not HF's expert combination: transformers 5.25's
`NllbMoeExperts.forward` is broken (see `_fairseq_experts_forward`), so this module replaces it with
the computation of transformers 4.x and fairseq, and `test_hf_expert_combination_is_still_broken`
tells when upstream fixes it.

Capacity counts every token of a forward pass (batch x padded length), so the capacity cases compare
only full-batch forwards shaped exactly as HF's; generation runs on fraction 1.0, where nothing is
dropped and rows cannot interact.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from test_parity_m2m100 import _batch, _hf_generate, _max_diff, _rows
from transformers import NllbMoeConfig, NllbMoeForConditionalGeneration
from transformers.models.nllb_moe.modeling_nllb_moe import NllbMoeExperts, NllbMoeSparseMLP, NllbMoeTop2Router

from engine.errors import UnsupportedModelError
from engine.generation import GenerationRequest, Generator, SamplingParams
from engine.weights.hf import hf_to_config
from engine.weights.loader import load_model

EOS = 2
VOCAB = 96
NUM_LAYERS = 4

NLLB_MOE_COMMON: dict[str, Any] = {
    "vocab_size": VOCAB,
    "d_model": 32,
    "encoder_layers": NUM_LAYERS,
    "decoder_layers": NUM_LAYERS,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
    "num_experts": 8,
    "encoder_sparse_step": 2,
    "decoder_sparse_step": 2,
    "max_position_embeddings": 128,
    "expert_capacity": 64,
    "bos_token_id": 0,
    "pad_token_id": 1,
    "eos_token_id": 2,
    "decoder_start_token_id": 2,
    # Larger than HF's 0.02, so that logits spread and a wrong detail shows.
    "init_std": 0.3,
}

# Config overrides per case. Capacity cases use fraction 0.25: 4 x 23 encoder tokens give each of the 8
# experts room for 23 choices, which a skewed router overflows (asserted in the logits test).
NLLB_MOE_CASES: dict[str, dict[str, Any]] = {
    "defaults": {},
    "capacity": {"moe_eval_capacity_token_fraction": 0.25},
    "capacity-batch-prioritized": {"moe_eval_capacity_token_fraction": 0.25, "batch_prioritized_routing": True},
    "capacity-normalize-before-dropping": {
        "moe_eval_capacity_token_fraction": 0.25,
        "normalize_router_prob_before_dropping": True,
    },
    # Padding routed like any token: it only shows where it takes capacity from real tokens.
    "capacity-route-padding": {"moe_eval_capacity_token_fraction": 0.25, "router_ignore_padding_tokens": True},
    "no-token-dropout": {"moe_token_dropout": 0.0},
    "router-bias": {"router_bias": True},
    "sparse-step-1": {"encoder_sparse_step": 1, "decoder_sparse_step": 1},
    "sparse-step-4": {"encoder_sparse_step": 4, "decoder_sparse_step": 4},
}
CASES = list(NLLB_MOE_CASES)
CAPACITY_CASES = [name for name in CASES if NLLB_MOE_CASES[name].get("moe_eval_capacity_token_fraction", 1.0) < 1]
FULL_CAPACITY_CASES = [name for name in CASES if name not in CAPACITY_CASES]


def _fairseq_experts_forward(
    self: NllbMoeExperts, hidden_TD: torch.Tensor, router_mask_TE: torch.Tensor, router_probs_TE: torch.Tensor
) -> torch.Tensor:
    """NLLB-MoE's expert combination as transformers 4.x and fairseq compute it (T tokens, D width,
    E experts): every (token, expert) pair with a positive combining weight runs that expert, whose
    output is scaled by 1 - `moe_token_dropout` at eval, then by the weight; a token sums its pairs.

    Why a replacement: transformers 5.25's `NllbMoeExperts.forward` one-hot-encodes `router_mask`,
    which already is the one-hot top-1 mask, so the classes it loops over are the mask's values 0
    and 1, not experts: it runs `expert_0` on every token weighted by the token's second gate and
    `expert_1` weighted by its first, never the token's own two experts. The router
    (`NllbMoeTop2Router`) is left as HF has it; it is the reference for routing.
    """
    del router_mask_TE  # the combining weights say everything: a dropped or unrouted pair has weight 0
    out_TD = torch.zeros_like(hidden_TD)
    for e in range(self.num_experts):
        tokens = (router_probs_TE[:, e] > 0).nonzero().squeeze(-1)
        if tokens.numel() == 0:
            continue
        y_TD = self[f"expert_{e}"](hidden_TD[tokens])
        if self.moe_token_dropout > 0:
            y_TD = self.token_dropout(y_TD) if self.training else y_TD * (1 - self.moe_token_dropout)
        out_TD.index_add_(0, tokens, (router_probs_TE[tokens, e, None] * y_TD).to(out_TD.dtype))
    return out_TD


_HF_EXPERTS_FORWARD = NllbMoeExperts.forward


@pytest.fixture(scope="module", autouse=True)
def _fairseq_expert_combination() -> Iterator[None]:
    """Every HF NLLB-MoE forward in this module combines experts as transformers 4.x did."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(NllbMoeExperts, "forward", _fairseq_experts_forward)
        yield


def build_nllb_moe(name: str, seed: int) -> NllbMoeForConditionalGeneration:
    """A random-weight HF NLLB-MoE model of case `name` in eval mode, routing far from uniform."""
    torch.manual_seed(seed)
    model = NllbMoeForConditionalGeneration(NllbMoeConfig(**{**NLLB_MOE_COMMON, **NLLB_MOE_CASES[name]})).eval()
    with torch.no_grad():
        for key, param in model.named_parameters():
            # HF initialises biases (expert ones included) to 0 and LayerNorms to 1, which would hide a
            # bias or norm mapped wrong.
            if key.endswith(".bias") or "layer_norm" in key:
                param.add_(torch.randn_like(param) * 0.2)
            # Peaked routing (first choice ~0.7, second ~0.17 on average), so that a wrong expert or
            # gate shows and capacity overflows.
            if "router.classifier" in key:
                param.mul_(2.0)
    return model


@pytest.fixture(scope="module")
def nllb_moe_models(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, tuple[NllbMoeForConditionalGeneration, Path]]:
    """Each case's HF model (seed = its position) and its `save_pretrained` directory (safetensors,
    transformers 5.x's only format), by name."""
    root = tmp_path_factory.mktemp("nllb_moe")
    models = {}
    for i, name in enumerate(CASES):
        hf = build_nllb_moe(name, seed=i)
        hf.save_pretrained(root / name)
        models[name] = (hf, root / name)
    return models


def _teacher_forced(seed: int, *, is_decoder_ragged: bool = True) -> tuple[torch.Tensor, ...]:
    ids, mask = _batch(_rows([23, 9, 1, 16], VOCAB, seed))  # (4, 23)
    lengths = [6, 3, 6, 1] if is_decoder_ragged else [6, 6, 6, 6]
    decoder_ids, decoder_mask = _batch([[EOS, *r] for r in _rows(lengths, VOCAB, seed + 1)])  # (4, 7)
    return ids, mask, decoder_ids, decoder_mask


def _routing_recorder(drops: list[tuple[int, int]]) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """A `route_tokens` that routes as HF does and appends (tokens in the pass, choices capacity
    dropped) to `drops`: routed choices at fraction 1.0 (which never drops) minus those routed."""
    route = NllbMoeTop2Router.route_tokens

    def recording(self: NllbMoeTop2Router, logits_NE: torch.Tensor, *args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        mask_NE, probs_NE = route(self, logits_NE, *args)
        fraction = self.moe_eval_capacity_token_fraction
        self.moe_eval_capacity_token_fraction = 1.0
        try:
            _, unlimited_NE = route(self, logits_NE, *args)
        finally:
            self.moe_eval_capacity_token_fraction = fraction
        drops.append((logits_NE.shape[0], int((unlimited_NE > 0).sum() - (probs_NE > 0).sum())))
        return mask_NE, probs_NE

    return recording


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "plain"])
@pytest.mark.parametrize("name", CASES)
def test_logits_match_hf(
    name: str,
    pack: bool,
    nllb_moe_models: dict[str, tuple[NllbMoeForConditionalGeneration, Path]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One full-batch forward, the same batch and padded lengths as HF's, so that capacity (which
    counts every token of the pass, padding included) binds on the same tokens."""
    hf, path = nllb_moe_models[name]
    model, info = load_model(path, pack=pack)
    assert (info.source_format, info.config.family) == ("hf", "nllb-moe")
    # Routed padding takes capacity with whatever hidden state it has; HF computes padded decoder
    # positions unlike cpm2 (which never reads them), so that case pads the encoder input only.
    ids, mask, decoder_ids, decoder_mask = _teacher_forced(seed=1, is_decoder_ragged=name != "capacity-route-padding")
    drops: list[tuple[int, int]] = []
    monkeypatch.setattr(NllbMoeTop2Router, "route_tokens", _routing_recorder(drops))
    with torch.no_grad():
        expected = hf(
            input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids, decoder_attention_mask=decoder_mask
        ).logits  # (4, 7, V)
        got = model(ids, mask, decoder_ids, decoder_mask)
    assert got.shape == expected.shape
    if name in CAPACITY_CASES:  # HF dropped choices in both stacks: the case tests capacity
        assert sum(n for tokens, n in drops if tokens == ids.numel()) > 0
        assert sum(n for tokens, n in drops if tokens == decoder_ids.numel()) > 0
    else:
        assert all(n == 0 for _, n in drops)
    # Padded decoder positions differ by design (HF also hides them as keys; they are never read).
    assert _max_diff(got, expected, decoder_mask) <= 1e-4


# Random models tend to repeat one token; a repetition penalty makes them wander, so that every
# position's logits decide something.
@pytest.mark.parametrize("penalty", [None, 1.5], ids=["greedy", "repetition-penalty"])
@pytest.mark.parametrize("name", FULL_CAPACITY_CASES)
def test_greedy_ragged_batch_matches_hf(
    name: str, penalty: float | None, nllb_moe_models: dict[str, tuple[NllbMoeForConditionalGeneration, Path]]
) -> None:
    hf, path = nllb_moe_models[name]
    model, _ = load_model(path)
    rows = _rows([5, 17, 9, 30], VOCAB, seed=3)
    expected = _hf_generate(hf, rows, max_new_tokens=20, repetition_penalty=penalty)
    # At fraction 1.0 no choice is dropped, so rows do not interact (in HF either).
    assert expected == [_hf_generate(hf, [row], max_new_tokens=20, repetition_penalty=penalty)[0] for row in rows]
    params = SamplingParams(max_new_tokens=20, repetition_penalty=penalty)
    got = Generator(model).generate([GenerationRequest(tuple(r), params) for r in rows])
    assert [r.token_ids for r in got] == expected


@pytest.mark.parametrize("num_beams", [2, 4])
@pytest.mark.parametrize("name", ["defaults", "sparse-step-1"])
def test_beam_search_matches_hf(
    name: str, num_beams: int, nllb_moe_models: dict[str, tuple[NllbMoeForConditionalGeneration, Path]]
) -> None:
    hf, path = nllb_moe_models[name]
    model, _ = load_model(path)
    rows = _rows([6, 13, 21], VOCAB, seed=4)
    for length_penalty in (1.0, 0.5):
        expected = _hf_generate(hf, rows, max_new_tokens=15, num_beams=num_beams, length_penalty=length_penalty)
        params = SamplingParams(max_new_tokens=15, num_beams=num_beams, length_penalty=length_penalty)
        got = Generator(model).generate([GenerationRequest(tuple(r), params) for r in rows])
        assert [r.token_ids for r in got] == expected


def _hf_sparse_blocks(step: int) -> tuple[int, ...]:
    # `NllbMoeEncoder.__init__` / `NllbMoeDecoder.__init__`: block i is sparse when (i + 1) % step == 0.
    return tuple(i for i in range(NUM_LAYERS) if step > 0 and (i + 1) % step == 0)


@pytest.mark.parametrize("name", CASES)
def test_config_translates(name: str, nllb_moe_models: dict[str, tuple[NllbMoeForConditionalGeneration, Path]]) -> None:
    hf, path = nllb_moe_models[name]
    data = json.loads((path / "config.json").read_text())
    config = hf_to_config(data, has_lm_head=False, source=f"{name}/config.json")
    moe = config.moe
    assert moe is not None
    assert (moe.num_experts, moe.router, moe.top_k) == (8, "learned", 2)
    assert moe.encoder_layers == _hf_sparse_blocks(hf.config.encoder_sparse_step)
    assert moe.decoder_layers == _hf_sparse_blocks(hf.config.decoder_sparse_step)
    for stack, layers in (("encoder", moe.encoder_layers), ("decoder", moe.decoder_layers)):
        assert layers == tuple(i for i, block in enumerate(getattr(hf.model, stack).layers) if block.is_sparse)
    assert math.isclose(moe.expert_output_scale, 1 - hf.config.moe_token_dropout)
    assert moe.eval_capacity_fraction == hf.config.moe_eval_capacity_token_fraction
    assert moe.batch_prioritized_routing == hf.config.batch_prioritized_routing
    assert moe.normalize_gates_before_capacity == hf.config.normalize_router_prob_before_dropping
    assert moe.router_bias == hf.config.router_bias
    assert moe.route_padding == hf.config.router_ignore_padding_tokens
    assert config.family == "nllb-moe"
    assert (config.has_ffn_bias, config.pad_token_id, config.eos_token_id) == (True, 1, 2)


@pytest.mark.parametrize("policy", ["random", "sampling"])
def test_random_second_expert_policies_are_refused(
    policy: str, nllb_moe_models: dict[str, tuple[NllbMoeForConditionalGeneration, Path]]
) -> None:
    """fairseq's `random` and `sampling` second-expert policies draw random numbers at inference."""
    _, path = nllb_moe_models["defaults"]
    data = {**json.loads((path / "config.json").read_text()), "second_expert_policy": policy}
    with pytest.raises(UnsupportedModelError, match="second_expert_policy"):
        hf_to_config(data, has_lm_head=False, source="nllb-moe/config.json")


def test_hf_expert_combination_is_still_broken() -> None:
    """Documents the upstream bug `_fairseq_experts_forward` works around, on one tiny layer: HF's
    output is `expert_1` weighted by each token's first gate plus `expert_0` weighted by its second.

    When this fails, transformers has fixed `NllbMoeExperts.forward`: delete `_fairseq_experts_forward`,
    its fixture and this test, so that HF is the reference as it stands.
    """
    torch.manual_seed(0)
    config = NllbMoeConfig(**{**NLLB_MOE_COMMON, "num_experts": 4})
    layer = NllbMoeSparseMLP(config, ffn_dim=config.encoder_ffn_dim).eval()
    experts = layer.experts
    x_TD = torch.randn(10, config.d_model)
    with torch.no_grad():
        top1_mask_TE, router_probs_TE, _ = layer.router(x_TD)
        assert (router_probs_TE > 0).sum(dim=1).eq(2).all()  # two experts per token, none dropped
        hf_TD = _HF_EXPERTS_FORWARD(experts, x_TD, top1_mask_TE, router_probs_TE)
        fairseq_TD = _fairseq_experts_forward(experts, x_TD, top1_mask_TE, router_probs_TE)
        gate1_T1 = (router_probs_TE * top1_mask_TE).sum(dim=1, keepdim=True)
        gate2_T1 = (router_probs_TE * (1 - top1_mask_TE)).sum(dim=1, keepdim=True)
        bug_TD = (experts["expert_1"](x_TD) * gate1_T1 + experts["expert_0"](x_TD) * gate2_T1) * (
            1 - config.moe_token_dropout
        )
    assert (hf_TD - fairseq_TD).abs().max().item() > 0.1
    torch.testing.assert_close(hf_TD, bug_TD)
