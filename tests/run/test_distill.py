"""Tiny end-to-end runs: tiny BERTs from configs, a few dozen examples in a temp CSV."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from distillkit import cli
from distillkit.config import config_from_dict
from distillkit.errors import ConfigError
from distillkit.objective.objective import DistillationObjective
from distillkit.objective.terms import ModelDims
from distillkit.run import NonFiniteLossError, Run, distill, fit
from distillkit.run.runlog import read_jsonl
from tests.distill_fixtures import tiny_config


@torch.no_grad()
def same_weights(a, b) -> bool:
    """Whether two models hold identical parameters and buffers."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


CODIR = {"loss": "codir", "weight": 0.1, "dim": 8, "bank": {"kind": "queue", "size": 16}}


def test_loss_goes_down_and_student_reloads(tmp_path):
    raw = tiny_config(tmp_path, steps=30, eval_every=15, lr=1e-2)
    raw["teacher"]["config"].update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    raw["objective"] = [{"loss": "ce"}, {"loss": "l2"}]
    summary = distill(config_from_dict(raw))
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    train = [r for r in records if r["split"] == "train"]
    assert {"l2", "ce", "total", "lr", "grad_norm"} <= set(train[0])
    first = sum(r["total"] for r in train[:5]) / 5
    last = sum(r["total"] for r in train[-5:]) / 5
    assert last < 0.9 * first, (first, last)
    assert [r["step"] for r in records if r["split"] == "eval"] == [15, 30]
    assert summary["student"]["parameters"] < summary["teacher"]["parameters"]
    assert summary["inference"]["speedup"] > 0

    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "student")
    assert reloaded.config.num_hidden_layers == 2
    assert reloaded.config.id2label == {0: "neg", 1: "pos"}
    final = load_file(str(sorted((tmp_path / "run" / "checkpoints").iterdir())[-1] / "student.safetensors"))
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in final.items())


def test_resume_gives_the_same_weights(tmp_path):
    raw = tiny_config(tmp_path, steps=6, save_every=2, grad_accum=2, batch_size=4, eval_every=3)
    raw["objective"].append(CODIR)
    whole = copy.deepcopy(raw)
    whole["output_dir"] = str(tmp_path / "whole")
    distill(config_from_dict(whole))

    parted = copy.deepcopy(raw)
    parted["output_dir"] = str(tmp_path / "parted")
    stopped = distill(config_from_dict(parted), stop_after_step=3)
    assert stopped["stopped_early"]
    assert not (tmp_path / "parted" / "student").exists()
    distill(config_from_dict(parted), resume=True)

    ckpt = {name: sorted((tmp_path / name / "checkpoints").iterdir())[-1] for name in ("whole", "parted")}
    assert ckpt["whole"].name == ckpt["parted"].name == "step-00000006"
    for part in ("student", "objective", "optimizer"):
        a = load_file(str(ckpt["whole"] / f"{part}.safetensors"))
        b = load_file(str(ckpt["parted"] / f"{part}.safetensors"))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), part
    assert len(list((tmp_path / "parted" / "checkpoints").iterdir())) == 2  # keep_last
    logs = [read_jsonl(tmp_path / name / "metrics.jsonl") for name in ("whole", "parted")]
    assert [r["step"] for r in logs[0]] == [r["step"] for r in logs[1]]
    train = [[r for r in log if r["split"] == "train"] for log in logs]
    again = distill(config_from_dict(parted), resume=True)  # resuming a finished run only reports
    assert again["steps"] == 6 and again["student"]["eval"]["examples"] == 5
    assert [r["total"] for r in train[0]] == pytest.approx([r["total"] for r in train[1]], rel=1e-6)


def test_teacher_is_frozen(tmp_path):
    cfg = config_from_dict(tiny_config(tmp_path, steps=3))
    run = Run.from_config(cfg)
    teacher = run.teacher
    teacher.train().requires_grad_(True)  # the loop must freeze it whatever state it comes in
    before = copy.deepcopy(teacher)
    student_before = copy.deepcopy(run.student)
    fit(run.derived(output_dir=tmp_path / "frozen"))
    assert not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert same_weights(teacher, before)
    assert not same_weights(run.student, student_before)


