"""The house rules, checked on the source: data flows one way between rooms; plugins import the public API."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "distillkit"

LAYERS = {
    # room: the rooms it may import (besides itself); every import in a file counts, lazy ones included
    "errors": set(),
    "hookspecs": set(),
    "config": {"errors"},
    "plugin_manager": {"hookspecs", "errors"},
    "registry": {"errors", "plugin_manager", "contract"},
    "ops": {"errors"},
    "contract": {"errors", "config", "ops"},
    "objective": {"errors", "config", "registry", "plugin_manager", "hookspecs", "ops", "contract"},
    "data": {"errors", "config"},
    "text_data": {"errors", "config", "data"},
    "model_paths": {"errors"},
    "models": {"errors", "config", "model_paths"},
    "tokenizers": {"errors", "config", "models", "model_paths"},
    "tasks": {"errors", "config", "data", "text_data", "models", "contract", "ops", "tokenizers"},
    "teacher_cache": {"errors", "contract"},
    "run": {
        "errors", "config", "data", "text_data", "models", "contract", "objective", "ops", "tasks",
        "teacher_cache", "registry", "plugin_manager", "hookspecs", "model_paths", "tokenizers",
    },
    "bench": {
        "errors", "config", "contract", "objective", "ops", "run", "registry", "plugin_manager", "hookspecs",
        "models",
    },
    "hf": {
        "errors", "config", "contract", "objective", "ops", "run", "registry", "plugin_manager", "hookspecs",
        "models",
    },
    "study": {
        "errors", "config", "contract", "objective", "registry", "run", "tasks", "teacher_cache", "data",
        "models",
    },
}  # fmt: skip


CONTRACT = {"terms", "taps", "mapping", "output_layer", "model_access"}
"""The modules of ``distillkit.objective`` that define the term contract; the registry checks classes against
it, and the objective (which looks loss names up in the registry) builds on it."""


def _room(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "distillkit" or len(parts) < 2:
        return None
    if parts[1] == "objective" and len(parts) > 2 and parts[2] in CONTRACT:
        return "contract"
    return parts[1]


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
            found += [f"{node.module}.{alias.name}" for alias in node.names if node.module == "distillkit"]
    return found


def _room_of_file(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    module = ".".join(("distillkit", *relative.with_suffix("").parts))
    return _room(module) or relative.parts[0]


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_each_room_imports_only_the_rooms_below_it(path):
    room = _room_of_file(path)
    if room not in LAYERS:
        return  # the public API (__init__), the command line and the doctor may import any room
    for module in _imports(path):
        other = _room(module)
        if other is None or other == room:
            continue
        assert other in LAYERS[room], f"{path.relative_to(ROOT)} ({room}) imports {module} ({other})"


def test_the_rooms_form_no_circle():
    edges = {room: set(allowed) for room, allowed in LAYERS.items()}
    seen, stack = set(), []

    def visit(room):
        if room in stack:
            raise AssertionError(f"import circle: {' -> '.join([*stack[stack.index(room) :], room])}")
        if room in seen:
            return
        stack.append(room)
        for other in edges.get(room, ()):
            visit(other)
        stack.pop()
        seen.add(room)

    for room in edges:
        visit(room)


@pytest.mark.parametrize("path", sorted((ROOT / "distillkit_plugins").glob("*.py")), ids=lambda p: p.name)
def test_built_in_plugins_import_only_the_public_api(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        modules = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.level == 0:
            modules = [node.module]
        for module in modules:
            if module.split(".")[0] == "distillkit":
                assert module in ("distillkit", "distillkit.ops"), (
                    f"{path.name} imports {module}; a plugin imports only distillkit and distillkit.ops"
                )


def test_the_top_level_stays_small():
    modules = [p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"]
    assert len(modules) <= 16, sorted(modules)
