import math

from distillkit.bench.losses import BenchCase, BenchShapes, collect_cases, time_case
from distillkit.cli import main

TINY = BenchShapes(batch=4, seq=6, student_hidden=8, teacher_hidden=12, student_layers=2, teacher_layers=4)


def test_every_registered_loss_has_a_case_and_plugins_add_their_own():
    names = {case.name for case in collect_cases()}
    assert {"kd", "l2", "ce", "codir"} <= names
    assert {"codir-queue-65k", "codir-index-16k"} <= names  # contributed through the bench hook
    assert {case.loss for case in collect_cases(["kd"])} == {"kd"}


def test_time_case_runs_forward_and_backward():
    row = time_case(
        BenchCase("codir-small", "codir", {"bank": {"kind": "queue", "size": 64}}), TINY, repeat=2
    )
    assert row["case"] == "codir-small" and row["median_ms"] > 0 and math.isfinite(row["min_ms"])


def test_cli_prints_a_table(capsys):
    args = [
        "bench",
        "--losses",
        "kd,l2",
        "--batch",
        "2",
        "--seq",
        "4",
        "--student-hidden",
        "8",
        "--teacher-hidden",
        "8",
        "--student-layers",
        "1",
        "--teacher-layers",
        "2",
        "--repeat",
        "1",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| case | loss | median_ms | min_ms |" in out
    assert "| kd | kd |" in out and "| l2 | l2 |" in out


def test_cli_op_table(capsys):
    assert main(["bench", "--op", "--op-k", "300", "--op-b", "3", "--op-d", "5", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    for variant in ("naive", "reference", "compiled"):
        assert f"| B3 D5 K300 | {variant} |" in out
