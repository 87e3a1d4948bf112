"""fused_linear_divergence against float64 formulas, on the compiled CPU kernel and the chunked path."""

from __future__ import annotations

import importlib

import pytest
import torch

from distillkit import Taps, build_term
from distillkit.objective.terms import ModelDims
from distillkit.ops import DIVERGENCES, fused_linear_divergence

MODULE = importlib.import_module("distillkit.ops.linear_divergence.op")
COMPILED = importlib.import_module("distillkit.ops.linear_divergence.compiled")
needs_kernel = pytest.mark.skipif(not MODULE.kernel_available(), reason="compiled op not built")


@pytest.fixture(params=["kernel", "chunked"])
def path(request, monkeypatch):
    """Runs a test on the compiled kernel (blocks of 5 rows, to cross block edges) and on the chunked path."""
    if request.param == "kernel":
        if not MODULE.kernel_available():
            pytest.skip("compiled op not built")
        monkeypatch.setenv("DISTILLKIT_FLD_ROWS", "5")
    else:
        monkeypatch.setattr(MODULE, "kernel_available", lambda: False)
    return request.param


def float64_loss(
    hs, ws, ht, wt, kind, temperature, beta=0.5, alpha=0.1, mask=None, labels=None, ce_weight=0.0
):
    """The loss from its formulas in float64 on full logits (differentiable in hs and ws)."""
    s = hs.double() @ ws.double().T
    t = ht.detach().double() @ wt.detach().double().T
    p = torch.softmax(t / temperature, -1)
    q = torch.softmax(s / temperature, -1)

    def kl(a, b):
        return torch.where(a > 0, a * (a.log() - b.log()), torch.zeros_like(a)).sum(-1)

    if kind == "forward_kl":
        per_row = kl(p, q)
    elif kind == "reverse_kl":
        per_row = kl(q, p)
    elif kind == "jsd":
        m = beta * p + (1 - beta) * q
        per_row = beta * kl(p, m) + (1 - beta) * kl(q, m)
    elif kind == "tvd":
        per_row = 0.5 * (p - q).abs().sum(-1)
    elif kind == "skew_forward_kl":
        per_row = kl(p, alpha * p + (1 - alpha) * q)
    else:
        per_row = kl(q, alpha * q + (1 - alpha) * p)
    counted = torch.ones(s.shape[0], dtype=torch.bool) if mask is None else mask
    loss = temperature**2 * per_row[counted].sum() / max(int(counted.sum()), 1)
    if ce_weight:
        valid = labels != -100
        log_q1 = torch.log_softmax(s, -1)
        nll = -log_q1[valid.nonzero().squeeze(-1), labels[valid]]
        loss = loss + ce_weight * nll.sum() / max(int(valid.sum()), 1)
    return loss


def make(n, v, ds, dt, scale=1.0, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = (scale * torch.randn(n, ds, generator=g)).to(dtype).requires_grad_()
    ws = (torch.randn(v, ds, generator=g) / ds**0.5).to(dtype).requires_grad_()
    ht = (scale * torch.randn(n, dt, generator=g)).to(dtype)
    wt = (torch.randn(v, dt, generator=g) / dt**0.5).to(dtype)
    return hs, ws, ht, wt


def mixing(kind):
    return {"beta": 0.3} if kind == "jsd" else {"alpha": 0.2} if kind.startswith("skew_") else {}


def check_against_float64(hs, ws, ht, wt, rtol=1e-4, atol=1e-6, **kwargs):
    loss = fused_linear_divergence(hs, ws, ht, wt, **kwargs)
    loss.backward()
    h64 = hs.detach().double().requires_grad_()
    w64 = ws.detach().double().requires_grad_()
    kind = kwargs.pop("divergence")
    expected = float64_loss(h64, w64, ht, wt, kind, **kwargs)
    expected.backward()
    assert loss.shape == () and loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected, rtol=rtol, atol=atol)
    torch.testing.assert_close(hs.grad.double(), h64.grad, rtol=rtol, atol=atol)
    torch.testing.assert_close(ws.grad.double(), w64.grad, rtol=rtol, atol=atol)


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize(
    ("n", "v", "ds", "dt", "temperature"),
    [(1, 7, 3, 5, 1.0), (13, 1031, 17, 9, 0.5), (23, 257, 33, 33, 4.0), (9, 130, 5, 11, 1.7)],
)
def test_matches_float64_formula(path, kind, n, v, ds, dt, temperature):
    hs, ws, ht, wt = make(n, v, ds, dt, scale=2.0, seed=n + v)
    check_against_float64(hs, ws, ht, wt, divergence=kind, temperature=temperature, **mixing(kind))


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_mask_with_few_counted_rows(path, kind):
    hs, ws, ht, wt = make(17, 301, 15, 7, scale=2.0, seed=3)
    mask = torch.zeros(17, dtype=torch.bool)
    mask[[4, 11]] = True
    check_against_float64(hs, ws, ht, wt, divergence=kind, temperature=2.0, mask=mask, **mixing(kind))
    assert hs.grad[~mask].abs().max() == 0  # rows that do not count get no gradient


