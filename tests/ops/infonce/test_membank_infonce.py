"""Values and gradients of membank_infonce against a float64 ground truth."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distillkit.ops import (
    compiled_available,
    membank_infonce,
    naive_membank_infonce,
    reference_membank_infonce,
)
from tests.ops.infonce.helpers import float64_truth

IMPLS = {
    "op": membank_infonce,
    "reference": reference_membank_infonce,
    "naive": naive_membank_infonce,
}


@st.composite
def cases(draw):
    lead = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    batch = draw(st.integers(1, 9))
    dim = draw(st.sampled_from([1, 3, 17, 33, 64]))
    rows = draw(st.integers(1, 700))
    shared = draw(st.booleans()) or not lead
    indexed = draw(st.booleans())
    labelled = draw(st.booleans())
    tau = draw(st.sampled_from([0.05, 0.3, 1.0, 2.5]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*lead, batch, dim, generator=g, dtype=torch.float64)
    p = torch.randn(*lead, batch, dim, generator=g, dtype=torch.float64)
    bank_shape = (rows, dim) if shared else (*lead, rows, dim)
    bank = torch.randn(*bank_shape, generator=g, dtype=torch.float64)
    kw = {}
    if labelled:
        classes = draw(st.integers(1, 4))
        kw["query_labels"] = torch.randint(0, classes, (batch,), generator=g)
        kw["bank_labels"] = torch.randint(0, classes, (rows,), generator=g)
    if indexed:
        k = draw(st.integers(1, 300))
        kw["negative_index"] = torch.randint(0, rows, (*lead, batch, k), generator=g)
    return q, p, bank, tau, kw


@pytest.mark.parametrize("impl", sorted(IMPLS))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_matches_float64_truth(impl, case):
    q, p, bank, tau, kw = case
    got = IMPLS[impl](q, p, bank, tau, **kw)
    want = float64_truth(q, p, bank, tau, **kw)
    assert got.shape == want.shape
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@settings(max_examples=15, deadline=None)
@given(case=cases())
def test_float32_close_to_float64(case):
    q, p, bank, tau, kw = case
    got = membank_infonce(q.float(), p.float(), bank.float(), tau, **kw)
    assert got.dtype == torch.float32
    want = float64_truth(q, p, bank, tau, **kw)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 / tau)


def test_large_bank_crosses_tiles_and_workers():
    g = torch.Generator().manual_seed(3)
    q, p = torch.randn(2, 3, 16, generator=g), torch.randn(2, 3, 16, generator=g)
    bank = torch.randn(2, 5003, 16, generator=g)
    want = float64_truth(q, p, bank, 0.2)
    torch.testing.assert_close(membank_infonce(q, p, bank, 0.2).double(), want, rtol=1e-4, atol=1e-4)


def test_row_without_negatives_has_zero_loss_and_grad():
    q = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    p = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    bank = torch.randn(5, 8, dtype=torch.float64)
    ql = torch.tensor([0, 1, 2])
    bl = torch.tensor([0, 0, 0, 0, 0])  # row 0 loses every negative
    loss = membank_infonce(q, p, bank, 0.1, query_labels=ql, bank_labels=bl)
    assert loss[0].item() == 0.0
    assert loss[1].item() > 0.0
    loss.sum().backward()
    assert torch.all(q.grad[0] == 0) and torch.all(p.grad[0] == 0)
    assert q.grad[1].abs().sum() > 0


def test_shared_bank_equals_repeated_bank():
    g = torch.Generator().manual_seed(1)
    q, p = torch.randn(4, 6, 32, generator=g), torch.randn(4, 6, 32, generator=g)
    bank = torch.randn(1000, 32, generator=g)
    shared = membank_infonce(q, p, bank, 0.1)
    repeated = membank_infonce(q, p, bank.expand(4, -1, -1), 0.1)
    torch.testing.assert_close(shared, repeated, rtol=1e-5, atol=1e-5)


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(8, 5, generator=g, dtype=torch.float64).t()  # [5, 8] strided
    p = torch.randn(5, 8, generator=g, dtype=torch.float64)
    bank = torch.randn(8, 300, generator=g, dtype=torch.float64).t()
    assert not q.is_contiguous() and not bank.is_contiguous()
    torch.testing.assert_close(membank_infonce(q, p, bank, 0.5), float64_truth(q, p, bank, 0.5))


@pytest.mark.parametrize("impl", ["op", "reference"])
@pytest.mark.parametrize("mode", ["dense", "labels", "index", "shared"])
def test_gradcheck_float64(impl, mode):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    p = torch.randn(2, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    bank = torch.randn(2, 37, 5, generator=g, dtype=torch.float64)
    kw = {}
    if mode == "shared":
        bank = bank[0]
    if mode == "labels":
        kw = {
            "query_labels": torch.tensor([0, 1, 2, 0]),
            "bank_labels": torch.randint(0, 3, (37,), generator=g),
        }
    if mode == "index":
        kw = {"negative_index": torch.randint(0, 37, (2, 4, 11), generator=g)}
    fn = IMPLS[impl]
    assert torch.autograd.gradcheck(lambda a, b: fn(a, b, bank, 0.7, **kw), (q, p))


@pytest.mark.parametrize("indexed", [False, True])
def test_gradients_never_reach_the_bank(indexed):
    q = torch.randn(2, 3, 8, requires_grad=True)
    p = torch.randn(2, 3, 8, requires_grad=True)
    bank = torch.randn(2, 50, 8, requires_grad=True)
    kw = {"negative_index": torch.randint(0, 50, (2, 3, 7))} if indexed else {}
    membank_infonce(q, p, bank, 0.1, **kw).sum().backward()
    assert bank.grad is None
    assert q.grad is not None and p.grad is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("indexed", [False, True])
def test_low_precision_at_small_temperature(dtype, indexed):
    g = torch.Generator().manual_seed(5)
    q = torch.nn.functional.normalize(torch.randn(2, 16, 64, generator=g), dim=-1)
    p = torch.nn.functional.normalize(q + 0.3 * torch.randn(2, 16, 64, generator=g), dim=-1)
    bank = torch.nn.functional.normalize(torch.randn(3000, 64, generator=g), dim=-1)
    kw = {"negative_index": torch.randint(0, 3000, (2, 16, 500), generator=g)} if indexed else {}
    q_lo = q.to(dtype).requires_grad_()
    p_lo = p.to(dtype).requires_grad_()
    loss = membank_infonce(q_lo, p_lo, bank.to(dtype), 0.01, **kw)
    assert loss.dtype == torch.float32
    loss.sum().backward()
    assert q_lo.grad.dtype == dtype and p_lo.grad.dtype == dtype
    assert torch.isfinite(loss).all() and torch.isfinite(q_lo.grad.float()).all()
    # Compare with float64 on the same (rounded) inputs: only accumulation may differ.
    q64 = q_lo.detach().double().requires_grad_()
    p64 = p_lo.detach().double().requires_grad_()
    want = membank_infonce(q64, p64, bank.to(dtype).double(), 0.01, **kw)
    want.sum().backward()
    torch.testing.assert_close(loss.double(), want, rtol=2e-3, atol=2e-2)
    torch.testing.assert_close(q_lo.grad.double(), q64.grad, rtol=2e-2, atol=2.0)


def test_compiled_extension_is_loaded():
    # The build in this repository ships the CPU kernel; the fallback is tested separately.
    assert compiled_available()
