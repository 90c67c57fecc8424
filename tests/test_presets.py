"""Presets, parameter counts, random initialisation and byte sizes.

The CPM-2 sizes are the paper's (Zhang et al. 2021, SEED.md): CPM-2 has 11B parameters, CPM-2-MoE
198B with 32 experts in each of its 48 blocks; one expert is a gated FFN of 3 x 4096 x 10240. The
switch-base-like preset has google/switch-base-8's 619M. Counts are also checked against a closed
formula written out here, independently of the model code.
"""

from __future__ import annotations

import resource
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.config import ModelConfig
from engine.errors import ConfigError
from engine.experts.store import ExpertStore
from engine.sizes import format_bytes, parse_bytes
from engine.summary import summarize
from engine.weights.files import INDEX_FILE
from engine.weights.init import (
    PRESET_TOKENIZER_PIECES,
    init_std,
    plan_random_model,
    random_tensor,
    write_random_model,
)
from engine.weights.presets import PRESETS, get_preset

MiB = 2**20


def _formula_counts(c: ModelConfig) -> tuple[int, int]:
    """(total, expert) parameters of a T5-style model, written out by hand."""
    d, inner, ff = c.d_model, c.inner_dim, c.d_ff
    ffn = (3 if c.is_gated_ffn else 2) * d * ff
    total = c.vocab_size * d * (1 if c.tie_word_embeddings else 2)
    expert = 0
    for stack, layers in (("encoder", c.num_encoder_layers), ("decoder", c.num_decoder_layers)):
        total += c.relative_attention_num_buckets * c.num_heads + d  # relative bias, final norm
        moe_blocks = set(c.moe_layers(stack))
        for block in range(layers):
            total += 2 * d + 3 * d * inner + inner * d  # two norms, qkv, o
            if stack == "decoder":
                total += d + 4 * d * inner  # cross norm, q, kv, o
            if block in moe_blocks:
                assert c.moe is not None
                router = c.moe.num_experts * d + (c.moe.num_experts if c.moe.router_bias else 0)
                total += router + c.moe.num_experts * ffn
                expert += c.moe.num_experts * ffn
            else:
                total += ffn
    return total, expert


@pytest.mark.parametrize("name", list(PRESETS))
def test_summary_matches_formula(name: str) -> None:
    config = get_preset(name).config
    summary = summarize(config, torch.float16)
    total, expert = _formula_counts(config)
    assert summary.total_parameters == total
    assert summary.expert_parameters == expert
    assert summary.dense_parameters == total - expert
    assert summary.total_bytes == 2 * total


def test_cpm2_moe_198b_sizes() -> None:
    summary = summarize(get_preset("cpm2-moe-198b").config, torch.float16)
    assert round(summary.total_parameters / 1e9, 1) == 198.3
    assert summary.num_moe_layers == 48
    assert summary.num_experts_per_layer == 32
    assert summary.parameters_per_expert == 125_829_120 == 3 * 4096 * 10240
    assert summary.bytes_per_expert == 240 * MiB
    assert summary.expert_parameters == 48 * 32 * 125_829_120
    assert get_preset("cpm2-moe-198b").dtype == "float16"


def test_cpm2_11b_and_switch_base_sizes() -> None:
    dense = summarize(get_preset("cpm2-11b").config, torch.float16)
    assert round(dense.total_parameters / 1e9, 2) == 11.09
    assert dense.expert_parameters == 0
    assert dense.num_moe_layers == 0
    assert dense.parameters_per_expert == 0
    switch = summarize(get_preset("switch-base-like").config)
    assert round(switch.total_parameters / 1e6) == 619
    assert switch.num_moe_layers == 12
    assert switch.num_experts_per_layer == 8
    assert switch.parameters_per_expert == 2 * 768 * 3072
    # The MoE model is the dense one plus experts and centroids, minus the dense FFNs it replaced.
    moe = summarize(get_preset("cpm2-moe-198b").config)
    assert moe.dense_parameters == dense.total_parameters - 48 * 125_829_120 + 48 * 32 * 4096


def test_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="unknown preset 'huge'") as excinfo:
        get_preset("huge")
    assert all(name in str(excinfo.value) for name in PRESETS)


def test_plan_of_198b_allocates_nothing() -> None:
    config = get_preset("cpm2-moe-198b").config
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    plan, shapes = plan_random_model(config, dtype="float16")
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert (peak_after - peak_before) * 1024 < 512 * MiB  # the model itself is ~397 GB
    assert plan.num_parameters == summarize(config).total_parameters
    assert plan.num_bytes == 2 * plan.num_parameters
    assert sum(s.numel() for s in shapes.values()) == plan.num_parameters
    assert shapes["encoder.blocks.23.mlp.experts.31.wo.weight"] == (4096, 10240)


# ---- write_random_model -----------------------------------------------------------------------------


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """Dense tensors from the shards, experts from the expert store."""
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(path))
    store = ExpertStore.open(model_dir, get_preset("tiny").config)
    tensors.update((k, t.clone()) for k, t in store.iter_native_tensors())
    return tensors


