"""CoDIR as released reads warm banks: a pass over the training data fills them before the first step."""

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from distillkit.config import config_from_dict
from distillkit.errors import ConfigError
from distillkit.run.distill import distill
from distillkit.run.loop import TrainingLoop
from distillkit.run.run import Run
from distillkit_plugins.codir_crd import gathered_scores
from tests.distill_fixtures import tiny_config

RELEASED = {
    "loss": "codir",
    "weight": 0.1,
    "dim": 8,
    "objective": "crd_nce",
    "pooling": "cls",
    "layer_map": "last",
    "negatives": "other_labels",
    "bank": {"kind": "index", "negatives": 5},
}


def _raw(tmp_path, **train):
    raw = tiny_config(tmp_path, steps=2, batch_size=8, eval_every=None, **train)
    raw["objective"] = [{"loss": "kd", "temperature": 2.0, "ce_weight": 1.0, "weight": 0.5}, RELEASED]
    return raw


def _cls_vectors(model, head, rows, collator, layer):
    batch = collator(rows)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
    was_training = model.training
    model.eval()  # as the warm-up pass runs it: no dropout
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states[layer][:, 0]
    model.train(was_training)
    return F.normalize(head(hidden), dim=-1), batch["labels"]


def test_the_warm_up_pass_fills_every_slot_and_sets_z_against_the_starting_banks(tmp_path, capsys):
    run = Run.from_config(config_from_dict(_raw(tmp_path)))
    loop = TrainingLoop(run)
    term = run.objective.terms["codir"]
    crd = term.crd
    n = len(run.data.train)
    assert crd.size == n and not bool(crd.z_estimated)
    starting = crd.student_bank.keys.clone(), crd.teacher_bank.keys.clone()
    assert not torch.equal(*starting)  # the two banks start from independent draws
    first = torch.arange(8)
    fixed = torch.stack([(first + j) % n for j in range(6)], 1)  # own slot, then 5 fixed slots
    crd.sample = lambda ids, labels, count: fixed
    was_training = run.student.training
    loop.start()
    assert run.student.training == was_training
    assert "warm-up pass over the" in capsys.readouterr().out
    rows = [run.data.train[i] for i in range(n)]
    student, labels = _cls_vectors(run.student, term.student_heads[0], rows, run.collator, 2)
    teacher, _ = _cls_vectors(run.teacher, term.teacher_heads[0], rows, run.collator, 4)
    ids = torch.tensor([row["example_ids"] for row in rows])
    torch.testing.assert_close(crd.student_bank.keys[0, ids], student, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(crd.teacher_bank.keys[0, ids], teacher, rtol=1e-5, atol=1e-6)
    assert torch.equal(crd.student_bank.labels[ids], labels) and torch.equal(
        crd.teacher_bank.labels[ids], labels
    )
    # Z: N · mean exp(score / τ) over the first batch's scores against the banks as they started
    s_scores = gathered_scores(student[:8].unsqueeze(0), starting[1], fixed)
    t_scores = gathered_scores(teacher[:8].unsqueeze(0), starting[0], fixed)
    expected_s = torch.log(torch.exp(s_scores.double() / 0.07).mean() * n)
    expected_t = torch.log(torch.exp(t_scores.double() / 0.07).mean() * n)
    torch.testing.assert_close(crd.student_log_z.double()[0], expected_s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(crd.teacher_log_z.double()[0], expected_t, rtol=1e-5, atol=1e-5)


def test_negatives_are_visited_slots_of_other_labels_each_once(tmp_path):
    run = Run.from_config(config_from_dict(_raw(tmp_path)))
    TrainingLoop(run).start()
    crd = run.objective.terms["codir"].crd
    ids = torch.arange(8)
    labels = crd.teacher_bank.labels[ids]
    index = crd.sample(ids, labels, 5)
    negatives = index[:, 1:]
    assert torch.equal(index[:, 0], ids)
    assert (crd.teacher_bank.labels[negatives] >= 0).all()  # visited
    assert (crd.teacher_bank.labels[negatives] != labels.unsqueeze(1)).all()  # of another label
    assert all(len(set(row.tolist())) == 5 for row in negatives)  # without replacement


def test_a_resumed_run_keeps_its_banks_and_equals_an_uninterrupted_one(tmp_path):
    raw = _raw(tmp_path, save_every=1)
    raw["train"]["steps"] = 3
    whole, parted = copy.deepcopy(raw), copy.deepcopy(raw)
    whole["output_dir"], parted["output_dir"] = str(tmp_path / "whole"), str(tmp_path / "parted")
    distill(config_from_dict(whole))
    distill(config_from_dict(parted), stop_after_step=2)
    distill(config_from_dict(parted), resume=True)
    for part in ("student", "objective"):
        a = load_file(str(tmp_path / "whole" / "checkpoints" / "step-00000003" / f"{part}.safetensors"))
        b = load_file(str(tmp_path / "parted" / "checkpoints" / "step-00000003" / f"{part}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


def test_warm_start_is_the_default_of_the_released_form_only():
    from distillkit.registry import get_loss

    parse = get_loss("codir").cls.parse_params
    assert parse({"objective": "crd_nce", "bank": {"kind": "index"}}).warms_bank
    assert not parse({"objective": "crd_nce", "bank": {"kind": "index", "warm_start": False}}).warms_bank
    assert not parse({"bank": {"kind": "index"}}).warms_bank
    assert parse({"bank": {"kind": "index", "warm_start": True}}).warms_bank
    with pytest.raises(ConfigError, match="bank.warm_start fills one slot per training example"):
        parse({"bank": {"kind": "queue", "warm_start": True}})
