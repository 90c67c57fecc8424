"""Build a model from a directory: native cpm2 or Hugging Face T5 / mT5 / Switch / M2M-100 / NLLB-200.

The model is built on the meta device (no memory), every tensor is checked against the config
(missing, unexpected, wrong shape: errors name the file and key) and then assigned straight from
the memory-mapped safetensors (`load_state_dict(assign=True)`), so loading a model in its stored
dtype copies nothing (gpt-fast `_load_model`, torchtitan state-dict adapters).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import platform
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from engine.config import ModelConfig
from engine.errors import CheckpointError, ConfigError, Cpm2Error
from engine.experts.store import ExpertStore, is_expert_key
from engine.model import Seq2SeqLM
from engine.model.linear import Linear, can_pack, pack_for_cpu, pack_weight, quantize_linear, quantize_linears
from engine.weights.files import INDEX_FILE, SINGLE_FILE, TensorFiles, TensorSource, open_tensor_source
from engine.weights.hf import IGNORED_HF_KEYS, KeyPlan, hf_key_plan, hf_to_config, ignored_hf_keys, is_hf_config

CONFIG_FILE = "config.json"
SourceFormat = Literal["cpm2", "hf"]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """`"bf16"` / `"float32"` / a torch dtype → torch dtype; None stays None (the checkpoint's own)."""
    if name is None or isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ConfigError(f"dtype {name!r} is not supported; use one of float32, bfloat16, float16") from None


@dataclass(frozen=True)
class CheckpointInfo:
    """What a model directory holds, read without loading any tensor data."""

    path: Path
    config: ModelConfig
    source_format: SourceFormat
    stored_dtype: torch.dtype
    has_weights: bool = True
    """False when only a config was read (`inspect_config` without tensor files): `stored_dtype` and,
    for an HF config, the separate output head then come from the config's own fields."""


def read_json_object(path: Path, *, missing: str, error: type[Cpm2Error] = CheckpointError) -> dict[str, Any]:
    """The JSON object in `path`; `error` (saying `missing` when there is no file) otherwise."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise error(f"{path}: {missing}") from None
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object")
    return data


def _config_of(data: dict[str, Any], *, has_lm_head: bool, source: Path) -> tuple[ModelConfig, SourceFormat]:
    """The `ModelConfig` of a parsed `config.json` (HF or native) and which kind it was."""
    try:
        if is_hf_config(data):
            return hf_to_config(data, has_lm_head=has_lm_head, source=str(source)), "hf"
        return ModelConfig.from_dict(data, source=str(source)), "cpm2"
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from exc


def inspect_checkpoint(model_dir: Path, files: TensorSource | None = None) -> CheckpointInfo:
    """Read the config and tensor index of `model_dir`."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: no such model directory")
    config_path = model_dir / CONFIG_FILE
    data = read_json_object(config_path, missing=f"missing (a model directory needs a {CONFIG_FILE})")
    files = files or TensorFiles.open(model_dir)
    config, fmt = _config_of(data, has_lm_head="lm_head.weight" in files, source=config_path)
    probe = "embed.weight" if fmt == "cpm2" else hf_key_plan(config, ["embed.weight"])[0].sources[0]
    stored = files.get(probe).dtype if probe in files else torch.float32
    return CheckpointInfo(model_dir, config, fmt, stored)


def inspect_config(path: Path) -> CheckpointInfo:
    """What a model is, from a directory (with or without weights) or a `config.json` file.

    A directory holding safetensors is inspected as `inspect_checkpoint` does. Without them (a config
    downloaded ahead of its weights, or weights still pickled), the config alone answers: an HF
    config's `torch_dtype` (transformers 5.x: `dtype`) is the stored dtype (float32 when absent, as
    `inspect_checkpoint` assumes) and `tie_word_embeddings: false` means the checkpoint has its own
    `lm_head.weight`, as T5 v1.1, mT5 and FLAN-T5 do. No tensor file is opened.
    """
    path = Path(path)
    if path.is_dir():
        if (path / SINGLE_FILE).exists() or (path / INDEX_FILE).exists():
            return inspect_checkpoint(path)
        config_path = path / CONFIG_FILE
    elif path.is_file():
        config_path = path
    else:
        raise CheckpointError(f"{path}: no such model directory or {CONFIG_FILE} file")
    data = read_json_object(config_path, missing=f"missing (a model directory needs a {CONFIG_FILE})")
    config, fmt = _config_of(data, has_lm_head=data.get("tie_word_embeddings", True) is False, source=config_path)
    declared = data.get("torch_dtype", data.get("dtype"))
    stored = DTYPES.get(declared, torch.float32) if isinstance(declared, str) else torch.float32
    return CheckpointInfo(config_path.parent, config, fmt, stored, has_weights=False)