def test_random_model_is_deterministic_per_seed(tiny_model_dir: Path, tmp_path: Path) -> None:
    # `tiny_model_dir` is seed 0 in one shard; rewrite seed 0 in many small shards, and seed 1.
    config = get_preset("tiny").config
    resharded, other = tmp_path / "seed0", tmp_path / "seed1"
    write_random_model(config, resharded, seed=0, max_shard_bytes=200_000, progress=False)
    write_random_model(config, other, seed=1, progress=False)
    assert len(list(resharded.glob("model-*-of-*.safetensors"))) > 2
    assert (resharded / INDEX_FILE).exists()

    reference = _tensors(tiny_model_dir)
    same = _tensors(resharded)
    assert same.keys() == reference.keys()
    assert all(torch.equal(same[k], reference[k]) for k in reference)
    assert (resharded / "spiece.model").read_bytes() == (tiny_model_dir / "spiece.model").read_bytes()

    different = _tensors(other)
    assert different.keys() == reference.keys()
    for key, tensor in reference.items():
        is_constant = key.endswith("norm.weight")
        assert torch.equal(different[key], tensor) == is_constant, key


def test_refuses_non_empty_output_dir(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        write_random_model(get_preset("tiny").config, out, progress=False)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_refuses_vocab_smaller_than_tokenizer(tmp_path: Path) -> None:
    need = PRESET_TOKENIZER_PIECES + 100
    config = get_preset("tiny").config.replace(vocab_size=need - 1)
    with pytest.raises(ConfigError, match=f"at least {need}"):
        write_random_model(config, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ---- initial values ---------------------------------------------------------------------------------


def test_centroids_are_orthogonal_rows_scaled_by_gain(tiny_model_dir: Path) -> None:
    config = get_preset("tiny").config
    assert config.moe is not None
    gain = config.moe.centroid_gain
    tensors = _tensors(tiny_model_dir)
    centroids = [t for k, t in tensors.items() if k.endswith("router.centroids")]
    assert len(centroids) == 4
    for c in centroids:
        assert c.shape == (4, 64)
        gram = c.double() @ c.double().T
        assert torch.allclose(gram, gain**2 * torch.eye(4, dtype=torch.double), atol=1e-9)
    assert not torch.equal(centroids[0], centroids[1])  # each layer draws its own


def test_initial_scales_follow_t5(tiny_model_dir: Path) -> None:
    config = get_preset("tiny").config
    d, dk, h, ff = config.d_model, config.d_kv, config.num_heads, config.d_ff
    tensors = _tensors(tiny_model_dir)
    expected = {
        "embed.weight": 1.0,
        "lm_head.weight": 1.0,
        "encoder.blocks.0.attn.o.weight": (h * dk) ** -0.5,
        "decoder.blocks.1.cross.q.weight": (d * dk) ** -0.5,
        "decoder.blocks.1.cross.kv.weight": d**-0.5,
        "encoder.blocks.1.mlp.experts.3.wi_0.weight": d**-0.5,
        "decoder.blocks.0.mlp.experts.0.wo.weight": ff**-0.5,
    }
    for key, std in expected.items():
        assert init_std(config, key) == pytest.approx(std)
        assert tensors[key].std().item() == pytest.approx(std, rel=0.1), key
        assert abs(tensors[key].mean().item()) < 0.1 * std, key
    qkv = tensors["decoder.blocks.0.attn.qkv.weight"]
    inner = config.inner_dim
    assert qkv[:inner].std().item() == pytest.approx((d * dk) ** -0.5, rel=0.1)
    assert qkv[inner:].std().item() == pytest.approx(d**-0.5, rel=0.1)
    assert torch.equal(tensors["encoder.blocks.0.ff_norm.weight"], torch.ones(d))
    with pytest.raises(KeyError):
        init_std(config, "encoder.blocks.0.mystery.weight")


def test_each_tensor_depends_only_on_seed_and_name(tiny_model_dir: Path) -> None:
    config = get_preset("tiny").config
    tensors = _tensors(tiny_model_dir)
    for key in ("decoder.blocks.1.mlp.experts.2.wi_1.weight", "encoder.relative_bias.weight"):
        drawn = random_tensor(config, key, tensors[key].shape, seed=0)
        assert torch.equal(drawn, tensors[key])
        assert not torch.equal(random_tensor(config, key, tensors[key].shape, seed=1), drawn)


# ---- byte sizes -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4096", 4096),
        ("1b", 1),
        ("512MiB", 512 * MiB),
        ("2GB", 2_000_000_000),
        ("1.5 GiB", 3 * 2**29),
        ("  10k ", 10 * 1024),
        ("3M", 3 * MiB),
        ("1TiB", 2**40),
        ("250kB", 250_000),
        (7, 7),
    ],
)
def test_parse_bytes(text: str | int, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "-1", "0", "0.4", "5 parsecs", "1.2.3", "MiB", 0, -3])
def test_parse_bytes_rejects(text: str | int) -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse_bytes(text, name="--max-shard-size")
    assert str(excinfo.value).startswith("--max-shard-size: ")
    assert repr(text) in str(excinfo.value)


@pytest.mark.parametrize(
    ("num", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (240 * MiB, "240.0 MiB"),
        (396_654_239_744, "369.4 GiB"),
        (2**50, "1024.0 TiB"),
    ],
)
def test_format_bytes(num: int, text: str) -> None:
    assert format_bytes(num) == text


def test_format_then_parse_round_trips() -> None:
    for num in (240 * MiB, 2 * 2**30, 4096):
        assert parse_bytes(format_bytes(num)) == num
