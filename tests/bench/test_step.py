"""``distillkit bench --step``: every phase of a real config's training step is timed."""

import pytest
import yaml

from distillkit import cli
from distillkit.bench.step import PHASES, time_training_step
from distillkit.config import config_from_dict
from tests.distill_fixtures import causal_lm_config, llama, text_config, tiny_config

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
    assert "| teacher |" in out and "objective (without the InfoNCE op) + bookkeeping" in out
    assert "| sampling |" not in out  # the run samples nothing


def test_the_two_logit_paths_compare_in_fresh_processes(tmp_path, capsys):
    """A causal-LM step with materialised logits and with the output layers: the same first losses."""
    raw = text_config(tmp_path, "causal_lm", llama(2, 32), [{"loss": "kd", "ce_weight": 0.5}], batch_size=4)
    config = tmp_path / "lm.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert cli.main(["bench", "--step", str(config), "--repeat", "1", "--compare-logits"]) == 0
    out = capsys.readouterr().out
    rows = [
        line for line in out.splitlines() if line.startswith("| materialised") or line.startswith("| output")
    ]
    assert len(rows) == 2
    losses = [float(row.split("|")[4].split()[1]) for row in rows]  # "kd 3.712345"
    assert losses[0] == pytest.approx(losses[1], rel=1e-5) and losses[0] > 0.1
    assert "less peak memory per step" in out


def test_the_sampling_phase_is_timed_and_its_tokens_counted(tmp_path, capsys):
    raw = causal_lm_config(tmp_path, {"student_fraction": 1.0, "prompt_tokens": 4}, batch_size=4)
    result = time_training_step(config_from_dict(raw), repeats=2, warmup=1)
    assert (
        list(PHASES[:2]) == ["sampling", "teacher"] and PHASES[PHASES.index("objective") + 1] == "infonce op"
    )
    assert result["phases"]["sampling"] > 0
    sampling = result["sampling"]
    assert sampling["sampled_batches"] == sampling["micro_batches"] == 2
    assert 2 * 4 <= sampling["generated_tokens"] <= 2 * 4 * 12
    config = tmp_path / "lm.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert cli.main(["bench", "--step", str(config), "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "| sampling |" in out and "sampled tokens/s" in out
