"""Soft prompts: learned virtual-token embeddings placed around a request's text (CPM-2 §prompt tuning).

A soft prompt is a safetensors file with any of four 2-D tensors, each `[n, d_model]`:

    prefix          before the input text            ("front")
    infix           between `inputs` and `text_pair`  ("middle", for sentence pairs)
    suffix          after the last text segment       ("back")
    decoder_prefix  before the decoder start token

and string metadata (`d_model`, `description`, what trained it). The encoder input of a request is

    [prefix] [inputs tokens] [infix] [text_pair tokens] [suffix]

where the end-of-sequence token closes the last text segment. Training (`training/`) writes this
format and the server reads it; CPM-2 found that prompt position matters (front / middle / back),
so all three places are first-class. Only safetensors is accepted: a pickle is refused before any
byte of it is interpreted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from engine.errors import InputError

PROMPT_KEYS: tuple[str, ...] = ("prefix", "infix", "suffix", "decoder_prefix")
ENCODER_KEYS: tuple[str, ...] = ("prefix", "infix", "suffix")

#: What is wrong with a prompt (the server maps each to a status code): not safetensors (`format`),
#: wrong keys or shapes (`shape`), over a limit (`too_large`), NaN/Inf (`values`), a missing, malformed
#: or unsupported adapter config (`config`, see `engine/peft.py`).
PromptProblem = Literal["format", "shape", "too_large", "values", "config"]

# Magic bytes of formats that must never be interpreted here: pickle protocols 2-5 and zip
# (torch.save's container).
_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")


class PromptError(InputError):
    """A soft prompt file that cannot be used; `problem` says which kind (for status codes)."""

    def __init__(self, message: str, *, problem: PromptProblem) -> None:
        super().__init__(message)
        self.problem = problem


@dataclass(frozen=True)
class SoftPrompt:
    """Validated prompt tensors (each `[n, d_model]`, or None where the prompt has none)."""

    prefix: torch.Tensor | None = None
    infix: torch.Tensor | None = None
    suffix: torch.Tensor | None = None
    decoder_prefix: torch.Tensor | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The present tensors by key."""
        return {k: t for k in PROMPT_KEYS if (t := getattr(self, k)) is not None}

    @property
    def num_virtual_tokens(self) -> dict[str, int]:
        return {k: t.shape[0] for k, t in self.tensors().items()}

    @property
    def encoder_tokens(self) -> int:
        """Virtual tokens added to the encoder input."""
        return sum(n for k, n in self.num_virtual_tokens.items() if k in ENCODER_KEYS)

    @property
    def decoder_tokens(self) -> int:
        return 0 if self.decoder_prefix is None else self.decoder_prefix.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def to(self, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> SoftPrompt:
        moved = {k: t.to(dtype=dtype, device=device) for k, t in self.tensors().items()}
        return SoftPrompt(**moved, metadata=dict(self.metadata))

    def to_bytes(self) -> bytes:
        """The safetensors serialisation (what `parse_soft_prompt` reads)."""
        tensors = {k: t.detach().contiguous().cpu() for k, t in self.tensors().items()}
        return save_safetensors(tensors, metadata={"format": "cpm2-prompt", **self.metadata})


def looks_like_pickle(data: bytes) -> bool:
    """Whether `data` starts like a pickle or a torch.save zip (refused, never opened)."""
    return data.startswith(_PICKLE_MAGIC)


def parse_soft_prompt(
    data: bytes,
    *,
    d_model: int,
    dtype: torch.dtype,
    max_virtual_tokens: int,
    max_bytes: int | None = None,
) -> SoftPrompt:
    """Validate and load a soft prompt from safetensors bytes, cast to the serving `dtype`.

    Raises `PromptError` naming what to change: not safetensors (`format`), wrong keys / rank /
    width / empty (`shape`), over the size or token limits (`too_large`), NaN or Inf after the cast
    (`values`; a float32 prompt can overflow float16).
    """
    if max_bytes is not None and len(data) > max_bytes:
        raise PromptError(f"the prompt file is {len(data)} bytes; the limit is {max_bytes}", problem="too_large")
    tensors = read_safetensors(data)
    unknown = sorted(set(tensors) - set(PROMPT_KEYS))
    if unknown:
        hint = ""
        if "prompt_embeddings" in unknown:  # PEFT's key: the adapter config did not come with it
            hint = "; this looks like a PEFT adapter_model.safetensors: send its adapter_config.json with it"
        raise PromptError(
            f"unknown tensor(s) {unknown}; a soft prompt holds {', '.join(PROMPT_KEYS)}{hint}", problem="shape"
        )
    if not tensors:
        raise PromptError(f"the file holds no tensor; give at least one of {', '.join(PROMPT_KEYS)}", problem="shape")
    checked: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if tensor.dim() != 2:
            raise PromptError(f"'{key}' must be 2-D [tokens, d_model], got shape {list(tensor.shape)}", problem="shape")
        if tensor.shape[0] == 0:
            raise PromptError(f"'{key}' has no rows; drop it or give at least one virtual token", problem="shape")
        if tensor.shape[1] != d_model:
            raise PromptError(
                f"'{key}' is {tensor.shape[1]} wide but this model's d_model is {d_model}", problem="shape"
            )
        if not tensor.is_floating_point():
            raise PromptError(f"'{key}' has dtype {tensor.dtype}; a prompt must be floating point", problem="shape")
        cast = tensor.to(dtype)
        if not torch.isfinite(cast).all():
            raise PromptError(
                f"'{key}' has NaN or Inf values in {str(dtype).removeprefix('torch.')} (after casting from "
                f"{str(tensor.dtype).removeprefix('torch.')}); rescale or retrain the prompt",
                problem="values",
            )
        checked[key] = cast
    prompt = SoftPrompt(**checked, metadata=_metadata(data))
    total = prompt.encoder_tokens + prompt.decoder_tokens
    if total > max_virtual_tokens:
        raise PromptError(
            f"the prompt has {total} virtual tokens; this server allows at most {max_virtual_tokens}",
            problem="too_large",
        )
    return prompt


def read_safetensors(data: bytes) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a pickle or anything malformed raises `PromptError("format")`."""
    if looks_like_pickle(data):
        raise PromptError(
            "pickled files (torch.save, .bin, .pt) are refused; save the prompt with safetensors",
            problem="format",
        )
    header_problem = _header_problem(data)
    if header_problem:
        raise PromptError(f"not a safetensors file: {header_problem}", problem="format")
    try:
        return load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise PromptError(f"not a readable safetensors file ({exc})", problem="format") from exc


def _header_problem(data: bytes) -> str | None:
    """Cheap structural check of a safetensors header before the library parses it."""
    if len(data) < 10:
        return "too short"
    length = int.from_bytes(data[:8], "little")
    if length > min(len(data) - 8, 100 * 2**20):
        return f"header length {length} runs past the end of the file"
    if data[8:9] != b"{":
        return "the header is not a JSON object"
    return None


def _metadata(data: bytes) -> dict[str, str]:
    length = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8 : 8 + length])
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    meta = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items() if k != "format"}


def assemble_encoder_embeds(
    embed: torch.nn.Embedding,
    ids_a: list[int],
    ids_b: list[int],
    prompt: SoftPrompt | None,
) -> torch.Tensor:
    """Encoder input embeddings `[S, D]`: prefix | ids_a | infix | ids_b | suffix (see module doc)."""
    device = embed.weight.device
    parts: list[torch.Tensor] = []

    def tokens(ids: list[int]) -> None:
        if ids:
            parts.append(embed(torch.tensor(ids, dtype=torch.long, device=device)))

    def virtual(t: torch.Tensor | None) -> None:
        if t is not None:
            parts.append(t.to(device=device, dtype=embed.weight.dtype))

    virtual(prompt.prefix if prompt else None)
    tokens(ids_a)
    virtual(prompt.infix if prompt else None)
    tokens(ids_b)
    virtual(prompt.suffix if prompt else None)
    if not parts:
        raise InputError("the input is empty; give at least one token")
    return torch.cat(parts)


def encoder_length(num_a: int, num_b: int, prompt: SoftPrompt | None) -> int:
    """Length of the encoder input `assemble_encoder_embeds` builds."""
    return num_a + num_b + (prompt.encoder_tokens if prompt else 0)


def prompt_from_text(embed: torch.nn.Embedding, pieces: dict[str, list[int]], **metadata: str) -> SoftPrompt:
    """A soft prompt whose rows are the token embeddings of `pieces` (key → token ids).

    The model then reads exactly what it would read had those tokens been written into the input,
    which makes it the usual starting point for prompt tuning (initialisation from the vocabulary)
    and a way to try a prompt's placement (front, middle, back) before training one.
    """
    unknown = sorted(set(pieces) - set(PROMPT_KEYS))
    if unknown:
        raise PromptError(f"unknown prompt part(s) {unknown}; use {list(PROMPT_KEYS)}", problem="shape")
    rows: dict[str, torch.Tensor] = {}
    for key, ids in pieces.items():
        if not ids:
            raise PromptError(f"the {key} text has no tokens", problem="shape")
        with torch.no_grad():
            ids_tensor = torch.tensor(ids, dtype=torch.long, device=embed.weight.device)
            rows[key] = embed(ids_tensor).detach().cpu().clone()
    if not rows:
        raise PromptError("give at least one of prefix, infix, suffix, decoder_prefix", problem="shape")
    return SoftPrompt(**rows, metadata={"source": "text", **metadata})
