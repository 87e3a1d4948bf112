"""fused_linear_divergence_topk (sparse teacher) against float64 formulas, the tail spread and as a bucket."""

from __future__ import annotations

import importlib
import math
import re

import pytest
import torch

from distillkit.ops import BUCKET_DIVERGENCES, DIVERGENCES, fused_linear_divergence_topk
from tests.divergence_reference import float64_divergence

TOPK = importlib.import_module("distillkit.ops.linear_divergence.topk")


@pytest.fixture(params=["kernel", "chunked"])
def path(request, monkeypatch):
    """Runs a test on the compiled kernel (blocks of 5 rows) and on the chunked PyTorch path."""
    if request.param == "kernel":
        if not TOPK.topk_kernel_available():
            pytest.skip("compiled op not built")
        monkeypatch.setenv("DISTILLKIT_FLD_ROWS", "5")
    else:
        monkeypatch.setattr(TOPK, "topk_kernel_available", lambda: False)
    return request.param


def float64_topk_loss(
    hs, ws, index, logp, log_tail, kind, temperature, beta=0.5, alpha=0.1, mask=None, labels=None, ce=0.0,
    tail="spread",
):  # fmt: skip
    """The loss from its definition, in float64.

    The teacher over V: its top-k log-probabilities, the tail mass spread evenly over the other tokens, at
    temperature T; the student: softmax(s / T). ``spread``: D over the V tokens. ``bucket``: D over k + 1
    buckets, bucket i being token index[i] and the tail bucket the sum over the rest.
    """
    s = hs.double() @ ws.double().T
    n, vocab = s.shape
    k = index.shape[1]
    teacher = torch.full((n, vocab), float("-inf"), dtype=torch.float64)
    if k < vocab:
        teacher[:] = (log_tail.double() - math.log(vocab - k)).unsqueeze(1)
    teacher.scatter_(1, index, logp.double())
    p = torch.softmax(teacher / temperature, -1)
    q = torch.softmax(s / temperature, -1)
    if tail == "bucket":
        in_top = torch.zeros(n, vocab, dtype=torch.bool).scatter_(1, index, True)
        buckets = [p.gather(1, index), q.gather(1, index)]
        if k < vocab:
            buckets[0] = torch.cat([buckets[0], (p * ~in_top).sum(-1, keepdim=True)], 1)
            buckets[1] = torch.cat([buckets[1], (q * ~in_top).sum(-1, keepdim=True)], 1)
        p, q = buckets
    per_row = float64_divergence(p, q, kind, beta, alpha)
    counted = torch.ones(n, dtype=torch.bool) if mask is None else mask
    loss = temperature**2 * per_row[counted].sum() / max(int(counted.sum()), 1)
    if ce:
        valid = labels != -100
        nll = -torch.log_softmax(s, -1)[valid.nonzero().squeeze(-1), labels[valid]]
        loss = loss + ce * nll.sum() / max(int(valid.sum()), 1)
    return loss


CASES = [("bucket", kind) for kind in BUCKET_DIVERGENCES] + [("spread", kind) for kind in DIVERGENCES]
"""Every (tail, divergence) the op has."""


def mixing(kind):
    return {"beta": 0.3} if kind == "jsd" else {"alpha": 0.2} if kind.startswith("skew_") else {}


def make(n, vocab, dim, k, dtype=torch.float32, seed=0, spread=3.0):
    """Student rows and weight, and a teacher's top-k of a random distribution (log tail from the rest)."""
    g = torch.Generator().manual_seed(seed)
    hs = (2 * torch.randn(n, dim, generator=g)).to(dtype).requires_grad_()
    ws = (torch.randn(vocab, dim, generator=g) / dim**0.5).to(dtype).requires_grad_()
    logp = torch.log_softmax(spread * torch.randn(n, vocab, generator=g, dtype=torch.float64), -1)
    values, index = logp.topk(k, dim=-1)
    if k < vocab:
        rest = logp.scatter(1, index, float("-inf")).logsumexp(-1)
    else:
        rest = torch.full((n,), float("-inf"), dtype=torch.float64)
    return hs, ws, index, values.to(dtype), rest.to(dtype)


