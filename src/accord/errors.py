"""The errors a user meets, at the bottom of the library so every layer can raise them."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad setting, reported as one line before any worker starts."""


class ConfigTypeError(ConfigError, TypeError):
    """A setting of the wrong type (``TrainConfig(lr="0.1")``): a ConfigError for the CLI,
    a TypeError for Python callers."""
