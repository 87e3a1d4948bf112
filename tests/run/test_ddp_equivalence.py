"""Two gloo processes with batch 4 each must train exactly like one process with batch 8.

Both runs see the same examples per step (DistributedSampler splits the same permutation), gradients are
averaged across processes, the codir term's negatives are the global batch (first step) and then the
synchronised queue. What differs is the order of floating-point sums (all-reduce, gathered bank rows), so
weights and losses are compared with a tolerance of 1e-5 absolute / 1e-4 relative: rounding differences of
float32 (~1e-7 relative per operation) grow over 4 AdamW steps but stay far below it, while a real
difference (a rank using only its own batch as negatives, an unsynchronised bank) shows up at 1e-3 or more.
Dropout is off: each process draws its own dropout masks, which no single-process run can reproduce.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.distill_fixtures import tiny_config

STEPS = 4


def _run(tmp_path: Path, name: str, processes: int, batch_size: int) -> Path:
    raw = tiny_config(tmp_path, steps=STEPS, batch_size=batch_size, save_every=STEPS)
    raw["teacher"]["config"].update(
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )  # no RNG streams
    raw["objective"].append(
        {"loss": "codir", "weight": 0.5, "dim": 8, "temperature": 0.1, "bank": {"kind": "queue", "size": 24}}
    )
    raw["output_dir"] = str(tmp_path / name)
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(raw), encoding="utf-8")
    command = [sys.executable, "-m", "distillkit.cli", "distill", str(path)]
    if processes > 1:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={processes}",
            *command[1:],
        ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp_path / name


def _canonical_bank(objective: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Bank rows sorted by a fixed projection: the two runs enqueue the same keys in another order."""
    keys = next(v for k, v in objective.items() if k.endswith("bank.keys"))  # [L, K, dim]
    order = torch.argsort(keys[0] @ torch.linspace(1.0, 2.0, keys.shape[-1]))
    return {"keys": keys[:, order]}


def test_two_processes_match_one_process_with_the_global_batch(tmp_path):
    single = _run(tmp_path, "single", processes=1, batch_size=8)
    double = _run(tmp_path, "double", processes=2, batch_size=4)
    checkpoint = f"checkpoints/step-{STEPS:08d}"

    single_student = load_file(str(single / checkpoint / "student.safetensors"))
    double_student = load_file(str(double / checkpoint / "student.safetensors"))
    for name, value in single_student.items():
        torch.testing.assert_close(double_student[name], value, atol=1e-5, rtol=1e-4, msg=name)

    single_objective = load_file(str(single / checkpoint / "objective.safetensors"))
    double_objective = load_file(str(double / checkpoint / "objective.safetensors"))
    for name, value in single_objective.items():
        if "bank." not in name:  # projection heads
            torch.testing.assert_close(double_objective[name], value, atol=1e-5, rtol=1e-4, msg=name)
    torch.testing.assert_close(
        _canonical_bank(double_objective)["keys"],
        _canonical_bank(single_objective)["keys"],
        atol=1e-5,
        rtol=1e-4,
    )
    assert int(double_objective["terms.codir.bank.filled"]) == int(
        single_objective["terms.codir.bank.filled"]
    )

    def losses(run: Path) -> list[dict]:
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [r for r in records if r["split"] == "train"]

    for one, two in zip(losses(single), losses(double), strict=True):
        for term in ("total", "kd", "l2", "ce", "codir"):
            assert two[term] == pytest.approx(one[term], rel=1e-4, abs=1e-5), (one["step"], term)

    state = json.loads((double / checkpoint / "state.json").read_text())
    checksums = state["extra"]["buffer_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]  # every rank held the identical bank
