"""Top-2 routing's configuration and the refusals around NLLB-MoE's biased experts.

Parity of the routing and of whole NLLB-MoE models with transformers is in
tests/test_parity_nllb_moe.py; here: `MoEConfig` refuses top-2 settings that cannot work, with a
message that says what to change; `capacity` follows HF's rules; NLLB-MoE's biased experts go
through the expert store (offloaded = resident, bit for bit, at 25 % and 10 % in both modes),
`cpm2 convert hf` and `cpm2 quantize --experts int8`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from cpm2.cli import main
from engine.config import MoEConfig
from engine.errors import ConfigError
from engine.generation import GenerationRequest, Generator, SamplingParams
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


def _nllb_moe_config(
    *, vocab_size: int, d_model: int, layers: int, heads: int, ffn: int, experts: int, sparse_step: int, **rest: Any
) -> Any:
    """transformers' `NllbMoeConfig` with the same shape in encoder and decoder."""
    transformers = pytest.importorskip("transformers")
    return transformers.NllbMoeConfig(
        vocab_size=vocab_size,
        d_model=d_model,
        num_experts=experts,
        **{
            f"{stack}_{name}": value
            for stack in ("encoder", "decoder")
            for name, value in (
                ("layers", layers),
                ("attention_heads", heads),
                ("ffn_dim", ffn),
                ("sparse_step", sparse_step),
            )
        },
        **rest,
    )


@pytest.fixture(scope="module")
def nllb_moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_nllb_moe(tmp_path_factory.mktemp("nllb-moe"), d_model=16, ffn=32)


def _save_nllb_moe(path: Path, *, d_model: int, ffn: int) -> Path:
    transformers = pytest.importorskip("transformers")
    config = _nllb_moe_config(
        vocab_size=64,
        d_model=d_model,
        layers=4,
        heads=2,
        ffn=ffn,
        experts=16,
        sparse_step=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    transformers.NllbMoeForConditionalGeneration(config).save_pretrained(path)
    return path


def _forward(model: torch.nn.Module) -> torch.Tensor:
    """Teacher-forced logits of a fixed ragged batch (the second row padded)."""
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(4, 64, (2, 9), generator=generator)
    ids[1, 6:] = 1
    decoder = torch.randint(4, 64, (2, 5), generator=generator)
    decoder[:, 0] = 2
    with torch.inference_mode():
        return model(ids, (ids != 1).long(), decoder)


def _greedy(model: torch.nn.Module) -> list[list[int]]:
    requests = [
        GenerationRequest((5, 9, 17, 2), SamplingParams(max_new_tokens=6)),
        GenerationRequest((33, 2), SamplingParams(max_new_tokens=6)),
    ]
    return [r.token_ids for r in Generator(model).generate(requests)]


@pytest.mark.parametrize(
    "options", [{"expert_memory": "25%"}, {"expert_memory": "10%", "direct_io": True}], ids=["25%", "10%-strict"]
)
def test_offloaded_nllb_moe_equals_resident(nllb_moe_dir: Path, tmp_path: Path, options: dict[str, object]) -> None:
    """Biased experts go through the store, pool and provider like any other: same bits as resident."""
    resident = load_for_inference(nllb_moe_dir, progress=False)
    assert not resident.is_offloaded
    offloaded = load_for_inference(
        nllb_moe_dir,
        offload=OffloadConfig(store_dir=tmp_path, **options),
        progress=False,  # type: ignore[arg-type]
    )
    predictions: list[set[int]] = []

    class Recording(dict):  # type: ignore[type-arg]
        def __setitem__(self, key: object, value: set[int]) -> None:
            predictions.append(value)
            super().__setitem__(key, value)

    assert offloaded.provider is not None
    offloaded.provider._predicted = Recording()
    try:
        assert offloaded.is_offloaded
        assert torch.equal(_forward(offloaded.model), _forward(resident.model))
        assert _greedy(offloaded.model) == _greedy(resident.model)
        assert offloaded.provider is not None
        stats = offloaded.provider.stats
        assert stats.experts_run > 0
        # Strict mode reads every miss from the store (page-cache mode may compute from the mapping).
        assert stats.transfers > 0 or not options.get("direct_io")
        # Prefetch predicts both of a token's choices: every prediction holds at least two experts.
        assert predictions
        assert all(len(experts) >= 2 for experts in predictions)
    finally:
        offloaded.close()


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_nllb_moe_converts_and_quantises(nllb_moe_dir: Path, tmp_path: Path, fmt: str) -> None:
    """`cpm2 convert hf` keeps the experts' biases (same logits); `cpm2 quantize --experts int8|int4`
    keeps them float beside the quantised values, and the quantised model offloaded equals it resident.
    (Int4's smallest group, 32 inputs, needs wider matrices than the shared tiny model's 16.)"""
    if fmt == "int4":
        nllb_moe_dir = _save_nllb_moe(tmp_path / "hf", d_model=32, ffn=64)
    native = tmp_path / "native"
    assert main(["convert", "hf", str(nllb_moe_dir), str(native)]) == 0
    resident = load_for_inference(nllb_moe_dir, progress=False)
    converted = load_for_inference(native, progress=False)
    assert torch.equal(_forward(converted.model), _forward(resident.model))
    quantized = tmp_path / fmt
    group = ["--group-size", "32"] if fmt == "int4" else []
    command = ["quantize", "--model", str(native), "--out", str(quantized), "--experts", fmt, *group]
    assert main([*command, "--check-inputs", "2"]) == 0
    q_resident = load_for_inference(quantized, progress=False)
    q_offloaded = load_for_inference(
        quantized, offload=OffloadConfig(expert_memory="25%", direct_io=True), progress=False
    )
    try:
        assert q_offloaded.is_offloaded
        logits = _forward(q_offloaded.model)
        assert torch.equal(logits, _forward(q_resident.model))
        # Random weights at 4 bits move logits further than int8 does, still well within their range.
        bound = 0.1 if fmt == "int8" else 0.25
        assert (logits - _forward(resident.model)).abs().max() < bound * _forward(resident.model).abs().max()
    finally:
        q_offloaded.close()


def test_nllb_moe_54b_architecture_counts_as_published(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """NLLB-MoE 54B's architecture (NLLB Team 2022 and its model card: d_model 2048, 24 + 24 layers, FFN
    8192, 16 heads, 128 experts in every 4th layer, vocabulary 256206) through `cpm2 info`: the count
    equals transformers' own model built on the meta device from the same config.json, and the
    published 54.5B to its last digit. (Not the released config.json file, which is not at hand here.)"""
    transformers = pytest.importorskip("transformers")
    config = _nllb_moe_config(
        vocab_size=256206, d_model=2048, layers=24, heads=16, ffn=8192, experts=128, sparse_step=4
    )
    path = tmp_path / "config.json"
    path.write_text(config.to_json_string())
    with torch.device("meta"):
        reference = transformers.NllbMoeForConditionalGeneration(config)
    expected = sum(p.numel() for p in reference.parameters())  # the tied head counted once
    capsys.readouterr()
    assert main(["info", "--model", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["summary"]["total_parameters"] == expected
    assert abs(expected - 54.5e9) <= 0.05e9
    assert main(["info", "--model", str(path)]) == 0
    assert "top-2" in capsys.readouterr().out
