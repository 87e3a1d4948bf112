"""Name -> loss class, collected from the ``distillkit_register_losses`` hook of every loaded plugin."""

from __future__ import annotations

from dataclasses import dataclass

from distillkit.errors import UnknownLossError, close_matches, quote_input
from distillkit.plugin_manager import PluginInfo, failed_plugins, load_plugins, plugin_infos


@dataclass(frozen=True)
class LossInfo:
    """A registered loss.

    Attributes:
        name: The name configs use (``loss: <name>``).
        cls: The :class:`distillkit.objective.terms.LossTerm` subclass.
        plugin: The plugin that registered it.

    """

    name: str
    cls: type
    plugin: PluginInfo


_registry: dict[str, LossInfo] | None = None
_registration_errors: dict[str, str] = {}


def _collect() -> dict[str, LossInfo]:
    from distillkit.objective.terms import LossTerm

    pm = load_plugins()
    infos = {info.name: info for info in plugin_infos()}
    registry: dict[str, LossInfo] = {}
    for impl in pm.hook.distillkit_register_losses.get_hookimpls():
        plugin = infos.get(impl.plugin_name) or PluginInfo(
            impl.plugin_name, getattr(impl.plugin, "__name__", "?"), "unknown", "unknown"
        )

        def register(cls: type, plugin: PluginInfo = plugin) -> None:
            if not (isinstance(cls, type) and issubclass(cls, LossTerm)):
                raise TypeError(f"register() expects a LossTerm subclass, got {cls!r}")
            if not cls.name:
                raise TypeError(f'{cls.__qualname__} has no `name`; set `name = "..."` on the class')
            if cls.name in registry and registry[cls.name].cls is not cls:
                other = registry[cls.name].plugin
                raise TypeError(
                    f"loss name '{cls.name}' is already registered by plugin '{other.name}' "
                    f"({other.distribution}); rename one of them"
                )
            registry[cls.name] = LossInfo(cls.name, cls, plugin)

        try:
            impl.function(register=register)
        except Exception as exc:  # keep the other plugins' losses
            _registration_errors[impl.plugin_name] = f"{type(exc).__name__}: {exc}"
    return registry


def loss_registry() -> dict[str, LossInfo]:
    """Returns every registered loss by name (collected once)."""
    global _registry
    if _registry is None:
        _registry = _collect()
    return _registry


def registration_errors() -> dict[str, str]:
    """Returns plugin name -> error for plugins that loaded but raised while registering losses."""
    loss_registry()
    return dict(_registration_errors)


def get_loss(name: str) -> LossInfo:
    """Looks a loss up by name.

    Args:
        name: The registered name, e.g. ``"kd"``.

    Returns:
        The loss's :class:`LossInfo`.

    Raises:
        UnknownLossError: When no loaded plugin registers ``name``; the message lists the known names and
            close matches.

    """
    registry = loss_registry()
    if name in registry:
        return registry[name]
    known = ", ".join(sorted(registry)) or "none (no plugin loaded)"
    broken = [info for info in failed_plugins() if info.name == name] or failed_plugins()
    broken += [PluginInfo(p, p, "", "", e) for p, e in registration_errors().items()]
    if broken:
        failures = "; ".join(
            f"plugin '{info.name}'{f' ({info.distribution} {info.version})' if info.distribution else ''} "
            f"failed to load: {info.error}"
            for info in broken
        )
        raise UnknownLossError(
            f"unknown loss {quote_input(name)}{close_matches(name, registry)}, and {failures}. "
            "That plugin may provide it: fix that error (reinstall the package or its missing dependency). "
            f"Known losses: {known}."
        )
    raise UnknownLossError(
        f"unknown loss {quote_input(name)}{close_matches(name, registry)}. Known losses: {known}. "
        "Install a plugin that provides it, or run `distillkit losses` to see what is available."
    )


def reset_registry() -> None:
    """Forgets the collected losses (tests use this together with plugins.reset_plugins)."""
    global _registry
    _registry = None
    _registration_errors.clear()
