"""`cpm2 convert cpm2`: the released CPM-2 DeepSpeed rank files → a native directory.

A tiny native model is split here into exactly the released layout (`engine/weights/cpm2_layout.py`
documents it; this writer is an independent second implementation of it): 4 model-parallel ranks
for a dense model, 8 ranks x 8 experts for an MoE one, fused QKV interleaved per rank, vocab-parallel
embeddings, relative bias split by heads, `torch.save`d under `module` (or `model`) next to
DeepSpeed's plain training data. Invariants: the converted model's logits equal the original's
exactly (fp32); fp16 slices convert bit for bit; experts' differing norm copies fold exactly; no
pickle is ever executed; missing ranks and wrong shapes fail with typed errors naming file and key.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_tokenizer_cpm2 import vocab_lines, write_vocab

from cpm2.cli import main
from engine.config import ModelConfig, MoEConfig
from engine.errors import CheckpointError
from engine.model import Seq2SeqLM
from engine.weights.convert import convert_cpm2
from engine.weights.init import random_tensor
from engine.weights.loader import load_model

ITERATION = "3000"
VOCAB_HEAD = ["<pad>", "<eod>", "<s>", "<unk>", "</s>"]  # the released file has <pad> at 5, <eod> at 8


def _config(*, num_experts: int | None) -> ModelConfig:
    moe = None
    if num_experts is not None:
        moe = MoEConfig(num_experts=num_experts, router="centroid", encoder_layers=(0, 1), decoder_layers=(0, 1))
    return ModelConfig(
        vocab_size=96,
        d_model=32,
        num_heads=8,
        d_kv=4,
        d_ff=64,
        num_encoder_layers=2,
        num_decoder_layers=2,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=2,
        moe=moe,
    )


def _model(config: ModelConfig, seed: int = 0) -> Seq2SeqLM:
    model = Seq2SeqLM(config).eval()
    state = {}
    for key, value in model.state_dict().items():
        tensor = random_tensor(config, key, value.shape, seed=seed)
        if key.endswith("norm.weight"):  # not all ones, so a norm read from the wrong place shows
            tensor = 1 + 0.2 * torch.randn(value.shape, generator=torch.Generator().manual_seed(len(key)))
        state[key] = tensor
    model.load_state_dict(state)
    return model


# ---- the released layout, written independently of the converter -----------------------------------


def _rows(t: torch.Tensor, n: int, stride: int = 1) -> list[torch.Tensor]:
    """Column-parallel slices; a fused [Q; K; V] gives each rank [Q_r; K_r; V_r]."""
    parts = [p.chunk(n, dim=0) for p in t.chunk(stride, dim=0)]
    return [torch.cat([p[r] for p in parts]) for r in range(n)]


def _dense_slices(
    state: dict[str, torch.Tensor], n: int, stack_blocks: dict[str, int]
) -> list[dict[str, torch.Tensor]]:
    ranks: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]

    def put(name: str, slices: list[torch.Tensor]) -> None:
        for r in range(n):
            ranks[r][name] = slices[r].clone()

    put("word_embeds.weight", _rows(state["embed.weight"], n))
    put("lm_head.weight", _rows(state["lm_head.weight"], n))
    for stack, blocks in stack_blocks.items():
        put(f"{stack}.word_embeds.weight", _rows(state["embed.weight"], n))  # the stacks' alias
        put(f"{stack}.final_layernorm.weight", [state[f"{stack}.final_norm.weight"]] * n)
        bias = state[f"{stack}.relative_bias.weight"].chunk(n, dim=1)
        put(f"{stack}.blocks.0.self_attn.self_attn.relative_attention_bias.weight", list(bias))
        for i in range(blocks):
            b = f"{stack}.blocks.{i}"  # the same prefix in both layouts
            put(f"{b}.self_attn.layer_norm.weight", [state[f"{b}.attn_norm.weight"]] * n)
            put(f"{b}.self_attn.self_attn.project.weight", _rows(state[f"{b}.attn.qkv.weight"], n, 3))
            put(f"{b}.self_attn.self_attn.dense.weight", list(state[f"{b}.attn.o.weight"].chunk(n, dim=1)))
            if stack == "decoder":
                put(f"{b}.cross_attn.layer_norm.weight", [state[f"{b}.cross_norm.weight"]] * n)
                put(f"{b}.cross_attn.cross_attn.project_q.weight", _rows(state[f"{b}.cross.q.weight"], n))
                put(f"{b}.cross_attn.cross_attn.project_kv.weight", _rows(state[f"{b}.cross.kv.weight"], n, 2))
                put(f"{b}.cross_attn.cross_attn.dense.weight", list(state[f"{b}.cross.o.weight"].chunk(n, dim=1)))
    return ranks


def _ffn_slices(state: dict[str, torch.Tensor], prefix: str, n: int) -> list[dict[str, torch.Tensor]]:
    """`wi_0`, `wi_1`, `wo` of the FFN whose native keys start with `prefix`, per rank."""
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for name in ("wi_0", "wi_1", "wo"):
        t = state[f"{prefix}.{name}.weight"]
        for r, part in enumerate(t.chunk(n, dim=1) if name == "wo" else _rows(t, n)):
            out[r][f"dense_relu_dense.{name}.weight"] = part.clone()
    return out


def write_released(
    model: Seq2SeqLM,
    root: Path,
    *,
    num_ranks: int,
    dtype: torch.dtype = torch.float32,
    state_key: str = "module",
    with_world_size: bool = True,
    expert_norms: list[torch.Tensor] | None = None,
) -> Path:
    """`model` as `root/<ITERATION>/mp_rank_*_model_states.pt` plus the tracker file; returns `root`."""
    config = model.config
    state = {k: v.detach().to(dtype) for k, v in model.state_dict().items()}
    blocks = {"encoder": config.num_encoder_layers, "decoder": config.num_decoder_layers}
    dense = _dense_slices(state, num_ranks, blocks)
    num_experts = config.moe.num_experts if config.moe else 0
    files: dict[str, dict[str, torch.Tensor]] = {}
    for expert in range(num_experts) if num_experts else [None]:
        for rank in range(num_ranks):
            sd = dict(dense[rank])
            for stack, count in blocks.items():
                for i in range(count):
                    b = f"{stack}.blocks.{i}"
                    if expert is None:
                        sd[f"{b}.ff.layer_norm.weight"] = state[f"{b}.ff_norm.weight"]
                        ffn = _ffn_slices(state, f"{b}.mlp", num_ranks)[rank]
                        sd.update({f"{b}.ff.{k}": v for k, v in ffn.items()})
                        continue
                    norm = state[f"{b}.ff_norm.weight"] if expert_norms is None else expert_norms[expert].to(dtype)
                    sd[f"{b}.ff.expert_network.layer_norm.weight"] = norm.clone()
                    sd[f"{b}.ff.expert_centroids"] = state[f"{b}.mlp.router.centroids"].clone()
                    ffn = _ffn_slices(state, f"{b}.mlp.experts.{expert}", num_ranks)[rank]
                    sd.update({f"{b}.ff.expert_network.{k}": v for k, v in ffn.items()})
            name = f"mp_rank_{rank:02d}" if expert is None else f"mp_rank_{expert:02d}_{rank:02d}"
            files[f"{name}_model_states.pt"] = sd
    out = root / ITERATION
    out.mkdir(parents=True)
    for name, sd in files.items():
        # What DeepSpeed writes next to the weights: plain training data, NumPy RNG state included.
        meta = {"iteration": int(ITERATION), "np_rng_state": np.random.get_state(), "lr_scheduler": {"lr": 1e-4}}
        meta["random_rng_state"] = random.getstate()
        if with_world_size:
            meta["mp_world_size"] = num_ranks
        torch.save({state_key: sd, **meta}, out / name)
    (root / "latest_checkpointed_iteration.txt").write_text(ITERATION + "\n")
    (root / "vocab.txt").write_text("\n".join(VOCAB_HEAD + [f"w{i}" for i in range(config.vocab_size - 5)]) + "\n")
    released = {
        "d_model": config.d_model,
        "d_ff": config.d_ff,
        "d_kv": config.d_kv,
        "num_heads": config.num_heads,
        "num_layers": config.num_encoder_layers,
        "num_decoder_layers": config.num_decoder_layers,
        "relative_attention_num_buckets": config.relative_attention_num_buckets,
        "dropout_rate": 0.0,
        "feed_forward_proj": "relu",  # as in the released file; the CPM-2 code ignores it
        "init_method_std": 0.001,
        "layer_norm_epsilon": 1e-6,
    }
    (root / "cpm2_config.json").write_text(json.dumps(released))
    return root


# ---- fixtures and helpers ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> tuple[Seq2SeqLM, Path]:
    model = _model(_config(num_experts=None))
    return model, write_released(model, tmp_path_factory.mktemp("cpm2") / "dense", num_ranks=4)


@pytest.fixture(scope="module")
def moe(tmp_path_factory: pytest.TempPathFactory) -> tuple[Seq2SeqLM, Path]:
    model = _model(_config(num_experts=8), seed=1)
    root = tmp_path_factory.mktemp("cpm2") / "moe"
    return model, write_released(model, root, num_ranks=8, state_key="model", with_world_size=False)


def _logits(model: Seq2SeqLM) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (2, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    decoder_ids = torch.randint(3, model.config.vocab_size, (2, 5), generator=gen)
    with torch.no_grad():
        return model(ids, mask, decoder_ids)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rank_file(root: Path, name: str) -> Path:
    return root / ITERATION / f"{name}_model_states.pt"


# ---- conversion is exact ----------------------------------------------------------------------------


def test_dense_converts_exactly_through_the_cli(
    dense: tuple[Seq2SeqLM, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, src = dense
    dst = tmp_path / "native"
    code = main(["convert", "cpm2", str(src), str(dst), "--config", str(src / "cpm2_config.json")])
    assert code == 0, capsys.readouterr().err
    converted, info = load_model(dst, pack=False)
    assert torch.equal(_logits(converted), _logits(model))
    config = info.config
    assert (config.family, config.activation, config.is_gated_ffn, config.tie_word_embeddings) == (
        "cpm2",
        "gelu_new",
        True,
        False,
    )
    assert (config.pad_token_id, config.eos_token_id, config.decoder_start_token_id) == (0, 1, 2)  # from vocab.txt
    assert config.extra["model_parallel"] == 4
    assert (dst / "vocab.txt").read_text() == (src / "vocab.txt").read_text()


def test_converted_moe_generates_with_its_own_vocabulary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The whole path a user takes: released files + vocab.txt -> convert -> `cpm2 generate`, with the
    # jieba + WordPiece tokenizer and the special ids the converter read from vocab.txt.
    lines = vocab_lines()
    lines += [f"filler{i}" for i in range(-len(lines) % 8)]  # vocab-parallel: rows split evenly over 8 ranks
    config = _config(num_experts=8).replace(vocab_size=len(lines), pad_token_id=5, eos_token_id=7)
    src = write_released(_model(config, seed=2), tmp_path / "released", num_ranks=8)
    write_vocab(src, lines)
    dst = tmp_path / "native"
    assert main(["convert", "cpm2", str(src), str(dst), "--config", str(src / "cpm2_config.json")]) == 0
    capsys.readouterr()
    assert main(["generate", "--model", str(dst), "--json", "--max-new-tokens", "4", "北京 hello"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 1 <= len(result["token_ids"]) <= 4
    assert all(0 <= i < len(lines) for i in result["token_ids"])


def test_moe_converts_exactly(moe: tuple[Seq2SeqLM, Path], tmp_path: Path) -> None:
    # State dict under `model`, no mp_world_size: the rank count comes from the heads per rank.
    model, src = moe
    dst = convert_cpm2(src, tmp_path / "native", config_path=src / "cpm2_config.json", progress=False)
    converted, info = load_model(dst, pack=False)
    assert info.config.moe is not None
    assert info.config.moe.num_experts == 8
    assert info.config.moe.router == "centroid"
    assert info.config.extra["model_parallel"] == 8
    assert info.config.extra["folded_expert_norms"] == []
    assert (dst / "experts").is_dir()
    assert torch.equal(_logits(converted), _logits(model))


def test_fp16_slices_convert_bit_for_bit(tmp_path: Path) -> None:
    model = _model(_config(num_experts=None), seed=2)
    src = write_released(model, tmp_path / "fp16", num_ranks=4, dtype=torch.float16)
    dst = convert_cpm2(src, tmp_path / "native", config_path=src / "cpm2_config.json", progress=False)
    converted, info = load_model(dst, dtype="float32", pack=False)
    assert info.stored_dtype == torch.float16
    for key, value in model.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value.half().float()), key


def test_differing_expert_norms_fold_exactly(tmp_path: Path) -> None:
    model = _model(_config(num_experts=8), seed=3)
    gen = torch.Generator().manual_seed(5)
    norms = [1 + 0.3 * torch.randn(model.config.d_model, generator=gen) for _ in range(8)]
    src = write_released(model, tmp_path / "moe", num_ranks=8, expert_norms=norms)
    dst = convert_cpm2(src, tmp_path / "native", config_path=src / "cpm2_config.json", progress=False)
    converted, info = load_model(dst, pack=False)
    assert len(info.config.extra["folded_expert_norms"]) == 4
    got = converted.state_dict()
    want = model.state_dict()
    b = "decoder.blocks.1"
    assert torch.equal(got[f"{b}.ff_norm.weight"], torch.ones(model.config.d_model))
    # Expert e sees norm(x)·γ_e exactly as before: W·diag(γ_e) applied to norm(x).
    x = torch.randn(5, model.config.d_model, generator=gen)
    for e in (0, 7):
        before = (x * norms[e]) @ want[f"{b}.mlp.experts.{e}.wi_0.weight"].T
        after = x @ got[f"{b}.mlp.experts.{e}.wi_0.weight"].T
        torch.testing.assert_close(after, before)
    mean = torch.stack(norms).mean(0)
    torch.testing.assert_close(got[f"{b}.mlp.router.centroids"], want[f"{b}.mlp.router.centroids"] * mean)


def test_source_may_be_the_iteration_directory_or_name_one(dense: tuple[Seq2SeqLM, Path], tmp_path: Path) -> None:
    _, src = dense
    root = _copy(src, tmp_path / "src")
    (root / "latest_checkpointed_iteration.txt").unlink()
    shutil.copytree(root / ITERATION, root / "1000")  # two iterations and no tracker: ambiguous
    with pytest.raises(CheckpointError, match="--iteration"):
        convert_cpm2(root, tmp_path / "a", config_path=root / "cpm2_config.json", progress=False)
    convert_cpm2(root, tmp_path / "b", config_path=root / "cpm2_config.json", iteration="1000", progress=False)
    # Without --config and config.json the released shapes are assumed, which this tiny model is not.
    with pytest.raises(CheckpointError, match=r"num_heads|shape"):
        convert_cpm2(root / ITERATION, tmp_path / "c", progress=False)


# ---- refusals ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [1, 3])
def test_missing_rank_is_named(rank: int, dense: tuple[Seq2SeqLM, Path], tmp_path: Path) -> None:
    _, src = dense
    root = _copy(src, tmp_path / "src")
    # Without mp_world_size the last rank is only missed through the config's head count.
    if rank == 3:
        for r in range(3):
            path = _rank_file(root, f"mp_rank_{r:02d}")
            data = torch.load(path, weights_only=False)  # written by this test: trusted
            del data["mp_world_size"]
            torch.save(data, path)
    _rank_file(root, f"mp_rank_{rank:02d}").unlink()
    with pytest.raises(CheckpointError) as excinfo:
        convert_cpm2(root, tmp_path / "dst", config_path=root / "cpm2_config.json", progress=False)
    assert f"mp_rank_{rank:02d}_model_states.pt" in str(excinfo.value)
    assert f"rank {rank} of 4" in str(excinfo.value)
    assert not (tmp_path / "dst").exists()


def test_missing_expert_file_is_named(moe: tuple[Seq2SeqLM, Path], tmp_path: Path) -> None:
    _, src = moe
    root = _copy(src, tmp_path / "src")
    _rank_file(root, "mp_rank_05_02").unlink()
    with pytest.raises(CheckpointError, match=r"mp_rank_05_02_model_states\.pt.*expert 5 of 8"):
        convert_cpm2(root, tmp_path / "dst", config_path=root / "cpm2_config.json", progress=False)


class _Payload:
    """Unpickling this creates `path`: stands in for any code a hostile pickle would run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (str(self.path), "w")


