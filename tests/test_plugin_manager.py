import subprocess
import sys
from pathlib import Path

import pytest

from distillkit.errors import UnknownLossError
from distillkit.plugin_manager import failed_plugins, plugin_infos, reset_plugins
from distillkit.registry import get_loss, loss_registry, reset_registry
from tests.plugin_helpers import PathPlugins, write_distribution

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fresh_registry(monkeypatch):
    monkeypatch.delenv("DISTILLKIT_PLUGINS", raising=False)
    reset_plugins()
    reset_registry()
    yield
    reset_plugins()
    reset_registry()


def test_builtins_come_from_entry_points_with_their_distribution():
    registry = loss_registry()
    for name in ("l2", "kd", "codir", "ce", "attention", "minilm_v2", "cosine", "pkd"):
        info = registry[name]
        assert info.plugin.distribution == "distillkit"
        assert info.plugin.version
        assert info.cls.__module__ == f"distillkit_plugins.{name}"


def test_core_never_imports_builtin_plugins_by_name():
    for path in (ROOT / "distillkit").rglob("*.py"):
        assert "distillkit_plugins" not in path.read_text(), path


@pytest.fixture(scope="module")
def installed_example(tmp_path_factory):
    """Installs examples/distillkit-cosine into a private target directory with pip (a real dist-info)."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(target),
            str(ROOT / "examples" / "distillkit-cosine"),
        ],
        check=True,
    )
    return target


def test_third_party_plugin_is_discovered_through_its_entry_point(installed_example, dims):
    assert list(installed_example.glob("distillkit_cosine-0.1.0.dist-info"))
    with PathPlugins(installed_example):
        info = get_loss("token_cosine")
        assert (info.plugin.distribution, info.plugin.version) == ("distillkit-cosine", "0.1.0")
        from distillkit import DistillationObjective

        objective = DistillationObjective.from_config(
            [{"loss": "token_cosine", "layer_map": "last"}], dims_equal()
        )
        assert list(objective.terms) == ["token_cosine"]


def dims_equal():
    from distillkit.objective.terms import ModelDims

    return ModelDims(student_layers=2, teacher_layers=4, student_hidden=16, teacher_hidden=16)


def test_cli_lists_third_party_plugin(installed_example):
    env_path = f"{installed_example}"
    result = _losses_cli(env_path)
    assert "token_cosine  (distillkit-cosine 0.1.0, plugin 'token_cosine')" in result.stdout
    assert "codir  (distillkit" in result.stdout


def _env():
    import os

    return {k: v for k, v in os.environ.items() if k != "DISTILLKIT_PLUGINS"}


def _losses_cli(python_path: str) -> subprocess.CompletedProcess:
    """``distillkit losses`` in a fresh process that finds plugins on ``python_path``."""
    return subprocess.run(
        [sys.executable, "-m", "distillkit.cli", "losses"],
        capture_output=True,
        text=True,
        env={**_env(), "PYTHONPATH": python_path},
        check=True,
    )


BROKEN = "raise ImportError('needs a library that is not installed: frobnicate')\n"


def test_broken_plugin_is_reported_and_others_still_load(tmp_path):
    write_distribution(tmp_path, "distillkit-broken", "distillkit_broken", BROKEN, "broken")
    with PathPlugins(tmp_path):
        failed = {info.name: info for info in failed_plugins()}
        assert "frobnicate" in failed["broken"].error
        assert failed["broken"].distribution == "distillkit-broken"
        assert {"l2", "kd", "codir"} <= set(loss_registry())
        result = _losses_cli(str(tmp_path))
    assert "plugins that failed to load" in result.stdout
    assert "broken (distillkit-broken 0.1): ImportError: needs a library" in result.stdout
    assert "kd  (distillkit" in result.stdout


def test_a_config_naming_a_broken_plugins_loss_says_it_failed_to_load(tmp_path):
    write_distribution(tmp_path, "distillkit-broken", "distillkit_broken", BROKEN, "broken")
    with PathPlugins(tmp_path):
        with pytest.raises(UnknownLossError) as error:
            get_loss("broken")
    message = str(error.value)
    assert "plugin 'broken' (distillkit-broken 0.1) failed to load: ImportError: needs a library" in message
    assert "frobnicate" in message and "Install a plugin" not in message


def test_plugin_raising_inside_registration_keeps_others(tmp_path):
    source = (
        "from distillkit import hookimpl\n"
        "@hookimpl\n"
        "def distillkit_register_losses(register):\n"
        "    register(object)\n"
    )
    write_distribution(tmp_path, "distillkit-bad-register", "distillkit_bad_register", source, "badreg")
    from distillkit.registry import registration_errors

    with PathPlugins(tmp_path):
        assert "l2" in loss_registry()
        assert "expects a LossTerm subclass" in registration_errors()["badreg"]


def test_env_var_limits_loaded_plugins(monkeypatch):
    monkeypatch.setenv("DISTILLKIT_PLUGINS", "kd, l2")
    assert sorted(info.name for info in plugin_infos()) == ["kd", "l2"]
    assert sorted(loss_registry()) == ["kd", "l2"]


def test_unknown_loss_lists_known_names_and_close_matches():
    with pytest.raises(KeyError) as excinfo:
        get_loss("codr")
    message = str(excinfo.value)
    assert "unknown loss 'codr'" in message
    assert "did you mean 'codir'" in message
    known = message.split("Known losses: ")[1].split(".")[0].split(", ")
    assert known == sorted(known) and {"ce", "codir", "kd", "l2", "attention", "cosine"} <= set(known)


def test_the_old_alias_modules_are_gone():
    import importlib

    for old in ("losses", "plugins"):
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(f"distillkit.{old}")


TWO_LOSSES = """
import torch
from distillkit import LossTerm, TapRequest, hookimpl

