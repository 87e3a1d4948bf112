"""``distillkit bench --step``: every phase of a real config's training step is timed."""

import yaml

from distillkit import cli
from distillkit.config import config_from_dict
from distillkit.stepbench import PHASES, time_training_step
from tests.distill_fixtures import tiny_config

CODIR = {"loss": "codir", "weight": 0.1, "dim": 8, "bank": {"kind": "queue", "size": 16}}


def test_phases_are_timed_and_the_infonce_op_is_found(tmp_path):
    raw = tiny_config(tmp_path)
    raw["objective"].append(CODIR)
    result = time_training_step(config_from_dict(raw), repeats=2, warmup=1)
    assert set(result["phases"]) == set(PHASES)
    assert all(seconds >= 0 for seconds in result["phases"].values())
    assert result["phases"]["infonce op"] > 0  # codir's InfoNCE went through the fused op
    assert sum(result["phases"].values()) <= result["step"] * 1.05


def test_cli_prints_the_table(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tmp_path)))
    assert cli.main(["bench", "--step", str(config), "--repeat", "2"]) == 0
    out = capsys.readouterr().out
    assert "| teacher forward |" in out and "objective (without the InfoNCE op) + bookkeeping" in out
