"""Reading a config: YAML (safe loading only), ``--set a.b=c`` overrides, validation with fixable errors."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from distillkit.config.errors import format_validation_error
from distillkit.config.run import DistillConfig
from distillkit.config.terms import parse_term_configs
from distillkit.errors import ConfigError, one_line, quote_input, resolved_against


def safe_load_yaml(text: str, source: str = "<string>") -> Any:
    """Parses YAML with the safe loader (no Python object tags).

    Raises:
        ConfigError: On a syntax error or an unsafe tag.

    """
    try:
        return yaml.safe_load(text)
    except yaml.constructor.ConstructorError as exc:
        raise ConfigError(
            f"{source}: unsupported YAML tag ({exc.problem}); configs are plain data, python tags are refused"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {_describe_yaml_error(exc)}") from None


def _describe_yaml_error(exc: yaml.YAMLError) -> str:
    """PyYAML's error in one line: the problem and where (its own message repeats the text over lines)."""
    problem = getattr(exc, "problem", None)
    mark = getattr(exc, "problem_mark", None)
    if problem is None:
        return one_line(exc)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{one_line(problem)}{where}"


def parse_override(override: str) -> tuple[list[str], Any]:
    """Splits ``a.b.c=value`` into a key path and a YAML-parsed value.

    Raises:
        ConfigError: If there is no ``=`` or the key is empty.

    """
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(
            f"override {quote_input(override)} must look like key.path=value, e.g. train.lr=3e-5"
        )
    path = key.strip().split(".")
    if any(not part for part in path):
        raise ConfigError(f"override {quote_input(override)} has an empty key segment")
    return path, safe_load_yaml(raw, source=f"--set {quote_input(key.strip())}")


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Applies ``--set`` overrides to raw config data (a copy is returned).

    List entries are addressed by index: ``objective.0.weight=0.5``.
    """
    data = copy.deepcopy(data)
    for override in overrides:
        path, value = parse_override(override)
        node: Any = data
        for depth, part in enumerate(path[:-1]):
            node = _child(node, part, path[: depth + 1], override, create=True)
        last = path[-1]
        if isinstance(node, list):
            node[_list_index(node, last, override)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(
                f"override {quote_input(override)}: {quote_input('.'.join(path[:-1]))} is not a section"
            )
    return data


def _list_index(node: list, part: str, override: str) -> int:
    if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
        raise ConfigError(
            f"override {quote_input(override)}: {quote_input(part)} is not an index of a list of "
            f"{len(node)} entries"
        )
    return int(part)


def _child(node: Any, part: str, path: list[str], override: str, create: bool) -> Any:
    if isinstance(node, list):
        return node[_list_index(node, part, override)]
    if isinstance(node, dict):
        if part not in node or node[part] is None:
            node[part] = {}
        return node[part]
    raise ConfigError(
        f"override {quote_input(override)}: {quote_input('.'.join(path[:-1]))} is not a section"
    )


def config_from_dict(data: Any, overrides: Sequence[str] = ()) -> DistillConfig:
    """Validates raw data (plus overrides) into a :class:`DistillConfig`.

    Raises:
        ConfigError: Naming each bad field and the fix.

    """
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping at the top level, got {type(data).__name__}")
    data = apply_overrides(data, overrides)
    try:
        config = DistillConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, DistillConfig)) from None
    parse_term_configs(config.objective)
    return config


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> DistillConfig:
    """Reads a YAML config file and applies ``--set`` overrides.

    Args:
        path: The YAML file.
        overrides: ``key.path=value`` strings.

    Returns:
        The validated config.

    Raises:
        ConfigError: For a missing file, invalid YAML, a python tag, or an invalid field.

    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {quote_input(str(path))} does not exist{resolved_against(path)}")
    data = safe_load_yaml(path.read_text(encoding="utf-8"), source=str(path))
    return config_from_dict(data, overrides)