def key_plan(info: CheckpointInfo, native_keys: list[str]) -> list[KeyPlan]:
    """Which stored tensors make up each native tensor."""
    if info.source_format == "hf":
        return hf_key_plan(info.config, native_keys)
    return [KeyPlan(key, (key,)) for key in native_keys]


def ignored_keys(info: CheckpointInfo) -> re.Pattern[str]:
    """Stored tensors that are aliases or unused: skipped, present or not."""
    return ignored_hf_keys(info.config) if info.source_format == "hf" else IGNORED_HF_KEYS


def _check_plan(
    plan: list[KeyPlan],
    files: TensorSource,
    expected: dict[str, torch.Size],
    model_dir: Path,
    *,
    ignored: re.Pattern[str],
) -> None:
    used: set[str] = set()
    for item in plan:
        shapes = []
        for source in item.sources:
            if source not in files:
                raise CheckpointError(
                    f"{model_dir}: tensor '{source}' is missing from the checkpoint "
                    f"(needed for '{item.native}'; the config says this model has it)"
                )
            used.add(source)
            shapes.append(files.shape(source))
        want = tuple(expected[item.native])
        rows = sum(s[0] for s in shapes) if all(len(s) == len(want) for s in shapes) and shapes else -1
        got = (rows, *shapes[0][1:]) if rows >= 0 else shapes[0]
        if got != want or any(s[1:] != want[1:] for s in shapes):
            found = " + ".join(str(list(s)) for s in shapes)
            raise CheckpointError(
                f"{files.file_of(item.sources[0])}: tensor '{item.sources[0]}' has shape {found} but the "
                f"config needs {list(want)} for '{item.native}'; the checkpoint and config.json disagree"
            )
    unused = [k for k in files.keys() if k not in used]  # noqa: SIM118 (a TensorSource, not a dict)
    extra = sorted(k for k in unused if not ignored.match(k))
    if extra:
        raise CheckpointError(
            f"{files.file_of(extra[0])}: unexpected tensor '{extra[0]}' ({len(extra)} unexpected in all); "
            "the config does not describe it. Check config.json (layers, experts, MoE layout)"
        )


def default_dtype(stored: torch.dtype, device: torch.device) -> torch.dtype:
    """The stored dtype, except float16 on CPU, which CPU kernels handle poorly: bfloat16 there."""
    if device.type == "cpu" and stored == torch.float16:
        return torch.bfloat16
    return stored


