"""torch.library registration of the compiled op: opcheck, torch.compile, and the fallback path."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from distillkit.ops import compiled_available, membank_infonce

needs_op = pytest.mark.skipif(not compiled_available(), reason="distillkit._C not built")


def _op_args(dtype, mode):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 9, generator=g).to(dtype).requires_grad_()
    p = torch.randn(2, 4, 9, generator=g).to(dtype).requires_grad_()
    bank = (
        torch.randn(40, 9, generator=g).to(dtype) if mode == "shared" else torch.randn(2, 40, 9, generator=g)
    )
    bank = bank.to(dtype)
    ql = bl = ni = None
    if mode == "labels":
        ql, bl = torch.tensor([0, 1, 0, 1]), torch.randint(0, 2, (40,), generator=g)
    if mode == "index":
        ni = torch.randint(0, 40, (2, 4, 6), generator=g)
    return (q, p, bank, 0.5, ql, bl, ni)


@needs_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("mode", ["dense", "shared", "labels", "index"])
def test_opcheck(dtype, mode):
    torch.library.opcheck(torch.ops.distillkit.membank_infonce_fwd, _op_args(dtype, mode))


@needs_op
@pytest.mark.parametrize("rows", [40, 0])
def test_kernel_rejects_out_of_range_index_without_crashing(rows):
    """The registered op itself (no wrapper) never reads a bad row, an empty bank included."""
    q, p, bank, tau, *_ = _op_args(torch.float32, "dense")
    bank = bank[:, :rows].contiguous()
    for bad in (
        torch.full((2, 4, 3), 40),
        torch.full((2, 4, 3), -1),
        torch.zeros(2, 4, 3, dtype=torch.int64),
    ):
        if rows and bool((bad == 0).all()):
            continue  # row 0 exists
        with pytest.raises(IndexError, match=rf"negative_index holds -?\d+, outside \[0, {rows}\)"):
            torch.ops.distillkit.membank_infonce_fwd(q, p, bank, tau, None, None, bad)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    def step(q, p, bank, ni):
        return (
            membank_infonce(q, p, bank, 0.2).mean()
            + membank_infonce(q, p, bank, 0.2, negative_index=ni).mean()
        )

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 16, generator=g, requires_grad=True)
    p = torch.randn(3, 16, generator=g)
    bank = torch.randn(100, 16, generator=g)
    ni = torch.randint(0, 100, (3, 5), generator=g)
    got = compiled(q, p, bank, ni)
    got.backward()
    grad = q.grad.clone()
    q.grad = None
    want = step(q, p, bank, ni)
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grad, q.grad)


def test_fallback_without_extension_warns_once_and_matches():
    code = (
        "import sys, warnings, torch\n"
        "sys.modules['distillkit._C'] = None\n"  # makes the import fail as if never built
        "from distillkit.ops import membank_infonce, compiled_available\n"
        "assert not compiled_available()\n"
        "q = torch.randn(2, 4, 8, dtype=torch.float64, requires_grad=True)\n"
        "p = torch.randn(2, 4, 8, dtype=torch.float64); b = torch.randn(30, 8).double()\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    l1 = membank_infonce(q, p, b, 0.3); l2 = membank_infonce(q, p, b, 0.3)\n"
        "assert len([x for x in w if 'reference' in str(x.message)]) == 1, [str(x.message) for x in w]\n"
        "assert torch.autograd.gradcheck(lambda a: membank_infonce(a, p, b, 0.3), (q,))\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@needs_op
def test_kernel_without_fortran_blas_uses_aten_gemm():
    code = (
        "import torch\n"
        "from distillkit.ops import membank_infonce\n"
        "from tests.ops.infonce.helpers import float64_truth\n"
        "g = torch.Generator().manual_seed(0)\n"
        "q, p = torch.randn(3, 5, 19, generator=g), torch.randn(3, 5, 19, generator=g)\n"
        "bank = torch.randn(3, 700, 19, generator=g)\n"
        "for dtype in (torch.float32, torch.float64):\n"
        "    got = membank_infonce(q.to(dtype), p.to(dtype), bank.to(dtype), 0.3).double()\n"
        "    torch.testing.assert_close(got, float64_truth(q, p, bank, 0.3), rtol=1e-4, atol=1e-4)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "DISTILLKIT_CPU_GEMM": "aten", "DISTILLKIT_CPU_TILE": "64"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
