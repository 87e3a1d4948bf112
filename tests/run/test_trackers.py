"""``train.report_to``: real TensorBoard event files and a real MLflow file store, offline."""

import json
import warnings

import pytest
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from distillkit import cli
from distillkit.config import TrainConfig, config_from_dict
from distillkit.run import distill
from distillkit.run import trackers as run_trackers
from distillkit.run.runlog import read_jsonl
from distillkit.run.trackers import flat_hyperparameters
from tests.distill_fixtures import tiny_config


@pytest.fixture
def mlflow_env(monkeypatch):
    """No tracking URI of the machine's; whatever distillkit sets in the environment is undone afterwards."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")


def test_tensorboard_and_mlflow_receive_config_losses_lr_and_eval(tmp_path, mlflow_env):
    raw = tiny_config(tmp_path, steps=4, eval_every=2, report_to=["tensorboard", "mlflow"])
    distill(config_from_dict(raw))
    run_dir = tmp_path / "run"
    records = read_jsonl(run_dir / "metrics.jsonl")
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and [r["step"] for r in evals] == [2, 4]

    events = sorted((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file under the run's output directory"
    scalars = {}
    for path in events:
        accumulator = EventAccumulator(str(path))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars[tag] = [(e.step, e.value) for e in accumulator.Scalars(tag)]
    for key in ("kd", "l2", "ce", "total", "lr", "grad_norm"):
        assert scalars[f"train/{key}"] == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in train], key
    assert scalars["eval/accuracy"] == [(r["step"], pytest.approx(r["accuracy"], rel=1e-6)) for r in evals]

    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("distillkit")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "run"
    params = run.data.params
    assert params["train.lr"] == str(raw["train"]["lr"]) and params["objective.0.loss"] == "kd"
    assert params["train.report_to.1"] == "mlflow"
    for key in ("kd", "l2", "total", "lr"):
        history = client.get_metric_history(run.info.run_id, f"train/{key}")
        assert [(m.step, m.value) for m in history] == [(r["step"], pytest.approx(r[key])) for r in train]
    history = client.get_metric_history(run.info.run_id, "eval/f1")
    assert [(m.step, m.value) for m in history] == [(r["step"], pytest.approx(r["f1"])) for r in evals]
    assert run.info.status == "FINISHED"


def test_missing_tracker_exits_2_naming_the_package_before_weights_load(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(run_trackers._AVAILABLE, "wandb", lambda: False)

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded before the tracker check")

    monkeypatch.setattr("distillkit.run.run.load_teacher", no_weights)
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(tiny_config(tmp_path, report_to=["tensorboard", "wandb"])), encoding="utf-8")
    assert cli.main(["distill", str(path)]) == 2
    error = capsys.readouterr().err
    assert "wandb" in error and "pip install wandb" in error and "tensorboard" not in error.split("names")[1]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_former_tensorboard_switch_is_read_as_report_to_with_a_notice():
    with pytest.warns(FutureWarning, match="train.tensorboard is now train.report_to"):
        assert TrainConfig(tensorboard=True).report_to == ["tensorboard"]
    with pytest.warns(FutureWarning, match=r"report_to: \[\]"):
        assert TrainConfig(tensorboard=False, report_to=["mlflow"]).report_to == ["mlflow"]
    with pytest.warns(FutureWarning):
        dumped = TrainConfig(tensorboard=True).model_dump()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = TrainConfig.model_validate(dumped)  # read once: no second notice
    assert again.report_to == ["tensorboard"] and again.tensorboard is None
    assert TrainConfig(report_to="mlflow").report_to == ["mlflow"]


def test_report_to_refuses_an_unknown_tracker(tmp_path):
    with pytest.raises(Exception, match="tensorboard"):
        config_from_dict(tiny_config(tmp_path, report_to=["tensorbord"]))


def test_hyperparameters_are_flat_scalars():
    config = {"train": {"lr": 1e-3, "report_to": ["mlflow"]}, "objective": [{"loss": "kd"}]}
    flat = flat_hyperparameters(config)
    assert flat == {"train.lr": 1e-3, "train.report_to.0": "mlflow", "objective.0.loss": "kd"}
