"""PEFT prompt-tuning adapters ⇄ cpm2 soft prompts (the one place that translates this format).

A PEFT (https://github.com/huggingface/peft) prompt-tuning adapter is a directory with

    adapter_config.json        {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": n, "token_dim": d,
                                "num_transformer_submodules": k, "task_type": "SEQ_2_SEQ_LM", ...}
    adapter_model.safetensors  prompt_embeddings  [n * k, d]

For an encoder-decoder PEFT defaults to k = 2 and the first n rows are the encoder prompt. What PEFT
does with the other n rows was read from `PeftModelForSeq2SeqLM` (peft 0.21.2; the code dates from
huggingface/peft#519, merged June 2023): `generate` and, for PROMPT_TUNING, the training `forward`
too prepend only `prompts[:, :num_virtual_tokens]` to the encoder input embeddings. The decoder half
is never read, so it gets no gradient and is still its initialisation in a saved adapter (only PEFT
releases before #519 prepended it to `decoder_inputs_embeds` in training, and could not `generate`).
The encoder half therefore becomes the cpm2 `prefix` and the decoder half is dropped (noted in the
prompt's metadata); mapping it to `decoder_prefix` would make cpm2 generate what PEFT never does.

Export writes `num_transformer_submodules: 1` (encoder prompt only, which PEFT supports for seq2seq
since huggingface/peft#150) rather than inventing a decoder half. Only a prompt that is a pure
`prefix` can be exported: PEFT has no place for an infix, a suffix or a decoder prefix.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors

from engine.prompts import PromptError, SoftPrompt, looks_like_pickle, read_safetensors

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
#: What `save_pretrained(..., safe_serialization=False)` writes; a pickle, refused unread.
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
PEFT_FILE_NAMES = (CONFIG_NAME, WEIGHTS_NAME, PICKLE_WEIGHTS_NAME)

EMBEDDINGS_KEY = "prompt_embeddings"
SUPPORTED_PEFT_TYPE = "PROMPT_TUNING"
SEQ2SEQ_TASK = "SEQ_2_SEQ_LM"

#: An adapter config is a few hundred bytes; anything much larger is not one.
MAX_CONFIG_BYTES = 64 * 1024


@dataclass(frozen=True, kw_only=True)
class PeftPromptConfig:
    """The fields of a PEFT `adapter_config.json` that decide how its prompt is read."""

    num_virtual_tokens: int
    """Rows per transformer submodule (the encoder prompt's length)."""
    num_transformer_submodules: int
    """1: encoder prompt only; 2: encoder then decoder rows (PEFT's seq2seq default)."""
    token_dim: int | None
    """Width of each row; must be the model's d_model (None: not stated, the tensor decides)."""
    base_model_name_or_path: str | None
    """The model the prompt was trained on (informational)."""

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> PeftPromptConfig:
        """Validate a parsed adapter config; raises `PromptError("config")` naming the field to fix."""
        peft_type = config.get("peft_type")
        if peft_type != SUPPORTED_PEFT_TYPE:
            raise PromptError(
                f"peft_type {peft_type!r} is not supported: cpm2 serves soft prompts, so only "
                f"{SUPPORTED_PEFT_TYPE} adapters can be loaded",
                problem="config",
            )
        task_type = config.get("task_type")
        if task_type not in (None, SEQ2SEQ_TASK):
            raise PromptError(
                f"task_type {task_type!r}: cpm2 serves encoder-decoder models; train the prompt with "
                f"task_type={SEQ2SEQ_TASK}",
                problem="config",
            )
        num_virtual_tokens = _positive_int(config, "num_virtual_tokens")
        # PEFT fills a missing value the same way (`_prepare_prompt_learning_config`).
        submodules = config.get("num_transformer_submodules")
        if submodules is None:
            submodules = 2 if task_type == SEQ2SEQ_TASK else 1
        if not isinstance(submodules, int) or isinstance(submodules, bool) or submodules not in (1, 2):
            raise PromptError(f"num_transformer_submodules must be 1 or 2, got {submodules!r}", problem="config")
        token_dim = None if config.get("token_dim") is None else _positive_int(config, "token_dim")
        base = config.get("base_model_name_or_path")
        return cls(
            num_virtual_tokens=num_virtual_tokens,
            num_transformer_submodules=submodules,
            token_dim=token_dim,
            base_model_name_or_path=str(base) if base is not None else None,
        )


def _positive_int(config: Mapping[str, Any], key: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise PromptError(f"adapter config field {key!r} must be a positive integer, got {value!r}", problem="config")
    return value


def parse_peft_config(data: bytes) -> dict[str, Any]:
    """The JSON object of an `adapter_config.json`; raises `PromptError("config")` if it is not one."""
    if len(data) > MAX_CONFIG_BYTES:
        raise PromptError(f"{CONFIG_NAME} is {len(data)} bytes; the limit is {MAX_CONFIG_BYTES}", problem="too_large")
    try:
        config = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PromptError(f"{CONFIG_NAME} is not valid JSON ({exc})", problem="config") from exc
    except RecursionError as exc:  # e.g. 60 KB of "[": within the size limit, too deep for the parser
        raise PromptError(f"{CONFIG_NAME} is nested too deeply to be an adapter config", problem="config") from exc
    if not isinstance(config, dict):
        raise PromptError(f"{CONFIG_NAME} must hold a JSON object", problem="config")
    return config


def soft_prompt_from_peft(
    config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], *, d_model: int
) -> SoftPrompt:
    """The cpm2 prompt of a PEFT prompt-tuning adapter: encoder rows → `prefix`, decoder rows dropped.

    Raises `PromptError`: an unsupported or malformed config (`config`), a tensor that does not match
    the config or the model's `d_model` (`shape`).
    """
    peft = PeftPromptConfig.from_dict(config)
    unknown = sorted(set(tensors) - {EMBEDDINGS_KEY})
    if unknown or EMBEDDINGS_KEY not in tensors:
        raise PromptError(
            f"a prompt-tuning adapter holds one tensor, {EMBEDDINGS_KEY!r}; this one holds {sorted(tensors)}",
            problem="shape",
        )
    embeddings = tensors[EMBEDDINGS_KEY]
    rows = peft.num_virtual_tokens * peft.num_transformer_submodules
    if embeddings.dim() != 2 or embeddings.shape[0] != rows:
        raise PromptError(
            f"{EMBEDDINGS_KEY} has shape {list(embeddings.shape)} but the config says {rows} rows "
            f"(num_virtual_tokens {peft.num_virtual_tokens} x num_transformer_submodules "
            f"{peft.num_transformer_submodules})",
            problem="shape",
        )
    width = embeddings.shape[1]
    if peft.token_dim is not None and peft.token_dim != width:
        raise PromptError(f"{EMBEDDINGS_KEY} is {width} wide but token_dim is {peft.token_dim}", problem="shape")
    if width != d_model:
        raise PromptError(
            f"the adapter's token_dim is {width} but this model's d_model is {d_model}; "
            "it was trained for another model",
            problem="shape",
        )
    if not embeddings.is_floating_point():
        raise PromptError(f"{EMBEDDINGS_KEY} has dtype {embeddings.dtype}; it must be floating point", problem="shape")
    metadata = {"source": "peft", "peft_type": SUPPORTED_PEFT_TYPE}
    if peft.base_model_name_or_path:
        metadata["peft_base_model"] = peft.base_model_name_or_path
    if peft.num_transformer_submodules == 2:
        metadata["peft_decoder_prompt"] = (
            f"dropped ({peft.num_virtual_tokens} rows): PEFT's seq2seq generate never reads them"
        )
    # clone: keep only the encoder rows, not a view that pins the dropped half in memory.
    return SoftPrompt(prefix=embeddings[: peft.num_virtual_tokens].clone(), metadata=metadata)


def soft_prompt_from_peft_files(config: bytes, weights: bytes, *, d_model: int) -> SoftPrompt:
    """`soft_prompt_from_peft` on the bytes of `adapter_config.json` and `adapter_model.safetensors`."""
    if looks_like_pickle(weights):
        raise PromptError(
            f"a pickled {PICKLE_WEIGHTS_NAME} is refused unread; save the adapter with safetensors "
            f"(PEFT's default, save_pretrained(..., safe_serialization=True)) and send {WEIGHTS_NAME}",
            problem="format",
        )
    return soft_prompt_from_peft(parse_peft_config(config), read_safetensors(weights), d_model=d_model)


def is_peft_path(path: Path) -> bool:
    """Whether `path` names a PEFT adapter: a directory, or one of the files PEFT writes into one."""
    return path.is_dir() or path.name in PEFT_FILE_NAMES


def read_peft_dir(path: Path, *, d_model: int) -> SoftPrompt:
    """The cpm2 prompt of the adapter in directory `path` (or the directory of PEFT file `path`)."""
    directory = path if path.is_dir() else path.parent
    config, weights = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not config.is_file():
        # save_pretrained writes an adapter not named "default" into <dir>/<name>/.
        named = sorted(p.name for p in directory.glob(f"*/{CONFIG_NAME}")) if directory.is_dir() else []
        hint = f"; adapters found in subdirectories: {[str(directory / n) for n in named]}" if named else ""
        raise PromptError(f"{directory} holds no {CONFIG_NAME} (not a PEFT adapter directory){hint}", problem="config")
    if not weights.is_file():
        if (directory / PICKLE_WEIGHTS_NAME).is_file():
            raise PromptError(
                f"{directory} holds a pickled {PICKLE_WEIGHTS_NAME}, which is refused unread; re-save the "
                f"adapter with save_pretrained(..., safe_serialization=True) to get {WEIGHTS_NAME}",
                problem="format",
            )
        raise PromptError(f"{directory} holds no {WEIGHTS_NAME}", problem="format")
    return soft_prompt_from_peft_files(config.read_bytes(), weights.read_bytes(), d_model=d_model)


def peft_from_soft_prompt(
    prompt: SoftPrompt, *, base_model_name_or_path: str | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The PEFT adapter config and tensors of a prefix-only cpm2 prompt (`PeftModel.from_pretrained` loads them)."""
    others = [key for key in prompt.tensors() if key != "prefix"]
    if others or prompt.prefix is None:
        raise PromptError(
            f"PEFT prompt tuning places virtual tokens only before the input; this prompt has {others or 'no prefix'}, "
            "so it cannot be exported to PEFT",
            problem="shape",
        )
    num_virtual_tokens, token_dim = prompt.prefix.shape
    config: dict[str, Any] = {
        "peft_type": SUPPORTED_PEFT_TYPE,
        "task_type": SEQ2SEQ_TASK,
        "num_virtual_tokens": num_virtual_tokens,
        "token_dim": token_dim,
        "num_transformer_submodules": 1,
        "inference_mode": True,
        # RANDOM: PEFT then needs no tokenizer to build the (overwritten) initial embedding.
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None,
        "base_model_name_or_path": base_model_name_or_path or prompt.metadata.get("peft_base_model"),
    }
    # PEFT trains and stores prompts in float32 (its autocast_adapter_dtype); bf16/fp16 widen losslessly.
    tensors = {EMBEDDINGS_KEY: prompt.prefix.detach().to(device="cpu", dtype=torch.float32).contiguous()}
    return config, tensors


def peft_files(prompt: SoftPrompt, *, base_model_name_or_path: str | None = None) -> dict[str, bytes]:
    """The files of a PEFT adapter directory, by name."""
    config, tensors = peft_from_soft_prompt(prompt, base_model_name_or_path=base_model_name_or_path)
    return {
        CONFIG_NAME: json.dumps(config, indent=2, sort_keys=True).encode(),
        WEIGHTS_NAME: save_safetensors(tensors, metadata={"format": "pt"}),
    }


def peft_archive(prompt: SoftPrompt, *, base_model_name_or_path: str | None = None) -> bytes:
    """A zip of the adapter directory's files; the same prompt always gives the same bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, data in peft_files(prompt, base_model_name_or_path=base_model_name_or_path).items():
            # A fixed timestamp keeps the archive (and an ETag over it) reproducible.
            archive.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)
    return buffer.getvalue()
