import pytest
import torch

from distillkit.run.runlog import RunLog, read_jsonl
from distillkit.tasks.evaluate_classification import classification_metrics


def test_accuracy_and_macro_f1():
    predictions = torch.tensor([0, 0, 1, 1, 2, 0])
    labels = torch.tensor([0, 1, 1, 1, 2, 2])
    metrics = classification_metrics(predictions, labels, num_labels=3)
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    # per class F1: 0 -> 2/(2+2+0), 1 -> 4/(4+0+1), 2 -> 2/(2+0+1)
    assert metrics["f1"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    assert classification_metrics(labels, labels, 3) == {"accuracy": 1.0, "f1": 1.0}


def test_runlog_resume_drops_later_records(tmp_path):
    log = RunLog(tmp_path)
    for step in (1, 2, 3, 4):
        log.log("train", step, {"total": float(step)})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as handle:
        handle.write('{"split": "train", "st')  # a torn line from a crash
    RunLog(tmp_path, resume_step=2).log("train", 3, {"total": 30.0})
    assert [(r["step"], r["total"]) for r in read_jsonl(tmp_path / "metrics.jsonl")] == [
        (1, 1.0),
        (2, 2.0),
        (3, 30.0),
    ]
    silent = RunLog(tmp_path / "other", enabled=False)
    silent.log("train", 1, {"total": 1.0})
    assert not (tmp_path / "other").exists()
