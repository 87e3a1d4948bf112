"""Masked keys never touch a row; the loss has no cancellation (exact 0 without negatives, small losses
keep their relative accuracy). For the compiled CPU kernel (dense and indexed paths) and the reference."""

from __future__ import annotations

import math

import pytest
import torch

from distillkit.ops import compiled_available, membank_infonce, reference_membank_infonce

IMPLS = {"op": membank_infonce, "reference": reference_membank_infonce}
needs_kernel = pytest.mark.skipif(not compiled_available(), reason="distillkit._C is not built")


def truth_without_cancellation(query, positive, bank, tau, query_labels, bank_labels):
    """Float64 loss ``[B]`` as log1p(sum_j exp((s_j - s_pos) / tau)) over the valid negatives only."""
    q, p, bk = query.double(), positive.double(), bank.double()
    out = []
    for b in range(q.shape[0]):
        keep = bank_labels != query_labels[b]
        z = (bk[keep] @ q[b] - q[b] @ p[b]) / tau
        top = float(z.max()) if z.numel() else -math.inf
        if top > 0:
            out.append(top + math.log(math.exp(-top) + float(torch.exp(z - top).sum())))
        else:
            out.append(math.log1p(float(torch.exp(z).sum())))
    return torch.tensor(out, dtype=torch.float64)


def _unit(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


@needs_kernel
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("indexed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_nonfinite_values_in_masked_rows_change_nothing(impl, indexed, dtype):
    """NaN / +-Inf in bank rows whose label every query has: the rows' results are those without them."""
    batch, rows, dim = 9, 300, 24
    q, p, bank = (
        _unit(*s, seed=i).to(dtype) for i, s in enumerate([(batch, dim), (batch, dim), (rows, dim)])
    )
    ql = torch.zeros(batch, dtype=torch.int64)
    bl = torch.randint(1, 4, (rows,), generator=torch.Generator().manual_seed(5))
    poisoned = torch.tensor([3, 140, 299])
    bl[poisoned] = 0
    clean = bank.clone()
    bank[3], bank[140, ::2], bank[299] = float("nan"), float("inf"), float("-inf")
    index = (
        torch.randint(0, rows, (batch, 50), generator=torch.Generator().manual_seed(6)) if indexed else None
    )
    if indexed:
        index[:, :3] = poisoned  # every row meets every poisoned key
    grads = []
    for keys in (bank, clean):
        qq, pp = q.clone().requires_grad_(True), p.clone().requires_grad_(True)
        loss = IMPLS[impl](qq, pp, keys, 0.1, query_labels=ql, bank_labels=bl, negative_index=index)
        loss.sum().backward()  # the backward reads wsum = sum_j p_j key_j, where 0 * NaN would show
        grads.append((loss.detach(), qq.grad, pp.grad))
    for got, want in zip(grads[0], grads[1], strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, atol=0, rtol=0)


@needs_kernel
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("indexed", [False, True])
def test_nan_in_a_valid_negative_reaches_only_its_rows(impl, indexed):
    batch, rows, dim = 6, 200, 16
    q, p, bank = (
        _unit(*s, seed=10 + i).float() for i, s in enumerate([(batch, dim), (batch, dim), (rows, dim)])
    )
    ql = torch.tensor([0, 1, 0, 1, 0, 1])
    bl = torch.randint(0, 2, (rows,), generator=torch.Generator().manual_seed(7))
    bl[17] = 1  # a negative of the even rows only
    bank[17, 5] = float("nan")
    index = torch.arange(rows).repeat(batch, 1) if indexed else None
    loss = IMPLS[impl](q, p, bank, 0.2, query_labels=ql, bank_labels=bl, negative_index=index)
    assert torch.isnan(loss[0::2]).all()
    assert torch.isfinite(loss[1::2]).all()


@needs_kernel
@pytest.mark.parametrize("indexed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_row_without_negatives_has_exactly_zero_loss(indexed, dtype):
    """Every key masked for even rows: loss exactly 0 (lse - s_pos/tau would leave ~1e-7 s_pos/tau)."""
    batch, rows, dim = 10, 130, 24
    q, p, bank = (
        _unit(*s, seed=20 + i).to(dtype) for i, s in enumerate([(batch, dim), (batch, dim), (rows, dim)])
    )
    q, p = q * 3, p * 3  # s_pos / tau up to ~180: plenty of room for the old cancellation
    ql = torch.arange(batch) % 2
    bl = torch.zeros(rows, dtype=torch.int64)
    index = (
        torch.randint(0, rows, (batch, 40), generator=torch.Generator().manual_seed(8)) if indexed else None
    )
    loss = membank_infonce(q, p, bank, 0.05, query_labels=ql, bank_labels=bl, negative_index=index)
    assert (loss[0::2] == 0).all(), loss[0::2]
    assert (loss[1::2] > 0).all()


@needs_kernel
@pytest.mark.parametrize("indexed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_losses_keep_relative_accuracy(indexed, dtype):
    """The positive dominates (s_pos = 1, tau = 0.02): losses ~1e-10 within 1e-4 relative of float64."""
    batch, rows, dim = 8, 300, 64
    q = _unit(batch, dim, seed=30).to(dtype)
    bank = _unit(rows, dim, seed=31).to(dtype)
    p = q.clone()
    ql = torch.zeros(batch, dtype=torch.int64)
    bl = torch.ones(rows, dtype=torch.int64)
    index = (
        torch.randint(0, rows, (batch, 100), generator=torch.Generator().manual_seed(9)) if indexed else None
    )
    loss = membank_infonce(q, p, bank, 0.02, query_labels=ql, bank_labels=bl, negative_index=index)
    if indexed:
        want = torch.stack(
            [
                truth_without_cancellation(
                    q[b : b + 1], p[b : b + 1], bank[index[b]], 0.02, ql[:1], bl[index[b]]
                )[0]
                for b in range(batch)
            ]
        )
    else:
        want = truth_without_cancellation(q, p, bank, 0.02, ql, bl)
    assert (want < 1e-6).all() and (want > 0).all()
    rel = ((loss.double() - want).abs() / want).max()
    assert rel < 1e-4, f"relative error {rel:.3g}"
