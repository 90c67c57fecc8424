"""Checkpoint files: sharded round trips, memory-mapped loading, HF conversion and load errors.

Invariants: a model re-written into shards loads to identical logits and keeps each expert in one
contiguous byte range of one shard; loading in the stored dtype maps the file instead of copying it;
`convert_hf` of safetensors and of pickled checkpoints matches the HF source (and HF itself); no
pickle is ever executed; every broken directory fails with a typed error naming the file and key.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import HF_CASES, build_hf_model
from safetensors.torch import load_file, save_file

from cpm2.cli import main
from engine.errors import CheckpointError, ConfigError, UnsupportedModelError
from engine.weights.convert import convert_hf
from engine.weights.files import INDEX_FILE, SINGLE_FILE, ShardWriter
from engine.weights.loader import load_model

EXPERT_KEY = re.compile(r"^(.*\.experts\.\d+)\.")
TensorEdit = Callable[[dict[str, torch.Tensor]], None]


def _inputs(vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, vocab, (3, 11), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    decoder_ids = torch.randint(2, vocab, (3, 6), generator=gen)
    decoder_ids[:, 0] = 0
    return ids, mask, decoder_ids


def _logits(model_dir: Path, **kwargs) -> torch.Tensor:
    model, info = load_model(model_dir, **kwargs)
    with torch.no_grad():
        return model(*_inputs(info.config.vocab_size))


def _byte_ranges(path: Path) -> dict[str, tuple[int, int]]:
    """Data offsets of every tensor of a safetensors file, read from its header."""
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return {key: tuple(entry["data_offsets"]) for key, entry in header.items()}


def _shard_native(src: Path, dst: Path, max_shard_bytes: int) -> None:
    model, _ = load_model(src, pack=False)
    writer = ShardWriter(dst, max_shard_bytes=max_shard_bytes)
    for key, tensor in model.state_dict().items():
        writer.add(key, tensor)
    writer.close()
    shutil.copy2(src / "config.json", dst / "config.json")


# ---- native round trip ------------------------------------------------------------------------------


def test_sharded_copy_loads_to_identical_logits(tiny_model_dir: Path, tmp_path: Path) -> None:
    _shard_native(tiny_model_dir, tmp_path, max_shard_bytes=300_000)
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2
    assert not (tmp_path / SINGLE_FILE).exists()
    weight_map = json.loads((tmp_path / INDEX_FILE).read_text())["weight_map"]
    assert sorted(set(weight_map.values())) == [p.name for p in shards]
    assert torch.equal(_logits(tmp_path, pack=False), _logits(tiny_model_dir, pack=False))


@pytest.mark.parametrize("max_shard_bytes", [150_000, 300_000, 1_000_000])
def test_each_expert_is_one_byte_range_of_one_shard(tiny_model_dir: Path, tmp_path: Path, max_shard_bytes: int) -> None:
    # The offloader reads an expert as one contiguous range: the writer must never split one.
    _shard_native(tiny_model_dir, tmp_path, max_shard_bytes=max_shard_bytes)
    weight_map = json.loads((tmp_path / INDEX_FILE).read_text())["weight_map"]
    experts: dict[str, list[str]] = {}
    for key in weight_map:
        if m := EXPERT_KEY.match(key):
            experts.setdefault(m.group(1), []).append(key)
    assert len(experts) == 4 * 4
    split = sorted(name for name, keys in experts.items() if len({weight_map[k] for k in keys}) > 1)
    assert split == [], f"experts split across shards: {split}"
    for keys in experts.values():
        ranges = sorted(_byte_ranges(tmp_path / weight_map[keys[0]])[k] for k in keys)
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))


# ---- memory mapping ---------------------------------------------------------------------------------


def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    target = str(path.resolve())
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] == target:
            start, end = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((start, end))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc/self/maps")
def test_loading_in_stored_dtype_maps_the_file(tiny_model_dir: Path) -> None:
    model, info = load_model(tiny_model_dir, pack=False)
    assert info.stored_dtype == torch.float32
    ranges = _mapped_ranges(tiny_model_dir / SINGLE_FILE)
    assert ranges, "the checkpoint file is not memory-mapped"
    for expert_file in sorted((tiny_model_dir / "experts").glob("*.safetensors")):
        expert_ranges = _mapped_ranges(expert_file)
        assert expert_ranges, f"{expert_file} is not memory-mapped"
        ranges += expert_ranges
    state = model.state_dict()
    copied = [k for k, t in state.items() if not any(a <= t.data_ptr() < b for a, b in ranges)]
    assert copied == []
    # A converted dtype must be a real copy (not a view of the file).
    bf16, _ = load_model(tiny_model_dir, pack=False, dtype="bfloat16")
    ptr = bf16.embed.weight.data_ptr()
    assert not any(a <= ptr < b for a, b in _mapped_ranges(tiny_model_dir / SINGLE_FILE))


# ---- HF conversion ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(HF_CASES))
def test_convert_hf_matches_hf_directory(
    name: str, hf_model_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, dst = hf_model_dirs[name], tmp_path / "native"
    convert_hf(src, dst, progress=False, max_shard_bytes=20_000)
    assert (dst / INDEX_FILE).exists()
    config = json.loads((dst / "config.json").read_text())
    assert config["format"] == "cpm2"
    assert config["family"] == json.loads((src / "config.json").read_text())["model_type"]
    native = _logits(dst, pack=False)
    assert torch.equal(native, _logits(src, pack=False))
    summaries = []
    for model_dir in (src, dst):
        capsys.readouterr()
        assert main(["info", "--model", str(model_dir), "--json"]) == 0
        summaries.append(json.loads(capsys.readouterr().out)["summary"])
    assert summaries[0] == summaries[1]
    assert summaries[0]["total_parameters"] > 0


def _pickled_hf_dir(name: str, path: Path, *, is_shared: bool = True) -> torch.nn.Module:
    """An HF model saved the pre-safetensors way: `torch.save(state_dict)` plus `config.json`.

    With `is_shared`, tied tensors (`shared` / `lm_head` / `embed_tokens`) are one storage in the
    file, as `torch.save` writes them; otherwise every tensor is its own copy.
    """
    hf = build_hf_model(name, seed=7)
    path.mkdir()
    state = hf.state_dict()
    if not is_shared:
        state = {k: v.clone() for k, v in state.items()}
    torch.save(state, path / "pytorch_model.bin")
    hf.config.to_json_file(path / "config.json")
    return hf


@pytest.mark.parametrize("is_shared", [False, True], ids=["copies", "tied-storage"])
@pytest.mark.parametrize("name", ["t5-v1.0", "switch-8e-capacity"])
def test_pickled_checkpoint_is_refused_by_load_and_converted(name: str, is_shared: bool, tmp_path: Path) -> None:
    src = tmp_path / "pickled"
    hf = _pickled_hf_dir(name, src, is_shared=is_shared)
    with pytest.raises(CheckpointError, match="cpm2 convert hf") as excinfo:
        load_model(src)
    assert str(src) in str(excinfo.value)
    assert "pytorch_model.bin" in str(excinfo.value)

    dst = convert_hf(src, tmp_path / "native", progress=False)
    assert (dst / SINGLE_FILE).exists()
    ids, mask, decoder_ids = _inputs(hf.config.vocab_size)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    got = _logits(dst)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4


class _Payload:
    """Unpickling this creates `path`: stands in for any code a hostile pickle would run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (str(self.path), "w")