def native_tensors(
    info: CheckpointInfo,
    files: TensorSource,
    *,
    dtype: torch.dtype,
    device: torch.device,
    include_experts: bool = True,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every native tensor of the checkpoint, checked against the config first.

    A native directory keeps its experts either in its shards or in an expert store (`experts/`,
    see `engine.experts.store`); dense tensors come first, then experts. Tensors already in
    `dtype` on the CPU are the memory-mapped data itself (no copy).
    """
    with torch.device("meta"):
        model = Seq2SeqLM(info.config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    store = None
    if info.source_format == "cpm2" and info.config.moe is not None and ExpertStore.exists(info.path):
        store = ExpertStore.open(info.path, info.config)
    in_files = {k: v for k, v in expected.items() if store is None or not is_expert_key(k)}
    plan = key_plan(info, list(in_files))
    _check_plan(plan, files, in_files, info.path, ignored=ignored_keys(info))
    for item in plan:
        if not include_experts and is_expert_key(item.native):
            continue
        parts = [files.get(s) for s in item.sources]
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        yield item.native, tensor.to(device=device, dtype=dtype)
    if store is not None and include_experts:
        for key, tensor in store.iter_native_tensors():
            yield key, tensor.to(device=device, dtype=dtype)


def load_model(
    model_dir: Path | str,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    load_experts: bool = True,
    pack: bool = True,
) -> tuple[Seq2SeqLM, CheckpointInfo]:
    """Load `model_dir` (native or HF) for inference: eval mode, no gradients.

    With `load_experts=False`, expert weights stay on the meta device; an offloading expert
    provider then supplies them. With `pack` (the default), CPU weights are packed for fast
    decoding (`prepare_for_inference`).
    """
    model_dir = Path(model_dir)
    device = torch.device(device)
    files = open_tensor_source(model_dir)
    try:
        info = inspect_checkpoint(model_dir, files)
        target = parse_dtype(dtype) or default_dtype(info.stored_dtype, device)
        if device.type == "cpu" and target == torch.float16:
            raise ConfigError("float16 is not supported on CPU; use bfloat16 or float32")
        state = dict(native_tensors(info, files, dtype=target, device=device, include_experts=load_experts))
        with torch.device("meta"):
            model = Seq2SeqLM(info.config)
        model.load_state_dict(state, assign=True, strict=load_experts)
    finally:
        # Assigned tensors keep their own references to the mapped memory.
        files.close()
    model.eval().requires_grad_(False)
    if pack:
        prepare_for_inference(model)
    return model, info


def quantize_dense(model: Seq2SeqLM) -> int:
    """The dense matmuls in int8 (`engine.model.quant`): every `Linear` but the experts' (an int8
    store holds those); a tied output head gets its own int8 copy of the embedding, whose lookup
    keeps the float matrix. Returns how many weights were quantised. Inference only."""
    count = quantize_linears(model, skip=".experts.")
    if model.lm_head is None:
        with torch.device("meta"):
            head = Linear(model.config.d_model, model.config.vocab_size)
        quantize_linear(head, model.embed.weight)
        model.lm_head = head
        count += 1
    _unmap_float_tensors(model)
    _return_freed_memory()
    return count


def _return_freed_memory() -> None:
    """Hand freed heap memory back to the OS: glibc keeps it for reuse, and quantising frees float32
    temporaries block after block, which stayed in RSS (0.6 GiB after loading NLLB-MoE 54B)."""
    if platform.libc_ver()[0] != "glibc":
        return
    with contextlib.suppress(OSError, AttributeError):  # no such library or symbol: nothing to hand back
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _unmap_float_tensors(model: Seq2SeqLM) -> None:
    """Copy the CPU tensors left after quantisation (embedding, norms, biases, routers) out of the
    memory-mapped checkpoint.

    They are views of the mapped files, and while any view lives the whole mapping does, with every
    page that quantising read still counted in this process's RSS: on NLLB-MoE 54B, 5.6 GiB of
    bfloat16 file pages beside 3.3 GiB of anonymous memory (`bench.fullscale`, /proc/self/status).
    Once copied, nothing refers to the mappings and they go. Tensors shared between modules stay
    shared.
    """
    copies: dict[int, torch.Tensor] = {}

    def copied(tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in copies:
            copies[id(tensor)] = tensor.detach().clone()
        return copies[id(tensor)]

    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.device.type == "cpu" and param.numel():
                setattr(module, name, torch.nn.Parameter(copied(param), requires_grad=False))
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer is not None and buffer.device.type == "cpu" and buffer.numel():
                module.register_buffer(name, copied(buffer), persistent=name not in module._non_persistent_buffers_set)


def prepare_for_inference(model: Seq2SeqLM) -> int:
    """Pack dense CPU weights into oneDNN's layout (`engine.model.linear`); returns the number packed.

    Experts stay in the plain layout of the expert store, so resident and offloaded experts run the
    same kernel on the same bytes (offloading changes no result). A tied output head gets its own
    packed copy, since the embedding lookup needs the plain matrix. The model can no longer be
    trained or saved afterwards.
    """
    count = pack_for_cpu(model, skip=".experts.")
    if model.lm_head is None and can_pack(model.embed.weight):
        with torch.device("meta"):
            head = Linear(model.config.d_model, model.config.vocab_size)
        head.weight = torch.nn.Parameter(pack_weight(model.embed.weight), requires_grad=False)
        model.lm_head = head
        count += 1
    return count
