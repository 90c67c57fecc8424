"""What an NLLB hub directory's tokenizer files say (`tokenizer_config.json`,
`special_tokens_map.json`, `tokenizer.json`), read and checked before any tokenizer is built."""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import CheckpointError

CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
TOKENIZER_JSON = "tokenizer.json"


@dataclass(frozen=True, kw_only=True)
class HubFiles:
    """What a hub directory's tokenizer files say, before any checking against the model."""

    tokenizer_class: str | None
    """``tokenizer_config.json``'s ``tokenizer_class`` (``NllbTokenizer``, ``NllbTokenizerFast``)."""
    legacy_behaviour: bool
    """Source template ``tokens </s> lang`` instead of ``lang tokens </s>``."""
    language_codes: tuple[str, ...] | None
    """The extra special tokens the files list, ``None`` when they list none."""
    mask_token: str
    """The ``<mask>`` token's text."""
    added_tokens: dict[int, tuple[str, bool]] | None
    """Id -> (text, is special) of every added token, ``None`` when the files give no ids."""


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not readable JSON ({err}); copy it again from the checkpoint") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def _content(token: object, *, where: str) -> str:
    """The text of a token written as ``"eng_Latn"`` or as an AddedToken ``{"content": "eng_Latn", ...}``."""
    if isinstance(token, dict):
        token = token.get("content")
    if not isinstance(token, str):
        raise CheckpointError(f"{where}: expected a token string or {{'content': ...}}, found {token!r}")
    return token


def read_hub_files(model_dir: Path, *, read_ids: bool = True) -> HubFiles:
    """The files' settings; ``read_ids=False`` skips ``tokenizer.json`` (17 MB for NLLB-200)."""
    config = _read_json(model_dir / CONFIG_FILE)
    special_map = _read_json(model_dir / SPECIAL_TOKENS_FILE)
    codes: tuple[str, ...] | None = None
    # transformers 5 saves the codes as extra_special_tokens, 4.x as additional_special_tokens (and
    # older versions only in special_tokens_map.json, with null in tokenizer_config.json).
    for source, data, key in (
        (CONFIG_FILE, config, "extra_special_tokens"),
        (CONFIG_FILE, config, "additional_special_tokens"),
        (SPECIAL_TOKENS_FILE, special_map, "additional_special_tokens"),
    ):
        listed = data.get(key)
        if isinstance(listed, list) and listed:
            where = f"{model_dir / source} {key}"
            codes = tuple(dict.fromkeys(_content(token, where=where) for token in listed))
            break
    legacy = config.get("legacy_behaviour", False)  # HF's default
    if not isinstance(legacy, bool):
        raise CheckpointError(f"{model_dir / CONFIG_FILE}: legacy_behaviour must be true or false, got {legacy!r}")
    tokenizer_class = config.get("tokenizer_class")
    mask = config.get("mask_token") or special_map.get("mask_token") or "<mask>"
    return HubFiles(
        tokenizer_class=tokenizer_class if isinstance(tokenizer_class, str) else None,
        legacy_behaviour=legacy,
        language_codes=codes,
        mask_token=_content(mask, where=f"{model_dir / CONFIG_FILE} mask_token"),
        added_tokens=_read_added_tokens(model_dir, config) if read_ids else None,
    )


def _read_added_tokens(model_dir: Path, config: dict[str, Any]) -> dict[int, tuple[str, bool]] | None:
    """Added tokens' ids from ``tokenizer.json`` (what HF loads first), else ``added_tokens_decoder``."""
    path = model_dir / TOKENIZER_JSON
    try:
        if path.is_file():
            entries = _read_json(path).get("added_tokens")
            if isinstance(entries, list) and entries:
                return {int(e["id"]): (_content(e, where=str(path)), bool(e.get("special", True))) for e in entries}
        path = model_dir / CONFIG_FILE
        decoder = config.get("added_tokens_decoder")
        if isinstance(decoder, dict) and decoder:
            return {
                int(id): (_content(token, where=f"{path} added_tokens_decoder"), bool(token.get("special", True)))
                for id, token in decoder.items()
            }
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(
            f"{path}: malformed added tokens ({err!r}); copy the file again from the checkpoint"
        ) from err
    return None
