"""Two gloo processes under torchrun: rank-0-only logs and checkpoints, sharded data, gathered evaluation."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.distill_fixtures import causal_lm_config, tiny_config

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def _distill_in_two_processes(tmp_path, raw) -> subprocess.CompletedProcess:
    """``distillkit distill`` of the config ``raw`` under torchrun with two gloo processes (must succeed)."""
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(raw), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "distillkit.cli"]
    result = subprocess.run(
        [*command, "distill", str(path)], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_two_processes(tmp_path):
    raw = tiny_config(tmp_path, steps=4, save_every=2, batch_size=4)
    raw["objective"].append({"loss": "codir", "weight": 0.1, "dim": 8, "bank": {"kind": "queue", "size": 16}})
    result = _distill_in_two_processes(tmp_path, raw)
    assert result.stdout.count("student saved to") == 1  # only rank 0 reports
    summary = json.loads((tmp_path / "run" / "summary.json").read_text(encoding="utf-8"))
    assert summary["student"]["eval"]["examples"] == 5  # gathered from both ranks, padding dropped
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "step-00000002",
        "step-00000004",
    ]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4]


def test_two_processes_sample_on_policy(tmp_path):
    """Each rank samples its own prompts on the same micro-batches; the log counts both ranks' tokens."""
    generation = {"student_fraction": 1.0, "prompt_tokens": 4, "max_new_tokens": 1}  # 1 token per prompt
    raw = causal_lm_config(tmp_path, generation, steps=3, save_every=3, batch_size=4)
    _distill_in_two_processes(tmp_path, raw)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all(r["generated_tokens"] == 2 * 4 for r in train)  # 2 ranks x 4 prompts x 1 token
    assert all(r["sources"] == {"student": 1, "teacher": 0, "data": 0} for r in train)
