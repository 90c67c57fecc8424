"""cpm2 HTTP server: generation, runtime soft prompts and metrics over one engine protocol."""

import functools
from importlib import metadata


@functools.cache
def version() -> str:
    """The installed cpm2 version (`/info`, `cpm2_build_info`, OpenAI's `system_fingerprint`)."""
    try:
        return metadata.version("cpm2")
    except metadata.PackageNotFoundError:
        return "unknown"