def check(hs, ws, index, logp, log_tail, rtol=1e-4, atol=1e-6, **kwargs):
    loss = fused_linear_divergence_topk(hs, ws, index, logp, log_tail, **kwargs)
    loss.backward()
    h64 = hs.detach().double().requires_grad_()
    w64 = ws.detach().double().requires_grad_()
    expected = float64_topk_loss(
        h64,
        w64,
        index,
        logp,
        log_tail,
        kwargs.get("divergence", "forward_kl"),
        kwargs.get("temperature", 1.0),
        beta=kwargs.get("beta", 0.5),
        alpha=kwargs.get("alpha", 0.1),
        mask=kwargs.get("mask"),
        labels=kwargs.get("labels"),
        ce=kwargs.get("ce_weight", 0.0),
        tail=kwargs.get("tail", "spread"),
    )
    expected.backward()
    torch.testing.assert_close(loss.double(), expected, rtol=rtol, atol=atol)
    torch.testing.assert_close(hs.grad.double(), h64.grad, rtol=rtol, atol=atol)
    torch.testing.assert_close(ws.grad.double(), w64.grad, rtol=rtol, atol=atol)
    return loss


@pytest.mark.parametrize(("tail", "kind"), CASES)
@pytest.mark.parametrize(
    ("n", "vocab", "dim", "k", "temperature"),
    [
        (1, 7, 3, 2, 1.0),
        (13, 1031, 17, 64, 1.0),
        (23, 257, 33, 16, 2.0),
        (9, 130, 5, 1, 0.7),
        (6, 12, 4, 12, 1.5),
    ],
)
def test_matches_float64_formula(path, tail, kind, n, vocab, dim, k, temperature):
    hs, ws, index, logp, log_tail = make(n, vocab, dim, k, seed=n + vocab)
    if kind == "tvd":  # keep away from |p - q|'s kinks at float32 resolution
        hs = (3 * hs.detach()).requires_grad_()
    check(hs, ws, index, logp, log_tail, divergence=kind, temperature=temperature, tail=tail, **mixing(kind))


@pytest.mark.parametrize(("tail", "kind"), CASES)
def test_mask_and_cross_entropy(path, tail, kind):
    hs, ws, index, logp, log_tail = make(17, 301, 15, 8, seed=3)
    labels = torch.randint(0, 301, (17,), generator=torch.Generator().manual_seed(4))
    labels[[0, 5]] = -100
    mask = labels != -100
    mask[7] = False
    for temperature in (1.0, 2.0):
        hs.grad = ws.grad = None
        check(
            hs, ws, index, logp, log_tail, divergence=kind, temperature=temperature, mask=mask, labels=labels,
            ce_weight=0.4, tail=tail, **mixing(kind),
        )  # fmt: skip


@pytest.mark.parametrize("tail", ["bucket", "spread"])
def test_top_k_equal_to_the_vocabulary_is_the_dense_divergence(path, tail):
    from distillkit.ops import divergence

    hs, ws, index, logp, log_tail = make(5, 11, 4, 11, seed=5)
    loss = fused_linear_divergence_topk(hs, ws, index, logp, log_tail, divergence="jsd", tail=tail)
    dense_teacher = torch.empty(5, 11, dtype=torch.float64).scatter_(1, index, logp.double())
    log_q = torch.log_softmax(hs.detach().double() @ ws.detach().double().T, -1)
    expected = divergence(dense_teacher, log_q, "jsd").mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("tail", ["bucket", "spread"])
def test_no_teacher_mass_in_the_tail(path, tail):
    hs, ws, index, logp, _ = make(6, 40, 5, 6, seed=6)
    logp = torch.log_softmax(logp, -1)  # the top k hold all the mass
    log_tail = torch.full((6,), float("-inf"))
    check(hs, ws, index, logp, log_tail, divergence="forward_kl", temperature=1.0, tail=tail)


def test_the_spread_tail_is_the_dense_op_on_the_densified_teacher(path):
    """The spread form is fused_linear_divergence with the densified log-probabilities as teacher logits."""
    from distillkit.ops import fused_linear_divergence
    from distillkit.teacher_cache import densify_topk

    hs, ws, index, logp, log_tail = make(7, 90, 6, 9, seed=12)
    dense = densify_topk(logp, index, log_tail, 90)
    for kind in DIVERGENCES:
        got = fused_linear_divergence_topk(hs, ws, index, logp, log_tail, divergence=kind, temperature=1.5)
        want = fused_linear_divergence(hs, ws, dense, torch.eye(90), divergence=kind, temperature=1.5)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", BUCKET_DIVERGENCES)
def test_gradcheck_float64(path, kind):
    hs, ws, index, logp, log_tail = make(6, 13, 4, 3, dtype=torch.float64, seed=7)
    mask = torch.tensor([True, False, True, True, True, False])

    def fn(h, w):
        return fused_linear_divergence_topk(
            h, w, index, logp, log_tail, divergence=kind, temperature=1.3, mask=mask
        )

    assert fn(hs, ws).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, (hs, ws))


