"""A student with its own tokenizer: each model reads its own tokens; what cannot work is refused."""

import json

import pytest
import yaml

from distillkit import cli
from distillkit.config import ModelConfig, config_from_dict
from distillkit.errors import ConfigError
from distillkit.models import load_tokenizer
from distillkit.run.cache_teacher import cache_teacher
from distillkit.run.distill import distill
from distillkit.run.run import Run
from distillkit.run.train_tokenizer import train_tokenizer
from distillkit.tokenizers import compare_tokenizers
from tests.cross_tokenizer_fixtures import cross_config, save_teacher_and_twin, write_permuted_vocab
from tests.distill_fixtures import text_config, tiny_config, write_vocab


def _first_step(output_dir):
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in records if r.get("split") == "train" and r["step"] == 1)


def _twin_config(tmp_path, permute):
    vocab = write_vocab(tmp_path)
    permuted, perm = write_permuted_vocab(tmp_path)
    teacher_dir, student_dir = save_teacher_and_twin(tmp_path, perm, permute=permute)
    raw = text_config(tmp_path, "causal_lm", {}, [{"loss": "gold"}, {"loss": "uld"}], steps=1, lr=1e-9)
    raw["teacher"] = {"path": str(teacher_dir), "tokenizer": str(vocab)}
    raw["student"] = {"path": str(student_dir), "tokenizer": str(permuted)}
    return raw


def test_one_function_behind_a_permuted_vocabulary_gives_zero_gold_and_uld_at_step_one(tmp_path):
    raw = _twin_config(tmp_path, permute=True)
    summary = distill(config_from_dict(raw))
    first = _first_step(tmp_path / "run")
    assert abs(first["gold"]) < 1e-6 and abs(first["uld"]) < 1e-6
    student, teacher = summary["student"]["eval"], summary["teacher"]["eval"]
    assert student["bytes"] == teacher["bytes"] > 0
    assert student["bits_per_byte"] == pytest.approx(teacher["bits_per_byte"], rel=1e-4)
    saved = load_tokenizer(ModelConfig(tokenizer=str(tmp_path / "run" / "student")))
    assert compare_tokenizers(saved, load_tokenizer(config_from_dict(raw).student, "student")) == []


def test_the_same_weights_fed_other_ids_give_a_clearly_positive_gold(tmp_path):
    raw = _twin_config(tmp_path, permute=False)
    distill(config_from_dict(raw))
    assert _first_step(tmp_path / "run")["gold"] > 0.05


def _refused_before_weights(monkeypatch, raw, tmp_path, capsys) -> str:
    import distillkit.run.run as run_module
    import distillkit.run.teachers as teachers_module

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(run_module, "load_model", no_weights)
    monkeypatch.setattr(teachers_module, "load_model", no_weights)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert cli.main(["distill", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_kd_across_tokenizers_is_refused_before_any_weights_load(tmp_path, monkeypatch, capsys):
    raw = cross_config(tmp_path, [{"loss": "kd"}, {"loss": "l2"}, {"loss": "ce"}])
    err = _refused_before_weights(monkeypatch, raw, tmp_path, capsys)
    assert "objective term 'kd'" in err and "objective term 'l2'" in err and "term 'ce'" not in err
    assert "teacher tokenizer" in err and "student tokenizer" in err and "student-tokenizer" in err
    assert "gold" in err and "uld" in err and "codir" in err  # the losses that do work


def test_bad_student_tokenizers_are_refused_with_the_fix(tmp_path, monkeypatch, capsys):
    raw = cross_config(tmp_path, [{"loss": "gold"}])
    raw["student"]["tokenizer"] = str(tmp_path / "no" / "such" / "tokenizer")
    err = _refused_before_weights(monkeypatch, raw, tmp_path, capsys)
    assert "does not exist" in err and "distillkit train-tokenizer" in err

    raw = cross_config(tmp_path, [{"loss": "codir", "pooling": "cls", "bank": {"kind": "in_batch"}}])
    assert "use pooling: mean" in _refused_before_weights(monkeypatch, raw, tmp_path, capsys)

    raw = tiny_config(tmp_path)  # a classifier: trains on the teacher's tokens only
    raw["student"]["tokenizer"] = cross_config(tmp_path, [])["student"]["tokenizer"]
    assert "task 'sequence_classification'" in _refused_before_weights(monkeypatch, raw, tmp_path, capsys)


def test_a_tokenizer_without_offsets_is_refused(tmp_path, monkeypatch):
    import distillkit.run.tokenizers as module

    raw = cross_config(tmp_path, [{"loss": "gold"}])
    real = module.load_student_tokenizer

    def slow(spec, teacher):
        tokenizer = real(spec, teacher)
        tokenizer.__class__ = type("Slow", (type(tokenizer),), {"is_fast": property(lambda self: False)})
        return tokenizer

    monkeypatch.setattr(module, "load_student_tokenizer", slow)
    with pytest.raises(ConfigError, match="slow tokenizer without character offsets"):
        Run.prepare(config_from_dict(raw))


def test_a_teacher_cache_serves_the_student_tokenizer_it_was_written_for(tmp_path):
    raw = cross_config(tmp_path, [{"loss": "gold"}], steps=1, lr=1e-9)
    raw["teacher"]["cache"] = str(tmp_path / "cache")
    cache_teacher(config_from_dict(raw))
    distill(config_from_dict({**raw, "output_dir": str(tmp_path / "cached")}))
    live = {**raw, "teacher": {k: v for k, v in raw["teacher"].items() if k != "cache"}}
    distill(config_from_dict({**live, "output_dir": str(tmp_path / "live")}))
    assert _first_step(tmp_path / "cached")["gold"] == pytest.approx(_first_step(tmp_path / "live")["gold"])

    other = tmp_path / "other-tokenizer"
    train_tokenizer(config_from_dict(raw), 280, other)
    raw["student"]["tokenizer"] = str(other)
    with pytest.raises(ConfigError, match="student_tokenizer"):
        Run.prepare(config_from_dict(raw))  # before any weights load


def test_train_tokenizer_is_deterministic_and_keeps_the_teachers_special_tokens(tmp_path, capsys):
    raw = tiny_config(tmp_path)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    for name in ("a", "b"):
        assert (
            cli.main(["train-tokenizer", str(path), "--vocab-size", "290", "--output", str(tmp_path / name)])
            == 0
        )
    assert "byte-level BPE tokenizer of 290 tokens" in capsys.readouterr().out
    a, b = (load_tokenizer(ModelConfig(tokenizer=str(tmp_path / name))) for name in "ab")
    assert a.get_vocab() == b.get_vocab() and len(a) == 290
    teacher = load_tokenizer(config_from_dict(raw).teacher)
    assert (a.sep_token, a.pad_token, a.unk_token) == (
        teacher.sep_token,
        teacher.pad_token,
        teacher.unk_token,
    )
    assert (
        cli.main(["train-tokenizer", str(path), "--vocab-size", "10", "--output", str(tmp_path / "c")]) == 2
    )
