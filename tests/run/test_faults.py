"""Crash safety: a run killed with SIGKILL and resumed ends exactly where an uninterrupted run ends."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distillkit.run.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from tests.distill_fixtures import tiny_config

STEPS = 60


def _config(tmp_path: Path, name: str, batch_size: int = 8, steps: int = STEPS) -> Path:
    raw = tiny_config(tmp_path, steps=steps, save_every=5, keep_last=3, batch_size=batch_size)
    raw["objective"].append({"loss": "codir", "weight": 0.1, "dim": 8, "bank": {"kind": "queue", "size": 32}})
    raw["output_dir"] = str(tmp_path / name)
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(raw), encoding="utf-8")
    return path


def _distill(config: Path, *extra: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.Popen(
        [sys.executable, "-m", "distillkit.cli", "distill", str(config), *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def _final_state(run: Path, steps: int = STEPS) -> tuple[dict, dict]:
    last = latest_checkpoint(run / "checkpoints")
    assert last is not None and last.name == f"step-{steps:08d}"
    return load_file(str(last / "student.safetensors")), load_file(str(last / "objective.safetensors"))


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    reference = _distill(_config(tmp_path, "reference"))
    out, err = reference.communicate(timeout=600)
    assert reference.returncode == 0, err[-3000:]

    victim_config = _config(tmp_path, "victim")
    victim = _distill(victim_config)
    checkpoints = tmp_path / "victim" / "checkpoints"
    deadline = time.monotonic() + 300
    while not list_checkpoints(checkpoints) and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(random.Random().uniform(0.0, 0.2))  # somewhere after the first checkpoint, maybe mid-save
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=60)
    assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = latest_checkpoint(checkpoints)
    assert killed_at is not None and killed_at.name != f"step-{STEPS:08d}"
    print(f"killed with the newest checkpoint at {killed_at.name} of step-{STEPS:08d}")

    resumed = _distill(victim_config, "--resume")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert f"resumed from {killed_at}" in out

    (ref_student, ref_objective), (student, objective) = (
        _final_state(tmp_path / "reference"),
        _final_state(tmp_path / "victim"),
    )
    assert ref_student.keys() == student.keys() and ref_objective.keys() == objective.keys()
    for name in ref_student:
        assert torch.equal(ref_student[name], student[name]), name
    for name in ref_objective:  # projection heads and the memory bank (keys, labels, pointer)
        assert torch.equal(ref_objective[name], objective[name]), name
    assert any("bank.keys" in name for name in objective)


def test_a_save_interrupted_midway_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    objective = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    parts = {"student": model, "objective": objective, "optimizer": optimizer, "scheduler": scheduler}
    first = save_checkpoint(tmp_path, 1, **parts)

    import distillkit.run.checkpoint as checkpoint

    def crash(*args, **kwargs):
        raise OSError("disk vanished")

    monkeypatch.setattr(checkpoint.os, "replace", crash)  # dies after writing the files, before publishing
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(OSError, match="disk vanished"):
        save_checkpoint(tmp_path, 2, **parts)
    assert list_checkpoints(tmp_path) == [first]
    restored = torch.nn.Linear(3, 2)
    restored_optimizer = torch.optim.AdamW(restored.parameters())
    load_checkpoint(
        first,
        student=restored,
        objective=torch.nn.Linear(2, 2),
        optimizer=restored_optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(restored_optimizer, lambda step: 1.0),
        restore_rng=False,
    )
    assert not torch.equal(restored.weight, model.weight)
    torch.testing.assert_close(restored.weight, model.weight - 1.0)


EXPLODING = """
from distillkit import LossTerm, hookimpl


class Exploding(LossTerm):
    name = "exploding"

    def forward(self, student, teacher):
        raise RuntimeError("shape bug inside the plugin")


@hookimpl
def distillkit_register_losses(register):
    register(Exploding)
"""


def test_a_plugin_raising_in_forward_is_named_with_its_distribution_and_term(tmp_path):
    from tests.plugin_helpers import write_distribution

    site = tmp_path / "site"
    site.mkdir()
    write_distribution(site, "distillkit-exploding", "distillkit_exploding", EXPLODING, "exploding")
    raw = tiny_config(tmp_path, steps=2)
    raw["objective"].append({"loss": "exploding", "name": "aux", "weight": 0.5})
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps(raw), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    env.pop("DISTILLKIT_PLUGINS", None)
    result = subprocess.run(
        [sys.executable, "-m", "distillkit.cli", "distill", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert (
        "loss term 'aux' (loss 'exploding', plugin 'exploding' from distillkit-exploding 0.1) failed: "
        "RuntimeError: shape bug inside the plugin"
    ) in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists() or not list_checkpoints(
        tmp_path / "run" / "checkpoints"
    )


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid``, read from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc to find the worker processes")
def test_two_process_run_killed_and_resumed_matches_uninterrupted(tmp_path):
    def launch(config: Path, *extra: str) -> subprocess.Popen:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "-m",
            "distillkit.cli",
        ]
        return subprocess.Popen(
            [*command, "distill", str(config), *extra],
            env=env,
            cwd=tmp_path,
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    steps = 120
    reference = launch(_config(tmp_path, "reference", batch_size=4, steps=steps))
    _, err = reference.communicate(timeout=600)
    assert reference.returncode == 0, err[-3000:]

    victim_config = _config(tmp_path, "victim", batch_size=4, steps=steps)
    victim = launch(victim_config)
    checkpoints = tmp_path / "victim" / "checkpoints"
    deadline = time.monotonic() + 300
    while not list_checkpoints(checkpoints) and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(random.Random().uniform(0.0, 0.2))
    for pid in [victim.pid, *_descendants(victim.pid)]:  # the launcher and both workers (own sessions)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    victim.communicate(timeout=60)
    killed_at = latest_checkpoint(checkpoints)
    assert killed_at is not None and killed_at.name != f"step-{steps:08d}", "the run finished before the kill"
    print(f"killed with the newest checkpoint at {killed_at.name} of step-{steps:08d}")

    resumed = launch(victim_config, "--resume")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert f"resumed from {killed_at}" in out
    for ref, got in zip(
        _final_state(tmp_path / "reference", steps), _final_state(tmp_path / "victim", steps), strict=True
    ):
        assert ref.keys() == got.keys()
        for name in ref:
            assert torch.equal(ref[name], got[name]), name