def test_row_groups_on_two_threads_match_one_thread():
    if not TOPK.topk_kernel_available():
        pytest.skip("compiled op not built")
    hs, ws, index, logp, log_tail = make(70, 300, 9, 10, seed=8)  # a small vocabulary: rows split in groups
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for tail in ("bucket", "spread"):
            hs.grad = ws.grad = None
            check(hs, ws, index, logp, log_tail, divergence="jsd", temperature=1.5, tail=tail)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_stays_finite(path, dtype):
    hs, ws, index, logp, log_tail = make(8, 67, 16, 8, seed=9)
    hs = (20 * hs.detach()).to(dtype).requires_grad_()
    ws = ws.detach().to(dtype).requires_grad_()
    loss = fused_linear_divergence_topk(hs, ws, index, logp.to(dtype), log_tail.to(dtype), divergence="jsd")
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert (
        hs.grad.dtype == dtype
        and torch.isfinite(hs.grad.float()).all()
        and torch.isfinite(ws.grad.float()).all()
    )


def test_torch_compile_fullgraph(path):
    hs, ws, index, logp, log_tail = make(9, 37, 6, 4, seed=10)

    def step(h, w):
        return fused_linear_divergence_topk(
            h, w, index, logp, log_tail, divergence="reverse_kl", temperature=2.0
        )

    eager = step(hs, ws)
    grads = torch.autograd.grad(eager, (hs, ws))
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(hs, ws)
    torch.testing.assert_close(compiled, eager)
    for got, want in zip(torch.autograd.grad(compiled, (hs, ws)), grads, strict=True):
        torch.testing.assert_close(got, want)


def test_opcheck():
    if not TOPK.topk_kernel_available():
        pytest.skip("compiled op not built")
    hs, ws, index, logp, log_tail = make(6, 29, 5, 4, seed=11)
    kd = torch.full((6,), 1 / 6)
    labels = torch.tensor([1, 2, -100, 28, 0, 5])
    for tail in ("bucket", "spread"):
        for ce, lab in ((None, None), ((labels >= 0).float() * 0.3, labels)):
            args = (hs, ws, index, logp, log_tail, kd, ce, lab, "jsd", 1.5, 0.4, 0.1, tail)
            torch.library.opcheck(torch.ops.distillkit.fused_linear_divergence_topk_fwd, args)


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (
            {"divergence": "tvd", "tail": "bucket"},
            ValueError,
            "divergence 'tvd' has no form with the tail as one",
        ),
        ({"tail": "uniform"}, ValueError, "tail must be one of spread, bucket, got 'uniform'"),
        ({"divergence": "kl"}, ValueError, "unknown divergence 'kl'"),
        ({"index": torch.zeros(4, 3)}, TypeError, "teacher_index must be an integer tensor"),
        ({"index": torch.zeros(4, 12, dtype=torch.int64)}, ValueError, "with k <= V = 11"),
        ({"logp": torch.zeros(4, 2)}, ValueError, "teacher_logp must be [N, k] = [4, 3]"),
        ({"log_tail": torch.zeros(5)}, ValueError, "teacher_log_tail [N] = [4]"),
        ({"ws": torch.randn(11, 5)}, ValueError, "student_weight is [11, 5] but student_hidden has Ds = 6"),
        ({"temperature": -1.0}, ValueError, "temperature must be > 0.0"),
        ({"mask": torch.ones(4)}, TypeError, "mask must be bool"),
    ],
)
def test_invalid_inputs_are_explained(change, error, message):
    inputs = {
        "hs": torch.randn(4, 6),
        "ws": torch.randn(11, 6),
        "index": torch.tensor([[0, 1, 2]] * 4),
        "logp": torch.full((4, 3), -2.0),
        "log_tail": torch.full((4,), -0.5),
    }
    kwargs = {k: v for k, v in change.items() if k not in inputs}
    inputs.update({k: v for k, v in change.items() if k in inputs})
    with pytest.raises(error, match=re.escape(message)):
        fused_linear_divergence_topk(*inputs.values(), **kwargs)


@pytest.mark.parametrize(
    ("index", "message"),
    [
        ([[0, 1, 1]] * 4, "repeats token 1 in row 0"),
        ([[0, 1, 11]] * 4, "teacher_index 11 at row 0 is outside"),
    ],
)
def test_kernel_rejects_repeated_or_outside_ids(index, message):
    if not TOPK.topk_kernel_available():
        pytest.skip("compiled op not built")
    with pytest.raises((RuntimeError, IndexError), match=re.escape(message)):
        fused_linear_divergence_topk(
            torch.randn(4, 6),
            torch.randn(11, 6),
            torch.tensor(index),
            torch.full((4, 3), -2.0),
            torch.zeros(4),
        )