def test_pickle_with_code_is_refused_and_never_run(dense: tuple[Seq2SeqLM, Path], tmp_path: Path) -> None:
    _, src = dense
    root = _copy(src, tmp_path / "src")
    marker = tmp_path / "pwned"
    path = _rank_file(root, "mp_rank_02")
    data = torch.load(path, weights_only=False)
    torch.save({**data, "args": _Payload(marker)}, path)
    torch.load(path, weights_only=False)  # the payload is live: an unsafe load runs it
    assert marker.exists()
    marker.unlink()

    with pytest.raises(CheckpointError) as excinfo:
        convert_cpm2(root, tmp_path / "dst", config_path=root / "cpm2_config.json", progress=False)
    assert str(path) in str(excinfo.value)
    assert "never runs code" in str(excinfo.value)
    assert not marker.exists()
    assert not (tmp_path / "dst").exists()


def test_wrong_shape_names_file_and_key(dense: tuple[Seq2SeqLM, Path], tmp_path: Path) -> None:
    _, src = dense
    root = _copy(src, tmp_path / "src")
    path = _rank_file(root, "mp_rank_01")
    data = torch.load(path, weights_only=False)  # written by this test: trusted
    key = "decoder.blocks.1.ff.dense_relu_dense.wi_1.weight"
    data["module"][key] = data["module"][key][:-1].clone()
    torch.save(data, path)
    with pytest.raises(CheckpointError, match=key) as excinfo:
        convert_cpm2(root, tmp_path / "dst", config_path=root / "cpm2_config.json", progress=False)
    assert str(root / "cpm2_config.json") in str(excinfo.value)
    assert not (tmp_path / "dst").exists()


def test_config_that_disagrees_is_refused(dense: tuple[Seq2SeqLM, Path], tmp_path: Path) -> None:
    _, src = dense
    config = json.loads((src / "cpm2_config.json").read_text())
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**config, "d_ff": 128}))
    with pytest.raises(CheckpointError, match=r"dense_relu_dense\.wi_0\.weight.*\[128, 32\]"):
        convert_cpm2(src, tmp_path / "a", config_path=bad, progress=False)
    bad.write_text(json.dumps({**config, "vocab_size": 100}))
    code = main(["convert", "cpm2", str(src), str(tmp_path / "b"), "--config", str(bad)])
    assert code == 2