class First(LossTerm):
    name = "first_loss"
    student_reads = TapRequest(logits=True)
    teacher_reads = TapRequest(logits=True)
    def forward(self, student, teacher):
        return (student.logits - teacher.logits).abs().mean()

class Second(First):
    name = "second_loss"

@hookimpl
def distillkit_register_losses(register):
    register(First)
    register(Second)
"""


def test_one_module_under_two_entry_points_registers_both_losses_quietly(tmp_path):
    # what a user did after reading "entry-point name = plugin name": one entry point per loss, one module
    names = ["first_loss", "second_loss"]
    write_distribution(tmp_path, "distillkit-two", "distillkit_two", TWO_LOSSES, names)
    with PathPlugins(tmp_path):
        assert failed_plugins() == []
        registry = loss_registry()
        assert registry["first_loss"].plugin.distribution == "distillkit-two"
        assert registry["second_loss"].cls.__name__ == "Second"
        assert {info.name for info in plugin_infos()} >= {"first_loss", "second_loss"}
        result = _losses_cli(str(tmp_path))
    assert "already registered" not in result.stdout + result.stderr
    assert "failed to load" not in result.stdout
    assert "first_loss  (distillkit-two 0.1, plugin 'first_loss')" in result.stdout
    assert "second_loss  (distillkit-two 0.1, plugin 'first_loss')" in result.stdout


def test_the_documented_way_one_entry_point_for_several_losses(tmp_path):
    write_distribution(tmp_path, "distillkit-two", "distillkit_two", TWO_LOSSES, "distillkit_two")
    with PathPlugins(tmp_path):
        assert failed_plugins() == []
        assert {"first_loss", "second_loss"} <= set(loss_registry())
        assert get_loss("second_loss").plugin.name == "distillkit_two"


def test_a_plugin_filter_name_matching_no_entry_point_is_warned_about(monkeypatch):
    monkeypatch.setenv("DISTILLKIT_PLUGINS", "kd,codr")
    with pytest.warns(UserWarning) as caught:
        registry = loss_registry()
    assert set(registry) == {"kd"}
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1
    assert messages[0].startswith(
        "DISTILLKIT_PLUGINS names 'codr' (did you mean 'codir'?), which no installed distribution declares "
        "as a 'distillkit' entry point, so it loads nothing; entry points: "
    )
    assert "codir" in messages[0]
