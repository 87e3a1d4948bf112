"""The plugin manager: finds plugins through entry points, once, and remembers the ones that failed.

Plugins are modules listed in the ``distillkit`` entry-point group of any installed distribution (the
built-in losses use the same mechanism). Set ``DISTILLKIT_PLUGINS=a,b`` to load only the named entry points,
or to an empty string to load none; a name no entry point has is warned about.

One module may register several losses (one ``distillkit_register_losses`` hook calling ``register`` for
each): that is one plugin and one entry point. Several entry points naming the same module load it once.
"""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points

import pluggy

from distillkit import hookspecs
from distillkit.errors import close_matches

__all__ = [
    "ENTRY_POINT_GROUP",
    "PLUGINS_ENV",
    "PluginInfo",
    "failed_plugins",
    "load_plugins",
    "plugin_for_module",
    "plugin_infos",
    "reset_plugins",
]

ENTRY_POINT_GROUP = "distillkit"
PLUGINS_ENV = "DISTILLKIT_PLUGINS"


@dataclass(frozen=True)
class PluginInfo:
    """Where a plugin came from.

    Attributes:
        name: Entry-point name.
        module: The module path the entry point names.
        distribution: Name of the installed distribution that declares it.
        version: That distribution's version.
        error: ``None`` when it loaded, else the error it raised, as text.

    """

    name: str
    module: str
    distribution: str
    version: str
    error: str | None = None


pm = pluggy.PluginManager("distillkit")
pm.add_hookspecs(hookspecs)

_loaded: dict[str, PluginInfo] = {}
_load_lock = threading.Lock()
_done = False


def _allowed_names() -> set[str] | None:
    """Returns the entry-point names allowed by ``DISTILLKIT_PLUGINS``, or None for all."""
    value = os.environ.get(PLUGINS_ENV)
    if value is None:
        return None
    return {name.strip() for name in value.split(",") if name.strip()}


def _describe(entry_point: EntryPoint) -> tuple[str, str]:
    dist = entry_point.dist
    if dist is None:
        return "unknown", "unknown"
    return dist.metadata["Name"] or "unknown", dist.version


def load_plugins() -> pluggy.PluginManager:
    """Loads every allowed entry-point plugin once and returns the plugin manager.

    A plugin that raises while importing or registering is recorded in :func:`plugin_infos` with its error
    and skipped; the others still load.

    Returns:
        The shared plugin manager.

    """
    global _done
    if _done:
        return pm
    with _load_lock:
        if _done:
            return pm
        allowed = _allowed_names()
        found = entry_points(group=ENTRY_POINT_GROUP)
        if allowed:
            _warn_unmatched(allowed, {entry_point.name for entry_point in found})
        for entry_point in found:
            if allowed is not None and entry_point.name not in allowed:
                continue
            if entry_point.name in _loaded:
                continue
            distribution, version = _describe(entry_point)
            try:
                module = entry_point.load()
                if not pm.is_registered(module):  # another entry point may name the same module
                    pm.register(module, name=entry_point.name)
                error = None
            except Exception as exc:  # a broken plugin must not take the others down
                error = f"{type(exc).__name__}: {exc}"
            _loaded[entry_point.name] = PluginInfo(
                entry_point.name, entry_point.value, distribution, version, error
            )
        _done = True
    return pm


def _warn_unmatched(allowed: set[str], names: set[str]) -> None:
    """Warns about ``DISTILLKIT_PLUGINS`` names that match no entry point (they load nothing)."""
    for name in sorted(allowed - names):
        warnings.warn(
            f"{PLUGINS_ENV} names {name!r}{close_matches(name, names)}, which no installed distribution "
            f"declares as a '{ENTRY_POINT_GROUP}' entry point, so it loads nothing; entry points: "
            f"{', '.join(sorted(names)) or 'none'}",
            UserWarning,
            stacklevel=3,
        )


def plugin_infos() -> list[PluginInfo]:
    """Returns what was found for each entry point, loaded or failed, sorted by name."""
    load_plugins()
    return sorted(_loaded.values(), key=lambda info: info.name)


def failed_plugins() -> list[PluginInfo]:
    """Returns the plugins that raised while loading."""
    return [info for info in plugin_infos() if info.error is not None]


def plugin_for_module(module_name: str) -> PluginInfo | None:
    """Returns the plugin whose entry point names ``module_name`` (or a parent package of it)."""
    for info in plugin_infos():
        if module_name == info.module or module_name.startswith(info.module + "."):
            return info
    return None


def reset_plugins() -> None:
    """Forgets every loaded plugin so the next call re-reads the entry points (tests use this)."""
    global _done
    with _load_lock:
        for name in list(_loaded):
            plugin = pm.get_plugin(name)
            if plugin is not None:
                pm.unregister(plugin, name=name)
        _loaded.clear()
        _done = False