@pytest.mark.parametrize("kind", ["forward_kl", "jsd", "skew_reverse_kl"])
def test_hard_label_cross_entropy_goes_through_the_same_path(path, kind):
    hs, ws, ht, wt = make(12, 97, 9, 6, scale=2.0, seed=4)
    labels = torch.randint(0, 97, (12,), generator=torch.Generator().manual_seed(5))
    labels[[0, 5, 6]] = -100
    mask = labels != -100
    check_against_float64(
        hs,
        ws,
        ht,
        wt,
        divergence=kind,
        temperature=2.0,
        mask=mask,
        labels=labels,
        ce_weight=0.6,
        **mixing(kind),
    )


def test_no_counted_row_gives_zero(path):
    hs, ws, ht, wt = make(4, 11, 3, 3)
    loss = fused_linear_divergence(hs, ws, ht, wt, mask=torch.zeros(4, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and hs.grad.abs().max() == 0 and ws.grad.abs().max() == 0


def test_equals_kd_term_on_the_logits(path):
    hs, ws, ht, wt = make(10, 53, 8, 12, scale=2.0, seed=6)
    mask = torch.tensor([1, 1, 1, 0, 0, 1, 1, 1, 1, 0])
    dims = ModelDims(student_layers=1, teacher_layers=1, student_hidden=8, teacher_hidden=12)
    term = build_term("kd", dims, divergence="jsd", beta=0.3, temperature=3.0)
    logits_s = (hs @ ws.T).reshape(2, 5, 53)
    logits_t = (ht @ wt.T).reshape(2, 5, 53)
    hidden = (torch.zeros(2, 5, 4),)
    expected = term(
        Taps(hidden_states=hidden, logits=logits_s, attention_mask=mask.reshape(2, 5)),
        Taps(hidden_states=hidden, logits=logits_t, attention_mask=mask.reshape(2, 5)),
    )
    got = fused_linear_divergence(
        hs, ws, ht, wt, divergence="jsd", beta=0.3, temperature=3.0, mask=mask.bool()
    )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_gradcheck_float64(path, kind):
    hs, ws, ht, wt = make(6, 13, 4, 5, dtype=torch.float64, seed=7)
    mask = torch.tensor([True, False, True, True, True, False])
    if kind == "tvd":  # |p - q| has kinks; keep away from them with distinct models
        ht = ht * 3

    def fn(h, w):
        return fused_linear_divergence(
            h, w, ht, wt, divergence=kind, temperature=1.3, mask=mask, **mixing(kind)
        )

    assert fn(hs, ws).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, (hs, ws))


def test_gradcheck_float64_with_cross_entropy(path):
    hs, ws, ht, wt = make(5, 9, 3, 4, dtype=torch.float64, seed=8)
    labels = torch.tensor([1, -100, 8, 0, 3])

    def fn(h, w):
        return fused_linear_divergence(h, w, ht, wt, temperature=2.0, labels=labels, ce_weight=0.5)

    assert torch.autograd.gradcheck(fn, (hs, ws))


def test_upstream_gradient_scales_the_stored_gradients(path):
    hs, ws, ht, wt = make(5, 19, 4, 4, seed=9)
    (3.0 * fused_linear_divergence(hs, ws, ht, wt, divergence="tvd")).backward()
    h1, w1 = hs.grad.clone(), ws.grad.clone()
    hs.grad = ws.grad = None
    fused_linear_divergence(hs, ws, ht, wt, divergence="tvd").backward()
    torch.testing.assert_close(h1, 3.0 * hs.grad)
    torch.testing.assert_close(w1, 3.0 * ws.grad)


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_with_logits_of_80_stays_finite(path, kind, dtype):
    hs, ws, ht, wt = make(8, 67, 16, 16, dtype=torch.float32, seed=10)
    with torch.no_grad():  # logits of about ±80: unit-norm rows, hidden states of norm 80
        ws.copy_(torch.nn.functional.normalize(ws, dim=-1))
        wt.copy_(torch.nn.functional.normalize(wt, dim=-1))
        hs.copy_(80 * torch.nn.functional.normalize(hs, dim=-1))
        ht.copy_(-80 * torch.nn.functional.normalize(hs, dim=-1))
    hs = hs.detach().to(dtype).requires_grad_()
    ws = ws.detach().to(dtype).requires_grad_()
    ht, wt = ht.to(dtype), wt.to(dtype)
    assert (hs.float() @ ws.float().T).abs().max() > 60
    loss = fused_linear_divergence(hs, ws, ht, wt, divergence=kind, temperature=0.5, **mixing(kind))
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert (
        hs.grad.dtype == dtype
        and torch.isfinite(hs.grad.float()).all()
        and torch.isfinite(ws.grad.float()).all()
    )
    expected = float64_loss(hs.detach().float(), ws.detach().float(), ht, wt, kind, 0.5, beta=0.3, alpha=0.2)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-3, atol=1e-3)


