"""The expert store (`engine.experts.store`): one 4 KiB-aligned blob per expert, one file per MoE layer.

Invariants: every layer file is a valid safetensors file whose blobs start and end on 4096-byte
boundaries; a blob holds exactly the expert's weights (the resident model's, the initialiser's, the
HF checkpoint's) with zero padding; `pread` (buffered or O_DIRECT, one or several threads) returns
the same bytes as the memory map; an interrupted writer leaves no layer file behind; and every
broken store is refused at open time with a `CheckpointError` naming the file.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import engine.experts.cpu
from engine.config import ModelConfig, MoEConfig
from engine.errors import CheckpointError
from engine.experts.blob import ALIGNMENT, BlobLayout
from engine.experts.cpu import BlobReader, aligned_empty
from engine.experts.store import (
    STORE_DIR,
    ExpertStore,
    ExpertStoreWriter,
    is_expert_key,
    layer_file_name,
    moe_layer_keys,
)
from engine.model import ExpertWeights, MoELayerKey
from engine.offload import ensure_store
from engine.weights.convert import convert_hf
from engine.weights.init import random_tensor
from engine.weights.loader import inspect_checkpoint, load_model
from engine.weights.presets import get_preset

TINY = get_preset("tiny").config


def _small_config(*, gated: bool, num_experts: int = 3, d_model: int = 24, d_ff: int = 40) -> ModelConfig:
    """Dimensions whose blobs need padding (the tiny preset's happen to fill whole pages)."""
    moe = MoEConfig(num_experts=num_experts, router="centroid", encoder_layers=(1,), decoder_layers=(0, 1))
    return TINY.replace(
        d_model=d_model,
        d_ff=d_ff,
        is_gated_ffn=gated,
        activation="gelu_new" if gated else "relu",
        moe=moe,
    )


def _native_expert_tensors(config: ModelConfig, *, seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Random expert weights under their native keys, in model order."""
    gen = torch.Generator().manual_seed(seed)
    names = ("wi_0", "wi_1", "wo") if config.is_gated_ffn else ("wi", "wo")
    assert config.moe is not None
    for key in moe_layer_keys(config):
        for e in range(config.moe.num_experts):
            for name in names:
                shape = (config.d_model, config.d_ff) if name == "wo" else (config.d_ff, config.d_model)
                yield (
                    f"{key.stack}.blocks.{key.block}.mlp.experts.{e}.{name}.weight",
                    torch.randn(shape, generator=gen),
                )


def _write_store(model_dir: Path, config: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    writer = ExpertStoreWriter(model_dir, config, dtype)
    tensors = dict(_native_expert_tensors(config))
    for key, tensor in tensors.items():
        assert writer.add(key, tensor)
    writer.close()
    return tensors


def _parts(weights: ExpertWeights) -> list[torch.Tensor | None]:
    return [weights.wi_0, weights.wi_1, weights.wo]


def _header(path: Path) -> tuple[int, dict]:
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return length, json.loads(f.read(length))


@pytest.fixture
def store_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """A model directory holding a copy of the tiny model's expert store (free to damage)."""
    shutil.copytree(tiny_model_dir / STORE_DIR, tmp_path / STORE_DIR)
    return tmp_path


# ---- the tiny model's store -------------------------------------------------------------------------


def test_layer_files_are_aligned_safetensors(tiny_model_dir: Path) -> None:
    config = inspect_checkpoint(tiny_model_dir).config
    store = ExpertStore.open(tiny_model_dir, config)
    assert store.dtype == torch.float32
    assert store.keys == moe_layer_keys(config)
    files = sorted(p.name for p in (tiny_model_dir / STORE_DIR).iterdir())
    assert files == sorted(layer_file_name(k) for k in store.keys)
    num_experts = 4
    for key in store.keys:
        path = store.path(key)
        header_len, header = _header(path)
        with safe_open(str(path), framework="pt") as f:
            assert sorted(f.keys(), key=int) == [str(e) for e in range(num_experts)]
            assert f.metadata() == {
                "format": "cpm2-experts",
                "version": "1",
                "layer": str(key),
                "dtype": "float32",
                "d_model": "64",
                "d_ff": "128",
                "parts": "wi_0,wi_1,wo",
                "alignment": "4096",
            }
            raw = path.read_bytes()
            assert len(raw) == 8 + header_len + num_experts * store.layout.nbytes
            for e in range(num_experts):
                location = store.location(key, e)
                assert location.path == path
                assert location.offset % ALIGNMENT == 0
                assert location.nbytes % ALIGNMENT == 0
                assert location.nbytes == store.layout.nbytes >= 3 * 64 * 128 * 4
                assert location.offset == 8 + header_len + header[str(e)]["data_offsets"][0]
                blob = f.get_tensor(str(e))
                assert blob.dtype == torch.uint8
                assert blob.shape == (location.nbytes,)
                on_disk = raw[location.offset : location.offset + location.nbytes]
                assert bytes(blob.numpy()) == on_disk
                assert torch.equal(store.mapped_blob(key, e), blob)


def test_mapped_experts_equal_the_resident_model(tiny_model_dir: Path) -> None:
    model, info = load_model(tiny_model_dir, pack=False)
    state = model.state_dict()
    store = ExpertStore.open(tiny_model_dir, info.config)
    checked = 0
    for key in store.keys:
        for e in range(store.num_experts):
            prefix = f"{key.stack}.blocks.{key.block}.mlp.experts.{e}"
            mapped = store.mapped(key, e)
            for name, part in zip(("wi_0", "wi_1", "wo"), _parts(mapped), strict=True):
                assert part is not None
                native = f"{prefix}.{name}.weight"
                assert torch.equal(part, state[native]), native
                # And what the initialiser drew for it (`tiny_model_dir` is written with seed 0):
                # the store holds what the writer was given, not just what the loader reads back.
                assert torch.equal(part, random_tensor(TINY, native, state[native].shape, seed=0)), native
                checked += 1
    assert checked == 4 * 4 * 3
    assert mapped.wi_0.shape == (128, 64)
    assert mapped.wo.shape == (64, 128)


@pytest.mark.parametrize("min_chunk", [None, ALIGNMENT], ids=["one-chunk", "4k-chunks"])
@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
@pytest.mark.parametrize("threads", [1, 4])
def test_blob_reader_returns_the_mapped_bytes(
    tiny_model_dir: Path, threads: int, direct: bool, min_chunk: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if min_chunk is not None:  # split the 96 KiB blobs into several reads in flight
        monkeypatch.setattr(engine.experts.cpu, "MIN_CHUNK_BYTES", min_chunk)
    store = ExpertStore.open(tiny_model_dir, TINY)
    nbytes = store.layout.nbytes
    reader = BlobReader(threads=threads, direct=direct)  # O_DIRECT may fall back (tmpfs): bytes only
    try:
        for key in store.keys:
            for e in range(store.num_experts):
                out = aligned_empty(nbytes)
                out.fill_(0xAB)
                reader.read(store.location(key, e), out)
                assert torch.equal(out, store.mapped_blob(key, e)), (key, e)
        # Into the middle slot of a slot array, as the RAM pool does: neighbours stay untouched.
        slots = aligned_empty(3 * nbytes).view(3, nbytes)
        slots.fill_(0xAB)
        key = store.keys[-1]
        reader.read(store.location(key, 3), slots[1])
        assert torch.equal(slots[1], store.mapped_blob(key, 3))
        assert bool((slots[0] == 0xAB).all())
        assert bool((slots[2] == 0xAB).all())
    finally:
        reader.close()


@pytest.mark.parametrize("alignment", [64, ALIGNMENT, 2 * ALIGNMENT])
@pytest.mark.parametrize("nbytes", [1, 4095, ALIGNMENT, 3 * ALIGNMENT + 5])
def test_aligned_empty(nbytes: int, alignment: int) -> None:
    for _ in range(4):
        buf = aligned_empty(nbytes, alignment=alignment)
        assert buf.data_ptr() % alignment == 0
        assert buf.dtype == torch.uint8
        assert buf.shape == (nbytes,)
        assert buf.is_contiguous()


# ---- blob layout ------------------------------------------------------------------------------------


@pytest.mark.parametrize("packing", ["plain", "torch-avx512", "torch-avx2"])
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
def test_int4_blob_layout_round_trip(gated: bool, packing: str) -> None:
    """An int4 blob: packed values, then each part's (groups, rows, 2) bfloat16 scales and zeros,
    then float32 biases; unpacking gives views that dequantise to what packing quantised."""
    from engine.experts.blob import INT4
    from engine.model.int4 import Int4Weight, quantize_int4

    D, F, G = 64, 128, 32
    layout = BlobLayout(D, F, gated, INT4, has_bias=True, group_size=G, packing=packing)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(0)
    matrices = [torch.randn(F, D, generator=gen), torch.randn(F, D, generator=gen), torch.randn(D, F, generator=gen)]
    biases = [torch.randn(F, generator=gen), torch.randn(F, generator=gen), torch.randn(D, generator=gen)]
    if not gated:
        matrices, biases = [matrices[0], matrices[2]], [biases[0], biases[2]]
    weights = ExpertWeights(
        matrices[0],
        matrices[1] if gated else None,
        matrices[-1],
        bi_0=biases[0],
        bi_1=biases[1] if gated else None,
        bo=biases[-1],
    )
    num_parts = len(matrices)
    scale_bytes = num_parts * 4 * D * F // G
    assert layout.part_bytes == D * F // 2
    assert num_parts * D * F // 2 + scale_bytes <= layout.payload_bytes
    blob = layout.pack(weights)
    assert not bool(blob[layout.payload_bytes :].any()), "padding must be zero"
    unpacked = layout.unpack(blob)
    got_matrices = [m for m in (unpacked.wi_0, unpacked.wi_1, unpacked.wo) if m is not None]
    for got, want in zip(got_matrices, matrices, strict=True):
        assert isinstance(got, Int4Weight)
        assert (got.group_size, got.packing, got.shape) == (G, packing, want.shape)
        assert torch.equal(got.dequantize(), quantize_int4(want, group_size=G, packing="plain").dequantize())
        assert blob.data_ptr() <= got.packed.data_ptr() < blob.data_ptr() + layout.payload_bytes
    got_biases = [b for b in (unpacked.bi_0, unpacked.bi_1, unpacked.bo) if b is not None]
    for got_bias, want_bias in zip(got_biases, biases, strict=True):
        assert torch.equal(got_bias, want_bias)


def test_int4_layouts_refuse_what_they_cannot_hold() -> None:
    from engine.errors import CheckpointError
    from engine.experts.blob import INT4

    with pytest.raises(CheckpointError, match="group size"):
        BlobLayout(64, 128, True, INT4, group_size=48)
    with pytest.raises(CheckpointError, match="cannot take group size 64"):
        BlobLayout(32, 96, True, INT4, group_size=64)  # 64 does not divide d_model 32
    with pytest.raises(CheckpointError, match="packing torch-avx512"):
        BlobLayout(32, 128, True, INT4, group_size=32, packing="torch-avx512")  # 32 rows: half a block
    from engine.model.int4 import quantize_int4

    int8 = BlobLayout(64, 128, True, torch.int8)
    w = quantize_int4(torch.randn(128, 64), group_size=32, packing="plain")
    weights = ExpertWeights(w, w, quantize_int4(torch.randn(64, 128), group_size=32, packing="plain"))
    with pytest.raises(CheckpointError, match="int4 expert cannot be written to an int8 store"):
        int8.pack(weights)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
def test_blob_layout_round_trip(gated: bool, dtype: torch.dtype) -> None:
    D, F = 24, 40
    layout = BlobLayout(D, F, gated, dtype)
    gen = torch.Generator().manual_seed(0)
    weights = ExpertWeights(
        torch.randn(F, D, generator=gen),
        torch.randn(F, D, generator=gen) if gated else None,
        torch.randn(D, F, generator=gen),
    )
    num_parts = 3 if gated else 2
    assert layout.part_names == (("wi_0", "wi_1", "wo") if gated else ("wi_0", "wo"))
    assert layout.payload_bytes == num_parts * D * F * dtype.itemsize
    assert layout.nbytes % ALIGNMENT == 0
    assert layout.payload_bytes < layout.nbytes < layout.payload_bytes + ALIGNMENT  # padding exists

    blob = layout.pack(weights)
    assert blob.dtype == torch.uint8
    assert blob.shape == (layout.nbytes,)
    assert not bool(blob[layout.payload_bytes :].any()), "padding must be zero"
    unpacked = layout.unpack(blob)
    for got, want in zip(_parts(unpacked), _parts(weights), strict=True):
        if want is None:
            assert got is None
            continue
        assert got is not None
        assert got.dtype == dtype
        assert got.shape == want.shape
        assert torch.equal(got, want.to(dtype))
        # Views into the blob, not copies.
        assert blob.data_ptr() <= got.data_ptr() < blob.data_ptr() + layout.payload_bytes

    out = torch.zeros(layout.nbytes, dtype=torch.uint8)
    assert layout.pack(weights, out=out) is out
    assert torch.equal(out, blob)
    if gated:
        with pytest.raises(CheckpointError, match="wi_1"):
            layout.pack(weights._replace(wi_1=None))


# ---- writer -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
def test_writer_round_trip(gated: bool, dtype: torch.dtype, tmp_path: Path) -> None:
    config = _small_config(gated=gated)
    writer = ExpertStoreWriter(tmp_path, config, dtype)
    assert not writer.add("encoder.blocks.0.mlp.wi.weight", torch.zeros(1))
    assert not writer.add("embed.weight", torch.zeros(1))
    tensors = dict(_native_expert_tensors(config))
    for key, tensor in tensors.items():
        assert writer.add(key, tensor)
    writer.close()
    assert writer.layers_written == moe_layer_keys(config)
    assert sorted(p.name for p in (tmp_path / STORE_DIR).iterdir()) == sorted(
        layer_file_name(k) for k in moe_layer_keys(config)
    ), "no temporary files may be left"

    store = ExpertStore.open(tmp_path, config)
    assert store.dtype == dtype
    assert store.total_bytes == 3 * 3 * store.layout.nbytes
    read_back = list(store.iter_native_tensors())
    assert [k for k, _ in read_back] == list(tensors)
    for key, tensor in read_back:
        assert torch.equal(tensor, tensors[key].to(dtype)), key
    for key in store.keys:
        with safe_open(str(store.path(key)), framework="pt") as f:
            assert f.metadata()["parts"] == ",".join(store.layout.part_names)
        for e in range(3):
            assert store.location(key, e).offset % ALIGNMENT == 0
            assert not bool(store.mapped_blob(key, e)[store.layout.payload_bytes :].any())


def test_header_longer_than_a_page_moves_the_data_start(tmp_path: Path) -> None:
    # 80 experts need a header of more than 4088 bytes: the data must start at 8192, not 4096.
    config = _small_config(gated=True, num_experts=80, d_model=8, d_ff=8)
    tensors = _write_store(tmp_path, config, torch.float32)
    store = ExpertStore.open(tmp_path, config)
    reader = BlobReader(threads=2, direct=False)
    try:
        for key in store.keys:
            header_len, header = _header(store.path(key))
            assert 8 + header_len == 2 * ALIGNMENT
            with safe_open(str(store.path(key)), framework="pt") as f:
                for e in (0, 1, 79):
                    location = store.location(key, e)
                    assert location.offset == 2 * ALIGNMENT + e * ALIGNMENT
                    assert location.offset == 8 + header_len + header[str(e)]["data_offsets"][0]
                    assert torch.equal(store.mapped_blob(key, e), f.get_tensor(str(e)))
                    out = aligned_empty(location.nbytes)
                    reader.read(location, out)
                    assert torch.equal(out, f.get_tensor(str(e)))
    finally:
        reader.close()
    assert all(torch.equal(t, tensors[k]) for k, t in store.iter_native_tensors())


def _assert_no_final_file(root: Path, key: MoELayerKey) -> None:
    name = layer_file_name(key)
    left = {p.name for p in (root / STORE_DIR).iterdir()} if (root / STORE_DIR).exists() else set()
    assert name not in left
    assert {n for n in left if n.startswith(".")} <= {f".{name}.tmp"}, "a stray temporary file"


def test_writer_refuses_experts_out_of_order(tmp_path: Path) -> None:
    config = _small_config(gated=True)
    tensors = list(_native_expert_tensors(config))
    writer = ExpertStoreWriter(tmp_path, config, torch.float32)
    first_layer = moe_layer_keys(config)[0]
    with pytest.raises(CheckpointError, match=r"expert 1 arrived out of order \(expected 0\)"):
        writer.add(*tensors[3])  # wi_0 of expert 1 first
    _assert_no_final_file(tmp_path, first_layer)

    writer = ExpertStoreWriter(tmp_path / "again", config, torch.float32)
    for key, tensor in tensors[:3]:
        writer.add(key, tensor)
    with pytest.raises(CheckpointError, match="out of order"):
        writer.add(*tensors[0])  # expert 0 again after it was complete
    _assert_no_final_file(tmp_path / "again", first_layer)


def test_writer_refuses_an_incomplete_expert(tmp_path: Path) -> None:
    config = _small_config(gated=True)
    tensors = list(_native_expert_tensors(config))
    writer = ExpertStoreWriter(tmp_path, config, torch.float32)
    writer.add(*tensors[0])  # wi_0 of expert 0 only
    with pytest.raises(CheckpointError, match=r"expert 0 of encoder\.1 is incomplete"):
        writer.add(*tensors[3])  # wi_0 of expert 1
    _assert_no_final_file(tmp_path, moe_layer_keys(config)[0])


def test_writer_refuses_an_incomplete_layer(tmp_path: Path) -> None:
    config = _small_config(gated=True)
    tensors = list(_native_expert_tensors(config))
    keys = moe_layer_keys(config)
    writer = ExpertStoreWriter(tmp_path, config, torch.float32)
    for key, tensor in tensors[:6]:  # experts 0 and 1 of 3
        writer.add(key, tensor)
    with pytest.raises(CheckpointError, match=r"encoder\.1: wrote 2 of 3 experts"):
        writer.add(*tensors[9])  # the next layer starts
    _assert_no_final_file(tmp_path, keys[0])

    # The last layer left unfinished fails at close.
    writer = ExpertStoreWriter(tmp_path / "last", config, torch.float32)
    for key, tensor in tensors[:-1]:
        writer.add(key, tensor)
    with pytest.raises(CheckpointError, match=r"decoder\.1: wrote 2 of 3 experts"):
        writer.close()
    _assert_no_final_file(tmp_path / "last", keys[-1])
    assert (tmp_path / "last" / STORE_DIR / layer_file_name(keys[0])).exists()


def test_writer_refuses_missing_layers(tmp_path: Path) -> None:
    config = _small_config(gated=False)
    tensors = list(_native_expert_tensors(config))
    writer = ExpertStoreWriter(tmp_path, config, torch.float32)
    for key, tensor in tensors[:6]:  # encoder.1 only
        writer.add(key, tensor)
    with pytest.raises(CheckpointError, match=r"layer\(s\) decoder.0, decoder.1"):
        writer.close()
    for key in moe_layer_keys(config)[1:]:
        _assert_no_final_file(tmp_path, key)
    with pytest.raises(CheckpointError, match="missing"):
        ExpertStore.open(tmp_path, config)


# ---- open: broken stores ----------------------------------------------------------------------------


def _damaged_path(model_dir: Path, stack: str = "decoder", block: int = 1) -> Path:
    return model_dir / STORE_DIR / layer_file_name(MoELayerKey(stack, block))  # type: ignore[arg-type]


def _edit_header(path: Path, old: str, new: str) -> None:
    """Replace `old` by `new` (same length) in the header, keeping the file a valid safetensors file."""
    assert len(old) == len(new)
    raw = path.read_bytes()
    header_len, _ = _header(path)
    text = raw[8 : 8 + header_len].decode()
    assert text.count(old) == 1, old
    path.write_bytes(raw[:8] + text.replace(old, new).encode() + raw[8 + header_len :])


def _refused(model_dir: Path, path: Path, config: ModelConfig = TINY, match: str = "") -> str:
    with pytest.raises(CheckpointError, match=re.escape(str(path))) as excinfo:
        ExpertStore.open(model_dir, config)
    assert re.search(match, str(excinfo.value)), str(excinfo.value)
    return str(excinfo.value)


def test_open_accepts_the_copy(store_copy: Path) -> None:
    assert ExpertStore.open(store_copy, TINY).num_experts == 4


def test_open_refuses_a_missing_layer_file(store_copy: Path) -> None:
    path = _damaged_path(store_copy)
    path.unlink()
    _refused(store_copy, path, match="missing")


def test_open_refuses_a_truncated_file(store_copy: Path) -> None:
    path = _damaged_path(store_copy, "encoder", 0)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - ALIGNMENT])
    _refused(store_copy, path)


def test_open_refuses_a_file_with_too_few_experts(tmp_path: Path) -> None:
    # A valid safetensors file with 3 experts where the config says 4: only the size check sees it.
    _write_store(tmp_path, _small_config(gated=True, num_experts=3), torch.float32)
    config = _small_config(gated=True, num_experts=4)
    _refused(tmp_path, tmp_path / STORE_DIR / "encoder-001.safetensors", config, match="wrong expert count")


@pytest.mark.parametrize(
    ("old", "new", "match"),
    [
        ('"d_model":"64"', '"d_model":"32"', "d_model 32 x d_ff 128 but config.json says 64 x 128"),
        ('"d_ff":"128"', '"d_ff":"256"', "d_model 64 x d_ff 256"),
        ('"format":"cpm2-experts"', '"format":"cpm2-exports"', "not a cpm2-experts v1 file"),
        ('"version":"1"', '"version":"2"', "not a cpm2-experts v1 file"),
        ('"dtype":"float32"', '"dtype":"float64"', "unknown dtype"),
    ],
)
def test_open_refuses_wrong_metadata(store_copy: Path, old: str, new: str, match: str) -> None:
    path = _damaged_path(store_copy)
    _edit_header(path, old, new)
    with safe_open(str(path), framework="pt") as f:  # still a valid safetensors file
        assert len(list(f.keys())) == 4
    _refused(store_copy, path, match=match)


def test_open_refuses_layers_of_mixed_dtypes(store_copy: Path, tmp_path: Path) -> None:
    _write_store(tmp_path / "bf16", TINY, torch.bfloat16)
    path = _damaged_path(store_copy)
    shutil.copy2(_damaged_path(tmp_path / "bf16"), path)
    _refused(store_copy, path, match="differs from the other layers")


@pytest.mark.parametrize(
    "content",
    [b"", b"garbage" * 1000, struct.pack("<Q", 16) + b"[1,2,3,4,5,6,7] ", b"\x08" + b"\0" * 7 + b"\xff" * 8],
    ids=["empty", "text", "json-list", "not-utf8"],
)
def test_open_refuses_garbage(store_copy: Path, content: bytes) -> None:
    path = _damaged_path(store_copy, "encoder", 1)
    path.write_bytes(content)
    _refused(store_copy, path)


def test_open_refuses_a_non_numeric_dimension(store_copy: Path) -> None:
    path = _damaged_path(store_copy)
    _edit_header(path, '"d_model":"64"', '"d_model":"6x"')
    _refused(store_copy, path, match="d_model")


def test_open_refuses_swapped_layer_files(store_copy: Path) -> None:
    encoder, decoder = _damaged_path(store_copy, "encoder", 0), _damaged_path(store_copy, "decoder", 0)
    encoder.rename(store_copy / "swap")
    decoder.rename(encoder)
    (store_copy / "swap").rename(decoder)
    _refused(store_copy, encoder, match="layer")


# ---- stores from Hugging Face checkpoints -----------------------------------------------------------


def _logits(model_dir: Path) -> torch.Tensor:
    model, info = load_model(model_dir, pack=False)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, info.config.vocab_size, (2, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    decoder_ids = torch.randint(2, info.config.vocab_size, (2, 4), generator=gen)
    with torch.no_grad():
        return model(ids, mask, decoder_ids)


def _assert_store_holds_hf_experts(store: ExpertStore, hf_dir: Path) -> None:
    hf = load_file(str(hf_dir / "model.safetensors"))
    assert store.keys, "a Switch model has MoE layers"
    for key in store.keys:
        ff_layer = 1 if key.stack == "encoder" else 2
        for e in range(store.num_experts):
            prefix = f"{key.stack}.block.{key.block}.layer.{ff_layer}.mlp.experts.expert_{e}"
            mapped = store.mapped(key, e)
            assert mapped.wi_1 is None
            assert torch.equal(mapped.wi_0, hf[f"{prefix}.wi.weight"]), prefix
            assert torch.equal(mapped.wo, hf[f"{prefix}.wo.weight"]), prefix


def test_converted_switch_model_keeps_experts_in_the_store(hf_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    src, dst = hf_model_dirs["switch-4e-step2"], tmp_path / "native"
    convert_hf(src, dst, progress=False)
    info = inspect_checkpoint(dst)
    assert info.source_format == "cpm2"
    store = ExpertStore.open(dst, info.config)
    assert sorted(p.name for p in (dst / STORE_DIR).iterdir()) == sorted(
        layer_file_name(k) for k in moe_layer_keys(info.config)
    )
    shards = sorted(dst.glob("*.safetensors"))
    assert shards
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            experts = [k for k in f.keys() if is_expert_key(k) or ".experts." in k]  # noqa: SIM118
            assert experts == [], f"{shard.name} holds expert weights"
            assert any(".router." in k for k in f.keys())  # noqa: SIM118 (the dense part is there)
    _assert_store_holds_hf_experts(store, src)
    assert torch.equal(_logits(dst), _logits(src))


@pytest.mark.parametrize("name", ["switch-4e-step2", "switch-8e-capacity"])
def test_ensure_store_writes_the_hf_experts(name: str, hf_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    src = hf_model_dirs[name]
    info = inspect_checkpoint(src)
    store = ensure_store(info, store_dir=tmp_path / "store")
    assert store.root == tmp_path / "store" / STORE_DIR
    assert not (src / STORE_DIR).exists(), "the source directory must not be written to"
    assert store.num_experts == info.config.moe.num_experts  # type: ignore[union-attr]
    _assert_store_holds_hf_experts(store, src)
    # A second call opens the existing store instead of writing it again.
    stamps = {p.name: p.stat().st_mtime_ns for p in store.root.iterdir()}
    again = ensure_store(info, store_dir=tmp_path / "store")
    assert {p.name: p.stat().st_mtime_ns for p in again.root.iterdir()} == stamps
    _assert_store_holds_hf_experts(again, src)