def test_pickle_with_code_is_refused_and_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    src = tmp_path / "hostile"
    _pickled_hf_dir("t5-v1.1", src)
    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    torch.save({**state, "evil": _Payload(marker)}, src / "pytorch_model.bin")
    # The payload is live: an unsafe load would run it.
    torch.load(src / "pytorch_model.bin", weights_only=False)
    assert marker.exists()
    marker.unlink()

    with pytest.raises(CheckpointError) as excinfo:
        load_model(src)
    assert "cpm2 convert hf" in str(excinfo.value)
    with pytest.raises(CheckpointError) as excinfo:
        convert_hf(src, tmp_path / "dst", progress=False)
    assert str(src / "pytorch_model.bin") in str(excinfo.value)
    assert not marker.exists()
    assert not (tmp_path / "dst").exists()


# ---- errors name the file and key -------------------------------------------------------------------


def _copy_dir(src: Path, dst: Path, edit: TensorEdit | None = None) -> Path:
    """A copy of a single-file model directory, its tensors optionally edited."""
    shutil.copytree(src, dst)
    if edit is not None:
        tensors = load_file(dst / SINGLE_FILE)
        edit(tensors)
        save_file(tensors, dst / SINGLE_FILE, metadata={"format": "pt"})
    return dst


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such model directory") as excinfo:
        load_model(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(excinfo.value)


def test_directory_without_config(tiny_model_dir: Path, tmp_path: Path) -> None:
    model_dir = _copy_dir(tiny_model_dir, tmp_path / "m")
    (model_dir / "config.json").unlink()
    with pytest.raises(CheckpointError, match="missing") as excinfo:
        load_model(model_dir)
    assert str(model_dir / "config.json") in str(excinfo.value)


def test_config_not_json(tiny_model_dir: Path, tmp_path: Path) -> None:
    model_dir = _copy_dir(tiny_model_dir, tmp_path / "m")
    (model_dir / "config.json").write_text('{"d_model": 64,')
    with pytest.raises(CheckpointError, match="not valid JSON") as excinfo:
        load_model(model_dir)
    assert str(model_dir / "config.json") in str(excinfo.value)


def test_unknown_config_field(tiny_model_dir: Path, tmp_path: Path) -> None:
    model_dir = _copy_dir(tiny_model_dir, tmp_path / "m")
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "num_layerz": 3}))
    with pytest.raises(CheckpointError, match="num_layerz") as excinfo:
        load_model(model_dir)
    assert str(model_dir / "config.json") in str(excinfo.value)


