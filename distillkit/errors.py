"""Exceptions distillkit raises for problems the user can fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class DistillkitError(Exception):
    """Base class of errors that carry a message meant for the user."""


class ConfigError(DistillkitError, ValueError):
    """A configuration value is missing, unknown or invalid; the message names the field and the fix."""


class UnknownLossError(ConfigError, KeyError):
    """A loss name is not registered by any loaded plugin."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class LayerMapError(ConfigError):
    """A layer map names a layer a model does not have."""


class LossTermError(DistillkitError, RuntimeError):
    """A loss term raised while computing; the message names the term and the plugin that provides it."""


def close_matches(word: str, choices: Iterable[str]) -> str:
    """Formats a "did you mean" hint.

    Args:
        word: The misspelt name.
        choices: The valid names.

    Returns:
        ``" (did you mean 'x'?)"`` or an empty string when nothing is close.

    """
    matches = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.6)
    if not matches:
        return ""
    return " (did you mean " + " or ".join(f"'{m}'" for m in matches) + "?)"
