"""Helpers that put real plugin distributions on sys.path for discovery tests."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

from distillkit.plugin_manager import reset_plugins
from distillkit.registry import reset_registry


def write_distribution(
    root: Path, name: str, module: str, source: str, entry_point: str | Sequence[str]
) -> None:
    """Writes ``module.py`` and a real ``<name>-0.1.dist-info`` declaring ``entry_point`` (or several)."""
    (root / f"{module}.py").write_text(source)
    info = root / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    names = [entry_point] if isinstance(entry_point, str) else list(entry_point)
    (info / "entry_points.txt").write_text("[distillkit]\n" + "".join(f"{n} = {module}\n" for n in names))
    (info / "RECORD").write_text("")


class PathPlugins:
    """Context manager: adds a directory to sys.path and reloads plugins; restores everything afterwards."""

    def __init__(self, directory: Path) -> None:
        self.directory = str(directory)

    def __enter__(self) -> PathPlugins:
        sys.path.insert(0, self.directory)
        importlib.invalidate_caches()
        reset_plugins()
        reset_registry()
        return self

    def __exit__(self, *exc) -> None:
        sys.path.remove(self.directory)
        importlib.invalidate_caches()
        reset_plugins()
        reset_registry()
