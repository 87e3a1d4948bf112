import csv
import json

import pytest
import yaml

from distillkit.errors import ConfigError
from distillkit.study import load_study, run_study
from tests.distill_fixtures import tiny_config


def _write_study(tmp_path, variants=None):
    base = tiny_config(tmp_path, steps=3, tensorboard=False)
    base["teacher"]["finetune"] = {
        "steps": 3,
        "batch_size": 8,
        "lr": 1e-2,
        "cache_dir": str(tmp_path / "cache"),
    }
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base), encoding="utf-8")
    study = {
        "base": "base.yaml",
        "overrides": ["train.steps=2"],
        "variants": variants
        or {"none": [{"loss": "ce"}], "kd+l2": [{"loss": "kd", "temperature": 2.0}, {"loss": "l2"}]},
        "seeds": [0, 1],
        "output_dir": str(tmp_path / "study"),
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False), encoding="utf-8")
    return path


def test_study_writes_table_and_plot_and_skips_finished_runs(tmp_path, capsys):
    path = _write_study(tmp_path)
    rows = run_study(path)
    out = tmp_path / "study"
    assert [r["variant"] for r in rows] == ["none", "kd+l2"]
    assert all(r["runs"] == 2 for r in rows)
    assert "term.kd" in rows[1] and "term.kd" not in rows[0]
    table = (out / "results.md").read_text(encoding="utf-8")
    assert (
        table.count("±") == 2 + 2 * 2
    )  # header + two metrics per row and "| none |" in table and "| kd+l2 |" in table
    with open(out / "results.csv", encoding="utf-8") as handle:
        assert [r["variant"] for r in csv.DictReader(handle)] == ["none", "kd+l2"]
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((out / "none" / "seed-1" / "summary.json").read_text(encoding="utf-8"))
    assert summary["steps"] == 2
    # the teacher was fine-tuned once and shared
    assert len(list((tmp_path / "cache").iterdir())) == 1

    capsys.readouterr()
    stamp = (out / "none" / "seed-0" / "summary.json").stat().st_mtime_ns
    run_study(path)
    assert capsys.readouterr().out.count("finished earlier, skipped") == 4
    assert (out / "none" / "seed-0" / "summary.json").stat().st_mtime_ns == stamp


def test_study_validates_every_variant_first(tmp_path):
    path = _write_study(tmp_path, variants={"ok": [{"loss": "ce"}], "bad": [{"loss": "kd", "temp": 2}]})
    with pytest.raises(ConfigError, match="study variant 'bad'.*does not accept parameter 'temp'"):
        run_study(path)
    assert not (tmp_path / "study").exists()


def test_study_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_study(tmp_path / "nope.yaml")
    path = _write_study(tmp_path, variants={"a b": [{"loss": "ce"}]})
    with pytest.raises(ConfigError, match="variant name 'a b'"):
        load_study(path)
