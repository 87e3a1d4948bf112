"""Per-example predictions: every task keeps them on request, and every metric recomputes from them."""

import json
import math

import numpy as np
import pytest
import torch

from distillkit.config import config_from_dict
from distillkit.errors import ConfigError
from distillkit.run.distill import distill
from distillkit.tasks import TASKS
from distillkit.tasks.evaluate_classification import classification_metrics
from distillkit.tasks.examples import macro_f1
from tests.distill_fixtures import bert, llama, text_config, tiny_config


def _stored(path):
    payload = json.loads(path.read_text(encoding="utf-8"))
    return {
        source: (entry["examples"], {k: np.asarray(v, dtype=float) for k, v in entry["columns"].items()})
        for source, entry in payload.items()
    }


def _check_recomputation(summary, task_name, stored):
    task = TASKS[task_name]
    reported = task.run_metrics(summary)
    # sample_nll scores sampled continuations, not the eval examples: its interval is across seeds only
    assert set(reported) - {"examples"} - set(task.example_metrics) <= {"sample_nll"}
    checked = 0
    for name, value in reported.items():
        if name not in task.example_metrics:
            continue
        metric = task.example_metrics[name]
        columns = stored[metric.source][1]
        if not all(key in columns for key in ("label", "pred")) and metric.source == "probe":
            continue
        assert metric.of(columns) == pytest.approx(value, rel=1e-5, abs=1e-6), name
        checked += 1
    return checked


def test_classification_keeps_each_examples_prediction(tmp_path):
    raw = tiny_config(tmp_path, steps=3)
    raw["evaluation"] = {"predictions": True}
    summary = distill(config_from_dict(raw))
    stored = _stored(tmp_path / "run" / "predictions.json")
    name, columns = stored["eval"]
    assert name == "eval" and summary["predictions"].endswith("predictions.json")
    assert len(columns["example_id"]) == summary["eval_examples"]
    assert sorted(columns["example_id"].tolist()) == list(range(summary["eval_examples"]))
    assert _check_recomputation(summary, "sequence_classification", stored) == 3


def test_no_predictions_file_unless_asked(tmp_path):
    summary = distill(config_from_dict(tiny_config(tmp_path, steps=2)))
    assert "predictions" not in summary and not (tmp_path / "run" / "predictions.json").exists()


@pytest.mark.parametrize(("task", "teacher"), [("causal_lm", llama(4, 32)), ("masked_lm", bert(4, 32))])
def test_token_tasks_keep_per_sequence_sums(tmp_path, task, teacher):
    raw = text_config(tmp_path, task, teacher, [{"loss": "kd"}], steps=2)
    raw["evaluation"] = {"predictions": True}
    summary = distill(config_from_dict(raw))
    stored = _stored(tmp_path / "run" / "predictions.json")
    columns = stored["eval"][1]
    assert columns["positions"].sum() == summary["student"]["eval"]["positions"]
    assert {"nll", "positions", "agree"} <= set(columns)
    assert _check_recomputation(summary, task, stored) >= 3


def test_representation_keeps_cosines_and_probe_predictions(tmp_path):
    raw = text_config(tmp_path, "representation", bert(4, 32), [{"loss": "l2"}], steps=2)
    raw["evaluation"] = {
        "predictions": True,
        "probe": {"path": raw["data"]["path"], "text_column": "sentence", "label_column": "sentiment"},
    }
    summary = distill(config_from_dict(raw))
    stored = _stored(tmp_path / "run" / "predictions.json")
    assert set(stored) == {"eval", "probe"} and stored["probe"][0] == "probe"
    assert len(stored["probe"][1]["pred"]) == summary["probe"]["eval_examples"]
    assert _check_recomputation(summary, "representation", stored) == 2
    assert "per_example" not in summary


def test_macro_f1_of_sums_matches_the_reported_f1():
    rng = np.random.default_rng(0)
    for classes in (2, 3, 5):
        label, pred = rng.integers(0, classes, 200), rng.integers(0, classes, 200)
        pred[:3] = classes - 1  # a class only predicted
        expected = classification_metrics(torch.tensor(pred), torch.tensor(label), classes)["f1"]
        assert macro_f1().of({"label": label, "pred": pred}) == pytest.approx(expected, abs=1e-12)
    assert math.isclose(macro_f1().of({"label": np.array([1]), "pred": np.array([1])}), 1.0)


def test_folds_partition_the_data_and_dev_is_never_trained_on(tmp_path):
    from distillkit.data import split_train_eval

    raw = tiny_config(tmp_path)
    seen = []
    for fold in range(3):
        cfg = config_from_dict({**raw, "data": {**raw["data"], "folds": 3, "fold": fold}}).data
        train, held = split_train_eval(cfg)
        assert not set(train["sentence"]) & set(held["sentence"])
        assert len(train) + len(held) == 48
        seen += held["sentence"]
    assert len(seen) == 48
    dev_cfg = config_from_dict(
        {**raw, "data": {**raw["data"], "dev_fraction": 0.25, "evaluate_on": "dev"}}
    ).data
    train_dev, dev = split_train_eval(dev_cfg)
    eval_cfg = config_from_dict({**raw, "data": {**raw["data"], "dev_fraction": 0.25}}).data
    train_eval, held = split_train_eval(eval_cfg)
    assert train_dev["sentence"] == train_eval["sentence"]  # the same training data either way
    assert not set(dev["sentence"]) & set(train_dev["sentence"]) and len(dev) == 11
    assert len(held) == 5 and not set(held["sentence"]) & set(dev["sentence"])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"folds": 3, "fold": 3}, "data.fold 3 does not exist"),
        ({"fold": 1}, "data.fold needs data.folds"),
        ({"evaluate_on": "dev"}, "needs data.dev_fraction"),
    ],
)
def test_split_settings_that_cannot_work_are_refused(tmp_path, data, message):
    raw = tiny_config(tmp_path)
    with pytest.raises(ConfigError, match=message):
        config_from_dict({**raw, "data": {**raw["data"], **data}})


def test_folds_refuse_data_with_its_own_evaluation_split(tmp_path):
    from distillkit.data import split_train_eval

    raw = tiny_config(tmp_path)
    data = {**raw["data"], "folds": 2, "eval_path": raw["data"]["path"]}
    with pytest.raises(ConfigError, match="has its own evaluation split"):
        split_train_eval(config_from_dict({**raw, "data": data}).data)
