"""Expert store: every expert's weights as one contiguous, 4 KiB-aligned blob, one file per MoE layer.

InfMoE (SEED.md) and every fast offloader (mixtral-offloading's one-storage-per-expert, see
research/offload-anchors.md §5) move experts as single units. Here expert `e` of MoE layer
`encoder.3` is bytes `[offset, offset + nbytes)` of `experts/encoder-003.safetensors`, in the layout
of its format (`engine.experts.blob`: float, int8 or int4).

Each file is a valid safetensors file (one U8 tensor per expert, named by its index) whose header is
padded with spaces so the data, and therefore every blob, starts on a 4096-byte boundary: a transfer
is one `pread` (O_DIRECT-able) or one host-to-device copy, and a memory map hands out page-aligned
views. The safetensors library cannot place data at chosen offsets, so the header is written here;
reading goes through it. The header records the format (dtype, quantisation scheme, int4 group size
and packing), checked against config.json when the store is opened.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from engine.config import ModelConfig
from engine.errors import CheckpointError
from engine.experts.blob import (
    ALIGNMENT,
    DTYPE_NAMES,
    INT4_SCHEME,
    INT8_SCHEME,
    BlobLayout,
    round_up,
)
from engine.model import ExpertWeights, MoELayerKey
from engine.model.int4 import Int4Weight
from engine.model.nibbles import PACKINGS
from engine.model.quant import Int8Weight

STORE_DIR = "experts"
FORMAT = "cpm2-experts"
VERSION = "1"

_SCHEMES = {"int8": INT8_SCHEME, "int4": INT4_SCHEME}
_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}
_EXPERT_KEY = re.compile(
    r"(?P<stack>encoder|decoder)\.blocks\.(?P<block>\d+)\.mlp\.experts\.(?P<expert>\d+)\.(?P<name>\w+)"
    r"\.(?P<kind>weight|bias)"
)


def is_expert_key(key: str) -> bool:
    """Whether a native state-dict key names an expert weight (or bias)."""
    return _EXPERT_KEY.fullmatch(key) is not None


def expert_layer_of(key: str) -> MoELayerKey | None:
    """The MoE layer whose expert `key` names, None for any other key."""
    match = _EXPERT_KEY.fullmatch(key)
    return None if match is None else MoELayerKey(match["stack"], int(match["block"]))  # type: ignore[arg-type]


def layer_file_name(key: MoELayerKey) -> str:
    return f"{key.stack}-{key.block:03d}.safetensors"


def moe_layer_keys(config: ModelConfig) -> list[MoELayerKey]:
    """Every MoE layer of `config`, encoder first."""
    return [MoELayerKey("encoder", b) for b in config.moe_layers("encoder")] + [
        MoELayerKey("decoder", b) for b in config.moe_layers("decoder")
    ]


class ExpertStoreWriter:
    """Writes a store from native `(key, tensor)` pairs arriving in model order, one blob at a time.

    Each layer file is written to a temporary name, fsynced and renamed once all its experts are in,
    so a reader never sees a half-written layer. Memory use is one expert.
    """

    def __init__(
        self,
        model_dir: Path,
        config: ModelConfig,
        dtype: torch.dtype,
        *,
        group_size: int | None = None,
        packing: str | None = None,
    ) -> None:
        """`group_size` and `packing`: an int4 store's (default: what config.json records)."""
        self.root = model_dir / STORE_DIR
        self.config = config
        self.layout = BlobLayout.of(config, dtype, group_size=group_size, packing=packing)
        self.num_experts = config.moe.num_experts if config.moe else 0
        names = ("wi_0", "wi_1", "wo") if config.is_gated_ffn else ("wi", "wo")
        kinds = ("weight", "bias") if self.layout.has_bias else ("weight",)
        self._names = tuple(f"{name}.{kind}" for kind in kinds for name in names)
        self._layer: MoELayerKey | None = None
        self._file: BinaryIO | None = None
        self._written = 0
        self._parts: dict[str, torch.Tensor | Int8Weight | Int4Weight] = {}
        self._expert = -1
        self._blob = torch.zeros(self.layout.nbytes, dtype=torch.uint8)
        self.layers_written: list[MoELayerKey] = []

    def add(self, key: str, tensor: torch.Tensor | Int8Weight | Int4Weight) -> bool:
        """Take `tensor` if `key` is an expert weight (returns True), else leave it to the caller.

        An int8 store quantises float tensors as it packs them, or takes them already quantised."""
        match = _EXPERT_KEY.fullmatch(key)
        if match is None:
            return False
        layer = MoELayerKey(match["stack"], int(match["block"]))  # type: ignore[arg-type]
        expert, name = int(match["expert"]), f"{match['name']}.{match['kind']}"
        if layer != self._layer:
            self._finish_layer()
            self._start_layer(layer)
        if expert != self._expert:
            if self._parts:
                self._abort()
                raise CheckpointError(f"expert {self._expert} of {layer} is incomplete before expert {expert}")
            self._expert = expert
        if expert != self._written:
            self._abort()
            raise CheckpointError(f"{layer}: expert {expert} arrived out of order (expected {self._written})")
        self._parts[name] = tensor
        if len(self._parts) == len(self._names):
            weights = self._weights()
            self._blob.zero_()
            assert self._file is not None
            self._file.write(self.layout.pack(weights, out=self._blob).numpy().data)
            self._written += 1
            self._parts = {}
        return True

    def _weights(self) -> ExpertWeights:
        """The collected parts of one expert."""
        got = self._parts
        bias = {n: t for n, t in got.items() if n.endswith(".bias") and isinstance(t, torch.Tensor)}
        if self.layout.is_gated:
            return ExpertWeights(
                got["wi_0.weight"],
                got["wi_1.weight"],
                got["wo.weight"],
                bi_0=bias.get("wi_0.bias"),
                bi_1=bias.get("wi_1.bias"),
                bo=bias.get("wo.bias"),
            )
        return ExpertWeights(got["wi.weight"], None, got["wo.weight"], bi_0=bias.get("wi.bias"), bo=bias.get("wo.bias"))

    def _start_layer(self, key: MoELayerKey) -> None:
        size = self.layout.nbytes
        header: dict[str, object] = {
            "__metadata__": {
                "format": FORMAT,
                "version": VERSION,
                "layer": str(key),
                "dtype": DTYPE_NAMES[self.layout.dtype],
                **self._quantization_meta(),
                "d_model": str(self.layout.d_model),
                "d_ff": str(self.layout.d_ff),
                "parts": ",".join(self.layout.part_names),
                **({"biases": "true"} if self.layout.has_bias else {}),
                "alignment": str(ALIGNMENT),
            }
        }
        for e in range(self.num_experts):
            header[str(e)] = {"dtype": "U8", "shape": [size], "data_offsets": [e * size, (e + 1) * size]}
        text = json.dumps(header, separators=(",", ":")).encode()
        # Pad the JSON with spaces (allowed by the safetensors spec) so the data starts aligned.
        padded_len = round_up(8 + len(text), ALIGNMENT) - 8
        self.root.mkdir(parents=True, exist_ok=True)
        self._file = open(self._tmp_path(key), "wb")  # noqa: SIM115 (closed in _finish_layer)
        self._file.write(struct.pack("<Q", padded_len))
        self._file.write(text.ljust(padded_len, b" "))
        self._layer, self._written, self._expert = key, 0, -1

    def _quantization_meta(self) -> dict[str, str]:
        layout = self.layout
        if layout.is_int4:
            return {
                "quantization": INT4_SCHEME,
                "scale_dtype": "bfloat16",
                "group_size": str(layout.group_size),
                "packing": layout.packing,
            }
        return {"quantization": INT8_SCHEME, "scale_dtype": "float32"} if layout.is_quantized else {}

    def _tmp_path(self, key: MoELayerKey) -> Path:
        return self.root / f".{layer_file_name(key)}.tmp"

    def _abort(self) -> None:
        """Close and remove the half-written layer file."""
        if self._file is not None and self._layer is not None:
            self._file.close()
            self._tmp_path(self._layer).unlink(missing_ok=True)
        self._layer, self._file = None, None

    def _finish_layer(self) -> None:
        if self._layer is None or self._file is None:
            return
        key, f = self._layer, self._file
        if self._written != self.num_experts or self._parts:
            f.close()
            raise CheckpointError(f"{key}: wrote {self._written} of {self.num_experts} experts")
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(self._tmp_path(key), self.root / layer_file_name(key))
        self.layers_written.append(key)
        self._layer, self._file = None, None

    def adopt_finished(self) -> list[MoELayerKey]:
        """Take the layer files an interrupted writer of this store finished as written (they were
        renamed into place only when complete) and return their layers; the rest are written anew."""
        finished = [k for k in moe_layer_keys(self.config) if (self.root / layer_file_name(k)).is_file()]
        self.layers_written.extend(k for k in finished if k not in self.layers_written)
        return finished

    def close(self) -> None:
        """Finish the last layer and check that every MoE layer was written."""
        self._finish_layer()
        missing = [str(k) for k in moe_layer_keys(self.config) if k not in self.layers_written]
        if missing:
            raise CheckpointError(f"{self.root}: no experts were written for layer(s) {', '.join(missing)}")