def test_unknown_architecture(hf_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    model_dir = _copy_dir(hf_model_dirs["t5-v1.1"], tmp_path / "m")
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "model_type": "bart"}))
    with pytest.raises(UnsupportedModelError, match="'bart'") as excinfo:
        load_model(model_dir)
    assert str(model_dir / "config.json") in str(excinfo.value)


def test_missing_tensor(tiny_model_dir: Path, tmp_path: Path) -> None:
    key = "decoder.blocks.1.cross.kv.weight"
    model_dir = _copy_dir(tiny_model_dir, tmp_path / "m", lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match="is missing") as excinfo:
        load_model(model_dir)
    assert str(model_dir) in str(excinfo.value)
    assert f"'{key}'" in str(excinfo.value)


def test_missing_hf_tensor_is_named_by_its_hf_key(hf_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    key = "encoder.block.1.layer.1.mlp.experts.expert_3.wi.weight"
    model_dir = _copy_dir(hf_model_dirs["switch-4e-step2"], tmp_path / "m", lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match="is missing") as excinfo:
        load_model(model_dir)
    assert f"'{key}'" in str(excinfo.value)
    assert str(model_dir) in str(excinfo.value)


def test_unexpected_tensor(tiny_model_dir: Path, tmp_path: Path) -> None:
    key = "encoder.blocks.0.mlp.experts.4.wo.weight"

    def add(tensors: dict[str, torch.Tensor]) -> None:
        tensors[key] = torch.zeros(64, 128)

    model_dir = _copy_dir(tiny_model_dir, tmp_path / "m", add)
    with pytest.raises(CheckpointError, match="unexpected tensor") as excinfo:
        load_model(model_dir)
    assert f"'{key}'" in str(excinfo.value)
    assert str(model_dir / SINGLE_FILE) in str(excinfo.value)


def test_wrong_shape(tiny_model_dir: Path, tmp_path: Path) -> None:
    key = "encoder.blocks.1.attn.o.weight"

    def reshape(tensors: dict[str, torch.Tensor]) -> None:
        tensors[key] = torch.zeros(64, 63)

    model_dir = _copy_dir(tiny_model_dir, tmp_path / "m", reshape)
    with pytest.raises(CheckpointError, match=r"shape \[64, 63\]") as excinfo:
        load_model(model_dir)
    assert f"'{key}'" in str(excinfo.value)
    assert str(model_dir / SINGLE_FILE) in str(excinfo.value)
    assert "[64, 64]" in str(excinfo.value)


@pytest.fixture
def sharded_dir(tiny_model_dir: Path, tmp_path: Path) -> Path:
    model_dir = tmp_path / "sharded"
    _shard_native(tiny_model_dir, model_dir, max_shard_bytes=300_000)
    return model_dir


def test_index_lists_a_missing_shard(sharded_dir: Path) -> None:
    shard = sorted(sharded_dir.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match="missing") as excinfo:
        load_model(sharded_dir)
    assert str(shard) in str(excinfo.value)


def test_truncated_shard(sharded_dir: Path) -> None:
    shard = sorted(sharded_dir.glob("model-*.safetensors"))[2]
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(CheckpointError) as excinfo:
        load_model(sharded_dir)
    assert str(shard) in str(excinfo.value)


def test_written_shards_are_readable_by_other_users(sharded_dir: Path) -> None:
    # A server image runs as a non-root user over a model written at build time by root.
    mask = os.umask(0)
    os.umask(mask)
    for shard in sharded_dir.glob("model-*.safetensors"):
        assert shard.stat().st_mode & 0o777 == 0o666 & ~mask, oct(shard.stat().st_mode)


def test_unreadable_shard_says_so(sharded_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.weights.files as files

    monkeypatch.setattr(files.os, "access", lambda path, mode: False)
    with pytest.raises(CheckpointError, match=r"permission denied for user id .*chmod a\+r"):
        load_model(sharded_dir)


def test_garbage_shard(sharded_dir: Path) -> None:
    shard = sorted(sharded_dir.glob("model-*.safetensors"))[0]
    shard.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(CheckpointError) as excinfo:
        load_model(sharded_dir)
    assert str(shard) in str(excinfo.value)


def test_index_not_json(sharded_dir: Path) -> None:
    (sharded_dir / INDEX_FILE).write_text("not json")
    with pytest.raises(CheckpointError, match="not a safetensors index") as excinfo:
        load_model(sharded_dir)
    assert str(sharded_dir / INDEX_FILE) in str(excinfo.value)


# ---- dtypes -----------------------------------------------------------------------------------------


def test_bfloat16_load_is_close_to_float32(tiny_model_dir: Path) -> None:
    model, _ = load_model(tiny_model_dir, dtype="bfloat16", pack=False)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    reference = _logits(tiny_model_dir, pack=False)
    got = _logits(tiny_model_dir, dtype="bfloat16").float()
    assert not torch.equal(got, reference)  # really ran in bf16
    scale = reference.abs().max().item()
    assert (got - reference).abs().max().item() <= 0.05 * scale


def test_float16_on_cpu_is_refused(tiny_model_dir: Path) -> None:
    with pytest.raises(ConfigError, match="bfloat16"):
        load_model(tiny_model_dir, dtype="float16")


def test_unknown_dtype_is_refused(tiny_model_dir: Path) -> None:
    with pytest.raises(ConfigError, match="'int4'"):
        load_model(tiny_model_dir, dtype="int4")
