"""Byte sizes as people write them on command lines: `512MiB`, `2GB`, `1.5 GiB`, `4096`."""

from __future__ import annotations

import re

from engine.errors import ConfigError

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
    "t": 2**40,
}


def parse_bytes(text: str | int, *, name: str = "size") -> int:
    """`"512MiB"` → 536870912. Decimal (kB, MB, GB) and binary (KiB, MiB, GiB; K, M, G) units."""
    if isinstance(text, int):
        value = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ConfigError(
                f"{name}: cannot read {text!r} as a size; write a number with an optional unit, "
                "e.g. 4096, 512MiB, 2GB, 1.5GiB"
            )
        value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ConfigError(f"{name}: must be positive, got {text!r}")
    return value


def format_bytes(num: float) -> str:
    """`536870912` → `512.0 MiB`."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(num) < 1024 or unit == "TiB":
            return f"{num:.0f} {unit}" if unit == "B" else f"{num:.1f} {unit}"
        num /= 1024
    raise AssertionError("unreachable")
