import itertools
import math

import pytest
import torch

from distillkit.ops.divergences import DIVERGENCES, check_divergence, divergence, divergence_and_grad


def reference(p_logits, q_logits, kind, beta=0.5, alpha=0.1):
    """Float64 divergence per row, written out element by element from the formulas."""
    p_logits, q_logits = p_logits.double(), q_logits.double()
    out = torch.zeros(p_logits.shape[:-1], dtype=torch.float64)
    for index in itertools.product(*(range(n) for n in p_logits.shape[:-1])):
        zp, zq = p_logits[index].tolist(), q_logits[index].tolist()
        mp, mq = max(zp), max(zq)
        sp, sq = sum(math.exp(v - mp) for v in zp), sum(math.exp(v - mq) for v in zq)
        p = [math.exp(v - mp) / sp for v in zp]
        q = [math.exp(v - mq) / sq for v in zq]

        def kl(a, b):
            return sum(x * math.log(x / y) for x, y in zip(a, b, strict=True) if x > 0)

        if kind == "forward_kl":
            value = kl(p, q)
        elif kind == "reverse_kl":
            value = kl(q, p)
        elif kind == "jsd":
            m = [beta * x + (1 - beta) * y for x, y in zip(p, q, strict=True)]
            value = beta * kl(p, m) + (1 - beta) * kl(q, m)
        elif kind == "tvd":
            value = 0.5 * sum(abs(x - y) for x, y in zip(p, q, strict=True))
        elif kind == "skew_forward_kl":
            value = kl(p, [alpha * x + (1 - alpha) * y for x, y in zip(p, q, strict=True)])
        else:
            value = kl(q, [alpha * y + (1 - alpha) * x for x, y in zip(p, q, strict=True)])
        out[index] = value
    return out


def log_softmax(x):
    return torch.log_softmax(x, dim=-1)


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 3, 13)])
def test_value_matches_float64_formula(kind, shape):
    torch.manual_seed(len(shape) * 10 + shape[-1])
    zp, zq = 3 * torch.randn(*shape, dtype=torch.float64), 3 * torch.randn(*shape, dtype=torch.float64)
    got = divergence(log_softmax(zp), log_softmax(zq), kind, beta=0.3, alpha=0.2)
    torch.testing.assert_close(got, reference(zp, zq, kind, beta=0.3, alpha=0.2), rtol=1e-10, atol=1e-12)
    assert got.shape == shape[:-1]


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_float32_close_to_float64(kind):
    torch.manual_seed(3)
    zp, zq = 4 * torch.randn(5, 33), 4 * torch.randn(5, 33)
    got = divergence(log_softmax(zp), log_softmax(zq), kind)
    torch.testing.assert_close(got.double(), reference(zp, zq, kind), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_closed_form_gradient_matches_autograd_of_reference_formula(kind):
    torch.manual_seed(4)
    zp = 2 * torch.randn(4, 9, dtype=torch.float64)
    zq = (2 * torch.randn(4, 9, dtype=torch.float64)).requires_grad_()
    # Independent differentiable form of the reference (vectorised float64, straight from the formulas).
    p, q = torch.softmax(zp, -1), torch.softmax(zq, -1)
    if kind == "forward_kl":
        d = (p * (p.log() - q.log())).sum(-1)
    elif kind == "reverse_kl":
        d = (q * (q.log() - p.log())).sum(-1)
    elif kind == "jsd":
        m = 0.5 * p + 0.5 * q
        d = 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)
    elif kind == "tvd":
        d = 0.5 * (p - q).abs().sum(-1)
    elif kind == "skew_forward_kl":
        d = (p * (p / (0.1 * p + 0.9 * q)).log()).sum(-1)
    else:
        d = (q * (q / (0.1 * q + 0.9 * p)).log()).sum(-1)
    (expected,) = torch.autograd.grad(d.sum(), zq)
    value, grad = divergence_and_grad(log_softmax(zp), log_softmax(zq.detach()), kind)
    torch.testing.assert_close(value, d.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", [k for k in DIVERGENCES if k != "tvd"])
def test_gradcheck(kind):
    torch.manual_seed(5)
    zp = torch.randn(3, 6, dtype=torch.float64)
    zq = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: divergence(log_softmax(zp), log_softmax(z), kind), (zq,))


def test_gradcheck_tvd_away_from_ties():
    zp = torch.tensor([[0.0, 1.0, 2.0, -1.0]], dtype=torch.float64)
    zq = torch.tensor([[1.0, -0.5, 2.5, 0.3]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: divergence(log_softmax(zp), log_softmax(z), "tvd"), (zq,))


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_exact_zeros_give_no_nan(kind):
    # The teacher puts zero mass on two classes and the student on one other (logits of -inf).
    zp = torch.tensor([[2.0, -math.inf, 0.5, -math.inf, 1.0]])
    zq = torch.tensor([[0.3, 1.0, 0.2, 0.7, -math.inf]], requires_grad=True)
    if kind in ("forward_kl", "skew_reverse_kl"):  # zero student mass where the teacher has mass
        zq = torch.tensor([[0.3, 1.0, 0.2, 0.7, 0.4]], requires_grad=True)
    if kind in ("reverse_kl",):  # zero teacher mass where the student has mass would be infinite
        zp = torch.tensor([[2.0, 0.1, 0.5, 0.2, -math.inf]])
    value = divergence(log_softmax(zp), log_softmax(zq), kind)
    value.sum().backward()
    assert torch.isfinite(value).all() and torch.isfinite(zq.grad).all()
    _, grad = divergence_and_grad(log_softmax(zp), log_softmax(zq.detach()), kind)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad, zq.grad)


def test_identical_distributions_give_zero():
    z = torch.randn(4, 10)
    for kind in DIVERGENCES:
        assert divergence(log_softmax(z), log_softmax(z.clone()), kind).abs().max() < 1e-6


def test_invalid_arguments():
    with pytest.raises(ValueError, match="unknown divergence 'kl'"):
        check_divergence("kl", 0.5, 0.1)
    with pytest.raises(ValueError, match="0 < beta < 1"):
        check_divergence("jsd", 1.0, 0.1)
    with pytest.raises(ValueError, match="0 < alpha < 1"):
        check_divergence("skew_reverse_kl", 0.5, 0.0)
