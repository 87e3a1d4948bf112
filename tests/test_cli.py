"""The command line: version, help, machine-readable listings, errors as exit code 2."""

import json

import pytest

from distillkit import __version__, cli


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"distillkit {__version__}"


def test_help_shows_defaults_and_no_markup(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    text = capsys.readouterr().out
    assert "(default: 5)" in text and "(default: 32)" in text
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "``" not in capsys.readouterr().out


def test_losses_json_has_json_values_and_descriptions(capsys):
    assert cli.main(["losses", "--json"]) == 0
    losses = {entry["name"]: entry for entry in json.loads(capsys.readouterr().out)["losses"]}
    kd = {p["name"]: p for p in losses["kd"]["parameters"]}
    assert kd["temperature"]["default"] == 2.0 and kd["temperature"]["required"] is False
    codir = {p["name"]: p for p in losses["codir"]["parameters"]}
    assert codir["bank"]["default"]["kind"] == "queue"  # a mapping, not its Python repr
    assert all(entry["description"] for entry in losses.values())
    assert [n for n, e in sorted(losses.items()) if e["cross_tokenizer"]] == ["ce", "codir", "gold", "uld"]


def test_unknown_bench_loss_is_an_error(capsys):
    assert cli.main(["bench", "--losses", "kdd", "--repeat", "1"]) == 2
    assert "unknown loss 'kdd' (did you mean 'kd'" in capsys.readouterr().err


def test_bad_override_names_the_override(tmp_path, capsys):
    import yaml

    from tests.distill_fixtures import tiny_config

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tmp_path)))
    assert cli.main(["distill", str(config), "--set", "train.steps=abc"]) == 2
    err = capsys.readouterr().err
    assert "train.steps" in err and "--set override" in err and "Traceback" not in err
