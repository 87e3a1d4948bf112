"""DistillationTrainer in two gloo processes (DDP): the objective's learned parts stay equal on every rank."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")

ROOT = Path(__file__).resolve().parents[1]


def test_two_processes_keep_heads_and_logs_in_step(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    result = subprocess.run(
        [*command, str(ROOT / "tests" / "hf_two_processes.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text(encoding="utf-8")) for r in (0, 1)]
    assert ranks[0]["wrapped"] == "DistributedDataParallel"
    assert ranks[0]["student"] == pytest.approx(ranks[1]["student"], rel=1e-12)
    heads = [rank["heads"] for rank in ranks]
    assert any("projections" in name for name in heads[0])
    assert heads[0].keys() == heads[1].keys()
    for name in heads[0]:  # each rank saw other data: only averaged gradients keep the heads equal
        assert heads[0][name] == pytest.approx(heads[1][name], rel=1e-9, abs=1e-9), name
    logs = [rank["logs"] for rank in ranks]
    assert [r["step"] for r in logs[0]] == [1, 2, 3]
    assert logs[0] == logs[1]  # the terms are averaged over processes like the Trainer's own loss
    assert {"loss_kd", "loss_l2", "loss_minilm_v2"} <= set(logs[0][0])