def test_teacher_does_not_run_when_no_term_uses_it(tmp_path):
    raw = tiny_config(tmp_path, steps=2)
    raw["objective"] = [{"loss": "ce", "weight": 1.0}]
    run = Run.from_config(config_from_dict(raw))
    calls = []
    run.teacher.register_forward_hook(lambda *args: calls.append(1))
    assert not run.objective.uses_teacher
    train = run.train.model_copy(update={"eval_every": None})
    fit(run.derived(train=train, output_dir=tmp_path / "labels-only"))
    assert calls == []
    dims = ModelDims.from_models(run.student, run.teacher)
    assert DistillationObjective.from_config([{"loss": "kd"}, {"loss": "ce"}], dims).uses_teacher


def _nan_on_third_call(monkeypatch):
    from distillkit_plugins.kd import KDLoss

    original = KDLoss.forward
    calls = {"n": 0}

    def forward(self, student, teacher):
        calls["n"] += 1
        value = original(self, student, teacher)
        return value * float("nan") if calls["n"] == 3 else value

    monkeypatch.setattr(KDLoss, "forward", forward)


def test_nonfinite_stop(tmp_path, monkeypatch):
    _nan_on_third_call(monkeypatch)
    cfg = config_from_dict(tiny_config(tmp_path, steps=5, save_every=1))
    with pytest.raises(NonFiniteLossError, match=r"loss term 'kd' is nan at step 3 \(student logits"):
        distill(cfg)
    steps = [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()]
    assert sorted(steps) == ["step-00000001", "step-00000002"]  # nothing written for the poisoned step
    assert "nonfinite" in read_jsonl(tmp_path / "run" / "metrics.jsonl")[-1]


def test_nonfinite_skip(tmp_path, monkeypatch):
    _nan_on_third_call(monkeypatch)
    cfg = config_from_dict(tiny_config(tmp_path, steps=5, on_nonfinite="skip"))
    summary = distill(cfg)
    assert summary["skipped_steps"] == 1 and summary["steps"] == 5
    final = load_file(str(sorted((tmp_path / "run" / "checkpoints").iterdir())[-1] / "student.safetensors"))
    assert all(torch.isfinite(v).all() for v in final.values())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r["train"].update(stpes=3), "unknown field 'train.stpes'"),
        (lambda r: r["data"].update(label_column="label"), "data.label_column 'label'"),
        (
            lambda r: r["objective"].append({"loss": "kd", "temprature": 2}),
            "does not accept parameter 'temprature'",
        ),
        (lambda r: r["student"].update(layers=9), "student.layers must be between 1"),
        (lambda r: r["train"].update(batch_size=64), "fewer than one batch"),
        (
            lambda r: r["objective"].append({"loss": "codir", "bank": {"kind": "index", "size": 10}}),
            "index bank of 10 slots but the training data has 43 examples; set its bank.size to 43",
        ),
    ],
)
def test_errors_before_training(tmp_path, change, message):
    raw = tiny_config(tmp_path)
    change(raw)
    with pytest.raises(ConfigError, match=message):
        distill(config_from_dict(raw))
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_cli_reports_errors(tmp_path, capsys):
    raw = tiny_config(tmp_path)
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(raw), encoding="utf-8")  # JSON is YAML
    assert cli.main(["distill", str(path), "--set", "data.text_column=txt"]) == 2
    assert "data.text_column 'txt'" in capsys.readouterr().err
    overrides = [
        "--set",
        "train.steps=2",
        "--set",
        "train.report_to=[]",
        "--set",
        "train.precision=bf16",
    ]
    assert cli.main(["distill", str(path), *overrides]) == 0  # bf16 autocast (CPU autocast here)
    assert (tmp_path / "run" / "summary.json").exists()
