"""Typed errors raised at the engine's boundaries.

Every error a user can cause (a bad config value, a broken checkpoint, an over-long input) is one of
these, and its message says what was wrong and what to change. The server maps them to HTTP status
codes in one place; the CLI prints them without a traceback.
"""

from __future__ import annotations


class Cpm2Error(Exception):
    """Base class of every error cpm2 raises on purpose."""


class ConfigError(Cpm2Error, ValueError):
    """A configuration value is invalid; the message names the field and the allowed values."""


class CheckpointError(Cpm2Error):
    """A model directory or checkpoint file is missing, malformed or does not match its config.

    The message names the file and, where one is involved, the tensor key.
    """


class InputError(Cpm2Error, ValueError):
    """A request (text, token ids, sampling parameters) cannot be served as given."""


class UnsupportedModelError(CheckpointError):
    """The model directory describes an architecture cpm2 does not implement."""
