import math
import re

import pytest
import torch
import torch.nn.functional as F

from distillkit import Taps, build_term
from distillkit.errors import ConfigError
from distillkit.objective.terms import ModelDims
from tests.divergence_reference import float64_divergence

DIMS = ModelDims(student_layers=2, teacher_layers=4, student_hidden=8, teacher_hidden=8)


def taps(logits, mask=None, labels=None):
    length = logits.shape[1] if logits.dim() == 3 else 3
    hidden = (torch.zeros(logits.shape[0], length, 8),)
    return Taps(hidden_states=hidden, logits=logits, attention_mask=mask, labels=labels)


def test_matches_hinton_formula_for_sequence_logits():
    torch.manual_seed(0)
    s, t = torch.randn(5, 4), torch.randn(5, 4)
    loss = build_term("kd", DIMS, temperature=3.0)(taps(s), taps(t))
    expected = F.kl_div(
        F.log_softmax(s / 3, -1), F.log_softmax(t / 3, -1), reduction="batchmean", log_target=True
    )
    torch.testing.assert_close(loss, 9.0 * expected)


def test_identical_logits_give_zero():
    logits = torch.randn(3, 7)
    assert build_term("kd", DIMS)(taps(logits), taps(logits.clone())).abs() < 1e-6


def test_token_logits_ignore_padding():
    torch.manual_seed(1)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    term = build_term("kd", DIMS, temperature=1.0)
    base = term(taps(s, mask), taps(t, mask))
    s2 = s.clone()
    s2[0, 3:] = 100.0  # change only padded positions
    torch.testing.assert_close(term(taps(s2, mask), taps(t, mask)), base)
    kl = (F.softmax(t, -1) * (F.log_softmax(t, -1) - F.log_softmax(s, -1))).sum(-1)
    torch.testing.assert_close(base, (kl * mask).sum() / mask.sum())


def test_ce_weight_adds_hard_label_term():
    torch.manual_seed(2)
    s, t, y = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    soft = build_term("kd", DIMS, temperature=2.0)(taps(s), taps(t))
    mixed = build_term("kd", DIMS, temperature=2.0, ce_weight=0.5)(taps(s, labels=y), taps(t))
    torch.testing.assert_close(mixed, soft + 0.5 * F.cross_entropy(s, y))
    with pytest.raises(ValueError, match="needs labels"):
        build_term("kd", DIMS, ce_weight=0.5)(taps(s), taps(t))


def test_shape_mismatch_is_explained():
    with pytest.raises(ValueError, match="logits of equal shape"):
        build_term("kd", DIMS)(taps(torch.randn(2, 3)), taps(torch.randn(2, 4)))


DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl"]


def reference_divergence(t_logits, s_logits, kind, temperature, beta=0.5, alpha=0.1):
    """Float64 per-position divergence from the formulas (teacher p, student q)."""
    p = torch.softmax(t_logits.double() / temperature, -1)
    q = torch.softmax(s_logits.double() / temperature, -1)
    return float64_divergence(p, q, kind, beta, alpha)