def test_mixed_dtypes_and_widths(path):
    hs, ws, ht, wt = make(7, 41, 6, 10, seed=11)
    hs16 = hs.detach().bfloat16().requires_grad_()
    ws16 = ws.detach().bfloat16().requires_grad_()
    loss = fused_linear_divergence(hs16, ws16, ht, wt, divergence="reverse_kl", temperature=2.0)
    expected = float64_loss(hs16.detach().float(), ws16.detach().float(), ht, wt, "reverse_kl", 2.0)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-5)


def _op_args(dtype, with_ce):
    hs, ws, ht, wt = make(6, 29, 5, 7, dtype=dtype, seed=12)
    kd_weight = torch.full((6,), 1 / 6, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    ce = labels = None
    if with_ce:
        labels = torch.tensor([1, 2, -100, 28, 0, 5])
        ce = (labels >= 0).to(kd_weight.dtype) * 0.3
    return (hs, ws, ht, wt, kd_weight, ce, labels, "skew_forward_kl", 1.5, 0.5, 0.1)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_ce", [False, True])
def test_opcheck(dtype, with_ce):
    torch.library.opcheck(torch.ops.distillkit.fused_linear_divergence_fwd, _op_args(dtype, with_ce))


@needs_kernel
def test_kernel_rejects_labels_outside_the_vocabulary():
    args = list(_op_args(torch.float32, True))
    args[6] = torch.tensor([1, 2, -100, 29, 0, 5])
    with pytest.raises(IndexError, match="label 29 at row 3 is outside"):
        torch.ops.distillkit.fused_linear_divergence_fwd(*args)


def test_torch_compile_fullgraph(path):
    hs, ws, ht, wt = make(9, 37, 6, 8, seed=13)
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1, 1], dtype=torch.bool)

    def step(h, w):
        return fused_linear_divergence(h, w, ht, wt, divergence="jsd", beta=0.4, temperature=2.0, mask=mask)

    eager = step(hs, ws)
    (g_h, g_w) = torch.autograd.grad(eager, (hs, ws))
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(hs, ws)
    (c_h, c_w) = torch.autograd.grad(compiled, (hs, ws))
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(c_h, g_h)
    torch.testing.assert_close(c_w, g_w)


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"wt": torch.randn(12, 8)}, ValueError, "student_weight has V = 11 rows and teacher_weight V = 12"),
        ({"ws": torch.randn(11, 5)}, ValueError, "student_weight is [11, 5] but student_hidden has Ds = 6"),
        ({"ht": torch.randn(3, 8)}, ValueError, "student_hidden has N = 4 rows but teacher_hidden 3"),
        ({"hs": torch.randn(4, 6, 1)}, ValueError, "student_hidden must be [N, D] (2-D)"),
        ({"hs": torch.ones(4, 6, dtype=torch.int64)}, TypeError, "student_hidden must be float32"),
        ({"wt": torch.randn(11, 8, device="meta")}, ValueError, "teacher_weight is on meta"),
        ({"divergence": "kl"}, ValueError, "unknown divergence 'kl'"),
        ({"temperature": 0.0}, ValueError, "temperature must be > 0.0"),
        ({"divergence": "jsd", "beta": 1.0}, ValueError, "beta must be in (0.0, 1.0)"),
        ({"mask": torch.ones(4)}, TypeError, "mask must be bool"),
        ({"mask": torch.ones(5, dtype=torch.bool)}, ValueError, "mask must be [N] = [4]"),
        ({"ce_weight": 0.5}, ValueError, "ce_weight > 0 needs labels"),
        ({"labels": torch.zeros(4), "ce_weight": 0.5}, TypeError, "labels must be integer token ids"),
    ],
)
def test_invalid_inputs_are_explained(change, error, message):
    inputs = {
        "hs": torch.randn(4, 6),
        "ws": torch.randn(11, 6),
        "ht": torch.randn(4, 8),
        "wt": torch.randn(11, 8),
    }
    kwargs = {k: v for k, v in change.items() if k not in inputs}
    inputs.update({k: v for k, v in change.items() if k in inputs})
    with pytest.raises(error, match=__import__("re").escape(message)):
        fused_linear_divergence(inputs["hs"], inputs["ws"], inputs["ht"], inputs["wt"], **kwargs)


@needs_kernel
def test_large_weight_gradient_is_handed_over_without_a_copy(monkeypatch):
    monkeypatch.setattr(COMPILED, "HANDOVER_ELEMENTS", 1)
    hs, ws, ht, wt = make(6, 50, 8, 8, seed=14)
    loss = fused_linear_divergence(hs, ws, ht, wt, divergence="jsd")
    loss.backward(retain_graph=True)
    expected = hs.detach().double().requires_grad_(), ws.detach().double().requires_grad_()
    float64_loss(*expected, ht, wt, "jsd", 1.0).backward()
    torch.testing.assert_close(ws.grad.double(), expected[1].grad, rtol=1e-4, atol=1e-6)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()
