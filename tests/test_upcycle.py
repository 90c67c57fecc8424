"""Dense → MoE upcycling (CPM-2-MoE, SEED.md): the key map, the step-0 function, the job.

The invariant that matters: at step 0 the upcycled MoE computes the dense model's function, since
every expert is a copy of the dense FFN and CPM-2 routing does not scale the expert output. In
float64 the logits agree to 1e-12; in float32 they agree bit for bit except where an expert's slice
holds a single token, which the CPU matmul runs through its one-row (GEMV) kernel with another
summation order (measured ≤ 4e-7 of the largest logit), so float32 is checked to 1e-6 of it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.config import ModelConfig
from engine.errors import ConfigError
from engine.experts.store import STORE_DIR
from engine.model import Seq2SeqLM
from engine.weights.init import random_tensor, write_random_model
from engine.weights.loader import load_model
from engine.weights.presets import get_preset
from training.cli import TRAIN_COMMANDS
from training.config import parse_job_config
from training.jobs.export import write_model_dir
from training.jobs.upcycle import UpcycleConfig, add_upcycle_command, upcycle
from training.upcycle import upcycle_config, upcycle_key_map, upcycle_model

DENSE = get_preset("tiny").config.replace(moe=None)


def _dense(dtype: torch.dtype = torch.float32) -> Seq2SeqLM:
    with torch.device("meta"):
        model = Seq2SeqLM(DENSE)
    state = {k: random_tensor(DENSE, k, v.shape, seed=0).to(dtype) for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    return model.eval()


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 1000, (4, 16), generator=gen)
    mask = torch.ones(4, 16, dtype=torch.long)
    mask[1, 9:] = 0
    return ids, mask, torch.randint(2, 1000, (4, 9), generator=gen)


def test_key_map_copies_the_dense_ffn_into_every_expert() -> None:
    config = upcycle_config(DENSE, num_experts=3, decoder_layers=(1,))
    mapping = upcycle_key_map(config)
    assert mapping["encoder.blocks.0.mlp.experts.2.wi_1.weight"] == "encoder.blocks.0.mlp.wi_1.weight"
    assert mapping["decoder.blocks.1.mlp.experts.0.wo.weight"] == "decoder.blocks.1.mlp.wo.weight"
    assert mapping["decoder.blocks.0.mlp.wo.weight"] == "decoder.blocks.0.mlp.wo.weight"  # stays dense
    assert mapping["encoder.blocks.1.ff_norm.weight"] == "encoder.blocks.1.ff_norm.weight"  # shared norm
    fresh = sorted(k for k, v in mapping.items() if v is None)
    assert fresh == ["decoder.blocks.1.mlp.router.centroids"] + [
        f"encoder.blocks.{i}.mlp.router.centroids" for i in range(2)
    ]
    with torch.device("meta"):
        dense_keys = set(Seq2SeqLM(DENSE).state_dict())
    assert {v for v in mapping.values() if v is not None} == dense_keys  # every dense tensor is used


def test_upcycled_model_starts_as_copies_with_frozen_orthogonal_centroids() -> None:
    dense = _dense()
    moe = upcycle_model(dense, upcycle_config(DENSE, num_experts=8), seed=0)
    for layer in moe.moe_layers():
        source = dict(dense.named_modules())[f"{layer.key.stack}.blocks.{layer.key.block}.mlp"]
        for expert in layer.experts:
            for name in ("wi_0", "wi_1", "wo"):
                copy, original = getattr(expert, name).weight, getattr(source, name).weight
                assert torch.equal(copy, original)
                assert copy.data_ptr() != original.data_ptr()  # independent tensors that train apart
        centroids = layer.router.centroids
        torch.testing.assert_close(centroids @ centroids.T, 0.01**2 * torch.eye(8), atol=1e-9, rtol=0)
    assert not any("centroids" in name for name, _ in moe.named_parameters())
    with pytest.raises(ConfigError, match="already has MoE"):
        upcycle_config(get_preset("tiny").config, num_experts=8)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_upcycled_model_computes_the_dense_function_at_step_0(dtype: torch.dtype) -> None:
    dense = _dense(dtype)
    for routing in ("balanced", "inference"):
        moe = upcycle_model(dense, upcycle_config(DENSE, num_experts=8, train_routing=routing), seed=0)
        for seed in range(3):
            ids, mask, dec = _batch(seed)
            with torch.no_grad():
                want = dense(ids, mask, dec)
                got_eval = moe.eval()(ids, mask, dec)
            got_train = moe.train()(ids, mask, dec)  # dropout 0: only the routing differs
            atol = 1e-12 if dtype == torch.float64 else 1e-6 * float(want.abs().max())
            torch.testing.assert_close(got_eval, want, atol=atol, rtol=0)
            torch.testing.assert_close(got_train.detach(), want, atol=atol, rtol=0)


def test_moe_model_dir_is_servable_with_experts_in_the_store(tmp_path: Path) -> None:
    moe = upcycle_model(_dense(), upcycle_config(DENSE, num_experts=4), seed=0)
    tokenizer_dir = tmp_path / "tok"
    tokenizer_dir.mkdir()
    (tokenizer_dir / "spiece.model").write_bytes(b"not parsed here")
    out = write_model_dir(moe, tmp_path / "moe", tokenizer_dir=tokenizer_dir, producer="test")
    assert (out / STORE_DIR).is_dir()
    loaded, info = load_model(out, pack=False)
    assert info.config.moe == moe.config.moe
    ids, mask, dec = _batch(0)
    with torch.no_grad():
        assert torch.equal(loaded(ids, mask, dec), moe.eval()(ids, mask, dec))


def test_upcycle_job_trains_and_exports_an_moe_model(tmp_path: Path) -> None:
    dense_dir = tmp_path / "dense"
    write_random_model(DENSE, dense_dir, progress=False)
    raw = {
        "model": {"dir": str(dense_dir)},
        "steps": 3,
        "batch_size": 2,
        "log_every": 1,
        "optimizer": {"lr": 1e-3},
        "span": {"encoder_length": 32, "decoder_length": 8},
        "upcycle": {"num_experts": 4, "encoder_layers": [1]},
        "output_dir": str(tmp_path / "run"),
        "progress": False,
    }
    config = parse_job_config(raw, UpcycleConfig)
    out = upcycle(config, device="cpu")
    model, info = load_model(out, pack=False)
    assert info.config.moe is not None
    assert info.config.moe.encoder_layers == (1,)
    assert info.config.moe.decoder_layers == (0, 1)
    assert info.config.moe.train_routing == "balanced"
    assert info.config.extra["trained_steps"] == 3
    assert (out / STORE_DIR).is_dir()
    # Training moved the experts apart from their dense origin (all experts got tokens).
    dense, _ = load_model(dense_dir, pack=False)
    layer = model.moe_layers()[0]
    assert not torch.equal(layer.experts[0].wi_0.weight, dense.encoder.blocks[1].mlp.wi_0.weight)
    assert not torch.equal(layer.experts[0].wi_0.weight, layer.experts[1].wi_0.weight)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    assert add_upcycle_command in TRAIN_COMMANDS


def test_upcycle_config_rejects_top1_with_centroids(tmp_path: Path) -> None:
    config = ModelConfig.from_dict(DENSE.to_dict())
    with pytest.raises(ConfigError, match="router: learned"):
        upcycle_config(config, num_experts=4, train_routing="top1")
