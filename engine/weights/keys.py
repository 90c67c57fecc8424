"""Native parameter names: the one parser of `{encoder,decoder}.blocks.{i}.<rest>` that every
translation table (HF, released CPM-2) starts from."""

from __future__ import annotations

import re

_BLOCK_KEY = re.compile(r"(encoder|decoder)\.blocks\.(\d+)\.(.+)")


def split_block_key(native: str) -> tuple[str, int, str]:
    """`("encoder", 3, "attn.qkv.weight")` for `encoder.blocks.3.attn.qkv.weight`; KeyError otherwise."""
    m = _BLOCK_KEY.fullmatch(native)
    if m is None:
        raise KeyError(native)
    return m.group(1), int(m.group(2)), m.group(3)