@dataclass(frozen=True)
class BlobLocation:
    """Where one expert's blob lies on disk."""

    path: Path
    offset: int
    nbytes: int


class ExpertStore:
    """Read side of a store directory: blob locations, memory-mapped views, layout."""

    def __init__(self, root: Path, config: ModelConfig, layout: BlobLayout) -> None:
        self.root = root
        self.config = config
        self.layout = layout
        self.keys = moe_layer_keys(config)
        self.num_experts = config.moe.num_experts if config.moe else 0
        self._data_start: dict[MoELayerKey, int] = {}
        self._maps: dict[MoELayerKey, mmap.mmap] = {}

    @classmethod
    def exists(cls, root: Path) -> bool:
        return (root / STORE_DIR).is_dir()

    @classmethod
    def open(cls, model_dir: Path, config: ModelConfig) -> ExpertStore:
        """Open and validate the store of `model_dir` (every file's header is checked now)."""
        root = model_dir / STORE_DIR
        if config.moe is None:
            raise CheckpointError(f"{model_dir}: the model has no MoE layers, so no expert store")
        keys = moe_layer_keys(config)
        # Every layer file must store its experts the same way: dtype, and for int4 group size and packing.
        stored: tuple[str, str | None, str | None] | None = None
        starts: dict[MoELayerKey, int] = {}
        for key in keys:
            path = root / layer_file_name(key)
            meta, start = _read_header(path)
            if meta.get("format") != FORMAT or meta.get("version") != VERSION:
                raise CheckpointError(f"{path}: not a {FORMAT} v{VERSION} file")
            if meta.get("layer") != str(key):
                raise CheckpointError(f"{path}: holds the experts of layer {meta.get('layer')}, not {key}")
            if meta.get("dtype") not in _DTYPES:
                raise CheckpointError(f"{path}: unknown dtype {meta.get('dtype')!r}")
            scheme = _SCHEMES.get(meta["dtype"])
            if scheme is not None and meta.get("quantization") != scheme:
                raise CheckpointError(
                    f"{path}: {meta['dtype']} experts of an unknown scheme {meta.get('quantization')!r}"
                )
            file_stored = (meta["dtype"], meta.get("group_size"), meta.get("packing"))
            if stored is not None and file_stored != stored:
                raise CheckpointError(
                    f"{path}: dtype, group size, packing {file_stored} differs from the other layers' {stored}"
                )
            stored = file_stored
            try:
                dims = (int(meta.get("d_model", -1)), int(meta.get("d_ff", -1)))
            except ValueError:
                raise CheckpointError(f"{path}: d_model / d_ff metadata is not an integer") from None
            if (meta.get("biases") == "true") != config.has_ffn_bias:
                raise CheckpointError(
                    f"{path}: experts {'with' if meta.get('biases') == 'true' else 'without'} biases, but "
                    f"config.json says has_ffn_bias {str(config.has_ffn_bias).lower()}; rewrite the store "
                    "(remove the experts folder)"
                )
            if dims != (config.d_model, config.d_ff):
                raise CheckpointError(
                    f"{path}: experts are d_model {meta.get('d_model')} x d_ff {meta.get('d_ff')} but "
                    f"config.json says {config.d_model} x {config.d_ff}"
                )
            starts[key] = start
        assert stored is not None
        dtype_name, group_size, packing = stored
        if dtype_name == "int4" and (not (group_size or "").isdigit() or packing not in PACKINGS):
            raise CheckpointError(f"{root}: int4 experts with group size {group_size!r}, packing {packing!r}")
        layout = BlobLayout.of(
            config, _DTYPES[dtype_name], group_size=int(group_size) if group_size else None, packing=packing
        )
        store = cls(root, config, layout)
        store._data_start = starts
        for key in keys:
            path = root / layer_file_name(key)
            expected = starts[key] + store.num_experts * store.layout.nbytes
            if path.stat().st_size != expected:
                raise CheckpointError(
                    f"{path}: {path.stat().st_size} bytes, expected {expected} for "
                    f"{store.num_experts} experts (truncated or wrong expert count)"
                )
        return store

    @property
    def dtype(self) -> torch.dtype:
        return self.layout.dtype

    @property
    def total_bytes(self) -> int:
        """Bytes of all blobs of all layers."""
        return len(self.keys) * self.num_experts * self.layout.nbytes

    def path(self, key: MoELayerKey) -> Path:
        return self.root / layer_file_name(key)

    def location(self, key: MoELayerKey, expert: int) -> BlobLocation:
        size = self.layout.nbytes
        return BlobLocation(self.path(key), self._data_start[key] + expert * size, size)

    def mapped_ranges(self) -> list[tuple[int, int]]:
        """(address, length) of every layer file mapped so far (page-aligned: mmap's own)."""
        ranges = []
        for mapping in list(self._maps.values()):  # a snapshot: the engine thread may map more
            view = np.frombuffer(mapping, dtype=np.uint8)  # an export, released below
            ranges.append((int(view.ctypes.data), len(mapping)))
            del view
        return ranges

    def mapped_blob(self, key: MoELayerKey, expert: int) -> torch.Tensor:
        """The blob as a memory-mapped uint8 tensor (copy-on-write; nothing is read until touched).

        The file is mapped here rather than through `safe_open`, whose `get_tensor` faults the
        tensor's pages in: the offloading path must be able to ask whether a blob is in RAM
        (`mincore`) without that question reading it.
        """
        mapping = self._maps.get(key)
        if mapping is None:
            with open(self.path(key), "rb") as f:
                mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            self._maps[key] = mapping
        location = self.location(key, expert)
        return torch.frombuffer(mapping, dtype=torch.uint8, count=location.nbytes, offset=location.offset)

    def mapped(self, key: MoELayerKey, expert: int) -> ExpertWeights:
        """The expert's weights as views into the memory-mapped file."""
        return self.layout.unpack(self.mapped_blob(key, expert))

    def iter_native_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """`(native state-dict key, mapped tensor)` for every expert weight, in model order (a
        quantised store's dequantised to float32: what its bytes stand for)."""
        for key in self.keys:
            prefix = f"{key.stack}.blocks.{key.block}.mlp.experts"
            for e in range(self.num_experts):
                weights = self.mapped(key, e)
                names = ("wi_0", "wi_1", "wo") if self.layout.is_gated else ("wi", "wo")
                parts = [weights.wi_0, weights.wi_1, weights.wo] if self.layout.is_gated else [weights.wi_0, weights.wo]
                biases = (
                    [weights.bi_0, weights.bi_1, weights.bo] if self.layout.is_gated else [weights.bi_0, weights.bo]
                )
                for name, part in zip(names, parts, strict=True):
                    assert part is not None
                    yield f"{prefix}.{e}.{name}.weight", part if isinstance(part, torch.Tensor) else part.dequantize()
                for name, bias in zip(names, biases, strict=True):
                    if bias is not None:
                        yield f"{prefix}.{e}.{name}.bias", bias


def _read_header(path: Path) -> tuple[dict[str, str], int]:
    """The `__metadata__` of an expert file and where its data starts; validates it as safetensors."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100 * 2**20:
                raise CheckpointError(f"{path}: header of {length} bytes is not plausible")
            header = json.loads(f.read(length))
        with safe_open(str(path), framework="pt") as handle:  # the library's own validation
            handle.keys()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: expert file is missing") from None
    except (SafetensorError, json.JSONDecodeError, struct.error, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not a valid expert file ({exc})") from exc
    meta = header.get("__metadata__") or {}
    return meta, 8 + length