def mixing(kind):
    return {"beta": 0.3} if kind == "jsd" else {"alpha": 0.2} if kind.startswith("skew_") else {}


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_token_divergence_matches_float64_formula_with_padding(kind, temperature):
    torch.manual_seed(hash((kind, temperature)) % 1000)
    batch, length, vocab = 3, 6, 37
    s, t = 3 * torch.randn(batch, length, vocab), 3 * torch.randn(batch, length, vocab)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, 4:] = 0
    mask[2, 1:] = 0
    s[mask == 0] = 1e4  # garbage at padded positions must not leak in
    term = build_term("kd", DIMS, divergence=kind, temperature=temperature, **mixing(kind))
    loss = term(taps(s, mask), taps(t, mask))
    per = reference_divergence(t, s, kind, temperature, **{"beta": 0.3, "alpha": 0.2})
    expected = temperature**2 * per[mask.bool()].mean()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_sequence_divergence_averages_over_examples(kind):
    torch.manual_seed(7)
    s, t = torch.randn(5, 4), torch.randn(5, 4)
    loss = build_term("kd", DIMS, divergence=kind, temperature=2.0, **mixing(kind))(taps(s), taps(t))
    per = reference_divergence(t, s, kind, 2.0, beta=0.3, alpha=0.2)
    torch.testing.assert_close(loss.double(), 4.0 * per.mean(), rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_gradient_matches_float64_reference(kind):
    torch.manual_seed(8)
    s = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 5, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    term = build_term("kd", DIMS, divergence=kind, temperature=1.5, **mixing(kind))

    def fn(logits):
        hidden = (torch.zeros(2, 3, 8, dtype=torch.float64),)
        student = Taps(hidden_states=hidden, logits=logits, attention_mask=mask)
        teacher = Taps(hidden_states=hidden, logits=t, attention_mask=mask)
        return term(student, teacher)

    # The term computes in float32 by design; gradcheck its formula in float64 via the reference instead,
    # and compare the term's float32 gradient with the float64 one.
    loss = fn(s)
    loss.backward()
    s64 = s.detach().clone().requires_grad_()
    per = reference_divergence(t, s64, kind, 1.5, beta=0.3, alpha=0.2)
    (2.25 * per[mask.bool()].mean()).backward()
    torch.testing.assert_close(s.grad, s64.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_bf16_large_logits_and_autocast_stay_finite(kind):
    torch.manual_seed(9)
    s = (80 * torch.randn(2, 4, 50).clamp(-1, 1)).bfloat16().requires_grad_()
    t = (80 * torch.randn(2, 4, 50).clamp(-1, 1)).bfloat16()
    term = build_term("kd", DIMS, divergence=kind, temperature=0.5, **mixing(kind))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = term(taps(s), taps(t))
    loss.backward()
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss) and torch.isfinite(s.grad.float()).all()
    per = reference_divergence(t.float(), s.detach().float(), kind, 0.5, beta=0.3, alpha=0.2)
    expected = 0.25 * per.mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("kind", ["forward_kl", "jsd", "tvd", "skew_forward_kl"])
def test_teacher_zeros_give_no_nan(kind):
    t = torch.tensor([[[3.0, -math.inf, 0.0, -math.inf]]])
    s = torch.randn(1, 1, 4, requires_grad=True)
    loss = build_term("kd", DIMS, divergence=kind)(taps(s), taps(t))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_ce_weight_works_with_any_divergence():
    torch.manual_seed(10)
    s, t, y = torch.randn(2, 3, 6), torch.randn(2, 3, 6), torch.tensor([[1, 2, -100], [0, 5, 3]])
    soft = build_term("kd", DIMS, divergence="jsd", beta=0.3)(taps(s), taps(t))
    mixed = build_term("kd", DIMS, divergence="jsd", beta=0.3, ce_weight=0.7)(taps(s, labels=y), taps(t))
    torch.testing.assert_close(mixed, soft + 0.7 * F.cross_entropy(s.reshape(-1, 6), y.reshape(-1)))


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"divergence": "tvd", "beta": 0.3}, "beta applies only to divergence 'jsd'"),
        ({"alpha": 0.2}, "alpha applies only to divergences 'skew_forward_kl' and 'skew_reverse_kl'"),
        ({"divergence": "jsd", "alpha": 0.2}, "alpha applies only"),
        ({"divergence": "jsd", "beta": 1.0}, "beta: Input should be less than 1"),
        ({"divergence": "skew_reverse_kl", "alpha": 0.0}, "alpha: Input should be greater than 0"),
        ({"divergence": "kl"}, "divergence: Input should be 'forward_kl'"),
    ],
)
def test_invalid_divergence_parameters_are_config_errors(params, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_term("kd", DIMS, **params)


def test_defaults_are_today_behaviour_and_listed():
    from distillkit_plugins.kd import KDLoss

    names = [row[0] for row in KDLoss.describe_params()]
    assert names == ["divergence", "temperature", "beta", "alpha", "ce_weight", "topk_tail"]
    assert KDLoss.parse_params({}).divergence == "forward_kl"
