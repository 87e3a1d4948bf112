"""The CPU kernel's other code paths: the portable instruction set, and rows split among workers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distillkit.ops import DIVERGENCES, fused_linear_divergence
from distillkit.ops.linear_divergence.op import kernel_available

from .test_fused_linear_divergence import float64_loss, make, mixing

pytestmark = pytest.mark.skipif(not kernel_available(), reason="compiled op not built")

_CHILD = """
import sys, torch
from distillkit.ops import DIVERGENCES, fused_linear_divergence
from tests.ops.linear_divergence.test_fused_linear_divergence import make, mixing
out = {}
for kind in DIVERGENCES:
    hs, ws, ht, wt = make(11, 523, 13, 7, scale=2.0, seed=21)
    labels = torch.arange(11) * 37 % 523
    loss = fused_linear_divergence(hs, ws, ht, wt, divergence=kind, temperature=1.7, labels=labels,
                                   ce_weight=0.3, **mixing(kind))
    loss.backward()
    out[kind] = (loss.detach(), hs.grad, ws.grad)
torch.save(out, sys.argv[1])
"""


@pytest.mark.parametrize("isa", ["baseline", "best"])
def test_each_instruction_set_matches_float64(isa, tmp_path):
    """The row functions are compiled for the portable target and for AVX2; each is checked in its process."""
    env = {"DISTILLKIT_CPU_ISA": isa, "DISTILLKIT_FLD_ROWS": "4", "OMP_NUM_THREADS": "1"}
    path = tmp_path / "out.pt"
    subprocess.run(
        [sys.executable, "-c", _CHILD, str(path)],
        check=True,
        env={**os.environ, **env},
        cwd=str(Path(__file__).resolve().parents[3]),
    )
    results = torch.load(path, weights_only=True)
    for kind in DIVERGENCES:
        hs, ws, ht, wt = make(11, 523, 13, 7, scale=2.0, seed=21)
        labels = torch.arange(11) * 37 % 523
        h64, w64 = hs.detach().double().requires_grad_(), ws.detach().double().requires_grad_()
        expected = float64_loss(h64, w64, ht, wt, kind, 1.7, labels=labels, ce_weight=0.3, **mixing(kind))
        expected.backward()
        loss, grad_h, grad_w = results[kind]
        torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(grad_h.double(), h64.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(grad_w.double(), w64.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_rows_split_among_two_workers(kind, monkeypatch):
    """A vocabulary too small for a part per worker: the rows go to concurrent groups, gradients summed."""
    monkeypatch.setenv("DISTILLKIT_FLD_ROWS", "7")
    hs, ws, ht, wt = make(83, 301, 9, 6, scale=2.0, seed=22)
    labels = torch.arange(83) * 11 % 301
    labels[::5] = -100
    mask = labels != -100
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        loss = fused_linear_divergence(
            hs, ws, ht, wt, divergence=kind, temperature=2.0, mask=mask, labels=labels, ce_weight=0.5,
            **mixing(kind),
        )  # fmt: skip
        loss.backward()
    finally:
        torch.set_num_threads(threads)
    h64, w64 = hs.detach().double().requires_grad_(), ws.detach().double().requires_grad_()
    expected = float64_loss(
        h64, w64, ht, wt, kind, 2.0, mask=mask, labels=labels, ce_weight=0.5, **mixing(kind)
    )  # fmt: skip
    expected.backward()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(hs.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ws.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)


def test_a_cross_entropy_alone_skips_the_teacher():
    """No counted divergence row: the teacher's logits are not needed (garbage in them changes nothing)."""
    hs, ws, ht, wt = make(9, 40, 5, 4, seed=23)
    labels = torch.arange(9) * 3
    none = torch.zeros(9, dtype=torch.bool)
    clean = fused_linear_divergence(hs, ws, ht, wt, mask=none, labels=labels, ce_weight=1.0)
    nan = torch.full_like(ht, float("nan"))
    poisoned = fused_linear_divergence(hs, ws, nan, wt, mask=none, labels=labels, ce_weight=1.0)
    expected = torch.nn.functional.cross_entropy((hs @ ws.T).double(), labels)
    torch.testing.assert_close(clean.double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(clean, poisoned)
