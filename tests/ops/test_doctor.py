"""``distillkit doctor``: exits 0 and prints what a bug report about the compiled ops needs."""

from __future__ import annotations

import io

import torch

from distillkit.cli import main
from distillkit.doctor import VERIFY_COMMANDS, run_doctor
from distillkit.ops import library


def test_doctor_report_has_the_key_lines():
    out = io.StringIO()
    assert run_doctor(out) == 0
    text = out.getvalue()
    assert f"torch {torch.__version__}" in text
    assert "torch CUDA build:" in text and "NVIDIA driver:" in text
    if torch.cuda.is_available():
        assert "GPU cuda:0:" in text and "self-check cuda:0: PASS" in text
    else:
        assert "GPU: no CUDA device" in text and "self-check: not run (no CUDA device)" in text
    assert "distillkit._C: loaded" in text or "distillkit._C: not loaded" in text
    for name, devices in library.op_kernels().items():
        assert f"{name}: {', '.join(devices)}" in text
    assert "DISTILLKIT_CUDA_KERNEL=check" in text
    for command in VERIFY_COMMANDS:
        assert command in text
    assert "compute-sanitizer --tool racecheck" in text


def test_doctor_cli_exits_0(capsys):
    assert main(["doctor"]) == 0
    printed = capsys.readouterr().out
    assert f"torch {torch.__version__}" in printed and "compiled ops (device types with a kernel):" in printed


def test_doctor_bad_policy_is_exit_2(monkeypatch, capsys):
    monkeypatch.setenv("DISTILLKIT_CUDA_KERNEL", "sometimes")
    assert main(["doctor"]) == 2
    assert "DISTILLKIT_CUDA_KERNEL" in capsys.readouterr().err
