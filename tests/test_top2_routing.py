"""Top-2 routing's configuration and the refusals around NLLB-MoE's biased experts.

Parity of the routing and of whole NLLB-MoE models with transformers is in
tests/test_parity_nllb_moe.py; here: `MoEConfig` refuses top-2 settings that cannot work, with a
message that says what to change; `capacity` follows HF's rules; a model whose experts have biases
is refused by every path that would put them in the expert store (offloading, `cpm2 convert hf`),
before anything is written.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cpm2.cli import main
from engine.config import MoEConfig
from engine.errors import ConfigError, UnsupportedModelError
from engine.model.top2 import capacity, route_top2
from engine.offload import OffloadConfig, load_for_inference


def _moe(**changes: object) -> MoEConfig:
    fields: dict[str, object] = {
        "num_experts": 4,
        "router": "learned",
        "top_k": 2,
        "encoder_layers": (1,),
        "decoder_layers": (1,),
    }
    return MoEConfig(**{**fields, **changes})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"top_k": 3}, "top_k must be 1 or 2"),
        ({"router": "centroid"}, "top_k 2 needs router: learned"),
        ({"train_routing": "top1"}, "train_routing 'top1' is top-1 routing"),
        ({"top_k": 1, "batch_prioritized_routing": True}, "batch_prioritized_routing applies to top-2"),
        ({"top_k": 1, "route_padding": True}, "route_padding applies to top-2"),
        ({"expert_output_scale": 0.0}, "expert_output_scale must be > 0"),
    ],
)
def test_bad_top2_settings_are_refused(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _moe(**changes)


def test_capacity_follows_hf() -> None:
    assert capacity(_moe(), 10, training=False) == 10  # fraction 1.0: nothing is dropped
    assert capacity(_moe(eval_capacity_fraction=0.25), 10, training=False) == 3
    assert capacity(_moe(eval_capacity_fraction=None, expert_capacity=5), 10, training=False) == 5
    assert capacity(_moe(eval_capacity_fraction=0.0), 10, training=False) == 2 * 3  # 2 x ceil(10 / 4)
    assert capacity(_moe(eval_capacity_fraction=0.25), 10, training=True) == 6


def test_second_choice_is_never_the_first_and_gates_sum_to_one() -> None:
    generator = torch.Generator().manual_seed(0)
    logits_NE = torch.randn(50, 4, generator=generator) * 3
    probs_NE = torch.softmax(logits_NE, dim=-1)
    expert_N2, gate_N2, keep_N2 = route_top2(logits_NE, probs_NE, None, _moe(), training=False)
    assert torch.all(expert_N2[:, 0] != expert_N2[:, 1])
    assert torch.equal(expert_N2[:, 0], probs_NE.argmax(-1))
    assert bool(keep_N2.all())  # fraction 1.0 keeps every choice
    torch.testing.assert_close(gate_N2.sum(-1), torch.ones(50))


def test_capacity_drops_second_choices_first_and_padding_is_not_routed() -> None:
    generator = torch.Generator().manual_seed(1)
    logits_NE = torch.randn(40, 4, generator=generator) * 3
    probs_NE = torch.softmax(logits_NE, dim=-1)
    routed_N = torch.ones(40, dtype=torch.bool)
    routed_N[30:] = False
    moe = _moe(eval_capacity_fraction=0.25)  # 10 places per expert for 60 choices
    expert_N2, gate_N2, keep_N2 = route_top2(logits_NE, probs_NE, routed_N, moe, training=False)
    assert not keep_N2[30:].any()
    per_expert = torch.bincount(expert_N2[keep_N2], minlength=4)
    assert int(per_expert.max()) <= 10
    assert int(keep_N2[:, 1].sum()) < int(keep_N2[:, 0].sum())
    # A token that lost its second expert has all of its weight on the first (normalised after drops).
    lone = keep_N2[:, 0] & ~keep_N2[:, 1]
    assert bool(lone.any())
    torch.testing.assert_close(gate_N2[lone, 0], torch.ones(int(lone.sum())))


@pytest.fixture(scope="module")
def nllb_moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    transformers = pytest.importorskip("transformers")
    config = transformers.NllbMoeConfig(
        vocab_size=64,
        d_model=16,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        num_experts=4,
        encoder_sparse_step=2,
        decoder_sparse_step=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("nllb-moe")
    transformers.NllbMoeForConditionalGeneration(config).save_pretrained(path)
    return path


def test_biased_experts_load_resident_and_refuse_the_store(nllb_moe_dir: Path, tmp_path: Path) -> None:
    loaded = load_for_inference(nllb_moe_dir, progress=False)
    assert not loaded.is_offloaded
    assert loaded.model.config.moe is not None
    assert loaded.model.config.moe.top_k == 2
    with pytest.raises(UnsupportedModelError, match="experts have biases"):
        load_for_inference(nllb_moe_dir, offload=OffloadConfig(expert_memory="25%"), progress=False)
    out = tmp_path / "native"
    assert main(["convert", "hf", str(nllb_moe_dir), str(out)]) != 0
    assert not out.exists() or not any(out.iterdir()), "a refused conversion writes nothing"
