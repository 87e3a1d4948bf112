import random

import numpy as np
import pytest
import torch

from distillkit.objective.objective import DistillationObjective
from distillkit.objective.terms import ModelDims
from distillkit.run.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    optimizer_from_flat,
    optimizer_to_flat,
    save_checkpoint,
)


def _objective():
    dims = ModelDims(student_layers=2, teacher_layers=4, student_hidden=16, teacher_hidden=32)
    spec = [{"loss": "l2"}, {"loss": "codir", "dim": 8, "bank": {"kind": "queue", "size": 12}}]
    return DistillationObjective.from_config(spec, dims)


def _setup(seed):
    torch.manual_seed(seed)
    student = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    objective = _objective()
    params = [*student.parameters(), *objective.parameters()]
    optimizer = torch.optim.AdamW(params, lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    return student, objective, optimizer, scheduler


def _train_a_bit(student, objective, optimizer, scheduler):
    for _ in range(3):
        loss = student(torch.randn(5, 4)).pow(2).sum() + sum(p.sum() for p in objective.parameters()) * 0
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    bank = objective.terms["codir"].bank
    bank.enqueue(torch.randn(bank.keys.shape[0], 5, 8), torch.arange(5))


def test_optimizer_state_roundtrip():
    student, objective, optimizer, scheduler = _setup(0)
    _train_a_bit(student, objective, optimizer, scheduler)
    tensors, meta = optimizer_to_flat(optimizer.state_dict())
    assert all(isinstance(v, torch.Tensor) for v in tensors.values())
    restored = optimizer_from_flat(tensors, meta)
    original = optimizer.state_dict()
    assert restored["param_groups"] == original["param_groups"]
    for param, values in original["state"].items():
        for key, value in values.items():
            assert torch.equal(restored["state"][param][key], value)


def test_save_load_restores_everything(tmp_path):
    student, objective, optimizer, scheduler = _setup(0)
    _train_a_bit(student, objective, optimizer, scheduler)
    random.seed(5)
    np.random.seed(5)
    path = save_checkpoint(
        tmp_path,
        3,
        student=student,
        objective=objective,
        optimizer=optimizer,
        scheduler=scheduler,
        extra={"a": 1},
    )
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.rand(10)  # move every generator on
    random.random()

    fresh = _setup(1)
    state = load_checkpoint(
        path, student=fresh[0], objective=fresh[1], optimizer=fresh[2], scheduler=fresh[3]
    )
    assert state["step"] == 3 and state["extra"] == {"a": 1}
    for a, b in [(student, fresh[0]), (objective, fresh[1])]:
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    bank = fresh[1].terms["codir"].bank
    assert int(bank.filled) == 5  # memory-bank buffers are part of the checkpoint
    assert fresh[3].state_dict()["last_epoch"] == scheduler.state_dict()["last_epoch"]
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1]
    assert np.random.rand() == expected[2]


def test_keep_last_and_atomic_layout(tmp_path):
    student, objective, optimizer, scheduler = _setup(0)
    for step in (1, 2, 3, 4):
        save_checkpoint(
            tmp_path,
            step,
            student=student,
            objective=objective,
            optimizer=optimizer,
            scheduler=scheduler,
            keep_last=2,
        )
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step-00000003", "step-00000004"]
    assert latest_checkpoint(tmp_path).name == "step-00000004"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    files = sorted(p.name for p in latest_checkpoint(tmp_path).iterdir())
    assert files == [
        "objective.safetensors",
        "optimizer.safetensors",
        "rng.safetensors",
        "state.json",
        "student.safetensors",
    ]
    # a half-written directory (no state.json) is never picked up
    (tmp_path / "step-00000009").mkdir()
    assert latest_checkpoint(tmp_path).name == "step-00000004"


def test_no_pickle_anywhere(tmp_path):
    student, objective, optimizer, scheduler = _setup(0)
    path = save_checkpoint(
        tmp_path, 1, student=student, objective=objective, optimizer=optimizer, scheduler=scheduler
    )
    for file in path.iterdir():
        head = file.read_bytes()[:2]
        assert head != b"\x80\x04" and not file.name.endswith((".pt", ".bin", ".pkl"))
    with pytest.raises(FileNotFoundError):
        load_checkpoint(
            tmp_path / "nope", student=student, objective=objective, optimizer=optimizer, scheduler=scheduler
        )
