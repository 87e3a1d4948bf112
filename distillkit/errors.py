"""Exceptions distillkit raises for problems the user can fix."""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable
from pathlib import Path


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


class MissingOutputError(DistillkitError, ValueError):
    """A model's output lacks something a loss term reads; the message names it and how to ask for it."""


class LossTermError(DistillkitError, RuntimeError):
    """A loss term raised while computing; the message names the term and the plugin that provides it."""


def quote_input(value: object, limit: int = 120) -> str:
    r"""Shows a value the user gave inside a message: quoted, on one line, control characters escaped.

    As Python's ``repr`` writes it: ``quote_input("a\nb")`` is ``'a\nb'`` (the newline shown as ``\n``),
    so a message stays one line and says exactly what was typed; longer than ``limit`` characters, it is cut
    with ``...``.

    Args:
        value: The user's input (text, or a parsed value such as a number, list or mapping).
        limit: The most characters shown.

    Returns:
        The quoted text.

    """
    shown = repr(value)
    return shown if len(shown) <= limit else shown[:limit] + "..."


def one_line(text: object) -> str:
    """Another library's message in one line (its line breaks and runs of spaces become single spaces)."""
    return " ".join(str(text).split())


def resolved_against(path: str | os.PathLike[str]) -> str:
    """`` (resolved against /current/dir)`` for a relative path, for messages; empty for an absolute one."""
    return "" if Path(path).is_absolute() else f" (resolved against {os.getcwd()})"


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
