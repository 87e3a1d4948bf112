"""A study's design: variants with their own baselines, cross-evaluation folds, Holm, regenerated reports."""

import json
import shutil

import pytest
import yaml

from distillkit.errors import ConfigError
from distillkit.study import holm, load_study, regenerate, run_study
from tests.study.test_study import _write_study

VARIANTS = {
    "none": [{"loss": "ce"}],
    "kd": [{"loss": "kd", "temperature": 2.0}],
    "kd+l2": [{"loss": "kd", "temperature": 2.0}, {"loss": "l2"}],
}


def test_folds_score_each_seed_on_its_own_part_and_variants_meet_their_own_baseline(tmp_path, capsys):
    path = _write_study(
        tmp_path, variants=VARIANTS, baseline="none", baselines={"kd+l2": "kd"}, folds=2, seeds=[0, 1, 2, 3]
    )
    study, runs = load_study(path)
    assert [runs[f"kd/seed-{s}"].data.fold for s in range(4)] == [0, 1, 0, 1]
    assert all(c.data.folds == 2 and c.evaluation.predictions for c in runs.values())
    rows = run_study(path, jobs=1)
    out = tmp_path / "study"
    printed = capsys.readouterr().out
    assert "fold 0 done; its teacher cache" in printed and "fold 1 done" in printed
    assert not list(out.glob("teacher-cache*"))  # one fold's cache at a time, removed after the fold
    assert len(list((tmp_path / "cache").iterdir())) == 2  # a teacher fine-tuned on each fold's training part
    names = {
        s: json.loads((out / "kd" / f"seed-{s}" / "predictions.json").read_text())["eval"]["examples"]
        for s in range(4)
    }
    assert names == {s: f"eval/fold-{s % 2}-of-2" for s in range(4)}
    ids = {
        s: json.loads((out / "none" / f"seed-{s}" / "predictions.json").read_text())["eval"]["columns"]
        for s in (0, 1)
    }
    ids = {s: columns["example_id"] for s, columns in ids.items()}
    assert len(ids[0]) + len(ids[1]) == 48  # the two folds together score the whole data set
    by_name = {row["variant"]: row for row in rows}
    assert by_name["kd"]["baseline"] == "none" and by_name["kd+l2"]["baseline"] == "kd"
    assert "baseline" not in by_name["none"]
    for metric in ("accuracy",):
        raw = [by_name[v]["bootstrap"][metric].p_value for v in ("kd", "kd+l2")]
        assert [by_name[v]["holm"][metric] for v in ("kd", "kd+l2")] == pytest.approx(holm(raw))
        raw_t = [by_name[v]["delta"][metric].p_value for v in ("kd", "kd+l2")]
        assert [by_name[v]["holm_t"][metric] for v in ("kd", "kd+l2")] == pytest.approx(holm(raw_t))
    assert by_name["kd+l2"]["bootstrap"]["accuracy"].examples == 24
    assert "| kd+l2 | kd | 4 |" in (out / "results.md").read_text(encoding="utf-8")


def test_a_committed_report_is_regenerated_from_its_files_alone(tmp_path):
    path = _write_study(tmp_path, variants=VARIANTS, baseline="kd", seeds=[0, 1, 2])
    run_study(path, jobs=1)
    committed = tmp_path / "docs"
    committed.mkdir()
    for name in ("results.csv", "results.json", "results-examples.csv.gz"):
        shutil.copy(tmp_path / "study" / name, committed / name.replace("results", "mine"))
    lines = regenerate(committed / "mine")
    original = (tmp_path / "study" / "results.md").read_text(encoding="utf-8")
    assert (committed / "mine.md").read_text(encoding="utf-8") == original == "\n".join(lines) + "\n"
    assert (committed / "mine.png").read_bytes()[:4] == b"\x89PNG"
    # without the examples file: the seeds-only statistics, said so
    (committed / "mine-examples.csv.gz").unlink()
    text = "\n".join(regenerate(committed / "mine"))
    assert "needs per-example predictions" in text and "from the seeds alone" in text
    assert "(seeds only)" in text


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"baselines": {"kd+l2": "kd+cosine"}}, "'kd\\+cosine' is not a variant"),
        ({"baselines": {"kd": "kd"}}, "cannot have a baseline of its own"),
        ({"baseline": "none", "baselines": {"none": "kd"}}, "cannot have a baseline of its own"),
        ({"folds": 1}, "folds"),
    ],
)
def test_study_design_errors(tmp_path, extra, message):
    path = _write_study(tmp_path, variants=VARIANTS, **extra)
    with pytest.raises(ConfigError, match=message):
        load_study(path)


def test_narrowing_a_study_keeps_a_variants_own_baseline(tmp_path):
    path = _write_study(tmp_path, variants=VARIANTS, baseline="none", baselines={"kd+l2": "kd"})
    study, _ = load_study(path, variants=["none", "kd+l2"])
    assert study.baseline_of("kd+l2") == "kd"  # not silently compared with another baseline
    assert yaml.safe_load(path.read_text())["baselines"] == {"kd+l2": "kd"}


def test_the_committed_reports_are_what_their_files_regenerate(tmp_path):
    """docs/study/*.md are exactly what `python docs/study/regenerate.py` writes from the committed files."""
    from pathlib import Path

    committed = Path(__file__).resolve().parents[2] / "docs" / "study"
    for prefix in ("results", "embed-results", "cross-tokenizer-results"):
        for path in committed.glob(f"{prefix}*"):
            if path.suffix in (".csv", ".json", ".gz"):
                shutil.copy(path, tmp_path / path.name)
        lines = regenerate(tmp_path / prefix)
        assert "\n".join(lines) + "\n" == (committed / f"{prefix}.md").read_text(encoding="utf-8"), prefix


def test_a_zero_weight_attention_term_changes_the_code_path_and_not_the_gradient():
    """kd+eager: the attention term at weight 0 adds exactly nothing to kd's gradient on the eager model."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from distillkit import DistillationObjective, ModelDims
    from distillkit.objective.model_access import disable_attention_dropout, use_eager_attention
    from distillkit.objective.taps import TapRequest, collect_taps
    from tests.distill_fixtures import bert

    torch.manual_seed(0)
    student = AutoModelForSequenceClassification.from_config(AutoConfig.for_model(**bert(2, 16)))
    teacher = AutoModelForSequenceClassification.from_config(AutoConfig.for_model(**bert(4, 16))).eval()
    for model in (student, teacher):
        use_eager_attention(model)
        disable_attention_dropout(model)
    dims = ModelDims.from_models(student, teacher)
    batch = {
        "input_ids": torch.randint(5, 40, (3, 7)),
        "attention_mask": torch.ones(3, 7, dtype=torch.long),
        "labels": torch.tensor([0, 1, 0]),
    }
    kd = {"loss": "kd", "weight": 0.5, "temperature": 2.0, "ce_weight": 1.0}
    grads = []
    for objective in ([kd], [kd, {"loss": "attention", "weight": 0.0}]):
        objective = DistillationObjective.from_config(objective, dims)
        student.eval()  # no dropout: the two passes see the same network
        student.zero_grad()
        request_s, request_t = objective.tap_requests()
        taps = collect_taps(student, batch, request_s | TapRequest(attentions=True))
        with torch.no_grad():
            teacher_taps = collect_taps(teacher, batch, request_t | TapRequest(attentions=True))
        objective(taps, teacher_taps, batch).total.backward()
        grads.append([p.grad.clone() for p in student.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) and all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
