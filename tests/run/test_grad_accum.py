"""Gradient accumulation and memory banks: every micro-batch's teacher keys reach the bank."""

import pytest
import torch
from safetensors.torch import load_file

from distillkit.config import config_from_dict
from distillkit.run.distill import distill
from distillkit_plugins.codir_banks import IndexBank
from tests.distill_fixtures import tiny_config

STEPS, ACCUM, BATCH = 2, 2, 4  # 16 examples seen, fewer than one epoch of the 43 training rows: no repeats


def _final_bank(tmp_path, bank, **codir):
    raw = tiny_config(tmp_path, steps=STEPS, grad_accum=ACCUM, batch_size=BATCH, eval_every=None)
    raw["objective"] = [
        {"loss": "ce", "weight": 1.0},
        {"loss": "codir", "weight": 0.1, "dim": 8, "layer_map": "last", "bank": bank, **codir},
    ]
    distill(config_from_dict(raw))
    last = sorted((tmp_path / "run" / "checkpoints").iterdir())[-1]
    state = load_file(str(last / "objective.safetensors"))
    return {k.removeprefix("terms.codir."): v for k, v in state.items() if k.startswith("terms.codir.")}


def test_queue_bank_holds_every_micro_batch(tmp_path):
    bank = _final_bank(tmp_path, {"kind": "queue", "size": 64})
    seen = STEPS * ACCUM * BATCH
    assert int(bank["bank.filled"]) == seen
    assert int(bank["bank.pointer"]) == seen
    norms = bank["bank.keys"].norm(dim=-1)  # [layers, size]: enqueued keys are unit vectors, the rest zeros
    torch.testing.assert_close(norms[:, :seen], torch.ones_like(norms[:, :seen]))
    assert not norms[:, seen:].any()


@pytest.mark.parametrize("negatives", ["all", "other_labels"])
def test_index_bank_updates_every_micro_batch(tmp_path, negatives):
    bank = _final_bank(tmp_path, {"kind": "index", "size": 64, "negatives": 8}, negatives=negatives)
    initial = IndexBank(1, 64, 8).keys
    updated = (bank["bank.keys"] != initial).any(dim=-1).any(dim=0)
    assert int(updated.sum()) == STEPS * ACCUM * BATCH
    if negatives == "other_labels":
        assert torch.equal(bank["bank.labels"] != -1, updated)


def test_crd_nce_banks_update_every_micro_batch(tmp_path):
    bank = {
        "kind": "index",
        "size": 64,
        "negatives": 8,
        "warm_start": False,
    }  # no warm-up pass: count updates
    state = _final_bank(tmp_path, bank, objective="crd_nce", pooling="cls", negatives="other_labels")
    for side in ("student", "teacher"):
        updated = state[f"crd.{side}_bank.labels"] != -1  # a slot is labelled when it is written
        assert int(updated.sum()) == STEPS * ACCUM * BATCH, side
        norms = state[f"crd.{side}_bank.keys"].norm(dim=-1)[0]
        torch.testing.assert_close(norms[updated], torch.ones(int(updated.sum())))  # written slots: unit keys
    assert int(state["crd.z_estimated"]) == 1 and torch.isfinite(state["crd.student_log_z"]).all()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_two_processes_gather_every_micro_batch(tmp_path):
    """Under DDP each rank's micro-batches reach every rank's bank (the loop checks the ranks agree)."""
    import json
    import os
    import subprocess
    import sys

    raw = tiny_config(tmp_path, steps=STEPS, grad_accum=ACCUM, batch_size=BATCH, eval_every=None)
    codir = {"loss": "codir", "weight": 0.1, "dim": 8, "layer_map": "last", "negatives": "other_labels"}
    raw["objective"] = [
        {"loss": "ce", "weight": 1.0},
        {**codir, "name": "queue", "bank": {"kind": "queue", "size": 64}},
        {**codir, "name": "index", "bank": {"kind": "index", "size": 64, "negatives": 8}},
        {  # the released form: a warm-up pass over each rank's shard fills both banks before step 1
            **codir,
            "name": "released",
            "objective": "crd_nce",
            "pooling": "cls",
            "bank": {"kind": "index", "size": 64, "negatives": 8},
        },
    ]
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(raw), encoding="utf-8")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "distillkit.cli"]
    result = subprocess.run(
        [*command, "distill", str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    last = sorted((tmp_path / "run" / "checkpoints").iterdir())[-1]
    state = load_file(str(last / "objective.safetensors"))
    seen = 2 * STEPS * ACCUM * BATCH  # two ranks, 32 distinct examples of the 43 (one epoch, no repeats)
    assert int(state["terms.queue.bank.filled"]) == seen
    assert int((state["terms.index.bank.labels"] != -1).sum()) == seen
    for side in ("student", "teacher"):  # every training example's slot, on both ranks (checked at save)
        assert int((state[f"terms.released.crd.{side}_bank.labels"] != -1).sum()) == 43
    queued = state["terms.queue.bank.labels"][:seen]
    assert sorted(queued.tolist()) == sorted(
        state["terms.index.bank.labels"][state["terms.index.bank.labels"] != -1].tolist()
    )
